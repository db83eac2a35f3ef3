"""Outputs that appear whole or not at all: directories (checkpoints, adapters, tokenizers, imported models), small
files whose existence means something (summary.json: the run finished), and the lines of append-only logs."""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(out: str | Path, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temp directory beside `out`; when the block succeeds it becomes `out` in one rename.

    A missing or empty `out` is simply taken. An `out` that holds files is swapped for the new one with
    `replace=True`; otherwise it is kept and ours discarded: it is a concurrent writer's identical result, since
    callers refuse a non-empty `out` up front. On an error nothing is left behind.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        for p in (tmp, *tmp.rglob("*")):  # mkdtemp and safetensors make them owner-only; results are ordinary files
            p.chmod(0o755 if p.is_dir() else 0o644)
        try:
            os.rename(tmp, out)  # atomic; also replaces an empty directory
        except OSError:
            if not out.is_dir():
                raise
            if replace and not _exchange(tmp, out):  # then tmp holds the old one, removed below
                # No atomic swap on this system or filesystem: two renames, with `out` missing between them.
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
                os.rename(out, old / out.name)
                os.rename(tmp, out)
                shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step (Linux's renameat2 with RENAME_EXCHANGE): a kill leaves either, never
    neither. False where the C library or the filesystem has no such call."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # not supported here: the caller falls back
        return False
    raise OSError(err, os.strerror(err), str(b))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temp file beside it, flushed to disk, and one rename: a reader sees the old
    file or the new."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def drop_torn_line(path: Path) -> None:
    """Cut the part of a line that a process killed mid-write (or a node that crashed) left at the end of `path`, a
    file of whole lines: the next append would join its first line to the fragment, a line no reader could read."""
    if not path.is_file():
        return
    with open(path, "r+b") as f:
        end = pos = f.seek(0, os.SEEK_END)
        while pos > 0:
            start = max(0, pos - (1 << 16))
            f.seek(start)
            chunk = f.read(pos - start)
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                pos = start + newline + 1
                break
            pos = start
        if pos < end:
            f.truncate(pos)
