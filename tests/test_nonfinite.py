"""A run whose loss goes NaN/inf stops with its own exit code (4) and writes nothing from the bad steps: real 2-rank
DeepSpeed ZeRO-3 on CPU (gloo), the tiny 4-bit base, train.lr=1e30 (the loss is NaN from step 2 on). The same run
through `lorasp launch` on Ray, where the stop must not be retried as a crash, is a SLURM job (tests/test_slurm.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from faults import record
from ports import free_ports

from lorasp_dist.cli import main
from lorasp_dist.config import TrainConfig
from lorasp_dist.engine import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.yaml"
EXPLODE = ("train.lr=1e30", "train.max_steps=10", "train.save_every=1", "train.keep_last=20", "train.eval_every=0")
LIMIT = 3  # the default train.max_nonfinite_steps, which these runs keep


def _strict(constant: str):
    raise ValueError(f"{constant} is not JSON")


def metric_records(run_dir: Path, rank: int = 0) -> list[dict]:
    """Every line of a rank's metrics file, parsed as strict JSON (NaN and Infinity refused)."""
    lines = (run_dir / "metrics" / f"rank{rank}.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=_strict) for line in lines]


def train_two_ranks(out: Path, name: str, *overrides: str) -> list[subprocess.CompletedProcess]:
    """`lorasp train` started as two ranks by hand (as torchrun would, but keeping each rank's own exit code)."""
    (port,) = free_ports(1)
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        cmd = [sys.executable, "-m", "lorasp_dist", "train", str(TINY), f"train.output_dir={out}",
               f"train.run_name={name}", *overrides]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    done = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    return done


def check_nothing_saved_from_bad_steps(run: Path) -> tuple[int, int, int]:
    """(first bad step, last step run, newest sealed step), after asserting what a NaN stop promises."""
    records = metric_records(run)
    bad = [r["step"] for r in records if not r["finite"]]
    assert bad, "the loss never went NaN/inf"
    first_bad, last = bad[0], records[-1]["step"]
    for r in records:
        if not r["finite"]:
            assert r["loss"] is None or r["grad_norm"] is None  # written as null, not NaN
    assert bad == list(range(first_bad, last + 1)) and len(bad) == LIMIT  # stopped at the limit, all in a row
    sealed = [ckpt.read_manifest(c)["step"] for c in ckpt.list_checkpoints(run)]
    assert sealed and max(sealed) < first_bad, sealed  # none sealed after the first bad step
    assert all(ckpt.verify(c)[0] for c in ckpt.list_checkpoints(run))
    assert not (run / "adapter").exists() and not (run / "summary.json").exists()
    assert not any(p.name.startswith(".adapter") for p in run.iterdir())
    stop = json.loads((run / "nonfinite.json").read_text(), parse_constant=_strict)
    assert stop["nonfinite_steps"] == bad and stop["step"] == last
    return first_bad, last, max(sealed)


@pytest.mark.slow
def test_nan_run_stops_with_exit_4_and_saves_nothing_from_it(tiny_out):
    ranks = train_two_ranks(tiny_out, "nan", *EXPLODE)
    run = tiny_out / "nan"
    for rank, proc in enumerate(ranks):
        assert proc.returncode == 4, f"rank {rank}: " + proc.stdout[-2000:] + proc.stderr[-4000:]
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error: stopped at step "), proc.stderr[-2000:]
    first_bad, last, newest = check_nothing_saved_from_bad_steps(run)
    print(f"NaN from step {first_bad}; stopped at step {last}; newest checkpoint step {newest}")
    for rank in (0, 1):  # both ranks stopped at the same step: they agreed on every step's finiteness
        assert [r["step"] for r in metric_records(run, rank)] == list(range(1, last + 1))
    record("NaN / non-finite loss", entry="lorasp train (2 ranks)", exit_code=ranks[0].returncode,
           steps_lost=last - newest, data_lost=not ckpt.verify(ckpt.step_dir(run, newest))[0],
           outcome=f"loss NaN from step {first_bad}; stopped at step {last}, nothing saved from steps {first_bad}-"
                   f"{last}, checkpoint of step {newest} intact, no adapter")


def test_nonfinite_settings_are_bad_input(capsys):
    assert TrainConfig().max_nonfinite_steps == LIMIT
    for override, message in [("train.max_nonfinite_steps=0", "train.max_nonfinite_steps = 0"),
                              ("train.lr=inf", "train.lr = 'inf': must be a finite number"),
                              ("train.lr=1e39", "train.lr = '1e39': must be at most 3.4e+37")]:
        assert main(["validate", str(TINY), override]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


# One rank's share of the trained adapter values turns NaN right after a finite step (the fault: a bit flip, a bad
# kernel), after steps 2 and 4 of 4. The recipe is the real one; only its train_step is wrapped to inject the fault.
POISON_RANK1 = """
import sys
import torch
from lorasp_dist.config import load_config
from lorasp_dist.engine.train import EXIT_NONFINITE, NonFiniteLoss, Recipe, preflight

cfg = load_config(sys.argv[1], sys.argv[2:])
recipe = Recipe(cfg)
recipe.setup(preflight(cfg) if recipe.is_main else None)
real_step = recipe.train_step

def train_step():
    metrics = real_step()
    if recipe.step + 1 in (2, 4) and recipe.rank == 1:
        next(p for p in recipe.engine.module.parameters() if p.requires_grad).ds_tensor.view(-1)[0] = float("nan")
    return metrics

recipe.train_step = train_step
try:
    recipe.run()
except NonFiniteLoss:
    sys.exit(EXIT_NONFINITE)
finally:
    recipe.close()
"""


@pytest.mark.slow
def test_nonfinite_adapter_values_are_never_saved(tmp_path, seed_tiny):
    """Step 2: no checkpoint from its values (the next step rewrites them from the optimizer's fp32 master copy, and
    step 3 is saved). Step 4, the last: no checkpoint and no adapter, exit 4, though every loss was finite."""
    (port,) = free_ports(1)
    script = tmp_path / "poison.py"
    script.write_text(POISON_RANK1)
    overrides = [f"train.output_dir={seed_tiny(tmp_path)}", "train.run_name=poisoned", "train.max_steps=4",
                 "train.save_every=1", "train.keep_last=20", "train.eval_every=0"]
    procs = [subprocess.Popen([sys.executable, str(script), str(TINY), *overrides], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for r in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [4, 4], outs[0][1][-4000:] + outs[1][1][-4000:]
    run = tmp_path / "poisoned"
    assert [r["finite"] for r in metric_records(run)] == [True] * 4  # every loss and gradient norm was finite
    assert [ckpt.read_manifest(c)["step"] for c in ckpt.list_checkpoints(run)] == [3, 1]
    assert "[lorasp] step 2: NaN/inf" in outs[0][0]
    assert json.loads((run / "nonfinite.json").read_text())["nonfinite_steps"] == [4]
    assert not (run / "adapter").exists() and not (run / "summary.json").exists()
