"""Benchmark ours: synthetic LLaMA bases built in 4-bit, trained with LoRA-SP under ZeRO-3 on every local GPU.

    python bench/run.py --preset llama-7b --ds-config zero3 --micro-batch 1          # one config
    python bench/run.py --matrix                                                     # presets x configs x micro-batch

Each config: `lorasp prepare-base` (once per preset), then a real training run through `lorasp launch` (or
`torchrun ... lorasp train` with --via torchrun), then one record per config appended to
bench/results/records.jsonl, read from the run's own files: steady-state tokens/s (median of the steps after
warm-up, with min and max), MFU, per-rank peaks from the memory tracker, load time and the analytic prediction.

MFU convention: 4·N·(tokens/s per GPU) / 790 TFLOP/s (dense bf16 H200, as measured on this workplace's machines).
4·N counts a forward (2N) and the backward's activation gradients (2N); a frozen base has no weight gradients, and
the recomputation of gradient checkpointing is not counted as useful work.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import RESULTS, append_records, context, new_run_id, unused_run_id, write_summary  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PEAK_FLOPS = 790e12
GiB = 1024**3
WARMUP = 3


def gpus() -> int:
    import torch

    return max(1, torch.cuda.device_count())


def ranks(requested: int | None) -> int:
    """--gpus, checked against the machine: a run on more GPUs than it has would fail only once its ranks start."""
    if requested is None:
        return gpus()
    import torch

    have = torch.cuda.device_count()
    if requested < 1 or (have and requested > have):
        raise SystemExit(f"error: --gpus = {requested}: this machine has {have} GPU(s); give 1 to {have}"
                         if have else f"error: --gpus = {requested}: give 1 or more (ranks on the CPU)")
    return requested


def ensure_base(preset: str, bases: Path) -> Path:
    out = bases / preset
    if not (out / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "lorasp_dist", "prepare-base", "--preset", preset, "--out", str(out)],
                       check=True)
    return out


def train_cmd(via: str, n: int, overrides: list[str]) -> list[str]:
    config = str(REPO / "examples" / "bench.yaml")
    if via == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), "-m",
                "lorasp_dist", "train", config, *overrides]  # --standalone: a free port, as compare.py's
    return [sys.executable, "-m", "lorasp_dist", "launch", config, *overrides, "--num-workers", str(n),
            "--gpus-per-worker", "1" if n and _cuda() else "0", "--force"]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def collect(run_dir: Path, n: int, preset: str) -> dict:
    from lorasp_dist.presets import PRESETS

    steps = {r["step"]: r for r in read_jsonl(run_dir / "metrics" / "rank0.jsonl")}
    steady = [steps[s]["tokens_per_s"] / n for s in sorted(steps) if s > WARMUP]
    if len(steady) < 5:
        raise SystemExit(f"{run_dir}: only {len(steady)} steady-state steps; use --steps >= {WARMUP + 5}")
    tps = statistics.median(steady)
    ranks = sorted((run_dir / "memory").glob("rank*.jsonl"))
    peak = {k: 0.0 for k in ("reserved", "nvml", "rss", "load_reserved")}
    load_s = None
    for f in ranks:
        for rec in read_jsonl(f):
            if rec.get("phase") == "load" and rec.get("rank") == 0:
                load_s = rec["dt"]
            peak["reserved"] = max(peak["reserved"], rec.get("cuda_reserved_peak_bytes") or 0)
            peak["nvml"] = max(peak["nvml"], rec.get("nvml_used_peak_bytes") or 0)
            peak["rss"] = max(peak["rss"], rec.get("host_rss_peak_bytes") or 0)
            if rec.get("phase") == "load":
                peak["load_reserved"] = max(peak["load_reserved"], rec.get("cuda_reserved_peak_bytes") or 0)
    plan_file = run_dir / "memory" / "plan.json"
    plan = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
    n_params = PRESETS[preset].num_params()
    predicted = {k: plan[p] / GiB if plan.get(p) else None
                 for k, p in (("reserved", "gpu_peak_reserved"), ("nvml", "gpu_total"), ("rss", "host_total"))}
    inventory = run_dir / "memory" / "adapter_rank0.json"
    adapter = json.loads(inventory.read_text())["bytes"] if inventory.is_file() else None
    return {
        "tokens_per_s_per_gpu": tps,
        "tokens_per_s_min": min(steady),
        "tokens_per_s_max": max(steady),
        "steady_steps": len(steady),
        "mfu": 4 * n_params * tps / PEAK_FLOPS,
        "peak_reserved_gib": peak["reserved"] / GiB,
        "peak_nvml_gib": peak["nvml"] / GiB,
        "host_rss_gib": peak["rss"] / GiB,
        # GPU + host, every rank; a pinned page counts in both NVML-free host RSS, so this is an upper bound
        "cluster_total_gb": n * (max(peak["nvml"], peak["reserved"]) + peak["rss"]) / 1e9,
        "load_s": load_s,
        "load_peak_reserved_gib": peak["load_reserved"] / GiB,
        "predicted_peak_gib": predicted["reserved"],
        "predicted_nvml_gib": predicted["nvml"],
        "predicted_host_rss_gib": predicted["rss"],
        # (measured - predicted) / predicted, as the memory report gives it
        **{f"error_{k}_pct": 100 * (peak[k] / GiB - v) / v if v else None for k, v in predicted.items()},
        "adapter_bytes_rank0": adapter,
        "adapter_predicted_bytes": plan.get("adapter"),
        "full_ft_gb": plan["full_ft_bytes"] / 1e9 if plan.get("full_ft_bytes") else None,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-7b")
    p.add_argument("--ds-config", default="zero3")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--variant", default="lorasp")
    p.add_argument("--via", choices=["launch", "torchrun"], default="launch")
    p.add_argument("--matrix", action="store_true", help="llama-7b/llama-65b x zero3/zero3_offload_all x mbs 1/2/4")
    p.add_argument("--configs", nargs="*", default=None, help="PRESET:DS_CONFIG:MBS triples, instead of --matrix")
    p.add_argument("--work", default=os.environ.get("LORASP_BENCH_WORK", "/tmp/lorasp-bench"))
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--run-id", default=None)
    p.add_argument("--git-rev", default=None, help="with --collect: the revision the runs were made at")
    p.add_argument("--device", default=None, help="with --collect: the device the runs were made on")
    p.add_argument("--collect", type=Path, nargs="*", default=[], metavar="RUN_DIR",
                   help="write records from these finished run directories (of a device call that ended before it "
                   "wrote them) instead of running anything; --preset and --micro-batch describe them")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more config overrides for every run, e.g. train.profile_steps=[5] deepspeed.fetch=module")
    p.add_argument("--gpus", type=int, default=None,
                   help="ranks a run uses: every local GPU by default (1 on a machine without one)")
    a = p.parse_args()

    if a.configs:
        configs = [(c.split(":")[0], c.split(":")[1], int(c.split(":")[2])) for c in a.configs]
    elif a.matrix:
        configs = [(pr, ds, m) for pr in ("llama-7b", "llama-65b") for ds in ("zero3", "zero3_offload_all")
                   for m in (1, 2, 4)]
    else:
        configs = [(a.preset, a.ds_config, a.micro_batch)]
    work, results = Path(a.work), Path(a.results)
    if a.collect:  # records only, named by their run directories
        return collect_only(a, context(a.run_id or new_run_id("lorasp")))
    run_id = unused_run_id(a.run_id, "lorasp", results)
    ctx = context(run_id)
    n = ranks(a.gpus)
    rows, records, reports = [], [], []
    for preset, ds, mbs in configs:
        base = ensure_base(preset, work / "bases")
        name = f"{run_id}-{preset}-{ds}-mbs{mbs}-{a.via}"
        overrides = [f"model.path={base}", "model.preset=null", f"deepspeed.config={ds}",
                     f"train.micro_batch_size={mbs}", f"data.seq_len={a.seq_len}", f"train.max_steps={a.steps}",
                     f"lorasp.r={a.rank}", f"lorasp.alpha={2 * a.rank}", f"lorasp.variant={a.variant}",
                     f"train.output_dir={work / 'runs'}", f"train.run_name={name}", *a.set]
        print(f"[bench] {name}", flush=True)
        proc = subprocess.run(train_cmd(a.via, n, overrides), cwd=REPO)
        row = {"config": f"{preset} {ds} mbs={mbs}", "ok": proc.returncode == 0}
        if proc.returncode == 0:
            run_dir = work / "runs" / name
            row.update(collect(run_dir, n, preset))
            reports.append(run_dir)
            records.append({
                "run_id": run_id, "date": ctx["date"], "git_rev": ctx["git_rev"], "device": ctx["device"],
                "system": "lorasp", "preset": preset, "gpus": n, "ds_config": ds, "micro_batch": mbs,
                "seq_len": a.seq_len, "rank": a.rank, "variant": a.variant, "via": a.via, "overrides": a.set,
                **{k: row[k] for k in row if k not in ("config", "ok")},
            })
        rows.append(row)
        print(json.dumps(row), flush=True)
    if records:
        append_records(records, results)
    cols = ["config", "ok", "tokens_per_s_per_gpu", "tokens_per_s_min", "tokens_per_s_max", "mfu",
            "peak_reserved_gib", "predicted_peak_gib", "error_reserved_pct", "peak_nvml_gib", "error_nvml_pct",
            "host_rss_gib", "error_rss_pct", "load_peak_reserved_gib", "load_s", "cluster_total_gb", "full_ft_gb"]
    note = f"MFU = 4·N·tokens/s per GPU / {PEAK_FLOPS / 1e12:.0f} TFLOP/s; warm-up steps skipped: {WARMUP}"
    write_summary(run_id, ctx, rows, cols, results, notes=[note])
    with tarfile.open(results / f"{run_id}-reports.tar.gz", "w:gz") as tar:
        for run_dir in reports:
            for f in ("memory_report.md", "memory_report.json", "memory_timeline.png", "memory_vs_full_ft.png",
                      "memory/plan.json", *(str(q.relative_to(run_dir)) for q in run_dir.glob("profile/*.md"))):
                if (run_dir / f).is_file():
                    tar.add(run_dir / f, arcname=f"{run_dir.name}/{f}")
    return 0 if all(r["ok"] for r in rows) else 1


def collect_only(a, ctx: dict) -> int:
    """Records from run directories that exist already; the device, revision and date are the run's own."""
    records = []
    for run_dir in a.collect:
        meta = json.loads((run_dir / "memory" / "plan.json").read_text())
        n = meta["world_size"]
        wall = read_jsonl(run_dir / "metrics" / "rank0.jsonl")[-1]["time"]
        date = dt.datetime.fromtimestamp(wall, dt.timezone.utc).isoformat(timespec="seconds")
        records.append({
            "run_id": run_dir.name, "date": date,
            "git_rev": a.git_rev, "device": a.device, "system": "lorasp", "preset": a.preset, "gpus": n,
            "ds_config": a.ds_config, "micro_batch": a.micro_batch, "seq_len": a.seq_len, "rank": a.rank,
            "variant": a.variant, "via": a.via, "overrides": a.set, "collected_by": ctx["command"],
            **collect(run_dir, n, a.preset),
        })
        print(json.dumps(records[-1]), flush=True)
    append_records(records, Path(a.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
