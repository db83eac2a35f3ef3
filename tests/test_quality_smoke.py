"""bench/quality.py --smoke end to end on CPU: a tiny random LLaMA with a sentencepiece tokenizer trained on the
built-in corpus, two BIG-bench-style tasks written here (one multiple choice, one short answer), every variant."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from lorasp_dist.config import DataConfig
from lorasp_dist.data import build_datasets, load_tokenizer, micro_batch_indices, train_tokenizer
from lorasp_dist.lorasp import LoRASPConfig, apply_lorasp, lorasp_layers
from lorasp_dist.model.quant import make_linear4bit, quantize_nf4
from lorasp_dist.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {"lorasp", "lora", "lora-fa", "full", "lorasp-resample"}


def write_tasks(root: Path, n: int = 40) -> Path:
    tasks = root / "bigbench" / "benchmark_tasks"
    mc = [{"input": f"Is {i} even or odd?", "target_scores": {"even": int(i % 2 == 0), "odd": int(i % 2 == 1)}}
          for i in range(n)]
    gen = [{"input": f"What comes after {i}?", "target": str(i + 1)} for i in range(n)]
    for name, examples in (("toy_parity", mc), ("toy_next", gen)):
        (tasks / name).mkdir(parents=True)
        (tasks / name / "task.json").write_text(json.dumps({"name": name, "examples": examples}))
    return root


def load_quality():
    spec = importlib.util.spec_from_file_location("quality", REPO / "bench" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    return quality


def quality_here(args: list[str], capsys) -> subprocess.CompletedProcess:
    """bench/quality.py's main() in this process, its exit and output as a process's: a process of its own would spend
    seconds importing torch (test_two_shards_share_one_runs_file runs the script as processes, two at once). The
    worker computes on one thread, as OMP_NUM_THREADS=1 makes the script's own process do (conftest.py)."""
    capsys.readouterr()
    try:
        code = load_quality().main(args)
    except SystemExit as e:  # as the interpreter ends a script: a message goes to stderr with exit 1
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("base")
    tok = load_tokenizer(train_tokenizer(DataConfig(mode="instruction"), root / "tok", vocab_size=512))
    torch.manual_seed(0)
    config = PRESETS["tiny"].hf_config(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    return root / "base"


@pytest.mark.slow
def test_quality_smoke_runs_every_variant(tmp_path, tiny_base, capsys):
    bb, out = write_tasks(tmp_path), tmp_path / "results"
    cmd = ["--smoke", "--device", "cpu", "--bigbench-dir", str(bb), "--base", str(tiny_base), "--work",
           str(tmp_path / "work"), "--out", str(out), "--tasks", "toy_parity", "toy_next"]

    # A call that runs out of --time-budget stops between runs with partial results; --resume finishes the study.
    first = quality_here([*cmd, "--time-budget", "1"], capsys)
    assert first.returncode == 0 and "stopped by --time-budget" in first.stdout, first.stdout + first.stderr[-3000:]
    assert not json.loads((out / "summary.json").read_text())["complete"]
    assert "INCOMPLETE" in (out / "README.md").read_text()
    proc = quality_here([*cmd, "--resume"], capsys)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    by = {(r["task"], r["variant"]): [] for r in runs}
    for r in runs:
        by[r["task"], r["variant"]].append(r)
    for task, metric in (("toy_parity", "multiple_choice"), ("toy_next", "exact_match")):
        assert {v for t, v in by if t == task} == VARIANTS | {"base"}
        for v in VARIANTS:
            assert len(by[task, v]) == 2  # the smoke grid has two rates per family, one seed
            assert all(r["metric"] == metric and 0 <= r["test"] <= 1 and "val" in r for r in by[task, v])
        lora, lorasp = by[task, "lora"][0], by[task, "lorasp"][0]
        assert lorasp["optimizer_state_bytes"] <= 0.55 * lora["optimizer_state_bytes"]
        assert lorasp["trainable"] <= 0.5 * lora["trainable"] + 1
        assert lorasp["b_zero_fraction"] == pytest.approx(0.5, abs=0.01)  # the frozen half of B never moves
        assert by[task, "lorasp-resample"][0]["b_zero_fraction"] < 0.45  # redrawn masks reach the other half
        assert lora["b_zero_fraction"] < 0.05 and by[task, "full"][0]["b_zero_fraction"] is None
        assert all(r["tokens"] == lora["tokens"] for v in VARIANTS for r in by[task, v])  # same tokens everywhere
    assert by["toy_parity", "base"][0]["kind"] == "classification"
    assert by["toy_next", "base"][0]["kind"] == "generation"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["comparison"] is not None
    assert {r["variant"] for r in summary["rows"] if r["task"] == "average"} == VARIANTS | {"base"}
    assert sum(r["chosen"] for r in json.loads((out / "sweep.json").read_text())["rows"]) == 2 * len(VARIANTS)
    assert (out / "quality.png").read_bytes()[:4] == b"\x89PNG"
    readme = (out / "README.md").read_text()
    assert "LoRA-SP vs LoRA" in readme and "The frozen half of B" in readme

    # Once complete, --resume finds nothing left to run; without it, the script refuses to start the study again.
    again = quality_here([*cmd, "--resume"], capsys)
    assert again.returncode == 0 and "0 runs to do" in again.stdout
    assert len((out / "runs.jsonl").read_text().splitlines()) == len(runs)
    refused = quality_here(cmd, capsys)
    assert refused.returncode != 0 and "--resume" in refused.stderr


def test_merged_adapter_scores_like_the_wrapped_one(tiny_base):
    """quality.py evaluates adapters merged into the base: the logits must be those of the wrapped model."""
    quality = load_quality()
    model = apply_lorasp(LlamaForCausalLM.from_pretrained(tiny_base), LoRASPConfig(r=4, alpha=8, seed=1))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lorasp_layers(model):
            layer.lora_B.train_values.copy_(torch.randn(layer.lora_B.train_values.shape, generator=gen) * 0.1)
    ids = torch.randint(3, 100, (2, 12), generator=gen)
    with torch.no_grad():
        bare = LlamaForCausalLM.from_pretrained(tiny_base)(ids).logits
        wrapped = model(ids).logits
        merged = quality.merge_adapters(model)(ids).logits
    assert not lorasp_layers(model)  # plain nn.Linear again
    assert (wrapped - bare).abs().max() > 1e-3  # the adapter does change the outputs
    torch.testing.assert_close(merged, wrapped, rtol=1e-4, atol=1e-4)


def first_batch(quality, args: list[str], task: str) -> dict:
    """The rows quality.py trains on at step 0 of seed 0, rebuilt with the script's own settings."""
    a = quality.parse_args(args)
    tasks = quality.prepare_tasks([task], Path(a.work), None)
    base = Path(a.base)
    rows = build_datasets(quality.run_config(a, base, tasks[task], 1e-3), load_tokenizer(base))[0]
    return rows[micro_batch_indices(len(rows), a.seeds[0], 0, a.batch_size, 0, 1, 1)[0]]


def loss_on(model, batch: dict) -> float:
    with torch.no_grad():
        return model(**batch, use_cache=False).loss.item()


def test_base_4bit_trains_on_the_engines_nf4_base(tmp_path, tiny_base, capsys):
    """--base-4bit: the first step's loss (B = 0, so the base's own) is that of the dense checkpoint with every
    decoder linear put through quantize_nf4 + make_linear4bit by hand, not the dense model's."""
    bb, out = write_tasks(tmp_path), tmp_path / "results"
    args = ["--smoke", "--device", "cpu", "--base", str(tiny_base), "--work", str(tmp_path / "work"),
            "--tasks", "toy_parity", "--variants", "lorasp", "--steps", "2", "--lrs", "adapter=1e-3"]
    refused = quality_here([*args, "--bigbench-dir", str(bb), "--out", str(out), "--base-4bit", "--variants", "full"],
                           capsys)
    assert refused.returncode == 2 and refused.stderr.startswith("error: --variants = full:"), refused.stderr
    proc = quality_here([*args, "--bigbench-dir", str(bb), "--out", str(out), "--base-4bit"], capsys)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()
              if json.loads(line)["variant"] == "lorasp"]

    quality = load_quality()
    batch = first_batch(quality, args, "toy_parity")
    dense = LlamaForCausalLM.from_pretrained(tiny_base)
    dense_loss = loss_on(dense, batch)
    for layer in dense.model.layers:
        for name, m in list(layer.named_modules()):
            if isinstance(m, torch.nn.Linear):
                parent, _, child = name.rpartition(".")
                nf4 = make_linear4bit(quantize_nf4(m.weight.detach().to(torch.bfloat16)), "cpu")
                setattr(layer.get_submodule(parent), child, nf4)
    by_hand = loss_on(dense, batch)
    assert abs(by_hand - dense_loss) > 1e-4  # quantization does move the loss
    assert run["train_loss_first"] == pytest.approx(by_hand, abs=1e-5)
    assert len(run["loss_curve"]) == 2 and 0 <= run["test"] <= 1

    # The 4-bit runs have their own settings key: a dense study in the same folder never resumes them.
    dense_run = quality_here([*args, "--out", str(out), "--resume"], capsys)
    assert dense_run.returncode == 0 and "runs to do" in dense_run.stdout
    keys = {json.loads(line)["settings_key"] for line in (out / "runs.jsonl").read_text().splitlines()}
    assert len(keys) == 2


def test_packed_examples_do_not_see_each_other(tmp_path, tiny_base, capsys):
    """Rows pack several examples; the study must train on them as the engine does (position ids restarting at each
    example, hence a block-diagonal mask), so its first-step loss is the loss with the rows' position ids."""
    bb, out = write_tasks(tmp_path), tmp_path / "results"
    args = ["--smoke", "--device", "cpu", "--base", str(tiny_base), "--work", str(tmp_path / "work"),
            "--tasks", "toy_parity", "--variants", "lora", "--steps", "1", "--lrs", "adapter=1e-3",
            "--max-seq-len", "160"]
    proc = quality_here([*args, "--bigbench-dir", str(bb), "--out", str(out)], capsys)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = [r for r in map(json.loads, (out / "runs.jsonl").read_text().splitlines()) if r["variant"] == "lora"]

    batch = first_batch(load_quality(), args, "toy_parity")
    restarts = (batch["position_ids"][:, 1:] == 0) & (batch["labels"][:, 1:] != -100).cumsum(1).flip(1).bool()
    assert restarts.any()  # a second example starts inside a row, before its scored end
    model = LlamaForCausalLM.from_pretrained(tiny_base)
    packed = loss_on(model, batch)
    leaking = loss_on(model, {k: v for k, v in batch.items() if k != "position_ids"})
    assert abs(packed - leaking) > 1e-4
    assert run["train_loss_first"] == pytest.approx(packed, abs=1e-5)


def test_eval_every_writes_curves_and_their_chart(tmp_path, tiny_base, capsys):
    bb, out = write_tasks(tmp_path), tmp_path / "results"
    args = ["--smoke", "--device", "cpu", "--base", str(tiny_base), "--work", str(tmp_path / "work"),
            "--bigbench-dir", str(bb), "--out", str(out), "--tasks", "toy_parity", "--variants", "lorasp", "lora",
            "--steps", "5", "--seeds", "0", "1", "--lrs", "adapter=1e-3"]
    bad = quality_here([*args, "--eval-every", "-1"], capsys)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --eval-every = -1: "), bad.stderr
    proc = quality_here([*args, "--eval-every", "2"], capsys)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    (base,) = [r for r in runs if r["variant"] == "base"]
    assert [p["tokens"] for p in base["curve"]] == [0]
    trained = [r for r in runs if r["variant"] != "base"]
    assert len(trained) == 4  # two variants x (one rate + a second seed)
    per_step = 2 * 64  # the smoke's batch x sequence length
    for r in trained:
        assert [(p["step"], p["tokens"]) for p in r["curve"]] == [(s, s * per_step) for s in (2, 4, 5)]
        assert all(0 <= p["val"] <= 1 for p in r["curve"])
        if "val" in r:  # the last point is the run's own validation score
            assert r["curve"][-1]["val"] == r["val"]
    # The chart's line: the zero-shot point, then the mean over the two seeds at every step.
    quality = load_quality()
    done = {quality.run_key(r["task"], r["variant"], r["seed"], r["lr"]): r for r in runs}
    summary = json.loads((out / "summary.json").read_text())
    curves = quality.mean_curves(summary, done, {"toy_parity": {}}, ["lorasp", "lora"])
    lora = [r["curve"] for r in trained if r["variant"] == "lora"]
    assert curves["toy_parity", "lora"] == [(0, base["curve"][0]["val"])] + [
        (a["tokens"], (a["val"] + b["val"]) / 2) for a, b in zip(*lora)]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "curves.png" in (out / "README.md").read_text()


def test_two_shards_share_one_runs_file(tmp_path, tiny_base, capsys):
    """--shard 0/2 and 1/2 at the same time: every line of runs.jsonl whole, no run done twice; a second round does
    the seed runs whose sweep the other shard had not finished, and a call without --shard then finds the study
    complete."""
    bb, out = write_tasks(tmp_path), tmp_path / "results"
    args = [sys.executable, str(REPO / "bench" / "quality.py"), "--smoke", "--device", "cpu", "--base",
            str(tiny_base), "--work", str(tmp_path / "work"), "--bigbench-dir", str(bb), "--out", str(out),
            "--tasks", "toy_parity", "--variants", "lorasp", "lora", "--steps", "2", "--seeds", "0", "1", "--resume"]
    bad = quality_here([*args[2:], "--shard", "2/2"], capsys)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --shard = 2/2: "), bad.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def both_shards() -> None:
        procs = [subprocess.Popen([*args, "--shard", f"{i}/2"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for i in range(2)]
        for p in procs:
            log = p.communicate(timeout=300)[0]
            assert p.returncode == 0 and "when every shard is" in log, log[-3000:]

    both_shards()
    both_shards()  # picks up whatever seed run waited on the other shard's sweep
    runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]  # every line parses
    keys = [(r["task"], r["variant"], r["seed"], r["lr"]) for r in runs]
    assert len(keys) == len(set(keys)) == 1 + 2 * (2 + 1)  # zero-shot + 2 variants x (2 rates + 1 more seed)
    assert not (out / "summary.json").exists()  # shards leave the summary to the last call
    only = quality_here([*args[2:], "--summary-only"], capsys)  # from the records alone: no model, nothing trained
    assert only.returncode == 0 and "7 of 7 runs" in only.stdout, only.stdout[-3000:] + only.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["complete"] and (out / "README.md").is_file()
    assert [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()] == runs
    final = quality_here(args[2:], capsys)
    assert final.returncode == 0 and "0 runs to do" in final.stdout, final.stdout[-3000:] + final.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["complete"]


def test_settings_key_keeps_runs_across_a_wider_grid():
    quality = load_quality()
    a = quality.parse_args(["--smoke", "--base", "b"])
    wider = quality.parse_args(["--smoke", "--base", "b", "--lrs", "adapter=3e-4,1e-3,3e-3,1e-2"])
    key = quality.settings_key(quality.settings_of(a, Path("b"), "fp32"))
    assert quality.settings_key(quality.settings_of(wider, Path("b"), "fp32")) == key
    longer = quality.parse_args(["--smoke", "--base", "b", "--steps", "60"])
    assert quality.settings_key(quality.settings_of(longer, Path("b"), "fp32")) != key
    nf4 = quality.parse_args(["--smoke", "--base", "b", "--base-4bit"])
    assert quality.settings_key(quality.settings_of(nf4, Path("b"), "fp32")) != key


def test_a_torn_last_record_is_a_run_not_done(tmp_path):
    """A run killed while appending its record leaves part of a line: reading skips it (that run is redone on
    --resume) and the next append starts a line of its own. A bad line elsewhere was edited or damaged: an error."""
    quality = load_quality()
    path = tmp_path / "runs.jsonl"
    record = {"settings_key": "k", "task": "t", "variant": "lorasp", "seed": 0, "lr": 1e-3}
    quality.append_line(path, json.dumps(record))
    with open(path, "a") as f:
        f.write('{"settings_key": "k", "task": "t", "vari')
    assert list(quality.read_runs(path, "k")) == [quality.run_key("t", "lorasp", 0, 1e-3)]
    quality.append_line(path, json.dumps({**record, "seed": 1}))
    assert len(quality.read_runs(path, "k")) == 2 and len(path.read_text().splitlines()) == 2
    path.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(SystemExit, match=r"runs.jsonl:2: not a JSON line"):
        quality.read_runs(path, "k")
