# session 19 call 5 (1x H200, warm, carry .whl-gpu .gpu/common.sh), the command as given: two more llama-7b repeats
export WHL=.whl-gpu; source .gpu/common.sh; export LORASP_GIT_REV=6646bbc
timeout 300 python3 bench/compare.py --preset llama-7b --micro-batches 1 --systems lorasp lorasp-torchrun --repeats 2 --steps 10 --set deepspeed.resident_layers=32 > $OUT/logs/c7b3.log 2>&1
# then: bench/compare.py --merge compare-llama-7b-20261201-154232 compare-llama-7b-20261201-160136 compare-llama-7b-20261201-160348 (here)
#       bench/compare.py --merge compare-llama-65b-20261201-155018 compare-llama-65b-20261201-155801 (here)
