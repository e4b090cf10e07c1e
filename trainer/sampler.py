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

from typing import Any

import numpy as np
import torch

from yoto.errors import DataError

from .corpus import Corpus


class Sampler:
    def __init__(self, corpus: Corpus, seq_len: int, seed: int) -> None:
        self.seq_len = seq_len
        self.seed = seed
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
        self.position = 0
        self._epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    @property
    def num_windows(self) -> int:
        return len(self.starts)

    def _windows(self, first: int, count: int) -> np.ndarray:
        """Window indices of sequences [first, first + count) of the run."""
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

    def next_global_batch(self, size: int) -> np.ndarray:
        """Window indices of the next optimizer step's ``size`` sequences; advances."""
        windows = self._windows(self.position, size)
        self.position += size
        return windows

    def micro_batch(
        self, windows: np.ndarray, micro: int, rank: int, world: int, micro_size: int
    ) -> torch.Tensor:
        """Tokens (micro_size, seq_len + 1) of this rank's micro-batch ``micro``."""
        first = (micro * world + rank) * micro_size
        chosen = windows[first : first + micro_size]
        if len(chosen) != micro_size:
            raise ValueError(
                f"micro-batch {micro} of rank {rank} is outside a global batch of {len(windows)}"
            )
        rows = self.starts[chosen][:, None] + np.arange(self.seq_len + 1)[None, :]
        return torch.from_numpy(self.tokens[rows].astype(np.int64))

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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mismatch = [
            f"{key} {state.get(key)!r} then, {now!r} now"
            for key, now in (
                ("seed", self.seed),
                ("num_windows", self.num_windows),
                ("seq_len", self.seq_len),
                ("sources", list(self.sources)),
            )
            if state.get(key) != now
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
