"""config/experiments/bloomzmms_exact.yaml: the reference code's behaviour, switch by switch, over
bloomzmms.yaml.

Each of its keys is a row of docs/deviations.md, it plans (`speechllm plan`) and dry-runs (`snakemake -n`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PAPER = REPO / "config/experiments/bloomzmms.yaml"
EXACT = REPO / "config/experiments/bloomzmms_exact.yaml"


def leaf_keys(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": value} for every non-mapping value of a nested mapping."""
    leaves: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            leaves.update(leaf_keys(value, name + "."))
        else:
            leaves[name] = value
    return leaves


def exact_switches() -> dict[str, Any]:
    leaves = leaf_keys(yaml.safe_load(EXACT.read_text()))
    leaves.pop("experiment")
    return leaves


def test_every_exact_switch_is_a_documented_deviation_that_differs_from_the_paper_config():
    table = (REPO / "docs/deviations.md").read_text()
    paper = leaf_keys(yaml.safe_load((REPO / "config/config.yaml").read_text()))
    paper.update(leaf_keys(yaml.safe_load(PAPER.read_text())))
    assert exact_switches()
    for key, value in exact_switches().items():
        assert f"`{key}`" in table, f"{key} has no row in docs/deviations.md"
        assert key in paper, f"{key} is not a config key"
        assert paper[key] != value, f"{key}: bloomzmms.yaml already sets {value!r}"


def test_the_exact_experiment_plans_with_the_int8_llm():
    res = subprocess.run(
        [str(BIN / "speechllm"), "plan", "--config", str(PAPER), str(EXACT), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    plans = {p["stage"]: p for p in json.loads(res.stdout)}
    normal = subprocess.run(
        [str(BIN / "speechllm"), "plan", "--config", str(PAPER), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert normal.returncode == 0, normal.stderr
    bf16 = {p["stage"]: p for p in json.loads(normal.stdout)}
    assert set(plans) == {"ctc", "ce"}
    # BLOOMZ in 8-bit: the CE stage's frozen LLM weights take about half of their bf16 memory.
    gib = 2**30
    assert plans["ce"]["totals"]["weight_bytes"] < bf16["ce"]["totals"]["weight_bytes"] - 5 * gib
    for key in (
        "trainable_params",
        "frozen_params",
        "weight_bytes",
    ):  # stage 1 needs only the LLM's embeddings
        assert plans["ctc"]["totals"][key] == bf16["ctc"]["totals"][key], key


def test_the_exact_experiment_dry_runs_with_its_switches_in_the_commands(tmp_path):
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "WANDB_MODE": "offline"}
    res = subprocess.run(
        [
            str(BIN / "snakemake"),
            "-s",
            str(REPO / "Snakefile"),
            "-n",
            "-p",
            "-c",
            "64",
            "-d",
            str(tmp_path),
            "--configfile",
            str(REPO / "config/config.yaml"),
            str(PAPER),
            str(EXACT),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for rule in ("generate_targets", "train_ctc", "train_ce", "evaluate", "table"):
        assert f"rule {rule}:" in res.stdout, rule
    for key, value in exact_switches().items():
        if isinstance(value, str):  # string values reach the steps' settings verbatim
            assert f'"{key.rsplit(".", 1)[1]}": "{value}"' in res.stdout, key


def test_the_exact_experiment_trains_with_fp32_matmuls():
    """The overlay's trainer switches TF32 matmuls on only with `use_fast_matmul`, which defaults to false and
    which neither its yamls nor run.sh set (DigitalPhonetics/bloomzmms@77dc192:espnet-bloomzmms-files/espnet2/
    tasks/abs_task.py); bloomzmms.yaml's tf32 is the project's choice."""
    config = leaf_keys(yaml.safe_load((REPO / "config/config.yaml").read_text()))
    for layer in (PAPER, EXACT):
        config.update(leaf_keys(yaml.safe_load(layer.read_text())))
    assert config["train.ctc.precision"] == config["train.ce.precision"] == "fp32"
