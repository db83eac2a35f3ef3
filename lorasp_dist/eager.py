"""Importing a library without the torch.compile calls it makes at import time.

The first `torch.compile(fn)` of a process imports torch._dynamo and torch._inductor, ~1-2 s of CPU. bitsandbytes
(fallback kernels, where CUDA's and the CPU library's run) and DeepSpeed's Muon optimizer (which ZeRO-3 imports for an
isinstance check; our optimizer is AdamW, ds_config.py) compile functions at import that we never call. `import_eager`
imports such a module while torch.compile hands each function back unchanged, then puts torch.compile back.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

import torch


def import_eager(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    compile_ = torch.compile

    def eager(model=None, **kwargs):  # both forms: torch.compile(fn, ...) and torch.compile(...)(fn)
        return model if model is not None else (lambda fn: fn)

    torch.compile = eager
    try:
        return importlib.import_module(name)
    finally:
        torch.compile = compile_
