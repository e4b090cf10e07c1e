"""``yoto export``: tiny runs trained in-process, exported, loaded back with transformers
(nothing downloaded): the same logits as yoto's model on the same tokens (fp32, 1e-4), the
tokenizer round trip through AutoTokenizer, and the refusals naming their fields. Every
exportable combination of the architecture choices maps exactly (in memory)."""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.helpers import FAST, train_in_process
from yoto.cli import main
from yoto.config import ModelConfig
from yoto.evals import export as ex
from yoto.runstore import RunStore
from yoto.trainer.data import tokenizer as tokenizers
from yoto.trainer.model import GPT
from yoto.trainer.offline import checkpoint_model

transformers = pytest.importorskip("transformers")

SMALL = ["model.n_layer=2", "model.d_model=32", "model.n_head=4", "model.seq_len=32"]
# one run per architecture (and the choices it maps that are easy to get wrong)
RUNS = {
    "gpt2": ["model.dropout=0.1"],
    "bloom": [
        "model.position=alibi",
        "model.embed_norm=true",
        "model.d_model=48",
        "model.n_head=6",  # not a power of two: the interleaved ALiBi slopes
        "model.tie_embeddings=false",
    ],
    "gpt_neox": ["model.position=rotary", "model.activation=relu2", "model.bias=false"],
    "llama": [
        "model.position=rotary",
        "model.activation=swiglu",
        "model.norm=rmsnorm",
        "model.bias=false",
        "tokenizer=bpe",  # a tokenizer.json run (padded vocabulary 300 -> 320)
    ],
    "qwen3": [
        "model.position=rotary",
        "model.activation=geglu",
        "model.norm=rmsnorm",
        "model.bias=false",
        "model.attention.qk_norm=true",
    ],
}
TEXT = "héllo wörld ✓ 日本語 <|endoftext|>\n\tdef f(x):  return x ** 2  # ünïcödé 🙂"


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    lines = [f"def f{i}(x):\n    return x * {i} + 'héllo ✓ 日本'\n" for i in range(3000)]
    (root / "data.txt").write_text("".join(lines), encoding="utf-8")
    tokenizers.train_bpe(lines, 300, root / "bpe.json", show_progress=False)
    return root


@pytest.fixture(scope="module")
def trained(workdir: Path):
    """kind -> a tiny finished run of that architecture (trained once, on first use)."""

    @functools.cache
    def run(kind: str) -> Path:
        sets = [*FAST, *SMALL, "train.steps=4", "checkpoint.every=2"]
        sets += ["train.micro_batch_size=2", "train.global_batch_size=2"]
        sets.append(f"data.paths={json.dumps([str(workdir / 'data.txt')])}")
        for s in RUNS[kind]:
            sets.append(f"data.tokenizer={workdir / 'bpe.json'}" if s == "tokenizer=bpe" else s)
        args = [x for s in sets for x in ("--set", s)]
        return train_in_process(workdir / "runs", "--metrics-addr", "0", *args, name=kind)

    return run


def load(out: Path):
    from packaging.version import Version

    renamed = Version(transformers.__version__) >= Version("4.56")  # torch_dtype -> dtype
    dtype = "dtype" if renamed else "torch_dtype"
    return transformers.AutoModelForCausalLM.from_pretrained(out, **{dtype: torch.float32}).eval()


def same_logits(run: Path, step: int, out: Path) -> None:
    ours, _ = checkpoint_model(run, step)
    ours.eval()
    theirs = load(out)
    vocab = tokenizers.for_run(run).vocab_size
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, vocab, (3, ours.cfg.seq_len), generator=generator)
    with torch.no_grad():
        mine, got = ours(tokens), theirs(input_ids=tokens).logits
    assert got.dtype == torch.float32
    torch.testing.assert_close(got[..., :vocab], mine[..., :vocab], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", list(RUNS))
def test_an_export_computes_what_yoto_computes(kind: str, trained, tmp_path: Path, capsys) -> None:
    run = trained(kind)
    out = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(out)]) == 0
    target = ex.TARGETS[kind]
    printed = capsys.readouterr().out
    assert f"checkpoint step-4 of {run} as {target.name} ({target.architecture})" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == kind and config["architectures"] == [target.architecture]
    tok = tokenizers.for_run(run)
    assert config["vocab_size"] == tokenizers.padded(tok.vocab_size)  # the embedding's rows
    assert config["eos_token_id"] == tok.eos_id
    assert (out / "model.safetensors").is_file()
    manifest = json.loads((out / ex.MANIFEST).read_text())
    assert manifest["step"] == 4 and manifest["logit_difference"] < 1e-5
    same_logits(run, 4, out)


def test_the_tokenizer_round_trips_through_auto_tokenizer(trained, tmp_path: Path) -> None:
    """Bytes: ids are the UTF-8 bytes (the text <|endoftext|> too, as yoto reads it), EOS
    256; a tokenizer.json run: the file's own ids. Decoding gives the text back."""
    for kind in ("gpt2", "llama"):
        run, out = trained(kind), tmp_path / kind
        ex.export(run, out)
        theirs = transformers.AutoTokenizer.from_pretrained(out)
        ours = tokenizers.for_run(run)
        assert ours.spec == (tokenizers.BYTES if kind == "gpt2" else str(run / "tokenizer.json"))
        ids = theirs(TEXT, add_special_tokens=False)["input_ids"]
        assert ids == ours.encode(TEXT).tolist()
        assert theirs.decode(ids) == TEXT
        assert theirs.eos_token_id == ours.eos_id
        assert theirs(TEXT)["input_ids"] == ids  # neither file adds special tokens
        if kind == "gpt2":
            assert ids == list(TEXT.encode("utf-8"))
            assert theirs.convert_ids_to_tokens(256) == tokenizers.TRAINED_EOS
        else:
            assert len(ids) < len(TEXT.encode("utf-8"))  # merges
        fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
        assert fast.decode(ids) == TEXT


def test_step_out_and_force(trained, tmp_path: Path, capsys) -> None:
    run, out = trained("gpt2"), tmp_path / "hf"
    assert main(["export", str(run), "--step", "2", "--out", str(out)]) == 0
    assert json.loads((out / ex.MANIFEST).read_text())["step"] == 2
    same_logits(run, 2, out)
    assert main(["export", str(run), "--out", str(out)]) == 2  # not empty
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(out), "--force"]) == 0
    assert json.loads((out / ex.MANIFEST).read_text())["step"] == 4
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert main(["export", str(run), "--out", str(other), "--force"]) == 2
    assert "only a folder that yoto export wrote" in capsys.readouterr().err
    assert (other / "notes.txt").read_text() == "keep me"
    assert main(["export", str(run), "--step", "3", "--out", str(tmp_path / "x")]) == 2
    assert "no checkpoint for step 3" in capsys.readouterr().err


def fake_run(root: Path, model: dict) -> Path:
    store = RunStore.create(root, "refused", yaml.safe_dump({"model": model}))
    store.close("finished")
    return store.path


ROTARY_GLU = {"position": "rotary", "activation": "swiglu"}
REFUSED = [
    ({"attention": {"pattern": "prefix"}}, "model.attention.pattern=prefix (GPT-2 needs causal"),
    ({"position": "alibi"}, "model.embed_norm=false (BLOOM needs true"),
    ({"position": "alibi"}, "Falcon adds ALiBi before the 1/sqrt(head width) scale"),
    (
        {"position": "alibi", "embed_norm": True, "activation": "relu2", "mlp_ratio": 2},
        "model.activation=relu2 (BLOOM needs gelu); the MLP width (model.mlp_hidden / "
        "mlp_ratio)=256 (BLOOM needs 4 x d_model = 512)",
    ),
    ({"activation": "swiglu"}, "model.activation=swiglu (GPT-2 needs gelu, relu or relu2)"),
    ({"norm": "rmsnorm"}, "model.norm=rmsnorm (GPT-2 needs layernorm)"),
    (ROTARY_GLU, "model.norm=layernorm (Llama needs rmsnorm)"),
    ({"position": "rotary", "norm": "rmsnorm"}, "model.norm=rmsnorm (GPT-NeoX needs layernorm)"),
    (
        {**ROTARY_GLU, "norm": "rmsnorm", "attention": {"qk_norm": True}},
        "model.bias=true (Qwen3 needs false: Qwen3's MLP has no biases)",
    ),
]


@pytest.mark.parametrize(("model", "named"), REFUSED)
def test_a_model_with_no_exact_equivalent_is_refused(
    model: dict, named: str, tmp_path: Path, capsys
) -> None:
    run = fake_run(tmp_path / "runs", model)
    out = tmp_path / "hf"
    assert main(["export", str(run), "--out", str(out)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "has no exact equivalent in transformers" in err
    assert named in err
    assert "Exportable: GPT-2 (position learned, sinusoidal or none;" in err
    assert not out.exists()


CHOICES = {
    "position": ["learned", "sinusoidal", "rotary", "alibi", "none"],
    "activation": ["gelu", "relu", "relu2", "geglu", "swiglu"],
    "norm": ["layernorm", "rmsnorm"],
    "embed_norm": [False, True],
    "bias": [True, False],
    "tie_embeddings": [True, False],
    "qk_norm": [False, True],
    "pattern": ["causal", "prefix"],
}


def every_config():
    for values in itertools.product(*CHOICES.values()):
        kw = dict(zip(CHOICES, values, strict=True))
        attention = {"qk_norm": kw.pop("qk_norm"), "pattern": kw.pop("pattern")}
        yield ModelConfig.model_validate(
            {"n_layer": 2, "n_head": 4, "d_model": 32, "seq_len": 16, "attention": attention, **kw}
        )


def test_every_exportable_combination_maps_exactly() -> None:
    """All 1,600 combinations: each is exported or refused; the exported ones (weights
    random, norms and biases too) give yoto's logits."""
    torch.manual_seed(0)
    exported = []
    for cfg in every_config():
        try:
            ex.target_for(cfg)
        except ex.NoExactEquivalent:
            continue
        ours = GPT(cfg, 70)
        with torch.no_grad():
            for p in ours.parameters():
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
        theirs, target = ex.hf_model(ours, eos_id=64)
        difference = ex.logit_difference(ours, theirs, 65)
        assert difference < 1e-5, (target.key, cfg)
        exported.append(target.key)
    counts = {k: exported.count(k) for k in ex.TARGETS}
    assert counts == {"gpt2": 36, "bloom": 4, "gpt_neox": 12, "llama": 8, "qwen3": 4}


def test_the_byte_tokenizer_file_gives_the_bytes() -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(ex.byte_tokenizer_json())
    every = "".join(map(chr, range(1, 0x800))) + "日本語🙂\x00"
    ids = tok.encode(every).ids
    assert ids == np.frombuffer(every.encode("utf-8"), np.uint8).tolist()
    assert tok.decode(ids) == every
    assert tok.token_to_id(tokenizers.TRAINED_EOS) == tokenizers.EOS
    assert tok.get_vocab_size() == tokenizers.VOCAB_SIZE
