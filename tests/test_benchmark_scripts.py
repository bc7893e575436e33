"""The benchmark scripts run end to end on small settings and end with their `<what>: <number>` headline."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEADLINE = re.compile(r"^[^:\n]+: \d+(\.\d+)?$")


@pytest.mark.parametrize(
    "script, args",
    [
        ("bucketing.py", ["--num-utterances", "300"]),
        ("kd_batching.py", ["--batch-size", "4", "--rounds", "1"]),
        ("target_generation.py", ["--num-prompts", "6", "--batch-size", "3", "--max-new-tokens", "4",
                                  "--repeats", "1"]),
    ],
)
def test_benchmark_prints_its_headline_last(script: str, args: list[str]) -> None:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    assert HEADLINE.match(last), f"{script}: last line {last!r} is not `<what>: <number>`"
    assert float(last.rsplit(": ", 1)[1]) > 0
