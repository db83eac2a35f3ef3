"""RMSNorm and SwiGLU of LLaMA-style decoder layers as compiled, fused kernels (`train.fused_kernels`, on GPUs).

transformers runs each as a chain of elementwise kernels over the whole activation: RMSNorm upcasts to fp32, squares,
averages, adds, takes rsqrt, multiplies, casts back and scales (and its backward more); SwiGLU is a SiLU and a
product of two 22016-wide tensors at 65B. At micro-batch 4 on one H200 such kernels took ~20% of the GPU's time and
each one reads and writes the activation again. torch.compile turns each function into one kernel forward and about
one backward. The modules keep the original parameters (the same objects, so ZeRO-3's partitioning and the state
dict are untouched) and the same math.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


@torch.compile(fullgraph=True, dynamic=False)
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@torch.compile(fullgraph=True, dynamic=False)
def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class FusedRMSNorm(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight, self.variance_epsilon = norm.weight, norm.variance_epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, self.weight, self.variance_epsilon)


class FusedSwiGLU(nn.Module):
    """down(silu(gate(x)) · up(x)), the projections (LoRA-SP layers or 4-bit ones) unchanged."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_swiglu(self.gate_proj(x), self.up_proj(x)))


def fuse_kernels(layers: list[nn.Module]) -> int:
    """Swap each decoder layer's RMSNorms and SwiGLU MLP for the fused modules, in place; the modules swapped.
    Only the shapes these functions compute are swapped: an RMSNorm (a weight and variance_epsilon) and an MLP with
    gate, up and down projections and SiLU."""
    swapped = 0
    for layer in layers:
        for name, child in list(layer.named_children()):
            if type(child).__name__.endswith("RMSNorm") and hasattr(child, "variance_epsilon"):
                setattr(layer, name, FusedRMSNorm(child))
            elif all(hasattr(child, p) for p in ("gate_proj", "up_proj", "down_proj")) and \
                    getattr(getattr(child, "config", None), "hidden_act", None) == "silu":
                setattr(layer, name, FusedSwiGLU(child))
            else:
                continue
            swapped += 1
    return swapped
