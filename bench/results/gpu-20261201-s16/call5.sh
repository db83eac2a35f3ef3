# session 16 call 5 (1x H200, carry .whl .gpu, the last ~4 device minutes): NEW = 5f1ecb7, train.fused_kernels on
# (the default): llama-65b zero3 mbs 1, every layer checkpointed, resident_layers=80; then mbs 4 (checkpoint_layers=51)
# for 6 steps if time is left. One run each: no alternation fits the time left; compare with the records of calls 2-4.
source .gpu/common.sh
el
NEW=5f1ecb7
python3 -m lorasp_dist prepare-base --preset llama-65b --out /tmp/lorasp-bench/bases/llama-65b > $OUT/logs/prep65.log 2>&1; echo "prep65 rc=$?"; el
ARGS="--preset llama-65b --ds-config zero3 --via torchrun --work /tmp/lorasp-bench"
left() { echo $(( 205 - ($(date +%s)-T0) )); }
new() { id=$1; shift; LORASP_GIT_REV=$NEW timeout $(left) python3 bench/run.py $ARGS --run-id $id "$@" > $OUT/logs/$id.log 2>&1; echo "$id rc=$?"; el; grep -h '"config"' $OUT/logs/$id.log | cut -c1-300; }
new s16d-fused-mbs1 --micro-batch 1 --steps 10 --set deepspeed.resident_layers=80
[ $(left) -gt 60 ] && new s16d-fused-ck51-mbs4 --micro-batch 4 --steps 6 --set train.checkpoint_layers=51 deepspeed.resident_layers=80
collect
