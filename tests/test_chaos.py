"""Chaos: the reduced demo DAG killed with SIGKILL (its whole process group) at seeded random moments across
its stages, continued each time with the documented command (scripts/rerun_after_kill.sh), ends with tables
and score files byte-identical to those of an uninterrupted run."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from test_workflow import REDUCED

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RERUN = REPO / "scripts" / "rerun_after_kill.sh"
SEED = 84  # draws kills in demo_data, generate_targets, train_ctc, evaluate and train_ce
KILLS = 5
# Rules of the DAG's stages, in their order, that a kill is drawn from (a fixed list, so the draw does not
# depend on how fast the machine is).
STAGE_RULES = [
    "demo_data",
    "demo_speech_encoder",
    "demo_llm",
    "generate_targets",
    "train_ctc",
    "evaluate",
    "train_ce",
    "table",
]
# The reduced demo of test_workflow.py with two tables (ASR and ST on the FLEURS-shaped test split, which need
# every stage: data, both demo models, targets, CTC and CE training, evaluation, tables), frequent checkpoints
# (so that a kill during training resumes), no W&B.
CHAOS = {
    **REDUCED,
    "train": {stage: {**REDUCED["train"][stage], "checkpoint_every": 4} for stage in ("ctc", "ce")},
    "report": {"tables": ["fleurs_asr", "fleurs_st"]},
    "wandb": {"mode": "disabled"},
}


def environment() -> dict[str, str]:
    # No W&B service inherited from this process, no W&B at all; one thread per job as in CI.
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**env, "PATH": f"{BIN}:{env['PATH']}", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}


def arguments(workdir: Path, override: Path) -> list[str]:
    return [
        "-s",
        str(REPO / "Snakefile"),
        "-c2",
        "-d",
        str(workdir),
        "--configfile",
        str(REPO / "config/config.yaml"),
        str(override),
    ]


def start(command: list[str], log: Path) -> subprocess.Popen:
    """A new session, so that the kill reaches Snakemake and every job it started (one process group)."""
    with log.open("w") as fh:
        return subprocess.Popen(
            command, stdout=fh, stderr=subprocess.STDOUT, env=environment(), start_new_session=True
        )


def job_durations(log: Path) -> dict[str, float]:
    """Seconds from start to finish of each rule's first job, in the order the rules first started
    (Snakemake's log stamps each start and finish to the second)."""
    text = log.read_text(errors="replace")
    stamp = r"^\[(?P<when>\w{3} \w{3} +\d+ [\d:]+ \d{4})\]\n"
    starts = {
        m["jobid"]: (m["rule"], m["when"])
        for m in re.finditer(
            stamp + r"(?:local)?rule (?P<rule>\w+):\n(?:    .*\n)*?    jobid: (?P<jobid>\d+)",
            text,
            flags=re.MULTILINE,
        )
    }
    durations: dict[str, float] = {}
    for m in re.finditer(stamp + r"Finished jobid: (?P<jobid>\d+)", text, flags=re.MULTILINE):
        rule, began = starts[m["jobid"]]
        seconds = (
            datetime.strptime(m["when"], "%a %b %d %H:%M:%S %Y")
            - datetime.strptime(began, "%a %b %d %H:%M:%S %Y")
        ).total_seconds()
        durations.setdefault(rule, seconds)
    order = list(dict.fromkeys(rule for rule, _ in starts.values()))
    return {rule: durations[rule] for rule in order if rule in durations}


def wait_until_idle(workdir: Path, timeout: float = 30) -> None:
    """Until no process works in `workdir` (SIGKILLed processes take a moment to go)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                busy += [pid] if os.readlink(f"/proc/{pid}/cwd") == str(workdir) else []
            except OSError:
                continue
        if not busy:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes still work in {workdir}: {busy}")


def outputs(workdir: Path) -> dict[str, bytes]:
    files = [*workdir.glob("results/tables/*"), *workdir.glob("results/eval/*/*.scores.json")]
    return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(files)}


def run_to_end(command: list[str], log: Path, timeout: float = 1500) -> None:
    proc = start(command, log)
    assert proc.wait(timeout=timeout) == 0, log.read_text(errors="replace")[-5000:]


@pytest.mark.slow
def test_sigkilled_dag_reruns_to_byte_identical_tables(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump(CHAOS))
    straight, chaos = tmp_path / "straight", tmp_path / "chaos"
    snakemake = [str(BIN / "snakemake")]

    began = time.monotonic()
    run_to_end([*snakemake, *arguments(straight, override)], tmp_path / "straight.log")
    straight_seconds = time.monotonic() - began
    expected = outputs(straight)
    assert len(expected) == 2 * 3 + 14, sorted(expected)  # 2 tables x md/csv/tex; 8 ASR + 6 ST score files

    # The plan: KILLS stage rules drawn with a seed; the run is killed (the rule's job and whatever runs
    # beside it) a drawn fraction of the rule's duration in the straight run after its first job starts.
    durations = job_durations(tmp_path / "straight.log")
    rng = random.Random(SEED)
    targets = sorted(rng.sample(STAGE_RULES, KILLS), key=STAGE_RULES.index)
    delays = [rng.uniform(0.1, 0.9) * max(durations[rule], 1.0) for rule in targets]
    killed_in = []
    command = [*snakemake, *arguments(chaos, override)]
    for attempt, (rule, delay) in enumerate(zip(targets, delays, strict=True)):
        log = tmp_path / f"chaos{attempt}.log"
        proc = start(command, log)
        started = re.compile(rf"^(?:local)?rule {rule}:", flags=re.MULTILINE)
        while proc.poll() is None and not started.search(log.read_text(errors="replace")):
            time.sleep(0.1)
        time.sleep(delay)
        running = proc.poll() is None
        if running:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        assert running or proc.returncode == 0, log.read_text(errors="replace")[-5000:]
        if not running:
            break
        killed_in.append(f"{rule} after {delay:.1f} s")
        wait_until_idle(chaos)  # the killed processes are gone (the script would refuse otherwise)
        # The documented command after a kill.
        command = [str(RERUN), *arguments(chaos, override)]
    assert len(killed_in) == KILLS, killed_in  # every kill happened mid-run, not after the end
    run_to_end(command, tmp_path / "chaos_final.log")

    assert outputs(chaos) == expected, "tables or score files differ from the uninterrupted run's"
    print(f"straight run {straight_seconds:.0f} s; killed in: {', '.join(killed_in)}")


def test_rerun_after_kill_refuses_while_a_run_still_works_there(tmp_path):
    """Removing the lock of a live run would let two runs write the same files: the script names the
    process."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    fake = tmp_path / "snakemake"  # a stand-in that records how it was called
    fake.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\n')
    fake.chmod(0o755)

    def rerun(*args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "SNAKEMAKE": str(fake)}
        return subprocess.run([str(RERUN), *args], env=env, capture_output=True, text=True, timeout=60)

    live = subprocess.Popen(["bash", "-c", "exec -a 'speechllm train ctc' sleep 60"], cwd=workdir)
    try:
        time.sleep(0.3)
        busy = rerun("-c1", "-d", str(workdir))
        assert busy.returncode == 3 and f"{live.pid} speechllm train ctc" in busy.stderr, busy.stderr
        assert not (tmp_path / "calls").exists()  # neither unlocked nor rerun
    finally:
        live.kill()
        live.wait()
    done = rerun("-c1", "--directory", str(workdir))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "calls").read_text().splitlines() == [
        f"--unlock -c1 --directory {workdir}",
        f"--rerun-incomplete -c1 --directory {workdir}",
    ]
