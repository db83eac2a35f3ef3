"""The adapter's bytes on this rank, counted from the tensors the engine actually holds (not from the plan's formulas).

Terms match the plan's `adapter` section (estimate.ADAPTER_TERMS): the trainable values, the frozen values and the
mask bits (each ZeRO-3 partition, plus the whole tensor where ZeRO-3 keeps a persistent copy), the gradient partition
buffer, and the optimizer's fp32 masters and Adam moments. GPU and host bytes are added: offload moves them, it does
not remove them. A tensor seen twice (the same data twice, as a view) is counted once.
Written after the first optimizer step, when the moments exist, to `RUN_DIR/memory/adapter_rank{r}.json`.
"""

from __future__ import annotations

import torch

from lorasp_dist.lorasp.layer import SparseMatrix

# SparseMatrix attribute -> the plan's term
_PARAM_TERMS = {"train_values": "params", "frozen_values": "frozen", "mask_bits": "masks"}


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def adapter_bytes(model: torch.nn.Module, zero_optimizer) -> dict[str, int]:
    """{term: bytes} held by this rank for the adapter (model: the DeepSpeed engine's module; zero_optimizer: its
    ZeRO-3 optimizer, None when nothing trains)."""
    seen: set[tuple[str, int]] = set()

    def size(tensors: list[torch.Tensor]) -> int:
        total = 0
        for t in tensors:
            if t.numel() == 0:
                continue
            key = (str(t.device), t.data_ptr())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return total

    out = dict.fromkeys(("params", "frozen", "masks", "gradients", "optimizer"), 0)
    for m in model.modules():
        if not isinstance(m, SparseMatrix):
            continue
        for name, term in _PARAM_TERMS.items():
            p = getattr(m, name, None)
            if p is not None:  # the partition, and the whole tensor where it stays gathered (persistent)
                out[term] += size([t for t in (getattr(p, "ds_tensor", None), p.data) if t is not None])
    if zero_optimizer is not None:
        out["optimizer"] = size(_tensors(getattr(zero_optimizer, "fp32_partitioned_groups_flat", []))
                                + _tensors(list(zero_optimizer.optimizer.state.values())))
        out["gradients"] = size(_tensors(getattr(zero_optimizer, "grad_partitions_flat_buffer", None)))
    return out
