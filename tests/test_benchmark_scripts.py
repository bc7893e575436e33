"""The benchmark scripts run end to end on small settings and end with their `<what>: <number>` headline.

Speed ratios are measured, never asserted (the machines are noisy); the bucketing sampler's padding efficiency
is deterministic for a seed and is held to a floor."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEADLINE = re.compile(r"^[^:\n]+: \d+(\.\d+)?$")


@pytest.mark.parametrize(
    "script, args, floor",
    [
        ("bucketing.py", ["--num-utterances", "300"], 0.95),
        ("kd_batching.py", ["--batch-size", "4", "--rounds", "1"], None),
        ("adaptor_vs_espnet.py", ["--blocks", "2", "--interctc-layer", "1", "--batch-size", "1", "--seconds", "1",
                                  "--rounds", "1"], None),
        ("target_generation.py", ["--num-prompts", "6", "--batch-size", "3", "--max-new-tokens", "4",
                                  "--repeats", "1"], None),
        ("transcribe_batching.py", ["--num-utterances", "4", "--batch-size", "2", "--rounds", "1",
                                    "--max-new-tokens", "4"], None),
    ],
)
def test_benchmark_prints_its_headline_last(script: str, args: list[str], floor: float | None) -> None:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    if "espnet is not importable" in done.stdout:  # adaptor_vs_espnet.py: ESPnet is a test-only oracle
        pytest.skip(done.stdout.strip().splitlines()[-1])
    last = done.stdout.strip().splitlines()[-1]
    assert HEADLINE.match(last), f"{script}: last line {last!r} is not `<what>: <number>`"
    value = float(last.rsplit(": ", 1)[1])
    assert value > 0 and (floor is None or value >= floor), last
