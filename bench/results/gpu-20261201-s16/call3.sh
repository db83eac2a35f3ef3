# session 16 call 2 (1x H200, carry .whl .gpu): NEW = 48bcff4 (resident layers, kept dequantized weights, gc.freeze)
# with deepspeed.resident_layers=80 against OLD = a48ecb9 (session 15's code), llama-65b zero3 mbs 1, every layer
# checkpointed, alternating, 2 runs each (fresh run ids: a warm machine's runs/ would be resumed); then NEW at the
# plan's mbs 8 setting for 139 GiB (checkpoint_layers=69, resident_layers=80).
source .gpu/common.sh
el
NEW=48bcff4
mkdir -p /tmp/old && tar xzf .gpu/old.tgz -C /tmp/old
[ -f /tmp/lorasp-bench/bases/llama-65b/config.json ] || { python3 -m lorasp_dist prepare-base --preset llama-65b --out /tmp/lorasp-bench/bases/llama-65b > $OUT/logs/prep65.log 2>&1; echo "prep65 rc=$?"; el; }
ARGS="--preset llama-65b --ds-config zero3 --via torchrun --steps 10 --work /tmp/lorasp-bench"
left() { echo $(( 575 - ($(date +%s)-T0) )); }
new() { id=$1; shift; LORASP_GIT_REV=$NEW timeout $(left) python3 bench/run.py $ARGS --run-id $id "$@" > $OUT/logs/$id.log 2>&1; echo "$id rc=$?"; el; grep -h '"config"' $OUT/logs/$id.log | cut -c1-300; }
old() { id=$1; shift; (cd /tmp/old && LORASP_GIT_REV=a48ecb9 PYTHONPATH=/tmp/site:/tmp/old timeout $(left) python3 bench/run.py $ARGS --results $OLDRES --run-id $id "$@") > $OUT/logs/$id.log 2>&1; echo "$id rc=$?"; el; grep -h '"config"' $OUT/logs/$id.log | cut -c1-300; }
OLDRES=$PWD/bench/results
for i in 1 2; do old s16b-old-mbs1-$i --micro-batch 1; new s16b-new-mbs1-$i --micro-batch 1 --set deepspeed.resident_layers=80; done
[ $(left) -gt 160 ] && new s16b-new-ck69-mbs8 --micro-batch 8 --set train.checkpoint_layers=69 deepspeed.resident_layers=80
collect
