"""The DeepSpeed config: a template from ds_configs/ plus everything derived from the run config, so the user never
writes the same number twice (batch sizes, clipping and precision come from `train.*`).

`build_ds_config` is the one place a template is read and merged: the engine hands its dict to
`deepspeed.initialize`, and the memory plan reads the same dict.
"""

from __future__ import annotations

import copy
import json

from lorasp_dist.config import ConfigError, RunConfig
from lorasp_dist.shipped import shipped

DS_CONFIG_DIR = shipped("ds_configs")


def load_template(name: str) -> dict:
    path = DS_CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"deepspeed.config = {name!r}: template {path} not found")
    template = json.loads(path.read_text())
    template.pop("_comment", None)
    return template


def _merge(base: dict, over: dict, where: str = "deepspeed.overrides") -> dict:
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v, f"{where}.{k}")
        else:
            base[k] = v
    return base


def offloaded(ds: dict, what: str) -> bool:
    """Whether DeepSpeed puts `what` (offload_optimizer or offload_param) in host memory: as DeepSpeed decides it
    (runtime/zero/stage3.py), the section is there and its device is not `none`."""
    section = ds.get("zero_optimization", {}).get(what) or {}
    return section.get("device", "none") not in ("none", None)


def build_ds_config(cfg: RunConfig, world_size: int) -> dict:
    t = cfg.train
    ds = _merge(copy.deepcopy(load_template(cfg.deepspeed.config)), copy.deepcopy(cfg.deepspeed.overrides))
    ds.update(
        train_micro_batch_size_per_gpu=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        train_batch_size=t.micro_batch_size * t.grad_accum * world_size,
        gradient_clipping=t.grad_clip,
        bf16={"enabled": t.precision == "bf16"},
        fp16={"enabled": False},
        # The optimizer sees only LoRA-SP's packed parameters, so AdamW can never move a frozen entry.
        optimizer={
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": t.weight_decay},
        },
    )
    if not offloaded(ds, "offload_optimizer"):
        # torch's own AdamW on the device: DeepSpeed's FusedAdam would be JIT-built by nvcc for little gain on
        # LoRA-sized parameter counts. With offload, DeepSpeed's C++ CPU Adam steps in pinned host memory instead.
        ds["optimizer"]["params"]["torch_adam"] = True
    if ds["zero_optimization"].get("stage") != 3:
        raise ConfigError("deepspeed.overrides.zero_optimization.stage: must stay 3 (the base is sharded by ZeRO-3)")
    return ds
