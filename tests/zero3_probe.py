"""`lorasp train` with its mask redraws watched; run under torchrun by tests/test_resample_zero3.py.

    python -m torch.distributed.run --nproc_per_node 2 tests/zero3_probe.py CONFIG [OVERRIDES...]

The real recipe runs, with `Recipe.resample_masks` wrapped: at the start, around every redraw and at the end, each
rank records every LoRA-SP matrix as DeepSpeed holds it, into RUN_DIR/probe/rank{r}.safetensors, keys
`{tag}/{layer}.{A|B}.{field}`:
  dense, mask, train_values     gathered whole (GatheredParameters)
  master, exp_avg, exp_avg_sq   the optimizer's fp32 master and moments (safe_get_full_fp32_param / _optimizer_state;
                                no moments at the start)
  part.{param}                  this rank's ZeRO-3 partition of each parameter (ds_tensor)
  whole.{param}                 the persistent full copy, where this rank holds one
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported

import deepspeed  # noqa: E402
import torch  # noqa: E402
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from lorasp_dist.config import load_config  # noqa: E402
from lorasp_dist.engine import train as engine  # noqa: E402
from lorasp_dist.lorasp import lorasp_layers, zero3  # noqa: E402


def record(model: torch.nn.Module, tag: str, out: dict[str, torch.Tensor], moments: bool = True) -> None:
    for layer in lorasp_layers(model):
        for which, matrix in (("A", layer.lora_A), ("B", layer.lora_B)):
            key = f"{tag}/{layer.name}.{which}"
            values = matrix.train_values
            out[f"{key}.master"] = safe_get_full_fp32_param(values)
            for name in zero3.MOMENTS if moments else ():  # torch's AdamW makes them at its first step
                out[f"{key}.{name}"] = safe_get_full_optimizer_state(values, name)
            for name, p in matrix.named_parameters():
                out[f"{key}.part.{name}"] = p.ds_tensor.clone()
                if p.ds_status == ZeroParamStatus.AVAILABLE:  # before the gather below makes it so
                    out[f"{key}.whole.{name}"] = p.data.clone()
            with deepspeed.zero.GatheredParameters(list(matrix.parameters()), modifier_rank=None):
                out[f"{key}.dense"] = matrix.dense().clone()
                out[f"{key}.mask"] = matrix.mask.clone()
                out[f"{key}.train_values"] = values.data.clone()


class ProbedRecipe(engine.Recipe):
    def setup(self, prepared=None):
        super().setup(prepared)
        self.records: dict[str, torch.Tensor] = {}
        record(self.model, f"start{self.step}", self.records, moments=False)

    def resample_masks(self) -> None:
        record(self.model, f"before{self.step + 1}", self.records)
        super().resample_masks()
        record(self.model, f"after{self.step + 1}", self.records)

    def finish(self):
        record(self.model, f"end{self.step}", self.records)
        path = self.run_dir / "probe" / f"rank{self.rank}.safetensors"
        path.parent.mkdir(exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.records.items()}, str(path))
        super().finish()


if __name__ == "__main__":
    engine.Recipe = ProbedRecipe  # train() builds the recipe by this name
    zero3.BATCH_ENTRIES = 10_000  # the tiny model's 56 matrices (~115k entries) move in several batches, not one
    engine.train(load_config(Path(sys.argv[1]), sys.argv[2:]))
