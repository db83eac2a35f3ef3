"""bench/baseline_fsdp.py (the FSDP + QLoRA anchor) on CPU: two torchrun ranks (gloo), real torch FSDP full shard of
a real bitsandbytes 4-bit base from `lorasp prepare-base --preset tiny`; plus its refusals and its record."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ports import free_ports

from lorasp_dist.model.synthetic import write_prequantized
from lorasp_dist.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "baseline_fsdp.py"
sys.path.insert(0, str(REPO / "bench"))
from results_io import RECORD_FIELDS  # noqa: E402

spec = importlib.util.spec_from_file_location("baseline_fsdp", SCRIPT)
baseline_fsdp = importlib.util.module_from_spec(spec)
spec.loader.exec_module(baseline_fsdp)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return Path(write_prequantized("tiny", tmp_path_factory.mktemp("base") / "tiny"))


def run(*args: str, nproc: int = 0, timeout: float = 600) -> subprocess.CompletedProcess:
    launch = [sys.executable, str(SCRIPT)]
    if nproc:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
                  "127.0.0.1", "--master_port", str(free_ports(1)[0]), str(SCRIPT)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the tiny model gains nothing from more threads
    return subprocess.run([*launch, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


@pytest.mark.slow
def test_fsdp_qlora_run_shards_and_writes_a_record(tmp_path, tiny_base):
    steps, seq = 5, 64
    proc = run("--base", str(tiny_base), "--seq-len", str(seq), "--steps", str(steps), "--run-id", "smoke",
               "--results", str(tmp_path), nproc=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    records = [json.loads(line) for line in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len(records) == 1  # rank 0 only
    r = records[0]
    assert set(RECORD_FIELDS) <= set(r)
    assert (r["system"], r["ds_config"], r["run_id"], r["preset"]) == ("fsdp-qlora", "fsdp-full-shard", "smoke", "tiny")
    assert (r["gpus"], r["micro_batch"], r["seq_len"], r["rank"], r["zero_stage"]) == (2, 1, seq, 16, None)
    assert 0 < r["tokens_per_s_min"] <= r["tokens_per_s_per_gpu"] <= r["tokens_per_s_max"]
    assert r["mfu"] == pytest.approx(4 * PRESETS["tiny"].num_params() * r["tokens_per_s_per_gpu"] / 790e12)
    assert r["peak_reserved_gib"] is None and r["load_peak_reserved_gib"] is None  # CPU: no CUDA allocator
    assert r["host_rss_gib"] > 0 and r["load_s"] > 0
    # The proof of sharding the script refuses to report without: one unit per decoder layer, half the elements each.
    fsdp = r["fsdp"]
    assert fsdp["decoder_layer_units"] == PRESETS["tiny"].num_hidden_layers
    assert 0.45 < fsdp["local_fraction"] <= 0.55


@pytest.mark.slow
def test_one_rank_is_refused_before_loading(tmp_path, tiny_base):
    proc = run("--base", str(tiny_base), "--results", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: WORLD_SIZE = 1: FSDP full shard needs 2 or more ranks (torchrun --nproc_per_node N)"]
    assert not (tmp_path / "records.jsonl").exists()


@pytest.mark.parametrize("args, message", [
    (["--steps", "3"], "--steps = 3: more than the 3 warm-up steps"),
    (["--micro-batch", "0"], "--micro-batch = 0: a positive integer"),
    (["--run-id", "a/../b"], "--run-id = 'a/../b': letters, digits, '.', '_' and '-'"),
])
def test_bad_arguments_are_one_line(tiny_base, args, message):
    a = baseline_fsdp.parse_args(["--base", str(tiny_base), *args])
    with pytest.raises(baseline_fsdp.BadInput, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        baseline_fsdp.check_args(a, world=2)


def test_a_base_that_is_not_bf16_storage_4bit_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_storage": "uint8"}}))
    a = baseline_fsdp.parse_args(["--base", str(tmp_path)])
    with pytest.raises(baseline_fsdp.BadInput, match="bnb_4bit_quant_storage bfloat16"):
        baseline_fsdp.check_args(a, world=2)
    a = baseline_fsdp.parse_args(["--base", str(tmp_path / "missing")])
    with pytest.raises(baseline_fsdp.BadInput, match="readable config.json"):
        baseline_fsdp.check_args(a, world=2)


def test_record_is_the_median_after_warm_up():
    a = baseline_fsdp.parse_args(["--base", "x", "--seq-len", "100", "--micro-batch", "2"])
    ctx = {"run_id": "r", "date": "d", "git_rev": "g", "device": "2x H200", "command": "c"}
    times = [9.0, 9.0, 9.0, 1.0, 2.0, 4.0]  # the first three are warm-up
    r = baseline_fsdp.build_record(a, ctx, preset="llama-65b", n_params=65_000_000_000, world=2, step_times=times,
                                   reserved=30 * 1024**3, nvml=31 * 1024**3, rss=2 * 1024**3, load_s=5.0,
                                   load_peak=20 * 1024**3, shard={"local_fraction": 0.5})
    assert set(RECORD_FIELDS) <= set(r)
    assert (r["tokens_per_s_per_gpu"], r["tokens_per_s_min"], r["tokens_per_s_max"]) == (100.0, 50.0, 200.0)
    assert r["mfu"] == pytest.approx(4 * 65e9 * 100 / 790e12)
    assert (r["peak_reserved_gib"], r["peak_nvml_gib"], r["load_peak_reserved_gib"]) == (30, 31, 20)
    assert r["cluster_total_gb"] == pytest.approx(2 * (31 + 2) * 1024**3 / 1e9)


def test_sharding_refuses_a_model_that_is_not_sharded(tiny_base):
    """A model FSDP never wrapped, or wrapped without sharding, is no FSDP full-shard run: no record."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.distributed.init_process_group("gloo", rank=0, world_size=1, store=torch.distributed.HashStore())
    try:
        model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.bfloat16)
        layer_cls, layers = type(model.model.layers[0]), len(model.model.layers)
        model = get_peft_model(model, LoraConfig(r=4, target_modules=baseline_fsdp.PROJECTIONS, task_type="CAUSAL_LM"))
        n = sum(p.numel() for p in model.parameters())
        with pytest.raises(RuntimeError, match="not FullyShardedDataParallel"):
            baseline_fsdp.sharding(model, n, layer_cls, layers, world=2)
        wrapped = baseline_fsdp.wrap(model, torch.device("cpu"))  # one rank: torch turns FULL_SHARD into NO_SHARD
        with pytest.raises(RuntimeError, match=r"use \['ShardingStrategy.NO_SHARD'\], not FULL_SHARD"):
            baseline_fsdp.sharding(wrapped, n, layer_cls, layers, world=1)
    finally:
        torch.distributed.destroy_process_group()
