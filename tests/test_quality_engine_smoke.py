"""bench/quality_engine.py end to end on CPU at tiny scale: a tiny LLaMA with a chat template, a BIG-bench-style
classification task, the study's --base-4bit runs and the same runs through `lorasp launch` (2 CPU ranks on the
session's Ray cluster, `--address`; ZeRO-3, NF4 on load) and `lorasp eval`, then the comparison's records. The GPU run
is the same command at full size, on a local Ray (bench/results/quality/README.md)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_quality_smoke import load_quality, write_tasks

from lorasp_dist.data import build_datasets, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def load_engine_bench():
    spec = importlib.util.spec_from_file_location("quality_engine", REPO / "bench" / "quality_engine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seed_records_make_the_engine_pack_the_studys_rows(tmp_path, chat_base):
    """For every seed, the engine's config (data.seed = SEED on the permuted copy) packs and orders the rows the
    study trains on (data seed 0 for packing, SEED for the order); without the copy it would not."""
    quality_engine, quality = load_engine_bench(), load_quality()
    bb, work = write_tasks(tmp_path), tmp_path / "work"
    a = quality_engine.parse_args(["--base", str(chat_base), "--work", str(work), "--steps", "8", "--batch-size",
                                   "4", "--max-seq-len", "64", "--device", "cpu"])
    qa = quality.parse_args(quality_engine.study_argv(a, chat_base))
    task = quality.prepare_tasks(["toy_parity"], work, str(bb))["toy_parity"]
    tok = load_tokenizer(chat_base)
    study_rows = build_datasets(quality.run_config(qa, chat_base, task, 1e-3), tok)[0]
    for seed in (0, 1, 2):
        data = quality_engine.seed_records(task["dir"], seed, tmp_path / f"seed{seed}.jsonl")
        cfg = quality_engine.engine_config(a, qa, chat_base, task, "lorasp", seed, 1e-3, data, tmp_path / "runs")
        assert cfg.train.micro_batch_size * cfg.launcher.num_workers == 4 and cfg.data.seed == seed
        assert quality_engine.same_rows(study_rows, cfg, tok, seed, a)
    original = quality_engine.engine_config(a, qa, chat_base, task, "lorasp", 1, 1e-3, task["dir"] / "train.jsonl",
                                            tmp_path / "runs")
    assert not quality_engine.same_rows(study_rows, original, tok, 1, a)


def test_engine_vs_study_end_to_end(tmp_path, chat_base, ray_cluster, monkeypatch, capsys):
    """One seed of LoRA-SP through both paths (lora differs only in lorasp.variant), then two more seeds at once
    (--jobs 2). The script's main() runs in this process, with the environment its launches need: a process of its
    own would spend seconds a call importing torch."""
    head, env = ray_cluster
    for key, value in {**env, "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(key, value)
    quality_engine = load_engine_bench()
    bb, work, out = write_tasks(tmp_path, n=100), tmp_path / "work", tmp_path / "out"
    args = ["--base", str(chat_base), "--bigbench-dir", str(bb), "--work", str(work), "--out", str(out), "--tasks",
            "toy_parity", "--variants", "lorasp", "--seeds", "0", "--lrs", "adapter=1e-3", "--steps", "3",
            "--batch-size", "4", "--max-seq-len", "64", "--max-eval", "8", "--eval-batch-size", "8",
            "--max-new-tokens", "3", "--device", "cpu", "--address", head.address]

    def call(*extra: str) -> tuple[int, str, str]:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", [str(REPO / "bench" / "quality_engine.py"), *args, *extra])  # the record's
        code = quality_engine.main([*args, *extra])
        return code, *capsys.readouterr()

    # out of --time-budget: the study stops before its sweep ends, no launch starts, the record says incomplete
    code, stdout, stderr = call("--time-budget", "1")
    assert code == 0, stdout[-3000:] + stderr[-5000:]
    assert not json.loads((out / "engine-vs-study.json").read_text())["complete"]
    assert "INCOMPLETE" in (out / "engine-vs-study.md").read_text() and not (out / "engine_runs.jsonl").exists()
    code, stdout, stderr = call("--resume")
    assert code == 0, stdout[-3000:] + stderr[-5000:]
    runs_before = (out / "engine_runs.jsonl").read_text()
    # without --resume a call refuses in one line and touches nothing; with it, it finds nothing left to launch
    code, _, stderr = call()
    assert code == 2 and stderr.strip().startswith("error: --out = ")
    assert "Traceback" not in stderr
    code, stdout, stderr = call("--resume")
    assert code == 0 and "engine test" not in stdout, stderr[-3000:]
    assert (out / "engine_runs.jsonl").read_text() == runs_before

    record = json.loads((out / "engine-vs-study.json").read_text())
    assert record["complete"] and record["git_rev"] and record["date"] and record["device"].startswith("CPU")
    assert "quality_engine.py" in record["command"] and "--base-4bit" in record["study_command"]
    assert record["engine"]["num_workers"] == 2 and record["engine"]["micro_batch_size"] == 2
    (row,) = record["rows"]
    assert (row["task"], row["metric"], row["variant"], row["lr"]) == ("toy_parity", "multiple_choice", "lorasp", 1e-3)
    assert row["seeds"] == 1 and row["noise"] is None and row["within_noise"] is None  # one seed: no spread yet
    study = {r["seed"]: r for r in map(json.loads, (out / "study" / "runs.jsonl").read_text().splitlines())
             if r["variant"] == "lorasp"}
    engine = {r["seed"]: r for r in map(json.loads, runs_before.splitlines())}
    assert sorted(engine) == [0] and record["engine_runs"] == [engine[0]]
    # both columns are the runs' own test scores, in points: the engine's from `lorasp eval`'s own output
    n_test = min(8, len((work / "tasks" / "toy_parity" / "test.jsonl").read_text().splitlines()))
    scored = json.loads((work / "engine" / "runs-setup" / "toy_parity-lorasp-seed0-lr0.001" / "test.json").read_text())
    assert engine[0]["test"] == scored["value"] and engine[0]["n_test"] == scored["n"] == n_test
    assert row["engine_tests"] == [round(100 * engine[0]["test"], 2)]
    assert row["study_tests"] == [round(100 * study[0]["test"], 2)]
    assert row["engine"] == pytest.approx(100 * engine[0]["test"])
    assert row["diff"] == pytest.approx(row["engine"] - row["study"])
    r = engine[0]
    assert r["same_rows"] and r["same_rendering"] and r["template"] == "chat" and r["base_weights"] == "nf4"
    assert (Path(r["run_dir"]) / "adapter" / "adapter_config.json").is_file()
    # the same rows, init and schedule in fp32: the engine's 2 ranks follow the study's loop step by step
    assert r["loss_curve"] == pytest.approx(study[0]["loss_curve"], rel=1e-3)
    assert r["train_loss_first"] == pytest.approx(study[0]["train_loss_first"], rel=1e-4)
    md = (out / "engine-vs-study.md").read_text()
    assert "| toy_parity | multiple_choice | lorasp |" in md and "not identical" in md
    assert "no (task, variant) has two seeds on both sides yet" in md

    # --jobs 2: seeds 1 and 2 launched at once (half a CPU a rank, so both fit the 2-CPU cluster together), each on
    # its own records; each follows its own seed's study run, so no launch read another's rows, masks or output
    code, stdout, stderr = call("--resume", "--seeds", "0", "1", "2", "--jobs", "2", "--cpus-per-worker", "0.5")
    assert code == 0 and stdout.count("engine test") == 2, stdout[-3000:] + stderr[-5000:]
    study = {r["seed"]: r for r in map(json.loads, (out / "study" / "runs.jsonl").read_text().splitlines())
             if r["variant"] == "lorasp"}
    engine = {r["seed"]: r for r in map(json.loads, (out / "engine_runs.jsonl").read_text().splitlines())}
    assert sorted(engine) == [0, 1, 2] and len({r["run_dir"] for r in engine.values()}) == 3
    for seed in (1, 2):
        assert engine[seed]["same_rows"] and engine[seed]["same_rendering"]
        assert engine[seed]["loss_curve"] == pytest.approx(study[seed]["loss_curve"], rel=1e-3)
    assert engine[1]["loss_curve"] != engine[2]["loss_curve"]
    record = json.loads((out / "engine-vs-study.json").read_text())
    (row,) = record["rows"]
    assert row["seeds"] == 3 and row["noise"] is not None

    # --record-only (no --resume needed): the same record from the records alone; no study run, no launch
    records = (out / "engine_runs.jsonl").read_text(), (out / "study" / "runs.jsonl").read_text()
    for suffix in ("json", "md"):
        (out / f"engine-vs-study.{suffix}").unlink()
    code, stdout, stderr = call("--seeds", "0", "1", "2", "--record-only")
    assert code == 0 and "the study:" not in stdout and "engine test" not in stdout, stdout[-3000:] + stderr[-3000:]
    again = json.loads((out / "engine-vs-study.json").read_text())
    assert again["rows"] == record["rows"] and again["engine_runs"] == record["engine_runs"] and again["complete"]
    assert "--record-only" in again["command"]
    # each run's GPU share is its own record's, not the --record-only call's default
    assert again["engine"]["gpus_per_worker"] == record["engine"]["gpus_per_worker"] == 0
    assert {r["gpus_per_worker"] for r in engine.values()} == {0}
    assert again["engine_commands"] == sorted({r["command"] for r in engine.values()})
    assert "the engine runs: 3, made by `" in (out / "engine-vs-study.md").read_text()
    assert ((out / "engine_runs.jsonl").read_text(), (out / "study" / "runs.jsonl").read_text()) == records


def test_compare_judges_the_difference_against_seed_noise():
    """Over seeds: the means, the spread of each side and of the per-seed difference, and the noise the difference is
    judged against, 2 x the standard error of the difference of the two means."""
    quality_engine, quality = load_engine_bench(), load_quality()
    lr = 1e-3

    def runs(tests: list[float]) -> dict:
        return {quality.run_key("toy", "lorasp", seed, lr): {"test": t, "val": 0.5, "val_loss": 1.0, "lr": lr,
                                                              "train_loss_first": 2.0, "train_loss_last": 1.0 + t}
                for seed, t in enumerate(tests)}

    study, engine = runs([0.50, 0.60, 0.70]), runs([0.52, 0.58, 0.76])
    a = SimpleNamespace(variants=["lorasp"], seeds=[0, 1, 2])
    qa = SimpleNamespace(lrs={"adapter": [lr]})
    (row,), missing = quality_engine.compare(study, engine, {"toy": {"metric": "exact_match"}}, a, qa)
    assert missing == 0 and row["seeds"] == 3 and row["lr"] == lr
    assert row["study"] == pytest.approx(60) and row["engine"] == pytest.approx(62) and row["diff"] == pytest.approx(2)
    assert row["study_std"] == pytest.approx(10) and row["engine_std"] == pytest.approx(statistics.stdev([52, 58, 76]))
    assert row["paired_std"] == pytest.approx(statistics.stdev([2, -2, 6]))
    assert row["noise"] == pytest.approx(2 * math.sqrt((row["engine_std"] ** 2 + 10 ** 2) / 3))
    assert row["within_noise"] is True and row["engine_tests"] == [52, 58, 76] and row["study_tests"] == [50, 60, 70]
    # a seed run on one side only: counted as a missing pair, while each side's numbers keep the runs it has
    del engine[quality.run_key("toy", "lorasp", 2, lr)]
    (row,), missing = quality_engine.compare(study, engine, {"toy": {"metric": "exact_match"}}, a, qa)
    assert missing == 1 and row["seeds"] == 2 and row["engine"] == pytest.approx(55)


@pytest.mark.parametrize("flag, value, accepted", [
    ("--gpus-per-worker", "inf", "a finite number >= 0"), ("--gpus-per-worker", "-1", "a finite number >= 0"),
    ("--cpus-per-worker", "nan", "a finite number > 0"), ("--cpus-per-worker", "0", "a finite number > 0"),
    ("--jobs", "0", "a whole number >= 1"),
])
def test_bad_arguments_are_refused_before_any_run(flag, value, accepted, capsys):
    """Refused by the parser, naming the flag, the value and what is accepted, before the study's runs start."""
    with pytest.raises(SystemExit) as exc:
        load_engine_bench().parse_args(["--base", "b", flag, value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"{flag} = {float(value) if flag != '--jobs' else value}" in err and accepted in err


def test_a_second_run_on_the_same_out_is_refused(tmp_path, capsys):
    """One quality_engine.py per --out: a second one would launch the runs the first is launching. It is refused
    before it reads or writes anything, naming --out and the holder; the hold ends with its holder."""
    quality_engine, out = load_engine_bench(), tmp_path / "out"
    argv = ["--base", "b", "--out", str(out), "--work", str(tmp_path / "work")]
    with quality_engine.claim(out):
        with pytest.raises(SystemExit) as exc:
            quality_engine.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and f"--out = '{out}': in use" in err and f"(pid {os.getpid()})" in err
    assert not out.exists() and not (tmp_path / "work").exists()
    with quality_engine.claim(out):  # released
        pass
