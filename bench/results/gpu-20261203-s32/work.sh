#!/usr/bin/env bash
# Session 32, one H200, started under setsid: (1) llama-65b mbs 1, the stock recipe against ours, alternating, 2 runs
# each; (2) a profile of ours at mbs 1 (final state); (3) llama-65b mbs 4, the same pair, 2 runs each.
W=/tmp/work-s32; mkdir -p $W; cd "$(dirname "$0")/../.."
source .cache/s32/env.sh
python3 -m pip install -q --no-deps --no-build-isolation -e . > $W/pip-e.log 2>&1 || echo "pip -e failed" >> $W/steps.log
T0=$(date +%s); step() { echo "t=$(( $(date +%s)-T0 ))s $*" >> $W/steps.log; }
step start
python3 -m lorasp_dist prepare-base --preset llama-65b --out /tmp/lorasp-bench/bases/llama-65b > $W/prep65.log 2>&1; step "prep65 rc=$?"
python3 bench/compare.py --preset llama-65b --micro-batches 1 --systems hf-stock lorasp-torchrun --repeats 2 --steps 8 --set deepspeed.resident_layers=80 > $W/c65-mbs1.log 2>&1; step "c65 mbs1 rc=$?"
python3 bench/run.py --configs llama-65b:zero3:1 --via torchrun --steps 8 --results /tmp/prof-results --run-id s32-prof-mbs1 --set deepspeed.resident_layers=80 'train.profile_steps=[5]' > $W/prof.log 2>&1; step "prof rc=$?"
python3 bench/compare.py --preset llama-65b --micro-batches 4 --systems hf-stock lorasp-torchrun --repeats 2 --steps 8 --set train.checkpoint_layers=42 deepspeed.resident_layers=80 > $W/c65-mbs4.log 2>&1; step "c65 mbs4 rc=$?"
touch $W/done
