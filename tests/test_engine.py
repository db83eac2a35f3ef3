"""The training engine on CPU: 2 processes, real DeepSpeed ZeRO-3 (gloo), a real bitsandbytes 4-bit base with bf16
quant storage, gradient checkpointing, the shipped corpus. Plus checkpoint integrity and fail-fast bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from conftest import EXACT, EXACT_EVERY, EXACT_STEPS, torchrun
from faults import record
from safetensors.torch import load_file

from lorasp_dist.cli import main
from lorasp_dist.engine import checkpoint as ckpt
from lorasp_dist.engine.run_dir import LOCK_FILE

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.yaml"
pytestmark = pytest.mark.slow


def train(out: Path, name: str, *overrides: str, timeout: float = 600) -> Path:
    cmd = torchrun(str(TINY), f"train.output_dir={out}", f"train.run_name={name}", *overrides)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out / name


def metrics(run_dir: Path, rank: int = 0) -> dict[int, dict]:
    """step -> record."""
    out = {}
    for line in (run_dir / "metrics" / f"rank{rank}.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec
    return out


def check_trains_and_partitions(run: Path, name: str, steps: int, fetches_in_flight: int = 2) -> None:
    """The loss goes down; each rank holds half of every ZeRO-3 partition; the adapter and memory report exist.
    (Plain zero3, with whole-layer fetches, is the README's main job: tests/test_launcher.py; the offload configs'
    runs also redraw masks: tests/test_resample_zero3.py.)"""
    losses = [metrics(run)[s]["loss"] for s in range(1, steps + 1)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"{name}: loss {first:.4f} -> {last:.4f}")
    assert last < first - 0.05, losses
    for rank in (0, 1):
        part = json.loads((run / "partition" / f"rank{rank}.json").read_text())
        share = part["param_bytes_local"] / part["param_bytes_total"]
        print(f"{name} rank {rank}: holds {share:.3f} of the parameters")
        assert 0.45 <= share <= 0.55  # its half of every ZeRO-3 partition (plus padding), never the whole model
        assert part["fetches_in_flight"] == fetches_in_flight
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "memory_report.json").is_file()


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def kill_with_ranks(agent: subprocess.Popen) -> None:
    """SIGKILL torchrun and its ranks at once, like a crashed node. Each rank runs in a session of its own (torchrun
    starts them so), out of reach of a signal to torchrun's process group: they are found by their parent."""
    ranks = [int(p.name) for p in Path("/proc").iterdir()
             if p.name.isdigit() and _parent(p) == agent.pid]
    for pid in (agent.pid, *ranks):
        os.kill(pid, signal.SIGKILL)
    agent.wait()
    deadline = time.time() + 30
    while any(_running(pid) for pid in ranks) and time.time() < deadline:
        time.sleep(0.1)


def _parent(proc: Path) -> int | None:
    try:  # /proc/PID/stat: "pid (comm) state ppid ...", comm may hold spaces
        return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# The runs to resume are conftest's EXACT ones: LAST steps in fp32, a checkpoint every EVERY; PREVIOUS is the
# checkpoint before the last.
LAST, EVERY = EXACT_STEPS, EXACT_EVERY
PREVIOUS = LAST - EVERY


@pytest.fixture(scope="module")
def resume_runs(uninterrupted, seed_tiny, tmp_path_factory):
    """The uninterrupted run (conftest.py), and the same run killed after its first checkpoint and resumed. The
    killed run's lock is left behind: a restart is first refused with a message that says so, then the lock is
    removed."""
    out = seed_tiny(tmp_path_factory.mktemp("resume"))
    cmd = torchrun(str(TINY), f"train.output_dir={out}", "train.run_name=killed", *EXACT)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sealed = ckpt.step_dir(out / "killed", EVERY) / ckpt.MANIFEST
    logged = out / "killed" / "metrics" / "rank0.jsonl"

    def past_the_checkpoint() -> bool:  # a step past it logged: the resumed run has records to drop
        return sealed.exists() and logged.read_text().count("\n") >= EVERY + 1

    deadline = time.time() + 600
    while not past_the_checkpoint() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    kill_with_ranks(proc)
    assert sealed.exists(), f"the run never wrote its step-{EVERY} checkpoint"
    killed_at = max(metrics(out / "killed"))
    assert killed_at > EVERY
    refused = _train_single("train.run_name=killed", *EXACT, cwd=out)  # a process: by its start the ranks are reaped
    (out / "killed" / LOCK_FILE).unlink()
    resumed = train(out, "killed", *EXACT)
    return uninterrupted, resumed, killed_at, refused


def test_a_killed_run_leaves_a_stale_lock_that_is_named(resume_runs):
    _, resumed, _, refused = resume_runs
    err = refused.stderr.strip().splitlines()
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert err[-1].startswith("error: train.run_name = 'killed': ") and "has a stale lock: pid " in err[-1], err[-1]
    assert f"is no longer running (that run was killed). If no other run uses {resumed}, remove " in err[-1]
    assert "Traceback" not in refused.stderr
    assert not (resumed / LOCK_FILE).exists()  # the resumed run released its own


def test_kill_and_resume_matches_uninterrupted(resume_runs):
    whole, resumed, killed_at, _ = resume_runs
    print(f"killed after step {killed_at}; resumed from a step no earlier than {EVERY}")
    a = load_file(ckpt.step_dir(whole, LAST) / "lorasp.safetensors")
    b = load_file(ckpt.step_dir(resumed, LAST) / "lorasp.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"max |whole - resumed| over LoRA-SP weights: {worst:.3g}")
    assert worst <= 1e-6
    mw, mr = metrics(whole), metrics(resumed)
    assert sorted(mw) == sorted(mr) == list(range(1, LAST + 1))
    for rank in (0, 1):  # what the killed run logged past its step-6 checkpoint was dropped on resuming
        lines = (resumed / "metrics" / f"rank{rank}.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == list(range(1, LAST + 1))
    for step in range(1, LAST + 1):
        assert mr[step]["loss"] == pytest.approx(mw[step]["loss"], abs=1e-6), step
    pa = load_file(whole / "adapter" / "adapter_model.safetensors")
    pb = load_file(resumed / "adapter" / "adapter_model.safetensors")
    assert max((pa[k] - pb[k]).abs().max().item() for k in pa) <= 1e-6


def _corrupt(kind: str, step_dir: Path) -> None:
    target = step_dir / "rank1.safetensors"
    if kind == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif kind == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
    elif kind == "manifest-byte":  # one bad byte on disk: no longer UTF-8
        manifest = step_dir / ckpt.MANIFEST
        manifest.write_bytes(manifest.read_bytes()[:10] + b"\xff" + manifest.read_bytes()[11:])
    elif kind == "manifest-shape":  # JSON still, of another shape
        manifest = step_dir / ckpt.MANIFEST
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "files": ["rank0.safetensors"]}))
    else:
        (step_dir / ckpt.MANIFEST).unlink()


@pytest.mark.parametrize("kind", ["flip", "truncate", "manifest", "manifest-byte", "manifest-shape"])
def test_corrupted_checkpoint_is_never_loaded(resume_runs, tmp_path, kind):
    whole = resume_runs[0]
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    newest = ckpt.step_dir(run, LAST)
    _corrupt(kind, newest)
    ok, why = ckpt.verify(newest)
    assert not ok, why
    found = ckpt.newest_valid(run)
    assert (found.newest, found.step, found.corrupt) == (ckpt.step_dir(run, PREVIOUS), PREVIOUS, [(newest, why)])


def test_checkpoints_are_ordered_by_step_number(tmp_path):
    """Past step 999,999 the names outgrow their zero padding: the order is by number, or keep_last would delete the
    checkpoint just sealed and a resume would go back a million steps. Other directories are not checkpoints."""
    for name in ("step-000010", "step-999999", "step-1000000", "step-x", "corrupt"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-1000000", "step-999999", "step-000010"]


def _truncate_manifest(step_dir: Path) -> None:
    manifest = step_dir / ckpt.MANIFEST
    manifest.write_bytes(manifest.read_bytes()[:40])  # a save cut short: the manifest is no longer JSON


def test_resume_past_a_broken_manifest(resume_runs, tiny_out):
    """The newest checkpoint's manifest is truncated and a failed save left a temp dir: resuming continues from the
    older one, sets the broken one aside (kept, not deleted), keeps `keep_last` checkpoints and removes the orphan.
    The rerun holds its first two layers resident (deepspeed.resident_layers=2: 4-bit buffers, whole on each rank,
    never gathered) and must still write the uninterrupted run's bits."""
    whole = resume_runs[0]
    run = tiny_out / "run"
    shutil.copytree(whole, run)
    broken = ckpt.step_dir(run, LAST)
    _truncate_manifest(broken)
    before = digest(broken)
    orphan = ckpt.tmp_dir(run, PREVIOUS + 3)
    orphan.mkdir()
    (orphan / "rank0.safetensors").write_bytes(b"half a save")
    cmd = torchrun(str(TINY), f"train.output_dir={tiny_out}", "train.run_name=run", *EXACT, "train.keep_last=2",
                   "deepspeed.resident_layers=2")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    set_aside = run / "checkpoints" / ckpt.CORRUPT / broken.name
    assert f"{broken.name} is corrupt (unreadable manifest (" in proc.stdout and f"moved to {set_aside}" in proc.stdout
    assert f"resumed from {ckpt.step_dir(run, PREVIOUS)} at step {PREVIOUS}" in proc.stdout
    assert digest(set_aside) == before  # kept as it was, for a post-mortem
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        ckpt.CORRUPT, ckpt.step_dir(run, PREVIOUS).name, broken.name]  # keep_last=2
    assert all(ckpt.verify(ckpt.step_dir(run, s))[0] for s in (PREVIOUS, LAST))
    # the rerun from the checkpoint before rewrote the last, bit for bit the same as the uninterrupted run
    a = load_file(ckpt.step_dir(whole, LAST) / "lorasp.safetensors")
    b = load_file(ckpt.step_dir(run, LAST) / "lorasp.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for rank in (0, 1):  # the resident layers left ZeRO-3: what it partitions shrank by what each rank holds whole
        sharded, resident = (json.loads((r / "partition" / f"rank{rank}.json").read_text()) for r in (whole, run))
        assert sharded["resident_bytes"] == 0 and resident["resident_bytes"] > 0
        assert sharded["param_bytes_total"] - resident["param_bytes_total"] == resident["resident_bytes"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["adapter"] == str(run / "adapter") and not (run / LOCK_FILE).exists()
    assert not list(run.glob(".summary.json.tmp-*"))
    # the run had finished; the metrics hold each step once after a resume, so count from the resume line
    redone = LAST - int(re.search(r"resumed from \S+ at step (\d+)", proc.stdout)[1])
    record("broken manifest", entry="lorasp train (torchrun, 2 ranks)", exit_code=proc.returncode,
           steps_lost=redone, data_lost=not ckpt.verify(ckpt.step_dir(run, PREVIOUS))[0] or not set_aside.is_dir(),
           outcome=f"newest manifest truncated: resumed from the step-{PREVIOUS} checkpoint, the broken one moved to "
                   f"checkpoints/corrupt/, {redone} steps redone, keep_last honoured")


def test_all_checkpoints_corrupt_stops_unless_told_to_start_over(resume_runs, tmp_path):
    whole = resume_runs[0]
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    shutil.copytree(whole.parent / ".cache", tmp_path / ".cache")  # the tokenizer and base, not built again
    reached = max(metrics(run))
    for step in range(EVERY, LAST, EVERY):
        _corrupt("flip", ckpt.step_dir(run, step))
    _truncate_manifest(ckpt.step_dir(run, LAST))
    before = digest(run / "checkpoints")
    proc = refused_in_process("train.run_name=run", "train.max_steps=2", cwd=tmp_path)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert err[-1].startswith(f"error: train.resume = 'auto': every checkpoint in {run / 'checkpoints'} is corrupt (")
    assert f"{ckpt.step_dir(run, LAST).name}: unreadable manifest" in err[-1]
    for step in range(EVERY, LAST, EVERY):
        assert f"{ckpt.step_dir(run, step).name}: rank1.safetensors fails its sha256 checksum" in err[-1]
    assert "set train.restart_if_corrupt=true" in err[-1] and "Traceback" not in proc.stderr
    assert digest(run / "checkpoints") == before  # nothing moved, nothing deleted

    again = _train_single("train.run_name=run", "train.max_steps=2", "train.restart_if_corrupt=true", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    aside = run / "checkpoints" / ckpt.CORRUPT
    every_one = [ckpt.step_dir(run, s).name for s in range(EVERY, LAST + 1, EVERY)]
    assert sorted(p.name for p in aside.iterdir()) == every_one
    kept = digest(aside) == {k.removeprefix(f"{ckpt.CORRUPT}/"): v for k, v in before.items()}
    assert kept  # moved aside byte for byte
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-000002"]
    record("all checkpoints corrupt", entry="lorasp train", exit_code=proc.returncode,
           steps_lost=reached,  # no valid checkpoint: everything since step 0
           data_lost=not kept,
           outcome="exit 2 naming every corrupt checkpoint, nothing changed; with train.restart_if_corrupt=true "
                   "they move to checkpoints/corrupt/ and the run starts over from step 0")


def _can_mount_tmpfs() -> bool:
    """A full disk for real: a small tmpfs in a private mount namespace (needs root and unshare)."""
    probe = tempfile.mkdtemp(prefix="lorasp-probe-")
    try:
        cmd = ["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {probe}"]
        return shutil.which("unshare") is not None and subprocess.run(cmd, capture_output=True).returncode == 0
    finally:
        os.rmdir(probe)


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare + mount (root) for a small tmpfs")
def test_full_disk_during_a_checkpoint(tmp_path, seed_tiny):
    """The run directory is a 1.5 MiB tmpfs: the step-2 checkpoint (about 1 MiB for one rank) fits, step 4's does
    not. One line, exit 1, the step-2 checkpoint intact, nothing half-written left behind."""
    out, copy = seed_tiny(tmp_path / "out"), tmp_path / "copy"
    run = out / "full"
    run.mkdir(parents=True)  # the mount point: an empty directory is a new run's
    train_cmd = [sys.executable, "-m", "lorasp_dist", "train", str(TINY), f"train.output_dir={out}",
                 "train.run_name=full", "train.max_steps=4", "train.save_every=2", "train.eval_every=0"]
    script = (f"mount -t tmpfs -o size=1536k tmpfs {run} && {subprocess.list2cmdline(train_cmd)}; rc=$?; "
              f"cp -a {run} {copy}; exit $rc")  # the tmpfs lives only in this namespace: keep what the run left
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=REPO)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert err[-1].startswith("error: checkpoint step-000004 could not be written ("), err[-1]
    assert f"{ckpt.tmp_dir(run, 4)}/rank0.safetensors: " in err[-1] and "No space left on device" in err[-1]
    assert "the run stopped at step 4, step-000002 is intact: free space, then continue" in err[-1]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["step-000002"]  # no .tmp-step-000004
    intact = ckpt.verify(ckpt.step_dir(copy, 2))[0]
    assert intact and not (copy / "summary.json").exists() and not (copy / LOCK_FILE).exists()
    reached = max(metrics(copy))
    record("disk full", entry="lorasp train", exit_code=proc.returncode,
           steps_lost=reached - ckpt.read_manifest(ckpt.step_dir(copy, 2))["step"], data_lost=not intact,
           outcome="ENOSPC while saving: one line, exit 1, the partial save removed, the previous checkpoint intact")


def test_a_full_fine_tune_writes_the_whole_model(tmp_path, chat_base, capsys):
    """lorasp.variant=full trains every weight and has no adapter: the run writes RUN_DIR/model, the gathered model
    with its tokenizer, never an empty adapter that would load as the untrained base. `lorasp eval RUN_DIR` says
    where the model is."""
    from safetensors.torch import load_file

    from lorasp_dist.cli import main

    proc = _train_single(f"model.path={chat_base}", "model.quantize=false", "lorasp.variant=full",
                         "train.run_name=full", "train.max_steps=2", "train.save_every=0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    run = tmp_path / "full"
    assert not (run / "adapter").exists() and f"[lorasp] model: {run / 'model'}" in proc.stdout
    assert json.loads((run / "summary.json").read_text())["model"] == str(run / "model")
    trained, base = load_file(run / "model" / "model.safetensors"), load_file(chat_base / "model.safetensors")
    assert trained.keys() == base.keys() and (run / "model" / "tokenizer_config.json").is_file()
    moved = [k for k in base if not torch.equal(trained[k].float(), base[k].float())]
    assert any("layers.0.self_attn.q_proj" in k for k in moved), moved
    data = tmp_path / "qa.jsonl"
    data.write_text('{"prompt": "Hi?", "response": "Hello."}\n')
    assert main(["eval", str(run), "--data", str(data)]) == 2
    assert f"a full fine-tune, with no adapter; score its model with `lorasp eval --base {run / 'model'}`" \
        in capsys.readouterr().err


def _train_single(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lorasp_dist", "train", str(TINY), f"train.output_dir={cwd}", "train.eval_every=0",
           *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)


def refused_in_process(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    """`lorasp train`'s entry point called in this process, for a run refused before it starts (a process of its own
    would spend ~3 s importing torch and DeepSpeed); what it printed, as a process's output."""
    argv = ["train", str(TINY), f"train.output_dir={cwd}", "train.eval_every=0", *overrides]
    out, err = io.StringIO(), io.StringIO()
    with patch.dict(os.environ), redirect_stdout(out), redirect_stderr(err):  # the CLI's environment stays in it
        code = main(argv)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["data.path={tmp}/missing.jsonl"], "data.path = '{tmp}/missing.jsonl': not found"),
        (["data.path={tmp}/empty.jsonl"], "empty"),
        (["data.path={tmp}/qa.jsonl", "data.prompt_column=question"], "data.prompt_column = 'question'"),
        (["data.seq_len=0"], "data.seq_len = 0"),
        (["model.preset=llama-3b"], "model.preset = 'llama-3b': unknown preset"),
        (["train.resume={tmp}"], "train.resume = '{tmp}': not a valid checkpoint"),
        (["model.path={tmp}"], "model.path = '{tmp}': not a checkpoint directory"),
        (["train.micro_batch_size=100000"], "train.micro_batch_size = 100000"),
        (["lorasp.resample_every=5", "deepspeed.overrides.zero_optimization.offload_optimizer.device=nvme"],
         "lorasp.resample_every = 5: mask redraws are not supported with the optimizer offloaded to NVMe"),
    ],
)
def test_bad_input_fails_fast_with_exit_2(tmp_path, overrides, message, capsys):
    """`lorasp train`'s own entry point (what `python -m lorasp_dist` exits with), called in this process: a process
    of its own would spend ~3 s a case importing torch and DeepSpeed."""
    (tmp_path / "empty.jsonl").write_text("")
    rows = [{"prompt": f"question {i}?", "response": f"answer number {i}."} for i in range(40)]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    t0 = time.time()
    with patch.dict(os.environ):  # what the CLI sets in the environment for its ranks stays out of later tests
        code = main(["train", str(TINY), f"train.output_dir={tmp_path}", "train.eval_every=0",
                     *(o.format(tmp=tmp_path) for o in overrides)])
    stderr = capsys.readouterr().err
    err = stderr.strip().splitlines()
    assert code == 2, stderr[-3000:]
    assert err[-1].startswith("error: ") and message.format(tmp=tmp_path) in err[-1], err[-1]
    assert "Traceback" not in stderr
    assert time.time() - t0 < 60
