"""Megatron-LM / Megatron-DeepSpeed indexed datasets (``PREFIX.bin`` + ``PREFIX.idx``).

This is the "MMIDIDX" format written by Megatron's ``tools/preprocess_data.py`` (and by
BigScience's Megatron-DeepSpeed with ``--dataset-impl mmap``, the format BLOOM's data
ships in). All integers are little-endian:

```
PREFIX.idx   magic              9 bytes  b"MMIDIDX\\x00\\x00"
             version            <Q       1
             dtype code         <B       1 uint8, 2 int8, 3 int16, 4 int32, 5 int64,
                                         6 float64, 7 float32 (BigScience: float64),
                                         8 uint16
             sequence count S   <Q
             document count D   <Q       entries of document_indices (documents + 1)
             sequence_lengths   int32[S] tokens per sequence
             sequence_pointers  int64[S] byte offset of each sequence in PREFIX.bin
             document_indices   int64[D] first sequence of each document; 0 first, S last
             (sequence_modes    int8[S]  multimodal datasets only; no header flag)
PREFIX.bin   the sequences' tokens back to back, in the dtype above
```
A document is one or more sequences (``--split-sentences`` makes one per sentence);
documents hold exactly the tokens written (``--append-eod`` adds the end-of-document
token at preprocessing time; this reader adds nothing).

Everything is memory-mapped: opening a dataset reads the 34-byte header and maps the
arrays. The validation scan of the index reads it in bounded chunks, all of them for an
index of up to 16 chunks and 16 spread over it beyond that (shards.scan_ranges), so
start-up time and memory stay flat whatever the corpus size; no method builds an array
that grows with the corpus.
"""

from __future__ import annotations

import bisect
import struct
from pathlib import Path
from typing import Any

import numpy as np

from yoto.errors import DataError

from .shards import scan_ranges

_MAGIC = b"MMIDIDX\x00\x00"
_LEGACY_MAGIC = b"TNTIDX\x00\x00"  # the older non-mmap format (--dataset-impl lazy/cached)
_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, documents + 1
_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("u1"),
    2: np.dtype("i1"),
    3: np.dtype("<i2"),
    4: np.dtype("<i4"),
    5: np.dtype("<i8"),
    6: np.dtype("<f8"),
    7: np.dtype("<f4"),
    8: np.dtype("<u2"),
}
_CHECK_CHUNK = 1 << 20  # index entries checked at a time (memory stays flat)
_VALID_CODES = ", ".join(
    f"{code} ({dtype.name})" for code, dtype in _DTYPES.items() if dtype.kind in "iu"
)


def _prefix(path: str | Path) -> Path:
    """``x``, ``x.bin`` or ``x.idx`` as the prefix ``x`` (a prefix may hold other dots)."""
    path = Path(path)
    if path.name.endswith((".bin", ".idx")):
        return path.with_name(path.name[:-4])
    return path


def _files(prefix: Path) -> tuple[Path, Path]:
    return prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")


class IndexedDataset:
    """One Megatron indexed dataset, opened read-only by memory map."""

    prefix: Path  # path without extension
    dtype: np.dtype  # token dtype from the .idx
    tokens: np.ndarray  # np.memmap, 1-D, every token of the .bin in order

    def __init__(self, path: str | Path) -> None:
        self._open(_prefix(path), scan=True)

    # --- the public interface ---------------------------------------------------------------

    def __len__(self) -> int:
        """The number of documents."""
        return self._documents_count

    def start(self, d: int) -> int:
        """The token offset into :attr:`tokens` where document ``d`` starts;
        ``start(len(self)) == len(tokens)``."""
        d = int(d)
        if not 0 <= d <= self._documents_count:
            raise IndexError(f"document {d} out of range 0..{self._documents_count}")
        sequence = int(self._documents[d])
        if sequence == self._sequences:
            return self._tokens_count
        return int(self._pointers[sequence]) // self._itemsize

    def find(self, offset: int) -> int:
        """The document holding token ``offset``: the last ``d`` with ``start(d) <= offset``.

        Binary search straight on the memory maps (``bisect``, not ``np.searchsorted``:
        the index arrays sit at unaligned offsets in the .idx, and numpy copies an
        unaligned array whole before searching it)."""
        offset = int(offset)
        if not 0 <= offset < self._tokens_count:
            raise IndexError(f"token {offset} out of range 0..{self._tokens_count - 1}")
        # the last sequence starting at or before the token (pointers never decrease) ...
        sequence = bisect.bisect_right(self._pointers, offset * self._itemsize) - 1
        # ... and the last document starting at or before that sequence; documents without
        # sequences share their start with the next one, which is the one that holds it
        return bisect.bisect_right(self._documents, sequence) - 1

    def id(self, d: int) -> str:
        """A stable id for document ``d``."""
        d = int(d)
        if not 0 <= d < self._documents_count:
            raise IndexError(f"document {d} out of range 0..{self._documents_count - 1}")
        return f"{self.prefix.name}#{d}"

    @staticmethod
    def exists(path: str | Path) -> bool:
        """Whether ``path`` (``x``, ``x.bin`` or ``x.idx``) names a .bin and .idx pair."""
        bin_path, idx_path = _files(_prefix(path))
        return bin_path.is_file() and idx_path.is_file()

    def __repr__(self) -> str:
        return (
            f"IndexedDataset({str(self.prefix)!r}, documents={len(self):,}, "
            f"tokens={self._tokens_count:,}, dtype={self.dtype.name})"
        )

    # Pickled by path, not by content (a pickled np.memmap carries its whole data): a
    # DataLoader worker maps the files again, trusting the scan the parent made.
    def __getstate__(self) -> dict[str, Any]:
        return {"prefix": str(self.prefix)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._open(Path(state["prefix"]), scan=False)

    # --- opening and validation -------------------------------------------------------------

    def _open(self, prefix: Path, *, scan: bool) -> None:
        self.prefix = prefix
        bin_path, idx_path = _files(prefix)
        for missing, other in ((bin_path, idx_path), (idx_path, bin_path)):
            if not missing.is_file():
                found = f"{other.name} is there" if other.is_file() else f"so is {other.name}"
                raise DataError(
                    f"Megatron indexed dataset {str(prefix)!r}: {str(missing)!r} is missing "
                    f"({found}); a dataset is the pair PREFIX.bin + PREFIX.idx written by "
                    f"Megatron's tools/preprocess_data.py"
                )
        code, sequences, entries = self._header(idx_path)
        self.dtype = _DTYPES[code]
        self._itemsize = self.dtype.itemsize
        self._sequences = sequences
        self._documents_count = entries - 1

        lengths = np.memmap(idx_path, "<i4", "r", offset=_HEADER.size, shape=(sequences,))
        self._pointers = np.memmap(
            idx_path, "<i8", "r", offset=_HEADER.size + 4 * sequences, shape=(sequences,)
        )
        self._documents = np.memmap(
            idx_path, "<i8", "r", offset=_HEADER.size + 12 * sequences, shape=(entries,)
        )
        if scan:
            self._check_documents(idx_path)
            self._check_pointers(idx_path, lengths)
        end = int(self._pointers[-1]) + int(lengths[-1]) * self._itemsize  # bytes
        del lengths  # only the scan needs the lengths: start() and find() use the pointers

        bin_size = bin_path.stat().st_size
        if bin_size != end:
            how = "truncated" if bin_size < end else "longer than its index says"
            raise DataError(
                f"{str(bin_path)!r} does not match {idx_path.name}: it holds {bin_size:,} "
                f"bytes but the index's sequences end at byte {end:,} "
                f"({end // self._itemsize:,} {self.dtype.name} tokens), so the .bin is {how} "
                f"or belongs to another dataset; use the .bin and .idx written together"
            )
        if end == 0:
            raise DataError(
                f"Megatron indexed dataset {str(prefix)!r} is empty: its "
                f"{self._documents_count:,} documents hold no tokens; a dataset to train on "
                f"needs at least one token"
            )
        self._tokens_count = end // self._itemsize
        self.tokens = np.memmap(bin_path, self.dtype, "r", shape=(self._tokens_count,))

    def _header(self, idx_path: Path) -> tuple[int, int, int]:
        """The .idx header as (dtype code, sequence count, document index entries), checked
        against the file's size."""
        with open(idx_path, "rb") as stream:
            head = stream.read(_HEADER.size)
        if head[: len(_LEGACY_MAGIC)] == _LEGACY_MAGIC:
            raise DataError(
                f"{str(idx_path)!r} is an index of Megatron's older non-mmap format "
                f"('TNTIDX', --dataset-impl lazy or cached), not a Megatron MMIDIDX index; "
                f"preprocess the data again with --dataset-impl mmap (the default)"
            )
        if head[: len(_MAGIC)] != _MAGIC:
            raise DataError(
                f"{str(idx_path)!r} is not a Megatron MMIDIDX index: it starts with "
                f"{head[: len(_MAGIC)]!r}, not {_MAGIC!r}; give the prefix of a dataset "
                f"written by Megatron's tools/preprocess_data.py"
            )
        if len(head) < _HEADER.size:
            raise DataError(
                f"{str(idx_path)!r} is shorter than its header: {len(head)} bytes, a Megatron "
                f"MMIDIDX header is {_HEADER.size}; the index is truncated, write it again"
            )
        _, version, code, sequences, entries = _HEADER.unpack(head)
        if version != _VERSION:
            raise DataError(
                f"{str(idx_path)!r} is a Megatron MMIDIDX index of version {version}; "
                f"yoto reads version {_VERSION}"
            )
        dtype = _DTYPES.get(code)
        if dtype is None or dtype.kind not in "iu":
            what = f"{dtype.name} (tokens must be integers)" if dtype else "unknown"
            raise DataError(
                f"{str(idx_path)!r} has token dtype code {code}: {what}; valid codes are "
                f"{_VALID_CODES}"
            )

        size = idx_path.stat().st_size
        want = _HEADER.size + 12 * sequences + 8 * entries
        if size < want:
            raise DataError(
                f"{str(idx_path)!r} is shorter than its header says: {sequences:,} sequences "
                f"and {entries:,} document indices need {want:,} bytes, the file has "
                f"{size:,}; the index is truncated, write it again"
            )
        if size == want + sequences and sequences > 0:
            raise DataError(
                f"{str(idx_path)!r} is a multimodal Megatron index (it ends with "
                f"{sequences:,} sequence modes); yoto reads text token datasets only, "
                f"written without --multimodal"
            )
        if size != want:
            raise DataError(
                f"{str(idx_path)!r} is longer than its header says: {sequences:,} sequences "
                f"and {entries:,} document indices need {want:,} bytes, the file has "
                f"{size:,}; the index is damaged or not a Megatron MMIDIDX index"
            )
        if entries == 0:
            raise DataError(
                f"{str(idx_path)!r} has no document indices; they must start at 0 and end "
                f"at the sequence count ({sequences:,})"
            )
        if sequences == 0:
            raise DataError(
                f"Megatron indexed dataset {str(idx_path)!r} is empty: it holds no "
                f"sequences, so no tokens; a dataset to train on needs at least one token"
            )
        return code, sequences, entries

    def _check_documents(self, idx_path: Path) -> None:
        docs, sequences = self._documents, self._sequences
        first, last = int(docs[0]), int(docs[-1])
        if first != 0 or last != sequences:
            raise DataError(
                f"{str(idx_path)!r} has document indices from {first:,} to {last:,}; they "
                f"must start at 0 and end at the sequence count ({sequences:,})"
            )
        for a, b in scan_ranges(len(docs), _CHECK_CHUNK):
            prev = int(docs[a - 1]) if a else 0
            part = np.asarray(docs[a:b])
            steps = np.diff(part, prepend=prev)
            if np.any(steps < 0):
                i = a + int(np.flatnonzero(steps < 0)[0])
                raise DataError(
                    f"{str(idx_path)!r} has decreasing document indices: document {i:,} "
                    f"starts at sequence {int(docs[i]):,}, before the previous document "
                    f"({int(docs[i - 1]):,}); they must never decrease"
                )

    def _check_pointers(self, idx_path: Path, lengths: np.ndarray) -> None:
        pointers, itemsize = self._pointers, self._itemsize
        for a, b in scan_ranges(len(pointers), _CHECK_CHUNK):
            end = int(pointers[a]) if a else 0  # where the next sequence must start, in bytes
            size = np.asarray(lengths[a:b], dtype=np.int64)
            if np.any(size < 0):
                i = a + int(np.flatnonzero(size < 0)[0])
                raise DataError(
                    f"{str(idx_path)!r} gives sequence {i:,} a negative length "
                    f"({int(lengths[i]):,}); sequence lengths are token counts, 0 or more"
                )
            ends = np.cumsum(size * itemsize) + end  # where each sequence ends
            want = np.concatenate(([end], ends[:-1]))
            part = np.asarray(pointers[a:b])
            if np.any(part != want):
                j = int(np.flatnonzero(part != want)[0])
                raise DataError(
                    f"{str(idx_path)!r} has inconsistent sequence pointers: sequence "
                    f"{a + j:,} starts at byte {int(part[j]):,}, but the sequences before it "
                    f"end at byte {int(want[j]):,}; each sequence must start where the "
                    f"previous one ends (pointer = previous pointer + length × "
                    f"{itemsize} bytes, from 0)"
                )
