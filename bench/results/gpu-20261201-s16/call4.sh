# session 16 call 3 (1x H200, carry .whl .gpu): where NEW's (48bcff4) step goes now: torch.profiler tables of steps
# 6-7 of llama-65b zero3 at mbs 1 (every layer checkpointed) and at mbs 4 (checkpoint_layers=51), resident_layers=80.
source .gpu/common.sh
el
NEW=48bcff4
[ -f /tmp/lorasp-bench/bases/llama-65b/config.json ] || { python3 -m lorasp_dist prepare-base --preset llama-65b --out /tmp/lorasp-bench/bases/llama-65b > $OUT/logs/prep65.log 2>&1; echo "prep65 rc=$?"; el; }
ARGS="--preset llama-65b --ds-config zero3 --via torchrun --steps 8 --work /tmp/lorasp-bench"
left() { echo $(( 470 - ($(date +%s)-T0) )); }
new() { id=$1; shift; LORASP_GIT_REV=$NEW timeout $(left) python3 bench/run.py $ARGS --run-id $id "$@" > $OUT/logs/$id.log 2>&1; echo "$id rc=$?"; el; grep -h '"config"' $OUT/logs/$id.log | cut -c1-300; }
new s16c-prof-mbs1 --micro-batch 1 --set "train.profile_steps=[6]" deepspeed.resident_layers=80
[ $(left) -gt 130 ] && new s16c-prof-ck51-mbs4 --micro-batch 4 --set "train.profile_steps=[6]" train.checkpoint_layers=51 deepspeed.resident_layers=80
collect
