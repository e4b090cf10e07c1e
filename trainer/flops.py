"""Model FLOPs per token and MFU (model FLOPs utilisation).

Per token, one forward pass of a decoder with L blocks, width C = d_model, MLP hidden h,
vocabulary V and context T costs, counting a multiply-add as 2 FLOPs:

    matmuls     2 * [ L * (3C^2 + C^2 + m) + C * V ]     qkv, attention output, MLP, LM head
                m = 2 * C * h        (plain MLP: fc, proj)
                m = 3 * C * h        (GLU: two input projections of width h, one output)
    attention   L * 4 * T * C        q k^T and (softmax) v over the whole T x T matrix

and training costs 3x the forward (the backward pass is about twice the forward). This is
PaLM's convention (Chowdhery et al., app. B: 6N + 12 L H Q T per token): the causal mask's
unused half of the attention matrix is counted, as everyone's MFU counts it, so numbers
compare across papers. Embedding lookups, biases, norms, activations, softmax and the
loss are left out (O(C) per token per layer: under 1% at these shapes). ALiBi and rotary
add O(T) and O(C) elementwise work, also left out; prefix-LM attends to more of the matrix
but the count is already the full matrix.

MFU = achieved model FLOP/s / (devices x dense bf16/fp16 peak). Peaks come from the GPU's
name (table below, no sparsity) or ``train.peak_tflops``; without either (a CPU) there is
no MFU.
"""

from __future__ import annotations

import torch

from yoto.config import ModelConfig

from .model import GLU, mlp_hidden

# dense bf16/fp16 tensor-core peaks, TFLOP/s per device, no sparsity; the first name that
# occurs in torch.cuda.get_device_name() wins, so specific names come first
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("V100", 125.0),
    ("T4", 65.0),
    ("MI300X", 1307.0),
    ("MI250X", 383.0),
]


def flops_per_token(
    cfg: ModelConfig, vocab_size: int, training: bool = True, seq_len: int | None = None
) -> float:
    """Model FLOPs per token (see the module docstring) at context ``seq_len`` (default
    ``model.seq_len``; shorter during a sequence-length warmup: only the attention term
    depends on it)."""
    L, C, T = cfg.n_layer, cfg.d_model, seq_len or cfg.seq_len
    h = mlp_hidden(cfg)
    mlp = (3 if cfg.activation in GLU else 2) * C * h
    matmul = 2 * (L * (4 * C * C + mlp) + C * vocab_size)
    attention = L * 4 * T * C
    forward = matmul + attention
    return 3 * forward if training else forward


def peak_flops(configured_tflops: float | None, device: torch.device) -> float | None:
    """Dense peak FLOP/s of one device, or None when unknown (then no MFU is reported)."""
    if configured_tflops is not None:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def mfu(
    tokens_per_second: float, per_token: float, peak: float | None, devices: int
) -> float | None:
    if peak is None:
        return None
    return tokens_per_second * per_token / (peak * devices)
