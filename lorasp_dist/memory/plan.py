"""`lorasp plan`: print the memory estimate's table for a run, say whether it fits, and find the fastest setting
that does.

A plan fits when it leaves headroom: max(memory.headroom_fraction × capacity, memory.headroom_min), 5% and 1 GiB by
default, on each GPU and on the host. The launcher calls `shortfall` before it starts anything, so a run that cannot
fit never gets to load 34 GB of weights.

Exit codes of `lorasp plan` (with or without --json):
  0  the asked-for setting fits, or no memory size was given (a table only)
  1  the asked-for setting does not fit, but another one does: the fastest is printed as overrides
  2  bad input (one line on stderr)
  3  the asked-for setting does not fit and no searched setting does (on CPU nothing is searched)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lorasp_dist.config import DS_CONFIGS, ConfigError, RunConfig, apply_overrides, read_yaml, validate
from lorasp_dist.memory.estimate import (
    CPU_HOST_COMPONENTS,
    CUDA_HOST_COMPONENTS,
    GPU_COMPONENTS,
    HOST_COMPONENTS,
    MemoryPlan,
    gib,
    plan_for_config,
)
from lorasp_dist.presets import PRESETS
from lorasp_dist.sizes import GiB, MiB

MICRO_BATCHES = (16, 8, 4, 2, 1)
EXIT_FITS, EXIT_ANOTHER_FITS, EXIT_NOTHING_FITS = 0, 1, 3


@dataclass(frozen=True)
class Budget:
    """The memory a run may use: per GPU and per node (None: not checked), less the headroom."""

    gpu: int | None
    host: int | None
    headroom_fraction: float
    headroom_min: int

    @classmethod
    def from_config(cls, cfg: RunConfig, gpu: int | None = None) -> Budget:
        """memory.* of the config; `gpu` (bytes read from a GPU of the cluster) stands in for memory.gpu_mem."""
        m = cfg.memory
        return cls(m.gpu_mem if m.gpu_mem is not None else gpu, m.host_mem, m.headroom_fraction, m.headroom_min)

    def headroom(self, capacity: int) -> int:
        return max(int(self.headroom_fraction * capacity), self.headroom_min)

    def usable(self, capacity: int) -> int:
        return capacity - self.headroom(capacity)


def _needs(plan: MemoryPlan, budget: Budget) -> list[tuple[str, int, int]]:
    """(where, bytes needed, capacity) for each budget that applies: the GPU of a CUDA plan, the host of all ranks
    (conservatively: all ranks on one node)."""
    needs = []
    if plan.device == "cuda" and budget.gpu is not None:
        needs.append(("per GPU", plan.gpu_total, budget.gpu))
    if budget.host is not None:
        needs.append((f"host ({plan.world_size} ranks on one node)", plan.host_total * plan.world_size, budget.host))
    return needs


def fits(plan: MemoryPlan, budget: Budget) -> bool:
    return all(need <= budget.usable(cap) for _, need, cap in _needs(plan, budget))


def shortfall(plan: MemoryPlan, budget: Budget) -> str | None:
    """One line on what does not fit, or None when the plan fits (or nothing is checked)."""
    over = [
        f"needs {gib(need):.1f} GiB {where} + {gib(budget.headroom(cap)):.1f} GiB headroom, has {gib(cap):.1f} GiB"
        for where, need, cap in _needs(plan, budget) if need > budget.usable(cap)
    ]
    return "; ".join(over) or None


def verdict(plan: MemoryPlan, budget: Budget) -> str:
    lines = []
    for where, need, cap in _needs(plan, budget):
        room, usable = gib(budget.headroom(cap)), gib(budget.usable(cap))
        if need <= budget.usable(cap):
            lines.append(f"fits: {gib(need):.1f} GiB {where}, within {usable:.1f} of {gib(cap):.1f} GiB "
                         f"(headroom {room:.1f} GiB kept free)")
        else:
            lines.append(f"does not fit: needs {gib(need):.1f} GiB {where}, {gib(need) - usable:.1f} GiB over the "
                         f"{usable:.1f} of {gib(cap):.1f} GiB usable (headroom {room:.1f} GiB: "
                         "memory.headroom_fraction, memory.headroom_min)")
    return "\n".join(lines)


def with_setting(cfg: RunConfig, ds_config: str, gradient_checkpointing: bool, micro_batch: int,
                 checkpoint_layers: int | None = None, resident_layers: int = 0) -> RunConfig:
    deepspeed = cfg.deepspeed.model_copy(update={"config": ds_config, "resident_layers": resident_layers})
    train = cfg.train.model_copy(update={"gradient_checkpointing": gradient_checkpointing,
                                         "checkpoint_layers": checkpoint_layers, "micro_batch_size": micro_batch})
    return cfg.model_copy(update={"deepspeed": deepspeed, "train": train})


def search_fitting(cfg: RunConfig, world_size: int, budget: Budget) -> list[MemoryPlan]:
    """Every setting of (deepspeed.config, micro-batch, checkpointing) of this config that fits on GPUs, in each one
    the most resident layers and, with checkpointing, the fewest checkpointed layers that fit (in that order: per GiB
    a resident layer saves more, three gathers a step of its 4-bit weights less its partition). The expected fastest
    first (`expected_speed`)."""
    found = []
    for ds_config in DS_CONFIGS:
        for mb in MICRO_BATCHES:
            for gc in (False, True):
                plan = plan_for_config(with_setting(cfg, ds_config, gc, mb), world_size, device="cuda")
                if fits(plan, budget):
                    plan = _most_resident(cfg, plan, budget)
                    found.append(_fewest_checkpointed(cfg, plan, budget) if gc else plan)
    return sorted(found, key=expected_speed)


def expected_speed(plan: MemoryPlan) -> tuple:
    """A sort key, fastest first. No offload before offloading the optimizer before offloading everything. Then the
    larger micro-batch up to 4, which shares a step's fixed host cost among more tokens (llama-65b on one H200: ~1,000
    tokens/s at micro-batch 1, 1,300-1,450 at 4). Then the least recompute: a checkpointed layer's share of 2·N FLOPs
    a token on top of 6·N (micro-batch 8 with 69 of 80 layers checkpointed ran at 1,267 against 1,293-1,311 for 4
    with 51). Then the larger micro-batch (on 2 GPUs, every layer checkpointed: 1,138-1,147 at 8 against 1,071 at 4).
    bench/NOTES.md (session 18) fits a step model to these records."""
    layers = plan.preset_shape().num_hidden_layers
    recomputed = (plan.checkpoint_layers or layers) / layers if plan.gradient_checkpointing else 0.0
    return DS_CONFIGS.index(plan.ds_config), -min(plan.micro_batch, 4), recomputed, -plan.micro_batch


def _at(cfg: RunConfig, plan: MemoryPlan, checkpoint_layers: int | None, resident_layers: int) -> MemoryPlan:
    setting = with_setting(cfg, plan.ds_config, plan.gradient_checkpointing, plan.micro_batch, checkpoint_layers,
                           resident_layers)
    return plan_for_config(setting, plan.world_size, device="cuda")


def _most_resident(cfg: RunConfig, plan: MemoryPlan, budget: Budget) -> MemoryPlan:
    """`plan` (it fits) with the most resident layers that still fit: each one is never gathered. Memory grows with
    their count (by a layer's 4-bit weights less its partition), so bisect; all of them may fit where one fewer
    does not, as the last one also drops ZeRO-3's gather buffers for the 4-bit weights."""
    layers = plan.preset_shape().num_hidden_layers
    every = _at(cfg, plan, plan.checkpoint_layers, layers)
    if fits(every, budget):
        return every
    lo, hi = 0, layers - 1  # lo fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(_at(cfg, plan, plan.checkpoint_layers, mid), budget) else (lo, mid - 1)
    return _at(cfg, plan, plan.checkpoint_layers, lo) if lo else plan


def _fewest_checkpointed(cfg: RunConfig, plan: MemoryPlan, budget: Budget) -> MemoryPlan:
    """`plan` (every layer checkpointed, and it fits) with the fewest checkpointed layers that still fit: each
    kept layer skips its recompute. Memory falls as checkpointed layers grow, so bisect; at least one layer stays
    checkpointed (none at all is the no-checkpointing setting, searched on its own)."""
    lo, hi = 1, plan.preset_shape().num_hidden_layers  # hi fits
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(_at(cfg, plan, mid, plan.resident_layers), budget) else (mid + 1, hi)
    return plan if hi == plan.preset_shape().num_hidden_layers else _at(cfg, plan, hi, plan.resident_layers)


def setting_line(plan: MemoryPlan) -> str:
    """The plan's searched setting as ready-to-paste CLI overrides."""
    gc = str(plan.gradient_checkpointing).lower()
    line = (
        f"deepspeed.config={plan.ds_config} train.micro_batch_size={plan.micro_batch} "
        f"train.gradient_checkpointing={gc}"
    )
    if plan.checkpoint_layers is not None:
        line += f" train.checkpoint_layers={plan.checkpoint_layers}"
    return line + (f" deepspeed.resident_layers={plan.resident_layers}" if plan.resident_layers else "")


def adapter_line(plan: MemoryPlan) -> str | None:
    """What the adapter costs a rank, and for lorasp and lora-fa how that compares with plain LoRA's."""
    if plan.variant == "full":
        return None
    unit, size = ("GiB", GiB) if plan.adapter_total >= GiB // 10 else ("MiB", MiB)  # tiny models: MiB
    parts = " + ".join(f"{k} {v / size:.2f}" for k, v in plan.adapter.items())
    line = f"adapter bytes per rank (GPU + host, {unit}): {parts} = {plan.adapter_total / size:.2f} {unit}"
    if plan.variant != "lora":
        lora = plan.replan(variant="lora")
        line += (f" = {plan.adapter_total / lora.adapter_total:.2f}× plain LoRA's {lora.adapter_total / size:.2f} "
                 f"{unit} (variant=lora: peft's dense A and B)")
    return line


def format_plan_table(plan: MemoryPlan, budget: Budget | None = None) -> str:
    """A plain-text table of GiB per rank per component, the totals, the adapter's bytes, the full fine-tune
    comparison and the verdict."""
    gc = "on" if plan.gradient_checkpointing else "off"
    if plan.gradient_checkpointing and plan.checkpoint_layers is not None:
        gc += f" (the first {plan.checkpoint_layers} of {plan.preset_shape().num_hidden_layers} layers)"
    out = [
        f"{plan.preset}: {plan.world_size} rank(s) on {plan.device}, variant {plan.variant}, {plan.ds_config}, "
        f"micro-batch {plan.micro_batch}, seq {plan.seq_len}, checkpointing {gc}"
        + (f", {plan.resident_layers} resident layers" if plan.resident_layers else ""),
        f"{'component (GiB per rank)':<28}{'GPU':>9}{'host':>9}",
    ]
    for name in GPU_COMPONENTS + HOST_COMPONENTS:
        g, h = plan.gpu.get(name, 0), plan.host.get(name, 0)
        if name in CPU_HOST_COMPONENTS + CUDA_HOST_COMPONENTS and not h:  # the other device's runtime terms
            continue
        out.append(f"  {name:<26}{gib(g):>9.2f}{gib(h):>9.2f}")
    out.append(f"  {'total':<26}{gib(plan.gpu_total):>9.2f}{gib(plan.host_total):>9.2f}")
    where = {"loss": "the loss over the logits", "layer": "one layer's recompute + backward"}[plan.peak_phase]
    if plan.device == "cuda":
        out.append(f"peak at {where}; torch max_memory_reserved ≈ {gib(plan.gpu_peak_reserved):.2f} GiB")
    staging = plan.host.get("checkpoint_staging", 0)
    if staging:
        out.append(f"host peak while a checkpoint is written; {gib(plan.host_total - staging):.2f} GiB between "
                   "checkpoints")
    adapter = adapter_line(plan)
    if adapter:
        out.append(adapter)
    n = plan.counts.get("num_params", 0)
    states = 16 * n
    out.append(
        f"cluster: {gib(plan.cluster_total):.1f} GiB (GPU + host, {plan.world_size} ranks); without the runtime "
        f"({gib(plan.runtime_per_rank):.2f} GiB a rank: Python, torch and the libraries, the CUDA context and runtime) "
        f"{gib(plan.cluster_total - plan.runtime_per_rank * plan.world_size):.1f} GiB = "
        f"{100 * plan.full_ft_ratio:.1f}% of a full fine-tune's {plan.full_ft_bytes / 1e12:.3f} TB "
        f"(16 B × {n / 1e9:.2f}e9 params = {states / 1e12:.3f} TB + "
        f"{gib(plan.full_ft_breakdown.get('activations', 0)):.1f} GiB activations, no runtime)"
    )
    if plan.variant == "lorasp":
        lora = plan.replan(variant="lora")
        out.append(f"beside plain {'QLoRA' if lora.settings['quantize'] else 'LoRA'} (variant=lora), same setting: "
                   f"{gib(lora.gpu_total):.2f} GiB GPU + {gib(lora.host_total):.2f} GiB host per rank")
    v = verdict(plan, budget) if budget else ""
    return "\n".join(out + ([v] if v else []))


def launch_plan(cfg: RunConfig, gpu_mem: int | None = None) -> tuple[MemoryPlan, Budget]:
    """For `lorasp launch`: the plan of this config on its workers, and the budget it must fit (`gpu_mem`: one GPU's
    memory read from the cluster, when memory.gpu_mem is not set)."""
    device = "cuda" if cfg.launcher.gpus_per_worker > 0 else "cpu"
    return plan_for_config(cfg, cfg.launcher.num_workers, device=device), Budget.from_config(cfg, gpu_mem)


def _load(args) -> RunConfig:
    """The config file + overrides (or --preset, with the preset's own sequence length) + --gpu-mem/--host-mem, which
    set memory.gpu_mem/host_mem and are parsed with them when the config is validated."""
    config, overrides = args.config, list(args.overrides or [])
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]
    data = read_yaml(config) if config else {}
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise ConfigError(f"--preset = {args.preset!r}: unknown preset; accepted: {', '.join(PRESETS)}")
        overrides = [f"model.preset={args.preset}", "model.path=null", *overrides]
        if config is None:
            data = {"data": {"seq_len": min(2048, PRESETS[args.preset].max_position_embeddings)}}
    data = apply_overrides(data, overrides)
    for key, value in (("gpu_mem", args.gpu_mem), ("host_mem", args.host_mem)):
        if value is not None:  # the text as typed: "24" must not become the YAML integer 24
            data.setdefault("memory", {})[key] = value
    return validate(data)


def run_plan_command(args) -> int:
    if args.gpus is not None and args.gpus < 1:
        raise ConfigError(f"--gpus = {args.gpus}: must be a positive integer (one rank per GPU)")
    cfg = _load(args)
    world = args.gpus or cfg.launcher.num_workers
    budget = Budget.from_config(cfg)
    on_gpu = bool(args.gpus or args.preset or budget.gpu or cfg.launcher.gpus_per_worker > 0)
    plan = plan_for_config(cfg, world, device="cuda" if on_gpu else "cpu")
    ok = fits(plan, budget)
    found = search_fitting(cfg, world, budget) if on_gpu and budget.gpu is not None else []
    fastest = found[0] if found else None
    checked = bool(_needs(plan, budget))
    code = EXIT_FITS if ok or not checked else EXIT_ANOTHER_FITS if fastest else EXIT_NOTHING_FITS

    if getattr(args, "json", False):
        doc: dict[str, Any] = {
            "plan": plan.to_dict(),
            "fits": ok,
            "headroom": {"fraction": budget.headroom_fraction, "min_bytes": budget.headroom_min},
            "fastest": fastest.to_dict() if fastest else None,
            "fastest_overrides": setting_line(fastest) if fastest else None,
            "exit_code": code,
        }
        print(json.dumps(doc, indent=2))
        return code

    print(format_plan_table(plan, budget))
    if on_gpu and budget.gpu is None:
        print("give --gpu-mem (e.g. 80GiB) to check the fit and search for the fastest setting that fits")
    elif on_gpu and fastest is None:
        host = f" and {gib(budget.host):.1f} GiB host" if budget.host is not None else ""
        print(f"no setting of {', '.join(DS_CONFIGS)} × micro-batch 1-16 × checkpointing fits "
              f"{gib(budget.gpu):.1f} GiB per GPU{host} with headroom; add GPUs or memory, or shorten data.seq_len")
    elif fastest is not None:
        print(f"fastest setting that fits: {gib(fastest.gpu_total):.1f} GiB per GPU, "
              f"{gib(fastest.host_total * world):.1f} GiB host for {world} rank(s); as overrides:")
        print(f"  {setting_line(fastest)}")
    return code
