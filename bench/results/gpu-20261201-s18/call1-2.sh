# session 18 calls 1 and 2 (1x H200, carry .whl-gpu .gpu/common.sh .gpu/s18c1.sh): rev 3a8a955. llama-65b zero3, resident_layers=80.
# Call 1 ran this without the chatterbot-corpus line and failed at every run ("the built-in corpus needs chatterbot-corpus"); call 2 is this file.
# mbs 4 with 51 layers checkpointed: train.fused_kernels false/true alternating, 2 runs each (issue 12's MFU line);
# then, while time is left, mbs 1 (every layer checkpointed): fused false/true.
export WHL=.whl-gpu; source .gpu/common.sh
[ -d /tmp/site/chatterbot_corpus ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-gpu/chatterbot*.whl; el
REV=3a8a955
[ -f /tmp/lorasp-bench/bases/llama-65b/config.json ] || { python3 -m lorasp_dist prepare-base --preset llama-65b --out /tmp/lorasp-bench/bases/llama-65b > $OUT/logs/prep65.log 2>&1; echo "prep65 rc=$?"; el; }
ARGS="--preset llama-65b --ds-config zero3 --via torchrun --work /tmp/lorasp-bench"
left() { echo $(( 580 - ($(date +%s)-T0) )); }
run() { id=$1; shift; LORASP_GIT_REV=$REV timeout $(left) python3 bench/run.py $ARGS --run-id $id "$@" > $OUT/logs/$id.log 2>&1; echo "$id rc=$?"; el; grep -o '"tokens_per_s_per_gpu": [0-9.]*\|"mfu": [0-9.]*\|"peak_reserved[a-z_]*": [0-9.]*' $OUT/logs/$id.log | tr "
" " "; echo; }
M4="--micro-batch 4 --steps 8 --set train.checkpoint_layers=51 deepspeed.resident_layers=80"
for i in 1 2; do
  run s18a-mbs4-plain-$i $M4 train.fused_kernels=false
  run s18a-mbs4-fused-$i $M4 train.fused_kernels=true
done
M1="--micro-batch 1 --steps 10 --set deepspeed.resident_layers=80"
[ $(left) -gt 75 ] && run s18a-mbs1-plain-1 $M1 train.fused_kernels=false
[ $(left) -gt 75 ] && run s18a-mbs1-fused-1 $M1 train.fused_kernels=true
collect
