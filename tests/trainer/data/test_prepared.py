"""Prepared directories (``yoto data prepare``) against the raw files they came from, the
tokenizers, and every bad input of the data path."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from yoto.config import load_config
from yoto.errors import ConfigError, DataError
from yoto.trainer.data import megatron, prepare, shards
from yoto.trainer.data import tokenizer as tokenizers
from yoto.trainer.data.corpus import PREPARED, load_corpus
from yoto.trainer.data.sampler import Sampler
from yoto.trainer.model import vocab_size

SEQ = 64
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def write_corpus(root: Path, files: int) -> list[str]:
    """Two sources of text already on the machine: ``files`` stdlib modules (code) and as
    many of pydoc's topic pages (prose), one file each."""
    from pydoc_data.topics import topics

    code, prose = root / "code", root / "prose"
    code.mkdir(parents=True)
    prose.mkdir()
    for path in sorted(STDLIB.glob("*.py"))[:files]:
        (code / path.name).write_bytes(path.read_bytes())
    for key in sorted(topics)[:files]:
        (prose / f"{key}.txt").write_text(topics[key])
    return [f"code={code}", f"prose={prose}"]


def config(paths: list[str], tokenizer: str = "bytes", *extra: str):
    return load_config(
        preset="tiny",
        overrides=[
            f"data.paths={json.dumps(paths)}",
            f"data.tokenizer={tokenizer}",
            f"model.seq_len={SEQ}",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, write_corpus(root, 40)


@pytest.fixture(scope="module")
def bpe(corpus_dir, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE trained by yoto on the corpus (as `yoto tokenizer train` does)."""
    _, paths = corpus_dir
    out = tmp_path_factory.mktemp("tok") / "tok.json"
    texts = tokenizers.texts_of(
        __import__("yoto.trainer.data.corpus", fromlist=["x"]).raw_documents(
            config(paths).data, paths
        )
    )
    tokenizers.train_bpe(texts, 800, out, show_progress=False)
    return out


def _same_split(a, b) -> None:
    assert np.array_equal(np.asarray(a.train), np.asarray(b.train))
    assert np.array_equal(np.asarray(a.val), np.asarray(b.val))
    assert (a.train_docs, a.val_docs) == (b.train_docs, b.val_docs)
    assert [a.docs.start(d) for d in range(len(a.docs))] == [
        b.docs.start(d) for d in range(len(b.docs))
    ]
    assert [a.docs.id(d) for d in range(len(a.docs))] == [b.docs.id(d) for d in range(len(b.docs))]


@pytest.mark.parametrize(("tok", "workers"), [("bytes", 0), ("bpe", 2)])
def test_a_prepared_directory_gives_the_streams_and_batches_of_its_raw_files(
    corpus_dir, bpe: Path, tmp_path: Path, tok: str, workers: int
) -> None:
    _, paths = corpus_dir
    spec = str(bpe) if tok == "bpe" else "bytes"
    cfg = config(paths, spec)
    got = prepare.prepare(cfg, tmp_path / "prep", workers=workers, progress=False)
    assert got.manifest["tokenizer"]["digest"] == tokenizers.load(spec).digest
    raw = load_corpus(cfg.data, SEQ + 1)
    prepared_cfg = config([str(tmp_path / "prep")], spec)
    prep = load_corpus(prepared_cfg.data, SEQ + 1)
    assert list(raw.sources) == list(prep.sources) == ["code", "prose"]
    for name in raw.sources:
        assert prep.sources[name].origin == PREPARED
        assert isinstance(prep.sources[name].train, np.memmap)
        _same_split(raw.sources[name], prep.sources[name])
    for alpha in (1.0, 0.3):
        a, b = Sampler(raw, SEQ, 7, alpha), Sampler(prep, SEQ, 7, alpha)
        for _ in range(6):
            wa, wb = a.next_global_batch(16), b.next_global_batch(16)
            assert np.array_equal(wa, wb)
            for m in range(4):
                assert torch.equal(a.micro_batch(wa, m, 0, 1, 4), b.micro_batch(wb, m, 0, 1, 4))
        assert a.place(int(wa[0])) == b.place(int(wb[0]))
    # the same command again has nothing to do
    again = prepare.prepare(cfg, tmp_path / "prep", workers=0, progress=False)
    assert again.up_to_date


def test_resume_and_skipping_are_exact_on_a_prepared_corpus(corpus_dir, tmp_path: Path) -> None:
    _, paths = corpus_dir
    prepare.prepare(config(paths), tmp_path / "prep", workers=0, progress=False)
    corpus = load_corpus(config([str(tmp_path / "prep")]).data, SEQ + 1)
    for alpha in (1.0, 0.5):
        a = Sampler(corpus, SEQ, 3, alpha)
        for _ in range(5):
            a.next_global_batch(24)
        state = a.state_dict()
        rest = [a.next_global_batch(24) for _ in range(60)]  # past an epoch of the small source
        b = Sampler(corpus, SEQ, 3, alpha)
        b.load_state_dict(state)
        assert all(np.array_equal(x, b.next_global_batch(24)) for x in rest)
        c = Sampler(corpus, SEQ, 3, alpha)  # a rollback's skip is an addition
        c.skip(5 * 24 + 17)
        b = Sampler(corpus, SEQ, 3, alpha)
        b.load_state_dict(state)
        b.next_global_batch(17)
        assert np.array_equal(c.next_global_batch(24), b.next_global_batch(24))


def _arrays(obj, seen=None) -> list[np.ndarray]:
    """Every numpy array reachable from ``obj``'s attributes, containers and dataclasses."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, type(None))):
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, dict):
        items = list(obj.values()) + list(obj.keys())
    elif isinstance(obj, (list, tuple, set)):
        items = list(obj)
    elif (
        hasattr(obj, "__dict__")
        or hasattr(obj, "__slots__")
        or hasattr(obj, "__dataclass_fields__")
    ):
        names = list(getattr(obj, "__dict__", {})) + list(getattr(obj, "__slots__", ()))
        names += list(getattr(obj, "__dataclass_fields__", {}))
        items = [getattr(obj, n) for n in dict.fromkeys(names) if hasattr(obj, n)]
    else:
        return []
    return [a for item in items for a in _arrays(item, seen)]


def _in_memory_bytes(sampler: Sampler) -> int:
    def mapped(a: np.ndarray) -> bool:
        while a is not None:
            if isinstance(a, np.memmap):
                return True
            a = a.base if isinstance(a.base, np.ndarray) else None
        return False

    return sum(a.nbytes for a in _arrays(sampler) if not mapped(a))


def test_the_sampler_holds_no_array_that_grows_with_the_corpus(tmp_path: Path) -> None:
    held, windows = [], []
    for files in (10, 80):
        paths = write_corpus(tmp_path / f"c{files}", files)
        prepare.prepare(config(paths), tmp_path / f"p{files}", workers=0, progress=False)
        corpus = load_corpus(config([str(tmp_path / f"p{files}")]).data, SEQ + 1)
        sampler = Sampler(corpus, SEQ, 1, 0.5)
        for _ in range(3):  # drawing and locating must not build one either
            sampler.place(int(sampler.next_global_batch(32)[0]))
        held.append(_in_memory_bytes(sampler))
        windows.append(sampler.num_windows)
    assert windows[1] > 4 * windows[0]
    # the same few tables (a block of the mixture's draws, per-source counts) for both
    assert held[0] == held[1] and held[1] < 64 * 1024, held
    # and the same walk does see a raw corpus's in-memory stream (the check can fail)
    raw = load_corpus(config(write_corpus(tmp_path / "raw", 10)).data, SEQ + 1)
    assert _in_memory_bytes(Sampler(raw, SEQ, 1)) > 100_000


def test_tokenizers_round_trip(bpe: Path, tmp_path: Path) -> None:
    text = "def f(x):\n    return x + 1  # héllo ✓\n"
    trained = tokenizers.load(str(bpe))
    assert trained.eos_token == tokenizers.TRAINED_EOS and trained.vocab_size == 800
    ids = trained.encode(text)
    assert ids.dtype == np.uint16 and len(ids) < len(text.encode())  # merges were learnt
    assert trained.decode(ids) == text
    assert trained.decode(np.concatenate([ids, [trained.eos_id], ids])) == text + "\n" + text
    # a tokenizer.json made another way (a word-level vocabulary with </s>): any file works
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "</s>", "the", "cat", "sat", "."])}
    other = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import AddedToken

    other.add_special_tokens([AddedToken("</s>", special=True)])
    other.save(str(tmp_path / "word.json"))
    word = tokenizers.load(str(tmp_path / "word.json"))
    assert word.eos_id == 1 and word.vocab_size == 6
    assert word.encode("the cat sat").tolist() == [2, 3, 4]
    assert word.decode([2, 3, 1, 4]) == "the cat\nsat"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "tokenizer.json").write_bytes((tmp_path / "word.json").read_bytes())
    assert tokenizers.load(str(tmp_path / "model")).digest == word.digest  # a folder holding one
    # the model's vocabulary follows the tokenizer's, padded
    assert vocab_size(config([], str(bpe))) == 832
    assert vocab_size(config([], "bytes")) == 320


def test_a_run_keeps_its_tokenizer_and_refuses_another_on_resume(
    corpus_dir, bpe: Path, tmp_path: Path, capsys
) -> None:
    from tests.helpers import FAST, train_in_process
    from yoto import runstore
    from yoto.cli import main

    _, paths = corpus_dir
    prepare.prepare(config(paths, str(bpe)), tmp_path / "prep", workers=0, progress=False)
    args = [f"data.paths={json.dumps([str(tmp_path / 'prep')])}", f"data.tokenizer={bpe}"]
    args += [f"model.seq_len={SEQ}", "train.steps=4", "checkpoint.every=2", *FAST]
    sets = [x for a in args for x in ("--set", a)]
    run = train_in_process(tmp_path / "runs", "--metrics-addr", "0", *sets)
    copy = run / tokenizers.RUN_FILE
    assert copy.read_bytes() == bpe.read_bytes()
    manifest = runstore.read_manifest(run)
    assert manifest["tokenizer"]["digest"] == tokenizers.load(str(bpe)).digest
    assert manifest["tokenizer"]["vocab_size"] == 800
    # sampling reads the run's own copy, even once the original file is gone
    from yoto.trainer.offline import sample

    bpe_bytes = bpe.read_bytes()
    bpe.unlink()
    try:
        step, text = sample(run, "def ", tokens=8)
        assert step == 4 and isinstance(text, str)
    finally:
        bpe.write_bytes(bpe_bytes)
    # a prepared directory names its tokenizer; so does the run, for raw text too
    other = ["--set", f"data.paths={json.dumps(paths)}", "--set", "data.tokenizer=bytes"]
    rc = main(["train", "--resume", str(run), "--no-progress", "--metrics-addr", "0", *other])
    assert rc == 2
    err = capsys.readouterr().err
    assert "resume refused" in err and "trained with tokenizer" in err, err[-600:]
    assert runstore.read_manifest(run)["status"] == "finished"


def test_an_interrupted_prepare_is_never_read_and_resumes(
    corpus_dir, tmp_path: Path, monkeypatch
) -> None:
    _, paths = corpus_dir
    cfg, out = config(paths), tmp_path / "prep"
    calls = {"n": 0}
    real = shards.SourceWriter.commit

    def dies_on_the_second_source(self, counts, extra):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, counts, extra)

    monkeypatch.setattr(shards.SourceWriter, "commit", dies_on_the_second_source)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(cfg, out, workers=0, progress=False)
    monkeypatch.undo()
    assert not (out / shards.MANIFEST).exists()
    assert not list(out.rglob("*.bin")) or all(
        (p.parent / shards.DONE).exists() for p in out.rglob("*.bin")
    ), "a token file without its done record"
    with pytest.raises(DataError, match="incomplete prepared directory.*run it again"):
        load_corpus(config([str(out)]).data, SEQ + 1)
    # another config is refused on it; the same one resumes, keeping the finished source
    with pytest.raises(DataError, match="other settings.*val_fraction.*--force"):
        prepare.prepare(
            config(paths, "bytes", "data.val_fraction=0.1"), out, workers=0, progress=False
        )
    done = sorted(p.parent.name for p in out.rglob(shards.DONE))
    assert done == ["code"]
    prepare.prepare(cfg, out, workers=0, progress=False)
    clean = tmp_path / "clean"
    prepare.prepare(cfg, clean, workers=0, progress=False)
    a = load_corpus(config([str(out)]).data, SEQ + 1)
    b = load_corpus(config([str(clean)]).data, SEQ + 1)
    for name in b.sources:
        _same_split(a.sources[name], b.sources[name])


def test_bad_prepared_input_is_a_clear_error(corpus_dir, bpe: Path, tmp_path: Path) -> None:
    _, paths = corpus_dir
    out = tmp_path / "prep"
    prepare.prepare(config(paths), out, workers=0, progress=False)
    use = [str(out)]
    # made with another tokenizer than the config names
    with pytest.raises(DataError, match="prepared with tokenizer 'bytes'.*data.tokenizer is"):
        load_corpus(config(use, str(bpe)).data, SEQ + 1)
    # a vocabulary larger than the model's embedding
    with pytest.raises(ConfigError, match="smaller than the vocabulary of data.tokenizer"):
        vocab_size(config(use, str(bpe), "model.vocab_size=512"))
    # a document index that does not match its token file
    docs = out / shards.SOURCES / "code" / shards.DOCS
    good = docs.read_bytes()
    starts = np.fromfile(docs, dtype="<i8")
    starts[3] = starts[1]
    starts.tofile(docs)
    with pytest.raises(DataError, match="does not match its token file"):
        load_corpus(config(use).data, SEQ + 1)
    docs.write_bytes(good)
    # a truncated token file
    train = out / shards.SOURCES / "prose" / shards.TRAIN
    data = train.read_bytes()
    train.write_bytes(data[:-10])
    with pytest.raises(DataError, match=r"prose/train.bin.*truncated or not this directory's"):
        load_corpus(config(use).data, SEQ + 1)
    train.write_bytes(data)
    # a sequence longer than the split was made for
    with pytest.raises(DataError, match="validation tokens; a sequence needs"):
        load_corpus(config(use).data, 100_000)
    # raw text given twice under one name, and an empty source
    with pytest.raises(DataError, match="comes from two data.paths entries"):
        load_corpus(config([*use, paths[0]]).data, SEQ + 1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(DataError, match="holds no text: its files are empty"):
        load_corpus(config([f"e={tmp_path / 'empty'}"]).data, SEQ + 1)
    # preparing what is already tokenized
    with pytest.raises(DataError, match="already tokenized"):
        prepare.prepare(config(use), tmp_path / "again", workers=0, progress=False)
    # a tokenizer file that is not one, and a token id outside the vocabulary
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="not a Hugging Face tokenizer.json"):
        tokenizers.load(str(tmp_path / "bad.json"))
    assert megatron  # the Megatron reader's own bad inputs: test_megatron.py


def test_a_megatron_dataset_trains_with_its_documents_and_tokens(tmp_path: Path) -> None:
    """Documents as BLOOM's data ship them: written by megatron-core's own builder with an
    end-of-document token after each (preprocess_data.py --append-eod), read as a source."""
    torch_ = pytest.importorskip("torch")
    mi = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, size=int(rng.integers(20, 400))) for _ in range(60)]
    builder = mi.IndexedDatasetBuilder(str(tmp_path / "web_text_document.bin"), dtype=np.uint16)
    for doc in docs:
        builder.add_item(torch_.tensor(np.append(doc, tokenizers.EOS), dtype=torch_.int64))
        builder.end_document()
    builder.finalize(str(tmp_path / "web_text_document.idx"))
    cfg = config([f"web={tmp_path / 'web_text_document'}"], "bytes", "data.val_fraction=0.1")
    corpus = load_corpus(cfg.data, SEQ + 1)
    web = corpus.sources["web"]
    joined = np.concatenate([np.append(d, tokenizers.EOS) for d in docs])
    train, val = np.asarray(web.train), np.asarray(web.val)
    assert np.array_equal(np.concatenate([train, val]), joined)  # every token, in order
    # the validation split is the last documents, whole, about val_fraction of the tokens
    starts = np.concatenate([[0], np.cumsum([len(d) + 1 for d in docs])[:-1]])
    assert len(train) in starts and web.train_docs + web.val_docs == 60
    assert 0.1 * len(joined) <= len(val) < 0.1 * len(joined) + 401
    sampler = Sampler(corpus, SEQ, 5)
    windows = sampler.next_global_batch(32)
    batch = sampler.micro_batch(windows, 0, 0, 1, 32)
    for row, w in zip(batch.numpy(), windows, strict=True):
        place = sampler.place(int(w))
        d = int(place.doc_id.split("#")[1])
        assert place.doc_id == f"web_text_document#{d}"
        assert np.array_equal(row[: len(docs[d]) - place.offset], docs[d][place.offset :][:65])
    # token ids the configured tokenizer does not have: data made with another tokenizer
    big = mi.IndexedDatasetBuilder(str(tmp_path / "wide.bin"), dtype=np.int32)
    big.add_item(torch_.tensor(rng.integers(0, 250_000, size=5000), dtype=torch_.int64))
    big.end_document()
    big.finalize(str(tmp_path / "wide.idx"))
    with pytest.raises(DataError, match="outside the 257 ids of data.tokenizer 'bytes'"):
        load_corpus(config([str(tmp_path / "wide")]).data, SEQ + 1)


def test_training_on_a_prepared_corpus_resumes_bit_exactly(
    corpus_dir, bpe: Path, tmp_path: Path
) -> None:
    from tests.helpers import FAST, train_in_process
    from yoto import catalog, runstore

    _, paths = corpus_dir
    prepare.prepare(config(paths, str(bpe)), tmp_path / "prep", workers=0, progress=False)
    base = [f"data.paths={json.dumps([str(tmp_path / 'prep')])}", f"data.tokenizer={bpe}"]
    base += [f"model.seq_len={SEQ}", "checkpoint.every=4", "optim.decay_steps=8", *FAST]

    def sets(*extra: str) -> list[str]:
        return ["--metrics-addr", "0", *[x for a in (*base, *extra) for x in ("--set", a)]]

    whole = train_in_process(tmp_path / "a", *sets("train.steps=8"))
    part = train_in_process(tmp_path / "b", *sets("train.steps=4"))
    train_in_process(tmp_path / "b", "--resume", str(part), *sets("train.steps=8"))
    a, b = runstore.read_metrics(whole).to_pydict(), runstore.read_metrics(part).to_pydict()
    loss = catalog.TRAIN_LOSS.name
    assert b["step"] == list(range(1, 9)) and a[loss] == b[loss]  # bit-exact
