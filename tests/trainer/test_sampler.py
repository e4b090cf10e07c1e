import numpy as np
import pytest
import torch

from yoto.errors import DataError
from yoto.trainer.data.corpus import Corpus, SourceSplit
from yoto.trainer.data.sampler import Sampler, validation_batches


def corpus(sizes=(1000, 300), seq_len=8) -> Corpus:
    c = Corpus()
    for i, n in enumerate(sizes):
        stream = (np.arange(n) % 250 + i).astype(np.uint16)
        c.sources[f"s{i}"] = SourceSplit(f"s{i}", stream, stream[:50])
    return c


def take(sampler: Sampler, steps: int, batch: int) -> list[np.ndarray]:
    return [sampler.next_global_batch(batch) for _ in range(steps)]


def test_deterministic_from_seed() -> None:
    a, b, c = Sampler(corpus(), 8, 1), Sampler(corpus(), 8, 1), Sampler(corpus(), 8, 2)
    xs, ys, zs = take(a, 5, 16), take(b, 5, 16), take(c, 5, 16)
    assert all(np.array_equal(x, y) for x, y in zip(xs, ys, strict=True))
    assert not all(np.array_equal(x, z) for x, z in zip(xs, zs, strict=True))


def test_resume_from_state_continues_identically() -> None:
    a = Sampler(corpus(), 8, 1)
    take(a, 3, 16)
    state = a.state_dict()
    rest = take(a, 20, 16)  # crosses an epoch boundary (161 windows)
    b = Sampler(corpus(), 8, 1)
    b.load_state_dict(state)
    assert all(np.array_equal(x, y) for x, y in zip(rest, take(b, 20, 16), strict=True))


def test_skip_equals_consuming() -> None:
    a, b = Sampler(corpus(), 8, 1), Sampler(corpus(), 8, 1)
    take(a, 7, 12)
    b.skip(7 * 12)
    assert np.array_equal(a.next_global_batch(12), b.next_global_batch(12))
    with pytest.raises(ValueError):
        b.skip(-1)


def test_each_epoch_visits_every_window_once() -> None:
    s = Sampler(corpus(), 8, 3)
    n = s.num_windows
    assert n == (999 // 8) + (299 // 8)
    first = s.next_global_batch(n)
    assert sorted(first.tolist()) == list(range(n))
    second = s.next_global_batch(n)
    assert sorted(second.tolist()) == list(range(n)) and not np.array_equal(first, second)


def test_split_over_ranks_and_micro_batches_covers_the_global_batch() -> None:
    s = Sampler(corpus(), 8, 1)
    windows = s.next_global_batch(24)
    whole = torch.cat([s.micro_batch(windows, m, 0, 1, 24) for m in range(1)])
    for world, micro in ((2, 4), (3, 2), (1, 8)):
        n_micro = 24 // (world * micro)
        parts = [
            s.micro_batch(windows, m, r, world, micro) for m in range(n_micro) for r in range(world)
        ]
        assert torch.equal(torch.cat(parts), whole)
    assert whole.shape == (24, 9)
    # inputs and targets are shifted views of contiguous text
    row = whole[0].numpy()
    assert np.all(np.diff(row.astype(int)) % 250 == 1)
    with pytest.raises(ValueError, match="outside a global batch"):
        s.micro_batch(windows, 3, 0, 1, 8)


def test_changed_data_refuses_to_resume() -> None:
    state = Sampler(corpus(), 8, 1).state_dict()
    with pytest.raises(DataError, match="num_windows"):
        Sampler(corpus(sizes=(1000, 400)), 8, 1).load_state_dict(state)


def test_tiny_source_is_an_error() -> None:
    with pytest.raises(DataError, match="'s1' is shorter than one training sequence"):
        Sampler(corpus(sizes=(1000, 5)), 8, 1)


def test_validation_shards_are_disjoint_and_fixed() -> None:
    stream = np.arange(1000, dtype=np.uint16) % 256
    full = torch.cat(validation_batches(stream, 8, 4, 3, 0, 1))
    shards = [torch.cat(validation_batches(stream, 8, 2, 3, r, 2)) for r in range(2)]
    assert full.shape == (12, 9)
    assert sum(len(x) for x in shards) == 12
    rows = {tuple(r.tolist()) for x in shards for r in x}
    assert rows == {tuple(r.tolist()) for r in full}  # same windows, however many ranks
