"""Shared test set-up: one DeepSpeed extension cache for the whole run, CPU DeepSpeed, offline hubs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from faults import write as write_fault_table

REPO = Path(__file__).resolve().parents[1]

# DeepSpeed JIT-builds its CPU ops (shared-memory comm ~40 s, cpu_adam ~50 s) on first use: build them once.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_sessionfinish(session, exitstatus):
    write_fault_table()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
