"""The stock recipe we are measured against: transformers Trainer + peft LoRA + DeepSpeed ZeRO-3 + a bitsandbytes
4-bit base with bnb_4bit_quant_storage=bf16, as in peft's DeepSpeed guide. Same pre-quantized checkpoint
(`lorasp prepare-base`), sequence length, micro-batch, rank, targets and gradient checkpointing as bench/run.py.

    torchrun --nproc_per_node 2 bench/baseline_hf.py --base /tmp/lorasp-bench/bases/llama-65b --micro-batch 1

Rank 0 appends one record (system "hf-stock") to bench/results/records.jsonl, in the same format as bench/run.py:
steady-state tokens/s per GPU (median after warm-up), MFU by the same 4·N / 790 TFLOP/s convention, peak
torch.cuda.max_memory_reserved and NVML per rank, host RSS, and the load time and load peak. transformers skips
zero.Init for quantized models, so every rank first holds the whole 4-bit model: that is the load peak we report.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import get_args

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import RESULTS, add_baseline_args, append_records, context, new_run_id, nvml_used  # noqa: E402

from lorasp_dist.config import DeepSpeedConfig  # noqa: E402

DS_TEMPLATES = get_args(DeepSpeedConfig.model_fields["config"].annotation)  # deepspeed.config's own choices
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_FLOPS, WARMUP, GiB = 790e12, 3, 1024**3


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_baseline_args(p)
    p.add_argument("--ds-config", default="zero3", choices=DS_TEMPLATES, help="a template in ds_configs/")
    p.add_argument("--run-id", default=None)
    p.add_argument("--results", default=str(RESULTS))
    a = p.parse_args()

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from lorasp_dist.ds_config import load_template
    from lorasp_dist.presets import PRESETS

    cuda = torch.cuda.is_available()
    ds = load_template(a.ds_config)
    ds.update(train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto", train_batch_size="auto",
              gradient_clipping="auto", bf16={"enabled": "auto"})
    # TrainingArguments first: it activates the ZeRO-3 config that from_pretrained consults.
    args = TrainingArguments(
        output_dir="/tmp/lorasp-bench/hf-stock", per_device_train_batch_size=a.micro_batch, max_steps=a.steps,
        learning_rate=1e-4, bf16=True, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, logging_steps=1, save_strategy="no", report_to=[],
        deepspeed=ds, use_cpu=not cuda, dataloader_num_workers=0,
    )
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    t0 = time.perf_counter()
    # No device_map: transformers 5.x refuses one under ZeRO-3 ("DeepSpeed Zero-3 is not compatible with passing a
    # `device_map`"), and the stock recipe passes none.
    model = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.bfloat16)
    load_s = time.perf_counter() - t0
    load_peak = torch.cuda.max_memory_reserved() if cuda else None
    model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, target_modules=PROJECTIONS,
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, vocab, (a.seq_len,), generator=gen) for _ in range(a.micro_batch * world * a.steps)]
    data = [{"input_ids": r, "labels": r} for r in rows]  # token content does not change speed or memory

    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.t)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[Timer()])
    trainer.train()
    if not trainer.is_deepspeed_enabled:  # the comparison is meaningless unless the stock run really used ZeRO-3
        raise SystemExit("baseline_hf: the Trainer did not enable DeepSpeed")
    stage = trainer.accelerator.state.deepspeed_plugin.zero_stage
    steady = [a.micro_batch * a.seq_len / t for t in step_times[WARMUP:]]
    mine = torch.tensor([
        float(torch.cuda.max_memory_reserved()) if cuda else 0.0,
        float(nvml_used() or 0), float(psutil.Process().memory_info().rss), float(load_peak or 0),
    ], device="cuda" if cuda else "cpu")
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(mine, op=torch.distributed.ReduceOp.MAX)
    if rank != 0:
        return 0
    reserved, nvml, rss, load_peak_max = (v.item() for v in mine)
    synthetic = json.loads((Path(a.base) / "config.json").read_text()).get("lorasp_synthetic", {})
    preset = a.preset or synthetic.get("preset")
    n_params = PRESETS[preset].num_params() if preset in PRESETS else model.num_parameters()
    tps = statistics.median(steady) if steady else None
    run_id = a.run_id or new_run_id("hf-stock")
    ctx = context(run_id)
    record = {
        "run_id": run_id, "date": ctx["date"], "git_rev": ctx["git_rev"], "device": ctx["device"],
        "system": "hf-stock", "preset": preset, "gpus": world, "ds_config": a.ds_config, "micro_batch": a.micro_batch,
        "seq_len": a.seq_len, "rank": a.rank, "variant": "lora",
        "tokens_per_s_per_gpu": tps, "tokens_per_s_min": min(steady) if steady else None,
        "tokens_per_s_max": max(steady) if steady else None,
        "mfu": 4 * n_params * tps / PEAK_FLOPS if tps else None,
        "peak_reserved_gib": reserved / GiB if cuda else None, "peak_nvml_gib": nvml / GiB if nvml else None,
        "host_rss_gib": rss / GiB, "cluster_total_gb": world * (max(reserved, nvml) + rss) / 1e9,
        "load_s": load_s, "load_peak_reserved_gib": load_peak_max / GiB if cuda else None,
        "predicted_peak_gib": None, "full_ft_gb": 16 * n_params / 1e9, "command": ctx["command"], "zero_stage": stage,
    }
    append_records([record], Path(a.results))
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
