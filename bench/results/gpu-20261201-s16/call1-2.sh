# Calls 1 and 2 ran this script; call 1 with NEW=a4542c1, whose runs failed at the first forward (the adapters were
# built on the CPU beside a resident layer: fixed in b27647e); call 2 with NEW=b27647e as below. Call 2 ran on the
# machine call 1 had warmed, so its OLD runs resumed call 1's finished run directories: their records are call 1's.
# session 16 call 1 (1x H200, carry .whl .gpu): resident 4-bit layers + the recompute's kept dequantized weights
# (NEW = b27647e, deepspeed.resident_layers=80) against OLD = a48ecb9 (session 15's code), llama-65b zero3 mbs 1,
# every layer checkpointed, alternating, 2 runs each; then NEW at mbs 4 with checkpoint_layers=51 if time is left.
source .gpu/common.sh
el
NEW=b27647e
mkdir -p /tmp/old && tar xzf .gpu/old.tgz -C /tmp/old
[ -f /tmp/lorasp-bench/bases/llama-65b/config.json ] || { python3 -m lorasp_dist prepare-base --preset llama-65b --out /tmp/lorasp-bench/bases/llama-65b > $OUT/logs/prep65.log 2>&1; echo "prep65 rc=$?"; el; }
ARGS="--preset llama-65b --ds-config zero3 --via torchrun --steps 10 --work /tmp/lorasp-bench"
left() { echo $(( 575 - ($(date +%s)-T0) )); }
new() { id=$1; shift; LORASP_GIT_REV=$NEW timeout $(left) python3 bench/run.py $ARGS --run-id $id "$@" > $OUT/logs/$id.log 2>&1; echo "$id rc=$?"; el; grep -h '"config"' $OUT/logs/$id.log | cut -c1-300; }
old() { id=$1; shift; (cd /tmp/old && LORASP_GIT_REV=a48ecb9 PYTHONPATH=/tmp/site:/tmp/old timeout $(left) python3 bench/run.py $ARGS --results $OLDRES --run-id $id "$@") > $OUT/logs/$id.log 2>&1; echo "$id rc=$?"; el; grep -h '"config"' $OUT/logs/$id.log | cut -c1-300; }
OLDRES=$PWD/bench/results
for i in 1 2; do new s16-res-mbs1-$i --micro-batch 1 --set deepspeed.resident_layers=80; old s16-old-mbs1-$i --micro-batch 1; done
[ $(left) -gt 125 ] && new s16-res-ck51-mbs4 --micro-batch 4 --set train.checkpoint_layers=51 deepspeed.resident_layers=80
collect
