"""Ours against the stock recipes on the same checkpoint, in one device call, alternating.

    python bench/compare.py --preset llama-65b --micro-batches 1 4 --systems lorasp hf-stock --repeats 2
    python bench/compare.py --preset llama-65b --gpus 2 4 --micro-batches 1 4 --systems lorasp hf-stock   # scaling

Each repeat runs every system once per GPU count and micro-batch, in turn: timings on these machines drift by ±15%
from run to run, so no system gets all the good minutes. `--gpus` gives the ranks of each run (default: every local
GPU; a run on N uses N of them). Systems: `lorasp` (bench/run.py through `lorasp launch`),
`lorasp-torchrun` (the same through `torchrun … lorasp train`), `hf-stock` (bench/baseline_hf.py) and `fsdp-qlora`
(bench/baseline_fsdp.py). Every record goes to records.jsonl in the fixed format, plus `compare_id` and `repeat`;
`<compare_id>.{json,md}` gives the median and range of tokens/s per GPU per system, GPU count and micro-batch, peak
memory beside our plan's, our ratio to each other system, and each system's tokens/s per GPU against its own on the
fewest GPUs. A run that fails is a row with its exit code, never a number.

A comparison too long for one device call (10 minutes) runs as several, each alternating; `--merge` then writes one
summary of their records:

    python bench/compare.py --merge compare-llama-65b-20261201-161500 compare-llama-65b-20261201-162400
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import RESULTS, append_records, context, new_run_id, write_summary  # noqa: E402
from run import ensure_base, ranks  # noqa: E402

BENCH = Path(__file__).resolve().parent
OURS = ("lorasp", "lorasp-torchrun")  # ours in ratios: the launcher's runs, else torchrun's


def command(system: str, n: int, preset: str, base: Path, ds: str, mbs: int, a, results: Path,
            run_id: str) -> list[str]:
    if system in OURS:
        via = "launch" if system == OURS[0] else "torchrun"
        return [sys.executable, str(BENCH / "run.py"), "--configs", f"{preset}:{ds}:{mbs}", "--via", via, "--gpus",
                str(n), "--steps", str(a.steps), "--seq-len", str(a.seq_len), "--rank", str(a.rank), "--work", a.work,
                "--results", str(results), "--run-id", run_id, "--set", *a.set]
    script = {"hf-stock": "baseline_hf.py", "fsdp-qlora": "baseline_fsdp.py"}[system]
    # --standalone: torchrun picks a free port, so a comparison never collides with another job on the machine
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
            str(BENCH / script), "--base", str(base), "--preset", preset, "--micro-batch", str(mbs), "--steps",
            str(a.steps), "--seq-len", str(a.seq_len), "--rank", str(a.rank), "--results", str(results), "--run-id",
            run_id]


def summarize(records: list[dict], failures: list[dict]) -> list[dict]:
    rows = []
    keys = sorted({(r["system_label"], r["gpus"], r["micro_batch"]) for r in records},
                  key=lambda k: (k[2], k[1], k[0] not in OURS, k[0]))
    for label, n, mbs in keys:
        runs = [r for r in records if (r["system_label"], r["gpus"], r["micro_batch"]) == (label, n, mbs)]
        tps = [r["tokens_per_s_per_gpu"] for r in runs]
        peak = max(r["peak_reserved_gib"] or 0 for r in runs)
        plan = next((r["predicted_peak_gib"] for r in runs if r.get("predicted_peak_gib")), None)
        rows.append({
            "system": label, "gpus": n, "micro_batch": mbs, "runs": len(runs),
            "tokens_per_s_per_gpu": statistics.median(tps), "tokens_per_s_lo": min(tps), "tokens_per_s_hi": max(tps),
            "mfu": statistics.median(r["mfu"] for r in runs), "peak_reserved_gib": peak, "predicted_peak_gib": plan,
            "error_reserved_pct": 100 * (peak - plan) / plan if plan and peak else None,
            "peak_nvml_gib": max(r["peak_nvml_gib"] or 0 for r in runs),
        })

    def find(system: str, n: int, mbs: int) -> dict | None:
        return next((r for r in rows if (r["system"], r["gpus"], r["micro_batch"]) == (system, n, mbs)), None)

    for row in rows:
        n, mbs = row["gpus"], row["micro_batch"]
        ours = find(OURS[0], n, mbs) or find(OURS[1], n, mbs)
        row["ours_over_this"] = ours["tokens_per_s_per_gpu"] / row["tokens_per_s_per_gpu"] if ours else None
        fewest = find(row["system"], min(r["gpus"] for r in rows if r["system"] == row["system"]), mbs)
        row["per_gpu_vs_fewest"] = (row["tokens_per_s_per_gpu"] / fewest["tokens_per_s_per_gpu"]
                                    if fewest and fewest["gpus"] < n else None)
    rows += [{"system": f["system_label"], "gpus": f["gpus"], "micro_batch": f["micro_batch"], "runs": 0,
              "failed": f["returncode"]} for f in failures]
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-65b")
    p.add_argument("--ds-config", default="zero3")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1])
    p.add_argument("--gpus", type=int, nargs="+", default=None,
                   help="the ranks of each run, one comparison per count (default: every local GPU)")
    p.add_argument("--systems", nargs="+", default=[OURS[0], "hf-stock"], choices=[*OURS, "hf-stock", "fsdp-qlora"])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--work", default="/tmp/lorasp-bench")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for our runs")
    p.add_argument("--merge", nargs="+", default=None, metavar="COMPARE_ID",
                   help="run nothing: one summary of these comparisons' records in records.jsonl")
    a = p.parse_args()
    if a.merge:
        return merge(a.merge, Path(a.results))

    counts = [ranks(n) for n in a.gpus or [None]]  # None: every local GPU
    compare_id = new_run_id(f"compare-{a.preset}")
    ctx = context(compare_id)
    base = ensure_base(a.preset, Path(a.work) / "bases")
    records, failures = [], []
    for repeat, n, mbs, system in itertools.product(range(a.repeats), counts, a.micro_batches, a.systems):
        run_id = f"{compare_id}-{system}-g{n}-mbs{mbs}-r{repeat}"
        with tempfile.TemporaryDirectory() as tmp:
            print(f"[compare] {run_id}", flush=True)
            proc = subprocess.run(command(system, n, a.preset, base, a.ds_config, mbs, a, Path(tmp), run_id))
            found = Path(tmp) / "records.jsonl"
            lines = found.read_text().splitlines() if found.is_file() else []
            if proc.returncode != 0 or not lines:
                failures.append({"system_label": system, "gpus": n, "micro_batch": mbs, "returncode": proc.returncode})
                continue
            new = [{**json.loads(line), "system_label": system, "compare_id": compare_id, "repeat": repeat}
                   for line in lines]
            append_records(new, Path(a.results))  # now: a call cut short keeps every run it finished
            records += new
    rows = summarize(records, failures)
    notes = [f"{a.preset}, {a.ds_config}, seq {a.seq_len}, r={a.rank} on all seven projections, gradient "
             f"checkpointing, {a.steps} steps a run (the first 3 are warm-up), {a.repeats} alternating repeats"]
    write(compare_id, ctx, rows, Path(a.results), notes)
    return 1 if failures else 0


def merge(compare_ids: list[str], results: Path) -> int:
    lines = (results / "records.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if r.get("compare_id") in compare_ids]
    missing = sorted(set(compare_ids) - {r["compare_id"] for r in records})
    if missing:
        raise SystemExit(f"--merge: no records of {missing} in {results / 'records.jsonl'}")
    first = records[0]
    ctx = {**context(f"{first['compare_id']}-merged"),
           **{k: ", ".join(sorted({str(r[k]) for r in records})) for k in ("git_rev", "device")}}
    # the records hold no versions; each call's summary does (a call cut short wrote none)
    summaries = [results / f"{c}.json" for c in compare_ids if (results / f"{c}.json").is_file()]
    ctx["versions"] = json.loads(summaries[0].read_text())["versions"] if summaries else {}
    notes = [f"{first['preset']}, {first['ds_config']}, seq {first['seq_len']}, r={first['rank']}: the runs of "
             f"{', '.join(compare_ids)}, each alternating its systems within one device call"]
    write(ctx["run_id"], ctx, summarize(records, []), results, notes)
    return 0


def write(compare_id: str, ctx: dict, rows: list[dict], results: Path, notes: list[str]) -> None:
    cols = ["system", "gpus", "micro_batch", "runs", "tokens_per_s_per_gpu", "tokens_per_s_lo", "tokens_per_s_hi",
            "mfu", "peak_reserved_gib", "predicted_peak_gib", "error_reserved_pct", "peak_nvml_gib", "ours_over_this",
            "per_gpu_vs_fewest", "failed"]
    notes = [*notes, "ours_over_this: our median tokens/s per GPU (`lorasp launch`'s, else torchrun's) over this "
             "row's, at the same GPU count and micro-batch",
             "per_gpu_vs_fewest: this row's median tokens/s per GPU over the same system's on the fewest GPUs, at the "
             "same micro-batch; predicted_peak_gib: our plan's peak reserved per GPU (`lorasp plan`)"]
    write_summary(compare_id, ctx, rows, cols, results, notes)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
