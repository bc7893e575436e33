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
    sorted_batches,
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
def test_ranks_cover_everything_with_equal_counts(durations: list[float], num_replicas: int) -> None:
    per_rank = [
        _epoch(_sampler(durations, num_replicas=num_replicas, rank=rank), 1) for rank in range(num_replicas)
    ]
    assert len({len(batches) for batches in per_rank}) == 1
    covered = Counter(i for batches in per_rank for batch in batches for i in batch)
    assert set(covered) == set(range(len(durations)))
    single = _epoch(_sampler(durations), 1)
    # Padding repeats at most num_replicas - 1 whole batches.
    assert sum(len(batches) for batches in per_rank) - len(single) < num_replicas


def test_more_replicas_than_batches_still_balanced() -> None:
    durations = [1.0, 2.0, 3.0]
    num_replicas = 4
    per_rank = [
        list(DurationBucketSampler(durations, 100.0, 2, SEED, num_replicas=num_replicas, rank=rank))
        for rank in range(num_replicas)
    ]
    assert all(len(batches) == 1 for batches in per_rank)
    assert {i for batches in per_rank for batch in batches for i in batch} == {0, 1, 2}


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
    batches = list(_sampler(durations, min_batch_size=minimum))
    assert sorted(itertools.chain.from_iterable(batches)) == list(range(len(durations)))
    # Only the longest bucket's remainder may stay undersized.
    assert sum(len(batch) < minimum for batch in batches) <= 1


@pytest.mark.parametrize(("num_replicas", "consumed"), [(1, 0), (1, 17), (2, 5), (3, 40)])
def test_resume_yields_exactly_the_remaining_batches(
    durations: list[float], num_replicas: int, consumed: int
) -> None:
    epoch = 2
    for rank in range(num_replicas):
        reference = _epoch(_sampler(durations, num_replicas=num_replicas, rank=rank), epoch)
        original = _sampler(durations, num_replicas=num_replicas, rank=rank)
        original.set_epoch(epoch)
        head = list(itertools.islice(iter(original), consumed))
        state = original.state_dict()
        assert state == {"epoch": epoch, "position": consumed, "seed": SEED}

        # A fresh sampler with a different seed must take everything from the state.
        restored = _sampler(durations, num_replicas=num_replicas, rank=rank, seed=SEED + 99)
        restored.load_state_dict(state)
        restored.set_epoch(epoch)  # the usual training loop call must not discard the resume point
        assert head + list(restored) == reference
        # Afterwards the sampler behaves normally again.
        assert _epoch(restored, epoch + 1) == _epoch(
            _sampler(durations, num_replicas=num_replicas, rank=rank), epoch + 1
        )


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
