# sourced by every device call of session 19 (a copy is committed beside its scripts): environment, carried wheels, the project installed editable
set -o pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export TORCH_EXTENSIONS_DIR=/tmp/torch_ext
T0=$(date +%s); el() { echo "t=$(( $(date +%s)-T0 ))s"; }
if [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHL:-.whl}/*.whl || exit 1
  touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-deps --no-build-isolation -e . > /tmp/pip-e.log 2>&1 || { echo "pip -e failed"; tail -5 /tmp/pip-e.log; }
mkdir -p $OUT/logs; touch /tmp/call-start
collect() {  # bring back results and the small files of every run
  find bench/results -maxdepth 1 -type f -newer /tmp/call-start > /tmp/results.list
  tar czf $OUT/results.tgz -T /tmp/results.list 2>/dev/null
  (cd /tmp/lorasp-bench/runs 2>/dev/null && tar czf $OUT/runs.tgz --ignore-failed-read */memory_report.md */memory_report.json */memory/plan.json */metrics/rank0.jsonl */memory/rank*.jsonl */memory/adapter_rank*.json */logs */profile 2>/dev/null)
  tar czf $OUT/logs.tgz -C $OUT logs
}
