# session 19 call 2 (1x H200, warm, carry .whl-gpu .gpu/common.sh .gpu/s19c2.sh): `lorasp launch` against
# `torchrun ... lorasp train` on llama-7b, micro-batch 1, 3 alternating repeats (issue 12's launcher-cost line); then
# the llama-65b base for calls 3-4
export WHL=.whl-gpu; source .gpu/common.sh
export LORASP_GIT_REV=6646bbc
python3 -c "import ray, deepspeed, bitsandbytes, datasets, chatterbot_corpus; print('ray', ray.__version__, 'ds', deepspeed.__version__)"; el
timeout 400 python3 bench/compare.py --preset llama-7b --micro-batches 1 --systems lorasp lorasp-torchrun --repeats 3 --steps 10 --set deepspeed.resident_layers=32 > $OUT/logs/c7b.log 2>&1; echo "c7b rc=$?"; el
grep '\[compare\]\|tokens_per_s_per_gpu"' $OUT/logs/c7b.log | tail -12
timeout 110 python3 -m lorasp_dist prepare-base --preset llama-65b --out /tmp/lorasp-bench/bases/llama-65b > $OUT/logs/prep65.log 2>&1; echo "prep65 rc=$?"; el
collect
