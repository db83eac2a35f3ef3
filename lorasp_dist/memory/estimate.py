"""The analytic memory model: bytes per rank, on the GPU and on the host, for each component of a run.

No existing estimator covers this stack: DeepSpeed's assumes 18 B per trainable parameter and knows nothing of 4-bit
weights. This one walks the model's parameters in order and applies what DeepSpeed ZeRO-3 (0.19), bitsandbytes (0.50)
and transformers (5.x) actually allocate; each term says where its number comes from.

Every component is valued at the predicted peak, which is the larger of two moments of the backward pass:
- `loss`: the loss and its gradient over the logits, with the lm_head gathered;
- `layer`: one decoder layer's recompute (under checkpointing) and backward, with one 4-bit weight dequantized.
So `gpu_total` (the sum) is the peak that nvidia-smi shows, and `gpu_peak_reserved` is what
torch.cuda.max_memory_reserved reports: the same less the CUDA/NCCL context, which lives outside PyTorch's allocator.
On a CPU run every component is host memory, and `host` adds what the process pays beyond its tensors after the
tracker's baseline (library_imports, runtime_overhead, allocator_retention): the report compares the sum with the
measured RSS delta. On a CUDA run `host` is the RSS peak of a rank: the baseline, the imports, the CUDA runtime's
host pages, the offloaded tensors with what pinning them costs, and the host copy a checkpoint is written from.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorasp_dist.config import LLAMA_PROJECTIONS, ConfigError, RunConfig, trainable_count
from lorasp_dist.ds_config import build_ds_config, offloaded
from lorasp_dist.presets import PRESETS, Preset
from lorasp_dist.sizes import GiB, MiB

# GPU memory outside PyTorch's allocator: CUDA context, cuBLAS/cuBLASLt workspaces, NCCL communicator. On an H100
# 80GB (torch 2.11+cu130, driver 580) NVML used minus torch reserved was 621 MiB after CUDA init, 683 MiB after a
# bf16 cuBLAS matmul, 1249 MiB after a single-rank NCCL all_reduce; in full training runs (bench gpu1-142129,
# 1× H200, llama-7b/65b × zero3/zero3_offload_all) peak NVML used minus peak torch reserved was 1.89, 1.91, 1.89 and
# 1.97 GiB: 1960 MiB, their mean (in-sample for those four; checked on the one-GPU records of s14-1gpu and
# s14-1gpu65, 1.90 GiB). More ranks add NCCL's buffers (NCCL_BUFFER_BYTES below).
CUDA_CONTEXT_BYTES = 1960 * MiB
# NCCL's communicator buffers, allocated outside torch's caching allocator: NVML used minus peak reserved read
# 2.37 GiB on every two-GPU run of 4aceb38 (llama-7b and llama-65b, s14-*) against 1.90 GiB on one GPU (s14-1gpu,
# s14-1gpu65). The 468 MiB difference is in-sample for those; checked on the two-GPU records of 4792f5f and
# d8b41d4 (NVML within ±7.1%).
NCCL_BUFFER_BYTES = 468 * MiB
# PyTorch's caching allocator reserves more than it allocates (block rounding, split blocks):
# reserved ≈ allocated × (1 + fragmentation), for the compute stream's pool. Gathered ZeRO-3 parameters live in
# another stream's pool, modelled on its own (plan_memory, "ZeRO-3 gathers").
ALLOCATOR_FRAGMENTATION = 0.08
# With expandable segments (memory.expandable_segments, the default) a stream's pool is one segment that grows in
# place, so freed blocks coalesce instead of stranding split pieces. What is still reserved beyond the allocated peak
# (less the gathers' pending window) follows the activations, the tensors that come and go within a step: 2x H200,
# llama-65b, revision d8b41d4, 1.52 GiB at zero3 micro-batch 4 and 1.91 GiB at zero3_offload_all micro-batch 4,
# each over 14.1 GiB of activations: 10.8% and 13.5%, so 12% (in-sample). Checked on records not fitted to: zero3
# micro-batch 1 (0.64 GiB over 3.5: reserved predicted within +5.4%) and micro-batch 8 (3.5 over 28.2: -2.5%).
EXPANDABLE_ACTIVATION_SLACK = 0.12
# At the loss the fp32 logits' transients (the upcast copy, log_softmax's output, their gradients) come and go in
# sizes the layers' tensors do not reuse: 20% of the logits term stays reserved beyond the allocated peak. Fitted
# (in-sample) to the six one-GPU llama-7b records of s14-1gpu (bcef83f, zero3 and both offload configs at micro-batch
# 1 and 4, each with its peak at the loss): reserved within -9.5%..+9.0%. Checked on records not fitted to: the six
# two-GPU llama-7b records of 4aceb38 (+2.2%..+4.2%). A llama-65b step peaks in a layer, where this term is zero.
LOSS_SLACK = 0.2
# Host RSS of a rank at the tracker's baseline (after the imports, the process group, the tokenizer and the data;
# before the model). CPU: the baseline lines of 4 runs of examples/tiny.yaml on its built-in corpus (2 ranks under
# torchrun, torch 2.13 CPU, 2-core x86-64 VM) read 315-317 MiB: torch 219 + deepspeed 22 MiB of imports and more,
# the gloo group, tokenizer and data. A run that reads data files also imports `datasets` (with pandas and pyarrow)
# before its baseline: 2 such runs read 405-417 MiB, DATA_FILES_IMPORT_BYTES more. CUDA: the baseline lines of the
# 2x H200 `lorasp launch` ranks at revision d8b41d4 (records m65-live1e9, m65-live4e8, cap24GiB, cap48GiB, cap80GiB:
# rank 0 1424-1425 MiB, rank 1 1456-1457 MiB), mean 1441 MiB (in-sample). Checked on a record not fitted to: the 65B
# run of 6ef7c07 (call 2 of gpu-20261130) read 1420 MiB. Ranks started by torchrun instead of a Ray worker read ~90
# MiB less (gpu1-142129: 1347-1351 MiB); on an H100, torch's CUDA build + CUDA init + cuBLAS + NCCL alone raised RSS
# to 1093 MiB.
PROCESS_BASE_BYTES = {"cpu": 316 * MiB, "cuda": 1441 * MiB}
# CUDA: the records above were taken when every rank imported `datasets`, so their base holds it already (a Ray
# worker also has pandas and pyarrow from ray.train): no term of its own until it is measured apart.
DATA_FILES_IMPORT_BYTES = {"cpu": 94 * MiB, "cuda": 0}
# CUDA runs: what a rank's RSS gains in its first training steps beyond its host tensors and the imports below: the
# CUDA runtime's host pages (kernel images loaded on first launch, lazily: torch's, cuBLAS/cuBLASLt's,
# bitsandbytes', NCCL's, with their host-side state) and DeepSpeed's engine bookkeeping. Fitted (in-sample): the
# training phases' RSS peak minus the baseline on both ranks of the four 2x H200 zero3 records at d8b41d4, which hold
# no host tensors (m65-live1e9, m65-live4e8, cap48GiB, cap80GiB: 989-1070 MiB, micro-batch 1 to 8), mean 1031 MiB,
# less the 121 MiB of imports then (torch._inductor's 44 MiB among them, which DeepSpeed's Muon optimizer brought in
# before lorasp_dist/eager.py; one-GPU llama-7b runs of the new code, bench/results/gpu-20261201-s21, spread
# ±100 MiB around this plan, so the constant stays). Checked on records not fitted to in
# tests/test_memory_model.py: cap24GiB (zero3_offload_all, 21.7 GiB of host tensors) and the 2-GPU llama-7b and
# llama-65b records of 2017c41/6ef7c07.
CUDA_RUNTIME_BYTES = 910 * MiB
# CPU runs: what a rank's RSS gains after the baseline beyond the tensors this model counts. Measured on the same VM
# (glibc malloc, OMP_NUM_THREADS=1 as torchrun sets it) with RSS and /proc/self/status read around each engine call
# of examples/tiny.yaml runs; calibrated on seq 128 × micro-batch 2 and seq 512 × micro-batch 4 (zero3, 2 ranks,
# 2 runs each) and checked on other configs in tests/test_memory_cpu_run.py. Refitted at the eager import of
# DeepSpeed's Muon optimizer (lorasp_dist/eager.py), which no longer brings torch._inductor into a rank: the deltas
# fell by 44 MiB at seq 128 × mb 2 and by 82 MiB at seq 512 × mb 4 (136.4 and 176.0 MiB, means of 2 runs × 2 ranks).
# - Modules first imported by load_base, after the baseline: transformers' model classes (around
#   AutoModelForCausalLM.from_config: +74 MiB, 1062 modules, mostly torch._dynamo and sympy) and, for a 4-bit base,
#   bitsandbytes, imported without its torch.compile decorators (+3 MiB). CUDA ranks import the same modules after
#   the same baseline: counted on both devices.
CPU_IMPORT_BYTES = {"transformers_models": 74 * MiB, "bitsandbytes": 3 * MiB}
# - Engine and first-step overhead that does not scale with tokens: the model skeleton and ZeRO-3 hooks (~4 MiB in
#   the load phase beyond the imports), LoRA-SP injection and deepspeed.initialize (~9 MiB in the init phase beyond
#   the adapters' bytes), libtorch/oneDNN code paged in and autograd/DeepSpeed bookkeeping of the first steps
#   (~40 MiB, a third of it file-backed pages). The calibration runs' intercept (RSS delta minus the imports, this
#   model's tensors and the heap retention below) stayed at 51 MiB in the refit: the 44 MiB fall was the imports'.
CPU_RUNTIME_BYTES = 51 * MiB
# - glibc keeps freed heap: a step's short-lived buffers (the loss's fp32 logits.float(), log_softmax and their
#   gradients, 4·vocab B per token each, and the stored activations) partly come from the heap, where they stay
#   resident after they are freed. Fitted on the calibration runs (mean deltas 136.4 -> 176.0 MiB, other terms
#   subtracted): 0.68 B retained per byte of the `logits` and `activations` terms. Checked without gradient
#   checkpointing, where activations are most of the step (seq 512 × mb 4 and mb 6, 39 and 58 MiB stored): deltas
#   238 and 290 MiB, predicted 236 and 288. (Before the refit, torch._inductor's large frees at import raised glibc's
#   dynamic mmap threshold early, and the loss buffers alone kept 2.35 B per byte.)
CPU_HEAP_RETENTION = 0.68

# NF4 with double quantization (bitsandbytes.functional.quantize_4bit, compress_statistics=True): two weights per
# byte, one absmax per 64 weights quantized to uint8, one fp32 absmax per 256 of those, and per matrix the NF4 code
# (16 fp32), the 8-bit dynamic code (256 fp32) and the fp32 offset.
NF4_BLOCKSIZE = 64
NF4_NESTED_BLOCKSIZE = 256
NF4_TABLES_BYTES = 16 * 4 + 256 * 4 + 4
QUANT_STORAGE_BYTES = 2  # bnb_4bit_quant_storage=bfloat16: ZeRO-3 sees a bf16 tensor of numel/4 elements
BASE_BYTES = 2  # embeddings, norms, lm_head and dequantized weights stay bf16 (the synthetic and HF bases are bf16)

GPU_COMPONENTS = (
    "base_weights_4bit", "quant_constants", "bf16_weights", "lorasp_params", "lorasp_frozen", "lorasp_masks",
    "gradients", "optimizer_states", "zero3_gather_buffers", "activations", "logits", "dequant_transient",
    "cuda_context", "allocator_fragmentation",
)
CPU_HOST_COMPONENTS = ("runtime_overhead", "allocator_retention")  # zero on CUDA plans
CUDA_HOST_COMPONENTS = ("cuda_runtime",)  # zero on CPU plans
HOST_COMPONENTS = (
    "process_base", "offloaded_optimizer", "offloaded_params", "pinned_buffers", "pinned_overhead",
    "checkpoint_staging", "library_imports", *CUDA_HOST_COMPONENTS, *CPU_HOST_COMPONENTS,
)
# What the adapter costs a rank, GPU and host together: its parameters, frozen values and masks (wherever ZeRO-3
# keeps them), and the gradients and optimizer state of its trainable entries. Not counted: the reduce bucket (a
# fixed reduce_bucket_size buffer, the same for every variant) and the dense A and B rebuilt at each forward
# (activations).
ADAPTER_TERMS = ("params", "frozen", "masks", "gradients", "optimizer")
RUNTIME_COMPONENTS = ("cuda_context", "process_base", "library_imports", "cuda_runtime", "runtime_overhead")
_ADAPTER_COMPONENTS = {"lorasp_params": "params", "lorasp_frozen": "frozen", "lorasp_masks": "masks"}

# DeepSpeed's own defaults (deepspeed/runtime/zero/config.py) for keys a template leaves out.
_ZERO_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "stage3_model_persistence_threshold": 2**63 - 1,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_max_reuse_distance": 1_000_000_000,
    "sub_group_size": 1_000_000_000,
}

def gib(n: float) -> float:
    return n / GiB


@dataclass
class MemoryPlan:
    preset: str
    world_size: int
    micro_batch: int
    seq_len: int
    ds_config: str
    gradient_checkpointing: bool
    variant: str
    gpu: dict[str, int]  # component -> bytes per rank on the GPU, at the predicted peak
    host: dict[str, int]  # component -> bytes per rank on the host (everything, for a CPU run)
    full_ft_bytes: int = 0  # full fine-tune of the same model: 16 B/param + activations, the whole job
    full_ft_breakdown: dict[str, int] = field(default_factory=dict)
    device: str = "cuda"
    peak_phase: str = "layer"  # "loss" or "layer": which moment of the backward pass is the peak
    settings: dict[str, Any] = field(default_factory=dict)  # the other plan_memory arguments (ds: the DeepSpeed dict)
    shape: dict[str, Any] = field(default_factory=dict)  # the Preset's fields
    counts: dict[str, int] = field(default_factory=dict)  # parameter counts behind the bytes
    adapter: dict[str, int] = field(default_factory=dict)  # ADAPTER_TERMS -> bytes per rank, GPU and host together
    checkpoint_layers: int | None = None  # with checkpointing: the first N decoder layers are checkpointed (None: all)
    resident_layers: int = 0  # the first N decoder layers' 4-bit weights are whole on every rank, outside ZeRO-3

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    @property
    def gpu_peak_reserved(self) -> int:
        """Predicted torch.cuda.max_memory_reserved() per rank (the context is outside PyTorch's allocator)."""
        return self.gpu_total - self.gpu["cuda_context"]

    @property
    def cluster_total(self) -> int:
        return (self.gpu_total + self.host_total) * self.world_size

    @property
    def runtime_per_rank(self) -> int:
        """What a rank pays before it holds a tensor: Python, torch and the libraries, the CUDA context."""
        return sum(self.gpu.get(k, 0) + self.host.get(k, 0) for k in RUNTIME_COMPONENTS)

    @property
    def full_ft_ratio(self) -> float:
        """The cluster total against a full fine-tune, like with like: the full fine-tune's figure counts no
        runtime, so neither does this side."""
        ours = self.cluster_total - self.runtime_per_rank * self.world_size
        return ours / self.full_ft_bytes if self.full_ft_bytes else math.nan

    @property
    def adapter_total(self) -> int:
        return sum(self.adapter.values())

    def replan(self, **changes) -> MemoryPlan:
        """The same run with some arguments of plan_memory changed (e.g. variant="lora", r=64). The DeepSpeed dict
        stays: a different ds_config or micro-batch is a different config (plan_for_config)."""
        kw = dict(
            world_size=self.world_size, micro_batch=self.micro_batch, seq_len=self.seq_len, ds_config=self.ds_config,
            gradient_checkpointing=self.gradient_checkpointing, checkpoint_layers=self.checkpoint_layers,
            resident_layers=self.resident_layers, variant=self.variant, device=self.device,
            **self.settings,
        )
        kw.update(changes)
        return plan_memory(self.preset if self.preset in PRESETS else self.preset_shape(), **kw)

    def preset_shape(self) -> Preset:
        return Preset(**self.shape) if self.shape else PRESETS[self.preset]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            gpu_total=self.gpu_total, host_total=self.host_total, gpu_peak_reserved=self.gpu_peak_reserved,
            cluster_total=self.cluster_total, adapter_total=self.adapter_total,
        )
        return json.loads(json.dumps(d))  # plain JSON types only (tuples -> lists)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemoryPlan:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class ZeroSettings:
    """The zero_optimization keys the model reads, from the dict build_ds_config gives deepspeed.initialize."""

    reduce_bucket: int
    prefetch_bucket: int
    persistence_threshold: int
    model_persistence_threshold: int
    max_live: int
    max_reuse_distance: int
    sub_group_size: int
    offload_optimizer: bool
    offload_param: bool
    pin_param: bool  # offload_param.pin_memory (DeepSpeed's default: true)
    pin_optimizer: bool  # offload_optimizer.pin_memory

    @classmethod
    def from_ds(cls, ds: dict) -> ZeroSettings:
        zero = ds.get("zero_optimization", {})
        num = {k: int(float(zero.get(k, d))) for k, d in _ZERO_DEFAULTS.items()}
        return cls(
            num["reduce_bucket_size"], num["stage3_prefetch_bucket_size"], num["stage3_param_persistence_threshold"],
            num["stage3_model_persistence_threshold"], num["stage3_max_live_parameters"],
            num["stage3_max_reuse_distance"], num["sub_group_size"], offloaded(ds, "offload_optimizer"),
            offloaded(ds, "offload_param"), bool((zero.get("offload_param") or {}).get("pin_memory", True)),
            bool((zero.get("offload_optimizer") or {}).get("pin_memory", True)),
        )


def resolve_preset(preset: str | Preset) -> tuple[str, Preset]:
    if isinstance(preset, Preset):
        return "custom", preset
    if preset not in PRESETS:
        raise ConfigError(f"preset = {preset!r}: unknown preset; accepted: {', '.join(PRESETS)}")
    return preset, PRESETS[preset]


def nf4_bytes(numel: int) -> tuple[int, int]:
    """(packed 4-bit storage bytes, quant-constant bytes) of one NF4 double-quantized matrix of `numel` weights."""
    storage_elems = math.ceil(math.ceil(numel / 2) / QUANT_STORAGE_BYTES)
    blocks = math.ceil(numel / NF4_BLOCKSIZE)
    constants = blocks + 4 * math.ceil(blocks / NF4_NESTED_BLOCKSIZE) + NF4_TABLES_BYTES
    return storage_elems * QUANT_STORAGE_BYTES, constants


def pinned_bytes(n: int) -> int:
    """Host bytes that pin_memory() of an n-byte tensor takes: PyTorch's pinned host allocator rounds every request
    up to a power of two (CachingHostAllocator.h: c10::llvm::PowerOf2Ceil, below pinned_max_round_threshold, which
    is unlimited by default), and all of a page-locked block is resident."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _sub_groups(numel: int, size: int) -> list[int]:
    """The optimizer's sub-groups of a rank's `numel` trainable elements (stage3.py _create_fp16_sub_groups, which
    cuts between parameters: taken here as full groups of `size` and the rest)."""
    full, rest = divmod(numel, max(size, 1))
    return [size] * full + ([rest] if rest else [])


def _matrix_ratios(variant: str, ratio: float) -> tuple[float, float]:
    """The trainable fraction of A and of B (LoRASPLinear._ratio)."""
    return {"lora": (1.0, 1.0), "lora-fa": (0.0, 1.0)}.get(variant, (ratio, ratio))


def adapter_storage(variant: str, out_f: int, in_f: int, r: int, ratio: float, keep_frozen: bool = False,
                    elem_bytes: int = 2) -> list[tuple[str, int, int, bool]]:
    """What one target projection's adapter stores, as lorasp/layer.py's SparseMatrix lays out each of A (r × in)
    and B (out × r): (component, elements, bytes per element, trainable) per tensor, every one a ZeRO-3 parameter,
    partitioned like the base.

    Per matrix: its trainable entries, packed; its frozen entries, packed, unless they are all zero (B's, from its
    zero init) and no resample will fill them (`keep_frozen`: lorasp.resample_every > 0); a mask of one bit per
    entry, packed in bytes, when part of the matrix trains. So lora is peft's layout (a dense A and B, all trainable,
    no mask), lora-fa stores A frozen whole and no mask, and lorasp stores half of A and of B trainable, A's frozen
    half, and two masks. (Each matrix also holds BIT_VALUES, an 8-byte lookup buffer: left out.)
    """
    ratios = _matrix_ratios(variant, ratio)
    stored = []
    for numel, part_ratio, zero_init in ((r * in_f, ratios[0], False), (out_f * r, ratios[1], True)):
        t = trainable_count(numel, part_ratio)
        stored.append(("lorasp_params", t, elem_bytes, True))
        stored.append(("lorasp_frozen", (numel - t) * (keep_frozen or not zero_init), elem_bytes, False))
        stored.append(("lorasp_masks", math.ceil(numel / 8) * (0 < t < numel), 1, False))
    return [t for t in stored if t[1]]


@dataclass
class _Param:
    """One ZeRO-3 parameter: `numel` elements of `elem_bytes` each (ds_numel: storage elements for 4-bit)."""

    component: str
    numel: int
    elem_bytes: int
    trainable: bool
    layer: int | None  # decoder layer index; None for embeddings, final norm and lm_head
    name: str


def _parameters(p: Preset, variant: str, quantize: bool, targets: list[str], r: int, ratio: float,
                keep_frozen: bool, lora_bytes: int, tied: bool,
                partition_absmax: bool = True, resident_layers: int = 0) -> tuple[list[_Param], dict[str, int]]:
    """Every ZeRO-3 parameter in forward order, plus the non-partitioned bytes (quant constants, and the 4-bit
    weights and absmax of the first `resident_layers` layers, which are buffers whole on every rank).
    A tied lm_head is the embedding's parameter: it is not a second one."""
    full = variant == "full"
    params = [_Param("bf16_weights", p.vocab_size * p.hidden_size, BASE_BYTES, full, None, "embed_tokens")]
    fixed = {"quant_constants": 0, "base_weights_4bit": 0}
    shapes = p.linear_shapes()
    for layer in range(p.num_hidden_layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            params.append(_Param("bf16_weights", p.hidden_size, BASE_BYTES, full, layer, norm))
        for name, (out_f, in_f) in shapes.items():
            if quantize and not full and layer < resident_layers:
                storage, constants = nf4_bytes(out_f * in_f)
                fixed["base_weights_4bit"] += storage
                fixed["quant_constants"] += constants
            elif quantize and not full:
                storage, constants = nf4_bytes(out_f * in_f)
                params.append(_Param("base_weights_4bit", storage // QUANT_STORAGE_BYTES, QUANT_STORAGE_BYTES,
                                     False, layer, name))
                # the uint8 absmax is a ZeRO-3 parameter beside its weight (model/quant.py); the nested absmax and
                # the code tables stay whole on every rank
                absmax = math.ceil(out_f * in_f / NF4_BLOCKSIZE) if partition_absmax else 0
                if absmax:
                    params.append(_Param("quant_constants", absmax, 1, False, layer, f"{name}.absmax"))
                fixed["quant_constants"] += constants - absmax
            else:
                params.append(_Param("bf16_weights", out_f * in_f, BASE_BYTES, full, layer, name))
            if full or name not in targets:
                continue
            for i, (component, numel, elem_bytes, trainable) in enumerate(
                adapter_storage(variant, out_f, in_f, r, ratio, keep_frozen, lora_bytes)
            ):
                params.append(_Param(component, numel, elem_bytes, trainable, layer, f"{name}.adapter{i}"))
    params.append(_Param("bf16_weights", p.hidden_size, BASE_BYTES, full, None, "norm"))
    if not tied:
        params.append(_Param("bf16_weights", p.vocab_size * p.hidden_size, BASE_BYTES, full, None, "lm_head"))
    return params, fixed


def _activations(p: Preset, tokens: int, targets: list[str], r: int, full: bool, checkpointed: int,
                 masked_entries: int = 0, fused: bool = False) -> dict[str, int]:
    """Activation bytes of the backward pass's two candidate peaks (bf16, SDPA attention: no seq² term), with the
    first `checkpointed` decoder layers checkpointed and the others keeping their activations.

    Per token and decoder layer: Korthikanti et al. 2022's accounting of saved tensors, redone for LLaMA as
    transformers runs it, and checked tensor by tensor with saved_tensors_hooks (tests/test_memory_model.py); e = 2 B:
      RMSNorm ×2: fp32 upcast saved by pow/mul (4h) + fp32 rsqrt (4); the bf16 output is saved by the weight mul
        only when the norm weight trains (variant=full: + e·h)
      q/k/v input e·h, gate/up input e·h, down_proj input e·i: saved by the LoRA A matmul (the 4-bit matmul and a
        frozen nn.Linear save no input; with variant=full nn.Linear saves the same tensors), each only if targeted
      rotated q, k and v: e·(h + 2·kv); SDPA output e·h (flash/efficient kernels write it as (b, s, heads, d), so
        o_proj's input is the same storage) and logsumexp 4·heads (fp32)
      SwiGLU: gate out (SiLU input), SiLU out, up out: 3·e·i
      With `fused` (model/fused.py, train.fused_kernels on a GPU) a layer's RMSNorm saves its bf16 input and the fp32
        rsqrt (e·h + 4) and SwiGLU gate and up out (2·e·i); the final norm stays transformers'
      LoRA x·Aᵀ per target: e·r; per layer, not per token, each target's dense A and B: e·r·(in + out), and for
        each matrix that trains in part (`masked_entries` per layer) what its rebuild saves: the int32 gather index
        and the bool mask, 5 B an entry
    Without checkpointing layer 0's input norm saves nothing (the embeddings are frozen), which cancels the final
    norm's 4h + 4. Checkpointed (non-reentrant): each layer's input hidden state (e·h) is kept, the final norm's
    saves (4h + 4) sit outside any checkpoint, and the layer under backward is recomputed whole. Backward working
    set of one layer (an estimate): incoming and outgoing hidden grads plus the grads of gate, up and SiLU
    outputs, e·(2h + 3i). With some layers checkpointed, the backward frees the last (kept) layers' activations
    before it recomputes the first checkpointed one.
    Loss (transformers' ForCausalLMLoss): bf16 logits, an fp32 copy, log_softmax's fp32 output saved for backward
    (4·V, measured); the backward holds that output, its fp32 gradient and the fp32 gradient of the input:
    12·V per token at peak (10·V in the forward: 2 + 4 + 4; the loop keeps only the loss, so the bf16 logits go).
    """
    e, h, i, v = BASE_BYTES, p.hidden_size, p.intermediate_size, p.vocab_size
    kv = p.num_key_value_heads * (h // p.num_attention_heads)
    lora = [] if full else [t for t in targets if t in LLAMA_PROJECTIONS]
    saves = set(LLAMA_PROJECTIONS) if full else set(lora)
    final_norm = 4 * h + 4 + e * h * full
    norm = e * h + 4 if fused else final_norm
    per_token = (
        2 * norm
        + e * h * bool(saves & {"q_proj", "k_proj", "v_proj"})
        + e * (h + 2 * kv) + e * h + 4 * p.num_attention_heads
        + e * h * bool(saves & {"gate_proj", "up_proj"})
        + (2 if fused else 3) * e * i + e * i * ("down_proj" in saves)
        + e * r * len(lora)
    )
    shapes = p.linear_shapes()
    per_layer_fixed = sum(e * r * (shapes[t][0] + shapes[t][1]) for t in lora) + 5 * masked_entries
    layer = per_token * tokens + per_layer_fixed
    final = (final_norm + e * h * full) * tokens  # final RMSNorm (+ the lm_head input when the lm_head trains)
    kept = p.num_hidden_layers - checkpointed
    checkpoints = checkpointed * e * h * tokens + final
    stored = checkpoints + kept * layer - (0 if full or checkpointed else norm * tokens)
    backward = e * (2 * h + 3 * i) * tokens
    recompute = checkpoints + layer - stored if checkpointed else 0  # at the first checkpointed layer's backward
    return {
        "stored": stored,
        "layer": max(recompute, 0) + backward,  # extra during one layer's recompute + backward
        "logits": 12 * v * tokens,
        "saved_logits": 4 * v * tokens,  # what the forward leaves for the backward
        "per_layer": layer,
    }


def _full_ft_activations(p: Preset, seq_len: int, micro_batch: int) -> int:
    act = _activations(p, seq_len * micro_batch, list(LLAMA_PROJECTIONS), 0, full=True,
                       checkpointed=p.num_hidden_layers)
    return act["stored"] + max(act["logits"], act["layer"])


def num_params(p: Preset, tied: bool = False) -> int:
    """All parameters of the model; a tied lm_head shares the embedding's weight and counts once."""
    return p.num_params() - (p.vocab_size * p.hidden_size if tied else 0)


def full_finetune_bytes(preset: str | Preset, seq_len: int = 2048, micro_batch: int = 1,
                        tied: bool = False) -> tuple[int, dict[str, int]]:
    """The whole job's bytes for a full mixed-precision Adam fine-tune: 16 B/param + one micro-batch's activations
    (with checkpointing). llama-65b: 16 × 65.29e9 = 1.045e12 B of model states."""
    _, p = resolve_preset(preset)
    n = num_params(p, tied)
    breakdown = {
        "weights_bf16": 2 * n,
        "gradients_bf16": 2 * n,
        "master_weights_fp32": 4 * n,
        "adam_m_fp32": 4 * n,
        "adam_v_fp32": 4 * n,
        "activations": _full_ft_activations(p, seq_len, micro_batch),
    }
    return sum(breakdown.values()), breakdown


def plan_memory(
    preset: str | Preset,
    world_size: int,
    *,
    ds: dict,
    ds_config: str = "custom",
    micro_batch: int = 1,
    seq_len: int = 2048,
    r: int = 16,
    ratio: float = 0.5,
    targets: list[str] | tuple[str, ...] = tuple(LLAMA_PROJECTIONS),
    variant: str = "lorasp",
    resample_every: int = 0,
    gradient_checkpointing: bool = True,
    checkpoint_layers: int | None = None,
    resident_layers: int = 0,
    device: str = "cuda",
    vocab_size: int | None = None,
    precision: str = "bf16",
    quantize: bool = True,
    tied_embeddings: bool = False,
    expandable_segments: bool = True,
    partition_absmax: bool = True,
    keep_dequantized: bool = True,
    fused_kernels: bool = False,
    data_files: bool = False,
) -> MemoryPlan:
    """Bytes per rank of one training step at its peak. `device="cpu"`: a CPU run, where everything is host memory.

    `ds` is the DeepSpeed config dict (ds_config.build_ds_config: what deepspeed.initialize receives); `ds_config`
    only names it. plan_for_config fills every argument from a run config. `partition_absmax=False` plans the code
    before the 4-bit absmax became a ZeRO-3 parameter (every rank held all of it), `keep_dequantized=False` the code
    before a checkpointed layer's recompute kept its dequantized weights: for records measured then.
    `fused_kernels`: the decoder layers' RMSNorm and SwiGLU are model/fused.py's (train.fused_kernels on a GPU).
    `data_files`: the run reads its data from files (data.path), not the built-in corpus."""
    name, p = resolve_preset(preset)
    if vocab_size:
        p = Preset(**{**asdict(p), "vocab_size": vocab_size})
    if world_size < 1:
        raise ConfigError(f"world_size = {world_size}: must be at least 1")
    if micro_batch < 1 or seq_len < 1:
        raise ConfigError(f"micro_batch = {micro_batch}, seq_len = {seq_len}: must be positive")
    if variant not in ("lorasp", "lora", "lora-fa", "full"):
        raise ConfigError(f"variant = {variant!r}: accepted: lorasp, lora, lora-fa, full")
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device = {device!r}: accepted: cuda, cpu")
    zero = ZeroSettings.from_ds(ds)
    cuda = device == "cuda"
    # On CPU "offloading" moves bytes between two names for the same memory; plan it as one place.
    offload_opt, offload_param = zero.offload_optimizer and cuda, zero.offload_param and cuda
    full = variant == "full"
    quantized = quantize and not full
    lora_bytes = 4 if precision == "fp32" else 2  # LoRA-SP values, their grads and frozen halves: train.precision
    targets = list(targets)
    W = world_size

    params, fixed = _parameters(p, variant, quantized, targets, r, ratio, resample_every > 0, lora_bytes,
                                tied_embeddings, partition_absmax, resident_layers)
    gpu = dict.fromkeys(GPU_COMPONENTS, 0)
    host = dict.fromkeys(HOST_COMPONENTS + GPU_COMPONENTS, 0)
    gpu.update(fixed)  # not parameters (nested quant constants, resident layers): ZeRO-3 never partitions them
    adapter = dict.fromkeys(ADAPTER_TERMS, 0)

    # ZeRO-3 partitions each parameter into ceil(numel / W) elements per rank (padded). A parameter of at most
    # stage3_param_persistence_threshold elements (while the persisted total stays under the model threshold / W)
    # is persistent: once gathered it stays whole on every rank, next to its partition, and is never offloaded.
    # With W = 1 a gather is `partition.to(device)` (partition_parameters.NoGatherHandle): the partition itself when
    # it is on the device, a new copy only when offload_param put it on the host.
    gathers_allocate = W > 1 or offload_param
    persisted = trainable_part = trainable_full = 0
    gathered_layer: dict[int | None, int] = {}  # non-persistent bytes gathered per layer (None: embed/head)
    traversed_layer: dict[int | None, int] = {}  # all elements per layer, as the reuse-distance walk counts them
    largest = 0  # elements of the largest decoder-layer parameter that gets gathered
    for prm in params:
        part = math.ceil(prm.numel / W)
        persist = (
            prm.numel <= zero.persistence_threshold
            and persisted + prm.numel <= zero.model_persistence_threshold // W
        )
        traversed_layer[prm.layer] = traversed_layer.get(prm.layer, 0) + prm.numel
        held = ((prm.numel * (W > 1) if persist else 0) + part) * prm.elem_bytes
        if prm.component in _ADAPTER_COMPONENTS:
            adapter[_ADAPTER_COMPONENTS[prm.component]] += held  # on the GPU or the host
        if persist:
            persisted += prm.numel
            gpu[prm.component] += held
        else:
            if offload_param:
                host["offloaded_params"] += held
                if zero.pin_param:  # partition_parameters.py _partition_param: each partition is pinned alone
                    host["pinned_overhead"] += pinned_bytes(held) - held
            else:
                gpu[prm.component] += held
            if prm.layer is not None:
                gathered_layer[prm.layer] = gathered_layer.get(prm.layer, 0) + prm.numel * prm.elem_bytes
                largest = max(largest, prm.numel)
        if prm.trainable:
            trainable_part += part
            trainable_full += prm.numel

    # Gradients (stage3.py): bf16 partition buffer (grad_partitions_flat_buffer, gradient_accumulation_dtype = the
    # model dtype) + the bf16 reduce bucket (reduce_bucket_size elements, contiguous_gradients) + the fp32 gradient
    # of the optimizer's largest sub-group. With offload_optimizer only the bucket stays on the GPU; the partition
    # buffer and an fp32 gradient per sub-group are pinned host memory, read by DeepSpeedCPUAdam.
    grad_bytes = lora_bytes if not full else BASE_BYTES
    # The bucket is torch.empty: on a CPU run only the part that gradients ever fill is resident.
    bucket = zero.reduce_bucket if cuda else min(zero.reduce_bucket, trainable_full)
    bucket_bytes = bucket * grad_bytes if trainable_full else 0
    optimizer = 12 * trainable_part  # fp32 master + Adam m + v, partitioned
    if offload_opt:
        gradients = trainable_part * (grad_bytes + 4)
        gpu["gradients"] = bucket_bytes
        host["offloaded_optimizer"] = optimizer  # fp32 master, m and v: pageable, CPU Adam's
        host["pinned_buffers"] = gradients
        if zero.pin_optimizer:  # the bf16 partition buffer and one fp32 gradient per sub-group, each pinned alone
            pins = [trainable_part * grad_bytes] + [4 * n for n in _sub_groups(trainable_part, zero.sub_group_size)]
            host["pinned_overhead"] += sum(pinned_bytes(n) - n for n in pins)
    else:
        gradients = trainable_part * grad_bytes + 4 * min(trainable_part, zero.sub_group_size)
        gpu["gradients"] = gradients + bucket_bytes
        gpu["optimizer_states"] = optimizer
    if not full:  # only adapter entries train; the reduce bucket is a fixed buffer of reduce_bucket_size
        adapter.update(gradients=gradients, optimizer=optimizer)
    if offload_param and trainable_part:
        # stage3.py _create_param_groups_fp16_flat_cpu_memory: the trainable partitions move into one flat buffer,
        # always pinned; their own pinned blocks go back to the allocator's cache, which keeps them (counted above).
        flat = trainable_part * grad_bytes
        host["pinned_buffers"] += flat
        host["pinned_overhead"] += pinned_bytes(flat) - flat

    # A checkpoint (engine/checkpoint.py; every run writes one at its end) copies to the host what it writes, one file
    # at a time: this rank's optimizer state (fp32 master, m and v: a copy only when they live on the GPU), then, on
    # rank 0, the adapter's trainable values gathered whole (lorasp_state_dict; after a mask redraw the frozen values
    # too). The largest of the two is the host's peak while the checkpoint is written.
    saved = trainable_full * grad_bytes
    if resample_every > 0 and not full:
        saved += sum(prm.numel * prm.elem_bytes for prm in params if prm.component == "lorasp_frozen")
    host["checkpoint_staging"] = max(optimizer * (cuda and not offload_opt), saved)

    # ZeRO-3 gathers (partitioned_param_coordinator.py), valued at the two candidate peaks, both in the backward.
    # - Reuse: a released parameter stays gathered when its next use comes within stage3_max_reuse_distance elements
    #   of the walk. At the turn from forward to backward that keeps the lm_head and the last layers: for the k-th
    #   layer from the end the walk passes the head twice and k later layers 3 times with checkpointing (forward,
    #   recompute, backward) or twice without.
    # - Prefetch: once a step has recorded the trace, the pre-forward and pre-backward hook of every submodule gathers
    #   the next parameters of the trace (at least one, up to stage3_prefetch_bucket_size elements) while fewer than
    #   stage3_max_live_parameters elements are gathered. A decoder layer runs ~30 hooked submodules for its 7
    #   weights, so the window fills to max_live plus the one parameter that crosses it, or to every non-persistent
    #   parameter the rest of the step uses (the lm_head and the layers: the frozen embedding has no backward).
    # This assumes a released gather is freed. bitsandbytes 0.50's MatMul4Bit keeps a view of the weight in
    # ctx.tensors, which pins every layer's gathered 4-bit storage until its backward unless the 4-bit matmul saves
    # the Parameter itself (as DeepSpeed's LinearFunctionForZeroStage3 does).
    L = p.num_hidden_layers
    layer_bytes = max((gathered_layer.get(k, 0) for k in range(L)), default=0)
    layer_elems = max((traversed_layer.get(k, 0) for k in range(L)), default=0)
    head_elems = p.vocab_size * p.hidden_size
    head_bytes = head_elems * BASE_BYTES if head_elems > zero.persistence_threshold else 0
    checkpointed = (L if checkpoint_layers is None else min(checkpoint_layers, L)) if gradient_checkpointing else 0
    passes = 3 if checkpointed == L else 2  # the walk's last layers are the kept ones
    retained = sum(1 for k in range(L) if 2 * head_elems + k * passes * layer_elems < zero.max_reuse_distance)
    ahead = head_bytes + sum(gathered_layer.get(k, 0) for k in range(L))
    window = min((zero.max_live + largest) * BASE_BYTES, ahead) if zero.prefetch_bucket > 0 else 0
    gather_loss = max(head_bytes + retained * layer_bytes, window) if gathers_allocate else 0
    gather_layer = max(max(1, retained) * layer_bytes, window) if gathers_allocate else 0
    # On CUDA the gathers are allocated on ZeRO-3's all-gather stream, a caching-allocator pool that nothing else
    # draws from, and free_param() marks each released one with record_stream(compute stream): its block can be
    # reused only once the compute that reads it has run. The prefetcher refills the window as soon as the CPU
    # releases a parameter, so the pool also holds a released window the GPU has yet to read. We take one window (the
    # CPU a window ahead of the GPU), bounded by what the step still uses; it is reserved, not allocated.
    gather_pending = min(window, ahead - window) if cuda and gathers_allocate else 0

    masked = sum(n for out_f, in_f in (p.linear_shapes()[t] for t in targets if not full)
                 for n, matrix_ratio in zip((r * in_f, out_f * r), _matrix_ratios(variant, ratio))
                 if 0 < trainable_count(n, matrix_ratio) < n)
    act = _activations(p, seq_len * micro_batch, targets, r, full, checkpointed, masked, fused_kernels)
    # bitsandbytes dequantizes the whole 4-bit weight to bf16 for a matmul over many tokens, forward and backward.
    # A checkpointed layer's recompute keeps each adapted projection's dequantized weight for its backward
    # (model/quant.py), so the layer under backward holds all of them.
    shapes = p.linear_shapes()
    dequant = max(o * i for o, i in shapes.values())
    if checkpointed and keep_dequantized and not full:
        dequant = max(dequant, sum(o * i for t, (o, i) in shapes.items() if t in targets))
    dequant = dequant * BASE_BYTES if quantized else 0
    phases = {
        "loss": {"activations": act["stored"], "logits": act["logits"], "zero3_gather_buffers": gather_loss},
        "layer": {
            "activations": act["stored"] + act["layer"], "dequant_transient": dequant,
            "zero3_gather_buffers": gather_layer,
        },
    }
    peak_phase = max(phases, key=lambda k: sum(phases[k].values()))
    gpu.update(phases[peak_phase])

    allocated = sum(gpu.values())
    if cuda:
        compute_pool = allocated - gpu["zero3_gather_buffers"]
        slack = (EXPANDABLE_ACTIVATION_SLACK * gpu["activations"] + LOSS_SLACK * gpu["logits"]
                 if expandable_segments else ALLOCATOR_FRAGMENTATION * compute_pool)
        gpu["allocator_fragmentation"] = int(slack) + gather_pending
        gpu["cuda_context"] = CUDA_CONTEXT_BYTES + NCCL_BUFFER_BYTES * (W > 1)
        host["cuda_runtime"] = CUDA_RUNTIME_BYTES
    else:
        for k in GPU_COMPONENTS:
            host[k], gpu[k] = gpu[k], 0
        host["runtime_overhead"] = CPU_RUNTIME_BYTES
        # Every step stores its activations and runs the loss, whichever moment is the peak: their retained heap stays.
        host["allocator_retention"] = int(CPU_HEAP_RETENTION * (act["logits"] + act["stored"]))
    host["process_base"] = PROCESS_BASE_BYTES[device] + DATA_FILES_IMPORT_BYTES[device] * data_files
    host["library_imports"] = CPU_IMPORT_BYTES["transformers_models"] + CPU_IMPORT_BYTES["bitsandbytes"] * quantized

    ft_total, ft_breakdown = full_finetune_bytes(p, seq_len, micro_batch, tied_embeddings)
    linear = L * sum(o * i for o, i in p.linear_shapes().values())
    return MemoryPlan(
        preset=name, world_size=W, micro_batch=micro_batch, seq_len=seq_len, ds_config=ds_config,
        gradient_checkpointing=gradient_checkpointing, checkpoint_layers=checkpoint_layers,
        resident_layers=resident_layers, variant=variant, gpu=gpu, host=host,
        full_ft_bytes=ft_total, full_ft_breakdown=ft_breakdown, device=device, peak_phase=peak_phase,
        settings=dict(ds=ds, r=r, ratio=ratio, targets=targets, resample_every=resample_every, precision=precision,
                      quantize=quantize, vocab_size=vocab_size, tied_embeddings=tied_embeddings,
                      expandable_segments=expandable_segments, partition_absmax=partition_absmax,
                      keep_dequantized=keep_dequantized, fused_kernels=fused_kernels, data_files=data_files),
        shape=asdict(p),
        adapter=adapter,
        counts=dict(
            num_params=num_params(p, tied_embeddings), linear_params=linear, trainable_params=trainable_full,
            trainable_per_rank=trainable_part, persistent_elements=persisted, retained_layers=retained,
            activations_per_layer=act["per_layer"], activations_stored=act["stored"],
            logits_saved=act["saved_logits"],
        ),
    )


def preset_from_checkpoint(path: str | Path) -> Preset:
    """The LLaMA shapes of a local HF checkpoint, read from its config.json."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"model.path = '{path}': not a checkpoint directory (no config.json)")
    c = json.loads(cfg_path.read_text())
    try:
        heads = c["num_attention_heads"]
        return Preset(
            hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
            num_hidden_layers=c["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=c.get("num_key_value_heads") or heads, vocab_size=c["vocab_size"],
            max_position_embeddings=c.get("max_position_embeddings", 2048),
        )
    except KeyError as e:
        raise ConfigError(f"model.path = '{path}': config.json has no {e.args[0]!r}; not a LLaMA-style model") from None


def plan_for_config(cfg: RunConfig, world_size: int, device: str = "cuda", ds: dict | None = None) -> MemoryPlan:
    """The plan of a run config on `world_size` ranks, from the very DeepSpeed dict the engine passes to
    deepspeed.initialize: `ds`, or build_ds_config(cfg, world_size) made here."""
    tied = False
    if cfg.model.path is not None:
        preset: str | Preset = preset_from_checkpoint(cfg.model.path)
        vocab = None
        tied = bool(json.loads((Path(cfg.model.path) / "config.json").read_text()).get("tie_word_embeddings"))
    else:
        preset = cfg.model.preset
        vocab = cfg.data.vocab_size if preset == "tiny" else None  # as model.load.ensure_base builds it
    lo, t = cfg.lorasp, cfg.train
    plan = plan_memory(
        preset, world_size, ds=build_ds_config(cfg, world_size) if ds is None else ds,
        ds_config=cfg.deepspeed.config, device=device,
        micro_batch=t.micro_batch_size, seq_len=cfg.data.seq_len, r=lo.r, ratio=lo.ratio,
        targets=list(lo.target_modules), variant=lo.variant, resample_every=lo.resample_every,
        gradient_checkpointing=t.gradient_checkpointing, checkpoint_layers=t.checkpoint_layers,
        resident_layers=cfg.deepspeed.resident_layers, vocab_size=vocab,
        fused_kernels=t.fused_kernels and device == "cuda",
        precision=t.precision,
        quantize=cfg.model.quantize, tied_embeddings=tied, data_files=cfg.data.path is not None,
        expandable_segments="expandable_segments:true" in cfg.rank_env().get(
            "PYTORCH_CUDA_ALLOC_CONF", os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")).lower().replace(" ", ""),
    )
    if cfg.model.path is not None:
        plan.preset = str(cfg.model.path)
    return plan
