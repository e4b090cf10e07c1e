import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from yoto.config import DataConfig
from yoto.errors import DataError
from yoto.trainer.data import tokenizer
from yoto.trainer.data.corpus import Document, load_corpus, split_documents


def _split(name, docs, val_fraction, min_tokens):
    return split_documents(name, docs, val_fraction, min_tokens, tokenizer.ByteTokenizer())


def test_tokenizer_round_trip() -> None:
    text = "héllo, wörld ✓\n"
    ids = tokenizer.encode(text)
    assert ids.dtype == np.uint16 and ids.max() < 256
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([104, 105, tokenizer.EOS, 300]) == "hi\n"
    assert tokenizer.padded_vocab_size() == 320


def test_default_corpus_is_the_standard_library() -> None:
    corpus = load_corpus(DataConfig(max_bytes_per_source=3_000_000), min_tokens=129)
    assert set(corpus.sources) == {"code", "prose"}
    for split in corpus.sources.values():
        assert len(split.train) > 100_000 and len(split.val) >= 129
    code = corpus.sources["code"]
    assert b"def " in tokenizer.decode(code.train[:200_000]).encode()


def test_validation_documents_are_held_out() -> None:
    docs = [Document("s", f"doc{i}", f"document number {i} ".encode() * 20) for i in range(50)]
    split = _split("s", docs, val_fraction=0.1, min_tokens=9)
    assert split.val_docs >= 1 and split.train_docs + split.val_docs == 50
    train_text = tokenizer.decode(split.train)
    val_text = tokenizer.decode(split.val)
    val_numbers = {w for w in val_text.split() if w.isdigit()}
    assert val_numbers and not any(f"number {n} " in train_text for n in val_numbers)
    # which documents are held out depends on their ids, not on the order they were read
    # (the first document read always trains)
    again = _split("s", docs[:1] + docs[:0:-1], val_fraction=0.1, min_tokens=9)
    held = set(tokenizer.decode(split.val).split("\n")) - {""}
    assert set(tokenizer.decode(again.val).split("\n")) - {""} == held


def test_single_document_source_splits_its_tail() -> None:
    split = _split("one", [Document("one", "x", b"a" * 1000)], 0.1, min_tokens=17)
    assert len(split.train) + len(split.val) == 1001 and len(split.val) >= 17


def test_user_folder_file_jsonl_and_parquet(tmp_path: Path) -> None:
    folder = tmp_path / "essays"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha " * 400)
    (folder / "b.md").write_text("beta " * 400)
    (folder / "skip.bin").write_bytes(b"\0" * 10)
    jsonl = tmp_path / "mixed.jsonl"
    jsonl.write_text(
        "\n".join(
            json.dumps({"text": f"{lang} text " * 300, "source": lang})
            for lang in ("en", "fr", "en", "fr")
        )
        + "\n"
    )
    pq.write_table(pa.table({"text": ["parquet row " * 300] * 3}), tmp_path / "rows.parquet")
    cfg = DataConfig(paths=[str(folder), str(jsonl), f"named={tmp_path / 'rows.parquet'}"])
    corpus = load_corpus(cfg, min_tokens=65)
    assert set(corpus.sources) == {"essays", "en", "fr", "named"}
    assert corpus.sources["essays"].train_docs + corpus.sources["essays"].val_docs == 2


def test_glob(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"part{i}.txt").write_text("glob text " * 200)
    corpus = load_corpus(DataConfig(paths=[f"g={tmp_path}/part*.txt"]), min_tokens=65)
    assert list(corpus.sources) == ["g"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: str(p / "missing"), "does not exist"),
        (lambda p: str(p / "none*.txt"), "matches no files"),
        (lambda p: (p / "empty").mkdir() or str(p / "empty"), "holds no files of the types"),
        (
            lambda p: (
                (p / "x.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
                and str(p / "x.jsonl")
            ),
            r"x.jsonl:2: expected a JSON object with a 'text' field",
        ),
        (
            lambda p: (p / "y.jsonl").write_text('{"text": 3}\n') and str(p / "y.jsonl"),
            "must be a string",
        ),
        (
            lambda p: (p / "z.jsonl").write_text("not json\n") and str(p / "z.jsonl"),
            "z.jsonl:1: not a JSON object",
        ),
        (
            lambda p: (
                pq.write_table(pa.table({"body": ["x"]}), p / "t.parquet") or str(p / "t.parquet")
            ),
            "has no 'text' column.*its columns: body",
        ),
        (
            lambda p: (p / "fake.parquet").write_text("nope") and str(p / "fake.parquet"),
            "not a readable Parquet file",
        ),
        (
            lambda p: (p / "small.txt").write_text("tiny") and str(p / "small.txt"),
            "data source 'small' has 5 tokens; it needs at least",
        ),
    ],
)
def test_bad_data_is_a_clear_error(tmp_path: Path, setup, message: str) -> None:
    path = setup(tmp_path)
    with pytest.raises(DataError, match=message):
        load_corpus(DataConfig(paths=[path]), min_tokens=129)


def test_a_binary_file_is_not_text(tmp_path: Path) -> None:
    """An executable renamed data.txt is refused, named, with what text would look like;
    a folder holding one says which file."""
    exe = tmp_path / "data.txt"
    exe.write_bytes(Path(sys.executable).resolve().read_bytes()[: 256 * 1024])
    with pytest.raises(DataError, match=r"'.*data.txt' is not text: .* NUL/control bytes"):
        load_corpus(DataConfig(paths=[str(exe)]), min_tokens=65)
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("plain text " * 200)
    (folder / "b.txt").write_bytes("utf-16 text ".encode("utf-16") * 100)
    with pytest.raises(DataError, match=r"b.txt' is not text.*convert UTF-16"):
        load_corpus(DataConfig(paths=[str(folder)]), min_tokens=65)


@pytest.mark.parametrize(
    "data",
    [
        "plain ASCII prose\n\twith a tab\f and a form feed " * 50,
        "UTF-8: café, Größe, 東京, emoji 🙂 " * 50,
        "\x1b[1mterminal colours\x1b[0m in a log " * 50,
    ],
)
def test_text_is_text(tmp_path: Path, data: str) -> None:
    (tmp_path / "t.txt").write_text(data, encoding="utf-8")
    latin = tmp_path / "latin1.txt"  # a byte tokenizer trains on Latin-1 prose as before
    latin.write_bytes("crème brûlée à la française, naïve ".encode("latin-1") * 50)
    corpus = load_corpus(DataConfig(paths=[str(tmp_path / "t.txt"), str(latin)]), min_tokens=65)
    assert sorted(corpus.sources) == ["latin1", "t"]
