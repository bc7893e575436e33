"""Compare padding efficiency of random, ESPnet-style sorted and duration-bucketed batching.

Usage: python benchmarks/bucketing.py [--manifest PATH.jsonl] [--budget SECONDS] [--num-buckets N] [--seed S]

Durations come from a JSON-lines manifest (``num_samples`` plus optional ``sampling_rate`` and ``speed``)
or, without one, from a synthetic FLEURS-like log-normal distribution. The last line printed is always
``padding efficiency (ours): <fraction>`` so scripts can parse it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from speechllm.data.bucketing import (
    DurationBucketSampler,
    padded_seconds,
    padding_efficiency,
    random_batches,
    sorted_batches,
)

# Budget of the paper's CTC stage, in padded seconds per batch.
DEFAULT_BUDGET_SECONDS = 437.0
# 50 equal-count buckets keep padding ~2-3% on FLEURS-like data while leaving ~10 batches per bucket
# to shuffle; fewer buckets pad noticeably more, many more add under-filled bucket tails.
DEFAULT_NUM_BUCKETS = 50
DEFAULT_SEED = 0
DEFAULT_SAMPLING_RATE = 16_000
DEFAULT_SPEED = 1.0
# Synthetic FLEURS-like corpus: read sentences of ~10 s median with a long right tail.
DEFAULT_NUM_UTTERANCES = 20_000
DEFAULT_MEDIAN_SECONDS = 10.0
DEFAULT_LOG_SIGMA = 0.5
DEFAULT_MIN_SECONDS = 0.1
DEFAULT_MAX_SECONDS = 30.0
EFFICIENCY_DECIMALS = 3


def manifest_durations(path: Path) -> list[float]:
    """Seconds per utterance from a JSON-lines manifest, honouring speed perturbation."""
    durations: list[float] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            record = json.loads(line)
            rate = float(record.get("sampling_rate", DEFAULT_SAMPLING_RATE))
            speed = float(record.get("speed", DEFAULT_SPEED))
            durations.append(float(record["num_samples"]) / rate / speed)
    return durations


def synthetic_durations(
    num_utterances: int,
    median_seconds: float,
    log_sigma: float,
    min_seconds: float,
    max_seconds: float,
    seed: int,
) -> list[float]:
    """Log-normal durations clipped to a plausible utterance range."""
    rng = np.random.default_rng(seed)
    samples = rng.lognormal(mean=np.log(median_seconds), sigma=log_sigma, size=num_utterances)
    return np.clip(samples, min_seconds, max_seconds).tolist()


def summarize(name: str, batches: list[list[int]], durations: Sequence[float], budget: float) -> str:
    """One table row: batch count, padding efficiency, budget use and mean batch size."""
    padded = sum(padded_seconds(batch, durations) for batch in batches)
    utilisation = padded / (len(batches) * budget) if batches else 0.0
    mean_size = sum(len(batch) for batch in batches) / len(batches) if batches else 0.0
    efficiency = padding_efficiency(batches, durations)
    return (
        f"{name:<22} {len(batches):>8d} {efficiency:>11.{EFFICIENCY_DECIMALS}f} {utilisation:>12.3f} "
        f"{mean_size:>10.1f}"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--manifest", type=Path, default=None, help="JSON-lines manifest with num_samples")
    parser.add_argument(
        "--budget", type=float, default=DEFAULT_BUDGET_SECONDS, help="padded seconds per batch"
    )
    parser.add_argument("--num-buckets", type=int, default=DEFAULT_NUM_BUCKETS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--num-utterances", type=int, default=DEFAULT_NUM_UTTERANCES, help="synthetic only")
    parser.add_argument("--median-seconds", type=float, default=DEFAULT_MEDIAN_SECONDS, help="synthetic only")
    parser.add_argument("--log-sigma", type=float, default=DEFAULT_LOG_SIGMA, help="synthetic only")
    parser.add_argument("--min-seconds", type=float, default=DEFAULT_MIN_SECONDS, help="synthetic only")
    parser.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS, help="synthetic only")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.manifest is not None:
        durations = manifest_durations(args.manifest)
        source = str(args.manifest)
    else:
        durations = synthetic_durations(
            args.num_utterances,
            args.median_seconds,
            args.log_sigma,
            args.min_seconds,
            args.max_seconds,
            args.seed,
        )
        source = "synthetic FLEURS-like log-normal"
    sampler = DurationBucketSampler(durations, args.budget, num_buckets=args.num_buckets, seed=args.seed)
    ours = list(sampler)
    print(f"source: {source}; {len(durations)} utterances, {sum(durations) / 3600:.2f} h")
    print(f"budget: {args.budget:g} padded seconds per batch; buckets: {args.num_buckets}; seed: {args.seed}")
    print(f"{'method':<22} {'batches':>8} {'efficiency':>11} {'budget use':>12} {'mean size':>10}")
    print(summarize("random", random_batches(durations, args.budget, args.seed), durations, args.budget))
    print(summarize("sorted (ESPnet length)", sorted_batches(durations, args.budget), durations, args.budget))
    print(summarize("bucketed (ours)", ours, durations, args.budget))
    print(f"padding efficiency (ours): {padding_efficiency(ours, durations):.{EFFICIENCY_DECIMALS}f}")


if __name__ == "__main__":
    main()
