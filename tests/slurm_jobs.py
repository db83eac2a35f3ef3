"""The SLURM jobs that tests/test_slurm.py reads, and what submits and signals them.

Three jobs are queued together, start 20 s apart and share the node (1 CPU each, 2 workers of half a CPU, on a
node that offers SLURM more CPUs than the host has), so their Ray clusters must keep apart: per-job temp dirs and
ports. One gets USR1 mid-run, checkpoints, requeues itself, resumes in the same run directory and runs to the end;
one is cancelled mid-run; one's loss goes NaN, and its first Ray head start fails.

They take minutes: conftest.py submits them when the session's first slow test on Ray starts, so that they run beside
the Ray launches, which leave part of the 2 CPUs idle; their tests, which run last, mostly find them done.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from slurm_cluster import SlurmCluster
from test_nonfinite import EXPLODE

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.yaml"
HALF_CPU = ("launcher.cpus_per_worker=0.5",)  # 2 workers in 1 CPU: the three jobs fit the node together
# What the node offers SLURM, more than a 2-core host has: the three jobs and test_slurm.py's own run at once.
NODE_CPUS = 4
PREEMPT_STEPS, SAVE_EVERY = 20, 5  # the stopped jobs: their signal comes after 3 steps
PREEMPT = (f"train.max_steps={PREEMPT_STEPS}", f"train.save_every={SAVE_EVERY}", "train.eval_every=0")
JOB_TIMEOUT_S = 420
# A `ray` whose first `ray start --head` is killed once it has started the head's GCS, as Ray ends a head that misses
# its 30 s to register (hard-coded in Ray 2.60; a busy node can miss it): the batch script must start the cluster again.
RAY_HEAD_FAILS_ONCE = """#!/bin/bash
if [ "$1 $2" = "start --head" ] && mkdir "{marker}" 2>/dev/null; then
  for arg; do case $arg in --temp-dir=*) tmp=${{arg#*=}} ;; esac; done
  "{ray}" "$@" & pid=$!
  until [ -e "$tmp/session_latest/logs/gcs_server.out" ] || ! kill -0 $pid 2>/dev/null; do sleep 0.2; done
  kill -KILL $pid; wait $pid
  exit 1
fi
exec "{ray}" "$@"
"""
STAGGER_S = 20  # between the jobs' starts (SchedulerParameters=sched_interval=2: a job starts on time)
SIGNAL_WITHIN_S = 1200  # from the jobs' submission: they run beside the other slow tests


def lorasp(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorasp_dist", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def submitted(proc: subprocess.CompletedProcess) -> tuple[str, Path]:
    assert proc.returncode == 0, proc.stderr
    job = re.search(r"submitted job (\d+)", proc.stdout)[1]
    run_dir = Path(re.search(r"run dir: (\S+)", proc.stdout)[1])
    return job, run_dir


def steps_logged(run_dir: Path) -> list[int]:
    path = run_dir / "metrics" / "rank0.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def submit_job(cluster: SlurmCluster, output_dir: Path, *overrides: str, env: dict | None = None) -> tuple[str, Path]:
    return submitted(lorasp("slurm", "submit", str(TINY), f"train.output_dir={output_dir}", *HALF_CPU, *overrides,
                            env={**cluster.env, **(env or {})}))


def ray_head_fails_once(where: Path) -> dict:
    """The settings for a job whose first Ray head start fails (RAY_HEAD_FAILS_ONCE, written into `where`)."""
    ray = where / "ray"
    ray.write_text(RAY_HEAD_FAILS_ONCE.format(ray=Path(sys.executable).with_name("ray"), marker=where / "failed"))
    ray.chmod(0o755)
    return {"RAY": str(ray)}


def submit_jobs(cluster: SlurmCluster, out_dir) -> tuple[dict, dict]:
    """({name: (job, run_dir)}, {name: SignalMidRun}); `out_dir(name)` is a train.output_dir for the job."""

    # the preempted job first: it runs twice, the longest of them, and then to the end (test_job_runs_to_completion).
    # The others start STAGGER_S apart: each starts its own Ray head, and three at once, beside the session's first
    # launches, took up to 42 s to come up on 2 cores, where Ray gives a starting node 30 s to register.
    nan_dir = out_dir("nan")
    queued = {"preempted": submit_job(cluster, out_dir("preempted"), *PREEMPT),
              "cancelled": submit_job(cluster, out_dir("cancelled"), *PREEMPT, f"--sbatch=--begin=now+{STAGGER_S}"),
              "nan": submit_job(cluster, nan_dir, *EXPLODE, f"--sbatch=--begin=now+{2 * STAGGER_S}",
                                env=ray_head_fails_once(nan_dir))}
    signals = {"preempted": SignalMidRun(cluster, *queued["preempted"], "--signal=USR1", "--batch"),
               "cancelled": SignalMidRun(cluster, *queued["cancelled"])}
    return queued, signals


class SignalMidRun(threading.Thread):
    """`scancel [OPTIONS] JOB` once the job's run has logged 3 steps: mid-run, training under way and far from its 20
    steps. `check()` waits for it and raises what went wrong, if anything."""

    def __init__(self, cluster: SlurmCluster, job: str, run_dir: Path, *options: str):
        super().__init__(daemon=True)
        self.cluster, self.job, self.run_dir, self.options = cluster, job, run_dir, options
        self.failure: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            deadline = time.monotonic() + SIGNAL_WITHIN_S
            while len(steps_logged(self.run_dir)) < 3:
                state = self.cluster.job_field(self.job, "JobState")
                assert state in ("PENDING", "RUNNING"), state
                assert time.monotonic() < deadline, "no training steps logged"
                time.sleep(0.5)
            self.cluster.run("scancel", *self.options, self.job)
        except BaseException as e:  # handed to the test
            self.failure = e

    def check(self) -> None:
        self.join(SIGNAL_WITHIN_S)
        assert not self.is_alive(), f"job {self.job}: still waiting for its third step"
        if self.failure is not None:
            raise self.failure
