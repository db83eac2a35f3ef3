"""Synthetic bases: random weights with exact LLaMA shapes, built directly in 4-bit, one decoder layer at a time.

No process ever holds the bf16 model: each projection is drawn, quantized and written before the next is drawn.
The output is a transformers 4-bit checkpoint (sharded safetensors + index + config.json with quantization_config),
so the same loader, and stock transformers, read it exactly as they would read real quantized weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorasp_dist.atomic import atomic_dir
from lorasp_dist.config import ConfigError
from lorasp_dist.model.quant import quantization_config, quantize_nf4
from lorasp_dist.presets import PRESETS

INIT_STD = 0.02  # LlamaConfig.initializer_range


def _normal(shape, seed: int, device) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).mul_(INIT_STD).to(torch.bfloat16)


def write_prequantized(preset: str, out: str | Path, seed: int = 0, vocab_size: int | None = None) -> Path:
    """Write a pre-quantized NF4 checkpoint of `preset` to `out` (atomically: temp dir, then rename)."""
    if preset not in PRESETS:
        raise ConfigError(f"--preset = {preset!r}: unknown preset; accepted: {', '.join(PRESETS)}")
    if vocab_size is not None and vocab_size <= 0:
        raise ConfigError(f"--vocab-size = {vocab_size}: must be a positive integer")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out = '{out}': exists and is not empty; choose a new directory")
    p = PRESETS[preset]
    config = p.hf_config(**({"vocab_size": vocab_size} if vocab_size else {}))
    device = "cuda" if torch.cuda.is_available() else "cpu"

    with atomic_dir(out) as tmp:  # a concurrent writer that wins the rename leaves its identical copy
        n_files = config.num_hidden_layers + 1
        weight_map: dict[str, str] = {}
        total = 0

        def save(tensors: dict[str, torch.Tensor], index: int) -> None:
            nonlocal total
            name = f"model-{index:05d}-of-{n_files:05d}.safetensors"
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            total += sum(t.numel() * t.element_size() for t in tensors.values())

        for i in range(config.num_hidden_layers):
            tensors: dict[str, torch.Tensor] = {}
            for j, (name, shape) in enumerate(p.linear_shapes().items()):
                group = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
                w = _normal(shape, seed * 1_000_003 + i * 16 + j, device)
                for k, v in quantize_nf4(w).items():
                    tensors[f"model.layers.{i}.{group}.{name}.{k}"] = v
                del w
            for norm in ("input_layernorm", "post_attention_layernorm"):
                tensors[f"model.layers.{i}.{norm}.weight"] = torch.ones(config.hidden_size, dtype=torch.bfloat16)
            save(tensors, i + 1)

        emb_shape = (config.vocab_size, config.hidden_size)
        save(
            {
                "model.embed_tokens.weight": _normal(emb_shape, seed * 1_000_003 - 1, device).cpu(),
                "lm_head.weight": _normal(emb_shape, seed * 1_000_003 - 2, device).cpu(),
                "model.norm.weight": torch.ones(config.hidden_size, dtype=torch.bfloat16),
            },
            n_files,
        )
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        cfg = config.to_dict()
        cfg.update(architectures=["LlamaForCausalLM"], dtype="bfloat16", quantization_config=quantization_config())
        cfg["lorasp_synthetic"] = {"preset": preset, "seed": seed}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    return out
