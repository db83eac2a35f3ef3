"""A real single-node SLURM cluster in a temp dir, for tests: munged, slurmctld and slurmd as child processes.

Everything (key, sockets, state, spool, logs) lives under one directory and the ports come from a free-port
search, so a leftover cluster or a second test session never collides with this one. Every SLURM command
must see `SLURM_CONF` (see `env`); the daemons are stopped by PID.

By hand:  python tests/slurm_cluster.py   (prints an `export SLURM_CONF=...` line, Ctrl-C stops it)
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from ports import free_ports

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "sinfo")


def missing_binaries() -> list[str]:
    return [b for b in DAEMONS if shutil.which(b) is None and not Path("/usr/sbin", b).exists()]


def _bin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class SlurmCluster:
    """`with SlurmCluster() as c: subprocess.run(["sbatch", ...], env=c.env)`."""

    def __init__(self, root: Path | None = None, cpus: int | None = None):
        """`cpus`: the CPUs the node offers SLURM, the host's by default; more oversubscribes the host, so that more
        jobs run at once (SlurmdParameters=config_overrides)."""
        # Short path: munge and Ray sockets live below it and unix socket paths are limited to 107 bytes.
        self.root = Path(root or tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
        self.cpus = cpus or os.cpu_count() or 1
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []

    # --- bring-up ------------------------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> SlurmCluster:
        for sub in ("state", "spool", "log", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        subprocess.run([_bin("mungekey"), "--create", "--force", f"--keyfile={key}"], check=True, capture_output=True)
        os.chmod(key, 0o400)  # munged refuses a key anyone else can read
        self.munge_socket = self.root / "munge" / "munge.sock"
        self._spawn("munged", [
            _bin("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
            f"--pid-file={self.root / 'munge' / 'munged.pid'}", f"--log-file={self.root / 'log' / 'munged.log'}",
            f"--seed-file={self.root / 'munge' / 'munged.seed'}",
        ])
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged did not create its socket")
        self.conf.write_text(self._slurm_conf())
        self._spawn("slurmctld", [_bin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_bin("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
        self._wait(self._node_idle, timeout, "the node did not come up idle in sinfo")
        return self

    def _slurm_conf(self) -> str:
        ctld_port, slurmd_port = free_ports(2)
        r = self.root
        return f"""\
ClusterName=lorasptest
# Job ids (and with them Ray's per-job temp dirs and ports) differ from those of another test cluster on this host.
FirstJobId={random.randrange(1000, 1_000_000)}
SlurmctldHost={self.node}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire+1 s before it may start again (120 s by default): keep tests quick.
AuthInfo=socket={self.munge_socket},cred_expire=10
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
# No cgroups in a sandbox; no accounting daemon (sacct does not work: status falls back to squeue/scontrol).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# The node is what this file says, even with more CPUs than the host has (cpus=...): it is not drained for it.
SlurmdParameters=config_overrides
JobRequeue=1
# Ended jobs are kept a day (SLURM 22.05 takes 2 s as its least): a session reads jobs that ended minutes before.
MinJobAge=86400
# SLURM's default: a cancelled job's ranks checkpoint between its SIGTERM and its SIGKILL.
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=30
GresTypes=gpu
NodeName={self.node} CPUs={self.cpus} RealMemory=1024 State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
PartitionName=cpuonly Nodes={self.node} MaxTime=INFINITE State=UP
"""

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env))
        log.close()

    def _node_idle(self) -> bool:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited with {p.returncode}; logs in {self.root / 'log'}")
        out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False).stdout
        return "idle" in out

    @staticmethod
    def _wait(ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} within {timeout:.0f}s")
            time.sleep(0.5)

    # --- use -----------------------------------------------------------------------------------------------------
    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def job_field(self, job_id: str, field: str) -> str | None:
        """A field of `scontrol show job` (JobState, Restarts, ExitCode, ...), or None once the job is forgotten."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        for item in out.split():
            key, _, value = item.partition("=")
            if key == field:
                return value
        return None

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is {state}, not {sorted(states)}, after {timeout:.0f}s")
            time.sleep(1)

    # --- teardown ------------------------------------------------------------------------------------------------
    def stop(self) -> None:
        if self.procs and self.procs[-1].poll() is None:  # cancel what is still queued or running, let it exit
            self.run("scancel", "--full", "--user", str(os.getuid()), check=False)
            deadline = time.monotonic() + 60
            while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(1)
        for p in reversed(self.procs):  # slurmd, slurmctld, munged: by PID, never by name
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()

    def __enter__(self) -> SlurmCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # a background job ignores SIGINT: `kill PID` stops it cleanly too
    with SlurmCluster() as cluster:
        print(f"export SLURM_CONF={cluster.conf}", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
