"""LoRA-SP (arXiv 2403.08822): LoRA with a random part of the entries of A and of B frozen. Public API."""

from lorasp_dist.config import LoRASPConfig
from lorasp_dist.lorasp.export import export_peft_adapter
from lorasp_dist.lorasp.inject import (
    apply_lorasp,
    count_parameters,
    group_adapters,
    load_lorasp_state_dict,
    lorasp_layers,
    lorasp_state_dict,
    resample_masks,
)
from lorasp_dist.lorasp.layer import LoRASPLinear

__all__ = [
    "LoRASPConfig",
    "LoRASPLinear",
    "apply_lorasp",
    "count_parameters",
    "export_peft_adapter",
    "group_adapters",
    "load_lorasp_state_dict",
    "lorasp_layers",
    "lorasp_state_dict",
    "resample_masks",
]
