# session 18 call 5 (1x H200, cold machine, carry .whl-gpu .gpu/common.sh .gpu/s18c5.sh): rev b4b9e19, the plan's new
# pick for one 139 GiB H200 (`lorasp plan --preset llama-65b --gpus 1 --gpu-mem 139GiB`): zero3, micro-batch 4,
# 42 of 80 layers checkpointed, all 80 resident, fused kernels on (the default). One run, the device minutes left.
export WHL=.whl-gpu; source .gpu/common.sh
[ -d /tmp/site/chatterbot_corpus ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-gpu/chatterbot*.whl; el
python3 -m lorasp_dist plan --preset llama-65b --gpus 1 --gpu-mem 139GiB | tail -2
python3 -m lorasp_dist prepare-base --preset llama-65b --out /tmp/lorasp-bench/bases/llama-65b > $OUT/logs/prep65.log 2>&1; echo "prep65 rc=$?"; el
LORASP_GIT_REV=b4b9e19 timeout 170 python3 bench/run.py --preset llama-65b --ds-config zero3 --via torchrun --work /tmp/lorasp-bench --run-id s18d-plan-ck42-mbs4 --micro-batch 4 --steps 7 --set train.checkpoint_layers=42 deepspeed.resident_layers=80 > $OUT/logs/s18d.log 2>&1; echo "rc=$?"; el
grep -o '"tokens_per_s_per_gpu": [0-9.]*\|"mfu": [0-9.]*\|"peak_reserved_gib": [0-9.]*' $OUT/logs/s18d.log | tr "\n" " "; echo
collect
