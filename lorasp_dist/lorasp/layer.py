"""The LoRA-SP linear layer: a frozen base (nn.Linear or bitsandbytes Linear4bit) plus a sparsely trained B·A.

Like peft's LoraLayer, the base stays untouched under `base_layer`. Unlike it, each of A and B is split in two:
the trainable entries live packed in a 1-D nn.Parameter (so the optimizer only ever sees them, and AdamW's decay
and momentum can never move a frozen entry) and the frozen ones in a 1-D buffer. The dense matrix is rebuilt from
both halves at every forward by one gather, without a device-to-host sync (see `SparseMatrix`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorasp_dist.lorasp.masks import draw_mask, mask_generator


class SparseMatrix(nn.Module):
    """One LoRA matrix stored as (trainable packed values, frozen packed values, where each entry lives).

    `slot` maps every position of the matrix to its place in cat(train_values, frozen_values), so the dense matrix is
    one gather. Its backward is a scatter-add at known positions: no op in either direction depends on the data, so
    none makes the host wait for the GPU (masked_scatter's backward, masked_select, must read its output size back:
    one stall per matrix per backward, which left a small model's step waiting on the host). int32 keeps it at 4 B
    an entry."""

    def __init__(self, dense: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.shape = tuple(dense.shape)
        mask = mask.to(dense.device)
        self.train_values = nn.Parameter(dense[mask].clone())
        self.register_buffer("frozen_values", dense[~mask].clone())
        self.register_buffer("slot", _slots(mask), persistent=False)

    @property
    def mask(self) -> torch.Tensor:
        """True where the entry trains."""
        return (self.slot < self.train_values.numel()).view(self.shape)

    def dense(self) -> torch.Tensor:
        """The full matrix; differentiable with respect to `train_values` only."""
        values = torch.cat([self.train_values, self.frozen_values.to(self.train_values.dtype)])
        return values.index_select(0, self.slot).view(self.shape)

    @torch.no_grad()
    def remask(self, mask: torch.Tensor, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Swap in a new mask with the same count. Values are kept; optimizer state follows each entry that stays
        trainable and starts at zero for an entry that becomes trainable."""
        dense = self.dense()
        old = self.mask
        mask = mask.to(old.device)
        state = optimizer.state.get(self.train_values, {}) if optimizer is not None else {}
        for value in state.values():
            if torch.is_tensor(value) and value.shape == self.train_values.shape:
                full = torch.zeros(self.shape, dtype=value.dtype, device=value.device)
                full[old] = value
                value.copy_(full[mask])
        # In place (counts do not change): whatever holds these tensors, a captured CUDA graph say, sees the change.
        self.train_values.copy_(dense[mask])
        self.frozen_values.copy_(dense[~mask])
        self.slot.copy_(_slots(mask))


def _slots(mask: torch.Tensor) -> torch.Tensor:
    """Position -> index into cat(trainable entries, frozen entries), each group in row-major order."""
    flat = mask.reshape(-1)
    n_train = int(flat.sum())
    order = torch.cumsum(flat, 0) - 1  # among the trainable entries
    frozen_order = torch.cumsum(~flat, 0) - 1 + n_train  # among the frozen ones, after them
    return torch.where(flat, order, frozen_order).to(torch.int32)


class LoRASPLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, name: str, cfg):
        super().__init__()
        self.base_layer = base_layer
        self.name, self.cfg = name, cfg
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.scaling = cfg.alpha / cfg.r
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.round = 0  # how many times the masks were redrawn

        # Kaiming-uniform A and zero B, as peft initialises LoRA; the draw is per layer, so it is reproducible.
        a = torch.empty(cfg.r, self.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=mask_generator(cfg.seed, name, "init"))
        b = torch.zeros(self.out_features, cfg.r)
        device = _device_of(base_layer)
        self.lora_A = SparseMatrix(a.to(device), self._mask("A", a.shape).to(device))
        self.lora_B = SparseMatrix(b.to(device), self._mask("B", b.shape).to(device))

    def _ratio(self, which: str) -> float:
        variant = self.cfg.variant
        if variant == "lora":
            return 1.0
        if variant == "lora-fa":
            return 0.0 if which == "A" else 1.0
        return self.cfg.ratio

    def _mask(self, which: str, shape) -> torch.Tensor:
        ratio = self._ratio(which)
        if ratio == 0.0:
            return torch.zeros(shape, dtype=torch.bool)
        gen = mask_generator(self.cfg.seed, self.name, which, self.round)
        return draw_mask(tuple(shape), ratio, self.cfg.strategy, gen)

    def resample(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.round += 1
        for which, m in (("A", self.lora_A), ("B", self.lora_B)):
            if 0.0 < self._ratio(which) < 1.0:
                m.remask(self._mask(which, m.shape), optimizer)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.dense() @ self.lora_A.dense()) * self.scaling

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        a, b = self.lora_A.dense(), self.lora_B.dense()
        lora = (self.dropout(x).to(a.dtype) @ a.t()) @ b.t()
        return result + (lora * self.scaling).to(result.dtype)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"r={c.r}, alpha={c.alpha}, variant={c.variant}, ratio={c.ratio}, strategy={c.strategy}"


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None and p.device.type != "meta" else torch.device("cpu")
