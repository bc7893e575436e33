"""Duration-bucketed dynamic batching for speech utterances.

Batches are sized by a *padded-seconds* budget (``len(batch) * longest item``, the quantity ESPnet calls
``batch_bins``) instead of a fixed batch size, so short utterances travel in large batches and long ones
in small batches while the padded tensor stays roughly constant in memory.

``DurationBucketSampler`` groups utterances of similar length into buckets (equal-count quantiles of the
duration distribution), shuffles and packs inside each bucket, then shuffles the batch order across
buckets. This keeps most of the padding savings of fully sorted batching while still giving SGD a fresh,
random batch composition and order every epoch.

Distributed training: every rank builds the same global batch list from ``(seed, epoch)`` without any
communication; the list is padded to a multiple of ``num_replicas`` by repeating batches from its start
and rank ``r`` takes every ``num_replicas``-th batch beginning at ``r``. Each rank therefore yields the
same number of batches (needed so collective ops do not hang), the union covers every utterance, and at
most ``num_replicas - 1`` batches per epoch are seen twice. Splitting global batches into per-rank
sub-batches was rejected because it would make per-GPU padded sizes uneven and the budget meaningless.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

Batch = list[int]


def _validate_durations(durations: Sequence[float]) -> np.ndarray:
    """Convert to a float array and reject values that would break the padded-size arithmetic."""
    array = np.asarray(durations, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"durations must be one-dimensional, got shape {array.shape}")
    if array.size and (not np.all(np.isfinite(array)) or np.any(array < 0)):
        raise ValueError("durations must be finite and non-negative")
    return array


def _check_budget(max_padded_seconds: float) -> None:
    if not max_padded_seconds > 0:
        raise ValueError(f"max_padded_seconds must be positive, got {max_padded_seconds}")


def _pack_greedy(
    order: Sequence[int] | np.ndarray,
    durations: np.ndarray,
    max_padded_seconds: float,
    max_batch_size: int | None = None,
) -> list[Batch]:
    """Pack indices in the given order, closing a batch when the next item would break the budget.

    An item longer than the budget cannot share a batch with anything, so the size check closes the
    batch before and after it and it ends up alone: data is never dropped.
    """
    batches: list[Batch] = []
    batch: Batch = []
    longest = 0.0
    for index in order:
        duration = float(durations[index])
        grown_longest = max(longest, duration)
        too_padded = (len(batch) + 1) * grown_longest > max_padded_seconds
        too_many = max_batch_size is not None and len(batch) >= max_batch_size
        if batch and (too_padded or too_many):
            batches.append(batch)
            batch, grown_longest = [], duration
        batch.append(int(index))
        longest = grown_longest
    if batch:
        batches.append(batch)
    return batches


def padded_seconds(batch: Sequence[int], durations: Sequence[float] | np.ndarray) -> float:
    """Padded size of one batch: every item is padded to the longest one."""
    if not batch:
        return 0.0
    return len(batch) * max(float(durations[i]) for i in batch)


def padding_efficiency(batches: Sequence[Sequence[int]], durations: Sequence[float] | np.ndarray) -> float:
    """Real frames divided by padded frames over all batches (1.0 means no padding at all)."""
    real = sum(float(durations[i]) for batch in batches for i in batch)
    padded = sum(padded_seconds(batch, durations) for batch in batches)
    # No padded frames means nothing was wasted; avoid 0/0 for empty or all-zero inputs.
    return real / padded if padded > 0 else 1.0


def random_batches(durations: Sequence[float], max_padded_seconds: float, seed: int) -> list[Batch]:
    """Baseline: shuffle all utterances, then pack greedily in that order under the same budget."""
    _check_budget(max_padded_seconds)
    array = _validate_durations(durations)
    order = np.random.default_rng(seed).permutation(array.size)
    return _pack_greedy(order, array, max_padded_seconds)


def sorted_batches(durations: Sequence[float], max_padded_seconds: float) -> list[Batch]:
    """Baseline mirroring ESPnet's "length" batch type: sort longest first and fill bins greedily."""
    _check_budget(max_padded_seconds)
    array = _validate_durations(durations)
    # Stable sort on the negated durations keeps ties in index order, so the result is reproducible.
    order = np.argsort(-array, kind="stable")
    return _pack_greedy(order, array, max_padded_seconds)


class DurationBucketSampler:
    """Batch sampler (for ``DataLoader(batch_sampler=...)``) that buckets utterances by duration.

    Per epoch: utterances are sorted by duration and cut into ``num_buckets`` equal-count buckets; each
    bucket is shuffled and packed greedily so that ``len(batch) * longest <= max_padded_seconds`` (an item
    longer than the budget becomes a batch of its own); the batches of all buckets are then shuffled
    together. Randomness comes from ``numpy.random.default_rng((seed, epoch))``, so the plan is a pure
    function of ``(seed, epoch)`` and identical on every rank.

    ``min_batch_size`` is best effort: a bucket's final batch that is smaller than it is carried into the
    next (longer) bucket and packed there instead of forming a tiny batch; the last bucket's remainder is
    kept as is. ``max_batch_size`` caps the number of items per batch.

    Because packing follows the shuffled order, the number of batches can differ slightly between
    epochs; ``len()`` reports it for the current epoch.

    Resuming: ``state_dict()`` records how many batches this rank has *handed out* in the current epoch.
    With ``num_workers > 0`` the DataLoader prefetches ahead of the training loop, so a trainer that wants
    exact resumption should store its own count of consumed steps as ``position`` instead.
    """

    def __init__(
        self,
        durations: Sequence[float],
        max_padded_seconds: float,
        num_buckets: int,
        seed: int,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        max_batch_size: int | None = None,
        min_batch_size: int = 1,
    ) -> None:
        _check_budget(max_padded_seconds)
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        if min_batch_size < 1:
            raise ValueError(f"min_batch_size must be >= 1, got {min_batch_size}")
        if max_batch_size is not None and max_batch_size < min_batch_size:
            raise ValueError(
                f"max_batch_size ({max_batch_size}) must be >= min_batch_size ({min_batch_size})"
            )
        self.durations = _validate_durations(durations)
        self.max_padded_seconds = float(max_padded_seconds)
        self.num_buckets = num_buckets
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.max_batch_size = max_batch_size
        self.min_batch_size = min_batch_size
        self.epoch = 0
        # Batches handed out in the current pass over ``self.epoch``.
        self._position = 0
        # Offset requested by ``load_state_dict``; consumed by the next ``__iter__`` only.
        self._resume_position: int | None = None
        self._buckets = self._make_buckets()
        self._plan_key: tuple[int, int] | None = None
        self._plan: list[Batch] = []

    def _make_buckets(self) -> list[np.ndarray]:
        """Equal-count buckets over the duration-sorted indices (i.e. split at duration quantiles)."""
        order = np.argsort(self.durations, kind="stable")
        return [bucket for bucket in np.array_split(order, self.num_buckets) if bucket.size]

    def _global_batches(self, rng: np.random.Generator | None) -> list[Batch]:
        """Pack every bucket, carrying undersized tails forward, and optionally shuffle the batch order."""
        batches: list[Batch] = []
        carry = np.empty(0, dtype=np.int64)
        for bucket_index, bucket in enumerate(self._buckets):
            members = rng.permutation(bucket) if rng is not None else bucket
            # Carried items go first so they join the first batch of this bucket.
            packed = _pack_greedy(
                np.concatenate([carry, members]), self.durations, self.max_padded_seconds, self.max_batch_size
            )
            is_last = bucket_index == len(self._buckets) - 1
            if not is_last and len(packed[-1]) < self.min_batch_size:
                carry = np.asarray(packed.pop(), dtype=np.int64)
            else:
                carry = np.empty(0, dtype=np.int64)
            batches.extend(packed)
        if rng is not None:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _rank_batches(self, global_batches: list[Batch]) -> list[Batch]:
        """Pad to a multiple of ``num_replicas`` by repeating leading batches, then take this rank's stride."""
        if not global_batches:
            return []
        total = len(global_batches)
        padded_total = -(-total // self.num_replicas) * self.num_replicas
        # Cycling covers the corner case of fewer batches than replicas.
        padded = [global_batches[i % total] for i in range(padded_total)]
        return padded[self.rank :: self.num_replicas]

    def _current_plan(self) -> list[Batch]:
        """This rank's batches for the current epoch, cached because packing is not free."""
        key = (self.seed, self.epoch)
        if self._plan_key != key:
            rng = np.random.default_rng(key) if self.shuffle else None
            self._plan = self._rank_batches(self._global_batches(rng))
            self._plan_key = key
        return self._plan

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose plan the next ``__iter__`` yields (call before each epoch)."""
        if epoch != self.epoch:
            # A pending resume belongs to the loaded epoch; moving on invalidates it.
            self._resume_position = None
            self._position = 0
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._current_plan())

    def __iter__(self) -> Iterator[Batch]:
        plan = self._current_plan()
        start = self._resume_position if self._resume_position is not None else 0
        self._resume_position = None
        self._position = start
        for batch in plan[start:]:
            # Count before yielding so a state_dict taken after receiving k batches reports k.
            self._position += 1
            yield list(batch)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self._position, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore so that the next ``__iter__`` yields exactly the batches not yet consumed."""
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"position must be non-negative, got {position}")
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self._position = position
        self._resume_position = position
