"""train.fused_kernels: the decoder layers' RMSNorm and SwiGLU as compiled kernels (model/fused.py). Compiled here on
the CPU (inductor's C++ backend), as on a GPU with Triton: the same outputs and gradients as transformers' modules,
the same parameters and state dict, and what each saves for the backward as the memory plan counts it."""

from __future__ import annotations

import copy

import torch
from transformers import LlamaForCausalLM

from lorasp_dist.config import LoRASPConfig
from lorasp_dist.lorasp import apply_lorasp
from lorasp_dist.model.fused import FusedRMSNorm, FusedSwiGLU, fuse_kernels
from lorasp_dist.presets import PRESETS


def test_fused_layers_compute_what_transformers_computes_and_keep_their_parameters():
    torch.manual_seed(0)
    model = LlamaForCausalLM(PRESETS["tiny"].hf_config()).to(torch.bfloat16)
    apply_lorasp(model, LoRASPConfig(r=8))
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype.is_floating_point:
                p.add_(torch.randn_like(p) * 0.01)  # norm weights and B away from their ones and zeros
    fused = copy.deepcopy(model)
    keys = list(model.state_dict())
    assert fuse_kernels(list(fused.model.layers)) == 3 * 4  # two norms and the MLP of each of the 4 layers
    layer = fused.model.layers[0]
    assert isinstance(layer.input_layernorm, FusedRMSNorm) and isinstance(layer.mlp, FusedSwiGLU)
    assert list(fused.state_dict()) == keys  # the same names: checkpoints and exports are unchanged

    ids = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, labels=ids)
    out_f = fused(input_ids=ids, labels=ids)
    out.loss.backward()
    out_f.loss.backward()
    torch.testing.assert_close(out_f.logits, out.logits, rtol=2e-2, atol=2e-2)  # bf16: fp32 reductions reordered
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.requires_grad]
    grads_f = dict((n, p.grad) for n, p in fused.named_parameters() if p.requires_grad)
    assert len(grads) == len(grads_f) == 2 * 7 * 4
    for n, g in grads:
        torch.testing.assert_close(grads_f[n], g, rtol=5e-2, atol=5e-3, msg=n)

    norm, saved = layer.post_attention_layernorm, []
    x = torch.randn(2, 32, 128, dtype=torch.bfloat16, requires_grad=True)  # the model's shape: compiled already
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        norm(x)
    # as the memory plan counts a fused norm (memory/estimate.py _activations): its bf16 input and the fp32 rsqrt
    saves = sorted((tuple(t.shape), str(t.dtype)) for t in saved if t.data_ptr() != norm.weight.data_ptr())
    assert saves == [((2, 32, 1), "torch.float32"), ((2, 32, 128), "torch.bfloat16")]
