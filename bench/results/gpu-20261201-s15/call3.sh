# session 15 call 3 (1x H200, carry .whl .gpu): llama-65b zero3 on one H200, every layer fetched whole with the
# layer-wide adapter rebuild: mbs 1 without checkpointing (the plan's fastest setting on 139 GiB) against every layer
# checkpointed, alternating, 2 runs each; mbs 4 with checkpoint_layers=51 and mbs 8 with checkpoint_layers=69 (the
# plan's fewest that fit).
source .gpu/common.sh
el
[ -f /tmp/lorasp-bench/bases/llama-65b/config.json ] || { python3 -m lorasp_dist prepare-base --preset llama-65b --out /tmp/lorasp-bench/bases/llama-65b > $OUT/logs/prep65.log 2>&1; echo "prep65 rc=$?"; el; }
ARGS="--preset llama-65b --ds-config zero3 --via torchrun --steps 10"
left() { echo $(( 590 - ($(date +%s)-T0) )); }
run() { id=$1; shift; timeout $(left) python3 bench/run.py $ARGS --run-id $id "$@" > $OUT/logs/$id.log 2>&1; echo "$id rc=$?"; el; grep -h '"config"' $OUT/logs/$id.log | cut -c1-300; }
for i in 1 2; do
  run s15-leaf-nogc-mbs1-$i --micro-batch 1 --set train.gradient_checkpointing=false
  run s15-leaf-gc-mbs1-$i --micro-batch 1
done
[ $(left) -gt 120 ] && run s15-leaf-ck51-mbs4 --micro-batch 4 --set train.checkpoint_layers=51
[ $(left) -gt 130 ] && run s15-leaf-ck69-mbs8 --micro-batch 8 --set train.checkpoint_layers=69
collect
