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
from lorasp_dist.data import load_tokenizer, train_tokenizer
from lorasp_dist.lorasp import LoRASPConfig, apply_lorasp, lorasp_layers
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
def test_quality_smoke_runs_every_variant(tmp_path, tiny_base):
    bb, out = write_tasks(tmp_path), tmp_path / "results"
    cmd = [sys.executable, str(REPO / "bench" / "quality.py"), "--smoke", "--device", "cpu",
           "--bigbench-dir", str(bb), "--base", str(tiny_base), "--work", str(tmp_path / "work"), "--out", str(out),
           "--tasks", "toy_parity", "toy_next"]
    # One thread: the tiny model gains nothing from more, and on a shared CPU spinning threads cost seconds a run.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def quality(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*cmd, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    # A call that runs out of --time-budget stops between runs with partial results; --resume finishes the study.
    first = quality("--time-budget", "1")
    assert first.returncode == 0 and "stopped by --time-budget" in first.stdout, first.stdout + first.stderr[-3000:]
    assert not json.loads((out / "summary.json").read_text())["complete"]
    assert "INCOMPLETE" in (out / "README.md").read_text()
    proc = quality("--resume")
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
    again = quality("--resume")
    assert again.returncode == 0 and "0 runs to do" in again.stdout
    assert len((out / "runs.jsonl").read_text().splitlines()) == len(runs)
    refused = quality()
    assert refused.returncode != 0 and "--resume" in refused.stderr


def test_merged_adapter_scores_like_the_wrapped_one(tiny_base):
    """quality.py evaluates adapters merged into the base: the logits must be those of the wrapped model."""
    spec = importlib.util.spec_from_file_location("quality", REPO / "bench" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
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
