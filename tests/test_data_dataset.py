"""Streaming windows: exact partitioning, determinism, exact resume, mixtures.

The fake corpora are ``arange`` token streams, so a window is identified by its first token.
"""

from __future__ import annotations

import itertools
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mamba_train.data.dataset import TokenWindowDataset, ValWindowDataset
from mamba_train.data.loader import ResumableDataLoader
from mamba_train.data.sampling import FeistelPermutation, MixSchedule
from mamba_train.data.shards import DataError, write_tokens

L = 4  # seq_len
TOK = {"name": "fake", "vocab_size": 10_000_000, "eos_id": 0}


def make_source(path, num_windows, offset=0, per_shard=37):
    """A split whose window w starts with token offset + w * L (shards cut mid-window)."""
    write_tokens(path, offset + np.arange(num_windows * L + 1), TOK, tokens_per_shard=per_shard)
    return path


@pytest.fixture
def src(tmp_path):
    return make_source(tmp_path / "a", 48)


@pytest.fixture
def mix(tmp_path):
    return [make_source(tmp_path / "a", 30), make_source(tmp_path / "b", 11, offset=1_000_000)]


def first_tokens(batches):
    return [int(x) for b in batches for x in b["input_ids"][:, 0]]


def loader(paths, rank=0, world=1, workers=0, batch=2, seed=1, weights=None):
    ds = TokenWindowDataset(paths, L, weights=weights, seed=seed, rank=rank, world_size=world)
    return ResumableDataLoader(ds, batch_size=batch, num_workers=workers)


def test_window_contents(src):
    b = next(iter(loader([src], batch=3)))
    assert b["input_ids"].shape == b["labels"].shape == (3, L)
    assert b["input_ids"].dtype == b["labels"].dtype == torch.int64
    assert (b["labels"] == b["input_ids"] + 1).all()  # next-token labels, across shard cuts
    assert (b["input_ids"][:, 0] % L == 0).all()  # stride seq_len


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_partition_no_overlap_no_gap(src, world, workers):
    """One epoch over all ranks (and workers) consumes every window exactly once."""
    seen = []
    for rank in range(world):
        dl = loader([src], rank, world, workers, batch=2)
        assert len(dl) == 48 // (world * 2)
        seen += first_tokens(dl)
    assert sorted(seen) == [w * L for w in range(48)]


@pytest.mark.parametrize("world,workers", [(2, 2), (3, 1)])
def test_ranks_and_workers_reproduce_single_process_stream(mix, world, workers):
    """Interleaving the ranks' streams (global sample i = rank i % world) gives back exactly
    the single-process stream, for a mixture over several epochs of the small source."""
    steps = 12
    ref = first_tokens(itertools.islice(_batches(loader(mix, batch=2)), steps * world))
    per_rank = [first_tokens(itertools.islice(_batches(loader(mix, r, world, workers, batch=2)), steps))
                for r in range(world)]
    merged = [per_rank[i % world][i // world] for i in range(steps * 2 * world)]
    assert merged == ref


def _batches(dl):
    """Iterate a training loader across its nominal epochs, as Lightning does."""
    while True:
        yield from dl


def test_epochs_reshuffle_and_cover(src):
    dl = loader([src], batch=4)
    e1, e2 = first_tokens(dl), first_tokens(dl)
    assert sorted(e1) == sorted(e2) == [w * L for w in range(48)] and e1 != e2
    assert dl.epoch == 2


def test_determinism_by_seed(src):
    a = first_tokens(loader([src], seed=7))
    assert a == first_tokens(loader([src], seed=7, workers=2))
    assert a != first_tokens(loader([src], seed=8))


@pytest.mark.parametrize("paths_key", ["single", "mix"])
@pytest.mark.parametrize("k", [3, 7, 24, 31])
def test_exact_resume_with_other_num_workers(src, mix, paths_key, k):
    paths = [src] if paths_key == "single" else mix
    total = 40
    ref = first_tokens(itertools.islice(_batches(loader(paths, workers=0)), total))
    dl = loader(paths, workers=2)
    head = first_tokens(itertools.islice(_batches(dl), k))  # abandons a live iterator mid-epoch
    state = dl.state_dict()
    assert state["samples_yielded"] == 2 * k
    resumed = loader(paths, workers=1)
    resumed.load_state_dict(state)
    tail = first_tokens(itertools.islice(_batches(resumed), total - k))
    assert head + tail == ref


def test_resume_refuses_other_data(src, mix):
    state = loader([src]).state_dict()
    with pytest.raises(DataError, match="checkpoint has seed=1, this run has 2"):
        loader([src], seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="fingerprint"):
        loader(mix[1:]).load_state_dict(state)


def test_resume_with_other_world_size(src):
    dl = loader([src], rank=1, world=2)
    list(itertools.islice(iter(dl), 3))
    single = loader([src])
    single.load_state_dict(dl.state_dict())
    assert single.samples_yielded == 12  # same global position: 3 batches x 2 x 2 ranks


def test_mixture_proportions(tmp_path):
    paths = [make_source(tmp_path / "a", 100), make_source(tmp_path / "b", 100, offset=1_000_000)]
    got = first_tokens(itertools.islice(_batches(loader(paths, batch=8, weights=[0.7, 0.3])), 250))
    share_a = sum(t < 1_000_000 for t in got) / len(got)
    assert len(got) == 2000 and abs(share_a - 0.7) <= 0.03
    assert abs(share_a - 0.7) <= 1 / 2000  # the schedule is exact to within one sample


@pytest.mark.parametrize("weights,seed", [([0.7, 0.3], 0), ([1, 1, 1], 3), ([0.5, 0.25, 0.2, 0.05], 7)])
def test_mix_schedule_matches_brute_force(weights, seed):
    m = MixSchedule(weights, seed)
    events = sorted((Fraction(n * m.P + p, a), s, n) for s, (a, p) in enumerate(zip(m.shares, m.phases))
                    for n in range(1500))
    assert [m.locate(i) for i in range(1000)] == [(s, n) for _, s, n in events[:1000]]
    counts = Counter(s for _, s, _ in events[:1000])
    for s, w in enumerate(weights):
        assert abs(counts[s] - 1000 * w / sum(weights)) <= 1
    share = np.array(m.shares) / m.total_share  # every prefix, within the documented bound
    dev = np.abs(np.cumsum(np.eye(len(weights))[[s for _, s, _ in events[:1000]]], 0)
                 - np.arange(1, 1001)[:, None] * share).max(0)
    assert (dev <= 1 + (len(weights) - 2) * share + 1e-9).all() and (len(weights) > 2 or dev.max() <= 1)
    m.locate(10**15)  # closed form: no replay


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_feistel_is_a_permutation(n):
    assert sorted(map(FeistelPermutation(n, 42), range(n))) == list(range(n))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_validation_is_fixed_and_disjoint(mix, world):
    every = [w * L for w in range(30)] + [1_000_000 + w * L for w in range(11)]
    keep = len(every) // world * world  # equal work per rank; the short tail is dropped
    seen = []
    for rank in range(world):
        ds = ValWindowDataset(mix, L, rank, world)
        ds.set_range(0, len(ds), chunk=2)
        assert len(ds) == keep // world
        got = first_tokens(DataLoader(ds, batch_size=2, num_workers=2))
        assert got == every[rank:keep:world]  # fixed order, no shuffle
        seen += got
    assert sorted(seen) == every[:keep]


def test_too_small_source(tmp_path):
    write_tokens(tmp_path / "tiny", np.arange(L), TOK)
    with pytest.raises(DataError, match="fewer than one window"):
        TokenWindowDataset([tmp_path / "tiny"], L)


def test_resume_with_rescaled_weights(mix):
    """Weights are ratios: [3, 1] and [1.5, 0.5] give the same order, so either resumes the
    other exactly; other ratios are refused."""
    dl = loader(mix, weights=[3, 1])
    head = first_tokens(itertools.islice(iter(dl), 3))
    resumed = loader(mix, weights=[1.5, 0.5])
    resumed.load_state_dict(dl.state_dict())
    assert head + first_tokens(itertools.islice(_batches(resumed), 5)) == \
        first_tokens(itertools.islice(_batches(loader(mix, weights=[3, 1])), 8))
    with pytest.raises(DataError, match=r"checkpoint has weights=\[3.0, 1.0\], this run has \[2.0, 1.0\]"):
        loader(mix, weights=[2, 1]).load_state_dict(dl.state_dict())
