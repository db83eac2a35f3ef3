"""Two speed changes of the engine: selective checkpointing (`train.checkpoint_layers`) and the layer-wide adapter
rebuild (AdapterGroup). Each must compute exactly what the plain path computes; the memory plan and `lorasp plan`
must know the checkpointed count, and bad values must be refused before anything starts."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorasp_dist.config import ConfigError, LoRASPConfig, TrainConfig, validate
from lorasp_dist.inputs import check_inputs
from lorasp_dist.lorasp import apply_lorasp, group_adapters, lorasp_layers
from lorasp_dist.memory.estimate import plan_for_config
from lorasp_dist.memory.plan import Budget, search_fitting, with_setting
from lorasp_dist.model.load import decoder_layers, enable_checkpointing
from lorasp_dist.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "examples" / "tiny.yaml"


@pytest.fixture(scope="module")
def base():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(PRESETS["tiny"].hf_config())


def trained(base, *, group: bool, checkpoint_layers: int | None = None, resample_every: int = 0):
    """Two forward/backward passes of a LoRA-SP copy of `base` under checkpointing: (last loss, the gradients)."""
    model = apply_lorasp(copy.deepcopy(base), LoRASPConfig(r=8, resample_every=resample_every))
    with torch.no_grad():  # a non-zero B, so that A's gradients and B's frozen half matter
        for i, layer in enumerate(lorasp_layers(model)):
            layer.lora_B.train_values.normal_(generator=torch.Generator().manual_seed(i))
    model.train()
    enable_checkpointing(model, TrainConfig(checkpoint_layers=checkpoint_layers))
    if group:
        group_adapters(list(decoder_layers(model)))
    ids = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    return model, loss.detach(), grads


@pytest.mark.parametrize("resample_every", [0, 5])  # B's frozen zeros not stored / stored (a run that redraws)
def test_grouped_rebuild_is_bit_identical_and_keeps_nothing(base, resample_every):
    _, loss, grads = trained(base, group=False, resample_every=resample_every)
    model, loss_g, grads_g = trained(base, group=True, resample_every=resample_every)
    assert torch.equal(loss, loss_g)
    assert len(grads) == len(grads_g) == 2 * 7 * 4
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_g))
    groups = {id(layer.group): layer.group for layer in lorasp_layers(model)}
    assert len(groups) == 4 and None not in groups.values()  # one group per decoder layer
    assert all(not g._pending for g in groups.values())  # every pair handed out: no dense matrix outlives a pass


def test_checkpoint_layers_recomputes_only_the_first_n(base):
    calls = []
    _, loss_all, grads_all = trained(base, group=True)
    model = apply_lorasp(copy.deepcopy(base), LoRASPConfig(r=8))
    model.train()
    checkpointed = enable_checkpointing(model, TrainConfig(checkpoint_layers=1))
    layers = list(decoder_layers(model))
    assert checkpointed == layers[:1]
    for i, layer in enumerate(layers):  # the MLP starts inside the checkpointed forward: again in the recompute
        layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.append(i))
    ids = torch.randint(0, 1024, (2, 32))
    model(input_ids=ids, labels=ids).loss.backward()
    assert [calls.count(i) for i in range(4)] == [2, 1, 1, 1]

    _, loss, grads = trained(base, group=True, checkpoint_layers=1)
    assert torch.equal(loss, loss_all) and all(torch.equal(a, b) for a, b in zip(grads, grads_all))


def test_bad_checkpoint_layers_refused_before_anything_starts(tmp_path):
    with pytest.raises(ConfigError, match=r"train.checkpoint_layers = 3: needs train.gradient_checkpointing=true"):
        validate({"train": {"checkpoint_layers": 3, "gradient_checkpointing": False}})
    with pytest.raises(ConfigError, match="train.checkpoint_layers"):
        validate({"train": {"checkpoint_layers": -1}})
    with pytest.raises(ConfigError, match=r"train.checkpoint_layers = 9: more than the model's 4 decoder layers "
                                          r"\(preset tiny\); use 0 to 4"):
        check_inputs(validate({"model": {"preset": "tiny"}, "train": {"checkpoint_layers": 9}}))
    proc = subprocess.run([sys.executable, "-m", "lorasp_dist", "launch", str(TINY), "--dry-run",
                           "train.checkpoint_layers=9", f"train.output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert "train.checkpoint_layers = 9" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def plan(checkpoint_layers, micro_batch=4):
    cfg = validate({"model": {"preset": "llama-65b"}, "data": {"seq_len": 2048},
                    "train": {"micro_batch_size": micro_batch, "checkpoint_layers": checkpoint_layers}})
    return plan_for_config(cfg, 1, device="cuda")


def test_plan_charges_each_kept_layer_and_search_keeps_the_most_that_fit():
    full, every = plan(None), plan(80)
    assert every.gpu == full.gpu  # checkpointing all 80 layers is the default
    per_layer = full.counts["activations_per_layer"]
    kept10, kept11 = plan(70), plan(69)
    # each kept layer stores its activations in place of its checkpoint (one hidden state)
    step = kept11.gpu["activations"] - kept10.gpu["activations"]
    assert step == per_layer - 2 * 8192 * 4 * 2048
    assert kept11.counts["activations_stored"] > kept10.counts["activations_stored"] > full.counts["activations_stored"]

    cfg = validate({"model": {"preset": "llama-65b"}, "data": {"seq_len": 2048}, "memory": {"gpu_mem": "139GiB"}})
    budget = Budget.from_config(cfg)
    found = [p for p in search_fitting(cfg, 1, budget) if p.ds_config == "zero3" and p.gradient_checkpointing
             and p.micro_batch == 4]
    assert len(found) == 1 and found[0].checkpoint_layers is not None
    n = found[0].checkpoint_layers
    fewer = plan_for_config(with_setting(cfg, "zero3", True, 4, n - 1), 1, device="cuda")
    assert found[0].gpu_total <= budget.usable(budget.gpu) < fewer.gpu_total  # one fewer does not fit
