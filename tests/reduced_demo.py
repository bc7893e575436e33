"""The reduced demo: the whole DAG (every stage and table) on a small demo world. It runs once per test
session (conftest.py's `reduced_demo` fixture) and serves every test that needs a finished run: test_workflow
reads and reruns it, test_chaos compares its killed runs with it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))

REDUCED = {
    "data": {
        "languages": ["en_us", "de_de"],
        "speechglue": {"tasks": ["sst2", "rte"]},
        "speechxnli": {"languages": ["en", "de"]},
        "demo": {"composed": {"train": 12, "dev": 2, "test": 2, "seed": 0}},
    },
    "models": {
        "demo_build": {
            "llm_pretrain": {
                "steps": 200,
                "batch_size": 16,
                "lr": 3.0e-3,
                "warmup_steps": 20,
                "max_length": 128,
                "sort_pool_batches": 4,
                "weight_decay": 0.0,
                "templates_per_sentence": 1,
                "task_repeats": 1,
            },
            "speech_encoder": {"ctc_finetune": {"updates": 20, "warmup_steps": 5}},
        }
    },
    "targets": {"shards": 1, "max_new_tokens": 16},
    "train": {
        "ctc": {"max_steps": 40, "eval_every": 20, "warmup_steps": 10},
        "ce": {"max_steps": 20, "eval_every": 10, "warmup_steps": 5},
    },
    "evaluate": {"max_new_tokens": 16, "num_beams": 2},
}


def snakemake_environment() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "WANDB_MODE": "offline",
    }


def outputs(workdir: Path) -> dict[str, bytes]:
    """The result tables and score files of a run, by their path in the work directory."""
    files = [*workdir.glob("results/tables/*"), *workdir.glob("results/eval/*/*.scores.json")]
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(files)}


@dataclass(frozen=True)
class ReducedRun:
    workdir: Path
    override: Path  # the config file given after config/config.yaml
    log: Path  # Snakemake's output (every job's start and finish, stamped)
    seconds: float
    outputs: dict[str, bytes]  # as the run left them (tests may change the work directory afterwards)


def run_reduced_demo(root: Path) -> ReducedRun:
    """The reduced demo with two cores in `root`/run; an AssertionError with the log's end if it fails."""
    workdir, override, log = root / "run", root / "override.yaml", root / "run.log"
    override.write_text(yaml.safe_dump(REDUCED))
    command = [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-c2", "-d", str(workdir)]
    command += ["--configfile", str(REPO / "config/config.yaml"), str(override)]
    began = time.monotonic()
    with log.open("w") as fh:
        res = subprocess.run(
            command, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, env=snakemake_environment(), timeout=1800
        )
    seconds = time.monotonic() - began
    assert res.returncode == 0, log.read_text(errors="replace")[-5000:]
    return ReducedRun(workdir, override, log, seconds, outputs(workdir))
