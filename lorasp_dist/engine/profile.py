"""`train.profile_steps: [K]`: torch.profiler over steps K and K+1 (as logged, from 1), written as a table.

`RUN_DIR/profile/rank{r}_steps{K}-{K+1}.md`: where the time of two steps went on this rank. First the totals that
say whether a step is host-bound or device-bound (host self-CPU time against device kernel time, kernel launches,
host waits on the device, collectives), then the top operators by self time. No trace file: a 65B step's trace
is hundreds of MB, and the table answers the question the speed work asks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

PROFILE_STEPS = 2
TOP = 40
HOST_WAITS = ("cudaEventSynchronize", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaStreamWaitEvent")
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


class StepProfiler:
    def __init__(self, run_dir: Path, rank: int, steps: list[int], cuda: bool):
        self.dir, self.rank, self.cuda = Path(run_dir) / "profile", rank, cuda
        self.pending = sorted(steps)
        self.active: profile | None = None
        self.first = 0

    def tick(self, done: int) -> None:
        """Before each step, with the number of steps done: start before step K, write once K+1 is done."""
        if self.active is not None and done >= self.first + PROFILE_STEPS - 1:
            self._write()
        while self.pending and self.pending[0] <= done:  # a resumed run is past it
            self.pending.pop(0)
        if self.active is None and self.pending and self.pending[0] == done + 1:
            self.first = self.pending.pop(0)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.active = profile(activities=activities)
            self.active.__enter__()

    def close(self) -> None:
        if self.active is not None:
            self._write()

    def _write(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.active.__exit__(None, None, None)
        events = self.active.key_averages()
        self.active = None
        device_key = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        host_us = sum(e.self_cpu_time_total for e in events)
        device_us = sum(getattr(e, "self_device_time_total", 0) for e in events if e.device_type.name != "CPU")

        def count(names):
            picked = [e for e in events if e.key in names]
            return sum(e.count for e in picked), sum(e.self_cpu_time_total for e in picked)

        launches, _ = count(LAUNCHES)
        waits, wait_us = count(HOST_WAITS)
        collectives = [e for e in events if "nccl" in e.key.lower() or "c10d::" in e.key or "gloo" in e.key.lower()]
        k = self.first
        lines = [
            f"# Profile: rank {self.rank}, steps {k}-{k + PROFILE_STEPS - 1}", "",
            "| total | value |", "|---|---:|",
            f"| host self-CPU time | {host_us / 1e6:.3f} s |",
            f"| device kernel time | {device_us / 1e6:.3f} s |" if self.cuda else "| device kernel time | n/a (CPU) |",
            f"| kernel launches | {launches} |",
            f"| host waits on the device ({', '.join(HOST_WAITS)}) | {waits} calls, {wait_us / 1e3:.1f} ms |",
            f"| collective calls (NCCL/gloo/c10d) | {sum(e.count for e in collectives)} |",
            "", f"Top {TOP} operators by self {'device' if self.cuda else 'CPU'} time:", "", "```",
            events.table(sort_by=device_key, row_limit=TOP, max_name_column_width=70),
            "```", "", f"Top {TOP} operators by self CPU time:", "", "```",
            events.table(sort_by="self_cpu_time_total", row_limit=TOP, max_name_column_width=70), "```",
        ]
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / f"rank{self.rank}_steps{k}-{k + PROFILE_STEPS - 1}.md").write_text("\n".join(lines) + "\n")
