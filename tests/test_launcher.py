"""How model steps are launched and what they ask Slurm for: resources and shell commands from Snakemake dry
runs (rules/common.smk: job_resources, launcher), run for real with accelerate on CPU and, for several nodes,
under a stand-in srun."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TARGETS = [
    "results/models/ctc_init",
    "results/models/ctc",
    "results/models/tmi",
    "results/eval/fleurs_asr/t.parquet",
]
MULTI_NODE = {"resources": {"rules": {"train_ce": {"nodes": 2}}}}


def dry_run(workdir: Path, *configs: Path | str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "WANDB_MODE": "offline"}
    return subprocess.run(
        [
            str(BIN / "snakemake"),
            "-s",
            str(REPO / "Snakefile"),
            "-n",
            "-p",
            "-c",
            "64",
            "-d",
            str(workdir),
            "--configfile",
            str(REPO / "config/config.yaml"),
            *map(str, configs),
            *extra,
            "--",
            *TARGETS,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def parse_jobs(out: str) -> dict[str, dict]:
    """The first job of each rule in a dry run's output: its resources and its shell command."""
    jobs: dict[str, dict] = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:\n)", out):
        head = re.match(r"(?:local)?rule (\w+):\n", block)
        if not head or head.group(1) in jobs:
            continue
        res = re.search(r"^ +resources: (.*)$", block, re.M)
        cmd = re.search(r"^Shell command: (.*)$", block, re.M)
        resources = {}
        for item in res.group(1).split(", ") if res else []:
            key, _, value = item.partition("=")
            resources[key] = int(value) if value.isdigit() else value
        jobs[head.group(1)] = {"resources": resources, "shell": cmd.group(1) if cmd else ""}
    return jobs


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def demo_jobs(tmp_path_factory) -> dict[str, dict]:
    res = dry_run(tmp_path_factory.mktemp("demo"))
    assert res.returncode == 0, res.stderr[-3000:]
    return parse_jobs(res.stdout)


@pytest.fixture(scope="module")
def paper_jobs(tmp_path_factory) -> dict[str, dict]:
    """Paper scale, CE on two nodes, as the third attempt of each job (after two failures)."""
    tmp = tmp_path_factory.mktemp("paper")
    res = dry_run(
        tmp,
        REPO / "config/experiments/bloomzmms.yaml",
        write_yaml(tmp / "nodes.yaml", MULTI_NODE),
        extra=("--attempt", "3"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return parse_jobs(res.stdout)


def test_cpu_steps_keep_the_plain_call(demo_jobs):
    for rule in ("train_ctc", "train_ce", "evaluate"):
        job = demo_jobs[rule]
        # `exec`: the step replaces the rule's shell, so a stop signal finds it with Snakemake still waiting.
        assert job["shell"].split()[:2] == ["exec", "speechllm"], job["shell"][:200]
        assert job["resources"]["gpu"] == 0 and "cpus_per_gpu" not in job["resources"]
        # First attempt: the config's memory and runtime as they are.
        assert (job["resources"]["mem_mb"], job["resources"]["runtime"]) == (8000, 60)


def test_rule_overrides_set_a_steps_threads(demo_jobs, paper_jobs):
    """`resources.rules.<rule>.cpu_threads` reaches the job's --threads; without it,
    `resources.cpu_threads`."""

    def threads(job: dict) -> int:
        return int(re.search(r"--threads (\d+)", job["shell"]).group(1))

    demo = yaml.safe_load((REPO / "config/config.yaml").read_text())["resources"]
    paper = yaml.safe_load((REPO / "config/experiments/bloomzmms.yaml").read_text())["resources"]
    assert demo["rules"]["evaluate"]["cpu_threads"] != demo["cpu_threads"]  # the override is what is tested
    assert threads(demo_jobs["evaluate"]) == demo["rules"]["evaluate"]["cpu_threads"]
    assert threads(demo_jobs["train_ctc"]) == demo["cpu_threads"]
    # The paper config sets its own: config.yaml's demo override must not leak into it through the merge.
    assert (
        threads(paper_jobs["evaluate"]) == paper["rules"]["evaluate"]["cpu_threads"] == paper["cpu_threads"]
    )
    assert threads(paper_jobs["train_ctc"]) == paper["cpu_threads"]


def test_every_step_rule_honours_its_thread_override(tmp_path):
    """Each step rule of the BLOOMZMMS DAG that `resources.rules.<rule>.cpu_threads` can name takes it (none
    validates and is then ignored)."""
    overrides = {"train_ctc": 3, "train_ce": 5, "evaluate": 7, "generate_targets": 4, "init_model": 6}
    res = dry_run(
        tmp_path,
        write_yaml(
            tmp_path / "threads.yaml",
            {"resources": {"rules": {rule: {"cpu_threads": n} for rule, n in overrides.items()}}},
        ),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = parse_jobs(res.stdout)
    for rule, n in overrides.items():
        assert f"--threads {n} " in jobs[rule]["shell"], (rule, jobs[rule]["shell"][-200:])


def test_one_process_steps_take_rule_overrides_and_retry_scaling(tmp_path, paper_jobs):
    """init_model (which loads the whole LLM) and the generation shards size their jobs from `resources` and
    `resources.rules.<rule>` as the training steps do, growing on retries."""
    overrides = {
        "init_model": {"mem_mb": 1111, "runtime": 7},
        "generate_targets": {"cpu_threads": 3, "mem_mb": 2222},
    }
    res = dry_run(tmp_path, write_yaml(tmp_path / "rules.yaml", {"resources": {"rules": overrides}}))
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = parse_jobs(res.stdout)
    assert (jobs["init_model"]["resources"]["mem_mb"], jobs["init_model"]["resources"]["runtime"]) == (
        1111,
        7,
    )
    assert jobs["generate_targets"]["resources"]["mem_mb"] == 2222
    assert "--threads 3 " in jobs["generate_targets"]["shell"]
    # Paper scale, third attempt: the base 64 GB × 1.5², and init_model asks for no GPU (config
    # rules.init_model).
    paper = yaml.safe_load((REPO / "config/experiments/bloomzmms.yaml").read_text())["resources"]
    scale = yaml.safe_load((REPO / "config/config.yaml").read_text())["resources"]["retry_scale"]
    init = paper_jobs["init_model"]["resources"]
    assert init["mem_mb"] == round(paper["mem_mb"] * scale**2) and init["gpu"] == 0
    assert paper_jobs["generate_targets"]["resources"]["gpu"] == paper["gpu"]
    # Source steps take config.yaml's `resources.rules` (no GPU, their own memory) at every scale.
    demo = yaml.safe_load((REPO / "config/config.yaml").read_text())["resources"]["rules"]["fleurs_data"]
    fleurs = paper_jobs["fleurs_data"]
    assert fleurs["resources"]["gpu"] == 0 and fleurs["resources"]["mem_mb"] == round(
        demo["mem_mb"] * scale**2
    )
    assert "--threads" not in fleurs["shell"]  # the FLEURS conversion streams one split at a time
    # So do the light steps (tables, manifests, bookkeeping): sized in config.yaml, never on a GPU.
    for rule in ("prepare_split", "language_ids", "assemble_targets"):
        own = yaml.safe_load((REPO / "config/config.yaml").read_text())["resources"]["rules"][rule]
        job = paper_jobs[rule]["resources"]
        assert job["gpu"] == 0 and job["mem_mb"] == round(own["mem_mb"] * scale**2), rule
        assert job["runtime"] == round(own["runtime"] * scale**2), rule


LAUNCH = 'trap "" TERM USR1; exec env PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT accelerate launch '


def test_gpu_steps_launch_one_process_per_gpu(paper_jobs):
    ctc, evaluate = paper_jobs["train_ctc"], paper_jobs["evaluate"]
    assert ctc["shell"].startswith(LAUNCH + "--num_processes 2 --num_machines 1 --multi_gpu ")
    assert ctc["shell"].split(" --no_python ", 1)[1].startswith("speechllm train ctc ")
    assert (ctc["resources"]["gpu"], ctc["resources"]["cpus_per_gpu"]) == (2, 8)
    assert evaluate["shell"].startswith(LAUNCH + "--num_processes 1 --num_machines 1 --mixed_precision")
    assert evaluate["resources"]["gpu"] == 1


def test_retries_ask_for_more_memory_and_time(paper_jobs):
    # Attempt 3 = two retries at retry_scale 1.5: 2.25 × mem_mb of config/experiments/bloomzmms.yaml; the
    # runtime of steps that resume stays (the retry goes on where the stopped job was), that of the others
    # grows.
    assert paper_jobs["train_ce"]["resources"]["mem_mb"] == 432000
    assert paper_jobs["train_ctc"]["resources"]["mem_mb"] == 288000
    for rule in ("train_ctc", "train_ce", "evaluate", "generate_targets"):
        assert paper_jobs[rule]["resources"]["runtime"] == 2880, rule
        assert paper_jobs[rule]["resources"]["slurm_extra"] == "--signal=TERM@600", rule
    assert paper_jobs["init_model"]["resources"]["runtime"] == 6480
    assert "slurm_extra" not in paper_jobs["init_model"]["resources"]


def test_the_slurm_profile_retries_every_signalled_step_often(paper_jobs):
    """The steps that ask for SIGTERM before their limit stop for a retry each time: the Slurm profile marks
    them preemptible (more retries than `retries`, for them only)."""
    profile = yaml.safe_load((REPO / "profiles/slurm/profile.yaml").read_text())
    signalled = {rule for rule, job in paper_jobs.items() if "slurm_extra" in job["resources"]}
    assert {"train_ctc", "train_ce", "generate_targets", "evaluate"} <= signalled
    assert signalled <= set(profile["preemptible-rules"])
    assert profile["preemptible-retries"] > profile["retries"] and profile["slurm-efficiency-report"] is True


def test_sharded_evaluation_is_one_job_per_shard_and_a_gather(tmp_path):
    """evaluate.shards: 3 -> three decoding jobs (each its share of the batches, resumable) and one gather job
    that writes the Parquet and the score file; with 1 (the default) one job does all of it."""
    res = dry_run(tmp_path, write_yaml(tmp_path / "shards.yaml", {"evaluate": {"shards": 3}}))
    assert res.returncode == 0, res.stderr[-3000:]
    shards = re.findall(
        r"--shard (\d) --num-shards 3 --rows results/eval/fleurs_asr/t\.shards/shard(\d)\.json", res.stdout
    )
    assert sorted(shards) == [("0", "0"), ("1", "1"), ("2", "2")]
    gather = parse_jobs(res.stdout)["evaluate_gather"]
    assert gather["shell"].startswith("speechllm evaluate gather fleurs_asr ")
    assert (
        " --rows " + " ".join(f"results/eval/fleurs_asr/t.shards/shard{k}.json" for k in range(3))
        in gather["shell"]
    )


def test_many_preemptions_keep_the_memory_request_bounded(tmp_path):
    """A resumable step retried for the 8th time (preemptible retries) asks for the memory of the third
    attempt (retry_scale_attempts: 2), not 1.5^7 times it, which no node has."""
    res = dry_run(tmp_path, REPO / "config/experiments/bloomzmms.yaml", extra=("--attempt", "8"))
    assert res.returncode == 0, res.stderr[-3000:]
    jobs = parse_jobs(res.stdout)
    assert jobs["train_ce"]["resources"]["mem_mb"] == 432000
    assert jobs["train_ce"]["resources"]["runtime"] == 2880


def test_stop_signal_must_leave_time_to_run(tmp_path):
    override = write_yaml(tmp_path / "o.yaml", {"resources": {"rules": {"train_ctc": {"runtime": 5}}}})
    res = dry_run(tmp_path, override)
    assert res.returncode != 0
    assert "config error at key 'resources.rules.train_ctc.stop_signal_seconds'" in res.stderr, res.stderr[
        -2000:
    ]


def test_multi_node_ce_asks_slurm_for_gpus_per_node(paper_jobs):
    """The `mpi` resource trick, through the pinned Slurm plugin's own sbatch builder."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    res = paper_jobs["train_ce"]["resources"]
    assert {k: res[k] for k in ("gres", "nodes", "mpi", "tasks", "tasks_per_gpu")} == {
        "gres": "gpu:4",
        "nodes": 2,
        "mpi": "srun",
        "tasks": 2,
        "tasks_per_gpu": 0,
    }
    assert "gpu" not in res  # --gpus would count GPUs over all nodes

    class JobResources(dict):
        __getattr__ = dict.__getitem__

    job = SimpleNamespace(resources=JobResources(res), threads=8)
    params = {
        "run_uuid": "run",
        "slurm_logfile": "x.log",
        "comment_str": "train_ce",
        "account": "",
        "partition": "",
        "workdir": "/tmp",
    }
    sbatch = get_submit_command(job, params) + set_gres_string(job)
    for flag in (
        "--nodes=2",
        "--ntasks=2",
        "--cpus-per-gpu=8",
        "--gres=gpu:4",
        "--mem 432000",
        "-t 2880",
        "--signal=TERM@600",
    ):
        assert re.search(rf"(^| ){re.escape(flag)}( |$)", sbatch), (flag, sbatch)
    assert "--ntasks-per-gpu" not in sbatch and "--gpus" not in sbatch, sbatch


def write_stub(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def test_multi_node_ce_runs_one_accelerate_launch_per_node(paper_jobs, tmp_path):
    """The generated command under a stand-in srun (one task per node, Slurm's variables set per task) and
    scontrol; a stand-in accelerate records what each node's launcher was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_stub(
        bin_dir / "srun",
        "#!/usr/bin/env bash\n"
        'echo "$@" > "$RECORD_DIR/srun.args"\n'
        "nodes=1\n"
        "while [[ $1 == -* ]]; do case $1 in --nodes=*) nodes=${1#--nodes=};; esac; shift; done\n"
        "for ((i = 0; i < nodes; i++)); do\n"
        '  SLURM_NODEID=$i SLURM_NNODES=$nodes SLURM_JOB_NODELIST="gpu[07-08]" SLURM_JOB_ID=123456 '
        '"$@" || exit\n'
        "done\n",
    )
    write_stub(
        bin_dir / "scontrol",
        '#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] && printf "gpu07\\ngpu08\\n"\n',
    )
    write_stub(
        bin_dir / "accelerate",
        f"#!{sys.executable}\nimport json, os, sys\n"
        "path = os.path.join(os.environ['RECORD_DIR'], 'node' + os.environ['SLURM_NODEID'] + '.json')\n"
        "json.dump(sys.argv[1:], open(path, 'w'))\n",
    )
    (tmp_path / "logs/train").mkdir(parents=True)
    command = paper_jobs["train_ce"]["shell"]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD_DIR": str(tmp_path)}
    res = subprocess.run(
        ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr

    srun = (tmp_path / "srun.args").read_text().split()
    assert srun[:6] == [
        "--nodes=2",
        "--ntasks=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=32",
        "--mem=0",
        "--kill-on-bad-exit=1",
    ]
    words = shlex.split(command)
    speechllm_argv = words[words.index("accelerate-node") + 1 : words.index(">")]
    assert speechllm_argv[:3] == ["speechllm", "train", "ce"]
    settings = json.loads(speechllm_argv[speechllm_argv.index("--settings") + 1])
    assert settings["models"]["llm"]["name_or_path"] == "bigscience/bloomz-7b1"
    for rank in (0, 1):
        argv = json.loads((tmp_path / f"node{rank}.json").read_text())
        assert argv == [
            "launch",
            "--multi_gpu",
            "--num_processes",
            "8",
            "--num_machines",
            "2",
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "gpu07",
            "--main_process_port",
            str(29500 + 123456 % 1000),
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--no_python",
            *speechllm_argv,
        ]


def test_single_node_launcher_starts_one_process_per_gpu(paper_jobs, tmp_path):
    """train_ctc's launcher (2 GPUs) with real accelerate on CPU: two ranks of one world, arguments intact."""
    launcher = paper_jobs["train_ctc"]["shell"].split(" speechllm ", 1)[0]
    # One file per rank: the ranks share the launcher's stdout, where their lines can interleave.
    probe = (
        "import json, os, sys; open(f\"rank{os.environ['RANK']}.json\", 'w')"
        ".write(json.dumps([os.environ['WORLD_SIZE'], sys.argv[1:]]))"
    )
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "ACCELERATE_USE_CPU": "true"}
    res = subprocess.run(
        f"{launcher} {shlex.quote(sys.executable)} -c {shlex.quote(probe)} --settings '{{\"a\": 1}}'",
        shell=True,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.glob("rank*.json")) == ["rank0.json", "rank1.json"], res.stdout
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == ["2", ["--settings", '{"a": 1}']]


STOPPABLE_PROBE = """
import os, pathlib, time
from speechllm import stopping
stopping.install()
rank = os.environ.get("RANK", "0")
pathlib.Path(f"ready{rank}").touch()
while stopping.requested() is None:
    time.sleep(0.05)
time.sleep(1)
signals = len(stopping._received)  # a launcher passing the signal on has done so by now
time.sleep(2)  # writing a checkpoint
pathlib.Path(f"saved{rank}").write_text(str(signals))
stopping.check("the probe's checkpoint")
"""


@pytest.mark.parametrize(("rule", "ranks"), [("evaluate", 1), ("train_ctc", 2)])
def test_launchers_wait_for_a_signalled_step_to_save(paper_jobs, tmp_path, rule, ranks):
    """Slurm sends SIGTERM to every process of a job step. The launcher (accelerate's, torch's elastic agent)
    must outlive `speechllm` saving its progress: when it exits, Snakemake's wrapper ends the step and Slurm
    kills what is left. accelerate's one-process launcher would die at once, the agent would kill after
    30 s."""
    import psutil

    launcher = paper_jobs[rule]["shell"].split(" speechllm ", 1)[0]
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "ACCELERATE_USE_CPU": "true",
        "PYTHONPATH": str(REPO / "src"),
    }
    log = tmp_path / "step.log"
    with log.open("w") as fh:
        command = f"{launcher} {shlex.quote(sys.executable)} -c {shlex.quote(STOPPABLE_PROBE)}"
        step = subprocess.Popen(
            ["bash", "-c", command], cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready*"))) < ranks and step.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(list(tmp_path.glob("ready*"))) == ranks, log.read_text()[-2000:]
    for process in [psutil.Process(step.pid), *psutil.Process(step.pid).children(recursive=True)]:
        process.send_signal(signal.SIGTERM)
    step.wait(timeout=120)
    # Only now (the launcher is gone) may the step end: every rank had saved, and it failed (Snakemake
    # retries).
    saved = sorted(tmp_path.glob("saved*"))
    assert len(saved) == ranks, log.read_text()[-2000:]
    assert step.returncode != 0 and "SIGTERM received: the probe's checkpoint" in log.read_text()
    # No launcher passed the signal on (the elastic agent would, then kill 30 s later).
    assert all(path.read_text() == "1" for path in saved)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"resources": {"rules": {"evaluate": {"gpu": 2}}}}, "resources.rules.evaluate.gpu"),
        ({"resources": {"rules": {"evaluate": {"nodes": 2}}}}, "resources.rules.evaluate.nodes"),
        ({"resources": {"rules": {"train_ce": {"nodes": 2, "gpu": 0}}}}, "resources.rules.train_ce.nodes"),
        ({"resources": {"rules": {"prepare_split": {"gpu": 2}}}}, "resources.rules.prepare_split.gpu"),
        ({"resources": {"rules": {"prepare_splits": {"gpu": 0}}}}, "resources.rules"),  # no such rule
    ],
)
def test_resource_config_errors_name_the_key(tmp_path, data, key):
    res = dry_run(tmp_path, write_yaml(tmp_path / "override.yaml", data))
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if "config error at key" in line]
    assert len(lines) == 1 and f"'{key}'" in lines[0], res.stderr[-2000:]
