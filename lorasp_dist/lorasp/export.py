"""After training a LoRA-SP adapter is a plain LoRA (dense A, B): written in the PEFT format, so peft,
transformers and vLLM load it unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from lorasp_dist.atomic import atomic_dir
from lorasp_dist.lorasp.inject import lorasp_layers


def dense_adapter_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT keys -> dense lora_A (r x in) and lora_B (out x r), contiguous, on the CPU."""
    out = {}
    for layer in lorasp_layers(model):
        prefix = f"base_model.model.{layer.name}"
        out[f"{prefix}.lora_A.weight"] = layer.lora_A.dense().detach().cpu().contiguous()
        out[f"{prefix}.lora_B.weight"] = layer.lora_B.dense().detach().cpu().contiguous()
    return out


def peft_adapter_config(cfg, base_model_name_or_path: str | None = None) -> dict:
    from peft import LoraConfig

    lc = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        target_modules=sorted(cfg.target_modules),
        lora_dropout=cfg.dropout,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name_or_path,
    )
    return lc.to_dict()


def write_peft_adapter(weights: dict[str, torch.Tensor], cfg, path: str | Path, base_model: str | None = None,
                       tokenizer=None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors (+ the tokenizer's files, given one) atomically (temp
    dir, then rename). An adapter with no weights would load as the bare base, so it is never written."""
    if not weights:
        raise ValueError("write_peft_adapter: no LoRA weights to write (a model without LoRA-SP layers)")
    config = peft_adapter_config(cfg, base_model)
    config["peft_type"] = "LORA"
    config["target_modules"] = sorted(cfg.target_modules)
    with atomic_dir(path, replace=True) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str))
        save_file(weights, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


def export_peft_adapter(model: nn.Module, path: str | Path, base_model: str | None = None) -> Path:
    """Export the model's LoRA-SP layers as a standard PEFT LoRA adapter directory."""
    cfg = getattr(model, "lorasp_config", None)
    if cfg is None or not lorasp_layers(model):
        raise ValueError("export_peft_adapter: the model has no LoRA-SP layers (call apply_lorasp first)")
    return write_peft_adapter(dense_adapter_weights(model), cfg, path, base_model)
