"""Find or start a Ray cluster, and check up front that a run can be placed on it.

Every check fails with a one-line ConfigError (exit 2) in seconds. Without them Ray would wait: for an unreachable
address its client retries forever, and a placement group that can never be satisfied stays pending forever.

Safety defaults for a Ray instance we start ourselves (laptop / single node):
- every Ray service listens on 127.0.0.1 only and asks for a token that only this launch holds (launcher/local_ray.py);
- the dashboard binds to `launcher.dashboard_host` (127.0.0.1) and no Ray client server is started;
- Ray's memory monitor is off (`launcher.memory_monitor=false`): it kills the worker using the most memory once the
  host passes 95%, and a ZeRO-3 rank with CPU offload legitimately holds tens of GB of host RAM (optimizer states,
  pinned buffers), so it would be killed, restarted, and killed again;
- the object store is small (`launcher.object_store_memory`, 256 MiB): by default Ray sets aside 30% of host RAM for
  it, memory the offloading ranks need, while the ranks read the model from disk and pass nothing large through it.
On an existing cluster these are the cluster's own settings, fixed when it starts: run `ray start` with
`RAY_memory_monitor_refresh_ms=0` in its environment and with `--object-store-memory`.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

import ray

from launcher.local_ray import LOCAL_OBJECT_STORE_BYTES
from lorasp_dist.config import ConfigError, RunConfig, is_secret
from lorasp_dist.ports import free_loopback_port

CONNECT_TIMEOUT_S = 20  # Ray's client retries an unreachable or wrong cluster forever; bad input must end fast
STORAGE_CHECK_TIMEOUT_S = 15
# JIT-built DeepSpeed ops are cached, CPU is explicit, the user's allocator settings win over ours
PASSTHROUGH_ENV = ("TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "PYTORCH_CUDA_ALLOC_CONF")


def worker_env(cfg: RunConfig) -> dict[str, str]:
    """Every rank's environment additions: the config's `env` section (NVLink multicast off, offline hubs, ...)
    and the allocator settings (RunConfig.rank_env).
    They go in through the job's runtime_env, so a worker has them from its start: Ray Train builds the process group
    (NCCL reads NCCL_NVLS_ENABLE) before the train function, and so before the engine could set them. Secret-looking
    keys are left out (Ray keeps and shows a runtime_env): the engine sets those from the config it is handed."""
    env = {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}
    return {**env, **{k: v for k, v in cfg.rank_env().items() if not is_secret(k)}}


def connect(cfg: RunConfig, release: Callable[[], None] = lambda: None) -> None:
    """Start a local Ray instance (no address) or join the cluster at `launcher.address` (auto or HOST:PORT).
    `release`: what the caller holds (the run directory's lock), let go of if no cluster answers in time, since that
    ends the process at once."""
    lc = cfg.launcher
    runtime_env = {"env_vars": worker_env(cfg)}
    if lc.address is None:
        if not lc.memory_monitor:
            os.environ["RAY_memory_monitor_refresh_ms"] = "0"  # read by the raylet we are about to start
        # The raylet starts a worker per CPU for the first driver, in the job's runtime_env. Every process of a launch
        # is an actor of Ray Train's, in a runtime_env of its own, so those would import Ray and never run anything.
        os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
        # Ray's state API, which Ray Train's PlacementGroupCleaner polls from inside the instance, finds its cluster
        # by RAY_ADDRESS, else by looking for GCS processes on the host: with a second Ray instance there (a user's
        # own `ray start`) it finds two and fails. So the GCS gets a port chosen here, and the job's processes its
        # address; "local" starts a new instance even when the shell sets RAY_ADDRESS.
        port = free_loopback_port()
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by the GCS we are about to start
        runtime_env["env_vars"]["RAY_ADDRESS"] = f"127.0.0.1:{port}"  # loopback: launcher/local_ray.py
        ray.init(
            address="local",
            object_store_memory=lc.object_store_memory or LOCAL_OBJECT_STORE_BYTES,
            dashboard_host=lc.dashboard_host,
            runtime_env=runtime_env,
            log_to_driver=True,
        )
        return
    if lc.address != "auto":
        host, port = _split_address(lc.address)
        try:
            socket.create_connection((host, port), timeout=5).close()
        except OSError as e:
            raise ConfigError(
                f"launcher.address = '{lc.address}': no Ray cluster answers there ({e.strerror or e}); start one "
                "with `ray start --head --port PORT`, or leave the address out to start a local instance"
            ) from None
        # As for a local instance: the PlacementGroupCleaner finds this cluster by its address, not by looking for
        # GCS processes on the host, where other clusters may run (SLURM jobs sharing a node): with two it prints
        # "Found multiple active Ray instances" to the console and picks the newest.
        runtime_env["env_vars"]["RAY_ADDRESS"] = lc.address
    # Ray sends its token (~/.ray/auth_token or RAY_AUTH_TOKEN) to an explicit address only with RAY_AUTH_MODE=token,
    # so that it never leaks to a wrong address; without it, a token-protected cluster answers "unauthenticated"
    # and Ray's client retries forever.
    hint = "" if os.environ.get("RAY_AUTH_MODE") == "token" else ", or token authentication: export RAY_AUTH_MODE=token"
    # Only the GCS's answer is bounded: ray.init sets its node once the GCS has answered (it logs "Connected to Ray
    # cluster"); registering this driver after that may take longer than the bound on a busy node, and ends.
    with _deadline(CONNECT_TIMEOUT_S, f"launcher.address = '{lc.address}': no answer from a Ray cluster within "
                   f"{CONNECT_TIMEOUT_S} s (a port that is not Ray's GCS, a token that does not match{hint})",
                   # getattr: should a Ray release rename this private field, the bound stays as it was
                   answered=lambda: getattr(ray._private.worker, "_global_node", None) is not None,
                   release=release):
        try:
            ray.init(address=lc.address, runtime_env=runtime_env, log_to_driver=True)
        except ConnectionError as e:
            raise ConfigError(f"launcher.address = '{lc.address}': {e}") from None


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"launcher.address = '{address}': expected auto or HOST:PORT, e.g. 10.0.0.1:6379")
    return host.strip("[]"), int(port)


class _deadline:
    """Ends the process with exit 2 and `message` if the block runs past `seconds` while `answered()` is false.
    ray.init blocks in C++, where neither an exception nor a Python signal handler reaches it, so a watchdog thread
    is the only bound there is."""

    def __init__(self, seconds: float, message: str, answered: Callable[[], bool],
                 release: Callable[[], None] = lambda: None):
        self.seconds, self.message, self.answered, self.release = seconds, message, answered, release
        self._done = threading.Event()

    def _watch(self) -> None:
        if not self._done.wait(self.seconds) and not self.answered():
            os.write(2, f"error: {self.message}\n".encode())
            self.release()  # os._exit skips every `with` and `finally`: a lock would stay behind
            os._exit(2)

    def __enter__(self) -> None:
        threading.Thread(target=self._watch, name="connect-deadline", daemon=True).start()

    def __exit__(self, *exc) -> None:
        self._done.set()


# --- placement checks --------------------------------------------------------------------------------------------

def worker_resources(cfg: RunConfig) -> dict[str, float]:
    lc = cfg.launcher
    return {"CPU": lc.cpus_per_worker, **({"GPU": lc.gpus_per_worker} if lc.gpus_per_worker else {})}


def check_resources(cfg: RunConfig) -> None:
    """The cluster's totals must hold num_workers x resources per worker; otherwise Ray would wait forever."""
    lc, have = cfg.launcher, ray.cluster_resources()
    for kind, each in worker_resources(cfg).items():
        need, total = lc.num_workers * each, have.get(kind, 0.0)
        if need > total:
            field = "gpus_per_worker" if kind == "GPU" else "cpus_per_worker"
            raise ConfigError(
                f"launcher.num_workers = {lc.num_workers}: needs {need:g} {kind} ({lc.num_workers} workers x "
                f"{each:g} launcher.{field}), the cluster has {total:g}; lower launcher.num_workers or "
                f"launcher.{field}, or add nodes"
            )


@ray.remote(num_cpus=0)
def _gpu_bytes() -> int:
    import torch

    return torch.cuda.get_device_properties(0).total_memory


def gpu_memory(cfg: RunConfig) -> int | None:
    """The memory plan's budget per rank: `memory.gpu_mem`, else a rank's share of a GPU of the cluster, read there
    (None for CPU workers, or when no GPU answers in time: the plan then checks host memory only)."""
    lc = cfg.launcher
    if cfg.memory.gpu_mem is not None or not lc.gpus_per_worker:
        return cfg.memory.gpu_mem
    ref = _gpu_bytes.options(num_gpus=min(lc.gpus_per_worker, 1)).remote()
    done, _ = ray.wait([ref], timeout=STORAGE_CHECK_TIMEOUT_S * 2)
    if not done:
        ray.cancel(ref, force=True)
        return None
    return int(ray.get(done[0]) * min(lc.gpus_per_worker, 1))  # ranks sharing a GPU share its memory


@ray.remote(num_cpus=0)
def _sees(path: str) -> bool:
    return os.path.exists(path)


def check_shared_storage(storage: Path) -> None:
    """With more than one node, every node must see `storage` (checkpoints, logs, the run directory): the driver
    writes a marker file there and a zero-CPU task pinned to each node looks for it. One node: nothing to check."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    if len(nodes) < 2:
        return
    storage.mkdir(parents=True, exist_ok=True)
    marker = storage / f".lorasp-shared-{uuid.uuid4().hex}"
    marker.write_text("")
    try:
        refs = {
            _sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(str(marker)): ip
            for node, ip in nodes.items()
        }
        done, _ = ray.wait(list(refs), num_returns=len(refs), timeout=STORAGE_CHECK_TIMEOUT_S)
        blind = sorted({refs[r] for r in refs if r not in done or not ray.get(r)})
    finally:
        marker.unlink(missing_ok=True)
    if blind:
        raise ConfigError(
            f"launcher.storage_path = '{storage}': not shared by the {len(nodes)} nodes of this cluster (nodes "
            f"{', '.join(blind)} do not see it); checkpoints and logs must be on a filesystem every node mounts "
            "(NFS, Lustre, ...): set launcher.storage_path to one"
        )
