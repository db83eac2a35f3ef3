# Session 32, one H200 (the 2- and 4-GPU kinds were withheld), revision 8dfb009, four calls on one warm machine.
# call 1 (cold, carry .cache/s32 .cache/whl-gpu: these scripts and .whl without Ray's wheel; ours runs through torchrun):
touch /tmp/s32-start; setsid nohup bash .cache/s32/work.sh > /tmp/work-s32.out 2>&1 < /dev/null & sleep 5; LIMIT=560 bash .cache/s32/poll.sh
# call 2 (warm): the same poll, until work.sh was done
LIMIT=560 bash .cache/s32/poll.sh
# call 3 (warm): two more runs of ours at micro-batch 1
source .cache/s32/env.sh; timeout 330 python3 bench/compare.py --preset llama-65b --micro-batches 1 --systems lorasp-torchrun --repeats 2 --steps 8 --set deepspeed.resident_layers=80
# call 4 (warm): meant as old (3a8a955) against new, alternating; the old runs failed at once (the archive of the old
# tree lacked examples/bench.yaml), so only the two new runs count: records ab-new-1, ab-new-2
source .cache/s32/env.sh; python3 bench/run.py --configs llama-65b:zero3:1 --via torchrun --steps 8 --results /tmp/ab/new --run-id ab-new-N --set deepspeed.resident_layers=80
# here, afterwards: bench/compare.py --merge compare-llama-65b-20261203-094231 compare-llama-65b-20261203-095913
