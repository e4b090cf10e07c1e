import math

import pytest
import torch

from yoto.config import ModelConfig, load_config
from yoto.trainer.data import tokenizer
from yoto.trainer.model import GPT, non_embedding_parameters, vocab_size


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, d_model=32, seq_len=16), vocab_size=320)


def test_shapes_and_initial_loss(model: GPT) -> None:
    idx = torch.randint(0, 257, (3, 16))
    assert model(idx).shape == (3, 16, 320)
    loss = model(idx, torch.randint(0, 257, (3, 16)))
    assert loss.dim() == 0 and loss.dtype == torch.float32
    # small init: predictions are near uniform over the vocabulary
    assert abs(loss.item() - math.log(320)) < 0.3


def test_tied_embeddings_and_parameter_count(model: GPT) -> None:
    assert model.lm_head.weight is model.tok_emb.weight
    total = sum(p.numel() for p in model.parameters())  # parameters() yields tied ones once
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - 320 * 32 - 16 * 32
    per_block = 4 * 32 * 32 + 4 * 32 + 8 * 32 * 32 + 5 * 32 + 4 * 32  # attn, mlp, 2 LNs
    assert model.num_params() == 2 * per_block + 2 * 32  # + final LN


def test_vocab_size_follows_the_tokenizer() -> None:
    assert vocab_size(load_config(preset="tiny")) == tokenizer.padded_vocab_size() == 320
    assert vocab_size(load_config(preset="tiny", overrides=["model.vocab_size=512"])) == 512


def test_non_embedding_parameters_of_a_config_are_the_built_models() -> None:
    """The count from shapes alone (meta device) is the real model's, whatever the
    architecture: untied LM head and learned positions, a GLU, a larger vocabulary."""
    variants = [
        [],
        ["model.tie_embeddings=false", "model.position=learned"],
        ["model.activation=swiglu", "model.norm=rmsnorm", "model.vocab_size=1024"],
    ]
    counts = []
    for sets in variants:
        cfg = load_config(preset="tiny", overrides=sets)
        built = GPT(cfg.model, vocab_size(cfg))
        counts.append(non_embedding_parameters(cfg))
        assert counts[-1] == built.num_params(), sets
    assert len(set(counts)) == len(variants)  # the variants differ: the check is not vacuous


def test_residual_projections_get_scaled_init() -> None:
    torch.manual_seed(0)
    m = GPT(ModelConfig(n_layer=8, n_head=4, d_model=256, seq_len=16), vocab_size=320)
    std_plain = m.blocks[0].mlp.fc.weight.std().item()
    std_resid = m.blocks[0].mlp.proj.weight.std().item()
    assert std_plain == pytest.approx(0.02, rel=0.05)
    assert std_resid == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


def test_causal_no_peeking(model: GPT) -> None:
    idx = torch.randint(0, 257, (1, 16))
    changed = idx.clone()
    changed[0, 10] = (idx[0, 10] + 1) % 257
    a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_too_long_sequence_is_refused(model: GPT) -> None:
    with pytest.raises(ValueError, match="exceeds model.seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_generate_extends(model: GPT) -> None:
    out = model.generate(torch.zeros(2, 4, dtype=torch.long), max_new_tokens=20, top_k=5)
    assert out.shape == (2, 24)
