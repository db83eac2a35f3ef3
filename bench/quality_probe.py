"""Pace probe for bench/quality.py (not a result): a randomly initialised model of the base's shape, run through the
study's own code before the study, to size its steps and batch to the GPU time there is and to check that the
graphed training step gives the eager step's losses.

    python bench/quality_probe.py CHECKPOINT_DIR [quality.py options]   # config + tokenizer of the base are enough

Three probes, each a quality.py study of its own under /tmp/lq: graphed steps at 64 rows on a log-likelihood task
and a generation task (lorasp, full, lorasp-resample), lorasp at 32 rows, and lorasp-resample eager. The committed
records (bench/results/quality/probe/) came from this script run as .cache/quality-xfer/a/calibrate.py, with the
imported SmolLM2's config and tokenizer files beside it.
"""

import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402

meta, rand = Path(sys.argv[1]), Path("/tmp/lq/rand")
shutil.copytree(meta, rand, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.safetensors"))
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(rand))
# from_config zeroes the pad token's embedding row; a row that starts with it keeps an all-zero hidden state, whose
# backward gives NaN. The real model has no such row: fill it like the others.
torch.nn.init.normal_(model.get_input_embeddings().weight, std=0.02)
model.save_pretrained(rand)
common = sys.argv[2:] + ["--base", str(rand), "--work", "/tmp/lq/work", "--seeds", "0", "--lrs", "adapter=1e-3",
                         "full=3e-5", "--eval-batch-size", "128"]
t = time.time()
quality.main(common + ["--out", "/tmp/lq/cal64", "--tasks", "hyperbaton", "object_counting", "--variants", "lorasp",
                       "full", "lorasp-resample", "--batch-size", "64"])
quality.main(common + ["--out", "/tmp/lq/cal32", "--tasks", "hyperbaton", "--variants", "lorasp", "--batch-size", "32"])
quality.main(common + ["--out", "/tmp/lq/caleager", "--tasks", "hyperbaton", "--variants", "lorasp-resample",
                       "--batch-size", "64", "--no-cuda-graph"])
print("probe wall", round(time.time() - t, 1))
