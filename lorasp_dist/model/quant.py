"""NF4 quantization in transformers' own bitsandbytes 4-bit serialization.

A quantized linear weight `W` is stored as `<name>.weight` (packed 4-bit codes in the quant-storage dtype) plus the
quant-state tensors `<name>.weight.absmax`, `.quant_map`, `.nested_absmax`, `.nested_quant_map` and
`.quant_state.bitsandbytes__nf4` (non-tensor fields packed as bytes), exactly what `Linear4bit.state_dict()`
writes, so stock transformers loads our checkpoints and we load theirs.
"""

from __future__ import annotations

import logging

import torch

from lorasp_dist.eager import import_eager

# On a CPU with AVX512-BF16, importing bitsandbytes tries to fetch an optional CPU kernel from the Hugging Face hub
# (through the `kernels` package) and logs a warning on every rank when it cannot; we never use that kernel (see
# support_avx512bf16_for_cpu below) and never download at run time.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# ZeRO-3 partitions floating-point tensors; bf16 storage makes the 4-bit weights shardable like any other weight.
QUANT_STORAGE = torch.bfloat16


def bitsandbytes():
    """bitsandbytes, imported without its torch.compile decorators (lorasp_dist/eager.py): ~2 s of CPU in every rank."""
    return import_eager("bitsandbytes")


def quantization_config() -> dict:
    """config.json's `quantization_config` for our NF4 checkpoints (transformers' BitsAndBytesConfig.to_dict keys)."""
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "bfloat16",
        "llm_int8_skip_modules": ["lm_head"],
    }


def quantize_nf4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A dense weight (on any device) -> {"weight": packed, "weight.absmax": ..., ...} on the CPU."""
    F = bitsandbytes().functional
    packed, state = F.quantize_4bit(
        weight.contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4", quant_storage=QUANT_STORAGE
    )
    out = {"weight": packed}
    out.update({f"weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    return {k: v.cpu() for k, v in out.items()}


class _Matmul4bit(torch.autograd.Function):
    """x @ dequant(W)ᵀ that keeps a reference to the weight *Parameter*, never to its gathered storage.

    bitsandbytes' MatMul4Bit saves a view of the weight for backward, which pins each layer's gathered 4-bit
    storage after ZeRO-3 has released the parameter: by the end of the forward every rank holds the whole 4-bit
    model. Like DeepSpeed's own LinearFunctionForZeroStage3, this keeps the Parameter object, whose data ZeRO-3
    gathers again before the layer's backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight) -> torch.Tensor:
        ctx.weight = weight
        return x @ _dequantized(weight, x.dtype).t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ _dequantized(ctx.weight, grad.dtype), None


def _dequantized(weight, dtype: torch.dtype) -> torch.Tensor:
    """The 4-bit weight as a dense matrix, read through the Parameter (or resident buffer): its data now."""
    return bitsandbytes().functional.dequantize_4bit(weight.data.view(-1, 1), weight.quant_state).to(dtype)


class _LoRAMatmul4bit(torch.autograd.Function):
    """x @ dequant(W)ᵀ + s·(x @ Aᵀ) @ Bᵀ as one autograd node: the base matmul and the adapter share the input, the
    output buffer (one addmm) and the backward, so a projection costs one node instead of seven. Keeps the weight
    Parameter, never its gathered storage, for the reason _Matmul4bit gives."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight, a: torch.Tensor, b: torch.Tensor, scaling: float,
                keep_dequantized: bool) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        w = _dequantized(weight, x.dtype)
        xa = x2 @ a.t()
        out = torch.addmm(x2 @ w.t(), xa, b.t(), alpha=scaling)
        ctx.weight, ctx.scaling = weight, scaling
        ctx.save_for_backward(x2, a, b, xa, *([w] if keep_dequantized else []))
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x2, a, b, xa, *kept = ctx.saved_tensors
        weight, s = ctx.weight, ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        gb = (g @ b).mul_(s)  # the gradient at the adapter's r-wide middle
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            w = kept[0] if kept else _dequantized(weight, g.dtype)
            grad_x = torch.addmm(g @ w, gb, a).view(*grad.shape[:-1], a.shape[1])
        if ctx.needs_input_grad[2]:
            grad_a = gb.t() @ x2
        if ctx.needs_input_grad[3]:
            grad_b = (g.t() @ xa).mul_(s)
        return grad_x, None, grad_a, grad_b, None, None


def _linear4bit_class():
    bnb = bitsandbytes()

    class Linear4bitZeRO(bnb.nn.Linear4bit):
        """bitsandbytes' Linear4bit (same weights, same state dict) with a ZeRO-3-safe matmul (see _Matmul4bit)."""

        keep_dequantized = False  # see keep_dequantized()

        def _constants(self) -> None:
            """Read the absmax Parameter through the module: a per-module ZeRO-3 fetch that reaches this layer only
            through forward_with_lora then gathers it (and keeps it for backward) as it does `self.weight`. The quant
            state holds the same Parameter object, so dequantize reads the gathered data (an empty partition would
            crash bitsandbytes' kernel)."""
            getattr(self, "absmax", None)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            dtype = x.dtype
            self._constants()
            out = _Matmul4bit.apply(x.to(self.compute_dtype), self.weight)
            return (out if self.bias is None else out + self.bias.to(out.dtype)).to(dtype)

        def forward_with_lora(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float):
            """This layer plus a LoRA adapter (dense A: r x in, B: out x r, in the compute dtype), fused."""
            dtype = x.dtype
            self._constants()
            out = _LoRAMatmul4bit.apply(x.to(self.compute_dtype), self.weight, a, b, scaling, self.keep_dequantized)
            return (out if self.bias is None else out + self.bias.to(out.dtype)).to(dtype)

    return Linear4bitZeRO


def keep_dequantized(checkpointed_layer: torch.nn.Module) -> None:
    """The fused 4-bit projections of a checkpointed layer save their dequantized weight for backward. The forward's
    saved tensors are dropped by the checkpoint, and the recompute's live only from the layer's recompute to each
    projection's backward: one dequantize fewer per projection and step, for one layer's dense weights held at a
    time (1.6 GB at 65B)."""
    for m in checkpointed_layer.modules():
        if hasattr(m, "forward_with_lora"):
            m.keep_dequantized = True


def make_linear4bit(tensors: dict[str, torch.Tensor], device: torch.device | str, resident: bool = False):
    """A 4-bit linear layer (a bitsandbytes Linear4bit) holding pre-quantized `tensors` (the output of
    quantize_nf4), on `device`. `resident`: the packed weight and its absmax are buffers, not parameters, so ZeRO-3
    (which partitions and gathers parameters only) leaves them whole on this rank."""
    bnb = bitsandbytes()
    stats = {k.removeprefix("weight."): v for k, v in tensors.items() if k != "weight"}
    shape = _unpack_shape(stats)
    layer = _linear4bit_class()(
        shape[1], shape[0], bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
        quant_storage=QUANT_STORAGE, device="meta",
    )
    layer.weight = bnb.nn.Params4bit.from_prequantized(
        tensors["weight"], stats, requires_grad=False, device=device, module=layer
    )
    state = layer.weight.quant_state
    if state.nested:
        # The blockwise absmax (1 byte per 64 weights) becomes a frozen parameter, so ZeRO-3 partitions it with the
        # weight instead of every rank holding the whole model's (0.96 GiB at 65B). The quant state reads it through
        # the Parameter object, whose data is the partition at rest and the whole tensor while ZeRO-3 has it gathered.
        layer.absmax = torch.nn.Parameter(state.absmax, requires_grad=False)
        state.absmax = layer.absmax
    # bitsandbytes repacks weights in place for AVX512-BF16 CPU inference; under ZeRO-3 that would desynchronise the
    # gathered tensor from its partition and its quant state, so keep the portable layout.
    layer.support_avx512bf16_for_cpu = False
    if resident:
        for name in ("weight", "absmax"):
            if name in layer._parameters:
                layer.register_buffer(name, layer._parameters.pop(name))
    return layer


def _unpack_shape(stats: dict[str, torch.Tensor]) -> tuple[int, int]:
    meta = bitsandbytes().functional.unpack_tensor_to_dict(stats["quant_state.bitsandbytes__nf4"])
    return tuple(meta["shape"])
