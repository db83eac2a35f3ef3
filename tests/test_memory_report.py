"""The memory tracker (real torch, real psutil, CPU) and the report built from its files: keys, error %, the
full fine-tune arithmetic, charts, bad run directories, and the per-phase overhead bound."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest
import torch

from lorasp_dist.cli import main
from lorasp_dist.memory.report import GB, GiB, ReportError, error_pct, read_samples, write_report
from lorasp_dist.memory.tracker import MemoryTracker
from lorasp_dist.presets import PRESETS

GPU_FIELDS = ("cuda_allocated_peak_bytes", "cuda_reserved_peak_bytes", "cuda_alloc_retries", "cuda_ooms",
              "nvml_used_peak_bytes")
MB = 10**6


def plan_fixture(world_size: int = 2) -> dict:
    """A hand-written example of the FILE FORMAT of memory/plan.json (MemoryPlan.to_dict()) for a CPU run of the
    tiny preset. The byte counts are made up for the test, not predicted or measured."""
    params = PRESETS["tiny"].num_params()
    host = {"process_base": 300 * MB, "base_weights_4bit": params // 2, "lorasp_params": 2 * MB,
            "optimizer_states": 4 * MB, "activations": 60 * MB, "offloaded_optimizer": 0, "offloaded_params": 0,
            "pinned_buffers": 0}
    gpu = dict.fromkeys(["base_weights_4bit", "quant_constants", "activations", "cuda_context"], 0)
    return {
        "preset": "tiny", "world_size": world_size, "micro_batch": 1, "seq_len": 64, "ds_config": "zero3",
        "gradient_checkpointing": True, "variant": "lorasp", "gpu": gpu, "host": host, "device": "cpu",
        "gpu_total": 0, "host_total": sum(host.values()), "gpu_peak_reserved": 0,
        "cluster_total": world_size * sum(host.values()),
        "full_ft_bytes": 16 * params + 5 * MB,
        "full_ft_breakdown": {"weights_bf16": 2 * params, "gradients_bf16": 2 * params, "master_fp32": 4 * params,
                              "adam_m_fp32": 4 * params, "adam_v_fp32": 4 * params, "activations": 5 * MB},
    }


def run_tracker(run_dir: Path, rank: int, alloc_mb: int, world_size: int = 2) -> None:
    """A short real run of one rank's tracker: load, then two steps of forward/backward/step."""
    tracker = MemoryTracker(run_dir, rank, world_size, interval_s=0.01, device="cpu")
    tracker.start()
    with tracker.phase("load"):
        held = torch.ones(alloc_mb * MB // 4)  # float32: alloc_mb MB, kept like model weights
    for step in range(2):
        for name in ("forward", "backward", "step"):
            with tracker.phase(name, step):
                time.sleep(0.02)
        tracker.maybe_record_history(step + 1)
    with tracker.phase("checkpoint", 2):
        pass
    tracker.stop()
    del held


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Two ranks measured by two real trackers, with a plan.json fixture beside them."""
    path = tmp_path_factory.mktemp("run")
    run_tracker(path, 0, alloc_mb=120)
    run_tracker(path, 1, alloc_mb=80)
    (path / "memory" / "plan.json").write_text(json.dumps(plan_fixture()))
    return path


def test_tracker_writes_null_gpu_fields_and_sees_a_transient_allocation(tmp_path):
    tracker = MemoryTracker(tmp_path, rank=3, world_size=4, interval_s=0.01, device="cpu", record_history_steps=[0])
    tracker.start()
    with tracker.phase("forward", 0):
        before = psutil.Process().memory_info().rss
        x = torch.ones(200 * MB // 4)  # 200 MB, freed before the phase ends: only the sampler can see it
        time.sleep(0.15)
        del x
    tracker.maybe_record_history(3)
    tracker.stop()

    text = (tmp_path / "memory" / "rank3.jsonl").read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert [r["phase"] for r in lines] == ["baseline", "forward"]
    assert all(r[k] is None for r in lines for k in GPU_FIELDS)  # absent, not zero
    assert '"cuda_reserved_peak_bytes": null' in text
    phase = lines[1]
    assert phase["step"] == 0 and phase["rank"] == 3 and phase["dt"] >= 0.15
    assert phase["host_rss_peak_bytes"] >= before + 0.95 * 200 * MB
    assert phase["host_rss_bytes"] < phase["host_rss_peak_bytes"] - 150 * MB  # the allocation was freed
    assert not list((tmp_path / "memory").glob("*.pickle"))  # memory history is CUDA only


def test_phase_overhead_is_under_one_percent_of_a_100ms_step(tmp_path):
    tracker = MemoryTracker(tmp_path, 0, 1, device="cpu")
    tracker.start()
    n = 1000
    t0 = time.perf_counter()
    for i in range(n):
        with tracker.phase("forward", i):
            pass
    per_phase = (time.perf_counter() - t0) / n
    tracker.stop()
    assert per_phase < 1e-3, f"{per_phase * 1e6:.0f} µs per phase"
    assert len(read_lines(tmp_path / "memory" / "rank0.jsonl")) == n + 1


def test_report_from_two_ranks(run_dir):
    paths = write_report(run_dir)
    names = [p.name for p in paths]
    assert names[:4] == ["memory_report.json", "memory_report.md", "memory_timeline.png", "memory_vs_full_ft.png"]
    for p in paths:
        assert p.is_file() and p.stat().st_size > 0
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = json.loads((run_dir / "memory_report.json").read_text())
    assert {"run_dir", "device", "world_size", "plan", "predicted_per_rank", "ranks", "cluster", "notes"} <= set(report)
    assert report["device"] == "cpu" and report["world_size"] == 2 and set(report["ranks"]) == {"0", "1"}
    plan = plan_fixture()
    for rank, alloc in (("0", 120), ("1", 80)):
        r = report["ranks"][rank]
        lines = read_lines(run_dir / "memory" / f"rank{rank}.jsonl")
        assert r["host_baseline_rss_bytes"] == lines[0]["host_rss_bytes"]
        assert 0 < r["host_baseline_shared_bytes"] == lines[0]["host_rss_shared_bytes"] < lines[0]["host_rss_bytes"]
        assert r["host_rss_delta_bytes"] >= 0.95 * alloc * MB  # the load allocation is still held by the later phases
        assert r["cuda_reserved_peak_bytes"] is None and r["nvml_used_peak_bytes"] is None
        assert list(r["phases"]) == ["load", "forward", "backward", "step", "checkpoint"]
        assert r["phases"]["forward"]["count"] == 2
        delta = next(c for c in r["comparison"] if c["quantity"].startswith("host RSS delta"))
        predicted = plan["host_total"] - plan["host"]["process_base"]
        assert delta["predicted_bytes"] == predicted
        assert delta["error_pct"] == pytest.approx((r["host_rss_delta_bytes"] - predicted) / predicted * 100)
        assert not any(c["quantity"].startswith("GPU") for c in r["comparison"])

    # Like with like: the full fine-tune's figure counts no runtime, so the run's side is the RSS above each rank's
    # baseline (Python, torch, the libraries); the total with the runtime is given beside it.
    cluster = report["cluster"]
    expected_total = sum(r["host_rss_delta_bytes"] for r in report["ranks"].values())
    with_runtime = sum(r["host_rss_peak_bytes"] for r in report["ranks"].values())
    assert cluster["total_bytes"] == expected_total and cluster["gpu_bytes"] == 0
    assert cluster["total_with_runtime_bytes"] == with_runtime > expected_total
    assert cluster["fraction_of_full_ft"] == pytest.approx(expected_total / plan["full_ft_bytes"])

    md = (run_dir / "memory_report.md").read_text()
    params = PRESETS["tiny"].num_params()
    assert f"16 B/param × {params:,} params" in md
    assert f"= {plan['full_ft_bytes'] / GB:.3g} GB (no runtime)" in md
    assert f"runtime left out: 2 ranks × ({expected_total / 2 / GiB:.3g} GiB host above the baseline" in md
    assert f"= {expected_total / plan['full_ft_bytes'] * 100:.1f}% of it" in md
    assert f"with the runtime (Python, torch and the libraries, {(with_runtime - expected_total) / 2 / GiB:.3g} GiB " \
           f"per rank): {with_runtime / GB:.3g} GB" in md and "neither side counts it" in md
    assert "**GiB** (2^30 bytes)" in md and "**GB** (10^9 bytes)" in md
    assert "![memory_timeline.png](memory_timeline.png)" in md
    shared = report["ranks"]["0"]["host_baseline_shared_bytes"] / GiB
    assert f"rank 0 {report['ranks']['0']['host_baseline_rss_bytes'] / GiB:.2f} GiB ({shared:.2f} of it shared" in md


def test_a_restart_after_a_torn_line_keeps_the_report_readable(tmp_path):
    """A rank killed in the middle of a record leaves part of a line (or a crashed node a tail of NULs). The restart's
    tracker cuts it before appending: every whole record of both runs is read, the fragment is gone."""
    run_tracker(tmp_path, 0, alloc_mb=8, world_size=1)
    path = tmp_path / "memory" / "rank0.jsonl"
    before = read_lines(path)
    with open(path, "ab") as f:
        f.write(b'{"rank": 0, "phase": "forw' + b"\0" * 100)
    run_tracker(tmp_path, 0, alloc_mb=8, world_size=1)
    after = read_samples(tmp_path)[0]
    assert after[: len(before)] == before and len(after) == 2 * len(before)
    assert [r["phase"] for r in after].count("baseline") == 2 and path.read_bytes().endswith(b"\n")


def test_report_compares_the_host_peak_outside_checkpoints(tmp_path):
    """A plan with checkpoint staging puts the host peak in the checkpoint phase; the report also compares the peak of
    the other phases with the host total less that staging (a run stopped before its checkpoint is read there)."""
    tracker = MemoryTracker(tmp_path, 0, 1, interval_s=0.01, device="cpu")
    tracker.start()
    with tracker.phase("load"):
        held = torch.ones(40 * MB // 4)
    with tracker.phase("forward", 0):
        time.sleep(0.02)
    with tracker.phase("checkpoint", 0):
        staged = torch.ones(100 * MB // 4)  # the copy a checkpoint writes from, freed after
        time.sleep(0.05)
        del staged
    tracker.stop()
    del held
    doc = plan_fixture(world_size=1)
    doc["host"]["checkpoint_staging"] = 100 * MB
    doc["host_total"] = sum(doc["host"].values())
    (tmp_path / "memory" / "plan.json").write_text(json.dumps(doc))
    rank = json.loads(write_report(tmp_path)[0].read_text())["ranks"]["0"]
    row = next(c for c in rank["comparison"] if c["quantity"] == "host RSS peak outside checkpoints")
    assert row["predicted_bytes"] == doc["host_total"] - 100 * MB
    assert row["measured_bytes"] == max(rank["phases"][k]["host_rss_peak_bytes"] for k in ("load", "forward"))
    assert row["measured_bytes"] <= rank["host_rss_peak_bytes"] - 95 * MB  # the staging is the checkpoint's alone
    # Without staging in the plan (a plan.json of before), the row is not there.
    doc["host"].pop("checkpoint_staging")
    (tmp_path / "memory" / "plan.json").write_text(json.dumps(doc))
    rank = json.loads(write_report(tmp_path)[0].read_text())["ranks"]["0"]
    assert not any(c["quantity"] == "host RSS peak outside checkpoints" for c in rank["comparison"])


def test_error_pct():
    assert error_pct(120, 100) == pytest.approx(20.0)
    assert error_pct(80, 100) == pytest.approx(-20.0)
    assert error_pct(None, 100) is None and error_pct(5, None) is None


def test_report_without_plan_shows_measured_only(tmp_path):
    run_tracker(tmp_path, 0, alloc_mb=10, world_size=1)
    paths = write_report(tmp_path)
    assert len(paths) == 4  # no plan: no per-component chart
    report = json.loads(paths[0].read_text())
    assert report["plan"] is None and report["cluster"]["full_ft_bytes"] is None
    assert report["ranks"]["0"]["comparison"][0]["error_pct"] is None
    assert "measured values only" in paths[1].read_text()


def test_report_reads_the_plan_through_memory_plan(tmp_path):
    run_tracker(tmp_path, 0, alloc_mb=10, world_size=1)
    doc = plan_fixture(world_size=1)
    (tmp_path / "memory" / "plan.json").write_text(json.dumps(doc))
    report = json.loads(write_report(tmp_path)[0].read_text())
    assert report["plan"]["adapter_total"] == 0 and report["plan"]["device"] == "cpu"  # MemoryPlan.to_dict()
    del doc["variant"]
    (tmp_path / "memory" / "plan.json").write_text(json.dumps(doc))
    with pytest.raises(ReportError, match="plan.json: missing keys variant; expected MemoryPlan.to_dict"):
        write_report(tmp_path)


@pytest.mark.parametrize("make", ["missing", "empty", "empty_memory_dir"])
def test_bad_run_dir_is_a_clear_error(tmp_path, capsys, make):
    path = tmp_path / "run"
    if make != "missing":
        path.mkdir()
    if make == "empty_memory_dir":
        (path / "memory").mkdir()
        (path / "memory" / "rank0.jsonl").write_text("")
    with pytest.raises(ReportError, match="rank\\*.jsonl") as e:
        write_report(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err
