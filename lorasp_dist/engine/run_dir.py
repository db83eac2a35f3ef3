"""A run directory belongs to one run at a time: `RUN_DIR/run.lock`, created with O_EXCL, held for the life of the run.

The lock file says who holds it (host, pid, SLURM job, since when), so a refusal can say whether that run is alive.
A lock whose pid no longer runs on this host is stale (the run was killed): it is reported, never taken silently.
The one exception is SLURM: a requeued job starts again as the same job id, and the lock left by its earlier start
(killed with its node, or by the time limit) is taken over, since SLURM runs one start of a job at a time.

`lorasp train` claims its run directory itself; `lorasp launch` claims it in the driver, before any worker starts,
and holds it across the restarts of the worker group.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from pathlib import Path

from lorasp_dist.config import ConfigError, RunConfig

LOCK_FILE = "run.lock"


def unique_run_name(cfg: RunConfig) -> str:
    """`YYYYmmdd-HHMMSS-<model>-<6 hex>`: unique even for runs started in the same second (torchrun or `launch`)."""
    model = re.sub(r"[^A-Za-z0-9._-]", "-", cfg.model.preset or Path(cfg.model.path).name)
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{model}-{uuid.uuid4().hex[:6]}"


def is_run(path: Path) -> bool:
    """A directory that lorasp made for a run (and so may be continued)."""
    return any((path / name).exists() for name in ("config.yaml", "checkpoints", LOCK_FILE))


def check_new_or_continued(run_dir: Path, resume: str) -> None:
    """`lorasp train`: a run directory that holds files is only continued, with train.resume=auto, and only if it is
    a run's; an explicit checkpoint (train.resume=PATH) or `never` starts a new run, in a new directory."""
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return
    if resume != "auto":
        raise ConfigError(
            f"train.run_name = '{run_dir.name}': {run_dir} exists; continue that run with train.resume=auto, or "
            "choose another name (leave train.run_name unset for a unique one)"
        )
    if not is_run(run_dir):
        raise ConfigError(
            f"train.run_name = '{run_dir.name}': {run_dir} exists and is not a run directory (no config.yaml or "
            "checkpoints/ in it); choose another name"
        )


class RunLock:
    """`with RunLock(run_dir):` the run directory is ours until the block ends, or a ConfigError says whose it is."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
                       "slurm_restart": _restarts(os.environ.get("SLURM_RESTART_COUNT")),
                       "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": uuid.uuid4().hex}

    def __enter__(self) -> RunLock:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(self.path)
            if not self._requeued_from(holder):
                raise ConfigError(_refusal(self.path, holder)) from None
            tmp = self.path.with_name(f".{LOCK_FILE}.{self.record['token']}")
            tmp.write_text(json.dumps(self.record))
            os.replace(tmp, self.path)
            print(f"[lorasp] took over {self.path} from an earlier start of SLURM job {holder['slurm_job']}",
                  flush=True)
            return self
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(self.record))
            f.flush()
            os.fsync(f.fileno())
        return self

    def __exit__(self, *exc) -> None:
        if _read(self.path).get("token") == self.record["token"]:  # still ours (nobody removed and retook it)
            self.path.unlink(missing_ok=True)

    def _requeued_from(self, holder: dict) -> bool:
        """The holder is an earlier start of this SLURM job: on this host and gone, or on another host and of an
        earlier restart (SLURM counts them). A live run elsewhere in the same allocation keeps its lock."""
        job = self.record["slurm_job"]
        if job is None or holder.get("slurm_job") != job:
            return False
        if holder.get("host") == self.record["host"]:
            return not _alive(holder.get("pid"))
        return _restarts(holder.get("slurm_restart")) < self.record["slurm_restart"]


def _restarts(value) -> int:
    """SLURM_RESTART_COUNT as a number: 0 for a first start, or a lock written before the count was kept."""
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _read(path: Path) -> dict:
    """The lock's record; {} when it is gone or still being written."""
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _refusal(path: Path, holder: dict) -> str:
    run_dir, host, pid = path.parent, holder.get("host"), holder.get("pid")
    field = f"train.run_name = '{run_dir.name}'"
    if not holder:
        return f"{field}: {run_dir} is in use by another run (its lock {path} is being written); choose another name"
    who = f"pid {pid} on {host}" + (f" (SLURM job {holder['slurm_job']})" if holder.get("slurm_job") else "")
    if host == socket.gethostname() and not _alive(pid):
        return (f"{field}: {run_dir} has a stale lock: {who}, which took it at {holder.get('since')}, is no longer "
                f"running (that run was killed). If no other run uses {run_dir}, remove {path} and run again")
    return (f"{field}: {run_dir} is in use by {who} since {holder.get('since')}; two runs in one directory would "
            f"overwrite each other: wait for that run to end, or choose another name. A lock left by a run that is "
            f"gone can be removed: {path}")
