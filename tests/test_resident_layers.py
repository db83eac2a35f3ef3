"""Two ways the 4-bit base costs less host and GPU time: resident layers (`deepspeed.resident_layers`: the 4-bit
weights of the first N decoder layers stay whole on every rank, outside ZeRO-3) and the dequantized weight a
checkpointed layer's recompute keeps for its backward. Each must compute exactly what the plain path computes; the
memory plan and `lorasp plan` must know them, and bad values must be refused before anything starts."""

from __future__ import annotations

import pytest
import torch

from lorasp_dist.config import ConfigError, load_config, validate
from lorasp_dist.inputs import check_inputs
from lorasp_dist.lorasp import apply_lorasp, count_parameters, group_adapters, lorasp_layers
from lorasp_dist.memory.estimate import nf4_bytes, plan_for_config
from lorasp_dist.memory.plan import Budget, search_fitting, setting_line, with_setting
from lorasp_dist.model import quant
from lorasp_dist.model.load import enable_checkpointing, ensure_base, load_base
from lorasp_dist.presets import PRESETS


@pytest.fixture(scope="module")
def tiny_base(seed_tiny, tmp_path_factory):
    return seed_tiny(tmp_path_factory.mktemp("resident"))


def tiny_model(out, resident_layers: int = 0, checkpoint_layers: int | None = None):
    """The tiny 4-bit base with LoRA-SP in bf16 (B non-zero, so every gradient path matters), checkpointed as asked
    and its adapters rebuilt per layer, as the engine does."""
    cfg = load_config(None, ["model.preset=tiny", "data.vocab_size=1024", f"train.output_dir={out}",
                             f"deepspeed.resident_layers={resident_layers}", "lorasp.r=8"]
                      + ([f"train.checkpoint_layers={checkpoint_layers}"] if checkpoint_layers is not None else []))
    model = load_base(cfg, ensure_base(cfg), torch.device("cpu"))
    apply_lorasp(model, cfg.lorasp)
    with torch.no_grad():
        for i, layer in enumerate(lorasp_layers(model)):
            layer.lora_B.train_values.normal_(generator=torch.Generator().manual_seed(i))
            layer.lora_A.to(torch.bfloat16)
            layer.lora_B.to(torch.bfloat16)
    model.train()
    group_adapters(enable_checkpointing(model, cfg.train))
    return model


def step(model, steps: int = 2):
    """(loss, gradients) after `steps` forward/backward passes on one fixed batch."""
    for p in model.parameters():
        p.grad = None
    ids = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def four_bit(model):
    return [m for m in model.modules() if hasattr(m, "forward_with_lora")]


def test_resident_layers_hold_their_4bit_weights_as_buffers_and_compute_the_same(tiny_base):
    plain = tiny_model(tiny_base)
    resident = tiny_model(tiny_base, resident_layers=3)
    layers = [four_bit(layer) for layer in resident.model.layers]
    for i, projections in enumerate(layers):  # ZeRO-3 partitions parameters only: buffers are never its
        for m in projections:
            names = dict(m.named_buffers(recurse=False))
            assert (("weight" in names and "absmax" in names) if i < 3 else not names), (i, names)
            assert ("weight" in dict(m.named_parameters(recurse=False))) == (i >= 3)
            assert m.weight.quant_state.absmax is m.absmax  # dequantize reads the held absmax either way
    assert count_parameters(resident) == count_parameters(plain)
    loss, grads = step(plain)
    loss_r, grads_r = step(resident)
    assert torch.equal(loss, loss_r) and all(torch.equal(a, b) for a, b in zip(grads, grads_r))


def test_checkpointed_recompute_keeps_its_dequantized_weights_for_backward(tiny_base, monkeypatch):
    """A checkpointed layer's recompute saves each projection's dequantized weight for its backward: per step and
    projection 2 dequantizes instead of 3 (forward, recompute; the backward reuses the recompute's). A layer that is
    not checkpointed saves none (its forward's saved tensors would hold them all until the backward). Bit-identical."""
    calls = []
    dequantized = quant._dequantized
    monkeypatch.setattr(quant, "_dequantized", lambda w, dtype: calls.append(id(w)) or dequantized(w, dtype))
    model = tiny_model(tiny_base, checkpoint_layers=2)
    loss, grads = step(model, steps=1)
    layers = [four_bit(layer) for layer in model.model.layers]
    assert all(m.keep_dequantized == (i < 2) for i, projections in enumerate(layers) for m in projections)
    per_layer = [sum(calls.count(id(m.weight)) for m in projections) for projections in layers]
    assert per_layer == [14, 14, 14, 14]  # checkpointed: forward + recompute; kept: forward + backward

    for projections in layers:
        for m in projections:
            m.keep_dequantized = False
    calls.clear()
    loss_off, grads_off = step(model, steps=1)  # the same model again, nothing kept: one more dequantize
    assert [sum(calls.count(id(m.weight)) for m in p) for p in layers] == [21, 21, 14, 14]
    assert torch.equal(loss, loss_off) and all(torch.equal(a, b) for a, b in zip(grads, grads_off))


def plan65(world: int, resident: int, micro_batch: int = 1):
    cfg = validate({"model": {"preset": "llama-65b"}, "data": {"seq_len": 2048},
                    "train": {"micro_batch_size": micro_batch}, "deepspeed": {"resident_layers": resident}})
    return plan_for_config(cfg, world, device="cuda")


def test_plan_holds_resident_layers_whole_and_search_keeps_the_most_that_fit():
    shapes = PRESETS["llama-65b"].linear_shapes().values()
    storage, constants = map(sum, zip(*(nf4_bytes(o * i) for o, i in shapes)))
    none, ten = plan65(2, 0), plan65(2, 10)
    # each resident layer: its 4-bit weights and absmax whole, in place of half of them (and its nested constants,
    # whole on every rank either way)
    grown = (ten.gpu["base_weights_4bit"] + ten.gpu["quant_constants"]
             - none.gpu["base_weights_4bit"] - none.gpu["quant_constants"])
    absmax = sum(-(-o * i // 64) for o, i in shapes)
    assert abs(grown - 10 * (storage + absmax) / 2) <= 10 * 7 * 3  # ZeRO-3 pads each partition to whole elements
    assert ten.resident_layers == 10 and "resident_layers" not in setting_line(none)
    # one rank: a partition is the whole weight, so residency costs nothing and frees the gathers' bookkeeping
    assert plan65(1, 80).gpu_total <= plan65(1, 0).gpu_total

    cfg = validate({"model": {"preset": "llama-65b"}, "data": {"seq_len": 2048}, "memory": {"gpu_mem": "48GiB"}})
    budget = Budget.from_config(cfg)
    best = search_fitting(cfg, 2, budget)[0]
    assert 0 < best.resident_layers < 80 and f"deepspeed.resident_layers={best.resident_layers}" in setting_line(best)
    more = with_setting(cfg, best.ds_config, best.gradient_checkpointing, best.micro_batch, best.checkpoint_layers,
                        best.resident_layers + 1)
    assert best.gpu_total <= budget.usable(budget.gpu) < plan_for_config(more, 2, device="cuda").gpu_total
    # one rank: all of them, unless the parameters are offloaded (then a resident layer moves to the GPU)
    one = search_fitting(cfg, 1, budget)
    assert all(p.resident_layers == 80 for p in one if p.ds_config != "zero3_offload_all")


def test_bad_resident_layers_refused_before_anything_starts():
    with pytest.raises(ConfigError, match="deepspeed.resident_layers"):
        validate({"deepspeed": {"resident_layers": -1}})
    with pytest.raises(ConfigError, match=r"deepspeed.resident_layers = 5: more than the model's 4 decoder layers "
                                          r"\(preset tiny\); use 0 to 4"):
        check_inputs(validate({"model": {"preset": "tiny"}, "deepspeed": {"resident_layers": 5}}))
