# session 15 call 2 (1x H200, carry .whl .gpu): the layer-wide adapter rebuild (AdapterGroup, NEW) against the
# per-matrix rebuild (OLD = 0ed603d, unpacked from .gpu/old.tgz), llama-65b zero3 mbs 1, every layer checkpointed,
# alternating, 2 runs each; then NEW at mbs 4 with the plan's checkpoint_layers=51; then a profiled NEW mbs 1 run.
source .gpu/common.sh
el
mkdir -p /tmp/old && tar xzf .gpu/old.tgz -C /tmp/old
[ -f /tmp/lorasp-bench/bases/llama-65b/config.json ] || { python3 -m lorasp_dist prepare-base --preset llama-65b --out /tmp/lorasp-bench/bases/llama-65b > $OUT/logs/prep65.log 2>&1; echo "prep65 rc=$?"; el; }
ARGS="--preset llama-65b --ds-config zero3 --via torchrun --steps 10 --work /tmp/lorasp-bench"
left() { echo $(( 590 - ($(date +%s)-T0) )); }
new() { id=$1; shift; LORASP_GIT_REV=$NEW timeout $(left) python3 bench/run.py $ARGS --run-id $id "$@" > $OUT/logs/$id.log 2>&1; echo "$id rc=$?"; el; grep -h '"config"' $OUT/logs/$id.log | cut -c1-300; }
old() { id=$1; shift; (cd /tmp/old && LORASP_GIT_REV=0ed603d PYTHONPATH=/tmp/site:/tmp/old timeout $(left) python3 bench/run.py $ARGS --results $OLDRES --run-id $id "$@") > $OUT/logs/$id.log 2>&1; echo "$id rc=$?"; el; grep -h '"config"' $OUT/logs/$id.log | cut -c1-300; }
OLDRES=$PWD/bench/results
for i in 1 2; do old s15-old-mbs1-$i --micro-batch 1; new s15-grp-mbs1-$i --micro-batch 1; done
[ $(left) -gt 125 ] && new s15-grp-ck51-mbs4 --micro-batch 4 --set train.checkpoint_layers=51
[ $(left) -gt 100 ] && new s15-grp-prof-mbs1 --micro-batch 1 --set "train.profile_steps=[6]"
collect
