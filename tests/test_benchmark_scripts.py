"""The benchmark scripts run end to end on small settings and end with their `<what>: <number>` headline.

Speed ratios are measured, never asserted (the machines are noisy); the bucketing sampler's padding efficiency
is deterministic for a seed and is held to a floor."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from speechllm.data.bucketing import rank_batch_sizes
from speechllm.plan.planner import load_experiment

REPO = Path(__file__).resolve().parents[1]
HEADLINE = re.compile(r"^[^:\n]+: \d+(\.\d+)?$")


@pytest.mark.parametrize(
    "script, args, floor",
    [
        ("bucketing.py", ["--num-utterances", "300"], 0.95),
        ("kd_batching.py", ["--batch-size", "4", "--rounds", "1"], None),
        (
            "adaptor_vs_espnet.py",
            [
                "--blocks",
                "2",
                "--interctc-layer",
                "1",
                "--batch-size",
                "1",
                "--seconds",
                "1",
                "--rounds",
                "1",
            ],
            None,
        ),
        (
            "target_generation.py",
            ["--num-prompts", "6", "--batch-size", "3", "--max-new-tokens", "4", "--repeats", "1"],
            None,
        ),
        (
            "transcribe_batching.py",
            ["--num-utterances", "4", "--batch-size", "2", "--rounds", "1", "--max-new-tokens", "4"],
            None,
        ),
    ],
)
def test_benchmark_prints_its_headline_last(script: str, args: list[str], floor: float | None) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    if "espnet is not importable" in done.stdout:  # adaptor_vs_espnet.py: ESPnet is a test-only oracle
        pytest.skip(done.stdout.strip().splitlines()[-1])
    last = done.stdout.strip().splitlines()[-1]
    assert HEADLINE.match(last), f"{script}: last line {last!r} is not `<what>: <number>`"
    value = float(last.rsplit(": ", 1)[1])
    assert value > 0 and (floor is None or value >= floor), last


PAPER_SCALE_GPU = REPO / "benchmarks" / "paper_scale_gpu.py"
TRAINING_PARTS = ("ctc_bf16", "ctc_tf32", "ce_bf16", "ce_tf32")


def run_paper_scale_gpu(out: Path, *args: str) -> tuple[dict, str]:
    done = subprocess.run(
        [sys.executable, str(PAPER_SCALE_GPU), "--smoke", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text()), done.stdout.strip().splitlines()[-1]


def test_paper_scale_gpu_smoke_measures_every_part(tmp_path: Path) -> None:
    """`--smoke`: the GPU benchmark's code on the CPU with the demo's tiny models and configs. The budget is
    ample (about 50 s are used on an idle 2-core machine): a loaded machine must not push a part past
    its share (skipping by budget has its own tests below)."""
    report, last = run_paper_scale_gpu(
        tmp_path / "gpu.json",
        "--budget",
        "3000",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--rounds",
        "1",
        "--peak-tflops",
        "2",
        "1",
        "0.5",
    )
    assert HEADLINE.match(last), last
    assert last == f"{report['headline']['what']}: {report['headline']['value']:.2f}"
    assert report["smoke"] is True and report["peak_tflops"] == {"bf16": 2.0, "tf32": 1.0, "fp32": 0.5}
    parts = report["parts"]
    assert set(parts) == {*TRAINING_PARTS, "kd", "targets", "asr"}
    cfg = load_experiment(REPO / "config" / "config.yaml")
    seconds = cfg["plan"]["utterance_seconds"]
    for part in TRAINING_PARTS:
        r = parts[part]
        stage = cfg["train"][part.split("_")[0]]
        shares = rank_batch_sizes(
            seconds,
            stage["batch_seconds"],
            cfg["plan"]["gpus"][part.split("_")[0]],
            stage["batch_budget"],
            stage["max_batch_size"],
        )
        assert r["status"] == "measured" and r["utterances"] == max(shares), (
            part
        )  # the sampler's per-GPU batch
        assert r["steps"] == 2 and r["step_seconds"] > 0 and r["plan_memory_gib"] > 0 and r["mfu"] > 0
        assert r["audio_seconds_per_second"] == pytest.approx(r["utterances"] * seconds / r["step_seconds"])
        assert r["peak_memory_gib"] is None  # CUDA only
    assert parts["ctc_bf16"]["audio_seconds_per_second"] == report["headline"]["value"]
    for part, key, single in (
        ("kd", "samples_per_second", "batch_1"),
        ("asr", "utterances_per_second", "batch_1"),
        ("targets", "tokens_per_second", "one_at_a_time"),
    ):
        rates = parts[part][key]
        assert parts[part]["ratio"] == pytest.approx(
            rates["batched"]["per_second"] / rates[single]["per_second"]
        )
    targets = parts["targets"]  # random weights never stop early: every prompt runs its full budget
    assert (
        targets["tokens_per_second"]["batched"]["units"]
        == targets["prompts"]["batched"] * cfg["targets"]["max_new_tokens"]
    )
    assert parts["asr"]["num_beams"] == cfg["evaluate"]["num_beams"]


def test_paper_scale_gpu_skips_what_does_not_fit_and_says_so(tmp_path: Path) -> None:
    report, last = run_paper_scale_gpu(
        tmp_path / "gpu.json", "--budget", "0.001", "--warmup", "1", "--only", "ctc_bf16", "asr"
    )
    assert set(report["parts"]) == {"ctc_bf16", "asr"}
    for result in report["parts"].values():
        assert result["status"] == "skipped" and "budget (0.001 s) is spent" in result["reason"]
    assert report["gpu"] is None  # the CPU has no entry in plan.gpu_peak_tflops: no MFU
    assert last.endswith(": 0.00") and HEADLINE.match(last)


def test_paper_scale_gpu_parts_stop_at_their_share() -> None:
    spec = importlib.util.spec_from_file_location("paper_scale_gpu", PAPER_SCALE_GPU)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cpu, clock = torch.device("cpu"), bench.Clock(100.0)

    def step(seconds: float, units: int = 1) -> int:
        time.sleep(seconds)
        return units

    reason = bench.run_steps(lambda: step(0.02), cpu, 1, 30, clock, clock.elapsed() + 0.03)
    assert isinstance(reason, str) and reason.startswith("warm-up (1 steps")
    times = bench.run_steps(lambda: step(0.02), cpu, 1, 30, clock, clock.elapsed() + 0.3)
    assert 1 <= len(times) < 30 and min(times) >= 0.02
    modes = {"fast": lambda: step(0.01, 3), "slow": lambda: step(0.03, 3)}
    rates = bench.paired_rates(modes, cpu, clock, clock.elapsed() + 10, rounds=2)
    assert rates["fast"]["rounds"] == rates["slow"]["rounds"] == 2 and rates["fast"]["units"] == 3
    assert rates["slow"]["seconds"] >= 0.03 and rates["slow"]["per_second"] == 3 / rates["slow"]["seconds"]
    assert "used up the part's share" in bench.paired_rates(
        modes, cpu, clock, clock.elapsed() + 0.01, rounds=2
    )
