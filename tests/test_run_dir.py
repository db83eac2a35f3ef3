"""One run per run directory: the O_EXCL lock file, what a refusal says, and which existing directories a run takes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from lorasp_dist.config import ConfigError
from lorasp_dist.engine.run_dir import LOCK_FILE, RunLock, check_new_or_continued


def dead_pid() -> int:
    """The pid of a process of ours that has exited (and been reaped): certainly not running."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def plant_lock(run_dir, **record) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps({"since": "2026-11-30T10:00:00+0000", **record}))


def test_lock_is_exclusive_and_names_its_holder(tmp_path):
    with RunLock(tmp_path):
        record = json.loads((tmp_path / LOCK_FILE).read_text())
        assert (record["host"], record["pid"]) == (socket.gethostname(), os.getpid())
        with pytest.raises(ConfigError, match=rf"is in use by pid {os.getpid()} on {socket.gethostname()} since "):
            RunLock(tmp_path).__enter__()
    assert not (tmp_path / LOCK_FILE).exists()  # released at the end of the run


def test_stale_lock_is_reported_not_taken(tmp_path):
    pid = dead_pid()
    plant_lock(tmp_path, host=socket.gethostname(), pid=pid)
    with pytest.raises(ConfigError) as e:
        RunLock(tmp_path).__enter__()
    message = str(e.value)
    assert f"has a stale lock: pid {pid} on {socket.gethostname()}" in message and "is no longer running" in message
    assert f"remove {tmp_path / LOCK_FILE}" in message and len(message.splitlines()) == 1
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == pid  # untouched


def test_release_keeps_a_lock_that_is_not_ours(tmp_path):
    lock = RunLock(tmp_path).__enter__()
    plant_lock(tmp_path, host="elsewhere", pid=1)  # removed by hand and taken by another run meanwhile
    lock.__exit__(None, None, None)
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "elsewhere"


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    plant_lock(tmp_path, host="busy-node", pid=4242, slurm_job="77", slurm_restart=0)  # a live run of the allocation
    with pytest.raises(ConfigError, match=r"is in use by pid 4242 on busy-node \(SLURM job 77\)"):
        RunLock(tmp_path).__enter__()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued: the next start of the job
    plant_lock(tmp_path, host="node-that-died", pid=4242, slurm_job="77")  # the job's earlier start, on another node
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()
    plant_lock(tmp_path, host="node-that-died", pid=4242, slurm_job="76")  # another job's run: refused
    with pytest.raises(ConfigError, match=r"is in use by pid 4242 on node-that-died \(SLURM job 76\)"):
        RunLock(tmp_path).__enter__()
    plant_lock(tmp_path, host=socket.gethostname(), pid=os.getpid(), slurm_job="77")  # same job, alive: refused
    with pytest.raises(ConfigError, match="is in use by pid"):
        RunLock(tmp_path).__enter__()


def test_existing_directories_are_only_continued_as_runs(tmp_path):
    check_new_or_continued(tmp_path / "new", "auto")  # a new directory
    (tmp_path / "empty").mkdir()
    check_new_or_continued(tmp_path / "empty", "never")  # an empty one holds nothing to overwrite
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("not a run\n")
    with pytest.raises(ConfigError, match=r"^train.run_name = 'notes': .* exists and is not a run directory"):
        check_new_or_continued(tmp_path / "notes", "auto")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("{}\n")
    check_new_or_continued(tmp_path / "run", "auto")  # continued: train.resume=auto
    for resume in ("never", str(tmp_path / "elsewhere" / "checkpoints" / "step-000010")):
        with pytest.raises(ConfigError, match=r"exists; continue that run with train.resume=auto"):
            check_new_or_continued(tmp_path / "run", resume)


def test_slurm_status_names_the_run_state(tmp_path):
    """`lorasp slurm status`'s run-dir line: finished, the newest valid checkpoint, or why none is valid."""
    import torch

    from launcher.slurm import run_state
    from lorasp_dist.engine import checkpoint as ckpt

    run = tmp_path / "run"
    assert run_state(run) == "not created yet"
    run.mkdir()
    assert run_state(run) == "no checkpoint yet"
    for step in (10, 20):  # real checkpoints through the engine's own writer
        tmp = ckpt.tmp_dir(run, step)
        tmp.mkdir(parents=True)
        for name in ("lorasp", "rank0"):
            ckpt.save_state_file(tmp / f"{name}.safetensors", {"state": torch.full((4,), float(step))})
        ckpt.seal(tmp, ckpt.step_dir(run, step), {"step": step, "sample_pos": 0, "world_size": 1})
    assert run_state(run) == "newest checkpoint at step 20"
    for step in (10, 20):
        (ckpt.step_dir(run, step) / "rank0.safetensors").write_bytes(b"torn")
    state = run_state(run)
    assert state.startswith("2 checkpoint(s), none valid; newest step-000020: ") and "None" not in state
    (run / "summary.json").write_text("{}")
    assert run_state(run) == "finished"
