"""The Megatron indexed-dataset reader: datasets written by megatron-core's own builder, and
every malformed input, written to the published layout by the small writer below."""

from __future__ import annotations

import dataclasses
import pickle
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from yoto.errors import DataError
from yoto.trainer.data import megatron
from yoto.trainer.data.megatron import IndexedDataset

Doc = list[list[int]]  # a document: its sequences, each a list of tokens
CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4, np.dtype(np.uint8): 1}


# --- a writer to the published layout (megatron/core/datasets/indexed_dataset.py) ---------


@dataclasses.dataclass
class Layout:
    """The parts of a PREFIX.idx / PREFIX.bin pair, to be damaged one at a time."""

    tokens: np.ndarray
    lengths: np.ndarray  # int32 per sequence
    pointers: np.ndarray  # int64 byte offset per sequence
    documents: np.ndarray  # int64 first sequence per document, then the sequence count
    code: int
    magic: bytes = b"MMIDIDX\x00\x00"
    version: int = 1
    modes: np.ndarray | None = None  # int8 per sequence (multimodal)
    sequences: int | None = None  # header fields, when they should lie
    entries: int | None = None

    def write(self, prefix: Path) -> Path:
        head = self.magic + struct.pack("<QB", self.version, self.code)
        head += struct.pack(
            "<QQ",
            len(self.lengths) if self.sequences is None else self.sequences,
            len(self.documents) if self.entries is None else self.entries,
        )
        body = [self.lengths.astype("<i4"), self.pointers.astype("<i8")]
        body.append(self.documents.astype("<i8"))
        if self.modes is not None:
            body.append(self.modes.astype("i1"))
        prefix.with_name(prefix.name + ".idx").write_bytes(
            head + b"".join(a.tobytes() for a in body)
        )
        prefix.with_name(prefix.name + ".bin").write_bytes(self.tokens.tobytes())
        return prefix


def layout(docs: list[Doc], dtype: type = np.uint16) -> Layout:
    sequences = [np.asarray(s, dtype=dtype) for doc in docs for s in doc]
    lengths = np.array([len(s) for s in sequences], dtype=np.int32)
    pointers = (np.cumsum(lengths, dtype=np.int64) - lengths) * np.dtype(dtype).itemsize
    documents = np.cumsum([0] + [len(doc) for doc in docs], dtype=np.int64)
    tokens = np.concatenate(sequences) if sequences else np.zeros(0, dtype)
    return Layout(tokens, lengths, pointers, documents, CODES[np.dtype(dtype)])


def random_docs(seed: int, n: int, vocab: int, multi: bool) -> list[Doc]:
    """Documents of random lengths; with ``multi``, several sequences per document, an
    empty sequence and a document without sequences among them."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        parts = int(rng.integers(1, 4)) if multi else 1
        docs.append(
            [rng.integers(0, vocab, int(rng.integers(1, 30))).tolist() for _ in range(parts)]
        )
    if multi:
        docs[3] = []  # a document of no sequences (an empty line under --split-sentences)
        docs[5][0] = []  # an empty sequence
    return docs


def expected(docs: list[Doc]) -> list[np.ndarray]:
    return [np.array([t for s in doc for t in s], dtype=np.int64) for doc in docs]


def assert_reads(ds: IndexedDataset, docs: list[Doc]) -> None:
    want = expected(docs)
    assert len(ds) == len(want)
    assert ds.start(len(ds)) == len(ds.tokens) == sum(len(w) for w in want)
    for d, w in enumerate(want):
        got = ds.tokens[ds.start(d) : ds.start(d + 1)]
        np.testing.assert_array_equal(got, w)


def build_with_megatron(prefix: Path, docs: list[Doc], dtype: type, **kw: bool) -> Path:
    """Write ``docs`` with megatron-core's own builder (add_item per sequence, then
    end_document; a one-sequence document through add_document)."""
    torch = pytest.importorskip("torch")
    mi = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    builder = mi.IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype, **kw)
    for i, doc in enumerate(docs):
        if i % 4 == 1 and len(doc) == 1 and not kw.get("multimodal"):
            # an array, not a tensor: add_document calls numpy.array() on it, which warns
            # for a tensor under numpy 2 (and it mishandles multimodal without modes)
            builder.add_document(np.asarray(doc[0], dtype=np.int64), [len(doc[0])])
            continue
        for seq in doc:
            builder.add_item(torch.tensor(seq, dtype=torch.int64))
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")
    return prefix


# --- datasets written by megatron-core ----------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
@pytest.mark.parametrize("multi", [False, True], ids=["one-seq", "multi-seq"])
def test_reads_what_megatron_core_wrote(tmp_path: Path, dtype: type, multi: bool) -> None:
    vocab = 60_000 if dtype is np.uint16 else 250_000  # int32: BLOOM's 250k vocabulary
    docs = random_docs(1 + multi, 40, vocab, multi)
    prefix = build_with_megatron(tmp_path / "corpus_text_document", docs, dtype)
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.dtype(dtype)
    assert isinstance(ds.tokens, np.memmap) and ds.tokens.dtype == np.dtype(dtype)
    assert_reads(ds, docs)
    assert ds.id(7) == "corpus_text_document#7"
    # and megatron-core's own reader sees the same documents
    mi = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    theirs = mi.IndexedDataset(str(prefix))
    bounds = theirs.document_indices
    assert len(bounds) - 1 == len(ds)
    for d in range(len(ds)):
        parts = [theirs[i] for i in range(bounds[d], bounds[d + 1])]
        got = np.concatenate(parts) if parts else np.zeros(0, dtype)
        np.testing.assert_array_equal(ds.tokens[ds.start(d) : ds.start(d + 1)], got)


def test_the_layout_writer_matches_megatron_core(tmp_path: Path) -> None:
    """The writer the failure tests use writes byte for byte what megatron-core writes."""
    docs = random_docs(3, 25, 60_000, multi=True)
    theirs = build_with_megatron(tmp_path / "theirs", docs, np.uint16)
    ours = layout(docs, np.uint16).write(tmp_path / "ours")
    for ext in (".idx", ".bin"):
        assert Path(f"{ours}{ext}").read_bytes() == Path(f"{theirs}{ext}").read_bytes()


def test_a_multimodal_dataset_from_megatron_core_is_refused(tmp_path: Path) -> None:
    docs = random_docs(4, 10, 1000, multi=False)
    prefix = build_with_megatron(tmp_path / "mm", docs, np.int32, multimodal=True)
    with pytest.raises(DataError, match=r"mm\.idx.*multimodal.*text token datasets only"):
        IndexedDataset(prefix)


# --- reading, by the published layout -----------------------------------------------------


def test_reads_documents_of_several_sequences(tmp_path: Path) -> None:
    docs = random_docs(5, 30, 250, multi=True)
    ds = IndexedDataset(layout(docs, np.uint8).write(tmp_path / "d"))
    assert ds.dtype == np.dtype(np.uint8)
    assert_reads(ds, docs)


def test_find_and_start_agree_with_brute_force(tmp_path: Path) -> None:
    docs = random_docs(6, 60, 60_000, multi=True)
    docs[0] = []  # empty documents first, last and in a run: find() gives the one with tokens
    docs[20:22] = [[], [[]]]
    docs[-1] = []
    ds = IndexedDataset(layout(docs).write(tmp_path / "d"))
    sizes = [len(w) for w in expected(docs)]
    starts = np.concatenate(([0], np.cumsum(sizes)))
    assert [ds.start(d) for d in range(len(ds) + 1)] == starts.tolist()
    for offset in range(len(ds.tokens)):
        want = max(d for d in range(len(ds)) if starts[d] <= offset)
        assert ds.find(offset) == want
        assert ds.start(want) <= offset < ds.start(want + 1)
    for bad in (-1, len(ds.tokens)):
        with pytest.raises(IndexError):
            ds.find(bad)
    with pytest.raises(IndexError):
        ds.start(len(ds) + 1)
    with pytest.raises(IndexError):
        ds.id(len(ds))


def test_prefix_bin_or_idx_name_the_same_dataset(tmp_path: Path) -> None:
    prefix = layout(random_docs(7, 5, 100, multi=False)).write(tmp_path / "v1.2_text")
    for path in (prefix, f"{prefix}.bin", Path(f"{prefix}.idx")):
        assert IndexedDataset.exists(path)
        ds = IndexedDataset(path)
        assert ds.prefix == prefix and ds.id(0) == "v1.2_text#0"
    assert not IndexedDataset.exists(tmp_path / "nothing")
    Path(f"{prefix}.bin").unlink()
    assert not IndexedDataset.exists(prefix)


def test_holds_no_in_memory_array_that_grows_with_the_corpus(tmp_path: Path) -> None:
    n = 200_000  # index arrays of a few MB: a copy of one would show
    rng = np.random.default_rng(8)
    lengths = rng.integers(0, 6, n)
    tokens = rng.integers(0, 60_000, int(lengths.sum())).astype(np.uint16)
    pointers = np.concatenate(([0], np.cumsum(lengths[:-1]))) * 2
    documents = np.concatenate((np.arange(0, n, 2), [n]))  # two sequences per document
    ds = IndexedDataset(
        Layout(tokens, lengths, pointers, documents, code=8).write(tmp_path / "big")
    )
    for name, value in vars(ds).items():
        if isinstance(value, np.ndarray):
            assert isinstance(value, np.memmap) or value.size <= 16, name
    tracemalloc.start()
    try:
        for offset in rng.integers(0, len(ds.tokens), 200):
            d = ds.find(int(offset))
            assert ds.start(d) <= offset < ds.start(d + 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024  # np.searchsorted on the unaligned maps would copy them (MBs)
    # pickled by path, not by content
    blob = pickle.dumps(ds)
    assert len(blob) < 1024
    again = pickle.loads(blob)
    assert len(again) == len(ds) and again.find(12345) == ds.find(12345)
    np.testing.assert_array_equal(again.tokens[-50:], ds.tokens[-50:])


def test_the_scan_works_across_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(megatron, "_CHECK_CHUNK", 3)
    docs = random_docs(9, 20, 100, multi=True)
    assert_reads(IndexedDataset(layout(docs).write(tmp_path / "ok")), docs)
    bad = layout(docs)
    bad.pointers[7:] += 2  # sequence 7 (in the third chunk) starts a token late
    with pytest.raises(DataError, match=r"sequence 7 starts at byte"):
        IndexedDataset(bad.write(tmp_path / "bad"))
    bad = layout(docs)
    bad.documents[10] = bad.documents[8]  # document 9 starts after document 10
    with pytest.raises(DataError, match=r"decreasing document indices: document 10 "):
        IndexedDataset(bad.write(tmp_path / "bad2"))


# --- what is refused, and how it is said --------------------------------------------------

GOOD: list[Doc] = [[[1, 2, 3]], [[4, 5], [6]], [[7, 8, 9, 10]]]


def _damage(part: Layout, how: str, prefix: Path) -> None:
    """Write ``part`` damaged by ``how``."""
    if how == "magic":
        part.magic = b"PK\x03\x04xxxxx"
    elif how == "legacy":
        part.magic = b"TNTIDX\x00\x00\x00"
    elif how == "version":
        part.version = 2
    elif how == "code":
        part.code = 9
    elif how == "float64":
        part.code = 6
    elif how == "float32":
        part.code = 7
    elif how == "doc-start":
        part.documents[0] = 1
    elif how == "doc-end":
        part.documents[-1] = 3
    elif how == "doc-decreasing":
        part.documents[1:3] = [2, 1]
    elif how == "no-entries":
        part.documents = part.documents[:0]
    elif how == "pointers":
        part.pointers[2] += 2
    elif how == "pointer-start":
        part.pointers += 4
    elif how == "negative":
        part.lengths[1] = -1
    elif how == "modes":
        part.modes = np.zeros(len(part.lengths), np.int8)
    part.write(prefix)
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    if how == "idx-short":
        idx.write_bytes(idx.read_bytes()[:-5])
    elif how == "idx-header":
        idx.write_bytes(idx.read_bytes()[:20])
    elif how == "idx-long":
        idx.write_bytes(idx.read_bytes() + b"\x00" * 3)
    elif how == "foreign-idx":
        idx.write_text('{"not": "an index"}\n')
    elif how == "bin-short":
        bin_.write_bytes(bin_.read_bytes()[:-2])
    elif how == "bin-long":
        bin_.write_bytes(bin_.read_bytes() + b"\x01\x00" * 10)
    elif how == "no-bin":
        bin_.unlink()
    elif how == "no-idx":
        idx.unlink()
    elif how == "no-both":
        bin_.unlink()
        idx.unlink()


REFUSALS = {
    "no-bin": r"d\.bin' is missing \(d\.idx is there\).*PREFIX\.bin \+ PREFIX\.idx",
    "no-idx": r"d\.idx' is missing \(d\.bin is there\)",
    "no-both": r"d\.bin' is missing \(so is d\.idx\)",
    "magic": r"d\.idx' is not a Megatron MMIDIDX index: it starts with b'PK",
    "foreign-idx": r"d\.idx' is not a Megatron MMIDIDX index",
    "legacy": r"d\.idx' is an index of Megatron's older non-mmap format.*--dataset-impl mmap",
    "version": r"d\.idx' is a Megatron MMIDIDX index of version 2; yoto reads version 1",
    "code": r"d\.idx' has token dtype code 9: unknown; valid codes are 1 \(uint8\), "
    r"2 \(int8\), 3 \(int16\), 4 \(int32\), 5 \(int64\), 8 \(uint16\)",
    "float64": r"dtype code 6: float64 \(tokens must be integers\); valid codes are 1 ",
    "float32": r"dtype code 7: float32 \(tokens must be integers\)",
    "idx-header": r"d\.idx' is shorter than its header: 20 bytes.*is 34",
    "idx-short": r"d\.idx' is shorter than its header says: 4 sequences and 4 document "
    r"indices need 114 bytes, the file has 109",
    "idx-long": r"d\.idx' is longer than its header says.*need 114 bytes, the file has 117",
    "modes": r"d\.idx' is a multimodal Megatron index \(it ends with 4 sequence modes\)",
    "no-entries": r"d\.idx' has no document indices; they must start at 0 and end at the "
    r"sequence count \(4\)",
    "doc-start": r"document indices from 1 to 4; they must start at 0 and end at the "
    r"sequence count \(4\)",
    "doc-end": r"document indices from 0 to 3; they must start at 0",
    "doc-decreasing": r"decreasing document indices: document 2 starts at sequence 1, "
    r"before the previous document \(2\); they must never decrease",
    "pointers": r"inconsistent sequence pointers: sequence 2 starts at byte 12, but the "
    r"sequences before it end at byte 10; each sequence must start where",
    "pointer-start": r"sequence 0 starts at byte 4, but the sequences before it end at byte 0",
    "negative": r"gives sequence 1 a negative length \(-1\)",
    "bin-short": r"d\.bin' does not match d\.idx: it holds 18 bytes but the index's "
    r"sequences end at byte 20 \(10 uint16 tokens\), so the \.bin is truncated",
    "bin-long": r"it holds 40 bytes but the index's sequences end at byte 20.*longer than "
    r"its index says or belongs to another dataset",
}


@pytest.mark.parametrize("how", list(REFUSALS))
def test_refuses_with_a_message_that_says_what_is_wrong(tmp_path: Path, how: str) -> None:
    _damage(layout(GOOD), how, tmp_path / "d")
    with pytest.raises(DataError, match=REFUSALS[how]):
        IndexedDataset(tmp_path / "d")


def test_the_undamaged_layout_reads(tmp_path: Path) -> None:
    """The refusal tests' base case is valid: each refusal is its one damage."""
    _damage(layout(GOOD), "none", tmp_path / "d")
    assert_reads(IndexedDataset(tmp_path / "d"), GOOD)


@pytest.mark.parametrize(
    "docs", [[], [[]], [[[]], [[], []]]], ids=["no-documents", "no-sequences", "no-tokens"]
)
def test_refuses_an_empty_dataset(tmp_path: Path, docs: list[Doc]) -> None:
    layout(docs).write(tmp_path / "e")
    with pytest.raises(DataError, match=r"e(\.idx)?' is empty: .*needs at least one token"):
        IndexedDataset(tmp_path / "e")
