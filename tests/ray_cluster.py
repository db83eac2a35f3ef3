"""Ray for tests: a private environment per Ray session, and a second cluster started by `ray start`, as SLURM starts
one.

Every Ray process a test starts gets its own RAY_TMPDIR; teardown stops exactly the processes that carry it (by PID),
so other Ray sessions on the machine are never touched.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ports import free_ports

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def wait_for(predicate, what: str, proc: subprocess.Popen | None = None, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc is None or proc.poll() is None, f"the launcher exited ({proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def ray_pids(root: str) -> list[int]:
    """Processes of the Ray sessions under `root` (a test's RAY_TMPDIR): those started with it in their environment,
    and those holding a file below it (Ray's processes retitle themselves, which can overwrite /proc/PID/environ,
    but each keeps its session's log files open)."""
    marker = f"RAY_TMPDIR={root}".encode()
    return [int(proc.name) for proc in Path("/proc").iterdir()
            if proc.name.isdigit() and int(proc.name) != os.getpid() and _holds(proc, marker, root + "/")]


def _holds(proc: Path, marker: bytes, prefix: str) -> bool:
    try:
        if marker in (proc / "environ").read_bytes().split(b"\0"):
            return True
        fds = list((proc / "fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd).startswith(prefix):
                return True
        except OSError:
            pass
    return False


def stop_pids(pids: list[int], timeout: float = 10) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() and _alive(p) for p in pids):
            time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


class RayEnv:
    """`with RayEnv() as env:` the environment for one Ray session's processes, a private RAY_TMPDIR (short: Ray's
    unix sockets live there); on leaving, every process that carries it is stopped."""

    def __enter__(self) -> dict:
        self.root = tempfile.mkdtemp(prefix="lr-", dir="/tmp")
        # RAY_AUTH_MODE=token: Ray sends its token to an explicit --address only when told to (the SLURM job does too).
        # The token is this session's own, as slurm/lorasp.sbatch makes one: a fresh machine has no ~/.ray/auth_token.
        env = {**os.environ, "RAY_TMPDIR": self.root, "RAY_AUTH_MODE": "token", "PYTHONUNBUFFERED": "1",
               "RAY_AUTH_TOKEN": os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32),
               # Ray Train's controller polls its workers every 2 s: each start, end and restart of a launch waits
               # for a poll. The driver passes this on to the controller.
               "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
        env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
        env.setdefault("DS_ACCELERATOR", "cpu")
        return env

    def __exit__(self, *exc) -> None:
        for _ in range(2):  # twice: a dying raylet may have started a worker meanwhile
            stop_pids(ray_pids(self.root), timeout=3)  # what is left at the end needs no grace: SIGKILL it soon
        shutil.rmtree(self.root, ignore_errors=True)


class RayHead:
    """`ray start --head --block` on loopback as a child process, stopped by PID."""

    def __init__(self, env: dict, cpus: int = 2):
        self.port, client, agent, dashboard = free_ports(4)
        self.address = f"127.0.0.1:{self.port}"
        log = Path(env["RAY_TMPDIR"]) / f"head-{self.port}.log"
        self.log = open(log, "w")
        self.proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", "--port", str(self.port), "--node-ip-address", "127.0.0.1",
             # the dashboard serves the state API that Ray Train's PlacementGroupCleaner polls
             "--num-cpus", str(cpus), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
             "--ray-client-server-port", str(client),
             "--dashboard-agent-listen-port", str(agent), "--disable-usage-stats",
             "--object-store-memory", str(256 * 2**20)],
            # no drain on stopping (as slurm/lorasp.sbatch): with one, after a launch had run on it, the head
            # outlived stop()'s 10 s grace and the session's cluster took 13 s to stop instead of 2
            env={**env, "RAY_memory_monitor_refresh_ms": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"},
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        # printed once the GCS and this node's raylet are up, so the cluster's resources are known
        wait_for(lambda: "Ray runtime started" in log.read_text(), "the Ray head to start", self.proc, timeout=120)

    def stop(self) -> None:
        stop_pids([self.proc.pid])
        self.proc.wait(timeout=10)
        self.log.close()
