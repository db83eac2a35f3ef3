"""The memory model against values computed by hand, and `lorasp plan` end to end (pure CPU, fast)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from lorasp_dist.cli import main
from lorasp_dist.config import ConfigError, load_config, make_lorasp_config, parse_size
from lorasp_dist.lorasp import apply_lorasp
from lorasp_dist.memory.model import (
    CPU_IMPORT_BYTES,
    CPU_RUNTIME_BYTES,
    GPU_COMPONENTS,
    HOST_COMPONENTS,
    PROCESS_BASE_BYTES,
    MemoryPlan,
    full_finetune_bytes,
    plan_for_config,
    plan_memory,
)
from lorasp_dist.memory.plan import check_fits, format_plan_table, search_fitting
from lorasp_dist.model.presets import PRESETS, Preset

GiB = 2**30
REPO = Path(__file__).resolve().parents[1]

# llama-65b: h = 8192, i = 22016, 80 layers, vocab 32000.
LINEAR_65B = 80 * (4 * 8192**2 + 3 * 8192 * 22016)  # 64,760,053,760 weights in the 7 projections
PARAMS_65B = LINEAR_65B + 80 * 2 * 8192 + 2 * 32000 * 8192 + 8192  # + norms, embeddings, lm_head, final norm


def test_parse_size():
    assert parse_size("80GiB") == 80 * GiB
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5TiB") == int(1.5 * 2**40)
    assert parse_size("4096") == 4096
    assert parse_size("24 gb") == 24 * 10**9
    for bad in ("24 gigs", "", "-1GiB", "0", "1.5", "GiB", "12XB"):
        with pytest.raises(ConfigError, match="--gpu-mem = .*accepted"):
            parse_size(bad, "--gpu-mem")
    # in a config, sizes are parsed once, when it is validated: bytes from then on
    assert load_config(None, ["memory.gpu_mem=80GiB"]).memory.gpu_mem == 80 * GiB
    with pytest.raises(ConfigError, match=r"^memory.gpu_mem = 'lots': not a memory size; accepted"):
        load_config(None, ["memory.gpu_mem=lots"])


def test_llama65b_4bit_weights_by_hand():
    # NF4 + double quant: 0.5 B/weight packed + 1 uint8 absmax per 64 weights + 1 fp32 absmax per 256 blocks,
    # + per matrix the 16-entry NF4 and 256-entry 8-bit fp32 code tables and the fp32 offset (1092 B).
    assert LINEAR_65B == 64_760_053_760
    packed = LINEAR_65B // 2
    constants = LINEAR_65B // 64 + 4 * LINEAR_65B // (64 * 256) + 80 * 7 * (16 * 4 + 256 * 4 + 4)
    plan = plan_memory("llama-65b", 1)  # one rank holds the whole partition
    assert plan.gpu["base_weights_4bit"] == packed
    assert plan.gpu["quant_constants"] == constants
    total = packed + constants
    assert 32e9 < total < 35e9, total  # ≈ 0.516 B/weight: 33.4 GB
    # ZeRO-3 splits the packed storage across ranks but every rank holds all of the quant constants.
    two = plan_memory("llama-65b", 2)
    assert two.gpu["base_weights_4bit"] == packed // 2
    assert two.gpu["quant_constants"] == constants


def test_full_finetune_is_16_bytes_per_param():
    assert PRESETS["llama-65b"].num_params() == PARAMS_65B == 65_285_660_672
    total, parts = full_finetune_bytes("llama-65b")
    states = total - parts["activations"]
    assert states == 16 * PARAMS_65B  # bf16 weights 2 + grads 2 + fp32 master 4 + Adam m 4 + v 4
    assert 1.04e12 < states < 1.05e12
    assert parts["activations"] > 0


def test_tiny_cpu_plan_by_hand():
    """tiny: h=128, i=256, 4 layers, 4 heads, vocab 1024; 2 ranks, zero3, micro-batch 1, seq 256, CPU."""
    plan = plan_memory("tiny", 2, seq_len=256, device="cpu")
    assert not any(plan.gpu.values()) and plan.gpu_total == 0
    host = plan.host
    # Every 4-bit projection has at most 8192 storage elements (256×128/4), under the 1e5 persistence threshold:
    # ZeRO-3 keeps it whole on every rank beside its half partition. 163,840 weights per layer -> 81,920 B packed.
    assert host["base_weights_4bit"] == 4 * (81_920 + 40_960)
    # absmax 163,840/64 = 2560 B; nested fp32 absmax: 1 per q/k/v/o (256 blocks), 2 per gate/up/down (512 blocks);
    # code tables 7 × 1092 B.
    assert host["quant_constants"] == 4 * (2560 + 4 * (4 * 1 + 3 * 2) + 7 * 1092)
    # Embeddings and lm_head (131,072 > 1e5 elements) are partitioned; the 9 norms (128) are persistent.
    assert host["bf16_weights"] == 2 * 65_536 * 2 + 9 * (128 + 64) * 2
    # LoRA-SP r=16: per layer A+B of q,k,v,o = 4 × (2048 + 2048) entries, of gate/up = 2048 + 4096, down = 4096 + 2048;
    # half of each trains: 17,408 per layer, 69,632 in all, each persistent (whole + half partition, bf16).
    assert plan.counts["trainable_params"] == 69_632
    assert host["lorasp_params"] == (69_632 + 34_816) * 2
    assert host["lorasp_frozen"] == 69_632 * 2  # the other half, bf16 buffers on every rank
    assert host["lorasp_masks"] == 4 * 139_264  # the int32 slot map: 4 B per entry of A and B
    assert host["optimizer_states"] == 12 * 34_816  # fp32 master + m + v of this rank's half
    # bf16 grad partition + the reduce bucket (only the 69,632 elements gradients fill are resident on CPU) + fp32 grad
    assert host["gradients"] == 2 * 34_816 + 2 * 69_632 + 4 * 34_816
    # Activations with checkpointing: 4 layer inputs (2·h·T) + the final RMSNorm's fp32 upcast and rsqrt
    # ((4·h + 4)·T), T = 256 tokens.
    assert host["activations"] == 4 * 2 * 128 * 256 + (4 * 128 + 4) * 256
    # The peak is the loss: fp32 log-softmax saved + its grad + the input grad (4 + 4 + 4 B) × vocab × T,
    # with the lm_head gathered whole (1024 × 128 bf16); every decoder layer is persistent, so nothing else gathers.
    assert plan.peak_phase == "loss"
    assert host["logits"] == 12 * 1024 * 256
    assert host["zero3_gather_buffers"] == 1024 * 128 * 2
    assert host["dequant_transient"] == 0
    assert host["process_base"] == PROCESS_BASE_BYTES["cpu"]
    # What a CPU rank pays after the baseline beyond its tensors: transformers' model classes and bitsandbytes imported
    # at load, the engine/first-step overhead, and glibc's retained copies of the loss buffers (2.35 × the logits term).
    assert host["library_imports"] == CPU_IMPORT_BYTES["transformers_models"] + CPU_IMPORT_BYTES["bitsandbytes"]
    assert host["runtime_overhead"] == CPU_RUNTIME_BYTES
    assert host["allocator_retention"] == int(2.35 * 12 * 1024 * 256)
    runtime = host["library_imports"] + CPU_RUNTIME_BYTES + host["allocator_retention"]
    # 491,520 + 40,976 + 265,600 + 208,896 + 139,264 + 557,056 + 348,160 + 417,792 + 262,144 + 394,240 + 3,145,728
    assert plan.host_total == PROCESS_BASE_BYTES["cpu"] + 6_271_376 + runtime
    # A 4-bit base is what imports bitsandbytes; a bf16 one (variant=full) does not.
    full = plan_memory("tiny", 2, seq_len=256, device="cpu", variant="full")
    assert full.host["library_imports"] == CPU_IMPORT_BYTES["transformers_models"]


def test_activations_per_layer_by_hand():
    # Per token, tiny (h=128, kv=128, i=256, 4 heads, r=16, 7 targets, bf16): norms 2·(4h + 4) (fp32 upcast and
    # rsqrt), q/k/v input 2h, rotated q, k and v 2·3h, SDPA output (= o_proj input) 2h + logsumexp 4·4, gate/up
    # input 2h, gate/SiLU/up outputs 3·2i, down input 2i, LoRA x·Aᵀ 7·2r = 4856 B;
    # per layer the dense A and B: 2·r·Σ(in + out) = 69,632 B.
    per_token = 2 * (4 * 128 + 4) + 2 * 128 + 6 * 128 + 2 * 128 + 16 + 2 * 128 + 6 * 256 + 2 * 256 + 14 * 16
    assert per_token == 4856
    plan = plan_memory("tiny", 1, seq_len=256, device="cpu")
    assert plan.counts["activations_per_layer"] == per_token * 256 + 2 * 16 * (4 * 256 + 3 * 384)


def _saved_tensor_bytes(preset: Preset, tokens: int) -> int:
    """Bytes of the distinct storages autograd saves in one forward of a real transformers Llama with LoRA-SP."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(preset.hf_config(attn_implementation="sdpa")).to(torch.bfloat16)
    apply_lorasp(model, make_lorasp_config())
    model.to(torch.bfloat16)  # the model assumes LoRA-SP values in the training dtype
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(0, preset.vocab_size, (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(saved.values())


def test_activations_match_saved_tensors():
    """The per-layer activation formula against what autograd really saves (GQA, SwiGLU, SDPA, LoRA-SP, loss)."""
    shape = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
             "vocab_size": 1024}
    two, three = Preset(num_hidden_layers=2, **shape), Preset(num_hidden_layers=3, **shape)
    tokens = 128
    saved2, saved3 = _saved_tensor_bytes(two, tokens), _saved_tensor_bytes(three, tokens)
    plan = plan_memory(two, 1, seq_len=tokens, gradient_checkpointing=False, device="cpu")
    assert saved3 - saved2 == plan.counts["activations_per_layer"]
    # The whole forward: stored activations + log_softmax's fp32 output; rotary cos/sin and labels are left out.
    predicted = plan.counts["activations_stored"] + plan.counts["logits_saved"]
    assert plan.counts["logits_saved"] == 4 * 1024 * tokens
    assert predicted == pytest.approx(saved2, rel=0.01)


def test_lora_vs_lorasp_optimizer_halves():
    sp = plan_memory("llama-65b", 2)
    lora = plan_memory("llama-65b", 2, variant="lora")
    ratio = sp.gpu["optimizer_states"] / lora.gpu["optimizer_states"]
    assert ratio == pytest.approx(0.5, abs=0.01)
    assert sp.counts["trainable_params"] * 2 == lora.counts["trainable_params"]
    assert lora.gpu["lorasp_frozen"] == 0  # plain LoRA freezes nothing of A and B
    fa = plan_memory("llama-65b", 2, variant="lora-fa")
    assert fa.gpu["optimizer_states"] < lora.gpu["optimizer_states"]


def test_offload_moves_optimizer_to_host():
    on_gpu = plan_memory("llama-65b", 2, ds_config="zero3")
    opt = plan_memory("llama-65b", 2, ds_config="zero3_offload_optimizer")
    everything = plan_memory("llama-65b", 2, ds_config="zero3_offload_all")
    assert on_gpu.gpu["optimizer_states"] > 0 and on_gpu.host["offloaded_optimizer"] == 0
    assert opt.gpu["optimizer_states"] == 0
    assert opt.host["offloaded_optimizer"] == on_gpu.gpu["optimizer_states"]
    assert opt.host["pinned_buffers"] > 0 and opt.gpu["gradients"] < on_gpu.gpu["gradients"]
    assert everything.gpu["base_weights_4bit"] == 0 and everything.host["offloaded_params"] > 16e9
    assert on_gpu.gpu_total > opt.gpu_total > everything.gpu_total
    assert everything.host_total > opt.host_total > on_gpu.host_total


def test_zero3_gathers_llama7b_by_hand():
    """What ZeRO-3's gathers cost for llama-7b: nothing on one GPU without offload, a prefetch window otherwise."""
    # World size 1 without offload: a gather is partition.to(device), the partition itself; nothing is added.
    plain = plan_memory("llama-7b", 1, ds_config="zero3")
    assert plain.gpu["zero3_gather_buffers"] == 0
    # With offload_param each gather is a copy on the GPU. The prefetcher keeps stage3_max_live_parameters = 1e9
    # elements gathered, plus the parameter that crosses the line (at most the largest layer weight, gate/up/down:
    # 4096 × 11008 / 4 = 11,272,192 bf16 storage elements of packed 4-bit).
    window = (10**9 + 11_272_192) * 2
    off = plan_memory("llama-7b", 1, ds_config="zero3_offload_all")
    assert off.gpu["zero3_gather_buffers"] == window
    # The all-gather stream's pool also holds one more window of released gathers the GPU has yet to read, at most
    # what the step still gathers from the loss on: the lm_head (32000 × 4096 bf16) and the 32 layers' packed
    # weights ((4 × 4096² + 3 × 4096 × 11008) / 2 B each): 3,500,146,688 B.
    ahead = 32000 * 4096 * 2 + 32 * (4 * 4096**2 + 3 * 4096 * 11008) // 2
    assert ahead == 3_500_146_688
    compute_pool = off.gpu_peak_reserved - off.gpu["allocator_fragmentation"] - window
    assert off.gpu["allocator_fragmentation"] == int(compute_pool * 0.08) + min(window, ahead - window)
    # Two GPUs: every gather is an all-gather into a new buffer, so the window is there without offload too; it is
    # larger than what reuse alone keeps (the head + 5 layers within stage3_max_reuse_distance).
    two = plan_memory("llama-7b", 2, ds_config="zero3")
    assert two.counts["retained_layers"] == 5 and two.gpu["zero3_gather_buffers"] == window
    # No prefetch, no window: only the reused layers and the head stay gathered.
    no_prefetch = plan_memory("llama-7b", 2, ds_overrides={"zero_optimization": {"stage3_prefetch_bucket_size": 0}})
    assert no_prefetch.gpu["zero3_gather_buffers"] == 32000 * 4096 * 2 + 5 * (4 * 4096**2 + 3 * 4096 * 11008) // 2


def test_one_gpu_bench_records_within_10_percent():
    """The committed one-GPU bench records (bench/results/records.jsonl, run gpu1-142129, 1× H200): predicted peak
    reserved within ±10% of the measured torch.cuda.max_memory_reserved."""
    path = REPO / "bench" / "results" / "records.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["run_id"] == "gpu1-142129"]
    assert len(rows) == 4
    for r in rows:
        plan = plan_memory(r["preset"], r["gpus"], micro_batch=r["micro_batch"], seq_len=r["seq_len"],
                           ds_config=r["ds_config"], r=r["rank"], variant=r["variant"])
        error = (r["peak_reserved_gib"] * GiB - plan.gpu_peak_reserved) / plan.gpu_peak_reserved
        print(f"{r['preset']} {r['ds_config']}: measured {r['peak_reserved_gib']:.2f} GiB, "
              f"predicted {plan.gpu_peak_reserved / GiB:.2f} GiB, error {error:+.1%}")
        assert abs(error) <= 0.10, (r["preset"], r["ds_config"], error)


def test_checkpointing_reduces_activations():
    gc = plan_memory("llama-65b", 2, gradient_checkpointing=True)
    no_gc = plan_memory("llama-65b", 2, gradient_checkpointing=False)
    assert gc.gpu["activations"] < no_gc.gpu["activations"] / 10
    # Without checkpointing all 80 layers' activations are stored, ≈ 0.7 GB each at seq 2048 (the final norm's
    # saves cancel layer 0's input norm, which saves nothing under frozen embeddings).
    assert no_gc.counts["activations_stored"] == 80 * no_gc.counts["activations_per_layer"]
    assert no_gc.gpu["activations"] >= no_gc.counts["activations_stored"]


def test_micro_batch_scales_activations():
    one = plan_memory("llama-7b", 2, micro_batch=1)
    four = plan_memory("llama-7b", 2, micro_batch=4)
    assert four.gpu["activations"] + four.gpu["logits"] > 3 * (one.gpu["activations"] + one.gpu["logits"])


def test_world_size_shrinks_partitioned_components():
    two, eight = plan_memory("llama-65b", 2), plan_memory("llama-65b", 8)
    for name in ("base_weights_4bit", "bf16_weights", "lorasp_params", "optimizer_states", "gradients"):
        assert eight.gpu[name] < two.gpu[name], name
    assert eight.gpu["base_weights_4bit"] == two.gpu["base_weights_4bit"] // 4
    for name in ("quant_constants", "lorasp_frozen", "lorasp_masks", "activations"):  # never partitioned
        assert eight.gpu[name] == two.gpu[name], name


def test_full_variant_is_16_bytes_per_param_per_rank():
    plan = plan_memory("llama-7b", 8, variant="full")
    n = PRESETS["llama-7b"].num_params()
    states = plan.gpu["bf16_weights"] + plan.gpu["optimizer_states"] + plan.gpu["gradients"]
    assert plan.gpu["base_weights_4bit"] == plan.gpu["quant_constants"] == plan.gpu["lorasp_params"] == 0
    # 16 B/param / 8 ranks, plus the reduce bucket, the fp32 gradient of one optimizer sub-group and the
    # persistent norms: within 10% above the bare 2 N.
    assert 16 * n / 8 < states < 1.1 * 16 * n / 8 + 5 * 10**9


def test_cluster_total_against_full_finetune():
    plan = plan_memory("llama-65b", 2)
    ratio = plan.cluster_total / plan.full_ft_bytes
    print(f"llama-65b on 2 GPUs: cluster {plan.cluster_total / 1e9:.1f} GB vs full fine-tune "
          f"{plan.full_ft_bytes / 1e12:.3f} TB = {100 * ratio:.2f}%")
    assert ratio < 0.08


def test_plan_round_trips_and_has_stable_keys():
    plan = plan_memory("llama-13b", 4, micro_batch=2, ds_config="zero3_offload_optimizer")
    assert set(plan.gpu) == set(GPU_COMPONENTS)
    assert set(plan.host) == set(HOST_COMPONENTS + GPU_COMPONENTS)
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["gpu_total"] == plan.gpu_total and d["gpu_peak_reserved"] == plan.gpu_total - plan.gpu["cuda_context"]
    again = MemoryPlan.from_dict(d)
    assert again == plan and again.cluster_total == plan.cluster_total
    assert again.replan().gpu == plan.gpu


def test_plan_for_config_and_checkpoint_shapes(tmp_path):
    cfg = load_config(None, ["launcher.gpus_per_worker=0"])
    plan = plan_for_config(cfg, 2, device="cpu")
    assert plan.preset == "tiny" and plan.seq_len == cfg.data.seq_len and plan.gpu_total == 0
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shapes = {k: getattr(PRESETS["llama-7b"], k) for k in
              ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")}
    (ckpt / "config.json").write_text(json.dumps(shapes))
    cfg = load_config(None, [f"model.path={ckpt}", "model.preset=null", "data.seq_len=2048",
                             "deepspeed.overrides={zero_optimization: {reduce_bucket_size: 1000}}"])
    from_path = plan_for_config(cfg, 2)
    preset = plan_memory("llama-7b", 2)
    assert from_path.preset == str(ckpt)
    assert from_path.gpu["base_weights_4bit"] == preset.gpu["base_weights_4bit"]
    assert from_path.gpu["gradients"] < preset.gpu["gradients"]  # the 1000-element reduce bucket


def test_check_fits():
    cfg = load_config(None, ["model.preset=llama-65b", "data.seq_len=2048", "launcher.gpus_per_worker=1"])
    ok, table = check_fits(cfg, 2, 80 * GiB)
    assert ok and "fits:" in table
    ok, table = check_fits(cfg, 2, 24 * GiB)
    assert not ok and "does not fit" in table and "base_weights_4bit" in table


def test_search_finds_fastest_fitting_setting():
    found = search_fitting("llama-65b", 2, "24GiB")
    assert found and all(p.gpu_total <= 24 * GiB for p in found)
    order = ["zero3", "zero3_offload_optimizer", "zero3_offload_all"]
    keys = [(order.index(p.ds_config), p.gradient_checkpointing, -p.micro_batch) for p in found]
    assert keys == sorted(keys)
    assert found[0].ds_config == "zero3_offload_all"  # 4-bit base halves are 15 GiB per rank; the rest must go
    assert "fits:" in format_plan_table(found[0], 24 * GiB)


def test_cli_plan_preset(capsys):
    assert main(["plan", "--preset", "llama-65b", "--gpus", "2", "--gpu-mem", "24GiB"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "base_weights_4bit" in out and "does not fit" in out
    assert "fastest setting that fits" in out
    assert "deepspeed.config=zero3_offload_all train.micro_batch_size=" in out


def test_cli_plan_json(capsys):
    assert main(["plan", "--preset", "llama-7b", "--gpus", "2", "--gpu-mem", "80GiB", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fits"] and doc["plan"]["preset"] == "llama-7b"
    assert doc["fastest_overrides"].startswith("deepspeed.config=zero3 ")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "llama-99b", "--gpus", "2", "--gpu-mem", "24GiB"], "--preset = 'llama-99b': unknown preset"),
        (["--preset", "llama-65b", "--gpus", "0", "--gpu-mem", "24GiB"], "--gpus = 0"),
        (["--preset", "llama-65b", "--gpus", "2", "--gpu-mem", "24 gigs"], "--gpu-mem = '24 gigs'"),
        (["--preset", "llama-65b", "--gpus", "2", "--gpu-mem", "24GiB", "--host-mem", "lots"], "--host-mem = 'lots'"),
    ],
)
def test_cli_plan_bad_input(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("error: ") and message in err
    assert len(err.splitlines()) == 1 and captured.out == ""
