# session 19 call 3 (1x H200, warm, carry .whl-gpu .gpu/common.sh .gpu/s19c3.sh): `lorasp launch` against
# `torchrun ... lorasp train` on llama-65b, micro-batch 4 with the plan's one-GPU pick (42 of 80 layers checkpointed,
# all resident), 2 alternating repeat(s); calls 3 and 4 together are 3 runs a system (bench/compare.py --merge)
export WHL=.whl-gpu; source .gpu/common.sh
export LORASP_GIT_REV=6646bbc
timeout 540 python3 bench/compare.py --preset llama-65b --micro-batches 4 --systems lorasp lorasp-torchrun --repeats 2 --steps 8 --set train.checkpoint_layers=42 deepspeed.resident_layers=80 > $OUT/logs/c65.log 2>&1; echo "c65 rc=$?"; el
grep '\[compare\]\|tokens_per_s_per_gpu"' $OUT/logs/c65.log | tail -12
collect
