"""Tests for the duration-bucketed batch sampler and its baselines."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from speechllm.data.bucketing import (
    DurationBucketSampler,
    padded_seconds,
    padding_efficiency,
    random_batches,
    rank_batch_sizes,
    sorted_batches,
    split_batch,
)

BUDGET = 437.0
NUM_BUCKETS = 50
SEED = 13


def _synthetic(num: int = 5000, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(10.0), 0.5, num), 0.1, 30.0).tolist()


@pytest.fixture(scope="module")
def durations() -> list[float]:
    return _synthetic()


def _sampler(durations: list[float], **overrides: object) -> DurationBucketSampler:
    kwargs: dict[str, object] = {"max_padded_seconds": BUDGET, "num_buckets": NUM_BUCKETS, "seed": SEED}
    kwargs.update(overrides)
    return DurationBucketSampler(durations, **kwargs)  # type: ignore[arg-type]


def _epoch(sampler: DurationBucketSampler, epoch: int) -> list[list[int]]:
    sampler.set_epoch(epoch)
    return list(sampler)


def test_deterministic_for_seed_and_epoch(durations: list[float]) -> None:
    assert _epoch(_sampler(durations), 3) == _epoch(_sampler(durations), 3)


def test_epochs_and_seeds_change_the_order(durations: list[float]) -> None:
    sampler = _sampler(durations)
    assert _epoch(sampler, 0) != _epoch(sampler, 1)
    assert _epoch(sampler, 0) != _epoch(_sampler(durations, seed=SEED + 1), 0)


def test_no_shuffle_is_epoch_independent(durations: list[float]) -> None:
    sampler = _sampler(durations, shuffle=False)
    assert _epoch(sampler, 0) == _epoch(sampler, 1)


def test_every_index_exactly_once_single_rank(durations: list[float]) -> None:
    sampler = _sampler(durations)
    for epoch in range(3):
        batches = _epoch(sampler, epoch)
        assert len(batches) == len(sampler)
        assert sorted(itertools.chain.from_iterable(batches)) == list(range(len(durations)))


@pytest.mark.parametrize("num_replicas", [2, 3, 8])
def test_global_budget_splits_every_batch_over_the_ranks(durations: list[float], num_replicas: int) -> None:
    """The default (ESPnet): at every step the ranks' sub-batches together are the one-rank batch.

    A global batch holds an utterance for every rank; a one-rank sampler with that minimum packs the same
    ones.
    """
    single = _epoch(_sampler(durations, min_batch_size=num_replicas), 1)
    assert min(len(batch) for batch in single) >= num_replicas
    per_rank = [
        _epoch(_sampler(durations, num_replicas=num_replicas, rank=rank), 1) for rank in range(num_replicas)
    ]
    assert all(len(batches) == len(single) for batches in per_rank)
    for step, batch in enumerate(single):
        shares = [batches[step] for batches in per_rank]
        assert sorted(i for share in shares for i in share) == sorted(batch)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
        # Longest first, then strided: rank 0 holds the longest utterance, shares have similar padded sizes.
        assert max(durations[i] for i in batch) == durations[shares[0][0]]
        assert shares == [split_batch(batch, durations, num_replicas, r) for r in range(num_replicas)]


@pytest.mark.parametrize("num_replicas", [2, 3, 8])
def test_per_rank_budget_gives_whole_batches(durations: list[float], num_replicas: int) -> None:
    per_rank = [
        _epoch(_sampler(durations, num_replicas=num_replicas, rank=rank, batch_budget="per_rank"), 1)
        for rank in range(num_replicas)
    ]
    assert len({len(batches) for batches in per_rank}) == 1
    covered = Counter(i for batches in per_rank for batch in batches for i in batch)
    assert set(covered) == set(range(len(durations)))
    single = _epoch(_sampler(durations), 1)
    # Padding repeats at most num_replicas - 1 whole batches.
    assert sum(len(batches) for batches in per_rank) - len(single) < num_replicas


def test_per_rank_more_replicas_than_batches_still_balanced() -> None:
    durations = [1.0, 2.0, 3.0]
    num_replicas = 4
    per_rank = [
        list(
            DurationBucketSampler(
                durations, 100.0, 2, SEED, num_replicas=num_replicas, rank=rank, batch_budget="per_rank"
            )
        )
        for rank in range(num_replicas)
    ]
    assert all(len(batches) == 1 for batches in per_rank)
    assert {i for batches in per_rank for batch in batches for i in batch} == {0, 1, 2}


@pytest.mark.parametrize("max_batch_size", [None, 3, 5])
def test_global_batches_hold_an_utterance_for_every_rank(max_batch_size: int | None) -> None:
    """ESPnet's minimum of world-size utterances: packing goes over the budget to reach it, a bucket's smaller
    tail moves to the next bucket and a last remainder is spread over the batches before it."""
    num_replicas, budget = 3, 10.0
    durations = [4.0] * 11 + [12.0, 15.0]  # 2 fit the budget, the long ones not even alone
    per_rank = [
        _epoch(
            _sampler(
                durations,
                max_padded_seconds=budget,
                num_buckets=2,
                num_replicas=num_replicas,
                rank=rank,
                max_batch_size=max_batch_size,
            ),
            0,
        )
        for rank in range(num_replicas)
    ]
    steps = list(zip(*per_rank, strict=True))
    assert all(len(share) >= 1 for step in steps for share in step)
    assert sorted(i for step in steps for share in step for i in share) == list(range(len(durations)))
    # 13 utterances, 3 a batch: the one left over joins a batch (over the cap 3: every batch is full).
    assert sorted(sum(map(len, step)) for step in steps) == [3, 3, 3, 4]


def test_global_split_rejects_what_cannot_give_every_rank_an_utterance() -> None:
    with pytest.raises(ValueError, match="max_batch_size \\(1\\) is smaller than the 2 processes"):
        DurationBucketSampler([1.0] * 4, 10.0, 1, SEED, num_replicas=2, max_batch_size=1)
    with pytest.raises(ValueError, match="2 utterances cannot fill a batch for each of 3 processes"):
        DurationBucketSampler([1.0] * 2, 10.0, 1, SEED, num_replicas=3)
    # Either is fine with whole batches per rank, or with one rank.
    DurationBucketSampler([1.0] * 2, 10.0, 1, SEED, num_replicas=3, batch_budget="per_rank", max_batch_size=1)
    DurationBucketSampler([1.0], 10.0, 1, SEED, max_batch_size=1)
    with pytest.raises(ValueError, match="batch_budget"):
        DurationBucketSampler([1.0], 10.0, 1, SEED, batch_budget="local")


@pytest.mark.parametrize(
    ("seconds", "budget", "num_replicas", "batch_budget", "max_batch_size"),
    [
        (12.0, 437.5, 2, "global", None),  # 36 -> 18 + 18
        (12.0, 450.0, 2, "global", None),  # 37 -> 19 + 18
        (12.0, 37.5, 4, "global", None),  # 3 fit, 4 needed -> 1 each
        (12.0, 37.5, 4, "per_rank", None),
        (3.0, 16.0, 3, "global", 4),  # 5 fit, capped at 4 -> 2 + 1 + 1
        (20.0, 20.0, 1, "global", 1),
        (40.0, 20.0, 2, "global", None),  # longer than the budget: 2 anyway
    ],
)
def test_rank_batch_sizes_are_what_the_sampler_hands_out(
    seconds: float, budget: float, num_replicas: int, batch_budget: str, max_batch_size: int | None
) -> None:
    expected = rank_batch_sizes(seconds, budget, num_replicas, batch_budget, max_batch_size)
    durations = [seconds] * 200
    first = [
        next(
            iter(
                DurationBucketSampler(
                    durations,
                    budget,
                    3,
                    SEED,
                    num_replicas=num_replicas,
                    rank=rank,
                    max_batch_size=max_batch_size,
                    batch_budget=batch_budget,
                )
            )
        )
        for rank in range(num_replicas)
    ]
    assert expected == [len(batch) for batch in first]
    assert rank_batch_sizes(12.0, 437.5, 2) == [18, 18]
    assert rank_batch_sizes(12.0, 450.0, 2) == [19, 18]


def test_budget_respected_and_oversized_items_alone() -> None:
    durations = _synthetic(2000, seed=5) + [50.0, 80.0]
    budget = 40.0
    batches = list(DurationBucketSampler(durations, budget, 10, SEED))
    assert sorted(itertools.chain.from_iterable(batches)) == list(range(len(durations)))
    for batch in batches:
        if padded_seconds(batch, durations) > budget:
            assert len(batch) == 1 and durations[batch[0]] > budget
    oversized = [batch for batch in batches if any(durations[i] > budget for i in batch)]
    assert sorted(oversized) == [[len(durations) - 2], [len(durations) - 1]]


def test_max_batch_size_caps_items(durations: list[float]) -> None:
    cap = 7
    batches = list(_sampler(durations, max_batch_size=cap))
    assert max(len(batch) for batch in batches) <= cap
    assert sorted(itertools.chain.from_iterable(batches)) == list(range(len(durations)))


def test_min_batch_size_carries_bucket_tails(durations: list[float]) -> None:
    minimum = 5
    assert min(len(batch) for batch in _sampler(durations)) < minimum  # without it bucket tails are small
    batches = list(_sampler(durations, min_batch_size=minimum))
    assert sorted(itertools.chain.from_iterable(batches)) == list(range(len(durations)))
    # Tails move to the next bucket, the longest bucket's remainder is spread over the batches before it.
    assert min(len(batch) for batch in batches) >= minimum


@pytest.mark.parametrize("batch_budget", ["global", "per_rank"])
@pytest.mark.parametrize(("num_replicas", "consumed"), [(1, 0), (1, 17), (2, 5), (3, 40)])
def test_resume_yields_exactly_the_remaining_batches(
    durations: list[float], num_replicas: int, consumed: int, batch_budget: str
) -> None:
    epoch = 2
    for rank in range(num_replicas):
        options = {"num_replicas": num_replicas, "rank": rank, "batch_budget": batch_budget}
        reference = _epoch(_sampler(durations, **options), epoch)
        original = _sampler(durations, **options)
        original.set_epoch(epoch)
        head = list(itertools.islice(iter(original), consumed))
        state = original.state_dict()
        assert state == {"epoch": epoch, "position": consumed, "seed": SEED}

        # A fresh sampler with a different seed must take everything from the state.
        restored = _sampler(durations, **options, seed=SEED + 99)
        restored.load_state_dict(state)
        restored.set_epoch(epoch)  # the usual training loop call must not discard the resume point
        assert head + list(restored) == reference
        # Afterwards the sampler behaves normally again.
        assert _epoch(restored, epoch + 1) == _epoch(_sampler(durations, **options), epoch + 1)


def test_state_after_full_epoch_resumes_to_nothing(durations: list[float]) -> None:
    sampler = _sampler(durations)
    full = _epoch(sampler, 0)
    state = sampler.state_dict()
    assert state["position"] == len(full)
    restored = _sampler(durations)
    restored.load_state_dict(state)
    assert list(restored) == []
    # Without a pending resume, iterating again replays the whole epoch.
    assert list(restored) == full


class _IndexDataset(Dataset[torch.Tensor]):
    def __init__(self, durations: list[float]) -> None:
        self.durations = durations

    def __len__(self) -> int:
        return len(self.durations)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(index)


def test_works_as_dataloader_batch_sampler(durations: list[float]) -> None:
    sampler = _sampler(durations)
    loader = DataLoader(_IndexDataset(durations), batch_sampler=sampler)
    sampler.set_epoch(1)
    seen = [batch.tolist() for batch in loader]
    assert len(loader) == len(sampler) == len(seen)
    assert seen == _epoch(_sampler(durations), 1)
    assert sampler.state_dict()["position"] == len(seen)


def test_efficiency_beats_random_and_reaches_target() -> None:
    durations = _synthetic(20_000, seed=1)
    ours = padding_efficiency(list(_sampler(durations)), durations)
    assert ours >= 0.95
    assert ours > padding_efficiency(random_batches(durations, BUDGET, SEED), durations)
    # Fully sorted bins are the upper bound we trade some efficiency against for randomness.
    assert padding_efficiency(sorted_batches(durations, BUDGET), durations) >= ours


def test_baselines_cover_everything_within_budget(durations: list[float]) -> None:
    for batches in (random_batches(durations, BUDGET, SEED), sorted_batches(durations, BUDGET)):
        assert sorted(itertools.chain.from_iterable(batches)) == list(range(len(durations)))
        assert all(padded_seconds(batch, durations) <= BUDGET for batch in batches)


def test_padding_efficiency_values() -> None:
    durations = [1.0, 2.0, 4.0]
    assert padding_efficiency([[0, 1, 2]], durations) == pytest.approx(7.0 / 12.0)
    assert padding_efficiency([[0], [1], [2]], durations) == pytest.approx(1.0)
    assert padding_efficiency([], durations) == 1.0


def test_invalid_arguments_rejected() -> None:
    with pytest.raises(ValueError):
        DurationBucketSampler([1.0], 0.0, 1, SEED)
    with pytest.raises(ValueError):
        DurationBucketSampler([1.0], 10.0, 0, SEED)
    with pytest.raises(ValueError):
        DurationBucketSampler([1.0], 10.0, 1, SEED, num_replicas=2, rank=2)
    with pytest.raises(ValueError):
        DurationBucketSampler([-1.0], 10.0, 1, SEED)
    with pytest.raises(ValueError):
        DurationBucketSampler([1.0], 10.0, 1, SEED, max_batch_size=1, min_batch_size=2)
