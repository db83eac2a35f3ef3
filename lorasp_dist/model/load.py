"""Load a base model in 4-bit, one module at a time, handing each module to ZeRO-3 as soon as it is filled.

The skeleton is built on the meta device (no memory), then each decoder layer, and then the embeddings, final
norm and lm_head, are read from safetensors, quantized if they are dense, placed on this rank's device and
partitioned by `partition(module)` before the next one is read. So neither the GPU nor the host ever holds the
whole model: the load peak is one layer plus this rank's partition. This is what the stock recipe cannot do: it
places the whole 4-bit model on every GPU before ZeRO-3 shards it.

Sources: a synthetic preset (written once to a cache dir by `synthetic.write_prequantized`), our or transformers'
pre-quantized 4-bit checkpoint, or a dense HF checkpoint (bf16/fp32) quantized to NF4 on load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from lorasp_dist.config import ConfigError, RunConfig, TrainConfig
from lorasp_dist.model.quant import keep_dequantized, make_linear4bit, quantize_nf4

_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "U8": torch.uint8, "I64": torch.int64}


class CheckpointReader:
    """Reads single tensors from a (possibly sharded) safetensors checkpoint without loading whole files."""

    def __init__(self, path: Path):
        self.path = path
        index = path / "model.safetensors.index.json"
        if index.is_file():
            self.where = {k: path / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif (path / "model.safetensors").is_file():
            with safe_open(path / "model.safetensors", "pt") as f:
                self.where = dict.fromkeys(f.keys(), path / "model.safetensors")
        else:
            raise ConfigError(f"model.path = '{path}': no model.safetensors or model.safetensors.index.json in it")
        self._open: dict[Path, object] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def _file(self, key: str):
        file = self.where[key]
        if file not in self._open:
            self._open[file] = safe_open(file, "pt")
        return self._open[file]

    def get(self, key: str) -> torch.Tensor:
        return self._file(key).get_tensor(key)

    def placeholder(self, key: str) -> torch.Tensor:
        """An uninitialised tensor of the stored shape and dtype, read from the header only."""
        sl = self._file(key).get_slice(key)
        return torch.empty(sl.get_shape(), dtype=_DTYPES[sl.get_dtype()])

    def close(self) -> None:
        """Drop the open files: their mapped pages would otherwise count in this process's RSS until the end."""
        self._open.clear()


def read_hf_config(path: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise ConfigError(f"model.path = '{path}': not a checkpoint directory (no config.json)")
    return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)


def decoder_layers(model: nn.Module, n: int | None = None) -> nn.ModuleList:
    """The model's list of decoder layers (`n`: how many; default from the model's config)."""
    n = model.config.num_hidden_layers if n is None else n
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise ConfigError(f"model: found no list of {n} decoder layers in {type(model).__name__}")


def enable_checkpointing(model: nn.Module, train: TrainConfig) -> list[nn.Module]:
    """Gradient checkpointing as train.* asks, non-reentrant (it works with ZeRO-3's gather hooks and needs no input
    requires-grad trick): on the first `checkpoint_layers` decoder layers, all when None. The checkpointed layers."""
    if not train.gradient_checkpointing:
        return []
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = list(decoder_layers(model))
    n = len(layers) if train.checkpoint_layers is None else train.checkpoint_layers  # bounded by check_inputs
    for layer in layers[n:]:  # transformers reads the flag per layer at every forward
        layer.gradient_checkpointing = False
    for layer in layers[:n]:
        keep_dequantized(layer)
    return layers[:n]


def _load_module(
    module: nn.Module, prefix: str, reader: CheckpointReader, device, dtype, quantize: bool, skip: set[str],
    read_weights: bool = True, resident: bool = False,
) -> None:
    """Fill every meta parameter under `module` (named `prefix`) from the checkpoint, in place.

    With read_weights off, large tensors are allocated but not read: ZeRO-3 broadcasts rank 0's values when it
    partitions the module, so the other ranks of a node never page the checkpoint in. `resident`: the 4-bit weights
    stay whole on this rank, out of ZeRO-3's reach (make_linear4bit), so every rank reads them.
    """
    read = reader.get if read_weights else reader.placeholder
    for name, child in list(module.named_modules()):
        full = f"{prefix}{name}" if name else prefix.rstrip(".")
        if isinstance(child, nn.Linear) and full not in skip:
            key = f"{full}.weight"
            if f"{key}.absmax" in reader:  # pre-quantized 4-bit
                tensors = {k.removeprefix(f"{full}."): reader.get(k) for k in reader.where if k.startswith(f"{key}.")}
                tensors["weight"] = read(key)
                _replace(module, name, make_linear4bit(tensors, device, resident))
                continue
            if quantize:
                w = reader.get(key).to(device=device, dtype=torch.bfloat16)
                _replace(module, name, make_linear4bit(quantize_nf4(w), device, resident))
                continue
        for pname, p in list(child.named_parameters(recurse=False)):
            key = f"{full}.{pname}"
            if key not in reader:
                raise ConfigError(f"model.path = '{reader.path}': the checkpoint has no tensor {key!r}")
            value = read(key).to(device=device, dtype=dtype if p.dtype.is_floating_point else p.dtype)
            setattr(child, pname, nn.Parameter(value, requires_grad=False))


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def load_base(
    cfg: RunConfig,
    path: Path,
    device: torch.device,
    partition: Callable[[nn.Module], None] = lambda m: None,
    read_weights: bool = True,
) -> nn.Module:
    """The base model of `path` on `device`, 4-bit unless model.quantize is off, every module passed to `partition`
    right after it is loaded (ZeRO-3's zero.Init(module=...) in the engine). The 4-bit weights of the first
    deepspeed.resident_layers decoder layers are not ZeRO-3's to partition (make_linear4bit)."""
    from transformers import AutoModelForCausalLM

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = read_hf_config(path, cfg.model.trust_remote_code)
    quantized = getattr(config, "quantization_config", None) is not None
    if quantized and not cfg.model.quantize:
        raise ConfigError(f"model.quantize = false: '{path}' is pre-quantized to 4-bit; it cannot be dequantized")
    quantize = cfg.model.quantize and not quantized
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we build the 4-bit layers ourselves
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code, dtype=dtype)

    reader = CheckpointReader(path)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    layers = decoder_layers(model, config.num_hidden_layers)
    layers_prefix = next(n for n, m in model.named_modules() if m is layers) + "."
    lm_head = {"lm_head"}  # kept in bf16: the output projection is small next to the layers and precision-sensitive
    for i, layer in enumerate(layers):
        resident = i < cfg.deepspeed.resident_layers
        _load_module(layer, f"{layers_prefix}{i}.", reader, device, dtype, quantize, set(),
                     read_weights or quantize or resident, resident)
        partition(layer)
        reader.close()  # one shard per layer in our checkpoints: unmap it before reading the next
    for name, child in model.named_children():
        _load_rest(child, name, layers, reader, device, dtype, partition, lm_head, tied, read_weights)
    reader.close()

    if tied:  # before the check below: a tied lm_head is never read from the checkpoint
        model.tie_weights()
    for name, m in list(model.named_modules()):
        if "RotaryEmbedding" in type(m).__name__:  # non-persistent buffers are not in checkpoints: rebuild them
            with torch.device(device):
                _replace(model, name, type(m)(config=config))
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if leftover:
        raise ConfigError(f"model.path = '{path}': tensors missing from the checkpoint: {', '.join(leftover[:5])}")
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    return model


def _load_rest(child, name, layers, reader, device, dtype, partition, skip, tied, read_weights) -> None:
    """Everything outside the decoder layers (embeddings, final norm, lm_head), one top-level module at a time."""
    if child is layers:
        return
    if any(m is layers for m in child.modules()):
        for sub_name, sub in child.named_children():
            _load_rest(sub, f"{name}.{sub_name}", layers, reader, device, dtype, partition, skip, tied, read_weights)
        return
    if tied and name == "lm_head":
        return  # shares the embedding's weight
    if not any(t.device.type == "meta" for t in child.parameters()):
        return
    _load_module(child, f"{name}.", reader, device, dtype, False, skip | {name}, read_weights)
    partition(child)


def prequantized_base_path(cfg: RunConfig) -> Path:
    """Where the synthetic base for cfg.model.preset lives (written on first use by rank 0)."""
    vocab = cfg.data.vocab_size if cfg.model.preset == "tiny" else None
    tag = f"base-{cfg.model.preset}" + (f"-v{vocab}" if vocab else "")
    return cfg.train.output_dir / ".cache" / tag


def ensure_base(cfg: RunConfig) -> Path:
    """The checkpoint directory to load: model.path, or the synthetic preset's cache dir, written if missing."""
    if cfg.model.path is not None:
        path = Path(cfg.model.path)
        if not path.is_dir():
            raise ConfigError(f"model.path = '{path}': not a directory")
        read_hf_config(path, cfg.model.trust_remote_code)
        return path
    from lorasp_dist.model.synthetic import write_prequantized
    from lorasp_dist.presets import PRESETS

    path = prequantized_base_path(cfg)
    if not (path / "config.json").is_file():
        vocab = cfg.data.vocab_size if cfg.model.preset == "tiny" else PRESETS[cfg.model.preset].vocab_size
        try:
            write_prequantized(cfg.model.preset, path, vocab_size=vocab)
        except ConfigError:
            if not (path / "config.json").is_file():  # another process won the race: use its copy
                raise
    return path
