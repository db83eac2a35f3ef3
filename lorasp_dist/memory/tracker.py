"""Per-rank memory measurement: peaks per phase, written as one JSON line per phase to `RUN_DIR/memory/rank{r}.jsonl`.

The engine wraps its phases (load, forward, backward, step, checkpoint, eval) in `tracker.phase(name, step)`.
A daemon thread polls host RSS and, on CUDA runs with nvidia-ml-py installed, the NVML used memory of this rank's
GPU (which also sees the CUDA context and NCCL buffers that PyTorch's allocator does not). Entering a phase resets
the peaks, leaving it writes them. On CPU runs every GPU field is null, never 0: absent is not the same as empty.

Cost per phase: two RSS reads, on CUDA one allocator-stats call and two NVML reads, one line write; no device sync
(about 50 µs on CPU, 110 µs on an H100: well under 1% of a step).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch

from lorasp_dist.atomic import drop_torn_line

HISTORY_STEPS = 3  # a snapshot covers steps K, K+1, K+2
HISTORY_MAX_ENTRIES = 100_000  # allocation events kept by the CUDA recorder


class MemoryTracker:
    def __init__(
        self,
        run_dir: str | Path,
        rank: int,
        world_size: int,
        interval_s: float = 0.5,
        record_history_steps: Sequence[int] = (),
        device: str | None = None,
    ):
        self.dir = Path(run_dir) / "memory"
        self.rank, self.world_size, self.interval_s = rank, world_size, interval_s
        # The engine uses CUDA whenever it is available; `device` lets a caller say otherwise.
        self.cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
        self.path = self.dir / f"rank{rank}.jsonl"
        self._history_pending = sorted(set(record_history_steps)) if self.cuda else []
        self._history_from: int | None = None  # K of the snapshot being recorded
        self._proc = psutil.Process()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._file = None
        self._nvml_handle = None
        self._rss_peak = 0
        self._nvml_peak: int | None = None
        self._t0 = time.monotonic()

    # lifecycle -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Write the baseline (RSS before the model is loaded, the zero of every RSS delta), start the sampler."""
        self.dir.mkdir(parents=True, exist_ok=True)
        drop_torn_line(self.path)  # a killed rank's half record: ours would be joined to it
        self._file = open(self.path, "a", buffering=1)  # line-buffered: a killed rank keeps every finished phase
        self._t0 = time.monotonic()
        if self.cuda:
            self._nvml_handle = _nvml_handle(torch.cuda.current_device())
        mem = self._proc.memory_info()
        self._reset_peaks(mem.rss)
        cuda = self._cuda_peaks("current") if self.cuda else None
        self._write("baseline", None, mem, mem.rss, cuda, self._nvml_peak, 0.0)
        self._thread = threading.Thread(target=self._sample, name=f"memory-tracker-rank{self.rank}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the sampler, dump a snapshot still being recorded, close the file. Safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(1.0, 2 * self.interval_s))
            self._thread = None
        if self._history_from is not None:
            self._dump_history()
        if self._file is not None:
            self._file.close()
            self._file = None

    # phases ----------------------------------------------------------------------------------------------------
    @contextmanager
    def phase(self, name: str, step: int | None = None) -> Iterator[None]:
        """Measure the block as one phase. Phases do not nest: entering one resets the peaks."""
        if self._history_pending or self._history_from is not None:
            self._history_tick(step)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        self._reset_peaks(self._rss())
        t_enter = time.monotonic()
        try:
            yield
        finally:
            mem, nvml = self._proc.memory_info(), _nvml_used(self._nvml_handle)
            with self._lock:
                rss_peak, nvml_peak = max(self._rss_peak, mem.rss), _max(self._nvml_peak, nvml)
            cuda = self._cuda_peaks() if self.cuda else None
            self._write(name, step, mem, rss_peak, cuda, nvml_peak, time.monotonic() - t_enter)

    def maybe_record_history(self, step: int) -> None:
        """Between steps, with the number of steps done: records a CUDA allocator history for steps K..K+2.

        Writes `rank{r}_snapshot_steps{K}-{K+2}.pickle`, viewable at https://pytorch.org/memory_viz. No-op on CPU.
        """
        if self._history_pending or self._history_from is not None:
            self._history_tick(step)

    # internals -------------------------------------------------------------------------------------------------
    def _history_tick(self, step: int | None) -> None:
        """`step` is the step about to run (or running): start at K, dump once step K+2 is done."""
        if step is None:
            return
        if self._history_from is not None and step >= self._history_from + HISTORY_STEPS:
            self._dump_history()
        if self._history_from is None and self._history_pending and self._history_pending[0] <= step:
            k = self._history_pending.pop(0)
            if step < k + HISTORY_STEPS:
                torch.cuda.memory._record_memory_history(max_entries=HISTORY_MAX_ENTRIES)
                self._history_from = k

    def _dump_history(self) -> None:
        k = self._history_from
        path = self.dir / f"rank{self.rank}_snapshot_steps{k}-{k + HISTORY_STEPS - 1}.pickle"
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)
        self._history_from = None

    def _rss(self) -> int:
        return self._proc.memory_info().rss

    def _reset_peaks(self, rss: int) -> None:
        nvml = _nvml_used(self._nvml_handle)
        with self._lock:
            self._rss_peak, self._nvml_peak = rss, nvml

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss, nvml = self._rss(), _nvml_used(self._nvml_handle)
            with self._lock:
                self._rss_peak, self._nvml_peak = max(self._rss_peak, rss), _max(self._nvml_peak, nvml)

    @staticmethod
    def _cuda_peaks(which: str = "peak") -> dict:
        # The nested form skips memory_stats()'s flattening of a few hundred keys into a new dict.
        s = torch.cuda.memory_stats_as_nested_dict()
        if not s:  # CUDA not initialised yet: nothing allocated
            return {"allocated": 0, "reserved": 0, "retries": 0, "ooms": 0}
        return {
            "allocated": s["allocated_bytes"]["all"][which],
            "reserved": s["reserved_bytes"]["all"][which],
            "retries": s["num_alloc_retries"],
            "ooms": s["num_ooms"],
        }

    def _write(
        self, phase: str, step: int | None, mem, rss_peak: int, cuda: dict | None, nvml: int | None, dt: float
    ) -> None:
        """`mem`: psutil's memory_info() at the phase's end."""
        if self._file is None:
            raise RuntimeError(f"MemoryTracker(rank={self.rank}): call start() before measuring phases")
        record = {
            "t": round(time.monotonic() - self._t0, 4),  # at the end of the phase
            "dt": round(dt, 6),  # the phase's duration
            "wall": round(time.time(), 4),  # aligns the ranks on one timeline
            "rank": self.rank,
            "world_size": self.world_size,
            "step": step,
            "phase": phase,
            "host_rss_bytes": mem.rss,
            "host_rss_peak_bytes": rss_peak,
            # Of the RSS now, the pages shared with files and other processes (libraries' code, Ray's object store):
            # reclaimable, and on Linux sized by the page cache's state, not by this run (README, "Host RSS").
            "host_rss_shared_bytes": getattr(mem, "shared", None),
            # Null on CPU runs. Retries and OOMs are cumulative since the process started.
            "cuda_allocated_peak_bytes": cuda["allocated"] if cuda else None,
            "cuda_reserved_peak_bytes": cuda["reserved"] if cuda else None,
            "cuda_alloc_retries": cuda["retries"] if cuda else None,
            "cuda_ooms": cuda["ooms"] if cuda else None,
            "nvml_used_peak_bytes": nvml,
        }
        self._file.write(json.dumps(record) + "\n")


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def _nvml_handle(cuda_index: int):
    """The NVML handle of this CUDA device (matched by UUID: NVML ignores CUDA_VISIBLE_DEVICES), or None."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(cuda_index).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except Exception:  # NVML missing from the container, or an unmatched UUID: measure without it
        return None


def _nvml_used(handle) -> int | None:
    """Device-wide used memory: every process on this GPU, context and NCCL included."""
    if handle is None:
        return None
    import pynvml

    return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
