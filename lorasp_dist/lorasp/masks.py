"""Which entries of a LoRA matrix train. Each mask has exactly round(ratio * numel) True entries and is a pure
function of (seed, layer name, matrix, resample round), so it never needs to be stored in a checkpoint. In memory a
mask is one bit per entry (`pack_mask`), 1/32 of an int32 map."""

from __future__ import annotations

import zlib

import torch

from lorasp_dist.config import trainable_count


def mask_generator(seed: int, layer: str, which: str, round_: int = 0) -> torch.Generator:
    """A CPU generator, different for every layer, for A and B, and for every resample round."""
    key = zlib.crc32(f"{seed}/{layer}/{which}/{round_}".encode())
    return torch.Generator().manual_seed(key)


def mask_round(step: int, every: int) -> int:
    """The round of the masks that training step `step` (counted from 1) uses, when they are redrawn every `every`
    steps (0: never). Redraws happen between steps, so a checkpoint written after step s holds round
    mask_round(s, every), and the redraw before step s + 1 is due when mask_round(s + 1, every) is greater."""
    return (step - 1) // every if every and step > 0 else 0


def draw_mask(shape: tuple[int, int], ratio: float, strategy: str, gen: torch.Generator) -> torch.Tensor:
    """Bool mask of `shape`; True marks a trainable entry.

    random: element-wise. rows / cols: whole rows (columns) in random order, the last one partly, so the count is
    still exact; a structured half keeps each trainable run contiguous.
    """
    numel = shape[0] * shape[1]
    k = trainable_count(numel, ratio)
    if k == numel:
        return torch.ones(shape, dtype=torch.bool)
    if strategy == "random":
        flat = torch.zeros(numel, dtype=torch.bool)
        flat[torch.randperm(numel, generator=gen)[:k]] = True
        return flat.view(shape)
    if strategy not in ("rows", "cols"):
        raise ValueError(f"lorasp.strategy = {strategy!r}: accepted: random, rows, cols")
    lines = shape[0] if strategy == "rows" else shape[1]
    per_line = numel // lines
    order = torch.randperm(lines, generator=gen)
    mask = torch.zeros((lines, per_line), dtype=torch.bool)
    full, rest = divmod(k, per_line)
    mask[order[:full]] = True
    if rest:
        mask[order[full], :rest] = True
    return mask if strategy == "rows" else mask.t().contiguous()


# Bit j of byte i is entry 8i + j.
BIT_VALUES = (1, 2, 4, 8, 16, 32, 64, 128)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask (any shape) -> uint8, one bit per entry, row-major, the last byte padded with zeros."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)])
    bits = torch.tensor(BIT_VALUES, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * bits).sum(1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, numel: int, bit_values: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_mask, flat; `bit_values` is BIT_VALUES as a uint8 tensor on `packed`'s device (a buffer, so
    this makes no host-to-device copy: it runs without the host waiting for the GPU)."""
    return packed.unsqueeze(1).bitwise_and(bit_values).ne(0).view(-1)[:numel]
