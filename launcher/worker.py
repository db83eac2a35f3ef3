"""What every Ray Train worker runs: the engine's ordinary per-rank loop, plus the two things only Ray knows about.

1. Resume after a restart: from the engine's newest valid checkpoint in the run directory (`train.resume=auto`).
   Ray's run directory (storage_path/name) *is* the engine's run directory, and the engine alone keeps, verifies and
   prunes checkpoints there; none is reported to Ray Train. (Ray's bookkeeping lists a report per directory name: a
   step saved again after resuming past a corrupt one would be listed twice, and its retention would then delete the
   checkpoint the run resumed from, or the new one at the reused path.) The driver holds the run directory's lock,
   so the engine does not claim it (`claim=False`).
2. Output. Every line this rank prints goes to `RUN_DIR/logs/rank{r}.log` prefixed `[rank r] `, and its PID to
   `RUN_DIR/pids/rank{r}` (for operators, and for the fault test that kills one rank).
"""

from __future__ import annotations

import gc
import os
from pathlib import Path
from typing import Any

WorkerArgs = dict[str, Any]  # {"config": RunConfig as JSON data, secrets redacted; "secrets": ObjectRef; "run_dir"}


def train_worker(args: WorkerArgs) -> None:
    gc.disable()  # for the imports: Recipe.setup turns it back on (lorasp_dist/engine/train.py)
    import ray.train

    from launcher.logs import TeeOutput
    from lorasp_dist.config import validate
    from lorasp_dist.engine import checkpoint as ckpt
    from lorasp_dist.engine.train import NonFiniteLoss, train

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
        if ckpt.list_checkpoints(run_dir):  # a restart, or --resume: this run's own checkpoints come first
            cfg.train.resume = "auto"
        print(f"[lorasp] rank {rank} pid {os.getpid()} on {os.uname().nodename}; resume: {cfg.train.resume}",
              flush=True)
        try:
            train(cfg, claim=False)
        except NonFiniteLoss:
            return  # a deliberate stop, not a crash for Ray to retry: the driver finds RUN_DIR/nonfinite.json
