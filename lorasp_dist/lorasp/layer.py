"""The LoRA-SP linear layer: a frozen base (nn.Linear or bitsandbytes Linear4bit) plus a sparsely trained B·A.

Like peft's LoraLayer, the base stays untouched under `base_layer`. Unlike it, each of A and B is split in two:
the trainable entries live packed in a 1-D nn.Parameter (so the optimizer only ever sees them, and AdamW's decay
and momentum can never move a frozen entry) and the frozen ones in a frozen 1-D parameter. The dense matrix is
rebuilt from both halves at every forward, without a device-to-host sync (see `SparseMatrix`).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from lorasp_dist.lorasp.masks import BIT_VALUES, draw_mask, mask_generator, pack_mask, unpack_mask


class SparseMatrix(nn.Module):
    """One LoRA matrix stored as (trainable packed values, frozen packed values, a one-bit mask).

    All three are parameters, so ZeRO-3 partitions each across ranks like any weight: nothing here is replicated.
    Zeros need no storage: frozen entries that are all zero (B's, from its zero init, until a resample) are not
    stored, unless `keep_frozen` (a run that will resample needs room for them). A matrix that trains whole or not
    at all needs no mask.

    The dense matrix is one prefix count over the mask and two gathers, a few elementwise kernels and no
    data-dependent shape, so nothing makes the host wait for the GPU, forward or backward (masked_scatter's
    backward, masked_select, must read its output size back: one stall per matrix per backward)."""

    def __init__(self, dense: torch.Tensor, mask: torch.Tensor, keep_frozen: bool = False):
        super().__init__()
        self.shape = tuple(dense.shape)
        flat, mask = dense.reshape(-1), mask.reshape(-1).to(dense.device)
        self.train_values = nn.Parameter(flat[mask].clone())
        frozen = flat[~mask]
        keep = frozen.numel() > 0 and (keep_frozen or bool(frozen.any()))
        self.frozen_values = nn.Parameter(frozen.clone(), requires_grad=False) if keep else None
        partial = 0 < self.train_values.numel() < flat.numel()
        self.mask_bits = nn.Parameter(pack_mask(mask), requires_grad=False) if partial else None
        self.register_buffer("bit_values", torch.tensor(BIT_VALUES, dtype=torch.uint8, device=dense.device),
                             persistent=False)

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def n_frozen(self) -> int:
        return self.numel - self.train_values.numel()

    @property
    def mask(self) -> torch.Tensor:
        """True where the entry trains."""
        if self.mask_bits is None:
            return torch.full(self.shape, self.n_frozen == 0, dtype=torch.bool, device=self.bit_values.device)
        return unpack_mask(self.mask_bits, self.numel, self.bit_values).view(self.shape)

    def dense(self) -> torch.Tensor:
        """The full matrix; differentiable with respect to `train_values` only."""
        values = self.train_values
        if self.n_frozen == 0:
            return values.view(self.shape)
        if self.mask_bits is None:  # nothing trains
            frozen = self.frozen_values
            return (frozen.to(values.dtype) if frozen is not None else values.new_zeros(self.numel)).view(self.shape)
        return dense_together([self])[0]

    @property
    def masked(self) -> bool:
        """Part trains, part is frozen: the matrix is rebuilt through its mask."""
        return self.mask_bits is not None

    @torch.no_grad()
    def hold(self, trained: torch.Tensor, frozen: torch.Tensor, mask: torch.Tensor) -> None:
        """Take a new mask with as many trainable entries as the current one, and the values under it. In place:
        whatever holds these tensors (a captured CUDA graph, ZeRO-3's gathered parameters) sees the change."""
        self.train_values.copy_(trained)
        if self.frozen_values is None:  # trained entries become frozen: they are no longer all zero
            self.frozen_values = nn.Parameter(frozen.clone(), requires_grad=False)
        else:
            self.frozen_values.copy_(frozen)
        self.mask_bits.copy_(pack_mask(mask))


@torch.no_grad()
def remask_together(matrices: list[SparseMatrix], masks: list[torch.Tensor],
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Swap in new masks (each with its matrix's count). Values are kept; optimizer state follows each entry that
    stays trainable and starts at zero for an entry that becomes trainable. All matrices at once, over their
    concatenation: a boolean index makes the host wait for the GPU, so a handful of them per redraw, not ~8 per
    matrix (a 135M model's 420 matrices: 0.58 s a redraw one by one, ~0.14 s together; bench/NOTES.md)."""
    old, new, dense = joined(matrices, masks)
    trained = [m.train_values.numel() for m in matrices]
    states = [optimizer.state.get(m.train_values, {}) if optimizer is not None else {} for m in matrices]
    for key, value in states[0].items():  # AdamW's moments; not its step count
        if torch.is_tensor(value) and value.shape == matrices[0].train_values.shape:
            moments = [s[key] for s in states]
            for moment, moved in zip(moments, repack(torch.cat(moments), old, new).split(trained)):
                moment.copy_(moved)
    hold_together(matrices, dense, new)


def joined(matrices: list[SparseMatrix], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(old masks, new masks, dense values) of `matrices`, each concatenated flat: what a redraw moves entries by."""
    old = torch.cat([m.mask.reshape(-1) for m in matrices])
    new = torch.cat([k.reshape(-1) for k in masks]).to(old.device)  # drawn on the host: one copy for all
    return old, new, torch.cat([m.dense().reshape(-1) for m in matrices])


@torch.no_grad()
def hold_together(matrices: list[SparseMatrix], dense: torch.Tensor, new: torch.Tensor) -> None:
    """Each matrix takes its new mask and its dense values under it, from their concatenations (`dense`, `new`):
    one boolean index each way for all of them. (Under ZeRO-3, inside a gather of the matrices' parameters.)"""
    kept, held = dense[new], dense[~new]
    trained, frozen = [m.train_values.numel() for m in matrices], [m.n_frozen for m in matrices]
    for m, t, f, k in zip(matrices, kept.split(trained), held.split(frozen), new.split([m.numel for m in matrices])):
        m.hold(t, f, k)


def repack(packed: torch.Tensor, old: torch.Tensor, new: torch.Tensor, fill: torch.Tensor | None = None
           ) -> torch.Tensor:
    """Per-entry values of the trainable entries under mask `old` (packed, as `train_values`) -> the same under mask
    `new`: an entry that stays trainable keeps its value, one that becomes trainable takes its value in `fill` (a
    dense matrix), or zero."""
    old, new = old.to(packed.device), new.to(packed.device)
    full = packed.new_zeros(old.shape) if fill is None else fill.to(packed.device, packed.dtype, copy=True)
    full[old] = packed
    return full[new]


def dense_together(matrices: list[SparseMatrix]) -> list[torch.Tensor]:
    """The dense matrices of masked SparseMatrix objects, rebuilt in one pass over their concatenation: one unpack,
    one prefix count, two gathers and one `where` for all of them (a decoder layer's 14 matrices are ~100 kernels
    apart, ~20 together). Each mask must fill whole bytes, so that the concatenated bits are the concatenated masks;
    then the running count is each entry's index into the concatenated trainable values, and the count of frozen
    entries before it its index into the concatenated frozen ones. Without a sync: nothing makes the host wait."""
    first = matrices[0]
    numels = [m.numel for m in matrices]
    total = sum(numels)
    values = _joined([m.train_values for m in matrices])
    bits = _joined([m.mask_bits for m in matrices])
    mask = unpack_mask(bits, total, first.bit_values)
    seen = mask.cumsum(0, dtype=torch.int32)  # trainable entries up to and including each position
    # Where the mask is off the first gather reads a neighbour and the where() drops it: its gradient there is an
    # exact zero, so every trainable entry gets exactly its own position's gradient.
    trained = values.index_select(0, (seen - 1).clamp_(min=0))
    if first.frozen_values is None:  # B's zeros (until a redraw), not stored
        dense = torch.where(mask, trained, 0.0)
    else:
        frozen = _joined([m.frozen_values for m in matrices])
        before = torch.arange(total, dtype=torch.int32, device=mask.device).sub_(seen)  # frozen entries before
        held = frozen.to(values.dtype).index_select(0, before.clamp_(0, frozen.numel() - 1))
        dense = torch.where(mask, trained, held)
    return [d.view(m.shape) for d, m in zip(dense.split(numels), matrices)]


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)  # one matrix alone: no copy


class AdapterGroup:
    """The LoRA-SP matrices of one decoder layer, rebuilt together (`dense_together`) when the layer's first
    projection asks for its own, and handed out one projection at a time.

    The rebuild runs inside that projection's forward, so under gradient checkpointing it is inside the
    checkpointed region: recomputed in the backward like the rest, its gathers' indices never saved across the
    step. A projection that asks again (the recompute, the next step) finds its pair taken and starts a new
    rebuild; once every projection has taken its pair the group holds nothing. Under ZeRO-3 the layer must be
    fetched whole (a leaf module), since the first projection reads the others' parameters."""

    def __init__(self, layers: list[LoRASPLinear]):
        self.layers = layers
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def pair(self, layer: LoRASPLinear) -> tuple[torch.Tensor, torch.Tensor]:
        if id(layer) not in self._pending:
            self._pending = self._rebuild()
        return self._pending.pop(id(layer))

    def _rebuild(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        matrices = [m for layer in self.layers for m in (layer.lora_A, layer.lora_B)]
        # Rebuilt together: the masked ones whose masks fill whole bytes, with and without stored frozen values.
        together: dict[bool, list[SparseMatrix]] = {True: [], False: []}
        for m in matrices:
            if m.masked and m.numel % 8 == 0:
                together[m.frozen_values is not None].append(m)
        dense = {id(m): d for group in together.values() if group for m, d in zip(group, dense_together(group))}
        for m in matrices:
            if id(m) not in dense:
                dense[id(m)] = m.dense()
        return {id(layer): (dense[id(layer.lora_A)], dense[id(layer.lora_B)]) for layer in self.layers}


class LoRASPLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, name: str, cfg):
        super().__init__()
        self.base_layer = base_layer
        self.name, self.cfg = name, cfg
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.scaling = cfg.alpha / cfg.r
        self.group: AdapterGroup | None = None  # set by group_adapters: rebuilt with its decoder layer's others
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.round = 0  # how many times the masks were redrawn

        # Kaiming-uniform A and zero B, as peft initialises LoRA; the draw is per layer, so it is reproducible.
        a = torch.empty(cfg.r, self.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=mask_generator(cfg.seed, name, "init"))
        b = torch.zeros(self.out_features, cfg.r)
        device = _device_of(base_layer)
        resamples = cfg.resample_every > 0
        self.lora_A = SparseMatrix(a.to(device), self._mask("A", a.shape).to(device), keep_frozen=resamples)
        self.lora_B = SparseMatrix(b.to(device), self._mask("B", b.shape).to(device), keep_frozen=resamples)

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

    def _masked(self) -> list[tuple[str, SparseMatrix]]:
        """The matrices with a mask: one that trains whole or not at all has none, and no redraw changes it."""
        return [(w, m) for w, m in (("A", self.lora_A), ("B", self.lora_B)) if 0.0 < self._ratio(w) < 1.0]

    def redraw(self) -> list[tuple[SparseMatrix, torch.Tensor]]:
        """Step to the next round: each masked matrix with its new mask, for the caller to swap in
        (`remask_together`, or zero3's `_remask` under DeepSpeed)."""
        self.round += 1
        return [(m, self._mask(which, m.shape)) for which, m in self._masked()]

    @torch.no_grad()
    def set_round(self, round_: int) -> None:
        """Take the masks of round `round_` directly, moving no value: for a state dict whose values follow."""
        self.round = round_
        for which, m in self._masked():
            m.mask_bits.copy_(pack_mask(self._mask(which, m.shape)))

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.dense() @ self.lora_A.dense()) * self.scaling

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        a, b = self.group.pair(self) if self.group is not None else (self.lora_A.dense(), self.lora_B.dense())
        fused = getattr(self.base_layer, "forward_with_lora", None)
        if fused is not None and isinstance(self.dropout, nn.Identity) and a.dtype == self.base_layer.compute_dtype:
            # One autograd node for base + adapter: a 4-bit layer's dequantize, three matmuls and one fused add.
            return fused(x, a, b, self.scaling)
        result = self.base_layer(x, *args, **kwargs)
        lora = (self.dropout(x).to(a.dtype) @ a.t()) @ b.t()
        return result + (lora * self.scaling).to(result.dtype)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"r={c.r}, alpha={c.alpha}, variant={c.variant}, ratio={c.ratio}, strategy={c.strategy}"


def _device_of(module: nn.Module) -> torch.device:
    # a resident 4-bit layer (model/quant.py) holds its weight as a buffer
    p = next(itertools.chain(module.parameters(), module.buffers()), None)
    return p.device if p is not None and p.device.type != "meta" else torch.device("cpu")
