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
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from reduced_demo import REDUCED, outputs

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RERUN = REPO / "scripts" / "rerun_after_kill.sh"
SEED = 84  # draws kills in (or after) demo_data, generate_targets, train_ctc, evaluate and train_ce
KILLS = 5
ROUNDS = 3  # chaos runs from scratch at most, should runs end before all their kills (see the test)
# Rules of the DAG's stages, in their order, that a kill is drawn from (a fixed list, so the draw does not
# depend on how fast the machine is); a kill lands in a job of the drawn rule or of a later one.
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
# The reduced demo (reduced_demo.py) with two tables (ASR and ST on the FLEURS-shaped test split, which need
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


STAMP = r"^\[(?P<when>\w{3} \w{3} +\d+ [\d:]+ \d{4})\]\n"
JOB_START = re.compile(
    STAMP + r"(?:local)?rule (?P<rule>\w+):\n(?P<fields>(?:    .*\n)+)", flags=re.MULTILINE
)
JOB_END = re.compile(STAMP + r"Finished jobid: (?P<jobid>\d+)", flags=re.MULTILINE)


@dataclass(frozen=True)
class Job:
    """One job as a Snakemake log shows it. Job ids differ between attempts; the job's log file (every rule
    of the workflow has one) names the same job in every attempt."""

    jobid: str
    rule: str
    log: str
    started: datetime
    finished: datetime | None


def stamp(when: str) -> datetime:
    return datetime.strptime(when, "%a %b %d %H:%M:%S %Y")


def jobs_in(text: str) -> list[Job]:
    """The jobs a Snakemake log shows started, in the order they started (a block still being written is
    left for the next look)."""
    ends = {m["jobid"]: stamp(m["when"]) for m in JOB_END.finditer(text)}
    jobs = []
    for m in JOB_START.finditer(text):
        fields = dict(re.findall(r"^    (\w+): (.*)$", m["fields"], flags=re.MULTILINE))
        if "jobid" in fields and "log" in fields:
            jobid = fields["jobid"]
            jobs.append(Job(jobid, m["rule"], fields["log"], stamp(m["when"]), ends.get(jobid)))
    return jobs


def job_durations_of(text: str) -> dict[str, float]:
    """Seconds from start to finish of each finished job (by its log file) of a Snakemake log (which stamps
    each start and finish to the second)."""
    return {
        job.log: (job.finished - job.started).total_seconds()
        for job in jobs_in(text)
        if job.finished is not None
    }


def kill_target(jobs: list[Job], rules: list[str]) -> Job | None:
    """The first job of one of `rules` that started and has not finished, in the order the jobs started.
    A rule whose jobs all finished in an earlier attempt does not start again: the next stage's job is
    the target then."""
    return next((job for job in jobs if job.rule in rules and job.finished is None), None)


def job_alive(group: int, log: str) -> bool:
    """Whether a process of the job with log file `log` still runs in process group `group` (a job that
    Snakemake has not yet logged as finished may already have exited). Every rule of the workflow passes
    `--record {log}` to speechllm, so the job's shell (`bash -c '... --record {log} > {log} 2>&1'`) or, where
    the shell execs speechllm, speechllm itself names the log."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
            if os.getpgid(int(pid)) == group and f"--record {log} " in command:
                return True
        except OSError:
            continue
    return False


@dataclass(frozen=True)
class Kill:
    job: Job
    after: float  # seconds after the job was first seen started
    beside: tuple[str, ...]  # the other jobs running at the kill (killed with it)

    def __str__(self) -> str:
        beside = f" (beside {', '.join(self.beside)})" if self.beside else ""
        return f"{self.job.rule} {self.job.log} after {self.after:.1f} s{beside}"


def kill_mid_job(
    proc: subprocess.Popen, log: Path, rules: list[str], fraction: float, durations: dict[str, float]
) -> Kill | None:
    """SIGKILL the run's process group `fraction` of the straight run's duration of a job after that job
    started, the job being the first one of `rules` still running (kill_target). A target that finishes
    first hands over to the next job of `rules` running. None when the run ended before any job could be
    killed so; otherwise the job was verifiably still running at the kill."""
    seen: dict[str, float] = {}  # job id -> when this loop first saw the job started
    while proc.poll() is None:
        now = time.monotonic()
        jobs = jobs_in(log.read_text(errors="replace"))
        job = kill_target(jobs, rules)
        if job is not None:
            after = now - seen.setdefault(job.jobid, now)
            if after >= fraction * max(durations[job.log], 1.0) and job_alive(proc.pid, job.log):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                # A dead Snakemake writes nothing more: its log must still show the job unfinished.
                logged = {other.jobid: other for other in jobs_in(log.read_text(errors="replace"))}
                assert logged[job.jobid].finished is None, f"{job} finished although killed"
                beside = tuple(other.rule for other in jobs if other.finished is None and other != job)
                return Kill(job, after, beside)
        time.sleep(0.1)
    return None


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


def run_to_end(command: list[str], log: Path, timeout: float = 1500) -> None:
    proc = start(command, log)
    assert proc.wait(timeout=timeout) == 0, log.read_text(errors="replace")[-5000:]


def chaos_run(
    workdir: Path, override: Path, plan: list[tuple[str, float]], durations: dict[str, float]
) -> list[Kill]:
    """A run in `workdir` killed by each (stage, fraction) of `plan` in turn (kill_mid_job in the stage's
    rule or a later one of STAGE_RULES), continued after each kill with the documented command, to its end.
    Fewer kills than planned when the run ended before one of them could hit a running job."""
    command = [str(BIN / "snakemake"), *arguments(workdir, override)]
    logs: list[Path] = []
    kills: list[tuple[Kill, int]] = []  # and the attempt each ended
    for stage, fraction in plan:
        logs.append(workdir.with_name(f"{workdir.name}.{len(logs)}.log"))
        proc = start(command, logs[-1])
        kill = kill_mid_job(proc, logs[-1], STAGE_RULES[STAGE_RULES.index(stage) :], fraction, durations)
        if kill is None:  # every job of the stage and later ones finished before a kill was due
            assert proc.returncode == 0, logs[-1].read_text(errors="replace")[-5000:]
            break
        kills.append((kill, len(logs) - 1))
        wait_until_idle(workdir)  # the killed processes are gone (the script would refuse otherwise)
        command = [str(RERUN), *arguments(workdir, override)]  # the documented command after a kill
    else:
        logs.append(workdir.with_name(f"{workdir.name}.final.log"))
        run_to_end(command, logs[-1])
    for kill, attempt in kills:  # a later attempt redid the killed job
        redone = {
            job.log for later in logs[attempt + 1 :] for job in jobs_in(later.read_text(errors="replace"))
        }
        assert kill.job.log in redone, f"{kill}: not run again"
    return [kill for kill, _ in kills]


@pytest.mark.slow
def test_sigkilled_dag_reruns_to_byte_identical_tables(tmp_path, reduced_demo):
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump(CHAOS))
    # The uninterrupted run is the session's reduced demo: the same DAG with two more tables, W&B offline and
    # fewer checkpoints, none of which changes these tables and scores. It gives the expected tables and score
    # files, and its log the duration of each job.
    tables = CHAOS["report"]["tables"]
    expected = {
        name: content
        for name, content in reduced_demo.outputs.items()
        if any(name.startswith((f"results/tables/{table}.", f"results/eval/{table}/")) for table in tables)
    }
    assert len(expected) == 2 * 3 + 14, sorted(expected)  # 2 tables x md/csv/tex; 8 ASR + 6 ST score files

    # The plan: KILLS stage rules and as many fractions drawn with a seed. Kill k SIGKILLs the run (its
    # process group: Snakemake and every job) in the first job still running of the drawn stage or a later
    # one (with -c2 the drawn stage may have run beside an earlier kill's), the drawn fraction of that job's
    # straight-run duration after it started.
    rng = random.Random(SEED)
    stages = sorted(rng.sample(STAGE_RULES, KILLS), key=STAGE_RULES.index)
    plan = [(stage, rng.uniform(0.1, 0.9)) for stage in stages]
    durations = job_durations_of(reduced_demo.log.read_text(errors="replace"))
    kills: list[Kill] = []
    for chaos in range(ROUNDS):
        kills += chaos_run(tmp_path / f"chaos{chaos}", override, plan[len(kills) :], durations)
        assert outputs(tmp_path / f"chaos{chaos}") == expected, f"chaos{chaos}: tables or score files differ"
        if len(kills) == KILLS:
            break
        # The run ended before kill k could hit a running job (it was checked all the same): the kills left
        # go to a run from scratch, kill k with its fraction drawn anew.
        plan[len(kills)] = (plan[len(kills)][0], rng.uniform(0.1, 0.9))
    assert len(kills) == KILLS, (
        f"{len(kills)} kills hit running jobs in {ROUNDS} runs: {'; '.join(map(str, kills))}"
    )
    kills_made = "; ".join(map(str, kills))
    print(f"straight run {reduced_demo.seconds:.0f} s; chaos runs {chaos + 1}; kills: {kills_made}")


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


# A Snakemake log of an attempt after a kill: demo_data was redone, generate_targets (the stage drawn for the
# next kill) had finished beside the killed job before, an evaluate job started and finished, train_ctc runs,
# and the block of a further job is still being written.
ATTEMPT_LOG = """\
Select jobs to execute...
Execute 1 jobs...

[Sat Dec  5 21:08:04 2026]
localrule demo_data:
    output: resources/demo/fleurs/train.jsonl
    log: logs/data/demo_data.log
    jobid: 6
    reason: Incomplete output files detected: resources/demo/fleurs/train.jsonl
    threads: 2
Shell command: speechllm data demo --out-dir resources/demo --record logs/data/demo_data.log
[Sat Dec  5 21:08:11 2026]
Finished jobid: 6 (Rule: demo_data)
1 of 9 steps (11%) done
Execute 2 jobs...

[Sat Dec  5 21:08:11 2026]
localrule evaluate:
    input: results/data/test.jsonl
    output: results/eval/fleurs_asr/cascade.hyps.jsonl, results/eval/fleurs_asr/cascade.scores.json
    log: logs/eval/fleurs_asr/cascade.log
    jobid: 29
    wildcards: table=fleurs_asr, system=cascade

[Sat Dec  5 21:08:12 2026]
localrule train_ctc:
    output: results/train/ctc/model
    log: logs/train/ctc.log
    jobid: 12
[Sat Dec  5 21:08:15 2026]
Finished jobid: 29 (Rule: evaluate)
Error in rule learning_curves:
[Sat Dec  5 21:08:16 2026]
localrule train_ce:
    output: results/train/t/model
"""


def test_kill_target_is_the_first_running_job_at_or_after_the_drawn_stage():
    jobs = jobs_in(ATTEMPT_LOG)
    assert [(job.jobid, job.rule, job.log) for job in jobs] == [
        ("6", "demo_data", "logs/data/demo_data.log"),
        ("29", "evaluate", "logs/eval/fleurs_asr/cascade.log"),
        ("12", "train_ctc", "logs/train/ctc.log"),
    ]  # train_ce's block is not complete yet
    assert [job.finished is None for job in jobs] == [False, False, True]
    later = STAGE_RULES[STAGE_RULES.index("generate_targets") :]
    # generate_targets never starts in this attempt and evaluate already finished: train_ctc is the target
    assert kill_target(jobs, later).rule == "train_ctc"
    assert kill_target(jobs, ["demo_data", "evaluate"]) is None  # all their jobs finished
    assert kill_target(jobs, ["train_ce", "table"]) is None  # not started yet
    durations = job_durations_of(ATTEMPT_LOG)
    assert durations == {"logs/data/demo_data.log": 7.0, "logs/eval/fleurs_asr/cascade.log": 4.0}


# A job as the rules write it (speechllm ... --record {log} > {log} 2>&1), here a sleeping python.
SLEEPER = "python3 -c 'import sys, time; time.sleep(float(sys.argv[1]))'"

FAKE_SNAKEMAKE = f"""\
#!/usr/bin/env bash
# Logs and runs jobs one by one as Snakemake does: name, job id, seconds, and `exec ` where the shell execs.
job() {{{{
  printf '\\n[Sat Dec  5 21:08:04 2026]\\nlocalrule %s:\\n' "$1"
  printf '    log: {{logs}}/%s.log\\n    jobid: %s\\n' "$1" "$2"
  bash -c "set -euo pipefail; $4{SLEEPER} $3 --record {{logs}}/$1.log > {{logs}}/$1.log 2>&1"
  printf '[Sat Dec  5 21:08:05 2026]\\nFinished jobid: %s (Rule: %s)\\n' "$2" "$1"
}}}}
job demo_llm 3 0.3
job evaluate 7 0.3
job train_ce 9 $1 "$2"
"""


@pytest.mark.parametrize("last_job_seconds", [30, 0.3])
@pytest.mark.parametrize("shell_execs", ["", "exec "])
def test_kill_mid_job_hits_a_running_job_or_none_when_the_run_ends(tmp_path, last_job_seconds, shell_execs):
    fake = tmp_path / "snakemake"
    fake.write_text(FAKE_SNAKEMAKE.format(logs=tmp_path))
    fake.chmod(0o755)
    log = tmp_path / "attempt.log"
    # The evaluate job ends before its kill is due (half of 10 s); train_ce's is due after half a second.
    durations = {
        str(tmp_path / f"{rule}.log"): seconds for rule, seconds in [("evaluate", 10), ("train_ce", 1)]
    }
    later = STAGE_RULES[STAGE_RULES.index("generate_targets") :]
    began = time.monotonic()
    proc = start([str(fake), str(last_job_seconds), shell_execs], log)
    kill = kill_mid_job(proc, log, later, 0.5, durations)
    if last_job_seconds == 30:
        assert kill is not None and kill.job.rule == "train_ce" and kill.after >= 0.5, log.read_text()
        assert proc.returncode == -signal.SIGKILL and time.monotonic() - began < 10
        deadline = time.monotonic() + 10  # the job goes with Snakemake (SIGKILLed processes take a moment)
        while job_alive(proc.pid, kill.job.log) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not job_alive(proc.pid, kill.job.log)
    else:
        assert kill is None and proc.returncode == 0, log.read_text()


@pytest.mark.parametrize("shell_execs", ["", "exec "])
def test_job_alive_finds_a_job_by_its_log_in_the_process_group(tmp_path, shell_execs):
    log = tmp_path / "train_ce.log"
    command = f"set -euo pipefail; {shell_execs}{SLEEPER} 30 --record {log} > {log} 2>&1"
    shell = start(["bash", "-c", command], tmp_path / "snakemake.log")
    try:
        deadline = time.monotonic() + 10  # until the job runs
        while not job_alive(shell.pid, str(log)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job_alive(shell.pid, str(log))
        assert not job_alive(shell.pid, str(tmp_path / "train"))  # another job's log
        assert not job_alive(os.getpgid(0), str(log))  # another process group
    finally:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()
