"""Self-attention with the position and pattern choices, and three backends.

Patterns: ``causal``; ``prefix`` (prefix-LM: position i may attend to j when j <= i, or
when both lie inside the sequence's prefix, whose length ``p`` varies per sequence).
Positions acting inside attention: ``rotary`` (q and k rotated, RoFormer) and ``alibi``
(a bias -m_h * |i - j| per head, Press et al.). Backends, chosen once in ``__init__``:

- ``eager``: softmax(q k^T / sqrt(D) + bias, masked) v, written out: the reference.
- ``sdpa``: ``F.scaled_dot_product_attention``; plain causal attention takes its
  ``is_causal`` (flash) path, anything else an explicit additive mask.
- ``flex``: FlexAttention, compiled, with the ALiBi bias as a ``score_mod`` and the causal
  or prefix pattern as a ``block_mask`` (masked blocks are skipped, not computed).
- ``auto``: flex on CUDA when there is a bias or a prefix, else sdpa (flash); sdpa on the
  CPU, where FlexAttention has no backward.

Shapes: B batch, H heads, T positions, D = head width.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from yoto.config import ModelConfig


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Press et al.'s head slopes: 2^(-8i/n) for n a power of two; otherwise those of the
    closest smaller power of two, then every other slope of the next one."""

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two(n_heads)
    else:
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


class Rotary(nn.Module):
    """Rotary position embedding applied to q and k (the rotate-half form)."""

    def __init__(self, head_dim: int, seq_len: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = torch.outer(torch.arange(seq_len).float(), inv_freq)  # (T, D/2)
        self.register_buffer("cos", angles.cos().repeat(1, 2), persistent=False)  # (T, D)
        self.register_buffer("sin", angles.sin().repeat(1, 2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, T, D)
        T = x.size(2)
        half = x.size(-1) // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * self.cos[:T].to(x.dtype) + rotated * self.sin[:T].to(x.dtype)


def allowed(T: int, prefix_len: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """Which key j each query i may see: (T, T) causal, or (B, 1, T, T) with prefixes."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    causal = j <= i
    if prefix_len is None:
        return causal
    p = prefix_len.to(device)[:, None, None, None]  # (B, 1, 1, 1)
    return causal | ((j < p) & (i < p))


def alibi_bias(slopes: torch.Tensor, T: int, device: torch.device) -> torch.Tensor:
    """(H, T, T): -slope_h * |i - j| (only the allowed part matters)."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    return -slopes.to(device)[:, None, None] * (i - j).abs().float()


@functools.cache
def _compiled_flex() -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, make_norm: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.d_model // cfg.n_head
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.proj.residual_out = True  # scaled init
        self.dropout = cfg.dropout
        self.q_norm = make_norm(self.head_dim) if cfg.attention.qk_norm else None
        self.k_norm = make_norm(self.head_dim) if cfg.attention.qk_norm else None
        self.rotary = Rotary(self.head_dim, cfg.seq_len) if cfg.position == "rotary" else None
        self.alibi = cfg.position == "alibi"
        if self.alibi:
            self.register_buffer("slopes", alibi_slopes(cfg.n_head), persistent=False)
        self.prefix = cfg.attention.pattern == "prefix"
        self.backend = resolve_backend(cfg.attention.backend, self.alibi, self.prefix)
        self._attend = {"eager": self._eager, "sdpa": self._sdpa, "flex": self._flex}[self.backend]
        # An observation point for probes (attention logit max / entropy on probe steps):
        # called with q, k (B, H, T, D) as the kernel sees them and the first sequence's
        # additive mask (H or 1, T, T: bias, -inf where not allowed). None on every other
        # step, so the fused kernel never materialises the attention matrix.
        self.stats_hook: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None

    def forward(self, x: torch.Tensor, prefix_len: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        prefix_len = prefix_len if self.prefix else None
        if self.stats_hook is not None:
            first = None if prefix_len is None else prefix_len[:1]
            mask = self.bias_and_mask(T, first, q.device)
            self.stats_hook(q, k, mask.reshape(-1, T, T))
        y = self._attend(q, k, v, prefix_len)  # (B, H, T, D)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))

    def bias_and_mask(
        self, T: int, prefix_len: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor:
        """Additive float mask: the ALiBi bias where allowed, -inf elsewhere."""
        mask = allowed(T, prefix_len, device)
        bias = alibi_bias(self.slopes, T, device) if self.alibi else torch.zeros((), device=device)
        return torch.where(mask, bias, torch.tensor(float("-inf"), device=device))

    def _dropout(self) -> float:
        return self.dropout if self.training else 0.0

    def _eager(self, q, k, v, prefix_len):
        T = q.size(2)
        scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(self.head_dim)  # (B, H, T, T)
        scores = scores + self.bias_and_mask(T, prefix_len, q.device)
        weights = F.dropout(scores.softmax(dim=-1), self._dropout()).to(v.dtype)
        return weights @ v

    def _sdpa(self, q, k, v, prefix_len):
        if not self.alibi and prefix_len is None:
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self._dropout()
            )
        mask = self.bias_and_mask(q.size(2), prefix_len, q.device).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self._dropout())

    def _flex(self, q, k, v, prefix_len):
        from torch.nn.attention.flex_attention import create_block_mask

        B, _, T, _ = q.shape
        if prefix_len is None:

            def mask_mod(b, h, qi, kv):
                return kv <= qi

            block = create_block_mask(mask_mod, None, None, T, T, device=q.device)
        else:
            p = prefix_len.to(q.device)

            def mask_mod(b, h, qi, kv):
                return (kv <= qi) | ((kv < p[b]) & (qi < p[b]))

            block = create_block_mask(mask_mod, B, None, T, T, device=q.device)
        score_mod = None
        if self.alibi:
            slopes = self.slopes

            def score_mod(score, b, h, qi, kv):
                return score - slopes[h] * (qi - kv).abs()

        return _compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block)


def resolve_backend(backend: str, alibi: bool, prefix: bool) -> str:
    if backend != "auto":
        return backend
    if torch.cuda.is_available() and (alibi or prefix):
        return "flex"
    return "sdpa"
