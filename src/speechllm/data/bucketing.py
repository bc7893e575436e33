"""Duration-bucketed dynamic batching for speech utterances.

Batches are sized by a *padded-seconds* budget (``len(batch) * longest item``, the quantity ESPnet calls
``batch_bins``) instead of a fixed batch size, so short utterances travel in large batches and long ones
in small batches while the padded tensor stays roughly constant in memory.

``DurationBucketSampler`` groups utterances of similar length into buckets (equal-count quantiles of the
duration distribution), shuffles and packs inside each bucket, then shuffles the batch order across
buckets. This keeps most of the padding savings of fully sorted batching while still giving SGD a fresh,
random batch composition and order every epoch.

Distributed training (``batch_budget``):

- ``global`` (default, ESPnet): the budget is that of the whole mini-batch. Every rank builds the same global
  batch list from ``(seed, epoch)`` without any communication; a global batch holds at least ``num_replicas``
  utterances (packing goes over the budget to reach that many, a last remainder of fewer joins earlier
  batches), and rank ``r`` takes ``split_batch``: the batch sorted longest first, every ``num_replicas``-th
  item from ``r``. So every rank yields one sub-batch per global batch (same counts, needed so collective ops
  do not hang), and the union of the ranks' sub-batches at each step is the one-process batch. ESPnet
  v.202304 does the same: ``espnet2/tasks/abs_task.py`` ``build_sequence_iter_factory`` sets the length
  sampler's ``min_batch_size`` to the world size and takes ``batch[rank::world_size]``
  (DigitalPhonetics/bloomzmms@77dc192 keeps it in its overlay copy of that file).
- ``per_rank``: every rank packs whole batches of the full budget: the global list is padded to a multiple of
  ``num_replicas`` by repeating batches from its start and rank ``r`` takes every ``num_replicas``-th batch
  beginning at ``r`` (at most ``num_replicas - 1`` batches per epoch are seen twice). The effective batch is
  ``num_replicas`` times the budget.

``rank_batch_sizes`` runs the same packing and split on equal-length utterances; ``speechllm plan`` reads its
per-GPU batch from there.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

Batch = list[int]
BATCH_BUDGETS = ("global", "per_rank")


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


def _check_batch_budget(batch_budget: str) -> None:
    if batch_budget not in BATCH_BUDGETS:
        raise ValueError(f"batch_budget must be one of {BATCH_BUDGETS}, got {batch_budget!r}")


def _pack_greedy(
    order: Sequence[int] | np.ndarray,
    durations: np.ndarray,
    max_padded_seconds: float,
    max_batch_size: int | None = None,
    min_items: int = 1,
) -> list[Batch]:
    """Pack indices in the given order, closing a batch when the next item would break the budget.

    A batch is not closed before it holds ``min_items`` items, even over the budget (ESPnet's length
    sampler: ``bins > batch_bins and bs >= min_batch_size``). With one as the minimum, an item longer than the
    budget cannot share a batch with anything, so the size check closes the batch before and after it and it
    ends up alone: data is never dropped.
    """
    batches: list[Batch] = []
    batch: Batch = []
    longest = 0.0
    for index in order:
        duration = float(durations[index])
        grown_longest = max(longest, duration)
        too_padded = (len(batch) + 1) * grown_longest > max_padded_seconds
        too_many = max_batch_size is not None and len(batch) >= max_batch_size
        if len(batch) >= min_items and (too_padded or too_many):
            batches.append(batch)
            batch, grown_longest = [], duration
        batch.append(int(index))
        longest = grown_longest
    if batch:
        batches.append(batch)
    return batches


def _spread_remainder(batches: list[Batch], remainder: Batch, max_batch_size: int | None) -> None:
    """Give the items of a too small last batch to the batches before it (in place), one each from the end
    (ESPnet's length sampler redistributes such a remainder over the other mini-batches). Batches below
    ``max_batch_size`` are preferred; only when all are full does one go over the cap."""
    room = [b for b in reversed(batches) if max_batch_size is None or len(b) < max_batch_size]
    targets = room or list(reversed(batches))
    for i, index in enumerate(remainder):
        targets[i % len(targets)].append(index)


def check_split(num_items: int, num_replicas: int, max_batch_size: int | None) -> None:
    """Reject a global budget that cannot give every rank at least one utterance per step."""
    if max_batch_size is not None and max_batch_size < num_replicas:
        raise ValueError(
            f"max_batch_size ({max_batch_size}) is smaller than the {num_replicas} processes that split each "
            "batch (batch_budget: global)"
        )
    if num_items < num_replicas:
        raise ValueError(
            f"{num_items} utterances cannot fill a batch for each of {num_replicas} processes "
            "(batch_budget: global)"
        )


def split_batch(
    batch: Sequence[int], durations: Sequence[float] | np.ndarray, num_replicas: int, rank: int
) -> Batch:
    """One rank's share of a global batch: sorted longest first, every ``num_replicas``-th item from ``rank``.

    ESPnet sorts a mini-batch by length (``sort_in_batch: descending``) and takes ``batch[rank::world_size]``,
    so the ranks get sub-batches of nearly equal padded size. With one rank the batch stays as it is.
    """
    if num_replicas == 1:
        return list(batch)
    ordered = sorted(batch, key=lambda i: -float(durations[i]))  # stable: equal durations keep batch order
    return ordered[rank::num_replicas]


def rank_batch_sizes(
    utterance_seconds: float,
    max_padded_seconds: float,
    num_replicas: int,
    batch_budget: str = "global",
    max_batch_size: int | None = None,
) -> list[int]:
    """Utterances per rank in one step when every utterance lasts ``utterance_seconds``.

    The sampler's own packing and split on equal-length utterances (``speechllm plan`` reads its per-GPU
    batch here): under ``global`` the ranks share one budget, under ``per_rank`` each packs its own.
    """
    _check_budget(max_padded_seconds)
    _check_batch_budget(batch_budget)
    if not utterance_seconds > 0:
        raise ValueError(f"utterance_seconds must be positive, got {utterance_seconds}")
    minimum = num_replicas if batch_budget == "global" else 1
    # Enough items that the first batch closes on the budget or the cap, not on running out of data.
    count = int(max_padded_seconds // utterance_seconds) + minimum + 1
    if batch_budget == "global":
        check_split(count, num_replicas, max_batch_size)
    durations = np.full(count, float(utterance_seconds))
    first = _pack_greedy(np.arange(count), durations, max_padded_seconds, max_batch_size, minimum)[0]
    if batch_budget == "per_rank":
        return [len(first)] * num_replicas
    return [len(split_batch(first, durations, num_replicas, rank)) for rank in range(num_replicas)]


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

    ``min_batch_size`` (ESPnet's length sampler option of that name): packing goes over the budget rather than
    close a batch with fewer items; a bucket's final batch that is smaller is carried into the next (longer)
    bucket and packed there; a last remainder still smaller is spread over the batches before it (one item
    each from the end, over ``max_batch_size`` only when every batch is full). ``max_batch_size`` caps the
    number of items per batch.

    Several ranks (see the module docstring): under ``batch_budget="global"`` the budget, ``min_batch_size``
    and ``max_batch_size`` are those of the global batch, which holds at least ``num_replicas`` items (the
    minimum is raised to that) and is split over the ranks (``split_batch``); a one-rank sampler with
    ``min_batch_size=num_replicas`` yields exactly the global batches. Under ``"per_rank"`` every rank gets
    whole batches of the full budget.

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
        batch_budget: str = "global",
    ) -> None:
        _check_budget(max_padded_seconds)
        _check_batch_budget(batch_budget)
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
        self.splits = batch_budget == "global" and num_replicas > 1
        if self.splits:
            check_split(self.durations.size, num_replicas, max_batch_size)
        self.max_padded_seconds = float(max_padded_seconds)
        self.num_buckets = num_buckets
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.max_batch_size = max_batch_size
        self.min_batch_size = min_batch_size
        self.batch_budget = batch_budget
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
        # A split global batch needs an item for every rank (ESPnet raises the minimum to the world size).
        required = max(self.min_batch_size, self.num_replicas if self.splits else 1)
        batches: list[Batch] = []
        carry = np.empty(0, dtype=np.int64)
        for bucket_index, bucket in enumerate(self._buckets):
            members = rng.permutation(bucket) if rng is not None else bucket
            # Carried items go first so they join the first batch of this bucket.
            packed = _pack_greedy(
                np.concatenate([carry, members]),
                self.durations,
                self.max_padded_seconds,
                self.max_batch_size,
                required,
            )
            is_last = bucket_index == len(self._buckets) - 1
            if not is_last and len(packed[-1]) < required:
                carry = np.asarray(packed.pop(), dtype=np.int64)
            else:
                carry = np.empty(0, dtype=np.int64)
            batches.extend(packed)
        if len(batches) > 1 and len(batches[-1]) < required:
            remainder = batches.pop()
            _spread_remainder(batches, remainder, self.max_batch_size)
        if rng is not None:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _rank_batches(self, global_batches: list[Batch]) -> list[Batch]:
        """This rank's batches: its share of every global batch, or (per_rank) every ``num_replicas``-th
        whole batch after padding to a multiple of ``num_replicas`` by repeating leading batches."""
        if self.splits:
            return [split_batch(b, self.durations, self.num_replicas, self.rank) for b in global_batches]
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
