"""The LoRA-SP method on a tiny LlamaForCausalLM (random init, CPU): counts, frozen entries, optimizer state,
forward equation, mask properties, resampling, state dicts and the PEFT round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lorasp_dist.config import LLAMA_PROJECTIONS, ConfigError, LoRASPConfig, trainable_count
from lorasp_dist.lorasp import (
    apply_lorasp,
    count_parameters,
    export_peft_adapter,
    load_lorasp_state_dict,
    lorasp_layers,
    lorasp_state_dict,
    resample_masks,
)
from lorasp_dist.lorasp.masks import draw_mask, mask_generator
from lorasp_dist.presets import PRESETS


@pytest.fixture(scope="module")
def base():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(PRESETS["tiny"].hf_config()).eval()


def fresh(base, **kw):
    return apply_lorasp(copy.deepcopy(base), LoRASPConfig(**kw))


def adamw_steps(model, n=20, lr=1e-2, wd=0.1, seed=0):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    for _ in range(n):
        x = torch.randint(0, vocab, (2, 16), generator=gen)
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def snapshot(model):
    return {
        lay.name: {w: (m.train_values.detach().clone(), m.dense().detach()[~m.mask], m.dense().detach().clone())
                   for w, m in (("A", lay.lora_A), ("B", lay.lora_B))}
        for lay in lorasp_layers(model)
    }


def test_trainable_count_is_half_of_lora(base):
    sp, lora = fresh(base), fresh(base, variant="lora")
    c_sp, c_lora = count_parameters(sp), count_parameters(lora)
    print("lorasp:", c_sp, "lora:", c_lora)
    n_matrices = 2 * len(lorasp_layers(sp))
    assert abs(c_sp["trainable"] - c_lora["trainable"] / 2) <= n_matrices
    assert c_sp["trainable"] + c_sp["frozen_adapter"] == c_lora["trainable"]
    assert c_sp["base"] == c_lora["base"] == sum(p.numel() for p in base.parameters())
    for layer in lorasp_layers(sp):
        for m in (layer.lora_A, layer.lora_B):
            numel = m.shape[0] * m.shape[1]
            assert m.train_values.numel() == trainable_count(numel, 0.5) == round(0.5 * numel + 1e-9)


def test_defaults_target_all_seven_projections(base):
    model = fresh(base)
    names = {lay.name.rsplit(".", 1)[-1] for lay in lorasp_layers(model)}
    assert names == set(LLAMA_PROJECTIONS)
    assert len(lorasp_layers(model)) == 7 * PRESETS["tiny"].num_hidden_layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and n.endswith("train_values") for n in trainable)


def test_forward_equals_w0x_plus_scaled_ba(base):
    model = fresh(base, r=8, alpha=24)
    layer = lorasp_layers(model)[0]
    with torch.no_grad():
        layer.lora_B.train_values.normal_()  # B = 0 at init would make the check trivial
    x = torch.randn(3, layer.in_features)
    a, b = layer.lora_A.dense(), layer.lora_B.dense()
    expected = x @ layer.base_layer.weight.t() + (24 / 8) * (x @ a.t() @ b.t())
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    # the dense matrices are rebuilt from both halves: trainable where the mask is set, frozen elsewhere
    torch.testing.assert_close(a[layer.lora_A.mask], layer.lora_A.train_values)
    torch.testing.assert_close(a[~layer.lora_A.mask], layer.lora_A.frozen_values)
    assert layer.lora_B.frozen_values is None and not b[~layer.lora_B.mask].any()  # zeros need no storage


@pytest.mark.parametrize("strategy", ["random", "rows", "cols"])
def test_frozen_entries_never_move_and_trainable_all_move(base, strategy):
    model = fresh(base, strategy=strategy)
    before = snapshot(model)
    adamw_steps(model, n=20, wd=0.1)
    after = snapshot(model)
    for name in before:
        for w in ("A", "B"):
            t0, f0, _ = before[name][w]
            t1, f1, _ = after[name][w]
            assert torch.equal(f0, f1), f"{name}.{w}: a frozen entry moved"
            assert bool((t1 != t0).all()), f"{name}.{w}: a trainable entry did not change"
    for layer in lorasp_layers(model):
        for w, m in (("A", layer.lora_A), ("B", layer.lora_B)):
            d0 = before[layer.name][w][2]
            assert torch.equal(m.dense().detach()[~m.mask], d0[~m.mask])


def test_frozen_half_of_b_stays_zero(base):
    """A real property of the method: B = 0 at init and a fixed mask, so B's frozen half is zero for good."""
    model = fresh(base)
    adamw_steps(model, n=5)
    for layer in lorasp_layers(model):
        b = layer.lora_B.dense().detach()
        assert torch.count_nonzero(b[~layer.lora_B.mask]) == 0
        assert torch.count_nonzero(b[layer.lora_B.mask]) > 0


def test_bitsandbytes_4bit_base_frozen_entries_and_base_untouched():
    import bitsandbytes as bnb

    from lorasp_dist.model.quant import make_linear4bit, quantize_nf4

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("q_proj", make_linear4bit(quantize_nf4(torch.randn(128, 64).to(torch.bfloat16) * 0.02), "cpu"))
    model.add_module("act", nn.ReLU())
    model.add_module("o_proj", make_linear4bit(quantize_nf4(torch.randn(64, 128).to(torch.bfloat16) * 0.02), "cpu"))
    packed = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lorasp(model, LoRASPConfig(r=8, target_modules=["q_proj", "o_proj"]))
    assert all(isinstance(lay.base_layer, bnb.nn.Linear4bit) for lay in lorasp_layers(model))
    counts = count_parameters(model)
    assert counts["base"] == 128 * 64 * 2  # logical size of the 4-bit weights, from their quant state
    before = snapshot(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for _ in range(20):
        x = torch.randn(4, 64)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    after = snapshot(model)
    for name in before:
        for w in ("A", "B"):
            assert torch.equal(before[name][w][1], after[name][w][1])
            assert bool((before[name][w][0] != after[name][w][0]).all())
    for n, p in model.named_parameters():
        if n.replace("base_layer.", "") in packed:
            # packed 4-bit codes viewed as bf16 hold NaN patterns: compare the bytes
            old = packed[n.replace("base_layer.", "")]
            assert torch.equal(p.data.view(torch.uint8), old.view(torch.uint8)), f"4-bit base weight {n} changed"


def test_absmax_is_a_frozen_parameter_that_no_adapter_path_takes(tmp_path):
    """Each 4-bit weight's uint8 absmax is a frozen parameter beside it (so ZeRO-3 partitions it), the very tensor its
    quant state reads; the adapter's paths leave it out: the parameter counts, the checkpoint's adapter file, the PEFT
    export, the engine's gather of the adapter (parameters named lora_*) and the adapter inventory."""
    from safetensors.torch import load_file

    from lorasp_dist.memory.inventory import adapter_bytes
    from lorasp_dist.model.quant import make_linear4bit, quantize_nf4

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("q_proj", make_linear4bit(quantize_nf4(torch.randn(128, 64).to(torch.bfloat16) * 0.02), "cpu"))
    model.add_module("o_proj", make_linear4bit(quantize_nf4(torch.randn(64, 128).to(torch.bfloat16) * 0.02), "cpu"))
    apply_lorasp(model, LoRASPConfig(r=8, target_modules=["q_proj", "o_proj"]))
    params = dict(model.named_parameters())
    absmax = {n: p for n, p in params.items() if n.endswith("absmax")}
    assert list(absmax) == ["q_proj.base_layer.absmax", "o_proj.base_layer.absmax"]
    for n, p in absmax.items():
        layer = model.get_submodule(n.removesuffix(".absmax"))
        assert p is layer.weight.quant_state.absmax and p.dtype == torch.uint8 and not p.requires_grad
        assert p.numel() == 128 * 64 // 64  # one byte per 64 weights
    assert count_parameters(model)["base"] == 2 * 128 * 64  # weights only
    assert not any("lora_" in n for n in absmax)  # Trainer.gathered_lorasp gathers the parameters named lora_*
    assert not any("absmax" in k for k in lorasp_state_dict(model))
    export_peft_adapter(model, tmp_path / "adapter")
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert sorted(keys) == sorted(f"base_model.model.{n}.lora_{w}.weight" for n in ("q_proj", "o_proj") for w in "AB")
    held = adapter_bytes(model, None)
    assert sum(held.values()) == sum(p.numel() * p.element_size() for n, p in params.items() if "lora_" in n)


def test_optimizer_state_at_most_55_percent_of_lora(base):
    def state_bytes(opt):
        return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))

    sp = state_bytes(adamw_steps(fresh(base), n=2))
    lora = state_bytes(adamw_steps(fresh(base, variant="lora"), n=2))
    print(f"optimizer state: lorasp {sp} B, lora {lora} B, ratio {sp / lora:.3f}")
    assert sp <= 0.55 * lora


def test_variants(base):
    fa = fresh(base, variant="lora-fa")
    for layer in lorasp_layers(fa):
        assert layer.lora_A.train_values.numel() == 0 and not layer.lora_A.train_values.requires_grad
        assert layer.lora_B.frozen_values is None and layer.lora_B.mask_bits is None
        assert layer.lora_A.mask_bits is None  # a matrix that trains whole or not at all needs no mask
    for layer in lorasp_layers(fresh(base, variant="lora")):  # peft's layout: A and B, nothing else
        for m in (layer.lora_A, layer.lora_B):
            assert [n for n, _ in m.named_parameters()] == ["train_values"]
    full = apply_lorasp(copy.deepcopy(base), LoRASPConfig(variant="full"))
    assert all(p.requires_grad for p in full.parameters())
    assert count_parameters(full)["trainable"] == sum(p.numel() for p in base.parameters())


def test_masks_reproducible_and_distinct():
    shape = (16, 128)
    m1 = draw_mask(shape, 0.5, "random", mask_generator(0, "layers.0.q_proj", "A"))
    m2 = draw_mask(shape, 0.5, "random", mask_generator(0, "layers.0.q_proj", "A"))
    assert torch.equal(m1, m2)
    for other in (mask_generator(0, "layers.1.q_proj", "A"), mask_generator(0, "layers.0.q_proj", "B"),
                  mask_generator(1, "layers.0.q_proj", "A")):
        assert not torch.equal(m1, draw_mask(shape, 0.5, "random", other))
    for strategy in ("random", "rows", "cols"):
        for ratio in (0.25, 0.5, 0.7, 1.0):
            m = draw_mask((7, 13), ratio, strategy, mask_generator(3, "x", "A"))
            assert int(m.sum()) == trainable_count(91, ratio)
    rows = draw_mask((8, 10), 0.5, "rows", mask_generator(0, "x", "A"))
    assert sorted(rows.sum(1).tolist()) == [0] * 4 + [10] * 4  # whole rows
    cols = draw_mask((8, 10), 0.5, "cols", mask_generator(0, "x", "A"))
    assert sorted(cols.sum(0).tolist()) == [0] * 5 + [8] * 5  # whole columns


def test_resample_keeps_values_and_carries_state(base):
    # Every matrix, since the redraw moves them all through one concatenation: a slip at a seam shows here.
    model = fresh(base, resample_every=5)
    opt = adamw_steps(model, n=3)
    matrices = [m for layer in lorasp_layers(model) for m in (layer.lora_A, layer.lora_B)]
    before = []
    for m in matrices:
        moments = {}
        for key in ("exp_avg", "exp_avg_sq"):
            moments[key] = torch.zeros(m.shape)
            moments[key][m.mask] = opt.state[m.train_values][key]
        before.append((m.dense().detach().clone(), m.mask.clone(), moments))
    resample_masks(model, opt)
    for m, (dense, old_mask, moments) in zip(matrices, before):
        assert not torch.equal(old_mask, m.mask)
        assert int(m.mask.sum()) == int(old_mask.sum())
        torch.testing.assert_close(m.dense().detach(), dense)  # values kept
        stay, new = old_mask & m.mask, ~old_mask & m.mask
        for key, was in moments.items():
            full = torch.zeros(m.shape)
            full[m.mask] = opt.state[m.train_values][key]
            torch.testing.assert_close(full[stay], was[stay])  # carried for entries that stay trainable
            assert torch.count_nonzero(full[new]) == 0  # reset for entries that became trainable
    adamw_steps(model, n=1)  # and training goes on


def test_state_dict_round_trip(base):
    trained = fresh(base)
    adamw_steps(trained, n=3)
    state = lorasp_state_dict(trained)
    assert all("frozen_values" not in k for k in state)  # before any resample, frozen values are a seed function
    n_saved = sum(v.numel() for k, v in state.items() if k.endswith("train_values"))
    assert n_saved == count_parameters(trained)["trainable"]
    other = fresh(base)
    load_lorasp_state_dict(other, state)
    x = torch.randint(0, 1024, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(trained(x).logits, other(x).logits)
    resample_masks(trained)
    state = lorasp_state_dict(trained)
    other = fresh(base)
    load_lorasp_state_dict(other, state)
    with torch.no_grad():
        torch.testing.assert_close(trained(x).logits, other(x).logits)


def test_peft_round_trip_logits(base, tmp_path):
    from peft import PeftModel

    model = fresh(base, r=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    adamw_steps(model, n=10)
    path = export_peft_adapter(model, tmp_path / "adapter")
    assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    x = torch.randint(0, 1024, (2, 20))
    with torch.no_grad():
        ours, theirs, plain = model.eval()(x).logits, peft_model(x).logits, base(x).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapter does something
    assert (ours - theirs).abs().max() <= 1e-5


def test_no_matching_target_is_an_error(base):
    with pytest.raises(ConfigError, match=r"lorasp.target_modules = 'qkv_proj'.*q_proj"):
        fresh(base, target_modules=["q_proj", "qkv_proj"])
    with pytest.raises(ConfigError, match="not a linear layer"):
        fresh(base, target_modules=["mlp"])


def test_sparse_matrix_gradient_matches_masked_scatter():
    """The sync-free rebuild gives exactly autograd's masked_scatter values and gradient, for every trainable share,
    with frozen values stored, and with all-zero frozen values (B at init) not stored."""
    from lorasp_dist.lorasp.layer import SparseMatrix

    gen = torch.Generator().manual_seed(0)
    for ratio in (0.0, 0.3, 0.5, 1.0):
        for dense in (torch.randn(6, 5, generator=gen), torch.zeros(6, 5)):
            mask = torch.rand(6, 5, generator=gen) < ratio
            m = SparseMatrix(dense, mask)
            assert (m.frozen_values is None) == (not dense[~mask].any())
            ref = dense[mask].clone().requires_grad_(True)
            assert torch.equal(m.dense().detach(), dense.masked_scatter(mask, ref).detach())
            assert torch.equal(m.mask, mask)
            if ref.numel():
                upstream = torch.randn(6, 5, generator=gen)
                (m.dense() * upstream).sum().backward()
                (dense.masked_scatter(mask, ref) * upstream).sum().backward()
                assert torch.equal(m.train_values.grad, ref.grad)


def test_sparse_matrix_stores_one_bit_per_entry():
    """The bookkeeping of a random mask is a bit per entry: no int32 map, no bool mask, nothing replicated."""
    from lorasp_dist.lorasp.layer import SparseMatrix

    mask = draw_mask((16, 1000), 0.5, "random", mask_generator(0, "x", "A"))
    m = SparseMatrix(torch.randn(16, 1000), mask)
    assert m.mask_bits.dtype == torch.uint8 and m.mask_bits.numel() == 16 * 1000 // 8
    assert sum(b.numel() * b.element_size() for b in m.buffers()) == 8  # the bit values, a constant
    assert m.train_values.numel() + m.frozen_values.numel() == 16 * 1000


def test_fused_4bit_adapter_matches_the_unfused_layer():
    """A 4-bit base with the adapter fused into one autograd node (bf16) computes what base + adapter compute."""
    from lorasp_dist.model.quant import make_linear4bit, quantize_nf4

    torch.manual_seed(0)
    base4 = make_linear4bit(quantize_nf4(torch.randn(96, 64).to(torch.bfloat16) * 0.05), "cpu")
    model = nn.Sequential()
    model.add_module("q_proj", base4)
    apply_lorasp(model, LoRASPConfig(r=8, target_modules=["q_proj"]))
    layer = lorasp_layers(model)[0]
    layer.to(torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.train_values.normal_()
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16, requires_grad=True)
    fused = layer(x)
    fused.float().square().sum().backward()
    grads = [t.grad.clone() for t in (x, layer.lora_A.train_values, layer.lora_B.train_values)]
    for t in (x, layer.lora_A.train_values, layer.lora_B.train_values):
        t.grad = None
    a, b = layer.lora_A.dense(), layer.lora_B.dense()
    plain = base4(x) + ((x @ a.t()) @ b.t()) * layer.scaling
    plain.float().square().sum().backward()
    torch.testing.assert_close(fused, plain, rtol=2e-2, atol=2e-2)
    for got, want in zip(grads, (x.grad, layer.lora_A.train_values.grad, layer.lora_B.train_values.grad)):
        assert (got.float() - want.float()).norm() <= 2e-2 * want.float().norm()
