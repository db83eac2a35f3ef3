# session 21 (1x H200, carry .whl-gpu .gpu/common.sh .gpu/s21.sh .gpu/old): a CUDA rank's host RSS after the eager
# Muon import (no torch._inductor) and the lazy `datasets` import, against d394e46 (.gpu/old), alternating, llama-7b
# zero3 micro-batch 1 seq 2048 under torchrun on one GPU; baseline and RSS delta vs the plan, from memory_report.json.
# .gpu/common.sh was bench/results/gpu-20261201-s18/common.sh (the same lines but its first comment).
export WHL=.whl-gpu; source .gpu/common.sh
timeout 120 python3 -m lorasp_dist prepare-base --preset llama-7b --out /tmp/b7 > $OUT/logs/prep7.log 2>&1; echo "prep7 rc=$?"; el
run() {  # $1 tree $2 name
  PYTHONPATH=/tmp/site:$1 timeout 240 python3 -m torch.distributed.run --standalone --nproc_per_node 1 -m lorasp_dist train \
    $1/examples/bench.yaml model.preset=null model.path=/tmp/b7 train.max_steps=6 \
    train.output_dir=/tmp/r21 train.run_name=$2 > $OUT/logs/$2.log 2>&1; echo "$2 rc=$?"; el
  python3 - /tmp/r21/$2 <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1]); rep = json.loads((run / "memory_report.json").read_text())
base = json.loads((run / "memory" / "rank0.jsonl").read_text().splitlines()[0])["host_rss_bytes"]
rows = {c["quantity"]: c for c in rep["ranks"]["0"]["comparison"]}
d = rows["host RSS delta (peak - baseline)"]; p = rows["host RSS peak (absolute)"]
print(run.name, f"baseline {base/2**20:.0f} MiB; delta {d['measured_bytes']/2**20:.0f} vs {d['predicted_bytes']/2**20:.0f} MiB; "
      f"peak {p['measured_bytes']/2**30:.2f} vs {p['predicted_bytes']/2**30:.2f} GiB")
PY
}
for i in 1 2; do run .gpu/old old$i; run $PWD new$i; done
tar czf $OUT/runs.tgz -C /tmp/r21 --ignore-failed-read $(cd /tmp/r21 && ls -d */memory_report.json */memory */metrics 2>/dev/null)
tar czf $OUT/logs.tgz -C $OUT logs
