"""The prepared-directory format: memory-mapped token files, written by ``yoto data prepare``.

```
DIR/manifest.json          written last: format, version, tokenizer digest, dtype, split
                           settings, per-source counts. No manifest = not complete.
DIR/prepare.json           the fingerprint of the prepare that is filling DIR (resume)
DIR/tokenizer.json         the tokenizer file (absent for 'bytes')
DIR/sources/NAME/train.bin training tokens (dtype), documents joined by EOS
DIR/sources/NAME/val.bin   validation tokens
DIR/sources/NAME/docs.bin  int64 start of each training document in train.bin
DIR/sources/NAME/ids.bin   the training documents' ids, UTF-8, back to back
DIR/sources/NAME/idx.bin   int64 offsets of each id in ids.bin (documents + 1)
DIR/sources/NAME/done.json the source's counts, written after its files are complete
```
All arrays are raw little-endian, read with ``np.memmap``; nothing is read into memory at
start-up but the manifest. A source's files are written as ``*.tmp`` and renamed into
place only when the source is complete, then ``done.json``; a directory without its
manifest is never read as data.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from yoto.config import DataConfig
from yoto.errors import DataError

from .corpus import PREPARED, ArrayDocs, SourceSplit, SplitCounts
from .tokenizer import Tokenizer

FORMAT = "yoto-prepared"
VERSION = 1
MANIFEST, PROGRESS, TOKENIZER, SOURCES, DONE = (
    "manifest.json",
    "prepare.json",
    "tokenizer.json",
    "sources",
    "done.json",
)
TRAIN, VAL, DOCS, IDS, IDX = "train.bin", "val.bin", "docs.bin", "ids.bin", "idx.bin"
TMP = ".tmp"
_CHECK_CHUNK = 1 << 20  # index entries checked at a time (memory stays flat)


_SCAN_CHUNKS = 16  # an index is checked whole up to this many chunks, else so many of it


def scan_ranges(n: int, chunk: int) -> list[tuple[int, int]]:
    """The [a, b) ranges of an n-entry index that a start-up check reads: all of it up to
    ``_SCAN_CHUNKS`` chunks, beyond that the first, the last and evenly spread chunks
    between, so opening a corpus takes the same time whatever its size. A damaged index
    that passes a sampled check still cannot read outside its files (the sampler stays
    within the token file) and ``yoto data prepare`` wrote and checked it whole."""
    if n <= chunk * _SCAN_CHUNKS:
        return [(a, min(n, a + chunk)) for a in range(0, n, chunk)]
    firsts = np.linspace(0, n - chunk, _SCAN_CHUNKS).astype(np.int64)
    return [(int(a), int(a) + chunk) for a in firsts]


def is_prepared(path: Path) -> bool:
    """Whether ``path`` is (or was being made as) a prepared directory."""
    return (path / MANIFEST).is_file() or (path / PROGRESS).is_file()


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomically: a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + TMP)
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# --- writing ------------------------------------------------------------------------------


class FileSink:
    """A token stream appended to a file (``*.tmp`` until committed)."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path, self.dtype = path, np.dtype(dtype)
        self.file = open(path, "w+b")  # noqa: SIM115 - closed by SourceWriter.commit/abort
        self.size = 0

    def write(self, ids: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(ids, dtype=self.dtype.newbyteorder("<")).tobytes())
        self.size += len(ids)

    def tail(self, n: int) -> np.ndarray:
        self.file.flush()
        self.file.seek((self.size - n) * self.dtype.itemsize)
        out = np.frombuffer(self.file.read(n * self.dtype.itemsize), dtype=self.dtype)
        self.file.seek(0, os.SEEK_END)
        return out

    def truncate(self, n: int) -> None:
        self.file.flush()
        self.file.truncate(n * self.dtype.itemsize)
        self.file.seek(0, os.SEEK_END)
        self.size = n


class FileDocs:
    """A training stream's document index appended to files as documents arrive (memory
    stays flat however many there are): starts, ids back to back, and their offsets."""

    def __init__(self, directory: Path) -> None:
        self.paths = {n: directory / (n + TMP) for n in (DOCS, IDS, IDX)}
        self.files = {n: open(p, "w+b") for n, p in self.paths.items()}  # noqa: SIM115
        self.files[IDX].write(np.zeros(1, dtype="<i8").tobytes())
        self.count = 0
        self._blob = 0

    def add(self, start: int, doc_id: str) -> None:
        blob = doc_id.encode("utf-8", "surrogateescape")
        self._blob += len(blob)
        self.files[DOCS].write(np.array([start], dtype="<i8").tobytes())
        self.files[IDS].write(blob)
        self.files[IDX].write(np.array([self._blob], dtype="<i8").tobytes())
        self.count += 1

    def keep_before(self, cut: int) -> None:
        for f in self.files.values():
            f.flush()
        if self.count == 0:
            return
        starts = np.memmap(self.paths[DOCS], dtype="<i8", mode="r", shape=(self.count,))
        kept = int(np.searchsorted(starts, cut, side="left"))
        offsets = np.memmap(self.paths[IDX], dtype="<i8", mode="r", shape=(self.count + 1,))
        blob = int(offsets[kept])
        del starts, offsets
        for name, size in ((DOCS, 8 * kept), (IDX, 8 * (kept + 1)), (IDS, blob)):
            self.files[name].truncate(size)
            self.files[name].seek(0, os.SEEK_END)
        self.count, self._blob = kept, blob

    def close(self) -> None:
        for f in self.files.values():
            f.flush()
            f.close()

    def abort(self) -> None:
        self.close()
        for p in self.paths.values():
            p.unlink(missing_ok=True)


class SourceWriter:
    """One source's files in a prepared directory, complete or absent."""

    def __init__(self, root: Path, name: str, dtype: np.dtype) -> None:
        self.dir = root / SOURCES / name
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob("*" + TMP):
            stale.unlink()
        self.train = FileSink(self.dir / (TRAIN + TMP), dtype)
        self.val = FileSink(self.dir / (VAL + TMP), dtype)
        self.docs = FileDocs(self.dir)

    def commit(self, counts: SplitCounts, extra: dict[str, Any]) -> dict[str, Any]:
        for sink in (self.train, self.val):
            sink.file.flush()
            os.fsync(sink.file.fileno())
            sink.file.close()
        self.docs.close()
        for name in (TRAIN, VAL, DOCS, IDS, IDX):
            os.replace(self.dir / (name + TMP), self.dir / name)
        record = {
            "train_tokens": counts.train_tokens,
            "val_tokens": counts.val_tokens,
            "train_docs": counts.train_docs,
            "val_docs": counts.val_docs,
            **extra,
        }
        write_json(self.dir / DONE, record)
        return record

    def abort(self) -> None:
        for sink in (self.train, self.val):
            sink.file.close()
            sink.path.unlink(missing_ok=True)
        self.docs.abort()


# --- reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdTable(Sequence[str]):
    """Document ids stored back to back in a file, read one at a time by memory map."""

    blob: np.ndarray  # uint8 memmap
    offsets: np.ndarray  # int64 memmap, len + 1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, d: int) -> str:  # type: ignore[override]
        a, b = int(self.offsets[d]), int(self.offsets[d + 1])
        return bytes(self.blob[a:b]).decode("utf-8", "surrogateescape")


def read_manifest(path: str | Path) -> dict[str, Any]:
    root = Path(path).expanduser()
    manifest = root / MANIFEST
    if not manifest.is_file():
        if (root / PROGRESS).is_file():
            raise DataError(
                f"{str(root)!r} is an incomplete prepared directory (no {MANIFEST}: "
                "`yoto data prepare` was interrupted); run it again with the same config "
                "and --out to resume"
            )
        raise DataError(f"{str(root)!r} is not a directory made by `yoto data prepare`")
    try:
        data = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{str(manifest)!r} is not readable JSON ({exc})") from None
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise DataError(
            f"{str(manifest)!r} is not a {FORMAT} manifest of version {VERSION} (format "
            f"{data.get('format')!r}, version {data.get('version')!r}); prepare the data "
            "again with this yoto"
        )
    return data


def open_prepared(
    path: str | Path, tok: Tokenizer, min_tokens: int, cfg: DataConfig | None = None
) -> list[SourceSplit]:
    """The sources of a prepared directory, memory-mapped and checked against the
    tokenizer the config names and against their own index files."""
    root = Path(path).expanduser()
    manifest = read_manifest(root)
    made = manifest["tokenizer"]
    if made["digest"] != tok.digest:
        raise DataError(
            f"{str(root)!r} was prepared with tokenizer {made['spec']!r} ({made['digest']}), "
            f"but data.tokenizer is {tok.spec!r} ({tok.digest}); set data.tokenizer to the "
            f"one it was made with (a copy is in {str(root / TOKENIZER)!r}) or prepare again"
        )
    dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
    splits = []
    for name, counts in sorted(manifest["sources"].items()):
        splits.append(_open_source(root / SOURCES / name, name, counts, dtype, min_tokens))
    return splits


def _map(path: Path, dtype: np.dtype, count: int, what: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(
            f"{str(path)!r} is missing: the prepared directory is damaged; prepare again"
        )
    size = path.stat().st_size
    if size != count * dtype.itemsize:
        raise DataError(
            f"{str(path)!r} holds {size:,} bytes, but the manifest says {count:,} {what} "
            f"of {dtype.itemsize} bytes ({count * dtype.itemsize:,} bytes): the file is "
            "truncated or not this directory's; prepare again"
        )
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def _open_source(
    where: Path, name: str, counts: dict[str, int], dtype: np.dtype, min_tokens: int
) -> SourceSplit:
    train = _map(where / TRAIN, dtype, counts["train_tokens"], "tokens")
    val = _map(where / VAL, dtype, counts["val_tokens"], "tokens")
    n = counts["train_docs"]
    starts = _map(where / DOCS, np.dtype("<i8"), n, "document starts")
    offsets = _map(where / IDX, np.dtype("<i8"), n + 1, "id offsets")
    blob_size = int(offsets[-1])
    blob = _map(where / IDS, np.dtype(np.uint8), blob_size, "id bytes")
    _check_index(where / DOCS, starts, len(train))
    for label, stream in (("training", train), ("validation", val)):
        if len(stream) < min_tokens:
            raise DataError(
                f"prepared source {name!r} has {len(stream):,} {label} tokens; a sequence "
                f"needs {min_tokens:,} (model.seq_len + 1): prepare it again with this "
                "model.seq_len (or a larger data.val_fraction), or shorten model.seq_len"
            )
    docs = ArrayDocs(starts, IdTable(blob, offsets))
    return SourceSplit(name, train, val, n, counts["val_docs"], docs, PREPARED)


def _check_index(path: Path, starts: np.ndarray, tokens: int) -> None:
    """Document starts begin at 0, increase and stay inside the token file (in chunks)."""
    if len(starts) == 0:
        return
    bad = int(starts[0]) != 0 or int(starts[-1]) >= tokens
    for a, b in scan_ranges(len(starts), _CHECK_CHUNK):
        part = np.asarray(starts[max(0, a - 1) : b])
        if len(part) > 1 and np.any(np.diff(part) <= 0):
            bad = True
            break
    if bad:
        raise DataError(
            f"{str(path)!r} does not match its token file: document starts must begin at 0, "
            f"increase, and stay below the {tokens:,} training tokens; prepare again"
        )
