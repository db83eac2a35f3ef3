"""`lorasp plan`: print the memory model's table for a run, say whether it fits, and find the fastest setting that does.

The launcher calls `check_fits` before it starts anything, so a run that cannot fit never gets to load 34 GB of weights.
"""

from __future__ import annotations

import json
from typing import Any

from lorasp_dist.config import (
    DS_CONFIGS,
    ConfigError,
    RunConfig,
    apply_overrides,
    load_config,
    parse_size,
    validate,
)
from lorasp_dist.memory.model import (
    CPU_HOST_COMPONENTS,
    GPU_COMPONENTS,
    HOST_COMPONENTS,
    MemoryPlan,
    gib,
    plan_for_config,
    plan_kwargs,
    plan_memory,
)
from lorasp_dist.model.presets import PRESETS

MICRO_BATCHES = (16, 8, 4, 2, 1)


def fits(plan: MemoryPlan, gpu_mem: int | None, host_mem: int | None = None) -> bool:
    """GPU per rank within gpu_mem; host of all ranks within host_mem (conservatively: all ranks on one node)."""
    gpu_ok = gpu_mem is None or plan.gpu_total <= gpu_mem
    host_ok = host_mem is None or plan.host_total * plan.world_size <= host_mem
    return gpu_ok and host_ok


def search_fitting(
    preset, world_size: int, gpu_mem: int | str, host_mem: int | str | None = None, seq_len: int = 2048, **kw
) -> list[MemoryPlan]:
    """Every setting of (ds_config, checkpointing, micro-batch) that fits, the expected fastest first: no offload
    before offloading the optimizer before offloading everything, no checkpointing before checkpointing, larger
    micro-batches first. `kw` goes to plan_memory."""
    gpu_mem = parse_size(gpu_mem, "--gpu-mem")
    host_mem = None if host_mem is None else parse_size(host_mem, "--host-mem")
    for k in ("ds_config", "gradient_checkpointing", "micro_batch"):
        kw.pop(k, None)
    found = []
    for ds_config in DS_CONFIGS:
        for gc in (False, True):
            for mb in MICRO_BATCHES:
                plan = plan_memory(preset, world_size, micro_batch=mb, seq_len=seq_len, ds_config=ds_config,
                                   gradient_checkpointing=gc, **kw)
                if fits(plan, gpu_mem, host_mem):
                    found.append(plan)
    return found


def setting_line(plan: MemoryPlan) -> str:
    """The plan's searched setting as ready-to-paste CLI overrides."""
    gc = str(plan.gradient_checkpointing).lower()
    return (
        f"deepspeed.config={plan.ds_config} train.micro_batch_size={plan.micro_batch} "
        f"train.gradient_checkpointing={gc}"
    )


def verdict(plan: MemoryPlan, gpu_mem: int | None, host_mem: int | None = None) -> str:
    lines = []
    if plan.device == "cuda" and gpu_mem is not None:
        need, cap = gib(plan.gpu_total), gib(gpu_mem)
        if plan.gpu_total <= gpu_mem:
            lines.append(f"fits: {need:.1f} GiB of {cap:.1f} GiB per GPU ({cap - need:.1f} GiB spare)")
        else:
            lines.append(f"does not fit: needs {need:.1f} GiB, {need - cap:.1f} GiB over {cap:.1f} GiB per GPU")
    if host_mem is not None:
        need, cap = gib(plan.host_total * plan.world_size), gib(host_mem)
        where = f"host ({plan.world_size} ranks on one node)"
        if need <= cap:
            lines.append(f"fits: {need:.1f} GiB of {cap:.1f} GiB {where} ({cap - need:.1f} GiB spare)")
        else:
            lines.append(f"does not fit: needs {need:.1f} GiB, {need - cap:.1f} GiB over {cap:.1f} GiB {where}")
    return "\n".join(lines)


def format_plan_table(plan: MemoryPlan, gpu_mem: int | None = None, host_mem: int | None = None) -> str:
    """A plain-text table of GiB per rank per component, the totals, the full fine-tune comparison and the verdict."""
    gc = "on" if plan.gradient_checkpointing else "off"
    out = [
        f"{plan.preset}: {plan.world_size} rank(s) on {plan.device}, variant {plan.variant}, {plan.ds_config}, "
        f"micro-batch {plan.micro_batch}, seq {plan.seq_len}, checkpointing {gc}",
        f"{'component (GiB per rank)':<28}{'GPU':>9}{'host':>9}",
    ]
    for name in GPU_COMPONENTS + HOST_COMPONENTS:
        g, h = plan.gpu.get(name, 0), plan.host.get(name, 0)
        if name in CPU_HOST_COMPONENTS and not h:  # a CUDA plan leaves the CPU runtime terms out
            continue
        out.append(f"  {name:<26}{gib(g):>9.2f}{gib(h):>9.2f}")
    out.append(f"  {'total':<26}{gib(plan.gpu_total):>9.2f}{gib(plan.host_total):>9.2f}")
    where = {"loss": "the loss over the logits", "layer": "one layer's recompute + backward"}[plan.peak_phase]
    if plan.device == "cuda":
        out.append(f"peak at {where}; torch max_memory_reserved ≈ {gib(plan.gpu_peak_reserved):.2f} GiB")
    n = plan.counts.get("num_params", 0)
    states = 16 * n
    out.append(
        f"cluster: {gib(plan.cluster_total):.1f} GiB (GPU + host, {plan.world_size} ranks) = "
        f"{100 * plan.full_ft_ratio:.1f}% of a full fine-tune's {plan.full_ft_bytes / 1e12:.3f} TB "
        f"(16 B × {n / 1e9:.2f}e9 params = {states / 1e12:.3f} TB + "
        f"{gib(plan.full_ft_breakdown.get('activations', 0)):.1f} GiB activations)"
    )
    if plan.variant == "lorasp":
        lora = plan.replan(variant="lora")
        out.append(f"beside plain {'QLoRA' if lora.settings['quantize'] else 'LoRA'} (variant=lora), same setting: "
                   f"{gib(lora.gpu_total):.2f} GiB GPU + {gib(lora.host_total):.2f} GiB host per rank")
    v = verdict(plan, gpu_mem, host_mem)
    return "\n".join(out + ([v] if v else []))


def check_fits(cfg: RunConfig, world_size: int, gpu_mem: int | None, host_mem: int | None = None) -> tuple[bool, str]:
    """For `lorasp launch`: does this config fit (with the table that says why)? Sizes in bytes."""
    device = "cuda" if cfg.launcher.gpus_per_worker > 0 else "cpu"
    plan = plan_for_config(cfg, world_size, device=device)
    return fits(plan, gpu_mem if device == "cuda" else None, host_mem), format_plan_table(plan, gpu_mem, host_mem)


def _load(args) -> RunConfig:
    """The config file + overrides, or --preset with the preset's own sequence length."""
    config, overrides = args.config, list(args.overrides or [])
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config, *overrides]
    if args.preset is not None:
        if args.preset not in PRESETS:
            raise ConfigError(f"--preset = {args.preset!r}: unknown preset; accepted: {', '.join(PRESETS)}")
        overrides = [f"model.preset={args.preset}", "model.path=null", *overrides]
        if config is None:
            seq = min(2048, PRESETS[args.preset].max_position_embeddings)
            return validate(apply_overrides({"data": {"seq_len": seq}}, overrides))
    return load_config(config, overrides)


def run_plan_command(args) -> int:
    cfg = _load(args)
    if args.gpus is not None and args.gpus < 1:
        raise ConfigError(f"--gpus = {args.gpus}: must be a positive integer (one rank per GPU)")
    world = args.gpus or cfg.launcher.num_workers
    gpu_mem = parse_size(args.gpu_mem, "--gpu-mem") if args.gpu_mem else cfg.memory.gpu_mem
    host_mem = parse_size(args.host_mem, "--host-mem") if args.host_mem else cfg.memory.host_mem
    on_gpu = bool(args.gpus or args.preset or gpu_mem or cfg.launcher.gpus_per_worker > 0)
    plan = plan_for_config(cfg, world, device="cuda" if on_gpu else "cpu")

    fastest = None
    if on_gpu and gpu_mem is not None:
        preset, kw = plan_kwargs(cfg)
        kw["device"] = "cuda"
        seq = kw.pop("seq_len")
        found = search_fitting(preset, world, gpu_mem, host_mem, seq_len=seq, **kw)
        fastest = found[0] if found else None

    if getattr(args, "json", False):
        doc: dict[str, Any] = {
            "plan": plan.to_dict(),
            "fits": fits(plan, gpu_mem if on_gpu else None, host_mem),
            "fastest": fastest.to_dict() if fastest else None,
            "fastest_overrides": setting_line(fastest) if fastest else None,
        }
        print(json.dumps(doc, indent=2))
        return 0

    print(format_plan_table(plan, gpu_mem if on_gpu else None, host_mem))
    if on_gpu and gpu_mem is None:
        print("give --gpu-mem (e.g. 80GiB) to check the fit and search for the fastest setting that fits")
    elif on_gpu and fastest is None:
        host = f" and {gib(host_mem):.1f} GiB host" if host_mem is not None else ""
        print(f"no setting of {', '.join(DS_CONFIGS)} × micro-batch 1-16 × checkpointing fits "
              f"{gib(gpu_mem):.1f} GiB per GPU{host}; add GPUs or memory, or shorten data.seq_len")
    elif fastest is not None:
        print(f"fastest setting that fits: {gib(fastest.gpu_total):.1f} GiB per GPU, "
              f"{gib(fastest.host_total * world):.1f} GiB host for {world} rank(s); as overrides:")
        print(f"  {setting_line(fastest)}")
    return 0

