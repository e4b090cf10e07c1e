"""A GPT with the architecture choices the BigScience (BLOOM) group compared.

Read top to bottom: GPT -> Block -> (SelfAttention in attention.py, MLP). Every choice
(position, attention pattern and backend, activation, norm, embedding norm, QK norm) is
made once in ``__init__`` through the small factories below; the forward pass has no
config branches beyond "is this module present".

Positions: ``learned`` and ``sinusoidal`` are added to the token embedding; ``rotary`` and
``alibi`` act inside attention; ``none`` relies on the causal mask alone.

Shapes: B batch, T sequence length, C = d_model, V vocabulary, P prefix lengths (B,).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from yoto.config import Config, ModelConfig
from yoto.errors import ConfigError

from .attention import SelfAttention
from .data import tokenizer

GLU = ("geglu", "swiglu")


def vocab_size(cfg: Config, tok: tokenizer.Tokenizer | None = None) -> int:
    """The embedding's rows: ``model.vocab_size``, or the tokenizer's vocabulary padded to a
    multiple of 64 (the model's vocabulary follows the tokenizer's, never falls short).
    ``tok`` defaults to data.tokenizer (a run's own copy: ``tokenizer.for_run``)."""
    tok = tok or tokenizer.cached(cfg.data.tokenizer, cfg.data.eos)
    size = cfg.model.vocab_size or tokenizer.padded(tok.vocab_size)
    if size < tok.vocab_size:
        raise ConfigError(
            f"model.vocab_size={size} is smaller than the vocabulary of data.tokenizer "
            f"{tok.spec!r} ({tok.vocab_size:,} tokens); leave it unset (it follows the "
            f"tokenizer) or give at least {tok.vocab_size:,}"
        )
    return size


def non_embedding_parameters(cfg: Config) -> int:
    """N of scaling laws for a config, without a model in memory: the GPT is built on the
    meta device (shapes only), so the count is GPT.num_params's own, not a formula beside
    it that could drift from the architecture."""
    with torch.device("meta"):
        return GPT(cfg.model, vocab_size(cfg)).num_params()


class LossTerms(NamedTuple):
    """A training forward's loss and its parts (``GPT.forward(..., terms=True)``)."""

    loss: torch.Tensor  # what to back-propagate: lm + z (lm alone when z-loss is off)
    lm: torch.Tensor  # the mean cross-entropy, detached (0-d, float32)
    z: torch.Tensor | None  # model.z_loss x mean(log^2 Z), detached; None when off


def z_loss_term(
    logits: torch.Tensor, targets: torch.Tensor, coefficient: float, ignore_index: int = -100
) -> torch.Tensor:
    """PaLM's z-loss: ``coefficient x mean(log^2 Z)`` over the positions the cross-entropy
    counts (targets != ignore_index), log Z = logsumexp of a position's logits in fp32
    (the definition of the probe ``yoto_output_logit_log_z``). logits (N, V), targets (N,).
    No host read: a position mask, not boolean indexing."""
    log_z = torch.logsumexp(logits.float(), dim=-1)  # (N,)
    counted = (targets != ignore_index).float()
    return coefficient * (log_z.square() * counted).sum() / counted.sum().clamp(min=1.0)


def outside_prefix(targets: torch.Tensor, prefix_len: torch.Tensor) -> torch.Tensor:
    """targets (B, T) with those inside each sequence's prefix set to -100 (ignored):
    position t predicts token t + 1, which is inside the prefix while t + 1 < P."""
    inside = torch.arange(targets.size(1), device=targets.device)[None, :] + 1
    return targets.masked_fill(inside < prefix_len[:, None], -100)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def norm_factory(cfg: ModelConfig):
    if cfg.norm == "rmsnorm":
        return RMSNorm
    return lambda dim: nn.LayerNorm(dim, bias=cfg.bias)


def mlp_hidden(cfg: ModelConfig) -> int:
    """The MLP's hidden width: 2/3 of the plain width for GLUs, whose three matrices then
    hold as many parameters as the plain MLP's two."""
    if cfg.mlp_hidden is not None:
        return cfg.mlp_hidden
    hidden = cfg.mlp_ratio * cfg.d_model
    return round(2 * hidden / 3) if cfg.activation in GLU else int(hidden)


def sinusoidal_table(T: int, C: int) -> torch.Tensor:
    """The Transformer's fixed positions: (T, C) of sin and cos at geometric frequencies."""
    position = torch.arange(T).float()[:, None]
    freq = torch.exp(torch.arange(0, C, 2).float() * (-math.log(10000.0) / C))
    table = torch.zeros(T, C)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: C // 2])
    return table


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        hidden = mlp_hidden(cfg)
        self.glu = cfg.activation in GLU
        self.fc = nn.Linear(cfg.d_model, (2 if self.glu else 1) * hidden, bias=cfg.bias)
        self.act = {
            "gelu": lambda x: F.gelu(x, approximate="tanh"),
            "relu": F.relu,
            "relu2": lambda x: F.relu(x).square(),
            "geglu": lambda x: F.gelu(x, approximate="tanh"),
            "swiglu": F.silu,
        }[cfg.activation]
        self.proj = nn.Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.proj.residual_out = True
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (B, T, hidden) or (B, T, 2 * hidden) for a GLU
        if self.glu:
            gate, value = h.chunk(2, dim=-1)
            h = self.act(gate) * value
        else:
            h = self.act(h)
        return self.drop(self.proj(h))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        make_norm = norm_factory(cfg)
        self.ln_attn = make_norm(cfg.d_model)
        self.attn = SelfAttention(cfg, make_norm)
        self.ln_mlp = make_norm(cfg.d_model)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, prefix_len: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_attn(x), prefix_len))
        return x + self.mlp(self.ln_mlp(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        make_norm = norm_factory(cfg)
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.position == "learned" else None
        if cfg.position == "sinusoidal":
            self.register_buffer(
                "pos_table", sinusoidal_table(cfg.seq_len, cfg.d_model), persistent=False
            )
        else:
            self.pos_table = None
        self.embed_norm = make_norm(cfg.d_model) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.cfg.init_std
        if isinstance(module, nn.Linear):
            if getattr(module, "residual_out", False):
                # GPT-2: residual branches add up over 2 * n_layer sums
                std = std / math.sqrt(2 * self.cfg.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        prefix_len: torch.Tensor | None = None,
        terms: bool = False,
    ) -> torch.Tensor | LossTerms:
        """idx (B, T) token ids; prefix_len (B,) for a prefix-LM (ignored when causal).
        With targets (B, T): the loss to back-propagate (0-d, float32), the mean
        cross-entropy plus, when ``model.z_loss`` > 0, the z-loss term; with ``terms``
        also its detached parts (``LossTerms``: the loop reports them apart, validation
        takes the cross-entropy). Without targets: the logits (B, T, V)."""
        T = idx.size(1)
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds model.seq_len={self.cfg.seq_len}")
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=idx.device))
        elif self.pos_table is not None:
            x = x + self.pos_table[:T].to(x.dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, prefix_len)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits
        if prefix_len is not None:  # a prefix-LM learns only what its positions cannot see
            targets = outside_prefix(targets, prefix_len)
        # fp32 softmax: a bf16 log-partition over V entries loses the small differences
        flat_logits, flat_targets = logits.float().view(-1, logits.size(-1)), targets.reshape(-1)
        lm = F.cross_entropy(flat_logits, flat_targets, ignore_index=-100)
        if not self.cfg.z_loss:
            return LossTerms(lm, lm.detach(), None) if terms else lm
        z = z_loss_term(flat_logits, flat_targets, self.cfg.z_loss)
        loss = lm + z
        return LossTerms(loss, lm.detach(), z.detach()) if terms else loss

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters (tied weights counted once). Non-embedding excludes token and
        position embeddings, as in Kaplan et al."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
    ) -> torch.Tensor:
        """Sample continuations of idx (B, T); returns (B, T + max_new_tokens). A prefix-LM
        reads the prompt as its prefix (bidirectionally); what it writes is causal."""
        prompt = idx.size(1)
        for _ in range(max_new_tokens):
            ctx = idx[:, -self.cfg.seq_len :]
            prefix = None
            if self.cfg.attention.pattern == "prefix":
                dropped = idx.size(1) - ctx.size(1)  # prompt tokens slid out of the window
                seen = max(0, min(prompt - dropped, ctx.size(1)))
                prefix = torch.full((idx.size(0),), seen, device=idx.device)
            logits = self(ctx, prefix_len=prefix)[:, -1, :].float() / max(temperature, 1e-6)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
