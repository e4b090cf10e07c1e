"""Documents: the default corpus and the user's text files, JSONL and Parquet.

The default corpus is text already on every machine: the Python standard library's own
sources (source ``code``) and its documentation (``prose``: the pydoc topic pages and the
library's .txt/.rst files). Users point ``data.paths`` at their own text files or folders,
JSONL (a ``text`` field, an optional ``source`` field) or Parquet (same columns).
"""

from __future__ import annotations

import glob
import json
import os
import re
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from yoto.config import DataConfig
from yoto.errors import DataError

_NAMED = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)=(?P<path>.+)$")
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", ".git"}


@dataclass(frozen=True, slots=True)
class Document:
    source: str
    id: str  # stable across runs: a path, or path:line for JSONL
    data: bytes


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


def named(spec: str) -> tuple[str | None, str]:
    """A data.paths entry as (source name or None, path or pattern)."""
    match = _NAMED.match(spec)
    return (match.group("name"), match.group("path")) if match else (None, spec)


def user_documents(cfg: DataConfig, specs: list[str] | None = None) -> Iterator[Document]:
    """The documents of raw-text entries of data.paths (all of them by default)."""
    for spec in cfg.paths if specs is None else specs:
        name, pattern = named(spec)
        paths = expand(pattern)
        for path in paths:
            default_source = name or source_name(path)
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


def expand(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if any(ch in pattern for ch in "*?["):
        matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        if not matches:
            raise DataError(f"data path pattern {pattern!r} (data.paths) matches no files")
        return matches
    if not path.exists():
        raise DataError(
            f"data path {pattern!r} (data.paths) does not exist; give text files or "
            "folders, .jsonl or .parquet files, directories made by `yoto data prepare`, "
            "or Megatron indexed datasets (PREFIX for PREFIX.bin + PREFIX.idx), "
            "optionally as name=path"
        )
    return [path]


def source_name(path: Path) -> str:
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


def input_bytes(cfg: DataConfig, specs: list[str] | None = None) -> int:
    """Bytes of the files the documents come from (a progress bar's total), without reading
    them: the standard library's sizes when data.paths is empty."""
    if specs is None and not cfg.paths:
        root = Path(sysconfig.get_paths()["stdlib"])
        return sum(
            p.stat().st_size for p in _walk(root) if p.suffix.lower() in (".py", ".txt", ".rst")
        )
    total = 0
    for spec in cfg.paths if specs is None else specs:
        for path in expand(named(spec)[1]):
            files = (
                [p for p in _walk(path) if p.suffix.lower() in cfg.extensions]
                if path.is_dir()
                else [path]
            )
            total += sum(p.stat().st_size for p in files if p.is_file())
    return total
