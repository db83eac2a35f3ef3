"""The memory report of a real 2-rank ZeRO-3 CPU run, and the analytic model's host prediction against it.

The CPU constants of lorasp_dist/memory/estimate.py were calibrated on seq 128 × micro-batch 2 and seq 512 ×
micro-batch 4 (zero3, gradient checkpointing on). These runs use other shapes, DeepSpeed configs and checkpointing, so
the ±20% check tests the model, not the fit. CPU is noisy: the 20% bar is the acceptance line, the GPU one is stricter.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import torchrun

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.yaml"
DELTA = "host RSS delta (peak - baseline)"
TOLERANCE = 0.20
pytestmark = pytest.mark.slow

# name -> overrides; none of these shapes or settings was used for calibration.
CONFIGS = {
    "seq256-mb4-offload-all": ["data.seq_len=256", "train.micro_batch_size=4", "deepspeed.config=zero3_offload_all"],
    "seq512-mb6-no-gc-offload-opt": ["data.seq_len=512", "train.micro_batch_size=6",
                                     "train.gradient_checkpointing=false", "deepspeed.config=zero3_offload_optimizer"],
}


@pytest.fixture(scope="module")
def out_dir(seed_tiny, tmp_path_factory) -> Path:
    """An output dir whose tokenizer and synthetic base exist before any run. The rank that writes them in its
    preflight would free that memory into its heap before the baseline and reuse it after, hiding part of its delta."""
    return seed_tiny(tmp_path_factory.mktemp("memory-cpu"))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cpu_run_report_matches_plan(out_dir, name):
    cmd = torchrun(str(TINY), f"train.output_dir={out_dir}", f"train.run_name={name}", "train.max_steps=5",
                   "train.save_every=0", "train.eval_every=0", *CONFIGS[name])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    run = out_dir / name
    for f in ("memory_report.json", "memory_report.md", "memory_timeline.png", "memory_vs_full_ft.png",
              "memory_components.png", "memory/plan.json"):
        assert (run / f).is_file(), f
    report = json.loads((run / "memory_report.json").read_text())
    assert report["device"] == "cpu" and report["world_size"] == 2 and set(report["ranks"]) == {"0", "1"}
    host = report["plan"]["host"]
    for term in ("library_imports", "runtime_overhead", "allocator_retention"):
        assert host[term] > 0, term

    errors = {}
    for rank, summary in report["ranks"].items():
        row = next(c for c in summary["comparison"] if c["quantity"] == DELTA)
        measured, predicted = row["measured_bytes"], row["predicted_bytes"]
        errors[rank] = (measured - predicted) / predicted
        # the baseline too: ~310 MiB, 30-60 MiB more where the libraries were just written (.ci/setup's last step)
        print(f"{name} rank {rank}: RSS delta {measured / 2**20:.1f} MiB, predicted {predicted / 2**20:.1f} MiB, "
              f"error {errors[rank]:+.1%}; baseline {summary['host_baseline_rss_bytes'] / 2**20:.1f} MiB, "
              f"{summary['host_baseline_shared_bytes'] / 2**20:.1f} of it shared")
    assert all(abs(e) <= TOLERANCE for e in errors.values()), errors
