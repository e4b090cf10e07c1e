"""Training text as token streams: one per source, split into train and validation.

``data.paths`` entries are of three kinds, freely mixed (a source name may appear once):

- **raw text** (files, folders, JSONL, Parquet; the standard library when empty): read and
  tokenized at start-up into memory, for small corpora;
- **prepared directories** written by ``yoto data prepare``: memory-mapped token files and
  document indexes, opened in constant time and memory;
- **Megatron indexed datasets** (``PREFIX.bin`` + ``PREFIX.idx``), memory-mapped likewise.

Each source is one token stream (documents joined by EOS) with its document index. Raw
text and prepared directories are split by the same rule (:class:`SplitBuilder`), so a
prepared directory and the files it came from give the same streams: a document is held
out for validation when a stable hash of its id falls below ``data.val_fraction`` (the
source's first document always trains); if that leaves less than one sequence of
validation text, the training stream's tail is held out instead. A Megatron dataset's
validation split is its last documents (about ``val_fraction`` of its tokens), as
Megatron's own ``--split`` takes contiguous ranges. Validation text is never trained on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from yoto.config import DataConfig
from yoto.errors import DataError

from . import tokenizer as tokenizers
from .documents import Document, expand, named, source_name, stdlib_documents, user_documents
from .tokenizer import Tokenizer

TEXT, PREPARED, MEGATRON = "text", "prepared", "megatron"  # where a source's tokens come from
ENCODE_CHUNK_BYTES = 1 << 22  # documents are tokenized in batches of about this much text


class DocIndex(Protocol):
    """The documents of a training stream: where each starts (token offset) and its id."""

    def __len__(self) -> int: ...
    def start(self, d: int) -> int: ...
    def find(self, offset: int) -> int: ...  # the document holding token ``offset``
    def id(self, d: int) -> str: ...


@dataclass(frozen=True)
class ArrayDocs:
    """A document index held as an int64 array of starts (in memory or memory-mapped) and
    a sequence of ids (a list, or an :class:`IdTable` over a file)."""

    starts: np.ndarray
    ids: Sequence[str]

    def __len__(self) -> int:
        return len(self.starts)

    def start(self, d: int) -> int:
        return int(self.starts[d])

    def find(self, offset: int) -> int:
        return int(np.searchsorted(self.starts, offset, side="right")) - 1

    def id(self, d: int) -> str:
        return self.ids[d]


@dataclass(frozen=True)
class FirstDocs:
    """The first ``n`` documents of another index (a Megatron dataset's training part)."""

    inner: DocIndex
    n: int

    def __len__(self) -> int:
        return self.n

    def start(self, d: int) -> int:
        return self.inner.start(d)

    def find(self, offset: int) -> int:
        return min(self.inner.find(offset), self.n - 1)

    def id(self, d: int) -> str:
        return self.inner.id(d)


@dataclass
class SourceSplit:
    name: str
    train: np.ndarray  # token ids, documents joined by EOS (an array or a memory map)
    val: np.ndarray
    train_docs: int = 0
    val_docs: int = 0
    docs: DocIndex | None = None  # the training stream's documents; None when not known
    origin: str = TEXT


@dataclass
class Corpus:
    sources: dict[str, SourceSplit] = field(default_factory=dict)
    tokenizer: str = tokenizers.BYTES  # digest of the tokenizer the streams were made with

    def token_counts(self) -> dict[str, dict[str, int]]:
        return {
            s.name: {"train_tokens": len(s.train), "val_tokens": len(s.val)}
            for s in self.sources.values()
        }


# --- the split ----------------------------------------------------------------------------


def held_out(doc_id: str, val_fraction: float) -> bool:
    """Whether a document is validation text: a stable hash of its id below the fraction.
    A document's fate never depends on the others (adding data moves no document)."""
    digest = hashlib.sha1(doc_id.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") < val_fraction * 2.0**64


class Sink(Protocol):
    """Where a token stream is written: memory (raw text) or a file (prepare)."""

    size: int  # tokens written

    def write(self, ids: np.ndarray) -> None: ...
    def tail(self, n: int) -> np.ndarray: ...
    def truncate(self, n: int) -> None: ...


class MemorySink:
    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype
        self.parts: list[np.ndarray] = []
        self.size = 0

    def write(self, ids: np.ndarray) -> None:
        self.parts.append(np.asarray(ids, dtype=self.dtype))
        self.size += len(ids)

    def array(self) -> np.ndarray:
        self.parts = [np.concatenate(self.parts)] if self.parts else []
        return self.parts[0] if self.parts else np.empty(0, dtype=self.dtype)

    def tail(self, n: int) -> np.ndarray:
        return self.array()[self.size - n :].copy()

    def truncate(self, n: int) -> None:
        self.parts, self.size = [self.array()[:n]], n


class DocSink(Protocol):
    """Where a training stream's document index is written: memory or files."""

    count: int

    def add(self, start: int, doc_id: str) -> None: ...
    def keep_before(self, cut: int) -> None: ...  # drop the documents starting at/after cut


class MemoryDocs:
    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ids: list[str] = []
        self.count = 0

    def add(self, start: int, doc_id: str) -> None:
        self.starts.append(start)
        self.ids.append(doc_id)
        self.count += 1

    def keep_before(self, cut: int) -> None:
        kept = int(np.searchsorted(self.starts, cut, side="left"))
        self.starts, self.ids, self.count = self.starts[:kept], self.ids[:kept], kept

    def index(self) -> ArrayDocs:
        return ArrayDocs(np.asarray(self.starts, dtype=np.int64), self.ids)


@dataclass
class SplitCounts:
    train_tokens: int
    val_tokens: int
    train_docs: int
    val_docs: int


class SplitBuilder:
    """The train/validation split of one source, fed its documents in corpus order.
    The one rule for raw text and ``yoto data prepare`` (module docstring)."""

    def __init__(
        self,
        name: str,
        *,
        val_fraction: float,
        min_tokens: int,
        eos_id: int,
        dtype: np.dtype,
        train: Sink,
        val: Sink,
        docs: DocSink | None = None,
    ) -> None:
        self.name, self.val_fraction, self.min_tokens = name, val_fraction, min_tokens
        self.eos = np.array([eos_id], dtype=dtype)
        self.train, self.val = train, val
        self.docs: DocSink = docs if docs is not None else MemoryDocs()
        self.val_docs = 0

    def add(self, doc_id: str, ids: np.ndarray) -> None:
        if self.docs.count and held_out(doc_id, self.val_fraction):
            self.val.write(ids)
            self.val.write(self.eos)
            self.val_docs += 1
            return
        self.docs.add(self.train.size, doc_id)
        self.train.write(ids)
        self.train.write(self.eos)

    def finish(self) -> SplitCounts:
        total, need = self.train.size + self.val.size, self.min_tokens
        if total < 2 * need:
            raise DataError(
                f"data source {self.name!r} has {total:,} tokens; it needs at least "
                f"{2 * need:,} (model.seq_len + 1 each for training and validation)"
            )
        if self.val.size < need:  # too little held out: hold out the training tail too
            want = max(need, int(total * self.val_fraction))
            move = min(want - self.val.size, self.train.size - need)
            cut = self.train.size - move
            self.val.write(self.train.tail(move))
            self.train.truncate(cut)
            self.docs.keep_before(cut)
        return SplitCounts(self.train.size, self.val.size, self.docs.count, self.val_docs)


# --- documents to tokens --------------------------------------------------------------------


def capped(docs: Iterable[Document], cap: int | None) -> Iterator[Document]:
    """Non-empty documents, at most ``cap`` bytes per source (data.max_bytes_per_source:
    the document that crosses the cap is the source's last)."""
    sizes: dict[str, int] = {}
    for doc in docs:
        if not doc.data or (cap is not None and sizes.get(doc.source, 0) >= cap):
            continue
        sizes[doc.source] = sizes.get(doc.source, 0) + len(doc.data)
        yield doc


def chunks(docs: Iterable[Document], size: int = ENCODE_CHUNK_BYTES) -> Iterator[list[Document]]:
    batch: list[Document] = []
    held = 0
    for doc in docs:
        batch.append(doc)
        held += len(doc.data)
        if held >= size:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


def raw_documents(cfg: DataConfig, specs: list[str]) -> Iterator[Document]:
    """The raw-text documents of these data.paths entries (the standard library when
    data.paths is empty), capped per source."""
    return capped(
        user_documents(cfg, specs) if cfg.paths else stdlib_documents(), cfg.max_bytes_per_source
    )


# --- reading ------------------------------------------------------------------------------


def kind_of(spec: str) -> str:
    """Which kind of data.paths entry ``spec`` is (TEXT, PREPARED or MEGATRON)."""
    from . import megatron, shards

    path = Path(named(spec)[1]).expanduser()
    if path.is_dir() and shards.is_prepared(path):
        return PREPARED
    if megatron.IndexedDataset.exists(path):
        return MEGATRON
    return TEXT


def load_corpus(cfg: DataConfig, min_tokens: int = 2, tok: Tokenizer | None = None) -> Corpus:
    """Every source of data.paths as train/validation token streams.

    ``min_tokens`` is the smallest stream the sampler can use (seq_len + 1); a source too
    small for it is an error that names the source. ``tok`` defaults to data.tokenizer."""
    tok = tok or tokenizers.load(cfg.tokenizer, cfg.eos)
    corpus = Corpus(tokenizer=tok.digest)
    kinds = {spec: kind_of(spec) for spec in cfg.paths}
    raw = [s for s in cfg.paths if kinds[s] == TEXT]
    found: list[SourceSplit] = []
    if raw or not cfg.paths:
        found.extend(_raw_splits(cfg, raw, min_tokens, tok))
    for spec in cfg.paths:
        if kinds[spec] == PREPARED:
            from . import shards

            found.extend(shards.open_prepared(named(spec)[1], tok, min_tokens, cfg))
        elif kinds[spec] == MEGATRON:
            found.append(_megatron_split(spec, cfg.val_fraction, min_tokens, tok))
    for split in found:
        if split.name in corpus.sources:
            raise DataError(
                f"data source {split.name!r} comes from two data.paths entries; name them "
                "apart with name=path"
            )
        corpus.sources[split.name] = split
    if not corpus.sources:
        where = ", ".join(cfg.paths) if cfg.paths else "the Python standard library"
        raise DataError(f"no text found in {where} (data.paths)")
    corpus.sources = dict(sorted(corpus.sources.items()))
    return corpus


def split_documents(
    name: str, docs: Iterable[Document], val_fraction: float, min_tokens: int, tok: Tokenizer
) -> SourceSplit:
    """One source's documents (in corpus order) split in memory by the module's rule."""
    train, val = MemorySink(tok.dtype), MemorySink(tok.dtype)
    builder = SplitBuilder(
        name,
        val_fraction=val_fraction,
        min_tokens=min_tokens,
        eos_id=tok.eos_id,
        dtype=tok.dtype,
        train=train,
        val=val,
    )
    for doc in docs:
        builder.add(doc.id, tok.encode(doc.data))
    return _in_memory(name, builder, train, val)


def _in_memory(name: str, builder: SplitBuilder, train: MemorySink, val: MemorySink) -> SourceSplit:
    counts = builder.finish()
    assert isinstance(builder.docs, MemoryDocs)
    index = builder.docs.index()
    return SourceSplit(
        name, train.array(), val.array(), counts.train_docs, counts.val_docs, index, TEXT
    )


def _raw_splits(
    cfg: DataConfig, specs: list[str], min_tokens: int, tok: Tokenizer
) -> list[SourceSplit]:
    builders: dict[str, tuple[SplitBuilder, MemorySink, MemorySink]] = {}
    groups = [[s] for s in specs] if cfg.paths else [[]]
    for group in groups:
        seen = 0
        for batch in chunks(raw_documents(cfg, group)):
            seen += len(batch)
            for doc, ids in zip(batch, tok.encode_batch([d.data for d in batch]), strict=True):
                if doc.source not in builders:
                    train, val = MemorySink(tok.dtype), MemorySink(tok.dtype)
                    builder = SplitBuilder(
                        doc.source,
                        val_fraction=cfg.val_fraction,
                        min_tokens=min_tokens,
                        eos_id=tok.eos_id,
                        dtype=tok.dtype,
                        train=train,
                        val=val,
                    )
                    builders[doc.source] = (builder, train, val)
                builders[doc.source][0].add(doc.id, ids)
        if group and not seen:
            raise DataError(
                f"data path {group[0]!r} (data.paths) holds no text: its files are empty"
            )
    return [_in_memory(name, *builders[name]) for name in sorted(builders)]


_VOCAB_CHECK_TOKENS = 1 << 20  # the head of a Megatron dataset checked against the vocabulary


def _megatron_split(spec: str, val_fraction: float, min_tokens: int, tok: Tokenizer) -> SourceSplit:
    from .megatron import IndexedDataset

    name, path = named(spec)
    ds = IndexedDataset(path)
    name = name or source_name(ds.prefix)
    check_ids(ds.tokens[:_VOCAB_CHECK_TOKENS], tok.vocab_size, f"{ds.prefix}.bin", tok.spec)
    total = len(ds.tokens)
    if total < 2 * min_tokens:
        raise DataError(
            f"data source {name!r} ({ds.prefix}.bin) has {total:,} tokens; it needs at least "
            f"{2 * min_tokens:,} (model.seq_len + 1 each for training and validation)"
        )
    want = max(min_tokens, int(total * val_fraction))
    d = ds.find(total - want)
    cut = ds.start(d) if ds.start(d) >= min_tokens else total - want  # else: mid-document
    train_docs = d if cut == ds.start(d) else d + 1
    return SourceSplit(
        name,
        ds.tokens[:cut],
        ds.tokens[cut:],
        train_docs,
        len(ds) - train_docs,
        FirstDocs(ds, train_docs),
        MEGATRON,
    )


def check_ids(ids: np.ndarray, vocab_size: int, where: str, tokenizer: str) -> None:
    """A clear error for token ids the tokenizer does not have (data made with another)."""
    if len(ids) and int(ids.max()) >= vocab_size:
        raise DataError(
            f"{where} holds token id {int(ids.max()):,}, outside the {vocab_size:,} ids of "
            f"data.tokenizer {tokenizer!r}: the data were tokenized with another tokenizer; "
            "set data.tokenizer to that one"
        )


__all__ = ["Document", "expand"]  # re-exported for readers of this module
