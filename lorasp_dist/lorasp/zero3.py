"""Mask redraws (`lorasp.resample_every`) on a model trained under DeepSpeed ZeRO-3.

ZeRO-3 splits each LoRA-SP parameter (trainable values, frozen values, mask bits) across the ranks; a small one is
also kept whole on every rank (stage3_param_persistence_threshold). For the trainable values only, the optimizer
keeps an fp32 master and AdamW's moments in flat partitions of its own, on the host with offload_optimizer.

A redraw gathers every matrix whole on every rank and moves it to its new mask there (every rank draws the same masks
from the seed): each dense entry keeps its value, the fp32 master follows an entry that stays trainable and starts
from the frozen value of one that becomes trainable, the moments follow an entry that stays trainable and start at
zero for one that becomes trainable. Every rank then keeps its own part of each: the parameters through
GatheredParameters (rank 0's result, re-partitioned; a persistent full copy is gathered again from the parts at its
next use), the master and the moments through DeepSpeed's safe_get/safe_set_local APIs. Matrices move in batches of
up to BATCH_ENTRIES entries: one gather of the parameters and one all-gather each for the master and the two moments
a batch, where one matrix at a time cost about six collectives a matrix (1,120 matrices in a 65B model).
"""

from __future__ import annotations

import deepspeed
import torch
from deepspeed import comm as dist
from deepspeed.utils import (
    safe_get_local_fp32_param,
    safe_get_local_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)
from torch import nn

from lorasp_dist.lorasp.inject import lorasp_layers
from lorasp_dist.lorasp.layer import SparseMatrix, hold_together, joined, repack

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state: the engine's optimizer (lorasp_dist/ds_config.py)


# Entries of A and B moved together: a batch holds ~24 bytes an entry on each rank while it moves (the parameters and
# the fp32 master and moments whole, their repacked copies), so ~100 MB; a 65B model's r=16 adapters are ~50 batches.
BATCH_ENTRIES = 1 << 22


def resample_masks_zero3(model: nn.Module) -> None:
    """Redraw every mask of a model that deepspeed.initialize has wrapped. Collective: every rank calls it, and makes
    the same batches."""
    batch: list[tuple[SparseMatrix, torch.Tensor]] = []
    entries = 0
    for layer in lorasp_layers(model):
        for matrix, mask in layer.redraw():
            batch.append((matrix, mask))
            entries += matrix.numel
        if entries >= BATCH_ENTRIES:
            _remask(*map(list, zip(*batch)))
            batch, entries = [], 0
    if batch:
        _remask(*map(list, zip(*batch)))


@torch.no_grad()
def _remask(matrices: list[SparseMatrix], masks: list[torch.Tensor]) -> None:
    values = [m.train_values for m in matrices]
    master = _gather_whole(values, safe_get_local_fp32_param)
    moments = {key: _gather_whole(values, lambda p, key=key: safe_get_local_optimizer_state(p, key))
               for key in MOMENTS}
    with deepspeed.zero.GatheredParameters([p for m in matrices for p in m.parameters()], modifier_rank=0):
        old, new, dense = joined(matrices, masks)
        master = repack(master, old, new, fill=dense)
        moments = {key: repack(value, old, new) for key, value in moments.items()}
        hold_together(matrices, dense, new)
    counts = [p.ds_numel for p in values]
    moments = {key: value.split(counts) for key, value in moments.items()}
    for i, (p, whole) in enumerate(zip(values, master.split(counts))):
        safe_set_local_fp32_param(p, _own_part(whole, p))
        for key, value in moments.items():
            safe_set_local_optimizer_state(p, _own_part(value[i], p), key)


def _gather_whole(params: list[nn.Parameter], local_part) -> torch.Tensor:
    """The whole of a per-parameter fp32 state (`local_part(p)`: this rank's partition of it) for each of `params`,
    concatenated: every rank's partitions of all of them in one all-gather. ZeRO-3 gives each rank an equal part of
    a parameter, in rank order, the last one padded."""
    parts = [local_part(p) for p in params]
    group = params[0].ds_process_group  # one group for every parameter: no MiCS or hpZ sub-groups here
    world = dist.get_world_size(group=group)
    local = torch.cat(parts)
    gathered = local.new_empty(world * local.numel())
    dist.all_gather_into_tensor(gathered, local, group=group)
    per_param = gathered.view(world, -1).split([part.numel() for part in parts], dim=1)
    return torch.cat([whole.reshape(-1)[:p.ds_numel] for whole, p in zip(per_param, params)])


def _own_part(full: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    """This rank's part of a whole tensor, laid out as ZeRO-3 partitions `param`: equal parts, the last one padded
    with zeros. (safe_set_full_* cannot take a parameter whose size the world size does not divide.)"""
    size = param.ds_tensor.numel()
    start = size * dist.get_rank(group=param.ds_process_group)
    part = full.reshape(-1)[start:start + size]
    return torch.cat([part, part.new_zeros(size - part.numel())])
