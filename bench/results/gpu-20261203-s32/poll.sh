#!/usr/bin/env bash
# Copies the work's results and logs to $OUT every 20 s, until it is done or the call nears LIMIT seconds.
W=/tmp/work-s32; LIMIT=${LIMIT:-570}
collect() {
  find bench/results -maxdepth 1 -type f -newer /tmp/s32-start > /tmp/results.list 2>/dev/null
  tar czf $OUT/results.tgz -T /tmp/results.list 2>/dev/null
  (cd /tmp/lorasp-bench/runs 2>/dev/null && tar czf $OUT/runs.tgz --ignore-failed-read */memory_report.md */memory/plan.json */metrics/rank0.jsonl */logs */profile 2>/dev/null)
  tar czf $OUT/logs.tgz -C /tmp work-s32 prof-results 2>/dev/null
}
while [ ! -e $W/done ] && [ $SECONDS -lt $LIMIT ]; do sleep 20; collect; done
collect; date; cat $W/steps.log; grep -h "\[compare\]\|tokens_per_s_per_gpu\"" $W/c65*.log 2>/dev/null | cut -c1-250 | tail -n 12
nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader; uptime
