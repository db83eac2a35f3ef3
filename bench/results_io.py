"""Where benchmark numbers go: `bench/results/records.jsonl` (one object per run and system, a stable format read by
tooling) plus a JSON + Markdown summary per device call. Every record carries the command, git revision, device,
versions and date, so a number can always be traced to the run that produced it."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from lorasp_dist.config import RUN_NAME

RESULTS = Path(__file__).resolve().parent / "results"

RECORD_FIELDS = (
    "run_id", "date", "git_rev", "device", "system", "preset", "gpus", "ds_config", "micro_batch", "seq_len", "rank",
    "variant", "tokens_per_s_per_gpu", "mfu", "peak_reserved_gib", "peak_nvml_gib", "host_rss_gib",
    "cluster_total_gb", "load_s", "load_peak_reserved_gib", "predicted_peak_gib", "full_ft_gb",
)


def git_rev() -> str:
    """The checkout's revision; LORASP_GIT_REV wins (a device machine gets a copy of the tree without .git)."""
    if os.environ.get("LORASP_GIT_REV"):
        return os.environ["LORASP_GIT_REV"]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             cwd=RESULTS.parent, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=RESULTS.parent).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown"


def device_name() -> str:
    import torch

    if not torch.cuda.is_available():
        return f"CPU ({platform.processor() or platform.machine()})"
    n = torch.cuda.device_count()
    return f"{n}x {torch.cuda.get_device_name(0)}"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "deepspeed", "bitsandbytes", "transformers", "peft", "ray"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def context(run_id: str) -> dict:
    return {
        "run_id": run_id,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_rev": git_rev(),
        "device": device_name(),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "versions": versions(),
    }


def new_run_id(prefix: str) -> str:
    return f"{prefix}-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}"


def unused_run_id(given: str | None, prefix: str, results: Path) -> str:
    """The id a run's files in `results` are named by: --run-id, checked to be one plain file name under which
    nothing is written yet, or a new one from the time. A result is written once; no run replaces another's."""
    run_id = given or new_run_id(prefix)
    if given is not None and not RUN_NAME.fullmatch(given):  # the rule of a run directory's name
        _refuse(f"--run-id = {given!r}: one name of letters, digits, '.', '_' and '-', not starting with '.'")
    taken = [p for p in (results / f"{run_id}.json", results / f"{run_id}-reports.tar.gz") if p.exists()]
    if taken:
        _refuse(f"--run-id = {run_id!r}: {taken[0]} exists, and results are never replaced; choose another id")
    return run_id


def _refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def append_records(records: list[dict], results: Path = RESULTS) -> Path:
    results.mkdir(parents=True, exist_ok=True)
    path = results / "records.jsonl"
    with open(path, "a") as f:
        for r in records:
            missing = [k for k in RECORD_FIELDS if k not in r]
            if missing:
                raise ValueError(f"record lacks {missing}")
            f.write(json.dumps(r) + "\n")
    return path


def write_summary(name: str, ctx: dict, rows: list[dict], columns: list[str], results: Path = RESULTS,
                  notes: list[str] = ()) -> tuple[Path, Path]:
    """`<name>.json` (context + rows) and `<name>.md` (a table of `columns`)."""
    results.mkdir(parents=True, exist_ok=True)
    js = results / f"{name}.json"
    js.write_text(json.dumps({**ctx, "rows": rows}, indent=2))
    lines = [f"# {name}", "", f"- command: `{ctx['command']}`", f"- git revision: `{ctx['git_rev']}`",
             f"- device: {ctx['device']}", f"- date: {ctx['date']}",
             f"- versions: {', '.join(f'{k} {v}' for k, v in ctx['versions'].items())}", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    md = results / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    return js, md


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def nvml_used() -> int | None:
    """This process's GPU memory in use as NVML sees it (the CUDA context and NCCL buffers too); None without NVML."""
    import torch

    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used
    except Exception:  # no NVML (CPU smoke runs): the field stays null
        return None


def add_baseline_args(p) -> None:
    """The flags every stock-recipe baseline shares, so they run on what bench/compare.py passes."""
    p.add_argument("--base", required=True, help="a pre-quantized checkpoint written by `lorasp prepare-base`")
    p.add_argument("--preset", default=None, help="preset name for the record (default: from the checkpoint)")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rank", type=int, default=16)
