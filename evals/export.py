"""``yoto export RUN_DIR [--step S] --out DIR``: a checkpoint as a Hugging Face
``transformers`` causal LM (config.json + model.safetensors), the run's tokenizer beside it,
for the configurations that *are* a transformers architecture: the same function of the
tokens, never an approximation of it.

    yoto ``model:``                                              transformers
    position learned | sinusoidal | none, norm layernorm,
        activation gelu | relu | relu2                           GPT-2     GPT2LMHeadModel
    position alibi, embed_norm true, layernorm, gelu,
        MLP hidden 4 x d_model                                   BLOOM     BloomForCausalLM
    position rotary, layernorm, gelu | relu | relu2              GPT-NeoX  GPTNeoXForCausalLM
    position rotary, rmsnorm, swiglu | geglu                     Llama     LlamaForCausalLM
    the same with attention.qk_norm true and bias false          Qwen3     Qwen3ForCausalLM

All of them: ``attention.pattern: causal``; ``embed_norm`` only for BLOOM (which requires
it), ``attention.qk_norm`` only for Qwen3. The other choices map exactly whatever they are:
biases or none (an architecture whose layers always have a bias gets zeros, which add
nothing), a tied or untied head, any MLP width but BLOOM's, the padded vocabulary
(``vocab_size`` is the embedding's rows), the head width, dropout (training only, as are
``z_loss`` and the attention backend). Sinusoidal or no positions become GPT-2's position
table holding the fixed sinusoids or zeros: the same sums, now a parameter. GELU is the
tanh approximation everywhere (transformers' ``gelu_pytorch_tanh``; BLOOM's own gelu is the
same formula); the attention scale is 1/sqrt(head width) in all; rotary is the
rotate-half (GPT-NeoX) form with base 10000 over the whole head, as Llama's.

Everything else is refused with :class:`NoExactEquivalent`, naming each field in the way and
what exists: a prefix-LM (it attends bidirectionally inside its prompt; no transformers
causal LM does), ALiBi without the embedding norm (Falcon adds ALiBi before the
1/sqrt(head width) scale, so its slopes are scaled; MPT's GELU is the erf one and its slopes
differ unless the head count is a power of two), learned positions with RMSNorm or a GLU,
rotary with layernorm and a GLU, rmsnorm with a plain MLP, QK-norm outside Qwen3's shape.

Before anything is written, the transformers model and yoto's run on the same random tokens
and their fp32 logits must agree; a difference is a mapping bug, raised, never exported.
"""

from __future__ import annotations

import inspect
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from yoto import runstore
from yoto.config import ModelConfig
from yoto.errors import ConfigError, RunDirError, YotoError
from yoto.trainer.attention import Rotary, SelfAttention
from yoto.trainer.data import tokenizer as tokenizers
from yoto.trainer.model import GLU, GPT, mlp_hidden
from yoto.trainer.offline import checkpoint_model, run_config

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

MANIFEST = "yoto_export.json"  # what an export writes beside the model: its provenance
ROPE_THETA = float(inspect.signature(Rotary.__init__).parameters["base"].default)
# transformers' activation of each of yoto's (for a GLU: of its gate); yoto's GELU is
# F.gelu(approximate="tanh"), the op behind transformers' gelu_pytorch_tanh
HF_ACTIVATION = {
    "gelu": "gelu_pytorch_tanh",
    "relu": "relu",
    "relu2": "relu2",
    "geglu": "gelu_pytorch_tanh",
    "swiglu": "silu",
}
CHECK_TOKENS = (2, 64)  # (sequences, tokens, at most model.seq_len) of the logit check
CHECK_TOLERANCE = 1e-3  # |theirs - ours| <= tol * (1 + |ours|); a mapping bug is O(1)


class NoExactEquivalent(ConfigError):
    """The run's model is no transformers architecture exactly; the message names the
    fields and what would be exportable."""


@dataclass(frozen=True)
class Target:
    key: str  # transformers' model_type
    name: str
    architecture: str  # the transformers class


TARGETS = {
    t.key: t
    for t in (
        Target("gpt2", "GPT-2", "GPT2LMHeadModel"),
        Target("bloom", "BLOOM", "BloomForCausalLM"),
        Target("gpt_neox", "GPT-NeoX", "GPTNeoXForCausalLM"),
        Target("llama", "Llama", "LlamaForCausalLM"),
        Target("qwen3", "Qwen3", "Qwen3ForCausalLM"),
    )
}

EXPORTABLE = (
    "GPT-2 (position learned, sinusoidal or none; norm layernorm; activation gelu, relu or "
    "relu2), BLOOM (position alibi; embed_norm true; norm layernorm; activation gelu; MLP "
    "hidden 4 x d_model), GPT-NeoX (position rotary; norm layernorm; activation gelu, relu "
    "or relu2), Llama (position rotary; norm rmsnorm; activation swiglu or geglu), Qwen3 "
    "(Llama's with attention.qk_norm true and bias false); all with attention.pattern causal, "
    "embed_norm only for BLOOM and attention.qk_norm only for Qwen3"
)


class _Need(NamedTuple):
    field: str  # e.g. model.norm
    value: Any  # the run's
    ok: bool
    wanted: str  # what the target needs, as a --set value
    why: str = ""


def _fmt(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)


def target_for(m: ModelConfig) -> Target:
    """The transformers architecture that is exactly this model; raises
    :class:`NoExactEquivalent` naming every field in the way. The position decides the
    candidate (what else carries it), the activation splits rotary into NeoX and Llama."""
    plain = m.activation not in GLU
    qk = m.attention.qk_norm
    no_qk = _Need("model.attention.qk_norm", qk, not qk, "false", "QK-norm only in Qwen3's shape")
    no_embed_norm = _Need("model.embed_norm", m.embed_norm, not m.embed_norm, "false")
    layernorm = _Need("model.norm", m.norm, m.norm == "layernorm", "layernorm")
    if m.position in ("learned", "sinusoidal", "none"):
        key = "gpt2"
        needs = [
            layernorm,
            _Need("model.activation", m.activation, plain, "gelu, relu or relu2"),
            no_embed_norm,
            no_qk,
        ]
    elif m.position == "alibi":
        key = "bloom"
        hidden = mlp_hidden(m)
        needs = [
            _Need(
                "model.embed_norm",
                m.embed_norm,
                m.embed_norm,
                "true",
                "BLOOM's ALiBi comes with an embedding LayerNorm; Falcon adds ALiBi before the "
                "1/sqrt(head width) scale; MPT's GELU is the erf one",
            ),
            layernorm,
            _Need("model.activation", m.activation, m.activation == "gelu", "gelu"),
            _Need(
                "the MLP width (model.mlp_hidden / mlp_ratio)",
                hidden,
                hidden == 4 * m.d_model,
                f"4 x d_model = {4 * m.d_model}",
            ),
            no_qk,
        ]
    elif plain:  # rotary, a plain MLP
        key = "gpt_neox"
        needs = [layernorm, no_embed_norm, no_qk]
    else:  # rotary, a GLU
        key = "qwen3" if qk else "llama"
        needs = [_Need("model.norm", m.norm, m.norm == "rmsnorm", "rmsnorm"), no_embed_norm]
        if qk:
            needs.append(
                _Need("model.bias", m.bias, not m.bias, "false", "Qwen3's MLP has no biases")
            )
    needs.insert(
        0,
        _Need(
            "model.attention.pattern",
            m.attention.pattern,
            m.attention.pattern == "causal",
            "causal",
            "a prefix-LM attends bidirectionally inside its prompt; no transformers causal LM does",
        ),
    )
    target = TARGETS[key]
    wrong = [n for n in needs if not n.ok]
    if wrong:
        named = "; ".join(
            f"{n.field}={_fmt(n.value)} ({target.name} needs {n.wanted}"
            + (f": {n.why})" if n.why else ")")
            for n in wrong
        )
        raise NoExactEquivalent(
            f"this run's model has no exact equivalent in transformers: with "
            f"model.position={m.position} and model.activation={m.activation} the candidate "
            f"is {target.name}, but {named}. Exportable: {EXPORTABLE}"
        )
    return target


# --- the transformers config -------------------------------------------------------------


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise YotoError(
            "yoto export writes a Hugging Face transformers model and needs transformers and "
            "safetensors: pip install 'yoto[export]'"
        ) from None
    return transformers


def hf_config(
    m: ModelConfig, target: Target, vocab_size: int, eos_id: int, eps: float
) -> PretrainedConfig:
    """``eps``: of yoto's norms (torch's LayerNorm default, or RMSNorm's)."""
    transformers = _transformers()

    common = {
        "vocab_size": vocab_size,  # the embedding's rows, padding included
        "bos_token_id": eos_id,  # yoto starts a document after an end-of-document token
        "eos_token_id": eos_id,
        "tie_word_embeddings": m.tie_embeddings,
        "initializer_range": m.init_std,
    }
    hidden = mlp_hidden(m)
    if target.key == "gpt2":
        return transformers.GPT2Config(
            n_positions=m.seq_len,
            n_embd=m.d_model,
            n_layer=m.n_layer,
            n_head=m.n_head,
            n_inner=hidden,
            activation_function=HF_ACTIVATION[m.activation],
            resid_pdrop=m.dropout,
            embd_pdrop=m.dropout,
            attn_pdrop=m.dropout,
            layer_norm_epsilon=eps,
            scale_attn_weights=True,
            scale_attn_by_inverse_layer_idx=False,
            reorder_and_upcast_attn=False,
            **common,
        )
    if target.key == "bloom":
        return transformers.BloomConfig(
            hidden_size=m.d_model,
            n_layer=m.n_layer,
            n_head=m.n_head,
            layer_norm_epsilon=eps,
            hidden_dropout=m.dropout,
            attention_dropout=m.dropout,
            apply_residual_connection_post_layernorm=False,
            pretraining_tp=1,
            slow_but_exact=False,
            **common,
        )
    if target.key == "gpt_neox":
        return transformers.GPTNeoXConfig(
            hidden_size=m.d_model,
            num_hidden_layers=m.n_layer,
            num_attention_heads=m.n_head,
            intermediate_size=hidden,
            hidden_act=HF_ACTIVATION[m.activation],
            rotary_pct=1.0,
            rotary_emb_base=ROPE_THETA,
            max_position_embeddings=m.seq_len,
            layer_norm_eps=eps,
            use_parallel_residual=False,  # yoto's blocks are sequential
            attention_bias=m.bias,
            hidden_dropout=m.dropout,
            attention_dropout=m.dropout,
            **common,
        )
    llama_like = {
        "hidden_size": m.d_model,
        "intermediate_size": hidden,
        "num_hidden_layers": m.n_layer,
        "num_attention_heads": m.n_head,
        "num_key_value_heads": m.n_head,
        "head_dim": m.d_model // m.n_head,
        "hidden_act": HF_ACTIVATION[m.activation],
        "max_position_embeddings": m.seq_len,
        "rms_norm_eps": eps,
        "rope_theta": ROPE_THETA,
        "attention_bias": m.bias,
        "attention_dropout": m.dropout,
        **common,
    }
    if target.key == "llama":
        return transformers.LlamaConfig(mlp_bias=m.bias, **llama_like)
    if not hasattr(transformers, "Qwen3Config"):
        raise NoExactEquivalent(
            f"this run's model is exactly Qwen3, which transformers "
            f"{transformers.__version__} does not have (4.51 or newer does)"
        )
    return transformers.Qwen3Config(use_sliding_window=False, **llama_like)


# --- the weights --------------------------------------------------------------------------


class _Filler:
    """Copies yoto's weights into a transformers model whose every parameter starts as
    NaN, so that one left unset is caught (:meth:`finish`), not shipped as random init."""

    def __init__(self, ours: GPT, theirs: nn.Module) -> None:
        self.sd = {k: v.detach().float() for k, v in ours.state_dict().items()}
        self.theirs = theirs
        with torch.no_grad():
            for p in theirs.parameters():
                p.fill_(float("nan"))

    def get(self, name: str) -> torch.Tensor:
        return self.sd[name]

    def put(self, param: torch.Tensor, value: torch.Tensor, what: str) -> None:
        if tuple(param.shape) != tuple(value.shape):
            raise RuntimeError(
                f"export mapping: {what} has shape {tuple(value.shape)} in yoto, the "
                f"transformers parameter {tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(value)

    def linear(
        self, theirs: nn.Module, prefix: str, transpose: bool = False, rows: slice | None = None
    ) -> None:
        """``prefix``.weight (and .bias: zeros where yoto has none) into a Linear, or a
        GPT-2 Conv1D (``transpose``: its weight is (in, out)); ``rows`` of yoto's output."""
        weight = self.get(f"{prefix}.weight")
        bias = self.sd.get(f"{prefix}.bias")
        if rows is not None:
            weight = weight[rows]
            bias = None if bias is None else bias[rows]
        self.put(theirs.weight, weight.T if transpose else weight, f"{prefix}.weight")
        self.bias(theirs, bias, weight.size(0), prefix)

    def bias(self, theirs: nn.Module, bias: torch.Tensor | None, n: int, prefix: str) -> None:
        if getattr(theirs, "bias", None) is None:
            if bias is not None:
                raise RuntimeError(f"export mapping: {prefix}.bias has no place in transformers")
            return
        self.put(theirs.bias, torch.zeros(n) if bias is None else bias, f"{prefix}.bias")

    def norm(self, theirs: nn.Module, prefix: str) -> None:
        weight = self.get(f"{prefix}.weight")
        self.put(theirs.weight, weight, f"{prefix}.weight")
        self.bias(theirs, self.sd.get(f"{prefix}.bias"), weight.numel(), prefix)

    def head(self, m: ModelConfig) -> None:
        out = self.theirs.get_output_embeddings()
        tied = out.weight is self.theirs.get_input_embeddings().weight
        if tied != m.tie_embeddings:
            raise RuntimeError(f"export mapping: head tied={tied}, yoto's {m.tie_embeddings}")
        if not tied:
            self.put(out.weight, self.get("lm_head.weight"), "lm_head.weight")

    def finish(self) -> None:
        unset = [n for n, p in self.theirs.named_parameters() if torch.isnan(p).any()]
        if unset:
            raise RuntimeError(f"export mapping left transformers parameters unset: {unset}")


def _per_head(fused: torch.Tensor, n_head: int) -> torch.Tensor:
    """yoto's fused rows [q | k | v] (heads contiguous in each) as BLOOM's and GPT-NeoX's
    [q_h k_h v_h for each head h]; a weight (3C, C) or a bias (3C,)."""
    head_dim = fused.size(0) // (3 * n_head)
    per = fused.reshape(3, n_head, head_dim, *fused.shape[1:]).transpose(0, 1)
    return per.reshape(fused.shape)


def _fill(ours: GPT, theirs: PreTrainedModel, target: Target) -> None:
    m = ours.cfg
    C, H = m.d_model, m.n_head
    f = _Filler(ours, theirs)
    f.put(theirs.get_input_embeddings().weight, f.get("tok_emb.weight"), "tok_emb.weight")
    if target.key == "gpt2":
        t = theirs.transformer
        if m.position == "learned":
            positions = f.get("pos_emb.weight")
        elif m.position == "sinusoidal":
            positions = ours.pos_table.float()  # what GPT.forward adds
        else:
            positions = torch.zeros(m.seq_len, C)
        f.put(t.wpe.weight, positions, f"position table ({m.position})")
        for i, block in enumerate(t.h):
            p = f"blocks.{i}"
            f.norm(block.ln_1, f"{p}.ln_attn")
            f.linear(block.attn.c_attn, f"{p}.attn.qkv", transpose=True)
            f.linear(block.attn.c_proj, f"{p}.attn.proj", transpose=True)
            f.norm(block.ln_2, f"{p}.ln_mlp")
            f.linear(block.mlp.c_fc, f"{p}.mlp.fc", transpose=True)
            f.linear(block.mlp.c_proj, f"{p}.mlp.proj", transpose=True)
        f.norm(t.ln_f, "ln_f")
    elif target.key in ("bloom", "gpt_neox"):
        bloom = target.key == "bloom"
        base = theirs.transformer if bloom else theirs.gpt_neox
        if bloom:
            f.norm(base.word_embeddings_layernorm, "embed_norm")
        for i, layer in enumerate(base.h if bloom else base.layers):
            p = f"blocks.{i}"
            attn = layer.self_attention if bloom else layer.attention
            f.norm(layer.input_layernorm, f"{p}.ln_attn")
            qkv = f.get(f"{p}.attn.qkv.weight")
            f.put(attn.query_key_value.weight, _per_head(qkv, H), f"{p}.attn.qkv.weight")
            bias = f.sd.get(f"{p}.attn.qkv.bias")
            f.bias(attn.query_key_value, None if bias is None else _per_head(bias, H), 3 * C, p)
            f.linear(attn.dense, f"{p}.attn.proj")
            f.norm(layer.post_attention_layernorm, f"{p}.ln_mlp")
            f.linear(layer.mlp.dense_h_to_4h, f"{p}.mlp.fc")
            f.linear(layer.mlp.dense_4h_to_h, f"{p}.mlp.proj")
        f.norm(base.ln_f if bloom else base.final_layer_norm, "ln_f")
    else:  # llama, qwen3
        hidden = mlp_hidden(m)
        for i, layer in enumerate(theirs.model.layers):
            p = f"blocks.{i}"
            a = layer.self_attn
            f.norm(layer.input_layernorm, f"{p}.ln_attn")
            for j, proj in enumerate((a.q_proj, a.k_proj, a.v_proj)):
                f.linear(proj, f"{p}.attn.qkv", rows=slice(j * C, (j + 1) * C))
            f.linear(a.o_proj, f"{p}.attn.proj")
            if target.key == "qwen3":
                f.norm(a.q_norm, f"{p}.attn.q_norm")
                f.norm(a.k_norm, f"{p}.attn.k_norm")
            f.norm(layer.post_attention_layernorm, f"{p}.ln_mlp")
            # yoto's GLU: gate, value = fc(x).chunk(2); transformers: act(gate) * up
            f.linear(layer.mlp.gate_proj, f"{p}.mlp.fc", rows=slice(0, hidden))
            f.linear(layer.mlp.up_proj, f"{p}.mlp.fc", rows=slice(hidden, 2 * hidden))
            f.linear(layer.mlp.down_proj, f"{p}.mlp.proj")
        f.norm(theirs.model.norm, "ln_f")
    f.head(m)
    f.finish()


def hf_model(ours: GPT, eos_id: int) -> tuple[PreTrainedModel, Target]:
    """The transformers model that computes what ``ours`` does, fp32, in eval mode."""
    transformers = _transformers()

    target = target_for(ours.cfg)
    config = hf_config(ours.cfg, target, ours.vocab_size, eos_id, float(ours.ln_f.eps))
    theirs = getattr(transformers, target.architecture)(config).float().eval()
    _fill(ours, theirs, target)
    return theirs, target


@torch.no_grad()
def logit_difference(ours: GPT, theirs: nn.Module, vocab: int, seed: int = 0) -> float:
    """The largest |theirs - ours| / (1 + |ours|) over the logits of CHECK_TOKENS random
    tokens of the real vocabulary (fp32, eval mode)."""
    batch, length = CHECK_TOKENS
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (batch, min(length, ours.cfg.seq_len)), generator=generator)
    ours.eval()
    mine = ours(tokens).float()
    got = theirs(input_ids=tokens).logits.float()
    return float(((got - mine).abs() / (1 + mine.abs())).max())


def _reference_attention(model: GPT) -> None:
    """FlexAttention (``attention.backend: flex``) is compiled for CUDA; the check runs on
    the CPU, through SDPA, which computes the same."""
    for module in model.modules():
        if isinstance(module, SelfAttention) and module.backend == "flex":
            module.backend, module._attend = "sdpa", module._sdpa


# --- the tokenizer ------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character (tokenizers'
    ByteLevel pre-tokenizer and decoder use this table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def byte_tokenizer_json() -> str:
    """yoto's byte tokenizer as a ``tokenizers`` tokenizer.json: ids 0..255 are the UTF-8
    bytes, 256 the end-of-document token (named <|endoftext|>). A byte-level BPE with no
    merges: the ByteLevel pre-tokenizer maps each byte to its character, each character is
    a token of its byte's id."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: b for b, char in bytes_to_unicode().items()}
    vocab[tokenizers.TRAINED_EOS] = tokenizers.EOS
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokenizers.TRAINED_EOS, special=True, normalized=False)])
    return tok.to_str()


def write_tokenizer(tok: tokenizers.Tokenizer, out: Path, seq_len: int) -> list[str]:
    """tokenizer.json and tokenizer_config.json into ``out``, for ``AutoTokenizer``; notes
    on how its encoding relates to yoto's."""
    notes = []
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": seq_len,
        "clean_up_tokenization_spaces": False,  # decode gives the text back as it was
    }
    raw = tok.file_bytes()
    if raw is None:  # the byte tokenizer
        (out / "tokenizer.json").write_text(byte_tokenizer_json(), encoding="utf-8")
        eos = tokenizers.TRAINED_EOS
        # yoto's byte tokenizer reads the text "<|endoftext|>" as its 13 bytes; so does this
        # one through transformers (a tokenizers.Tokenizer of the file alone reads it as 256)
        config["split_special_tokens"] = True
        notes.append(
            f"tokenizer: yoto's bytes as a byte-level tokenizer.json (ids 0-255 the UTF-8 "
            f"bytes, {tokenizers.EOS} = {eos}, read as bytes when it appears in text)"
        )
    else:
        (out / "tokenizer.json").write_bytes(raw)
        eos = tok.eos_token  # type: ignore[attr-defined]
        if json.loads(raw).get("post_processor"):
            notes.append(
                "tokenizer: the file has a post-processor; yoto encodes without it "
                "(add_special_tokens=False gives yoto's ids)"
            )
    config["eos_token"] = config["bos_token"] = eos
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return notes


# --- the export ---------------------------------------------------------------------------


@dataclass
class Exported:
    out: Path
    step: int
    target: Target
    files: list[str]
    difference: float  # logit_difference of the written weights
    notes: list[str] = field(default_factory=list)


def newest_complete(run_dir: Path) -> int:
    complete = [
        c.step for c in runstore.list_checkpoints(run_dir / runstore.CHECKPOINTS) if c.complete
    ]
    if not complete:
        raise RunDirError(f"{run_dir} has no complete checkpoint to export")
    return complete[-1]


def _notes(m: ModelConfig, target: Target) -> list[str]:
    """Exact, but worth saying."""
    notes = []
    if m.position in ("sinusoidal", "none"):
        what = "the fixed sinusoids" if m.position == "sinusoidal" else "zeros"
        notes.append(
            f"positions: model.position={m.position} as GPT-2's position table holding {what} "
            "(the same sums; the table is a parameter there)"
        )
    always_bias = {"gpt2": "GPT-2's layers", "bloom": "BLOOM's layers", "gpt_neox": "NeoX's MLP"}
    if not m.bias and target.key in always_bias:
        notes.append(
            f"biases: model.bias=false; {always_bias[target.key]} always have biases, "
            "exported as zeros"
        )
    if m.dropout and target.key in ("llama", "qwen3"):
        notes.append(f"dropout: {target.name} has only attention dropout (training only)")
    return notes


def export(
    run_dir: str | Path, out: str | Path, step: int | None = None, force: bool = False
) -> Exported:
    """Checkpoint ``step`` (default: the newest complete one) of the run as a transformers
    model in ``out``, with the run's tokenizer; refuses a model with no exact equivalent
    before loading anything, and a non-empty ``out`` that is not an earlier export (which
    ``force`` replaces)."""
    run_dir = runstore.require_run_dir(run_dir)
    out = Path(out)
    cfg = run_config(run_dir)
    target = target_for(cfg.model)  # refuse before loading weights or transformers
    replaceable = force and (out / MANIFEST).is_file()  # an earlier export, not any folder
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not replaceable:
        raise ConfigError(
            f"--out {str(out)!r} exists and is not empty; give a new or empty folder"
            + (" (--force replaces only a folder that yoto export wrote)" if force else "")
            + (", or --force to replace an earlier export there" if not force else "")
        )
    step = newest_complete(run_dir) if step is None else step
    ours, _ = checkpoint_model(run_dir, step)
    ours.eval()
    _reference_attention(ours)
    tok = tokenizers.for_run(run_dir, cfg.data.eos)
    theirs, target = hf_model(ours, tok.eos_id)
    difference = logit_difference(ours, theirs, tok.vocab_size)
    if not difference <= CHECK_TOLERANCE:  # NaN too
        raise RuntimeError(
            f"the {target.name} export of {run_dir} step {step} does not compute what yoto's "
            f"model does (largest relative logit difference {difference:.3g}): an export bug"
        )
    tmp = out.with_name(f".{out.name}.export-tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        theirs.save_pretrained(tmp)  # safetensors: the default since transformers 4.35
        if not (tmp / "model.safetensors").is_file():
            raise RuntimeError(f"transformers wrote no model.safetensors into {tmp}")
        notes = [*_notes(cfg.model, target), *write_tokenizer(tok, tmp, cfg.model.seq_len)]
        manifest = {
            "run": str(run_dir.resolve()),
            "step": step,
            "architecture": target.architecture,
            "model_type": target.key,
            "tokenizer": tokenizers.describe(tok),
            "logit_difference": difference,
            "notes": notes,
            "model": cfg.model.model_dump(mode="json"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = sorted(p.name for p in out.iterdir())
    return Exported(out, step, target, files, difference, notes)
