"""Architecture choices: every combination trains; the attention backends agree; prefix-LM
sees what it should; ALiBi slopes; GLU sizing; the FLOP count; temperature sampling."""

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import make_trainer, train_in_process
from yoto import catalog, runstore
from yoto.config import ModelConfig, load_config
from yoto.errors import ConfigError
from yoto.trainer.attention import SelfAttention, alibi_slopes
from yoto.trainer.data.corpus import Corpus, SourceSplit
from yoto.trainer.data.sampler import Sampler
from yoto.trainer.flops import flops_per_token, mfu
from yoto.trainer.model import GPT, mlp_hidden, norm_factory

POSITIONS = ["learned", "sinusoidal", "rotary", "alibi", "none"]
PATTERNS = ["causal", "prefix"]
ACTIVATIONS = ["gelu", "relu", "relu2", "geglu", "swiglu"]


def small(**kw) -> ModelConfig:
    attention = kw.pop("attention", {})
    return ModelConfig.model_validate(
        {"n_layer": 2, "n_head": 4, "d_model": 32, "seq_len": 32, "attention": attention, **kw}
    )


@pytest.mark.parametrize(
    ("position", "pattern", "activation"), list(itertools.product(POSITIONS, PATTERNS, ACTIVATIONS))
)
def test_every_combination_builds_and_learns(position: str, pattern: str, activation: str) -> None:
    torch.manual_seed(0)
    cfg = small(position=position, activation=activation, attention={"pattern": pattern})
    model = GPT(cfg, vocab_size=64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.arange(64).repeat(8)[: 33 * 8].reshape(8, 33) % 64  # learnable structure
    prefix = torch.randint(1, 32, (8,)) if pattern == "prefix" else None
    losses = []
    for _ in range(25):
        loss = model(data[:, :-1], data[:, 1:], prefix)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.5, (losses[0], losses[-1])


def attention(position: str, pattern: str, backend: str) -> SelfAttention:
    torch.manual_seed(0)
    cfg = small(
        position=position, n_head=5, d_model=40, attention={"pattern": pattern, "backend": backend}
    )
    return SelfAttention(cfg, norm_factory(cfg))


CASES = [
    ("learned", "causal"),
    ("learned", "prefix"),
    ("alibi", "causal"),
    ("alibi", "prefix"),
    ("rotary", "prefix"),
]


@pytest.mark.parametrize(("position", "pattern"), CASES)
def test_sdpa_matches_eager_forward_and_backward(position: str, pattern: str) -> None:
    eager, sdpa = attention(position, pattern, "eager"), attention(position, pattern, "sdpa")
    sdpa.load_state_dict(eager.state_dict())
    x = torch.randn(3, 32, 40)
    prefix = torch.tensor([0, 7, 31])
    xe, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, ys = eager(xe, prefix), sdpa(xs, prefix)
    torch.testing.assert_close(ys, ye, atol=2e-5, rtol=1e-4)
    grad = torch.randn_like(ye)
    ye.backward(grad)
    ys.backward(grad)
    torch.testing.assert_close(xs.grad, xe.grad, atol=2e-5, rtol=1e-4)
    for (name, pe), ps in zip(eager.named_parameters(), sdpa.parameters(), strict=True):
        torch.testing.assert_close(ps.grad, pe.grad, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("position", "pattern"), [("learned", "causal"), ("learned", "prefix"), ("alibi", "causal")]
)
def test_flex_matches_eager_forward_compiled_on_cpu(position: str, pattern: str) -> None:
    eager, flex = attention(position, pattern, "eager"), attention(position, pattern, "flex")
    flex.load_state_dict(eager.state_dict())
    x = torch.randn(2, 32, 40)
    prefix = torch.tensor([5, 20])
    with torch.no_grad():
        torch.testing.assert_close(flex(x, prefix), eager(x, prefix), atol=2e-5, rtol=1e-4)


def test_auto_backend_is_flex_on_cuda_and_sdpa_on_cpu() -> None:
    assert attention("alibi", "prefix", "auto").backend == (
        "flex" if torch.cuda.is_available() else "sdpa"
    )


def test_flex_training_on_cpu_is_refused(tmp_path: Path, capsys) -> None:
    """train.device=cpu: refused on any machine, a GPU one too."""
    from yoto.cli import main

    rc = main(
        [
            "train",
            "--run-root",
            str(tmp_path),
            "--set",
            "model.attention.backend=flex",
            "--set",
            "train.device=cpu",
        ]
    )
    assert rc == 2 and "FlexAttention has no CPU backward" in capsys.readouterr().err


def test_prefix_lm_sees_the_prefix_both_ways_and_never_the_future() -> None:
    torch.manual_seed(0)
    model = GPT(small(attention={"pattern": "prefix"}), vocab_size=64).eval()
    idx = torch.randint(0, 64, (1, 32))
    prefix = torch.tensor([10])

    def changed_positions(at: int) -> set[int]:
        other = idx.clone()
        other[0, at] = (idx[0, at] + 1) % 64
        diff = (model(idx, prefix_len=prefix) - model(other, prefix_len=prefix)).abs()
        return {t for t in range(32) if diff[0, t].max() > 1e-6}

    # a token inside the prefix is seen by the earlier prefix tokens, and by everything after
    assert changed_positions(7) == set(range(32))
    # a token after the prefix is seen only from its own position on
    assert changed_positions(20) == set(range(20, 32))
    causal = GPT(small(), vocab_size=64).eval()
    causal.load_state_dict(model.state_dict())
    other = idx.clone()
    other[0, 7] += 1
    diff = (causal(idx) - causal(other)).abs()
    assert diff[0, :7].max() < 1e-6  # the causal model never looks ahead


def test_a_prefix_lm_loss_counts_no_target_its_position_can_see() -> None:
    """Position t predicts token t + 1; inside the bidirectional prefix (t + 1 < P) that
    token is in t's own view. The loss must count only the targets after the prefix: a
    model with the old default (every target) fails this."""
    torch.manual_seed(0)
    model = GPT(small(attention={"pattern": "prefix"}), vocab_size=64)
    idx = torch.randint(0, 64, (2, 32))
    tgt = torch.cat([idx[:, 1:], torch.randint(0, 64, (2, 1))], dim=1)  # a real LM's targets
    prefix = torch.tensor([10, 20])
    logits = model(idx, prefix_len=prefix)
    visible = torch.arange(32)[None, :] + 1 < prefix[:, None]  # target inside the view
    expected = torch.nn.functional.cross_entropy(logits[~visible], tgt[~visible])
    leaking = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), tgt.reshape(-1))
    loss = model(idx, tgt, prefix)
    torch.testing.assert_close(loss, expected)
    assert not torch.isclose(loss, leaking)
    # the loss does not move when a visible target changes (its input stays the same)
    other = tgt.clone()
    other[visible] = (other[visible] + 1) % 64
    torch.testing.assert_close(model(idx, other, prefix), loss)


@pytest.mark.parametrize("pattern", ["causal", "prefix"])
def test_validation_scores_every_pattern_on_the_targets_after_half(
    tmp_path: Path, pattern: str
) -> None:
    """yoto_val_loss counts the targets after the first seq_len // 2 tokens, for a
    prefix-LM (whose prefix is that half: none of them visible) and a causal model alike."""
    trainer, store = make_trainer(tmp_path, f"model.attention.pattern={pattern}")
    try:
        values = trainer.evaluate()
        model, T = trainer.engine.module.eval(), trainer.cfg.model.seq_len
        want = {}
        with torch.no_grad():
            for source, batches in trainer.val_batches.items():
                total = n = 0.0
                for batch in batches:
                    prefix = torch.full((batch.size(0),), T // 2) if pattern == "prefix" else None
                    logits = model(batch[:, :-1], prefix_len=prefix)
                    counted = slice(T // 2 - 1, T)  # position t predicts t + 1 >= T // 2
                    ce = torch.nn.functional.cross_entropy(
                        logits[:, counted].reshape(-1, logits.size(-1)),
                        batch[:, 1:][:, counted].reshape(-1),
                    )
                    total += float(ce) * batch.size(0)
                    n += batch.size(0)
                want[source] = total / n
        for source, value in want.items():
            key = catalog.series_key(catalog.VAL_LOSS.name, {"source": source})
            assert math.isclose(values[key], value, rel_tol=1e-5), (source, values[key], value)
    finally:
        store.close("finished")


def test_the_removed_prefix_loss_option_is_a_clear_error(tmp_path, capsys) -> None:
    from yoto.cli import main

    sets = ["--set", "model.attention.pattern=prefix", "--set", "model.attention.prefix_loss=true"]
    rc = main(["train", "--run-root", str(tmp_path), "--no-progress", "--metrics-addr", "0", *sets])
    err = capsys.readouterr().err
    assert rc == 2 and "prefix_loss=true was removed" in err and "after the prefix" in err
    assert not any(tmp_path.iterdir())  # refused before a run directory


def test_alibi_slopes_match_the_paper() -> None:
    expected = [1 / 2 ** (i + 1) for i in range(8)]  # 2^-1 ... 2^-8 for 8 heads
    torch.testing.assert_close(alibi_slopes(8), torch.tensor(expected))
    # 12 heads: the 8-head slopes, then every other of the 16-head ones
    sixteen = [2 ** (-(i + 1) / 2) for i in range(16)]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected + sixteen[0::2][:4]))


def test_glu_hidden_width_matches_the_plain_mlp_parameters() -> None:
    plain, glu = small(activation="gelu"), small(activation="swiglu")
    assert mlp_hidden(plain) == 128 and mlp_hidden(glu) == 85
    p = sum(x.numel() for x in GPT(plain, 64).blocks[0].mlp.parameters())
    g = sum(x.numel() for x in GPT(glu, 64).blocks[0].mlp.parameters())
    assert abs(g - p) / p < 0.02
    assert mlp_hidden(small(activation="geglu", mlp_hidden=100)) == 100


def test_flop_count_by_hand() -> None:
    """GPT-2 small: L=12, C=768, h=3072, V=50304, T=1024."""
    cfg = ModelConfig(n_layer=12, n_head=12, d_model=768, seq_len=1024)
    per_layer = 3 * 768 * 768 + 768 * 768 + 2 * 768 * 3072  # qkv, proj, fc, proj
    matmul = 2 * (12 * per_layer + 768 * 50304)
    attention = 12 * 4 * 1024 * 768
    assert flops_per_token(cfg, 50304, training=False) == matmul + attention
    assert flops_per_token(cfg, 50304) == 3 * (matmul + attention)
    n = 12 * per_layer + 768 * 50304  # matmul parameters
    assert flops_per_token(cfg, 50304) == 6 * n + 12 * 12 * 768 * 1024  # PaLM's 6N + 12LHQT
    glu = ModelConfig(n_layer=12, n_head=12, d_model=768, seq_len=1024, activation="swiglu")
    assert flops_per_token(glu, 50304, False) - attention == 2 * (
        12 * (4 * 768 * 768 + 3 * 768 * 2048) + 768 * 50304
    )
    assert mfu(400_000, 6e8, 989e12, 1) == pytest.approx(400_000 * 6e8 / 989e12)
    assert mfu(1e5, 1e9, None, 1) is None


def test_temperature_sampling_converges_to_the_stated_probabilities() -> None:
    corpus = Corpus()
    for name, n in (("en", 200_000), ("fr", 20_000), ("sw", 2_000)):
        stream = (np.arange(n) % 200).astype(np.uint16)
        corpus.sources[name] = SourceSplit(name, stream, stream[:100])
    for alpha in (1.0, 0.3, 0.0):
        s = Sampler(corpus, 16, seed=3, alpha=alpha)
        sizes = np.array([200_000, 20_000, 2_000], dtype=float)
        stated = sizes**alpha / (sizes**alpha).sum()
        drawn = np.bincount(s.sources_of(s.next_global_batch(60_000)), minlength=3) / 60_000
        np.testing.assert_allclose(drawn, stated, atol=0.01)


def test_mixture_is_resumable_and_skippable() -> None:
    corpus = Corpus()
    for name, n in (("a", 50_000), ("b", 3_000)):
        stream = (np.arange(n) % 200).astype(np.uint16)
        corpus.sources[name] = SourceSplit(name, stream, stream[:100])
    a = Sampler(corpus, 16, seed=1, alpha=0.5)
    first = a.next_global_batch(10_000)
    b = Sampler(corpus, 16, seed=1, alpha=0.5)
    b.load_state_dict({**a.state_dict(), "position": 4_000})
    np.testing.assert_array_equal(b.next_global_batch(100), first[4_000:4_100])
    b.skip(900)
    np.testing.assert_array_equal(b.next_global_batch(100), first[5_000:5_100])


def test_a_variant_trains_through_deepspeed_with_mfu_and_source_tokens(tmp_path: Path) -> None:
    trainer, store = make_trainer(
        tmp_path,
        "train.steps=6",
        "model.position=alibi",
        "model.activation=swiglu",
        "model.norm=rmsnorm",
        "model.embed_norm=true",
        "model.attention.qk_norm=true",
        "model.attention.pattern=prefix",
        "data.alpha=0.3",
        "train.peak_tflops=1.0",
    )
    trainer.fit()
    store.close("finished")
    t = runstore.read_metrics(store.path).to_pydict()
    assert all(math.isfinite(v) for v in t[catalog.TRAIN_LOSS.name])
    per_token = flops_per_token(trainer.cfg.model, trainer.engine.module.vocab_size)
    for tps, got in zip(t[catalog.THROUGHPUT.name], t[catalog.MFU.name], strict=True):
        assert got == pytest.approx(tps * per_token / 1e12)
    code, prose = (t[catalog.SOURCE_TOKENS.key(source=s)][-1] for s in ("code", "prose"))
    assert code + prose == t[catalog.TOKENS.name][-1]
    assert prose / (code + prose) > 0.1  # alpha 0.3 lifts the small source well above ~3%


def test_sample_from_a_checkpoint(trained_run: Path, capsys) -> None:
    from yoto.cli import main

    assert main(["sample", str(trained_run), "--prompt", "def ", "--tokens", "40"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("def ") and len(out.out) > 20 and "step-500" in out.err


def test_sample_from_a_prefix_lm(tmp_path: Path, capsys) -> None:
    from yoto.cli import main

    run = train_in_process(
        tmp_path,
        "--set",
        "train.steps=3",
        "--set",
        "model.attention.pattern=prefix",
        "--set",
        "eval.every=0",
        "--set",
        "probes.spectra.enabled=false",
    )
    assert main(["sample", str(run), "--prompt", "import os\n", "--tokens", "10"]) == 0
    assert capsys.readouterr().out.startswith("import os\n")


def test_bad_architecture_config_is_clear() -> None:
    with pytest.raises(ConfigError, match="model.position: Input should be"):
        load_config(overrides=["model.position=spiral"])
    with pytest.raises(ConfigError, match="needs an even head width"):
        load_config(overrides=["model.position=rotary", "model.d_model=36", "model.n_head=4"])
