"""`snakemake --profile slurm` on a real single-node Slurm (scripts/slurm/local_slurm.sh, fake GPUs): a
reduced demo target runs as Slurm jobs, one of them with a GPU, and a download runs on the submit host; a
training job stopped at its time limit is retried and resumes to the end.

Needs root and Debian's slurm-wlm + munge (installed with apt-get when missing); skips with the reason where
Slurm cannot be set up. Every daemon it starts is stopped by its pid file, whatever happens."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPT = REPO / "scripts/slurm/local_slurm.sh"
PID_FILES = ("run/slurmd.pid", "run/slurmctld.pid", "munge/munged.pid")
# The demo world reduced to one language and the smallest side sets: its data step takes ~10 s.
REDUCED = {
    "data": {
        "languages": ["en_us"],
        "speed_perturb": [1.0],
        "speechglue": {"tasks": ["sst2"]},
        "speechxnli": {"languages": ["en"]},
    },
    "resources": {"offline_compute_nodes": True},
}
TARGETS = ["results/data/train.jsonl", "results/data/dev.jsonl", "results/data/language_ids.json"]


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without Slurm's job and client variables (CI may itself run inside a Slurm job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    return {**env, "PATH": f"{BIN}:{os.environ['PATH']}", "WANDB_MODE": "offline", **extra}


@pytest.fixture(scope="module")
def local_slurm(tmp_path_factory):
    """A started single-node Slurm: its state directory (configs, logs). Stopped by pid at teardown."""
    if os.geteuid() != 0:
        pytest.skip("a local Slurm needs root (slurmd runs the jobs); CI runs this as root")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and there is no apt-get to install slurm-wlm and munge")
    state = tmp_path_factory.mktemp("slurm")
    try:
        res = subprocess.run(
            [str(SCRIPT), "start", str(state)], capture_output=True, text=True, timeout=900, env=clean_env()
        )
        if res.returncode == 2:
            pytest.skip(res.stderr.strip().splitlines()[-1])
        assert res.returncode == 0, res.stderr[-3000:]
        yield state
    finally:
        pids = [
            int(p.read_text())
            for p in (state / f for f in PID_FILES)
            if p.is_file() and p.read_text().strip()
        ]
        stop = subprocess.run([str(SCRIPT), "stop", str(state)], capture_output=True, text=True, timeout=120)
        left = [pid for pid in pids if running(pid)]
        assert stop.returncode == 0 and not left, f"daemons still running: {left}\n{stop.stderr}"


@pytest.mark.slow
def test_reduced_demo_runs_as_slurm_jobs(local_slurm, tmp_path):
    work = tmp_path / "run"
    fake_release = tmp_path / "released.tar.gz"
    fake_release.write_bytes(b"stand-in for the released targets")
    override = tmp_path / "override.yaml"
    sha256 = hashlib.sha256(fake_release.read_bytes()).hexdigest()
    override.write_text(
        yaml.safe_dump(
            {
                **REDUCED,
                "targets": {
                    "source": "released",
                    "released": {"url": str(fake_release), "sha256": sha256, "on_unmatched": "error"},
                },
            }
        )
    )
    slurm_conf = str(local_slurm / "etc/slurm.conf")
    # `--profile slurm` is found where `make slurm-profile` links it: the user's Snakemake config directory.
    env = clean_env(SLURM_CONF=slurm_conf, SLURM_PARTITION="debug", XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    link = subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), "slurm-profile"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert link.returncode == 0 and (tmp_path / "xdg/snakemake/slurm/profile.yaml").is_file(), link.stdout

    res = subprocess.run(
        [
            str(BIN / "snakemake"),
            "--profile",
            "slurm",
            "-d",
            str(work),
            "--configfile",
            str(REPO / "config/config.yaml"),
            str(override),
            # Without slurmdbd there is no sacct; poll soon (the defaults suit a real cluster).
            "--slurm-status-command",
            "squeue",
            "--slurm-init-seconds-before-status-checks",
            "1",
            # The two prepare_split jobs go in as one job array, as the profile does for generate_targets.
            "--slurm-array-jobs",
            "generate_targets,prepare_split",
            "--set-resources",
            "language_ids:gpu=1",
            "language_ids:cpus_per_gpu=1",
            "--",
            *TARGETS,
            "resources/bloomzmms/tmi_training_targets.tar.gz",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    for target in TARGETS:
        assert (work / target).stat().st_size > 0

    # rule -> Slurm job id, from "Job 2 has been submitted with SLURM jobid 7 (log: .../rule_<rule>/...)".
    submitted = {
        rule: job for job, rule in re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/rule_(\w+)/", out)
    }
    assert set(submitted) == {"demo_data", "language_ids"}, out[-5000:]
    array = re.search(
        r"Submitted array job with Snakemake IDs \S+ and SLURM job ID (\d+)\. "
        r"The individual task IDs are 1-2\.",
        out,
    )
    assert array, out[-5000:]
    submitted.update({f"prepare_split[{i}]": f"{array.group(1)}_{i}" for i in (1, 2)})
    # The download ran on the submit host (resources.offline_compute_nodes), not as a Slurm job.
    assert "localrule fetch_released_targets:" in out
    assert (
        work / "resources/bloomzmms/tmi_training_targets.tar.gz"
    ).read_bytes() == fake_release.read_bytes()
    for rule, job in submitted.items():
        assert any((work / "logs/slurm" / f"rule_{rule.split('[')[0]}").rglob(f"{job}.log")), rule

    # Slurm's own view: every job completed in the partition from $SLURM_PARTITION; the GPU job got a GPU.
    queue = subprocess.run(
        ["squeue", "--states=all", "--noheader", "-O", "ArrayJobID,ArrayTaskID,State,Partition,tres-per-job"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert queue.returncode == 0, queue.stderr
    jobs = {}  # "<job id>" or "<array job id>_<task>" -> [state, partition, TRES per job]
    for line in queue.stdout.splitlines():
        if line.strip():
            job, task, *rest = line.split()
            jobs[job if task == "N/A" else f"{job}_{task}"] = rest
    for rule, job in submitted.items():
        assert jobs[job][:2] == ["COMPLETED", "debug"], (rule, jobs.get(job))
    assert "gpu:1" in jobs[submitted["language_ids"]][2]
    assert "gpu" not in jobs[submitted["demo_data"]][2]
    completion_log = (local_slurm / "log/jobcomp.log").read_text()
    for rule in ("demo_data", "language_ids"):
        assert re.search(rf"JobId={submitted[rule]} .*JobState=COMPLETED", completion_log), rule


@pytest.mark.slow
def test_a_training_job_stopped_at_its_time_limit_is_retried_and_resumes(local_slurm, tmp_path, tiny_models):
    """train_ctc with a 1-minute limit and 3,000 updates (100 s on an idle core, more on a busy one): Slurm
    sends SIGTERM at the limit (to every process of the job step, W&B's service too), the job saves a
    checkpoint at its current update and exits for a retry, which gets the same runtime and resumes there
    until the training ends."""
    from test_train_resume import ADAPTOR, CTC_STAGE, write_corpus

    work = tmp_path / "run"
    for part, name in (("llm", "demo-llm"), ("encoder", "demo-mms")):
        shutil.copytree(tiny_models[part], work / "resources/models" / name)
    corpus = write_corpus(tmp_path / "corpus")
    (work / "results/data").mkdir(parents=True)
    for key in ("train", "dev", "language_ids"):
        shutil.copy(corpus[key], work / "results/data" / corpus[key].name)
    stage = {k: v for k, v in CTC_STAGE.items() if k != "fsdp"}
    override = tmp_path / "override.yaml"
    override.write_text(
        yaml.safe_dump(
            {
                "models": {"adaptor": ADAPTOR},
                "train": {
                    "ctc": {
                        **stage,
                        "num_iters_per_epoch": 50,
                        "max_epochs": 120,
                        "checkpoint_every": 1000,
                        "log_every": 25,
                        "patience": None,
                    }
                },
                # No early SIGTERM (sbatch --signal): Slurm checks limits every ~30 s, a warning could come
                # before any update; the limit's own SIGTERM leaves KillWait (30 s) to save.
                "resources": {
                    "rules": {
                        "train_ctc": {
                            "runtime": 1,
                            "mem_mb": 2000,
                            "cpu_threads": 1,
                            "stop_signal_seconds": None,
                        }
                    }
                },
            }
        )
    )
    env = clean_env(SLURM_CONF=str(local_slurm / "etc/slurm.conf"), SLURM_PARTITION="debug")
    started = time.monotonic()
    res = subprocess.run(
        [
            str(BIN / "snakemake"),
            "--profile",
            str(REPO / "profiles/slurm"),
            "-d",
            str(work),
            "--configfile",
            str(REPO / "config/config.yaml"),
            str(override),
            "--slurm-status-command",
            "squeue",
            "--slurm-init-seconds-before-status-checks",
            "1",
            "--allowed-rules",
            "train_ctc",
            "--",
            "results/models/ctc",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    minutes = (time.monotonic() - started) / 60
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    assert (work / "results/models/ctc/model.safetensors").is_file()
    summary = json.loads((work / "results/train/ctc/summary.json").read_text())
    assert summary["final_step"] == 120 * 50 // CTC_STAGE["accum_grad"] and summary["stopped"] == "max_epochs"

    jobs = re.findall(r"submitted with SLURM jobid (\d+) \(log: \S*/rule_train_ctc/", out)
    assert len(jobs) >= 2 and "Trying to restart job" in out, out[-5000:]
    # Slurm's record of each attempt (job completion log: kept however long the run took).
    completion = (local_slurm / "log/jobcomp.log").read_text()
    states = {
        job: re.search(rf"JobId={job} .*?JobState=(\w+) .*?TimeLimit=(\S+)", completion).groups()
        for job in jobs
    }
    assert states[jobs[-1]][0] == "COMPLETED" and {states[j][0] for j in jobs[:-1]} == {"TIMEOUT"}, states
    assert {states[j][1] for j in jobs} == {"1"}, states  # the retries asked for no more time
    # A stopped attempt saved its update and exited 75 (the project's "checkpointed, retry me" status), and
    # the last attempt resumed from a checkpoint. (Which one depends on the machine's speed: an attempt that
    # ends training just at its limit is cut off while exporting, and the retry resumes from the last update.)
    attempt_logs = {
        job: next((work / "logs/slurm/rule_train_ctc").rglob(f"{job}.log")).read_text() for job in jobs
    }
    assert any("non-zero exit status 75" in attempt_logs[job] for job in jobs[:-1]), attempt_logs
    train_log = (work / "logs/train/ctc.log").read_text()
    resumed = re.search(r"resuming from \S*step_(\d{8})", train_log)
    assert resumed and int(resumed.group(1)) > 0, train_log[-3000:]
    print(f"\nslurm time-limit test: {len(jobs)} attempts, {minutes:.1f} min")
