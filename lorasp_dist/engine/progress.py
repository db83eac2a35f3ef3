"""Training progress for people, on rank 0: a line every `train.log_every` steps (and at the last step) with a
timestamp, step/total, loss, tokens/s, ETA and memory, in every log a user reads (a terminal, `RUN_DIR/logs/rank0.log`
under `lorasp launch`, a SLURM job's output). On a terminal a rich bar stays below the lines; elsewhere (a pipe, a
file) plain lines only, since a redrawn bar there would show up once, at the end.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta

import psutil
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

GIB = 2**30


def memory_text(device: torch.device) -> str:
    """GPU memory (the peak PyTorch has reserved on this rank's GPU), or host RSS on a CPU run."""
    if device.type == "cuda":
        return f"gpu_mem {torch.cuda.max_memory_reserved(device) / GIB:.1f} GiB"
    return f"host_rss {psutil.Process().memory_info().rss / GIB:.1f} GiB"


def progress_line(step: int, total: int, metrics: dict, eta_s: float, memory: str) -> str:
    parts = [f"[lorasp] {time.strftime('%Y-%m-%d %H:%M:%S')} step {step}/{total}", f"loss {metrics['loss']:.4f}"]
    if "eval_loss" in metrics:
        parts.append(f"eval_loss {metrics['eval_loss']:.4f}")
    speed = f"{metrics['tokens_per_s']:.0f} tok/s"
    if "scored_tokens_per_s" in metrics:  # the supervised ones: a few a row for short answers
        speed += f" ({metrics['scored_tokens_per_s']:.0f} scored)"
    parts += [f"lr {metrics['lr']:.2e}", speed,
              f"eta {timedelta(seconds=round(eta_s))}", memory]
    return "  ".join(parts)


class TrainingProgress:
    """`with TrainingProgress(...) as progress:` then `progress.update(step, metrics)` after every optimizer step.
    The ETA is the mean step time of this process (a resumed run counts from where it resumed) times the steps left."""

    def __init__(self, total: int, start: int, every: int, device: torch.device, enabled: bool):
        self.total, self.start, self.every, self.device, self.enabled = total, start, every, device, enabled
        self.bar = None
        if enabled and sys.stdout.isatty():
            self.bar = Progress(TextColumn("[bold]step {task.completed}/{task.total}"), BarColumn(),
                                TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total, completed=start)
        self.t0 = time.perf_counter()

    def __enter__(self) -> TrainingProgress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def update(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(self.task, completed=step)
        if step % self.every and step != self.total:
            return
        per_step = (time.perf_counter() - self.t0) / max(1, step - self.start)
        line = progress_line(step, self.total, metrics, per_step * (self.total - step), memory_text(self.device))
        if self.bar is not None:
            self.bar.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            print(line, flush=True)
