"""What every Ray Train worker runs: the engine's ordinary per-rank loop, plus the three things only Ray knows about.

1. Checkpoints, never copied. Ray's run directory (storage_path/name) *is* the engine's run directory: after each
   sealed save, rank 0 reports the step directory in place (CheckpointUploadMode.NO_UPLOAD) and Ray registers it.
   Ray's CheckpointConfig.num_to_keep then deletes old ones, so the engine must not prune too (`prune=False`).
2. Resume after a restart: from the engine's newest valid checkpoint in the run directory (`train.resume=auto`), not
   from `ray.train.get_checkpoint()`. Ray registers a report only when its controller next polls the workers
   (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s), so its latest can lag the newest sealed, checksummed one; resuming from
   Ray's would redo up to that many more steps. A sealed step Ray never registered (the crash came inside that
   window) is reported now, so that Ray's retention deletes it in its turn.
3. Output. Every line this rank prints goes to `RUN_DIR/logs/rank{r}.log` prefixed `[rank r] `, and its PID to
   `RUN_DIR/pids/rank{r}` (for operators, and for the fault test that kills one rank).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

WorkerArgs = dict[str, Any]  # {"config": RunConfig as JSON data, secrets redacted; "secrets": ObjectRef; "run_dir"}


def train_worker(args: WorkerArgs) -> None:
    import ray.train

    from launcher.logs import TeeOutput
    from lorasp_dist.config import validate
    from lorasp_dist.engine import checkpoint as ckpt
    from lorasp_dist.engine.train import NonFiniteLoss, train

    _quiet_report_repr()
    rank = ray.train.get_context().get_world_rank()
    run_dir = Path(args["run_dir"])
    with TeeOutput(run_dir / "logs" / f"rank{rank}.log", prefix=f"[rank {rank}] "):
        pid_file = run_dir / "pids" / f"rank{rank}"
        pid_file.parent.mkdir(parents=True, exist_ok=True)
        pid_file.write_text(f"{os.getpid()}\n")

        cfg = validate(args["config"])
        # Secret `env` values travel apart, through the object store: Ray Train keeps the config it was given in its
        # run state (the dashboard shows it), and the runtime_env is kept and shown too.
        cfg.env.update(ray.get(args["secrets"]))
        sealed = ckpt.list_checkpoints(run_dir)  # the same list on every rank: the previous group is gone
        if sealed:  # a restart, or --resume: this run's own checkpoints come first
            cfg.train.resume = "auto"
            registered = ray.train.get_checkpoint()
            if registered is None or Path(registered.path).resolve() != sealed[0].resolve():
                _report(rank, sealed[0], ckpt.read_manifest(sealed[0]))
        newest = f" (newest sealed: {sealed[0].name})" if sealed else ""
        print(f"[lorasp] rank {rank} pid {os.getpid()} on {os.uname().nodename}; resume: {cfg.train.resume}{newest}",
              flush=True)

        def on_checkpoint(path: Path, step: int, metrics: dict) -> None:
            _report(rank, path, {"step": step, "metrics": metrics})

        try:
            train(cfg, on_checkpoint=on_checkpoint, prune=False)
        except NonFiniteLoss:
            return  # a deliberate stop, not a crash for Ray to retry: the driver finds RUN_DIR/nonfinite.json


def _quiet_report_repr() -> None:
    """Ray Train 2.60 logs a repr of every report, on every rank, at INFO, through a logger named by its file's path
    (`logging.getLogger(__file__)` in ray.train.v2._internal.execution.context). That name escapes the `ray.train`
    level `lorasp launch` sets (RunConfig.logging_config), so the lines reach the console and the rank logs: give
    that logger the same level (its warnings still show)."""
    context = sys.modules.get("ray.train.v2._internal.execution.context")
    if context is not None:
        logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _report(rank: int, path: Path, meta: dict) -> None:
    """A collective: every rank reports, rank 0 alone hands over the (shared) checkpoint directory."""
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    checkpoint = Checkpoint.from_directory(str(path)) if rank == 0 else None
    ray.train.report({**meta.get("metrics", {}), "step": meta["step"]}, checkpoint=checkpoint,
                     checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)
