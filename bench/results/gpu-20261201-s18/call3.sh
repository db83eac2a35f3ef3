# session 18 call 3 (1x H200, carry .whl-gpu .gpu/common.sh .gpu/s18c2.sh): rev 3a8a955. llama-65b zero3, resident_layers=80.
export WHL=.whl-gpu; source .gpu/common.sh
[ -d /tmp/site/chatterbot_corpus ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-gpu/chatterbot*.whl; el
REV=3a8a955
[ -f /tmp/lorasp-bench/bases/llama-65b/config.json ] || { python3 -m lorasp_dist prepare-base --preset llama-65b --out /tmp/lorasp-bench/bases/llama-65b > $OUT/logs/prep65.log 2>&1; echo "prep65 rc=$?"; el; }
ARGS="--preset llama-65b --ds-config zero3 --via torchrun --work /tmp/lorasp-bench"
left() { echo $(( 580 - ($(date +%s)-T0) )); }
run() { id=$1; shift; LORASP_GIT_REV=$REV timeout $(left) python3 bench/run.py $ARGS --run-id $id "$@" > $OUT/logs/$id.log 2>&1; echo "$id rc=$?"; el; grep -o '"tokens_per_s_per_gpu": [0-9.]*\|"mfu": [0-9.]*\|"peak_reserved[a-z_]*": [0-9.]*' $OUT/logs/$id.log | tr "
" " "; echo; }
M4="--micro-batch 4 --steps 8 --set train.checkpoint_layers=51 deepspeed.resident_layers=80"
# mbs 1 (every layer checkpointed), fused kernels on: stage3_param_persistence_threshold 1e4 (template) against 1e6
# (adapter values and norms kept whole, never fetched or released), alternating, 2 each; then mbs 4 fused with 45
# layers checkpointed (fused mbs 4 ck51 reserved 105 GiB in call 1).
M1="--micro-batch 1 --steps 10 --set deepspeed.resident_layers=80 train.fused_kernels=true"
P=deepspeed.overrides.zero_optimization.stage3_param_persistence_threshold=1000000
for i in 1 2; do
  run s18b-mbs1-fused-$i $M1
  run s18b-mbs1-fused-persist-$i $M1 $P
done
[ $(left) -gt 100 ] && run s18b-mbs4-fused-ck45 --micro-batch 4 --steps 8 --set train.checkpoint_layers=45 deepspeed.resident_layers=80 train.fused_kernels=true
collect
