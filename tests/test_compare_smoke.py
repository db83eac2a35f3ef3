"""bench/compare.py, the command of the speed and scaling runs, end to end on CPU before it costs device minutes:
ours (torchrun), the stock recipe and FSDP-QLoRA on 1 and 2 ranks of the tiny preset, alternating, one repeat. The
FSDP run on 1 rank fails (full shard needs 2): a comparison keeps going and reports it as a failed row."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from results_io import RECORD_FIELDS  # noqa: E402

pytestmark = pytest.mark.slow
SYSTEMS = ("lorasp-torchrun", "hf-stock", "fsdp-qlora")


def test_compare_alternates_gpu_counts_and_reports_ratios(tmp_path):
    results = tmp_path / "results"
    cmd = [sys.executable, str(REPO / "bench" / "compare.py"), "--preset", "tiny", "--gpus", "1", "2",
           "--micro-batches", "1", "--systems", *SYSTEMS, "--repeats", "1", "--steps", "8", "--seq-len", "64",
           "--work", str(tmp_path / "work"), "--results", str(results)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-5000:]  # the one failed run
    order = [re.search(r"-([a-z-]+)-g(\d)-mbs1-r0$", line).groups() for line in proc.stdout.splitlines()
             if line.startswith("[compare]")]
    assert order == [(s, n) for n in ("1", "2") for s in SYSTEMS], order  # every system on 1 rank, then on 2

    records = [json.loads(line) for line in (results / "records.jsonl").read_text().splitlines()]
    ran = sorted((r["system_label"], r["gpus"]) for r in records)
    assert ran == sorted([(s, n) for s in SYSTEMS for n in (1, 2) if (s, n) != ("fsdp-qlora", 1)]), ran
    for r in records:
        assert set(RECORD_FIELDS) <= r.keys() and r["tokens_per_s_per_gpu"] > 0 and r["micro_batch"] == 1, r

    (summary,) = results.glob("compare-tiny-*.json")
    rows = {(r["system"], r["gpus"]): r for r in json.loads(summary.read_text())["rows"]}
    assert rows["fsdp-qlora", 1]["failed"] == 1 and rows["fsdp-qlora", 1]["runs"] == 0
    tps = {(r["system_label"], r["gpus"]): r["tokens_per_s_per_gpu"] for r in records}
    for (system, n), row in rows.items():
        if "failed" in row:
            continue
        assert row["runs"] == 1 and row["tokens_per_s_per_gpu"] == tps[system, n]
        assert row["ours_over_this"] == pytest.approx(tps["lorasp-torchrun", n] / tps[system, n])
        fewest = tps.get((system, 1))
        expected = tps[system, n] / fewest if n == 2 and fewest else None
        assert row["per_gpu_vs_fewest"] == (pytest.approx(expected) if expected else None), (system, n, row)
    table = summary.with_suffix(".md").read_text()
    assert "| system | gpus | micro_batch |" in table and "| fsdp-qlora | 1 | 1 | 0 |" in table


@pytest.mark.parametrize("run_id, message", [("../x", "one name of letters, digits"),
                                             ("taken", "taken.json exists, and results are never replaced")])
def test_a_run_id_is_one_new_name(run_id, message, tmp_path):
    """--run-id names files in --results: a path is refused, and so is an id whose results exist (a rerun would
    replace them), before anything runs or is written."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "taken.json").write_text("{}")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--run-id", run_id, "--configs",
                           "tiny:zero3:1", "--results", str(results), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and f"error: --run-id = {run_id!r}: " in proc.stderr and message in proc.stderr
    assert [p.name for p in results.iterdir()] == ["taken.json"] and (results / "taken.json").read_text() == "{}"
    assert not (tmp_path / "work").exists()


def test_the_stock_recipe_takes_only_a_shipped_template(tmp_path):
    """--ds-config names a template in ds_configs/, never a path to any JSON file."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "baseline_hf.py"), "--base", str(tmp_path),
                           "--ds-config", "../../tmp/other", "--results", str(tmp_path / "results")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "argument --ds-config: invalid choice: '../../tmp/other' (choose from 'zero3', " \
        "'zero3_offload_optimizer', 'zero3_offload_all')" in proc.stderr, proc.stderr
    assert not (tmp_path / "results").exists()
