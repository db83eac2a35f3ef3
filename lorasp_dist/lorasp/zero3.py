"""Mask redraws (`lorasp.resample_every`) on a model trained under DeepSpeed ZeRO-3.

ZeRO-3 splits each LoRA-SP parameter (trainable values, frozen values, mask bits) across the ranks; a small one is
also kept whole on every rank (stage3_param_persistence_threshold). For the trainable values only, the optimizer
keeps an fp32 master and AdamW's moments in flat partitions of its own, on the host with offload_optimizer.

A redraw gathers each matrix whole on every rank and moves it to its new mask there (every rank draws the same mask
from the seed): each dense entry keeps its value, the fp32 master follows an entry that stays trainable and starts
from the frozen value of one that becomes trainable, the moments follow an entry that stays trainable and start at
zero for one that becomes trainable. Every rank then keeps its own part of each: the parameters through
GatheredParameters (rank 0's result, re-partitioned; a persistent full copy is gathered again from the parts at its
next use), the master and the moments through DeepSpeed's safe_get/safe_set APIs.
"""

from __future__ import annotations

import deepspeed
import torch
from deepspeed import comm as dist
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)
from torch import nn

from lorasp_dist.lorasp.inject import lorasp_layers
from lorasp_dist.lorasp.layer import SparseMatrix, repack

MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state: the engine's optimizer (lorasp_dist/ds_config.py)


def resample_masks_zero3(model: nn.Module) -> None:
    """Redraw every mask of a model that deepspeed.initialize has wrapped. Collective: every rank calls it."""
    for layer in lorasp_layers(model):
        for matrix, mask in layer.redraw():
            _remask(matrix, mask)


@torch.no_grad()
def _remask(matrix: SparseMatrix, mask: torch.Tensor) -> None:
    values = matrix.train_values
    master = safe_get_full_fp32_param(values)  # all-gathers: every rank holds the whole of each
    moments = {key: safe_get_full_optimizer_state(values, key) for key in MOMENTS}
    with deepspeed.zero.GatheredParameters(list(matrix.parameters()), modifier_rank=0):
        old, dense = matrix.mask, matrix.dense()
        master = repack(master, old, mask, fill=dense)
        moments = {key: repack(value, old, mask) for key, value in moments.items()}
        matrix.store(dense, mask)
    safe_set_local_fp32_param(values, _own_part(master, values))
    for key, value in moments.items():
        safe_set_local_optimizer_state(values, _own_part(value, values), key)


def _own_part(full: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    """This rank's part of a whole tensor, laid out as ZeRO-3 partitions `param`: equal parts, the last one padded
    with zeros. (safe_set_full_* cannot take a parameter whose size the world size does not divide.)"""
    size = param.ds_tensor.numel()
    start = size * dist.get_rank(group=param.ds_process_group)
    part = full.reshape(-1)[start:start + size]
    return torch.cat([part, part.new_zeros(size - part.numel())])
