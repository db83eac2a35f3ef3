"""Checkpoints: safetensors + a checksum manifest, written atomically, loaded only when every checksum holds.

Layout of `RUN_DIR/checkpoints/step-000010/`:
  lorasp.safetensors          the LoRA-SP state (gathered, written by rank 0): what training changed
  rank{r}.safetensors         rank r's ZeRO-3 optimizer partition (fp32 master + Adam moments), RNG states
  manifest.json               step, data position, world size, and sha256 + size of every file; written last

Every rank writes into `.tmp-step-000010/`; rank 0 then writes the manifest and renames the directory, so a
reader sees a whole checkpoint or none. Non-tensor state (optimizer hyper-parameters, the step) is JSON in the
safetensors metadata. No pickle anywhere.

The engine alone decides what is kept (`prune`: the newest `train.keep_last`, plus orphans of failed saves removed).
A checkpoint that fails its checksums is never deleted: resuming past it moves it to `checkpoints/corrupt/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from safetensors import SafetensorError, safe_open

if TYPE_CHECKING:  # torch loads where tensors are saved: `lorasp launch` checks checkpoints before it needs torch
    import torch

from lorasp_dist.config import ConfigError

MANIFEST = "manifest.json"
CORRUPT = "corrupt"  # checkpoints/corrupt/: checkpoints that failed their checksums, kept for a post-mortem
_KEEP = "__keep_current__"  # a non-tensor, non-JSON object (e.g. DeepSpeed's LossScaler): keep the live one on load


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:06d}"


def tmp_dir(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f".tmp-step-{step:06d}"


# --- nested state <-> (tensors, JSON skeleton) -------------------------------------------------------------------

def flatten_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list by a reference, collecting the tensors."""
    import torch

    if torch.is_tensor(obj):
        key = prefix or "_"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[_key(k), flatten_state(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return _KEEP


def _key(k):
    return k if isinstance(k, (str, int)) else str(k)


def unflatten_state(skel: Any, tensors: dict[str, torch.Tensor], live: Any = None) -> Any:
    if skel == _KEEP:
        return live
    if isinstance(skel, dict) and "__tensor__" in skel:
        return tensors[skel["__tensor__"]]
    if isinstance(skel, dict) and "__dict__" in skel:
        live = live if isinstance(live, dict) else {}
        return {k: unflatten_state(v, tensors, live.get(k)) for k, v in skel["__dict__"]}
    if isinstance(skel, list):
        live = live if isinstance(live, (list, tuple)) else [None] * len(skel)
        return [unflatten_state(v, tensors, live[i] if i < len(live) else None) for i, v in enumerate(skel)]
    return skel


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a quota): the run stops, its previous checkpoint intact."""


def save_state_file(path: Path, state: dict) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skel = flatten_state(state, "", tensors)
    try:
        save_file(tensors, str(path), metadata={"skeleton": json.dumps(skel)})
    except SafetensorError as e:  # how safetensors reports an I/O error such as a full disk
        raise OSError(f"{path}: {e}") from None
    _fsync(path)


def load_state_file(path: Path, live: dict | None = None) -> dict:
    with safe_open(path, "pt") as f:
        skel = json.loads(f.metadata()["skeleton"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return unflatten_state(skel, tensors, live)


def load_tensors_ending(path: Path, suffix: str) -> list[torch.Tensor]:
    """The tensors of a state file whose names end with `suffix`, without reading the others."""
    with safe_open(path, "pt") as f:
        return [f.get_tensor(k) for k in f.keys() if k.endswith(suffix)]


# --- integrity -------------------------------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(tmp: Path, final: Path, meta: dict) -> None:
    """Rank 0, after every rank wrote its files into `tmp`: checksum them, write the manifest last, rename."""
    files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir()) if p.is_file()}
    manifest = tmp / MANIFEST
    manifest.write_text(json.dumps({**meta, "files": files}, indent=2))
    _fsync(manifest)
    tmp.rename(final)  # never over an existing checkpoint: the rename fails instead (resuming moved newer ones aside)


def verify(ckpt: Path) -> tuple[bool, str]:
    """(ok, reason). A checkpoint is valid when its manifest parses and every listed file matches size and sha256.
    Whatever a damaged manifest or disk holds (bytes that are not UTF-8, JSON of another shape, a read error) is a
    reason, never an exception: resuming then falls back to an older checkpoint."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return False, "no manifest.json"
    try:
        meta = json.loads(manifest.read_text())
        files = meta["files"]
        int(meta["step"]), int(meta["sample_pos"])  # what resuming reads from it
        world_size = int(meta["world_size"])
        expected = {"lorasp.safetensors", *(f"rank{r}.safetensors" for r in range(world_size))}
        sizes = {name: (int(info["bytes"]), str(info["sha256"])) for name, info in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:  # ValueError: JSON and UTF-8 errors
        return False, f"unreadable manifest ({type(e).__name__}: {e})"
    if missing := expected - set(files):
        return False, f"manifest lacks {sorted(missing)}"
    for name, (size, sha256) in sizes.items():
        p = ckpt / name
        try:
            if not p.is_file():
                return False, f"{name} is missing"
            if p.stat().st_size != size:
                return False, f"{name} has {p.stat().st_size} bytes, the manifest says {size}"
            if _sha256(p) != sha256:
                return False, f"{name} fails its sha256 checksum"
        except OSError as e:  # a read error is as good as a wrong byte
            return False, f"{name} cannot be read ({e})"
    return True, "ok"


def read_manifest(ckpt: Path) -> dict:
    return json.loads((ckpt / MANIFEST).read_text())


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Sealed checkpoint directories, newest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    steps = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(r"step-\d+", p.name)]
    return sorted(steps, key=lambda p: int(p.name[5:]), reverse=True)  # by number: step-1000000 after step-999999


class Found(NamedTuple):
    newest: Path | None  # the newest checkpoint whose checksums hold
    manifest: dict | None  # its manifest
    corrupt: list[tuple[Path, str]]  # the newer ones, newest first, each with what is wrong with it

    @property
    def step(self) -> int | None:
        return self.manifest["step"] if self.manifest else None


def newest_valid(run_dir: Path) -> Found:
    """The one lookup of a run's newest checkpoint: verified, so a corrupt one is skipped and named, never read."""
    corrupt = []
    for ckpt in list_checkpoints(run_dir):
        ok, why = verify(ckpt)
        if ok:
            return Found(ckpt, read_manifest(ckpt), corrupt)
        corrupt.append((ckpt, why))
    return Found(None, None, corrupt)


def resume_point(run_dir: Path, restart_if_corrupt: bool) -> Found:
    """Where `train.resume=auto` continues the run: its newest valid checkpoint. When every checkpoint is corrupt,
    a ConfigError naming them, unless `train.restart_if_corrupt` asks to start over from step 0."""
    found = newest_valid(run_dir)
    if found.newest is None and found.corrupt and not restart_if_corrupt:
        named = "; ".join(f"{path.name}: {why}" for path, why in found.corrupt)
        raise ConfigError(
            f"train.resume = 'auto': every checkpoint in {run_dir / 'checkpoints'} is corrupt ({named}); nothing was "
            f"changed. To start over from step 0, set train.restart_if_corrupt=true: they are moved to "
            f"checkpoints/{CORRUPT}/, not deleted"
        )
    return found


def set_aside(run_dir: Path, corrupt: list[tuple[Path, str]]) -> list[Path]:
    """Move corrupt checkpoints to `checkpoints/corrupt/` (their step numbers are free again); returns where."""
    root = run_dir / "checkpoints" / CORRUPT
    moved = []
    for path, _ in corrupt:
        root.mkdir(exist_ok=True)
        target, n = root / path.name, 1
        while target.exists():  # the same step went corrupt before
            target, n = root / f"{path.name}.{n}", n + 1
        path.rename(target)
        moved.append(target)
    return moved


def prune(run_dir: Path, keep_last: int) -> None:
    """Rank 0, right after sealing a checkpoint (every rank's save is over, and the run lock keeps other runs out):
    keep the newest `keep_last` checkpoints, and remove the temp directories of saves that never finished."""
    root = run_dir / "checkpoints"
    for old in [*list_checkpoints(run_dir)[keep_last:], *root.glob(".tmp-step-*")]:
        shutil.rmtree(old, ignore_errors=True)
