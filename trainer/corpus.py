"""Training text: the default corpus, user files, and the per-source train/validation split.

The default corpus is text already on every machine: the Python standard library's own
sources (source ``code``) and its documentation (``prose``: the pydoc topic pages and the
library's .txt/.rst files). Users point ``data.paths`` at their own text files or folders,
JSONL (a ``text`` field, an optional ``source`` field) or Parquet (same columns).

Each source becomes one token stream (documents joined by EOS). A few whole documents per
source, picked by a stable hash of their id, are held out for validation, so validation
text never appears in training.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from yoto.config import DataConfig
from yoto.errors import DataError

from . import tokenizer

_NAMED = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)=(?P<path>.+)$")
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", ".git"}


@dataclass(frozen=True, slots=True)
class Document:
    source: str
    id: str  # stable across runs: a path, or path:line for JSONL
    data: bytes


@dataclass
class SourceSplit:
    name: str
    train: np.ndarray  # token ids, documents joined by EOS
    val: np.ndarray
    train_docs: int = 0
    val_docs: int = 0
    # the training stream's document index (spike forensics, ``yoto data batch``): where
    # each document starts in ``train`` and its stable id; empty when not known
    doc_starts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    doc_ids: list[str] = field(default_factory=list)


@dataclass
class Corpus:
    sources: dict[str, SourceSplit] = field(default_factory=dict)

    def token_counts(self) -> dict[str, dict[str, int]]:
        return {
            s.name: {"train_tokens": len(s.train), "val_tokens": len(s.val)}
            for s in self.sources.values()
        }


# --- documents ----------------------------------------------------------------------------


def stdlib_documents() -> Iterator[Document]:
    """The Python standard library found at run time: code and prose."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(
            f"the default corpus needs the Python standard library's sources, but "
            f"{str(root)!r} is not a folder; set data.paths to your own text"
        )
    try:  # pydoc's topic pages: the language reference and library docs as plain text
        from pydoc_data.topics import topics

        for key in sorted(topics):
            yield Document("prose", f"pydoc_data.topics:{key}", topics[key].encode("utf-8"))
    except ImportError:
        pass
    for path in _walk(root):
        suffix = path.suffix.lower()
        if suffix == ".py":
            source = "code"
        elif suffix in (".txt", ".rst") or path.name in ("README", "NEWS"):
            source = "prose"
        else:
            continue
        try:
            yield Document(source, str(path.relative_to(root)), path.read_bytes())
        except OSError:
            continue  # an unreadable file in a system folder is not the user's problem


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            yield Path(dirpath) / name


def user_documents(cfg: DataConfig) -> Iterator[Document]:
    for spec in cfg.paths:
        match = _NAMED.match(spec)
        name, pattern = (match.group("name"), match.group("path")) if match else (None, spec)
        paths = _expand(pattern)
        for path in paths:
            default_source = name or _source_name(path)
            if path.is_dir():
                files = [
                    p for p in _walk(path) if p.suffix.lower() in cfg.extensions and p.is_file()
                ]
                if not files:
                    raise DataError(
                        f"data path {str(path)!r} holds no files of the types read from "
                        f"folders ({', '.join(cfg.extensions)}); set data.extensions"
                    )
                for file in files:
                    yield from _file_documents(file, default_source, cfg, forced=name)
            else:
                yield from _file_documents(path, default_source, cfg, forced=name)


def _expand(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if any(ch in pattern for ch in "*?["):
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        if not matches:
            raise DataError(f"data path pattern {pattern!r} (data.paths) matches no files")
        return matches
    if not path.exists():
        raise DataError(
            f"data path {pattern!r} (data.paths) does not exist; give text files or "
            f"folders, .jsonl or .parquet files, optionally as name=path"
        )
    return [path]


def _source_name(path: Path) -> str:
    name = path.name if path.is_dir() else path.stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "text"


def _file_documents(
    path: Path, default_source: str, cfg: DataConfig, forced: str | None
) -> Iterator[Document]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            yield from _jsonl_documents(path, default_source, cfg, forced)
        elif suffix == ".parquet":
            yield from _parquet_documents(path, default_source, cfg, forced)
        else:
            data = path.read_bytes()
            _require_text(path, data)
            yield Document(default_source, str(path), data)
    except OSError as exc:
        raise DataError(f"cannot read data file {str(path)!r}: {exc.strerror or exc}") from None


_TEXT_SAMPLE = 64 * 1024  # bytes looked at; a text file's head tells
_TEXT_CONTROLS = set("\t\n\r\f\v\b\x1b")
# Text has (almost) no NUL or other control bytes; executables, archives and UTF-16 have
# many. Undecodable bytes alone are allowed more room: Latin-1 prose is text for a byte
# tokenizer (about 14% of a French Latin-1 text does not decode as UTF-8).
_CONTROL_MAX = 0.05
_UNDECODABLE_MAX = 0.30


@dataclass(frozen=True, slots=True)
class TextCheck:
    """What the head of a file is made of, as shares of its characters."""

    control: float  # NUL and C0 controls other than tab, newlines, form feed, escape
    undecodable: float  # bytes that are not UTF-8

    @property
    def is_text(self) -> bool:
        return self.control <= _CONTROL_MAX and self.undecodable <= _UNDECODABLE_MAX


def check_text(data: bytes) -> TextCheck:
    head = data[:_TEXT_SAMPLE]
    if len(data) > _TEXT_SAMPLE:
        head = head[: len(head) - 3]  # a multi-byte character cut by the sample is not damage
    chars = head.decode("utf-8", errors="replace")
    if not chars:
        return TextCheck(0.0, 0.0)
    control = sum(1 for c in chars if c < " " and c not in _TEXT_CONTROLS)
    return TextCheck(control / len(chars), chars.count("\ufffd") / len(chars))


def _require_text(path: Path, data: bytes) -> None:
    got = check_text(data)
    if not got.is_text:
        raise DataError(
            f"data file {str(path)!r} is not text: of its first "
            f"{max(1, min(len(data), _TEXT_SAMPLE) // 1024)} KiB, {got.control:.0%} are "
            f"NUL/control bytes (text: at most {_CONTROL_MAX:.0%}) and {got.undecodable:.0%} "
            f"are not UTF-8 (at most {_UNDECODABLE_MAX:.0%}). Remove binary files from "
            "data.paths (or narrow data.extensions for folders); convert UTF-16 text to "
            "UTF-8"
        )


def _jsonl_documents(
    path: Path, default_source: str, cfg: DataConfig, forced: str | None
) -> Iterator[Document]:
    with open(path, encoding="utf-8", errors="strict") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DataError(f"{path}:{lineno}: not a JSON object ({exc.msg})") from None
            if not isinstance(record, dict) or cfg.text_field not in record:
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object with a {cfg.text_field!r} field "
                    f"(data.text_field)"
                )
            text = record[cfg.text_field]
            if not isinstance(text, str):
                raise DataError(
                    f"{path}:{lineno}: field {cfg.text_field!r} must be a string, "
                    f"got {type(text).__name__}"
                )
            source = forced or str(record.get(cfg.source_field) or default_source)
            yield Document(source, f"{path}:{lineno}", text.encode("utf-8"))


def _parquet_documents(
    path: Path, default_source: str, cfg: DataConfig, forced: str | None
) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for a non-Parquet file
        raise DataError(f"{str(path)!r} is not a readable Parquet file: {exc}") from None
    if cfg.text_field not in schema.names:
        raise DataError(
            f"{str(path)!r} has no {cfg.text_field!r} column (data.text_field); "
            f"its columns: {', '.join(schema.names)}"
        )
    columns = [cfg.text_field] + ([cfg.source_field] if cfg.source_field in schema.names else [])
    table = pq.read_table(path, columns=columns)
    texts = table.column(cfg.text_field).to_pylist()
    sources = (
        table.column(cfg.source_field).to_pylist()
        if cfg.source_field in columns
        else [None] * len(texts)
    )
    for row, (text, source) in enumerate(zip(texts, sources, strict=True)):
        if text is None:
            continue
        if not isinstance(text, str):
            raise DataError(f"{path}: column {cfg.text_field!r} must hold strings (row {row})")
        yield Document(forced or str(source or default_source), f"{path}#{row}", text.encode())


# --- splitting ----------------------------------------------------------------------------


def load_corpus(cfg: DataConfig, min_tokens: int = 2) -> Corpus:
    """Read the documents of every source and split each into train/val token streams.

    ``min_tokens`` is the smallest stream the sampler can use (seq_len + 1); a source too
    small for it is an error that names the source.
    """
    docs = user_documents(cfg) if cfg.paths else stdlib_documents()
    where = ", ".join(cfg.paths) if cfg.paths else "the Python standard library"
    by_source = _group(docs, cfg.max_bytes_per_source)
    if not by_source:
        raise DataError(f"no text found in {where} (data.paths)")
    corpus = Corpus()
    for name in sorted(by_source):
        corpus.sources[name] = _split(name, by_source[name], cfg.val_fraction, min_tokens)
    return corpus


def _group(docs: Iterable[Document], cap: int | None) -> dict[str, list[Document]]:
    by_source: dict[str, list[Document]] = {}
    sizes: dict[str, int] = {}
    for doc in docs:
        if not doc.data:
            continue
        if cap is not None and sizes.get(doc.source, 0) >= cap:
            continue
        by_source.setdefault(doc.source, []).append(doc)
        sizes[doc.source] = sizes.get(doc.source, 0) + len(doc.data)
    return by_source


def _stable_order(doc: Document) -> str:
    return hashlib.sha1(doc.id.encode("utf-8", "surrogateescape")).hexdigest()


def _split(name: str, docs: list[Document], val_fraction: float, min_tokens: int) -> SourceSplit:
    total = sum(len(d.data) + 1 for d in docs)
    if total < 2 * min_tokens:
        raise DataError(
            f"data source {name!r} has {total:,} tokens; it needs at least {2 * min_tokens:,} "
            f"(model.seq_len + 1 each for training and validation)"
        )
    if len(docs) == 1:  # one document: hold out its tail
        stream, starts = _join(docs)
        cut = min(int(len(stream) * (1 - val_fraction)), len(stream) - min_tokens)
        cut = max(cut, min_tokens)
        return SourceSplit(name, stream[:cut], stream[cut:], 1, 0, starts, [docs[0].id])
    ordered = sorted(docs, key=_stable_order)
    want = max(min_tokens, int(total * val_fraction))
    val, size = [], 0
    for doc in ordered[:-1]:  # keep at least one training document
        if size >= want:
            break
        val.append(doc)
        size += len(doc.data) + 1
    val_ids = {d.id for d in val}
    train = [d for d in docs if d.id not in val_ids]  # training keeps the corpus order
    (train_stream, train_starts), (val_stream, _) = _join(train), _join(val)
    if len(val_stream) < min_tokens or len(train_stream) < min_tokens:
        # documents too uneven to split whole; fall back to the tail
        stream, starts = _join(docs)
        cut = len(stream) - max(want, min_tokens)
        kept = int(np.searchsorted(starts, cut, side="left"))  # documents starting before it
        ids = [d.id for d in docs][:kept]
        return SourceSplit(name, stream[:cut], stream[cut:], len(docs), 0, starts[:kept], ids)
    return SourceSplit(
        name, train_stream, val_stream, len(train), len(val), train_starts, [d.id for d in train]
    )


def _join(docs: list[Document]) -> tuple[np.ndarray, np.ndarray]:
    """The documents' tokens joined, each followed by EOS, and where each one starts."""
    parts = []
    eos = np.array([tokenizer.EOS], dtype=tokenizer.TOKEN_DTYPE)
    for doc in docs:
        parts.append(tokenizer.encode(doc.data))
        parts.append(eos)
    lengths = np.array([len(p) + 1 for p in parts[::2]], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(docs) else lengths
    stream = np.concatenate(parts) if parts else np.empty(0, dtype=tokenizer.TOKEN_DTYPE)
    return stream, starts.astype(np.int64)
