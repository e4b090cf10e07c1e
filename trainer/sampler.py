"""Deterministic, resumable, skippable packed-sequence sampler.

Each source's training stream is cut into windows of ``seq_len + 1`` tokens (inputs and
shifted targets). Sequence ``k`` of the run is a pure function of ``(seed, k)``: epoch
``k // N`` is a seeded permutation of all N windows, so sources are mixed in proportion to
their size. The sampler's whole state is one integer, ``position`` (sequences consumed):
saving it resumes bit-exactly, and skipping bad data after a rollback is ``position += n``.

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

_BLOCK = 4096  # source draws of the mixture are made this many at a time


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
    def __init__(self, corpus: Corpus, seq_len: int, seed: int, alpha: float = 1.0) -> None:
        self.seq_len = seq_len
        self.seed = seed
        self.alpha = alpha
        streams = [s.train for s in corpus.sources.values()]
        self.sources = list(corpus.sources)
        self.tokens = np.concatenate(streams)
        counts = np.array([max(0, (len(s) - 1) // seq_len) for s in streams], dtype=np.int64)
        for name, count in zip(self.sources, counts, strict=True):
            if count == 0:
                raise DataError(
                    f"data source {name!r} is shorter than one training sequence "
                    f"(model.seq_len + 1 = {seq_len + 1} tokens)"
                )
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in streams])[:-1]])
        # start token of every window, source by source
        self.starts = np.concatenate(
            [
                off + np.arange(n, dtype=np.int64) * seq_len
                for off, n in zip(offsets, counts, strict=True)
            ]
        )
        self.window_source = np.repeat(np.arange(len(streams)), counts)
        # the document index over the joined streams (global token offsets, ids)
        splits = list(corpus.sources.values())
        starts = [np.asarray(s.doc_starts, dtype=np.int64) for s in splits]
        self.doc_starts = np.concatenate(
            [np.zeros(0, dtype=np.int64)] + [o + d for o, d in zip(offsets, starts, strict=True)]
        )
        self.doc_ids = [i for s in splits for i in s.doc_ids]
        self._stream_starts = offsets
        self.position = 0
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)
        # the temperature mixture (alpha != 1): p_i ~ n_i^alpha over the sources' tokens
        sizes = np.array([len(s) for s in streams], dtype=np.float64)
        weights = sizes**alpha
        self.probs = weights / weights.sum()
        self._windows_per_source = counts
        self._first_window = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self._cursor = 0  # the mixture's draw counts below are for positions < cursor
        self._drawn = np.zeros(len(streams), dtype=np.int64)
        self._block: tuple[int, np.ndarray] | None = None
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    @property
    def num_windows(self) -> int:
        return len(self.starts)

    def _windows(self, first: int, count: int) -> np.ndarray:
        """Window indices of sequences [first, first + count) of the run."""
        if self.alpha != 1.0:
            return self._mixture(first, count)
        out = np.empty(count, dtype=np.int64)
        n = self.num_windows
        done = 0
        while done < count:
            k = first + done
            epoch, offset = divmod(k, n)
            if epoch != self._epoch:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(n)
                self._epoch = epoch
            take = min(count - done, n - offset)
            out[done : done + take] = self._perm[offset : offset + take]
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

    def _mixture(self, first: int, count: int) -> np.ndarray:
        """Temperature sampling (mT5, XLM-R): sequence k's source is drawn with probability
        p_i from a generator seeded by (seed, k // _BLOCK); the j-th draw from a source is
        window j of a seeded per-source permutation (a new one each pass over the source).
        Still a pure function of (seed, k): the draw counts before ``first`` are replayed
        when the sampler jumps back (resume, rollback)."""
        if first < self._cursor:
            self._cursor, self._drawn = 0, np.zeros_like(self._drawn)
        if first > self._cursor:
            self._drawn += np.bincount(
                self._sources(self._cursor, first - self._cursor), minlength=len(self.probs)
            )
        sources = self._sources(first, count)
        out = np.empty(count, dtype=np.int64)
        for s in np.unique(sources):
            where = np.flatnonzero(sources == s)
            draws = self._drawn[s] + np.arange(len(where))
            n = self._windows_per_source[s]
            for epoch in np.unique(draws // n):
                sel = draws // n == epoch
                out[where[sel]] = (
                    self._first_window[s] + self._perm_of(int(s), int(epoch))[draws[sel] % n]
                )
            self._drawn[s] += len(where)
        self._cursor = first + count
        return out

    def _perm_of(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._perms:
            if len(self._perms) > 64:
                self._perms.clear()
            n = self._windows_per_source[source]
            self._perms[key] = np.random.default_rng([self.seed, 2, source, epoch]).permutation(n)
        return self._perms[key]

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
        rows = self.starts[chosen][:, None] + np.arange(length + 1)[None, :]
        return torch.from_numpy(self.tokens[rows].astype(np.int64))

    def window(self, window: int, length: int | None = None) -> np.ndarray:
        """The tokens (length + 1,) of one window, as a micro-batch would hold them."""
        length = self.seq_len if length is None else length
        start = int(self.starts[window])
        return self.tokens[start : start + length + 1].astype(np.int64)

    def place(self, window: int, length: int | None = None) -> Place:
        """Source, document and offset of one window (forensics, ``yoto data batch``)."""
        length = self.seq_len if length is None else length
        start = int(self.starts[window])
        src = int(self.window_source[window])
        first = int(np.searchsorted(self.doc_starts, start, side="right")) - 1
        stream_start = int(self._stream_starts[src])
        if first < 0 or self.doc_starts[first] < stream_start:  # no index for this source
            return Place(self.sources[src], "", start - stream_start, 0)
        last = int(np.searchsorted(self.doc_starts, start + length + 1, side="left"))
        return Place(
            self.sources[src],
            self.doc_ids[first],
            start - int(self.doc_starts[first]),
            last - first,
        )

    def windows_at(self, position: int, count: int) -> np.ndarray:
        """Window indices of sequences [position, position + count) of the run, without
        moving the sampler (a pure function of the seed, like every draw)."""
        return self._windows(position, count)

    def sources_of(self, windows: np.ndarray) -> np.ndarray:
        """Source index of each window (names in ``self.sources``)."""
        return self.window_source[windows]

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
            )
            if state.get(key, 1.0 if key == "alpha" else None) != now
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
