"""Putting LoRA-SP into a model, counting what trains, and saving only what training changed."""

from __future__ import annotations

import torch
from torch import nn

from lorasp_dist.config import ConfigError, LoRASPConfig
from lorasp_dist.lorasp.layer import AdapterGroup, LoRASPLinear, remask_together


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def apply_lorasp(model: nn.Module, cfg: LoRASPConfig) -> nn.Module:
    """Wrap every target nn.Linear (bitsandbytes Linear4bit is one) in place and freeze everything else.

    variant=full wraps nothing and makes every parameter trainable (small, unquantized models only).
    """
    if cfg.variant == "full":
        for p in model.parameters():
            if p.dtype.is_floating_point:
                p.requires_grad_(True)
            elif p.numel():
                raise ConfigError(
                    "lorasp.variant = 'full': the base is quantized; full fine-tuning needs model.quantize=false"
                )
        return model
    named = dict(model.named_modules())
    if any(isinstance(m, LoRASPLinear) for m in named.values()):
        raise ValueError("apply_lorasp: the model already holds LoRA-SP layers")
    hits: dict[str, list[str]] = {t: [] for t in cfg.target_modules}
    for name in named:
        for t in cfg.target_modules:
            if _matches(name, t):
                hits[t].append(name)
    linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in named.items() if isinstance(m, nn.Linear)})
    for t, names in hits.items():
        if not names:
            raise ConfigError(
                f"lorasp.target_modules = {t!r}: matches no module of the model; linear layers present: "
                f"{', '.join(linear_names) or 'none'}"
            )
        for n in names:
            if not isinstance(named[n], nn.Linear):
                kind = type(named[n]).__name__
                raise ConfigError(f"lorasp.target_modules = {t!r}: {n} is a {kind}, not a linear layer")

    for p in model.parameters():
        p.requires_grad_(False)
    for name in sorted({n for names in hits.values() for n in names}):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRASPLinear(named[name], name, cfg))
    for layer in lorasp_layers(model):
        for m in (layer.lora_A, layer.lora_B):
            m.train_values.requires_grad_(m.train_values.numel() > 0)
    model.lorasp_config = cfg
    return model


def lorasp_layers(model: nn.Module) -> list[LoRASPLinear]:
    return [m for m in model.modules() if isinstance(m, LoRASPLinear)]


def group_adapters(decoder_layers: list[nn.Module]) -> None:
    """The LoRA-SP projections of each of these decoder layers rebuild their matrices together (AdapterGroup): ~5×
    fewer kernels a layer. Under ZeRO-3 only for layers fetched whole (leaf modules)."""
    for decoder_layer in decoder_layers:
        members = lorasp_layers(decoder_layer)
        group = AdapterGroup(members) if len(members) > 1 else None
        for layer in members:
            layer.group = group


def resample_masks(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Redraw every mask (the `resample_every` schedule); see remask_together for what happens to state."""
    redrawn = [pair for layer in lorasp_layers(model) for pair in layer.redraw()]
    if redrawn:
        remask_together(*map(list, zip(*redrawn)), optimizer)


def _logical_numel(p: torch.Tensor) -> int:
    # A 4-bit Params4bit packs two weights per byte (and several per bf16 storage element); its quant_state knows
    # the original shape. Under ZeRO-3 a partitioned parameter reports its full size in ds_numel.
    qs = getattr(p, "quant_state", None)
    if qs is not None:
        return int(torch.Size(qs.shape).numel())
    return int(getattr(p, "ds_numel", p.numel()))


def count_parameters(model: nn.Module) -> dict[str, int]:
    """trainable: what gets gradients; frozen_adapter: the frozen half of A and B; base: the base model's weights."""
    trainable = frozen_adapter = base = 0
    adapter_params = set()
    for layer in lorasp_layers(model):
        for m in (layer.lora_A, layer.lora_B):
            adapter_params.update(id(p) for p in m.parameters())
            frozen_adapter += m.n_frozen
    # a 4-bit weight's absmax (model/quant.py) is a parameter for ZeRO-3's sake, but a quant constant, not a weight;
    # a resident layer's 4-bit weights are buffers (deepspeed.resident_layers), weights all the same
    weights = [*model.parameters(), *(b for b in model.buffers() if getattr(b, "quant_state", None) is not None)]
    constants = {id(p.quant_state.absmax) for p in weights if getattr(p, "quant_state", None) is not None}
    for p in weights:
        n = _logical_numel(p)
        if p.requires_grad:
            trainable += n
        if id(p) not in adapter_params and id(p) not in constants:
            base += n
    return {"trainable": trainable, "frozen_adapter": frozen_adapter, "base": base}


def lorasp_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What training changed: the packed trainable values of each matrix. Frozen values are a function of the seed
    until the first mask resample; after one, they were trained before being frozen and are saved too. The mask
    seeds and rounds ride along as tensors so the file is self-describing."""
    cfg = getattr(model, "lorasp_config", None)
    if cfg is not None and cfg.variant == "full":
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    out: dict[str, torch.Tensor] = {}
    for layer in lorasp_layers(model):
        for which, m in (("A", layer.lora_A), ("B", layer.lora_B)):
            key = f"{layer.name}.lora_{which}"
            out[f"{key}.train_values"] = m.train_values.detach()
            if layer.round > 0 and m.frozen_values is not None:
                out[f"{key}.frozen_values"] = m.frozen_values.detach()
        out[f"{layer.name}.mask_seed"] = torch.tensor([layer.cfg.seed, layer.round], dtype=torch.int64)
    return out


@torch.no_grad()
def load_lorasp_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Inverse of lorasp_state_dict on a model made by apply_lorasp with the same config."""
    cfg = getattr(model, "lorasp_config", None)
    if cfg is not None and cfg.variant == "full":
        params = dict(model.named_parameters())
        for n, v in state.items():
            params[n].copy_(v)
        return
    for layer in lorasp_layers(model):
        seed, round_ = (int(v) for v in state[f"{layer.name}.mask_seed"])
        if seed != layer.cfg.seed:
            raise ValueError(f"{layer.name}: saved with lorasp.seed={seed}, model has lorasp.seed={layer.cfg.seed}")
        if round_ != layer.round:
            layer.set_round(round_)
        for which, m in (("A", layer.lora_A), ("B", layer.lora_B)):
            key = f"{layer.name}.lora_{which}"
            m.train_values.copy_(state[f"{key}.train_values"])
            frozen = state.get(f"{key}.frozen_values")
            if frozen is not None and m.frozen_values is None:  # B's zeros, not stored before a resample
                m.frozen_values = nn.Parameter(frozen.to(m.train_values).clone(), requires_grad=False)
            elif frozen is not None:
                m.frozen_values.copy_(frozen)
