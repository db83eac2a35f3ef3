"""The training engine on CPU: 2 processes, real DeepSpeed ZeRO-3 (gloo), a real bitsandbytes 4-bit base with bf16
quant storage, gradient checkpointing, the shipped corpus. Plus checkpoint integrity and fail-fast bad input."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from lorasp_dist.engine import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.yaml"
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "lorasp_dist", "train", *args]


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


# zero3 fetches whole decoder layers (the default) and profiles two steps; the offload configs fetch per module.
@pytest.mark.parametrize("ds_config, extra", [
    ("zero3", ["deepspeed.fetch=layer", "train.profile_steps=[3]"]),
    ("zero3_offload_optimizer", ["deepspeed.fetch=module"]),
    ("zero3_offload_all", ["deepspeed.fetch=layer"]),
])
def test_zero3_4bit_trains_and_partitions(tmp_path, ds_config, extra):
    run = train(tmp_path, ds_config, f"deepspeed.config={ds_config}", "train.max_steps=30", "train.save_every=0",
                "train.eval_every=0", "train.gradient_checkpointing=true", *extra)
    losses = [metrics(run)[s]["loss"] for s in range(1, 31)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"{ds_config}: loss {first:.4f} -> {last:.4f}")
    assert last < first - 0.05, losses
    for rank in (0, 1):
        part = json.loads((run / "partition" / f"rank{rank}.json").read_text())
        share = part["param_bytes_local"] / part["param_bytes_total"]
        print(f"{ds_config} rank {rank}: holds {share:.3f} of the parameters")
        assert 0.45 <= share <= 0.55  # its half of every ZeRO-3 partition (plus padding), never the whole model
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "memory_report.json").is_file()
    if "train.profile_steps=[3]" in extra:
        for rank in (0, 1):
            table = (run / "profile" / f"rank{rank}_steps3-4.md").read_text()
            assert "host self-CPU time" in table and "aten::" in table


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory):
    """An uninterrupted 20-step run, and the same run killed after its step-10 checkpoint and resumed."""
    out = tmp_path_factory.mktemp("resume")
    common = ("train.precision=fp32", "train.max_steps=20", "train.save_every=10", "train.eval_every=0",
              "train.keep_last=5")
    whole = train(out, "whole", *common)

    cmd = torchrun(str(TINY), f"train.output_dir={out}", "train.run_name=killed", *common)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    sealed = ckpt.step_dir(out / "killed", 10) / ckpt.MANIFEST
    logged = out / "killed" / "metrics" / "rank0.jsonl"

    def past_the_checkpoint() -> bool:  # step 11 logged: the resumed run has records to drop
        return sealed.exists() and logged.read_text().count("\n") >= 11

    deadline = time.time() + 600
    while not past_the_checkpoint() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    # torchrun starts every worker in a session of its own: kill the whole tree, or the workers finish the run
    tree = psutil.Process(proc.pid)
    for victim in [*tree.children(recursive=True), tree]:
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    assert sealed.exists(), "the run never wrote its step-10 checkpoint"
    killed_at = max(metrics(out / "killed"))
    assert killed_at > 10
    resumed = train(out, "killed", *common)
    return whole, resumed, killed_at


def test_kill_and_resume_matches_uninterrupted(resume_runs):
    whole, resumed, killed_at = resume_runs
    print(f"killed after step {killed_at}; resumed from step 10")
    a = load_file(ckpt.step_dir(whole, 20) / "lorasp.safetensors")
    b = load_file(ckpt.step_dir(resumed, 20) / "lorasp.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"max |whole - resumed| over LoRA-SP weights: {worst:.3g}")
    assert worst <= 1e-6
    mw, mr = metrics(whole), metrics(resumed)
    assert sorted(mw) == sorted(mr) == list(range(1, 21))
    for rank in (0, 1):  # what the killed run logged past its step-10 checkpoint was dropped on resuming
        lines = (resumed / "metrics" / f"rank{rank}.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == list(range(1, 21))
    for step in range(1, 21):
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
    else:
        (step_dir / ckpt.MANIFEST).unlink()


@pytest.mark.parametrize("kind", ["flip", "truncate", "manifest"])
def test_corrupted_checkpoint_is_never_loaded(resume_runs, tmp_path, kind):
    whole, _, _ = resume_runs
    run = tmp_path / "run"
    shutil.copytree(whole, run)
    newest = ckpt.step_dir(run, 20)
    _corrupt(kind, newest)
    ok, why = ckpt.verify(newest)
    assert not ok, why
    with pytest.warns(UserWarning, match="skipping corrupted checkpoint"):
        assert ckpt.newest_valid(run) == ckpt.step_dir(run, 10)


def test_resume_skips_corrupted_newest(resume_runs, tmp_path):
    whole, _, _ = resume_runs
    shutil.copytree(whole, tmp_path / "run")
    _corrupt("flip", ckpt.step_dir(tmp_path / "run", 20))
    cmd = torchrun(str(TINY), f"train.output_dir={tmp_path}", "train.run_name=run", "train.precision=fp32",
                   "train.max_steps=20", "train.save_every=10", "train.eval_every=0", "train.keep_last=5")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stdout and "step-000010" in proc.stdout
    assert "skipping corrupted checkpoint" in proc.stderr
    # the rerun from step 10 rewrote step 20, bit for bit the same as the uninterrupted run
    a = load_file(ckpt.step_dir(whole, 20) / "lorasp.safetensors")
    b = load_file(ckpt.step_dir(tmp_path / "run", 20) / "lorasp.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _train_single(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lorasp_dist", "train", str(TINY), f"train.output_dir={cwd}", "train.eval_every=0",
           *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)


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
        (["lorasp.resample_every=5"], "lorasp.resample_every = 5: mask resampling is not supported"),
    ],
)
def test_bad_input_fails_fast_with_exit_2(tmp_path, overrides, message):
    (tmp_path / "empty.jsonl").write_text("")
    rows = [{"prompt": f"question {i}?", "response": f"answer number {i}."} for i in range(40)]
    (tmp_path / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    t0 = time.time()
    proc = _train_single(*(o.format(tmp=tmp_path) for o in overrides), cwd=tmp_path)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert err[-1].startswith("error: ") and message.format(tmp=tmp_path) in err[-1], err[-1]
    assert "Traceback" not in proc.stderr
    assert time.time() - t0 < 60
