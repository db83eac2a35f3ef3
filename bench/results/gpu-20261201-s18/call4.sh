# session 18 call 4 (1x H200, carry .whl-gpu .gpu/common.sh .gpu/s18c3.sh): rev 3a8a955. llama-65b zero3, resident_layers=80.
# Run as sent in call 4, whose left() budget was cut from 580 to 330 s (sed on the device) to fit the device time left.
export WHL=.whl-gpu; source .gpu/common.sh
[ -d /tmp/site/chatterbot_corpus ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-gpu/chatterbot*.whl; el
REV=3a8a955
[ -f /tmp/lorasp-bench/bases/llama-65b/config.json ] || { python3 -m lorasp_dist prepare-base --preset llama-65b --out /tmp/lorasp-bench/bases/llama-65b > $OUT/logs/prep65.log 2>&1; echo "prep65 rc=$?"; el; }
ARGS="--preset llama-65b --ds-config zero3 --via torchrun --work /tmp/lorasp-bench"
left() { echo $(( 330 - ($(date +%s)-T0) )); }
run() { id=$1; shift; LORASP_GIT_REV=$REV timeout $(left) python3 bench/run.py $ARGS --run-id $id "$@" > $OUT/logs/$id.log 2>&1; echo "$id rc=$?"; el; grep -o '"tokens_per_s_per_gpu": [0-9.]*\|"mfu": [0-9.]*\|"peak_reserved[a-z_]*": [0-9.]*' $OUT/logs/$id.log | tr "
" " "; echo; }
M4="--micro-batch 4 --steps 8 --set train.checkpoint_layers=51 deepspeed.resident_layers=80"
# mbs 1 (every layer checkpointed), fused kernels on (the setting of call 2's first runs): 4 more runs, for the
# median of issue 12's one-GPU line.
M1="--micro-batch 1 --steps 10 --set deepspeed.resident_layers=80 train.fused_kernels=true"
for i in 3 4 5 6; do [ $(left) -gt 75 ] && run s18c-mbs1-fused-$i $M1; done
collect
