"""`lorasp train`: the per-rank recipe. A plain loop around `deepspeed.initialize`, in the spirit of torchtune.

Run it under torchrun / the deepspeed launcher / Ray Train (which set RANK, WORLD_SIZE, ...), or alone (one rank).
    load 4-bit base (partitioned by ZeRO-3 as it loads) -> apply LoRA-SP -> deepspeed.initialize
    -> [forward, backward, step] x max_steps, logging, eval, checkpoints -> PEFT adapter + memory report
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from lorasp_dist.atomic import atomic_write_text
from lorasp_dist.config import ConfigError, RunConfig
from lorasp_dist.engine import checkpoint as ckpt
from lorasp_dist.engine.ds_config import build_ds_config

OnCheckpoint = Callable[[Path, int, dict], None]
STOP_FILE = "STOP"
NONFINITE_FILE = "nonfinite.json"  # written when a run stops on NaN/inf; says at which steps
EXIT_NONFINITE = 4  # the exit code of a run stopped that way (`lorasp train`, `lorasp launch`, the SLURM job)


class NonFiniteLoss(RuntimeError):
    """The run stopped: train.max_nonfinite_steps steps in a row (or its last step) had a NaN/inf loss or gradient
    norm. Nothing from those steps was saved; the message names the newest checkpoint."""


# --- process setup -----------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quiet_known_warnings() -> None:
    """Deprecation notices from our dependencies' internals (DeepSpeed's collectives, transformers' renames) that a
    user can do nothing about; printed once per call, they would bury the training log."""
    for pattern in (r".*all_gather_into_tensor.*", r".*reduce_scatter_tensor.*", r".*gradient_checkpointing_enable.*",
                    r".*is_gradient_checkpointing.*", r".*torch\.jit\.script_method.*"):
        warnings.filterwarnings("ignore", message=pattern, category=FutureWarning)
        warnings.filterwarnings("ignore", message=pattern, category=DeprecationWarning)


def init_distributed(cfg: RunConfig) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Works under any launcher, or alone."""
    _quiet_known_warnings()
    for k, v in cfg.env.items():
        os.environ.setdefault(k, v)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # started by hand: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    import deepspeed

    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def _broadcast(obj):
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def resolve_run_dir(cfg: RunConfig) -> Path:
    name = cfg.train.run_name or time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.model.preset or Path(cfg.model.path).name}"
    return Path(cfg.train.output_dir) / _broadcast(name)


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warm-up, then constant / cosine / linear decay to 10% of train.lr."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps)
    if t.lr_schedule == "constant":
        return t.lr
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if t.lr_schedule == "cosine" else 1 - progress
    return t.lr * (0.1 + 0.9 * decay)


class StopRequest:
    """SIGUSR1 (SLURM's warning before preemption or walltime), or a file `RUN_DIR/STOP`, asks for a checkpoint at
    the next step boundary and a clean exit. The file is how a launcher relays the signal to ranks that run off
    the main thread (Ray Train workers), where Python cannot install signal handlers."""

    def __init__(self, run_dir: Path, device: torch.device):
        self.requested, self.device = False, device
        self.stop_file = run_dir / STOP_FILE
        try:
            signal.signal(signal.SIGUSR1, self._handle)
        except ValueError:  # not the main thread (e.g. some Ray workers): the launcher relays it another way
            pass

    def _handle(self, *_):
        self.requested = True

    def __call__(self) -> bool:
        flag = torch.tensor([1.0 if self.requested or self.stop_file.exists() else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # every rank stops at the same step
        return bool(flag.item())


class Prepared(NamedTuple):
    tokenizer: object
    train_ds: object
    val_ds: object
    base_path: Path


def preflight(cfg: RunConfig) -> Prepared:
    """Every check that needs no process group, so bad input fails with one line and exit 2 before any worker
    starts: the data (file, columns, size against seq_len and micro-batch), the tokenizer, the base checkpoint (a
    synthetic preset is written to its cache here, once), and an explicit resume path. Returns what it built, so the
    rank that ran it does not build it again."""
    from lorasp_dist.data import build_datasets, check_batch_fits, ensure_tokenizer
    from lorasp_dist.model.load import ensure_base

    if cfg.lorasp.resample_every:
        raise ConfigError(
            f"lorasp.resample_every = {cfg.lorasp.resample_every}: mask resampling is not supported under the "
            "DeepSpeed engine yet (ZeRO-3 owns the optimizer partitions); use 0"
        )
    if cfg.train.resume not in ("auto", "never"):
        ok, why = ckpt.verify(Path(cfg.train.resume))
        if not ok:
            raise ConfigError(f"train.resume = '{cfg.train.resume}': not a valid checkpoint ({why})")
    tokenizer = ensure_tokenizer(cfg)
    train_ds, val_ds = build_datasets(cfg, tokenizer)
    check_batch_fits(train_ds, cfg)
    return Prepared(tokenizer, train_ds, val_ds, ensure_base(cfg))


# --- the recipe --------------------------------------------------------------------------------------------------

class Recipe:
    def __init__(self, cfg: RunConfig, on_checkpoint: OnCheckpoint | None = None, prune: bool = True):
        self.cfg, self.on_checkpoint, self.prune = cfg, on_checkpoint, prune
        self.rank, self.world, self.device = init_distributed(cfg)
        self.run_dir = resolve_run_dir(cfg)
        self.is_main = self.rank == 0
        self.dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        from lorasp_dist.memory.tracker import MemoryTracker

        self.tracker = MemoryTracker(
            self.run_dir, self.rank, self.world, cfg.memory.sample_interval_s, cfg.memory.record_history_steps
        )
        self._metrics = open(self._metrics_path(), "a")
        self.tb = None

    def _metrics_path(self) -> Path:
        path = self.run_dir / "metrics" / f"rank{self.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def barrier(self):
        torch.distributed.barrier()

    # setup ---------------------------------------------------------------------------------------------------------
    def setup(self, prepared: Prepared | None = None):
        import deepspeed

        from lorasp_dist.data import build_datasets, ensure_tokenizer
        from lorasp_dist.lorasp import apply_lorasp, lorasp_layers
        from lorasp_dist.model.load import ensure_base, load_base

        cfg = self.cfg
        if self.is_main:
            (self.run_dir / "config.yaml").write_text(cfg.to_yaml())
        self.barrier()  # rank 0 ran preflight() before joining: the tokenizer and synthetic base exist now
        if prepared is None:
            tokenizer = ensure_tokenizer(cfg)
            prepared = Prepared(tokenizer, *build_datasets(cfg, tokenizer), ensure_base(cfg))
        self.tokenizer, self.train_ds, self.val_ds, base_path = prepared

        self.ds_config = build_ds_config(cfg, self.world)
        if self.is_main:
            self._write_plan()

        def partition(module):
            deepspeed.zero.Init(module=module, config_dict_or_path=self.ds_config, mem_efficient_linear=False)

        self.tracker.start()  # the baseline: the process with its libraries and data, before the model exists
        with self.tracker.phase("load"):
            t0 = time.perf_counter()
            model = load_base(cfg, base_path, self.device, partition=partition, read_weights=self.is_main)
            self.load_s = time.perf_counter() - t0
        vocab = model.config.vocab_size
        if len(self.tokenizer) > vocab:
            raise ConfigError(
                f"data.tokenizer: {len(self.tokenizer)} tokens do not fit the model's vocabulary of {vocab}; "
                f"use a tokenizer of at most {vocab} tokens (data.vocab_size)"
            )
        with self.tracker.phase("init"):  # adapters, optimizer state, DeepSpeed buffers
            apply_lorasp(model, cfg.lorasp)
            # deepspeed.initialize casts no parameter of a model whose base went through zero.Init, and never
            # casts buffers: put the adapters (trainable values and frozen halves) in the training dtype here.
            for layer in lorasp_layers(model):
                layer.lora_A.to(self.dtype)
                layer.lora_B.to(self.dtype)
            if cfg.train.gradient_checkpointing:
                # Non-reentrant checkpointing works with ZeRO-3's gather hooks and needs no input requires-grad trick.
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model = model
            params = [p for p in model.parameters() if p.requires_grad]
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model,
                model_parameters=params,
                config=self.ds_config,
                lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg) / cfg.train.lr),
            )
        self._write_partition_record()
        self.step, self.sample_pos = 0, 0
        self._resume()

    def _write_partition_record(self):
        """What this rank holds: ZeRO-3 parameter metadata (full size ds_numel vs the local ds_tensor)."""
        total = local = 0
        for p in self.engine.module.parameters():
            total += p.ds_numel * p.element_size()
            local += p.ds_tensor.numel() * p.ds_tensor.element_size()
        record = {"rank": self.rank, "world_size": self.world, "param_bytes_total": total, "param_bytes_local": local}
        path = self.run_dir / "partition" / f"rank{self.rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))

    def _write_plan(self):
        try:
            from lorasp_dist.memory.model import plan_for_config
        except ImportError:
            return
        plan = plan_for_config(self.cfg, self.world, device=self.device.type)
        path = self.run_dir / "memory" / "plan.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(plan.to_dict(), indent=2))

    # checkpoints -----------------------------------------------------------------------------------------------
    def _resume(self):
        cfg = self.cfg
        if cfg.train.resume == "never":
            return
        if cfg.train.resume == "auto":
            found = ckpt.newest_valid(self.run_dir) if self.is_main else None
            path = _broadcast(str(found) if found else None)
            if path is None:
                return
            path = Path(path)
        else:
            path = Path(cfg.train.resume)
            ok, why = ckpt.verify(path)
            if not ok:
                raise ConfigError(f"train.resume = '{path}': not a valid checkpoint ({why})")
        meta = ckpt.read_manifest(path)
        if meta["world_size"] != self.world:
            raise ConfigError(
                f"train.resume = '{path}': written by {meta['world_size']} ranks, this run has {self.world}; "
                "ZeRO-3 optimizer partitions need the same world size"
            )
        with self.tracker.phase("checkpoint"):
            own = ckpt.load_state_file(path / f"rank{self.rank}.safetensors", live=self._rank_state())
            self.optimizer.load_state_dict([None] * self.rank + [own["optimizer"]])
            self.scheduler.load_state_dict(own["scheduler"])
            _set_rng(own["rng"])
        self.step, self.sample_pos = meta["step"], meta["sample_pos"]
        if self.is_main:
            print(f"[lorasp] resumed from {path} at step {self.step}", flush=True)

    def _rank_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": _get_rng()}

    def save_checkpoint(self, metrics: dict) -> Path:
        from lorasp_dist.lorasp import lorasp_state_dict

        tmp, final = ckpt.tmp_dir(self.run_dir, self.step), ckpt.step_dir(self.run_dir, self.step)
        with self.tracker.phase("checkpoint", self.step):
            if self.is_main:
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            self.barrier()
            ckpt.save_state_file(tmp / f"rank{self.rank}.safetensors", self._rank_state())
            with self.gathered_lorasp():
                if self.is_main:
                    ckpt.save_state_file(tmp / "lorasp.safetensors", {"lorasp": lorasp_state_dict(self.model)})
            self.barrier()
            if self.is_main:
                meta = {"step": self.step, "sample_pos": self.sample_pos, "world_size": self.world, "metrics": metrics}
                ckpt.seal(tmp, final, meta)
                if self.prune:
                    ckpt.prune(self.run_dir, self.cfg.train.keep_last)
            self.barrier()
        if self.on_checkpoint:
            self.on_checkpoint(final, self.step, metrics)
        return final

    def gathered_lorasp(self):
        """Context: every LoRA-SP parameter whole on every rank (ZeRO-3 holds only a partition otherwise)."""
        import deepspeed

        params = [p for n, p in self.model.named_parameters() if "lora_" in n]
        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    # the loop --------------------------------------------------------------------------------------------------
    def batches(self):
        from lorasp_dist.data import micro_batch_indices

        t = self.cfg.train
        for idx in micro_batch_indices(
            len(self.train_ds), self.cfg.data.seed, self.sample_pos, t.micro_batch_size, self.rank, self.world,
            t.grad_accum,
        ):
            yield {k: v.to(self.device) for k, v in self.train_ds[idx].items()}

    def train_step(self) -> dict:
        t = self.cfg.train
        t0 = time.perf_counter()
        losses, tokens = [], 0
        self.engine.train()
        for batch in self.batches():
            with self.tracker.phase("forward", self.step):
                loss = self.engine(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            with self.tracker.phase("backward", self.step):
                self.engine.backward(loss)
            with self.tracker.phase("step", self.step):
                self.engine.step()
            losses.append(loss.detach().float())
            tokens += batch["input_ids"].numel()
        self.sample_pos += t.micro_batch_size * t.grad_accum * self.world
        loss = torch.stack(losses).mean()
        grad_norm = self.engine.get_global_grad_norm()  # a tensor; inf when DeepSpeed skipped the step as an overflow
        norm = torch.as_tensor(0.0 if grad_norm is None else grad_norm, dtype=torch.float32, device=self.device)
        nonfinite = (~(torch.isfinite(loss) & torch.isfinite(norm))).float()
        # One all-reduce: the summed loss and tokens, and how many ranks saw a NaN/inf (so every rank agrees).
        stats = torch.stack([loss, torch.tensor(float(tokens), device=self.device), nonfinite])
        torch.distributed.all_reduce(stats)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        return {
            "step": self.step + 1,
            "loss": stats[0].item() / self.world,
            "lr": self.scheduler.get_last_lr()[0] if self.step else lr_at(0, self.cfg),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "finite": stats[2].item() == 0,  # the loss and the gradient norm, on every rank
            "tokens_per_s": stats[1].item() / dt,
            "step_s": dt,
        }

    @torch.no_grad()
    def evaluate(self) -> float:
        self.engine.eval()
        n = len(self.val_ds)
        losses = []
        for i in range(self.cfg.train.eval_batches):
            # Every rank evaluates a different slice; the mean is reduced across ranks.
            start = (i * self.world + self.rank) * self.cfg.train.micro_batch_size
            idx = [(start + j) % n for j in range(self.cfg.train.micro_batch_size)]
            batch = {k: v.to(self.device) for k, v in self.val_ds[idx].items()}
            losses.append(self.engine(input_ids=batch["input_ids"], labels=batch["labels"]).loss.float())
        mean = torch.stack(losses).mean().reshape(1)
        torch.distributed.all_reduce(mean)
        return mean.item() / self.world

    def log(self, record: dict):
        record = {**record, "rank": self.rank, "time": time.time()}
        self._metrics.write(json.dumps(_json_safe(record), allow_nan=False) + "\n")
        self._metrics.flush()
        if not self.is_main:
            return
        if self.tb is None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("step", "rank", "time"):
                self.tb.add_scalar(f"train/{k}" if not k.startswith("eval") else k, v, record["step"])

    def run(self) -> Path:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        t = self.cfg.train
        stop = StopRequest(self.run_dir, self.device)
        progress = Progress(
            TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=not self.is_main,
        )
        metrics: dict = {}
        nonfinite: list[int] = []  # the current run of consecutive steps with a NaN/inf loss or gradient norm
        if self.is_main:
            (self.run_dir / NONFINITE_FILE).unlink(missing_ok=True)  # from an earlier attempt of this run
        with progress:
            task = progress.add_task("train", total=t.max_steps, completed=self.step, info="")
            while self.step < t.max_steps:
                metrics = self.train_step()
                self.step += 1
                if t.eval_every and self.step % t.eval_every == 0:
                    with self.tracker.phase("eval", self.step):
                        metrics["eval_loss"] = self.evaluate()
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    self.log(metrics)
                progress.update(
                    task, completed=self.step,
                    info=f"loss {metrics['loss']:.4f}  lr {metrics['lr']:.2e}  {metrics['tokens_per_s']:.0f} tok/s",
                )
                self.tracker.maybe_record_history(self.step)
                preempted = stop()
                save = (t.save_every and self.step % t.save_every == 0) or self.step == t.max_steps or preempted
                # Nothing is saved (checkpoint, adapter) from a NaN/inf step, nor from adapter values that went NaN/inf.
                finite = metrics["finite"] and (not save or self._adapter_finite())
                nonfinite = [] if finite else [*nonfinite, self.step]
                if nonfinite and (len(nonfinite) >= t.max_nonfinite_steps or self.step == t.max_steps):
                    self._stop_nonfinite(nonfinite)
                if nonfinite and self.is_main:
                    print(f"[lorasp] step {self.step}: NaN/inf loss, gradient norm or adapter values ({len(nonfinite)} "
                          f"in a row, the run stops at {t.max_nonfinite_steps})" + ("; no checkpoint" if save else ""),
                          flush=True)
                if save and not nonfinite:
                    self.save_checkpoint(_json_safe(metrics))
                if preempted:
                    if self.is_main:
                        (self.run_dir / STOP_FILE).unlink(missing_ok=True)
                        saved = f"checkpoint saved at step {self.step}" if not nonfinite else "no checkpoint (NaN/inf)"
                        print(f"[lorasp] stop requested: {saved}, exiting", flush=True)
                    self.barrier()
                    return self.run_dir
        self.finish()
        return self.run_dir

    def _adapter_finite(self) -> bool:
        """Every rank checks its own ZeRO-3 partition of the trained values; the ranks agree through one all-reduce."""
        flag = torch.zeros(1, device=self.device)
        for p in self.engine.module.parameters():
            if p.requires_grad and not torch.isfinite(p.ds_tensor).all():
                flag.fill_(1.0)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag.item() == 0

    def _stop_nonfinite(self, steps: list[int]) -> None:
        """Every rank raises NonFiniteLoss at the same step; rank 0 first writes RUN_DIR/nonfinite.json."""
        limit = self.cfg.train.max_nonfinite_steps
        newest = ckpt.list_checkpoints(self.run_dir)
        span = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}-{steps[-1]}"
        why = f"{len(steps)} in a row, train.max_nonfinite_steps = {limit}" if len(steps) >= limit else "the last step"
        message = (
            f"stopped at step {self.step}: NaN/inf loss, gradient norm or adapter values at {span} ({why}); nothing "
            f"was saved from them; newest checkpoint: {newest[0] if newest else 'none'} (lower train.lr, or raise "
            "train.warmup_steps, and resume from it)"
        )
        if self.is_main:
            record = {"step": self.step, "nonfinite_steps": steps, "max_nonfinite_steps": limit,
                      "newest_checkpoint": str(newest[0]) if newest else None, "message": message}
            atomic_write_text(self.run_dir / NONFINITE_FILE, json.dumps(record, indent=2) + "\n")
            print(f"[lorasp] {message}", flush=True)
        self.barrier()
        raise NonFiniteLoss(message)

    def finish(self):
        from lorasp_dist.lorasp.export import dense_adapter_weights, write_peft_adapter

        with self.gathered_lorasp():
            weights = dense_adapter_weights(self.model) if self.is_main else None
        if self.is_main:
            base = str(self.cfg.model.path) if self.cfg.model.path else None
            write_peft_adapter(weights, self.cfg.lorasp, self.run_dir / "adapter", base_model=base)
            summary = {"run_dir": str(self.run_dir), "adapter": str(self.run_dir / "adapter"), "load_s": self.load_s}
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.barrier()
        self.tracker.stop()
        self.barrier()
        if self.is_main:
            from lorasp_dist.memory.report import write_report

            paths = write_report(self.run_dir)
            print(f"[lorasp] adapter: {self.run_dir / 'adapter'}", flush=True)
            print(f"[lorasp] memory report: {paths[0] if paths else self.run_dir}", flush=True)

    def close(self):
        self.tracker.stop()
        self._metrics.close()
        if self.tb is not None:
            self.tb.close()


def _json_safe(record: dict) -> dict:
    """NaN and inf are not JSON: they are written as null (a training step's `finite` flag says why)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def _get_rng() -> dict:
    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": json.dumps(random.getstate()), "numpy": _np_state(np)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _np_state(np) -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": pos, "has_gauss": has_gauss,
            "cached": cached}


def _set_rng(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def train(cfg: RunConfig, on_checkpoint: OnCheckpoint | None = None, prune: bool = True) -> Path:
    """Train on this rank; returns the run directory. `prune=False`: the caller deletes old checkpoints (under
    `lorasp launch`, Ray Train's CheckpointConfig.num_to_keep does; two owners would delete each other's)."""
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    # fail fast, before the process group and the other ranks wait on us
    prepared = preflight(cfg) if int(os.environ.get("RANK", "0")) == 0 else None
    recipe = Recipe(cfg, on_checkpoint, prune)
    try:
        recipe.setup(prepared)
        return recipe.run()
    finally:
        recipe.close()
