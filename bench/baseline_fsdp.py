"""The second anchor: what a user picks when DeepSpeed disappoints, FSDP + QLoRA as in peft's and accelerate's
FSDP-QLoRA guide: a bitsandbytes 4-bit base with bnb_4bit_quant_storage=bf16, peft LoRA on all seven projections,
FSDP1 full shard with `use_orig_params`, peft's auto-wrap policy (one unit per decoder layer), bf16 mixed precision,
gradient checkpointing with use_reentrant False. Same pre-quantized checkpoint (`lorasp prepare-base`), sequence
length, micro-batch, rank and targets as bench/run.py.

    torchrun --nproc_per_node 2 bench/baseline_fsdp.py --base /tmp/lorasp-bench/bases/llama-65b --micro-batch 1

The model is wrapped with torch's FSDP directly, with the settings the Trainer + accelerate path applies, because
accelerate 1.15 drops the FSDP plugin on CPU and silently trains with DDP instead: this way the CPU smoke test runs
the same code as the GPU. The step is the Trainer's: bf16 autocast, clip to 1.0, AdamW.

Rank 0 appends one record (system "fsdp-qlora", ds_config "fsdp-full-shard") to bench/results/records.jsonl, in the
same format as bench/baseline_hf.py: steady-state tokens/s per GPU (median after warm-up, min and max), MFU by the same
4·N / 790 TFLOP/s convention, peak torch.cuda.max_memory_reserved and NVML per rank (max over ranks), host RSS, and the
load time and load peak. transformers loads a 4-bit model whole on every rank (its cpu_ram_efficient_loading skips
quantized models): that is the load peak we report. The record is refused unless FSDP really sharded the model.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import RESULTS, add_baseline_args, append_records, context, new_run_id, nvml_used  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_FLOPS, WARMUP, GiB = 790e12, 3, 1024**3
SYSTEM, DS_CONFIG = "fsdp-qlora", "fsdp-full-shard"


class BadInput(Exception):
    """One line for the user: `<field> = <value>: <what is accepted>`."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_baseline_args(p)
    p.add_argument("--run-id", default=None)
    p.add_argument("--results", default=str(RESULTS))
    return p.parse_args(argv)


def check_args(a: argparse.Namespace, world: int) -> dict:
    """Validate what the run depends on before any rank loads anything; returns the base's config.json."""
    for field in ("micro_batch", "seq_len", "rank"):
        if getattr(a, field) < 1:
            raise BadInput(f"--{field.replace('_', '-')} = {getattr(a, field)}: a positive integer")
    if a.steps <= WARMUP:
        raise BadInput(f"--steps = {a.steps}: more than the {WARMUP} warm-up steps")
    if a.run_id is not None and not (a.run_id and all(c.isalnum() or c in "._-" for c in a.run_id)):
        raise BadInput(f"--run-id = {a.run_id!r}: letters, digits, '.', '_' and '-'")
    if world < 2:
        raise BadInput(f"WORLD_SIZE = {world}: FSDP full shard needs 2 or more ranks (torchrun --nproc_per_node N)")
    config_path = Path(a.base) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"--base = {a.base}: a checkpoint directory with a readable config.json ({e})") from None
    q = config.get("quantization_config") or {}
    if not (q.get("quant_method") == "bitsandbytes" and q.get("load_in_4bit")
            and q.get("bnb_4bit_quant_storage") == "bfloat16"):
        raise BadInput(f"--base = {a.base}: a bitsandbytes 4-bit checkpoint with bnb_4bit_quant_storage bfloat16 "
                       "(`lorasp prepare-base` writes one)")
    return config


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP1 as the guide configures it through accelerate: full shard, use_orig_params, peft's auto-wrap policy (one
    unit per decoder layer, the LoRA leaves in their own units), mixed precision in the quant storage dtype (bf16),
    backward prefetch, rank 0's module states broadcast. torch implements that broadcast for accelerators only."""
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import BackwardPrefetch, MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    bf16 = torch.bfloat16
    return FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), sharding_strategy=ShardingStrategy.FULL_SHARD,
                mixed_precision=MixedPrecision(param_dtype=bf16, reduce_dtype=bf16, buffer_dtype=bf16),
                use_orig_params=True, device_id=device, sync_module_states=device.type == "cuda",
                backward_prefetch=BackwardPrefetch.BACKWARD_PRE, forward_prefetch=False, limit_all_gathers=True)


def sharding(wrapped: torch.nn.Module, n_elements: int, layer_cls: type, layers: int, world: int) -> dict:
    """Prove FSDP sharded the model or raise: one FULL_SHARD unit per decoder layer, every parameter element (the
    packed 4-bit weights included) in a flat parameter, and this rank holding its 1/world slice of each (plus at most
    world-1 elements of padding per flat parameter)."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy

    if not isinstance(wrapped, FSDP):
        raise RuntimeError(f"the model is a {type(wrapped).__name__}, not FullyShardedDataParallel")
    units = FSDP.fsdp_modules(wrapped)
    bad = {str(u.sharding_strategy) for u in units if u.sharding_strategy != ShardingStrategy.FULL_SHARD}
    if bad:
        raise RuntimeError(f"FSDP units use {sorted(bad)}, not FULL_SHARD")
    decoder_units = sum(isinstance(u.module, layer_cls) for u in units)
    if decoder_units != layers:
        raise RuntimeError(f"{decoder_units} FSDP units wrap a decoder layer; the model has {layers}")
    flats = [u._handle.flat_param for u in units if u._handle is not None]
    managed = sum(f._unpadded_unsharded_size.numel() for f in flats)
    local = sum(f._sharded_size.numel() for f in flats)
    if managed != n_elements:
        raise RuntimeError(f"FSDP manages {managed} of the model's {n_elements} parameter elements")
    if local > managed / world + len(flats) * (world - 1):
        raise RuntimeError(f"this rank holds {local} of {managed} parameter elements: not sharded over {world}")
    return {"units": len(units), "decoder_layer_units": decoder_units, "local_fraction": local / managed}


def build_record(a: argparse.Namespace, ctx: dict, *, preset: str | None, n_params: int, world: int,
                 step_times: list[float], reserved: float | None, nvml: float | None, rss: float, load_s: float,
                 load_peak: float | None, shard: dict) -> dict:
    """The record in bench/results_io.py's fixed format; memory arguments in bytes (None on CPU)."""
    steady = [a.micro_batch * a.seq_len / t for t in step_times[WARMUP:]]
    tps = statistics.median(steady) if steady else None
    return {
        "run_id": ctx["run_id"], "date": ctx["date"], "git_rev": ctx["git_rev"], "device": ctx["device"],
        "system": SYSTEM, "preset": preset, "gpus": world, "ds_config": DS_CONFIG, "micro_batch": a.micro_batch,
        "seq_len": a.seq_len, "rank": a.rank, "variant": "lora",
        "tokens_per_s_per_gpu": tps, "tokens_per_s_min": min(steady) if steady else None,
        "tokens_per_s_max": max(steady) if steady else None,
        "mfu": 4 * n_params * tps / PEAK_FLOPS if tps else None,
        "peak_reserved_gib": reserved / GiB if reserved is not None else None,
        "peak_nvml_gib": nvml / GiB if nvml else None,
        "host_rss_gib": rss / GiB, "cluster_total_gb": world * (max(reserved or 0, nvml or 0) + rss) / 1e9,
        "load_s": load_s, "load_peak_reserved_gib": load_peak / GiB if load_peak is not None else None,
        "predicted_peak_gib": None, "full_ft_gb": 16 * n_params / 1e9, "command": ctx["command"],
        "zero_stage": None, "fsdp": shard,
    }


def train(wrapped: torch.nn.Module, a: argparse.Namespace, vocab: int, device: torch.device, rank: int) -> list:
    """The Trainer's step, written out: bf16 autocast, forward, backward, clip to 1.0, AdamW; seconds per step."""
    trainable = [p for p in wrapped.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(rank)  # token content does not change speed or memory
    times = []
    for _ in range(a.steps):
        ids = torch.randint(0, vocab, (a.micro_batch, a.seq_len), generator=gen).to(device)
        sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = wrapped(input_ids=ids, labels=ids).loss
        loss.backward()
        wrapped.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t)
    if not torch.isfinite(loss):
        raise RuntimeError(f"the last step's loss is {loss.item()}")
    return times


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    try:
        config = check_args(a, world)
    except BadInput as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorasp_dist.presets import PRESETS

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if cuda else "gloo")
    t0 = time.perf_counter()
    # No device_map, as in the guide: bitsandbytes places the whole 4-bit model on this rank's current device.
    model = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.bfloat16)
    load_s = time.perf_counter() - t0
    load_peak = torch.cuda.max_memory_reserved() if cuda else None
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layer_cls, layers = type(model.model.layers[0]), len(model.model.layers)
    model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=PROJECTIONS,
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    n_elements = sum(p.numel() for p in model.parameters())  # what FSDP must shard, 4-bit packed weights included
    preset = a.preset or config.get("lorasp_synthetic", {}).get("preset")
    n_params = PRESETS[preset].num_params() if preset in PRESETS else model.num_parameters()
    vocab = model.config.vocab_size
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    wrapped = wrap(model, device)
    step_times = train(wrapped, a, vocab, device, rank)
    # The comparison is meaningless unless the run really was FSDP full shard: check it, or report nothing.
    shard = sharding(wrapped, n_elements, layer_cls, layers, world)
    mine = torch.tensor([
        float(torch.cuda.max_memory_reserved()) if cuda else 0.0,
        float(nvml_used() or 0), float(psutil.Process().memory_info().rss), float(load_peak or 0),
    ], device=device)
    torch.distributed.all_reduce(mine, op=torch.distributed.ReduceOp.MAX)
    if rank == 0:
        reserved, nvml, rss, load_peak_max = (v.item() for v in mine)
        ctx = context(a.run_id or new_run_id(SYSTEM))
        record = build_record(a, ctx, preset=preset, n_params=n_params, world=world, step_times=step_times,
                              reserved=reserved if cuda else None, nvml=nvml or None, rss=rss, load_s=load_s,
                              load_peak=load_peak_max if cuda else None, shard=shard)
        append_records([record], Path(a.results))
        print(json.dumps(record), flush=True)
    # Every rank leaves together: a rank that tore gloo down while rank 0 still wrote the record died of SIGABRT
    # ("terminate called without an active exception"), once in three CPU test runs.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
