"""Deterministic, resumable, skippable packed-sequence sampler.

Each source's training stream (an array, or a memory map of a prepared or Megatron
dataset) is cut into windows of ``seq_len + 1`` tokens (inputs and shifted targets).
Sequence ``k`` of the run is a pure function of ``(seed, k)``: epoch ``k // N`` is a
seeded permutation of all N windows (computed index by index, permutation.py: no array of
N is made), so sources are mixed in proportion to their size. The sampler's whole state
is one integer, ``position`` (sequences consumed): saving it resumes bit-exactly, and
skipping bad data after a rollback is ``position += n``.

An optimizer step consumes the next ``global_batch`` sequences; micro-batch ``m`` of rank
``r`` gets the slice ``[(m * world + r) * micro, ... + micro)`` of them, so the data a step
sees does not depend on how it is split over ranks and accumulation steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from yoto.errors import DataError

from .corpus import Corpus
from .permutation import Permutation
from .tokenizer import BYTES

_BLOCK = 4096  # source draws of the mixture are made this many at a time
ORDER = "feistel-1"  # how sequence k's window is chosen (permutation.py); in checkpoints
# what older checkpoints did not record: their order was a materialised rng.permutation
_BEFORE_WAVE_2 = {"alpha": 1.0, "tokenizer": BYTES, "order": "rng-permutation"}


@dataclass(frozen=True, slots=True)
class Place:
    """Where a training window comes from: its source, the document it starts in (stable
    id, or "" when the source has no document index), the token offset of the window in
    that document, and how many documents the packed window touches."""

    source: str
    doc_id: str
    offset: int
    documents: int


class Sampler:
    """Windows over the sources' training streams (arrays or memory maps), drawn in a
    seeded order that is computed, not stored: nothing here grows with the corpus but the
    per-source tables (a few numbers per source)."""

    def __init__(self, corpus: Corpus, seq_len: int, seed: int, alpha: float = 1.0) -> None:
        self.seq_len = seq_len
        self.seed = seed
        self.alpha = alpha
        self.tokenizer = corpus.tokenizer
        self.splits = list(corpus.sources.values())
        self.sources = list(corpus.sources)
        self.streams = [s.train for s in self.splits]
        counts = np.array([max(0, (len(s) - 1) // seq_len) for s in self.streams], dtype=np.int64)
        for name, count in zip(self.sources, counts, strict=True):
            if count == 0:
                raise DataError(
                    f"data source {name!r} is shorter than one training sequence "
                    f"(model.seq_len + 1 = {seq_len + 1} tokens)"
                )
        self._windows_per_source = counts
        self._first_window = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self._num_windows = int(counts.sum())
        self.position = 0
        self._perms: dict[tuple[int, ...], Permutation] = {}
        # the temperature mixture (alpha != 1): p_i ~ n_i^alpha over the sources' tokens
        sizes = np.array([len(s) for s in self.streams], dtype=np.float64)
        weights = sizes**alpha
        self.probs = weights / weights.sum()
        self._block: tuple[int, np.ndarray] | None = None
        # draws per source before each mixture block (grows with the run's position / 4096)
        self._before_block: list[np.ndarray] = [np.zeros(len(self.streams), dtype=np.int64)]

    @property
    def num_windows(self) -> int:
        return self._num_windows

    def _perm(self, *key: int) -> Permutation:
        if key not in self._perms:
            if len(self._perms) > 64:
                self._perms.clear()
            n = self._num_windows if len(key) == 1 else int(self._windows_per_source[key[1]])
            self._perms[key] = Permutation(n, [self.seed, *key])
        return self._perms[key]

    def _windows(self, first: int, count: int) -> np.ndarray:
        """Window indices of sequences [first, first + count) of the run: epoch ``k // N``
        is a seeded permutation of all N windows."""
        if self.alpha != 1.0:
            return self._mixture(first, count)
        out = np.empty(count, dtype=np.int64)
        n = self._num_windows
        done = 0
        while done < count:
            epoch, offset = divmod(first + done, n)
            take = min(count - done, n - offset)
            out[done : done + take] = self._perm(epoch)(np.arange(offset, offset + take))
            done += take
        return out

    def _choices(self, block: int) -> np.ndarray:
        """The sources of sequences [block * _BLOCK, (block + 1) * _BLOCK)."""
        if self._block is None or self._block[0] != block:
            rng = np.random.default_rng([self.seed, 1, block])
            self._block = (block, rng.choice(len(self.probs), size=_BLOCK, p=self.probs))
        return self._block[1]

    def _sources(self, first: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            block, offset = divmod(first + done, _BLOCK)
            take = min(count - done, _BLOCK - offset)
            out[done : done + take] = self._choices(block)[offset : offset + take]
            done += take
        return out

    def _drawn_before(self, k: int) -> np.ndarray:
        """How many of sequences [0, k) each source gave (a sum over whole blocks, kept,
        and the part of block k // _BLOCK before k)."""
        block, offset = divmod(k, _BLOCK)
        while len(self._before_block) <= block:
            b = len(self._before_block) - 1
            self._before_block.append(
                self._before_block[b] + np.bincount(self._choices(b), minlength=len(self.probs))
            )
        head = np.bincount(self._choices(block)[:offset], minlength=len(self.probs))
        return self._before_block[block] + head

    def _mixture(self, first: int, count: int) -> np.ndarray:
        """Temperature sampling (mT5, XLM-R): sequence k's source is drawn with probability
        p_i from a generator seeded by (seed, k // _BLOCK); the j-th draw from a source is
        window j of a seeded per-source permutation (a new one each pass over the source).
        A pure function of (seed, k)."""
        sources = self._sources(first, count)
        drawn = self._drawn_before(first)
        out = np.empty(count, dtype=np.int64)
        for s in np.unique(sources):
            where = np.flatnonzero(sources == s)
            draws = drawn[s] + np.arange(len(where))
            n = int(self._windows_per_source[s])
            for epoch in np.unique(draws // n):
                sel = draws // n == epoch
                perm = self._perm(2, int(s), int(epoch))
                out[where[sel]] = self._first_window[s] + perm(draws[sel] % n)
        return out

    def _locate(self, window: int) -> tuple[int, int]:
        """(source index, start token in that source's stream) of a window."""
        src = int(np.searchsorted(self._first_window, window, side="right")) - 1
        return src, (window - int(self._first_window[src])) * self.seq_len

    def next_global_batch(self, size: int) -> np.ndarray:
        """Window indices of the next optimizer step's ``size`` sequences; advances."""
        windows = self._windows(self.position, size)
        self.position += size
        return windows

    def micro_batch(
        self,
        windows: np.ndarray,
        micro: int,
        rank: int,
        world: int,
        micro_size: int,
        length: int | None = None,
    ) -> torch.Tensor:
        """Tokens (micro_size, length + 1) of this rank's micro-batch ``micro``: each window's
        first ``length + 1`` tokens (default ``seq_len``; shorter during a sequence-length
        warmup, which truncates the packed windows and drops the rest of each)."""
        first = (micro * world + rank) * micro_size
        chosen = windows[first : first + micro_size]
        if len(chosen) != micro_size:
            raise ValueError(
                f"micro-batch {micro} of rank {rank} is outside a global batch of {len(windows)}"
            )
        length = self.seq_len if length is None else length
        if not 0 < length <= self.seq_len:
            raise ValueError(f"sequence length {length} is outside [1, {self.seq_len}]")
        rows = np.stack([self.window(int(w), length) for w in chosen])
        return torch.from_numpy(rows)

    def window(self, window: int, length: int | None = None) -> np.ndarray:
        """The tokens (length + 1,) of one window, as a micro-batch would hold them (read
        from its source's stream: a memory map reads only these pages)."""
        length = self.seq_len if length is None else length
        src, start = self._locate(window)
        return np.asarray(self.streams[src][start : start + length + 1], dtype=np.int64)

    def place(self, window: int, length: int | None = None) -> Place:
        """Source, document and offset of one window (forensics, ``yoto data batch``)."""
        length = self.seq_len if length is None else length
        src, start = self._locate(window)
        docs = self.splits[src].docs
        if docs is None or len(docs) == 0:  # no index for this source
            return Place(self.sources[src], "", start, 0)
        first = docs.find(start)
        last = docs.find(start + length)
        return Place(self.sources[src], docs.id(first), start - docs.start(first), last - first + 1)

    def windows_at(self, position: int, count: int) -> np.ndarray:
        """Window indices of sequences [position, position + count) of the run, without
        moving the sampler (a pure function of the seed, like every draw)."""
        return self._windows(position, count)

    def sources_of(self, windows: np.ndarray) -> np.ndarray:
        """Source index of each window (names in ``self.sources``)."""
        return np.searchsorted(self._first_window, windows, side="right") - 1

    def skip(self, sequences: int) -> None:
        if sequences < 0:
            raise ValueError("cannot skip a negative number of sequences")
        self.position += sequences

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "seed": self.seed,
            "num_windows": self.num_windows,
            "seq_len": self.seq_len,
            "sources": list(self.sources),
            "alpha": self.alpha,
            "tokenizer": self.tokenizer,
            "order": ORDER,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mismatch = [
            f"{key} {state.get(key)!r} then, {now!r} now"
            for key, now in (
                ("seed", self.seed),
                ("num_windows", self.num_windows),
                ("seq_len", self.seq_len),
                ("sources", list(self.sources)),
                ("alpha", self.alpha),
                ("tokenizer", self.tokenizer),
                ("order", ORDER),
            )
            if state.get(key, _BEFORE_WAVE_2.get(key)) != now
        ]
        if mismatch:
            raise DataError(
                "the training data differ from the checkpoint's ("
                + "; ".join(mismatch)
                + "): resuming would not continue the same run; use the same data.* settings"
            )
        self.position = int(state["position"])


def validation_batches(
    stream: np.ndarray, seq_len: int, micro_size: int, max_batches: int, rank: int, world: int
) -> list[torch.Tensor]:
    """This rank's share of the first ``max_batches * micro_size * world`` validation
    windows of one source (a fixed set, so validation losses compare across steps)."""
    n = max(0, (len(stream) - 1) // seq_len)
    total = min(n, max_batches * micro_size * world)
    mine = np.arange(rank, total, world)
    batches = []
    for i in range(0, len(mine), micro_size):
        starts = mine[i : i + micro_size] * seq_len
        rows = starts[:, None] + np.arange(seq_len + 1)[None, :]
        batches.append(torch.from_numpy(stream[rows].astype(np.int64)))
    return batches
