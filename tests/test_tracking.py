"""W&B tracking: offline runs with the job's metrics and resolved config, and no WANDB_API_KEY anywhere."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from test_train_resume import CTC_STAGE, run_settings, subprocess_env, train_command, write_corpus

from speechllm.train.tracking import REDACTED, run_id, scrub

SENTINEL = "wandb-key-sentinel-5f1c9e27a4b84d0c9b1e3f6a7d2c8e90"


def files_containing(root, needle: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_training_job_logs_offline_and_never_writes_the_api_key(tiny_models, tmp_path):
    corpus = write_corpus(tmp_path / "data", num_train=6, num_dev=2)
    stage = {**CTC_STAGE, "max_epochs": 1, "num_iters_per_epoch": 4, "checkpoint_every": 1}
    run_dir = tmp_path / "run"
    args = train_command("ctc", run_settings(tiny_models, stage, wandb_mode="offline"), corpus, run_dir)
    args += ["--job-type", "train_ctc"]
    env = subprocess_env(WANDB_API_KEY=SENTINEL, WANDB_MODE="offline")
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert SENTINEL not in res.stdout + res.stderr

    log_dir = run_dir / "train"
    wandb_files = list((log_dir / "wandb").rglob("*.wandb"))
    assert len(wandb_files) == 1  # one offline run per job, under the job's run directory
    record = wandb_files[0].read_bytes()
    assert all(s.encode() in record for s in ("speechllm-tests", "tests", "train_ctc", "tests-ctc"))
    assert run_id("tests", "train_ctc", "tests-ctc") in wandb_files[0].name
    # Losses, lr, grad norm, throughput and dev metrics, per step; the resolved config beside them.
    metrics = pd.read_csv(log_dir / "metrics.csv")
    for column in (
        "loss",
        "loss_ctc",
        "loss_lid",
        "lr",
        "grad_norm",
        "audio_seconds_per_second",
        "tokens_per_second",
        "dev_cer",
        "dev_loss",
    ):
        assert metrics[column].notna().any(), column
    config = json.loads((log_dir / "config.json").read_text())
    assert config["stage"]["lr"] == stage["lr"] and config["experiment"] == "tests"
    # The key is in no file: not the W&B run, logs, config dump, metrics, checkpoints or the model.
    assert files_containing(tmp_path, SENTINEL.encode()) == []


def test_scrub_drops_credentials_and_redacts_the_key(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SENTINEL)
    config = {
        "wandb": {"project": "p", "api_key": "x"},
        "hf_token": "y",
        "note": f"key={SENTINEL}",
        "evaluate": {"max_new_tokens": 8},
        "nested": [{"password": "z", "value": SENTINEL}],
    }
    assert scrub(config) == {
        "wandb": {"project": "p"},
        "note": REDACTED,
        "evaluate": {"max_new_tokens": 8},
        "nested": [{"value": REDACTED}],
    }


def test_resumed_offline_run_replaces_the_killed_one_with_the_whole_curve(tmp_path, monkeypatch):
    from speechllm.train.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = {"project": "speechllm-tests", "mode": "offline"}
    first = Tracker(tmp_path, cfg, "tests", "train_ctc", "tests-ctc", {"a": 1})
    for step in range(6):
        first.log({"loss": 10.0 - step}, step=step)
    first.run.finish()  # killed after step 5; the checkpoint was at step 3
    resumed = Tracker(tmp_path, cfg, "tests", "train_ctc", "tests-ctc", {"a": 1}, resume_step=3)
    assert [r["step"] for r in resumed.rows] == [0, 1, 2, 3]
    resumed.log({"loss": 6.0}, step=4)
    resumed.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(run_id("tests", "train_ctc", "tests-ctc"))
    assert pd.read_csv(tmp_path / "metrics.csv")["step"].tolist() == [0, 1, 2, 3, 4]


def test_resume_drops_a_torn_last_metrics_line_and_names_other_bad_lines(tmp_path, monkeypatch):
    """A job killed mid-append leaves half a row at the end of metrics.jsonl: the resume drops it; a broken
    line elsewhere is an error naming the file and line, and the file is left as it was."""
    from speechllm.train.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = {"project": "speechllm-tests", "mode": "disabled"}
    first = Tracker(tmp_path, cfg, "tests", "train_ctc", "tests-ctc", {})
    for step in range(4):
        first.log({"loss": 10.0 - step}, step=step)
    jsonl = tmp_path / "metrics.jsonl"
    with jsonl.open("a", encoding="utf-8") as fh:
        fh.write('{"step": 4, "lo')  # the kill
    resumed = Tracker(tmp_path, cfg, "tests", "train_ctc", "tests-ctc", {}, resume_step=3)
    assert [r["step"] for r in resumed.rows] == [0, 1, 2, 3]
    assert jsonl.read_text().endswith('"step": 3, "loss": 7.0}\n')

    lines = jsonl.read_text().splitlines()
    broken = "\n".join([lines[0], "{not json", *lines[1:]]) + "\n"
    jsonl.write_text(broken)
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not a metrics row"):
        Tracker(tmp_path, cfg, "tests", "train_ctc", "tests-ctc", {}, resume_step=3)
    assert jsonl.read_text() == broken


CHILD_JOB = """
from pathlib import Path
from speechllm.train.tracking import Tracker
Tracker(
    Path("results/train/job"), {"project": "speechllm-tests", "mode": "offline"}, "tests", "train_kd", "job",
    {},
).close()
"""
PARENT_WITH_SERVICE = """
import subprocess, sys
from pathlib import Path
from speechllm.train.tracking import Tracker
Tracker(
    Path("parent"), {"project": "speechllm-tests", "mode": "offline"}, "tests", "train_ctc", "parent", {}
).close()
subprocess.run([sys.executable, "-c", sys.argv[2]], cwd=sys.argv[1], check=True)  # inherits WANDB_SERVICE
"""


def test_a_job_started_under_a_running_wandb_service_writes_into_its_own_directory(tmp_path):
    """A process that has used W&B (pytest, a notebook) hands its service to the jobs it starts
    (WANDB_SERVICE); the service resolves paths in its own working directory, so the run of a job given a
    relative directory went there (for the test suite: the repository checkout) or was lost."""
    import os
    import subprocess
    import sys

    parent, job = tmp_path / "parent_cwd", tmp_path / "job_cwd"
    parent.mkdir()
    job.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"} | {"WANDB_MODE": "offline"}
    subprocess.run(
        [sys.executable, "-c", PARENT_WITH_SERVICE, str(job), CHILD_JOB],
        cwd=parent,
        env=env,
        check=True,
        timeout=300,
    )
    # The run's transaction log (written by the service) is in the job's own run directory.
    assert list((job / "results/train/job/wandb").glob("offline-run-*/run-*.wandb"))
    assert sorted(p.name for p in parent.iterdir()) == ["parent"]
