# session 15 call 1 (1x H200, carry .whl .gpu): issue 12's one-GPU line, llama-65b zero3 mbs 1: every layer
# checkpointed (today's default) against train.gradient_checkpointing=false (the plan's fastest setting on 139 GiB),
# alternating, 2 runs each; then mbs 4 with the plan's train.checkpoint_layers=51 if time is left.
source .gpu/common.sh
el
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m lorasp_dist prepare-base --preset llama-65b --out /tmp/lorasp-bench/bases/llama-65b > $OUT/logs/prep65.log 2>&1; echo "prep65 rc=$?"; el
B="python3 bench/run.py --preset llama-65b --ds-config zero3 --via torchrun --steps 10"
run() { id=$1; shift; timeout $(( 590 - ($(date +%s)-T0) )) $B --run-id $id "$@" > $OUT/logs/$id.log 2>&1; echo "$id rc=$?"; el; grep -h '"config"' $OUT/logs/$id.log | cut -c1-420; }
for i in 1 2; do
  run s15-gc-mbs1-$i --micro-batch 1
  run s15-nogc-mbs1-$i --micro-batch 1 --set train.gradient_checkpointing=false
done
[ $(( $(date +%s)-T0 )) -lt 470 ] && run s15-ck51-mbs4 --micro-batch 4 --set train.checkpoint_layers=51
collect
