"""`lorasp train`: the per-rank recipe. A plain loop around `deepspeed.initialize`, in the spirit of torchtune.

Run it under torchrun / the deepspeed launcher / Ray Train (which set RANK, WORLD_SIZE, ...), or alone (one rank).
    load 4-bit base (partitioned by ZeRO-3 as it loads) -> apply LoRA-SP -> deepspeed.initialize
    -> [forward, backward, step] x max_steps, logging, eval, checkpoints -> PEFT adapter + memory report
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import shutil
import signal
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.checkpoint import set_checkpoint_early_stop

from lorasp_dist.atomic import atomic_dir, atomic_write_text
from lorasp_dist.config import ConfigError, RunConfig
from lorasp_dist.ds_config import build_ds_config
from lorasp_dist.eager import import_eager
from lorasp_dist.engine import checkpoint as ckpt
from lorasp_dist.engine.profile import StepProfiler
from lorasp_dist.engine.progress import TrainingProgress
from lorasp_dist.engine.run_dir import RunLock, check_new_or_continued, unique_run_name
from lorasp_dist.inputs import check_inputs
from lorasp_dist.lorasp.masks import mask_round
from lorasp_dist.ports import free_loopback_port

STOP_FILE = "STOP"
EXIT_STOPPED = 3  # stopped on request with a checkpoint saved; `lorasp launch` exits with the same code
NONFINITE_FILE = "nonfinite.json"  # written when a run stops on NaN/inf; says at which steps
EXIT_NONFINITE = 4  # the exit code of a run stopped that way (`lorasp train`, `lorasp launch`, the SLURM job)


class NonFiniteLoss(RuntimeError):
    """The run stopped: train.max_nonfinite_steps steps in a row (or its last step) had a NaN/inf loss or gradient
    norm. Nothing from those steps was saved; the message names the newest checkpoint."""


# --- process setup -----------------------------------------------------------------------------------------------

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
    for k, v in cfg.rank_env().items():
        os.environ.setdefault(k, v)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:  # started by hand: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_loopback_port()))
    import deepspeed

    cuda = torch.cuda.is_available()
    if not cuda:
        # DeepSpeed's CPU backend loads its shared-memory all-reduce op at init, JIT-building it first (~40 s of gcc
        # on a first run). Only tensor-parallel inference calls it (inference_all_reduce), never a training step.
        # __compatible_ops__ is DeepSpeed's cached probe of its ops, kept in one dict so that edits to it hold.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    shared = cuda and torch.cuda.device_count() < int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if shared:
        # More ranks than GPUs on this node (launcher.gpus_per_worker < 1). DeepSpeed reads LOCAL_RANK as the device
        # index, so each rank is told its GPU's; NCCL refuses two ranks on one GPU, gloo does not.
        if local_rank == 0:  # also what a scheduler that shows each rank only its own GPU looks like: say so
            print(f"[lorasp] {os.environ['LOCAL_WORLD_SIZE']} ranks on this node see {torch.cuda.device_count()} "
                  "GPU(s): they share them and talk over gloo (NCCL puts one rank on a GPU)", flush=True)
        local_rank %= torch.cuda.device_count()
        os.environ["LOCAL_RANK"] = str(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if cuda and not shared else "gloo", verbose=False)
    if cuda:
        torch.cuda.set_device(local_rank)
        if cfg.memory.gpu_mem:  # a budget below the GPU's size is a cap: a plan for a 24 GiB card runs as one
            total = torch.cuda.get_device_properties(local_rank).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.memory.gpu_mem / total), local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def _broadcast(obj):
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def resolve_run_dir(cfg: RunConfig) -> Path:
    """The run directory, rank 0's on every rank (train() has named an unnamed run on rank 0)."""
    return Path(cfg.train.output_dir) / _broadcast(cfg.train.run_name or unique_run_name(cfg))


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
    """SIGUSR1 (SLURM's warning before preemption or walltime), SIGTERM (`scancel`, `kill`), SIGINT (Ctrl-C), or a
    file `RUN_DIR/STOP`, asks for a checkpoint at the next step boundary and a clean exit (`lorasp train` exits
    EXIT_STOPPED). The file is how a launcher relays the signal to ranks that run off the main thread (Ray Train
    workers), where Python cannot install signal handlers. A second Ctrl-C aborts at once, without a checkpoint; one
    that comes within REPEAT_S of the first is the same keypress, relayed by torchrun to its ranks."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
    REPEAT_S = 1.0
    honoured = False  # a stop request ended a run in this process: `lorasp train` exits EXIT_STOPPED

    def __init__(self, run_dir: Path, device: torch.device):
        self.requested, self.device = False, device
        self.stop_file = run_dir / STOP_FILE
        self._interrupted_at: float | None = None
        StopRequest.honoured = False  # a new run
        try:
            for sig in self.SIGNALS:
                signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. some Ray workers): the launcher relays it another way
            pass

    def _handle(self, signum: int, _frame) -> None:
        if signum == signal.SIGINT:
            now = time.monotonic()
            if self._interrupted_at is not None and now - self._interrupted_at >= self.REPEAT_S:
                os.write(2, b"[lorasp] SIGINT again: aborting now, without a checkpoint\n")
                raise KeyboardInterrupt
            self._interrupted_at = self._interrupted_at or now
        if not self.requested:
            name = signal.Signals(signum).name
            os.write(2, f"[lorasp] {name}: checkpoint at the next step boundary, then exit\n".encode())
        self.requested = True

    def __call__(self) -> bool:
        flag = torch.tensor([1.0 if self.requested or self.stop_file.exists() else 0.0], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)  # every rank stops at the same step
        stop = bool(flag.item())
        if stop:
            StopRequest.honoured = True
        return stop


class Prepared(NamedTuple):
    tokenizer: object
    train_ds: object
    val_ds: object
    base_path: Path | None  # None: not looked up yet (early_data)


def preflight(cfg: RunConfig) -> Prepared:
    """Every check that needs no process group, so bad input fails with one line and exit 2 before any worker
    starts: the inputs (lorasp_dist.inputs: paths, columns, tokenizer against vocabulary, seq_len against context),
    then what only building them tells (the data's size against seq_len and micro-batch), the base checkpoint (a
    synthetic preset is written to its cache here, once), and an explicit resume path. Returns what it built, so the
    rank that ran it does not build it again."""
    from lorasp_dist.data import build_datasets, check_batch_fits, ensure_tokenizer
    from lorasp_dist.model.load import ensure_base

    check_inputs(cfg)
    resume_from = None
    if cfg.train.resume not in ("auto", "never"):
        resume_from = Path(cfg.train.resume)
        ok, why = ckpt.verify(resume_from)
        if not ok:
            raise ConfigError(f"train.resume = '{cfg.train.resume}': not a valid checkpoint ({why})")
    if cfg.train.resume == "auto" and cfg.train.run_name:  # a run whose every checkpoint is corrupt stops here
        resume_from = ckpt.resume_point(Path(cfg.train.output_dir) / cfg.train.run_name,
                                        cfg.train.restart_if_corrupt).newest
    if resume_from is not None:
        check_mask_round(resume_from, cfg.lorasp.resample_every)
    tokenizer = ensure_tokenizer(cfg)
    train_ds, val_ds = build_datasets(cfg, tokenizer)
    check_batch_fits(train_ds, cfg)
    return Prepared(tokenizer, train_ds, val_ds, ensure_base(cfg))


def check_mask_round(path: Path, every: int) -> int:
    """The round of the masks a run resumed from checkpoint `path` trains with: its step's under
    lorasp.resample_every. A ConfigError when the checkpoint's masks are of another round (the run was trained with
    another resample_every): it would go on with masks it never held. Reads only the masks' seeds."""
    step = ckpt.read_manifest(path)["step"]
    expected = mask_round(step, every)
    saved = {int(seed[1]) for seed in ckpt.load_tensors_ending(path / "lorasp.safetensors", ".mask_seed")}
    if saved - {expected}:
        raise ConfigError(
            f"train.resume = '{path}': its masks are of round {max(saved)} at step {step}, where "
            f"lorasp.resample_every = {every} gives round {expected}; resume with the run's lorasp.resample_every"
        )
    return expected


def early_data(cfg: RunConfig) -> Prepared | None:
    """On a rank other than 0: its tokenizer and data, built while rank 0 runs preflight() rather than after it, so
    the two do not wait on each other (ranks may race to train a cached tokenizer: data.py). Not the base, which rank
    0 may be writing. None if anything fails: it fails again after the barrier, once rank 0 has reported bad input in
    one line."""
    from lorasp_dist.data import build_datasets, ensure_tokenizer

    try:
        tokenizer = ensure_tokenizer(cfg)
        return Prepared(tokenizer, *build_datasets(cfg, tokenizer, report=False), None)  # rank 0 reports the data
    except Exception:
        return None


# --- the recipe --------------------------------------------------------------------------------------------------

class Recipe:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
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
        self.profiler = StepProfiler(self.run_dir, self.rank, cfg.train.profile_steps, self.device.type == "cuda")

    def _metrics_path(self) -> Path:
        path = self.run_dir / "metrics" / f"rank{self.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def barrier(self):
        torch.distributed.barrier()

    # setup ---------------------------------------------------------------------------------------------------------
    def setup(self, prepared: Prepared | None = None):
        import deepspeed
        from deepspeed.utils import set_z3_leaf_module

        from lorasp_dist.data import build_datasets, ensure_tokenizer
        from lorasp_dist.lorasp import apply_lorasp, group_adapters, lorasp_layers
        from lorasp_dist.model.load import decoder_layers, enable_checkpointing, ensure_base, load_base

        # The rank's entry point (lorasp_dist/cli.py, launcher/worker.py) turned the cyclic collector off for the
        # imports: torch, transformers and DeepSpeed make over 600,000 objects, none of them garbage, which it
        # would scan again and again (~0.5-1 s of CPU a rank). On before the model is built: its garbage counts.
        gc.enable()
        cfg = self.cfg
        if self.is_main:
            atomic_write_text(self.run_dir / "config.yaml", cfg.to_yaml())  # a kill never leaves half of it
        self.barrier()  # rank 0 ran preflight() before joining: the tokenizer and synthetic base exist now
        if prepared is None:
            tokenizer = ensure_tokenizer(cfg)
            prepared = Prepared(tokenizer, *build_datasets(cfg, tokenizer, report=self.is_main), ensure_base(cfg))
        elif prepared.base_path is None:  # the data was built before the barrier (early_data), the base comes after it
            prepared = prepared._replace(base_path=ensure_base(cfg))
        self.tokenizer, self.train_ds, self.val_ds, self.base_path = prepared

        self.ds_config = build_ds_config(cfg, self.world)
        if self.is_main:
            self._write_plan()

        def partition(module):
            deepspeed.zero.Init(module=module, config_dict_or_path=self.ds_config, mem_efficient_linear=False)

        self.tracker.start()  # the baseline: the process with its libraries and data, before the model exists
        with self.tracker.phase("load"):
            t0 = time.perf_counter()
            model = load_base(cfg, self.base_path, self.device, partition=partition, read_weights=self.is_main)
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
            checkpointed = enable_checkpointing(model, cfg.train)
            if cfg.train.fused_kernels and self.device.type == "cuda":
                # Imported here: torch.compile's decorators load torch._dynamo (~85 MiB of modules on a CPU rank).
                from lorasp_dist.model.fused import fuse_kernels

                fuse_kernels(decoder_layers(model))
            # Whole-layer fetches need the checkpointed recompute: without any, the backward finds a leaf layer's
            # parameters released (llama-65b on one H200, session 15; on CPU with 2 ranks before), so the layers
            # that keep their activations fetch per module.
            if cfg.deepspeed.fetch == "layer":
                for layer in checkpointed:
                    set_z3_leaf_module(layer, True)
                group_adapters(checkpointed)  # a layer fetched whole rebuilds its adapters in one pass
            self.model = model
            params = [p for p in model.parameters() if p.requires_grad]
            import_eager("deepspeed.runtime.zero.muon.muon_optimizer")  # ZeRO-3 imports it: ~1 s of CPU a rank
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model,
                model_parameters=params,
                config=self.ds_config,
                lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, cfg) / cfg.train.lr),
            )
        if cfg.deepspeed.fetches_in_flight != DEEPSPEED_FETCHES_IN_FLIGHT:
            _set_fetches_in_flight(self.engine, cfg.deepspeed.fetches_in_flight)
        self._write_partition_record()
        self.step, self.sample_pos = 0, 0
        self._resume()
        self._drop_metrics_after(self.step)

    def _write_partition_record(self):
        """What this rank holds: ZeRO-3 parameter metadata (full size ds_numel vs the local ds_tensor), and the
        resident layers' 4-bit weights and absmax, whole (buffers: model/quant.py)."""
        total = local = 0
        for p in self.engine.module.parameters():
            total += p.ds_numel * p.element_size()
            local += p.ds_tensor.numel() * p.ds_tensor.element_size()
        resident = sum(b.numel() * b.element_size() for m in self.engine.module.modules()
                       if hasattr(m, "forward_with_lora") for b in m.buffers(recurse=False))  # 4-bit layers'
        coordinator, name = _fetch_events(self.engine)
        record = {"rank": self.rank, "world_size": self.world, "param_bytes_total": total, "param_bytes_local": local,
                  "resident_bytes": resident, "fetches_in_flight": getattr(coordinator, name, None)}
        path = self.run_dir / "partition" / f"rank{self.rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))

    def _write_adapter_inventory(self):
        """The adapter's bytes on this rank, counted from its tensors (memory/inventory.py), for the report."""
        from lorasp_dist.memory.inventory import adapter_bytes

        held = adapter_bytes(self.engine.module, getattr(self.engine, "optimizer", None))
        atomic_write_text(self.run_dir / "memory" / f"adapter_rank{self.rank}.json",
                          json.dumps({"rank": self.rank, "bytes": held}))

    def _write_plan(self):
        try:
            from lorasp_dist.memory.estimate import plan_for_config
        except ImportError:
            return
        plan = plan_for_config(self.cfg, self.world, device=self.device.type, ds=self.ds_config)
        path = self.run_dir / "memory" / "plan.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(plan.to_dict(), indent=2))

    # checkpoints -----------------------------------------------------------------------------------------------
    def _resume(self):
        cfg = self.cfg
        if cfg.train.resume == "never":
            return
        if cfg.train.resume == "auto":
            path = _broadcast(self._newest_valid_checkpoint() if self.is_main else None)
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
            self._restore_masks(path)
        self.step, self.sample_pos = meta["step"], meta["sample_pos"]
        if self.is_main:
            print(f"[lorasp] resumed from {path} at step {self.step}", flush=True)

    def _restore_masks(self, path: Path) -> None:
        """The masks a checkpoint trained with: their round follows from its step (lorasp.resample_every), and after
        a redraw its frozen values, trained before the redraw froze them, are in its lorasp.safetensors (the
        optimizer partitions hold the trainable ones)."""
        from lorasp_dist.lorasp import load_lorasp_state_dict

        # Checked again: preflight checked the checkpoint it chose, and a restart may resume from a newer one.
        if check_mask_round(path, self.cfg.lorasp.resample_every):
            state = ckpt.load_state_file(path / "lorasp.safetensors")["lorasp"]
            with self.gathered_lorasp(modifier_rank=0):
                load_lorasp_state_dict(self.model, state)

    def _drop_metrics_after(self, step: int) -> None:
        """A restarted run redoes the steps after its checkpoint: the records it wrote for them before go, so that
        every step is in metrics/rank{r}.jsonl once (a line torn by a kill goes too)."""
        path = self._metrics_path()
        self._metrics.close()
        kept = []
        for line in path.read_text().splitlines(keepends=True):
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError):
                pass
        atomic_write_text(path, "".join(kept))
        self._metrics = open(path, "a")

    def _newest_valid_checkpoint(self) -> str | None:
        """Rank 0: where the run continues. Newer corrupt checkpoints are moved aside first, so that the steps they
        held are saved again without anything being deleted (preflight has refused a run with no valid one)."""
        found = ckpt.resume_point(self.run_dir, self.cfg.train.restart_if_corrupt)
        for (path, why), moved in zip(found.corrupt, ckpt.set_aside(self.run_dir, found.corrupt)):
            print(f"[lorasp] {path.name} is corrupt ({why}): moved to {moved}", flush=True)
        return str(found.newest) if found.newest else None

    def _rank_state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": _get_rng()}

    def save_checkpoint(self, metrics: dict) -> Path:
        """Every rank writes its file, rank 0 seals them and prunes. A write that fails on any rank (a full disk)
        stops every rank with the same CheckpointWriteError, the partial save removed, older checkpoints untouched."""
        from lorasp_dist.lorasp import lorasp_state_dict

        tmp, final = ckpt.tmp_dir(self.run_dir, self.step), ckpt.step_dir(self.run_dir, self.step)
        with self.tracker.phase("checkpoint", self.step):
            error = None
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                error = _attempt(lambda: tmp.mkdir(parents=True))
            self.barrier()
            error = error or _attempt(
                lambda: ckpt.save_state_file(tmp / f"rank{self.rank}.safetensors", self._rank_state()))
            with self.gathered_lorasp():
                if self.is_main and error is None:
                    error = _attempt(lambda: ckpt.save_state_file(
                        tmp / "lorasp.safetensors", {"lorasp": lorasp_state_dict(self.model)}))
            errors = [None] * self.world
            torch.distributed.all_gather_object(errors, error)  # also the barrier: every rank's file is written
            error = next((e for e in errors if e), None)
            if self.is_main:
                if error is None:
                    meta = {"step": self.step, "sample_pos": self.sample_pos, "world_size": self.world,
                            "metrics": metrics}
                    error = _attempt(lambda: ckpt.seal(tmp, final, meta))
                if error is None:
                    ckpt.prune(self.run_dir, self.cfg.train.keep_last)
                else:
                    shutil.rmtree(tmp, ignore_errors=True)  # before anything else needs the space
            error = _broadcast(error)
        if error:
            kept = ckpt.list_checkpoints(self.run_dir)
            raise ckpt.CheckpointWriteError(
                f"checkpoint {final.name} could not be written ({error}); the run stopped at step {self.step}, "
                f"{kept[0].name + ' is intact' if kept else 'with no earlier checkpoint'}: free space, then continue "
                f"the run from it (train.resume=auto, or lorasp launch --resume {self.run_dir})"
            )
        return final

    def gathered_lorasp(self, modifier_rank: int | None = None):
        """Context: every LoRA-SP parameter whole on every rank (ZeRO-3 holds only a partition otherwise); with a
        `modifier_rank`, what that rank writes into them is every rank's on leaving."""
        import deepspeed

        params = [p for n, p in self.model.named_parameters() if "lora_" in n]
        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)

    def resample_masks(self) -> None:
        """Redraw every mask before the next step (lorasp.resample_every): values kept, Adam moments carried for
        the entries that stay trainable and zero for those that become trainable, on every rank's partitions."""
        from lorasp_dist.lorasp.zero3 import resample_masks_zero3

        resample_masks_zero3(self.model)

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
        from lorasp_dist.data import scored_tokens

        t = self.cfg.train
        t0 = time.perf_counter()
        batches = list(self.batches())
        # The step's loss is the mean over the scored tokens of all its micro-batches on all ranks, not a mean of
        # per-row means: each micro-batch's summed loss is divided by the step's count. DeepSpeed then divides the
        # gradients by grad_accum (backward) and by the world size (the reduce-scatter), so the count is too.
        scored = torch.stack([scored_tokens(b["labels"]) for b in batches]).sum().float()
        torch.distributed.all_reduce(scored)
        per_micro_batch = scored / (t.grad_accum * self.world)
        loss_sum, tokens = torch.zeros((), device=self.device), 0
        self.engine.train()
        for batch in batches:
            with self.tracker.phase("forward", self.step):
                # Position ids restart at each packed example; with no attention mask and no KV cache transformers
                # turns them into a block-diagonal mask (data.PackedDataset).
                loss = self.engine(**batch, use_cache=False, num_items_in_batch=per_micro_batch).loss
            # CUDA memory history crashes checkpointing's early-stopped recompute in torch 2.11 ("apply ... returned
            # NULL", pytorch/pytorch#179536; seen at 65B): a run that records it recomputes each layer whole.
            early_stop = set_checkpoint_early_stop(not self.cfg.memory.record_history_steps)
            with self.tracker.phase("backward", self.step), early_stop:
                self.engine.backward(loss)
            with self.tracker.phase("step", self.step):
                self.engine.step()
            loss_sum += loss.detach().float()
            tokens += batch["input_ids"].numel()
        self.sample_pos += t.micro_batch_size * t.grad_accum * self.world
        grad_norm = self.engine.get_global_grad_norm()  # a tensor; inf when DeepSpeed skipped the step as an overflow
        norm = torch.as_tensor(0.0 if grad_norm is None else grad_norm, dtype=torch.float32, device=self.device)
        nonfinite = (~(torch.isfinite(loss_sum) & torch.isfinite(norm))).float()
        # One all-reduce: the summed loss and tokens, and how many ranks saw a NaN/inf (so every rank agrees).
        stats = torch.stack([loss_sum, torch.tensor(float(tokens), device=self.device), nonfinite])
        torch.distributed.all_reduce(stats)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        return {
            "step": self.step + 1,
            "loss": stats[0].item() / (t.grad_accum * self.world),
            "lr": self.scheduler.get_last_lr()[0] if self.step else lr_at(0, self.cfg),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "finite": stats[2].item() == 0,  # the loss and the gradient norm, on every rank
            "tokens_per_s": stats[1].item() / dt,
            "scored_tokens": int(scored.item()),  # the supervised tokens of the step (all ranks)
            "scored_tokens_per_s": scored.item() / dt,
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
            losses.append(self.engine(**batch, use_cache=False).loss.float())
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

            # purge_step: TensorBoard hides the events a restarted run wrote past its checkpoint, as for the metrics
            self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=record["step"])
        for k, v in record.items():
            if isinstance(v, (int, float)) and k not in ("step", "rank", "time"):
                self.tb.add_scalar(f"train/{k}" if not k.startswith("eval") else k, v, record["step"])

    def run(self) -> Path:
        t, every = self.cfg.train, self.cfg.lorasp.resample_every
        stop = StopRequest(self.run_dir, self.device)
        # The model's Python objects (hundreds of thousands at 65B) live for the whole run: out of the cyclic
        # collector's scans, so that a full collection in the middle of a step costs little.
        gc.collect()
        gc.freeze()
        metrics: dict = {}
        nonfinite: list[int] = []  # the current run of consecutive steps with a NaN/inf loss or gradient norm
        if self.is_main:  # an earlier attempt's end: this one has neither stopped on NaN nor finished yet
            for stale in (NONFINITE_FILE, "summary.json"):  # (`lorasp launch` removes them too, before any rank)
                (self.run_dir / stale).unlink(missing_ok=True)
        with TrainingProgress(t.max_steps, self.step, t.log_every, self.device, enabled=self.is_main) as progress:
            while self.step < t.max_steps:
                self.profiler.tick(self.step)
                if mask_round(self.step + 1, every) > mask_round(self.step, every):
                    with self.tracker.phase("redraw", self.step + 1):  # its seconds and peaks in the memory report
                        self.resample_masks()
                metrics = self.train_step()
                self.step += 1
                if self.step == 1:  # the optimizer's moments exist from the first step on
                    self._write_adapter_inventory()
                if t.eval_every and self.step % t.eval_every == 0:
                    with self.tracker.phase("eval", self.step):
                        metrics["eval_loss"] = self.evaluate()
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    self.log(metrics)
                progress.update(self.step, metrics)
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
        output = self.write_model() if self.cfg.lorasp.variant == "full" else self.write_adapter()
        if self.is_main:
            summary = {"run_dir": str(self.run_dir), output.name: str(output), "load_s": self.load_s}
            atomic_write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))  # it means "finished"
        self.barrier()
        self.tracker.stop()
        self.barrier()
        if self.is_main:
            from lorasp_dist.memory.report import write_report

            paths = write_report(self.run_dir)
            print(f"[lorasp] {output.name}: {output}", flush=True)
            print(f"[lorasp] memory report: {paths[0] if paths else self.run_dir}", flush=True)

    def write_adapter(self) -> Path:
        """RUN_DIR/adapter: the trained LoRA-SP matrices as a PEFT LoRA adapter, with the base trained on (for a
        preset, its cached synthetic checkpoint) and the tokenizer: `lorasp eval RUN_DIR` and peft need nothing else."""
        from lorasp_dist.lorasp.export import dense_adapter_weights, write_peft_adapter

        out = self.run_dir / "adapter"
        with self.gathered_lorasp():
            weights = dense_adapter_weights(self.model) if self.is_main else None
        if self.is_main:
            write_peft_adapter(weights, self.cfg.lorasp, out, base_model=str(Path(self.base_path).resolve()),
                               tokenizer=self.tokenizer)
        return out

    def write_model(self) -> Path:
        """RUN_DIR/model (lorasp.variant=full: every weight trained, no adapter): the whole model, gathered from
        ZeRO-3's partitions, as a transformers checkpoint with its tokenizer (`lorasp eval --base RUN_DIR/model`)."""
        import deepspeed

        out = self.run_dir / "model"
        with deepspeed.zero.GatheredParameters(list(self.model.parameters())):
            if self.is_main:
                state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
                with atomic_dir(out, replace=True) as tmp:
                    self.model.save_pretrained(tmp, state_dict=state)
                    self.tokenizer.save_pretrained(tmp)
        return out

    def close(self):
        self.profiler.close()
        self.tracker.stop()
        self._metrics.close()
        if self.tb is not None:
            self.tb.close()


DEEPSPEED_FETCHES_IN_FLIGHT = 2  # DeepSpeed's own, left untouched unless a run asks for another


def _fetch_events(engine) -> tuple[object, str]:
    """ZeRO-3's parameter coordinator and the name-mangled attribute of its fetch back-pressure."""
    coordinator = engine.optimizer.parameter_offload.get_param_coordinator()
    return coordinator, f"_{type(coordinator).__name__}__max_ongoing_fetch_events"


def _set_fetches_in_flight(engine, n: int) -> None:
    """DeepSpeed has no setting for its fetch back-pressure (PartitionedParameterCoordinator's private
    __max_ongoing_fetch_events); fail loudly if a DeepSpeed release renames it rather than set nothing."""
    coordinator, name = _fetch_events(engine)
    if not hasattr(coordinator, name):
        raise RuntimeError(f"deepspeed.fetches_in_flight: this DeepSpeed's ZeRO-3 coordinator has no {name}")
    setattr(coordinator, name, n)


def _json_safe(record: dict) -> dict:
    """NaN and inf are not JSON: they are written as null (a training step's `finite` flag says why)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


def _attempt(write: Callable[[], object]) -> str | None:
    """None, or why `write` failed: ranks exchange the reason, so that every rank stops with the same message."""
    try:
        write()
    except OSError as e:
        return str(e)
    return None


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


def train(cfg: RunConfig, claim: bool = True) -> Path:
    """Train on this rank; returns the run directory. With `claim`, rank 0 takes the run directory's lock for the
    life of the run (run_dir.py); `lorasp launch` passes False: its driver holds the lock across worker restarts."""
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    prepared, lock = None, nullcontext()
    if int(os.environ.get("RANK", "0")) == 0:  # fail fast, before the process group and the other ranks wait on us
        prepared = preflight(cfg)
        if claim:
            cfg.train.run_name = cfg.train.run_name or unique_run_name(cfg)
            run_dir = Path(cfg.train.output_dir) / cfg.train.run_name
            check_new_or_continued(run_dir, cfg.train.resume)
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = RunLock(run_dir)
    else:
        prepared = early_data(cfg)
    with lock:
        recipe = Recipe(cfg)
        try:
            recipe.setup(prepared)
            return recipe.run()
        finally:
            recipe.close()
