"""Workflow logic the Snakefile calls, importable and testable without Snakemake or torch.

- Compute of the model steps (config `resources`, with `resources.rules.<rule>` merged over it): memory and
  runtime that grow on retries, GPUs per node, Slurm options (`job_resources`).
- The command that starts a model step's `speechllm` call: plain `exec`, `accelerate launch` on one node, or
  `srun` with one `accelerate launch` per node (`launch_command`).
- Which systems are evaluated on which benchmark (config `evaluate.design`, plus the `released` checkpoints):
  `evaluation_design`.

rules/common.smk wraps these with the loaded config and turns `ConfigError` into its one-line config error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

# accelerate training: may span nodes (resources.rules.<rule>.nodes)
MULTI_NODE_RULES = ("train_ctc", "train_ce", "train_kd")
# Steps that save their progress as they go and resume from it (training checkpoints, the partial files of the
# generation and evaluation shards). On SIGTERM they save and exit with status 75 (speechllm/stopping.py), so
# a job stopped by its time limit or preempted is retried (the Slurm profile lists them as preemptible) and
# goes on where it stopped: a retry needs no more time than the first attempt.
RESUMABLE_RULES = ("train_ctc", "train_ce", "train_kd", "generate_targets", "generate_responses", "evaluate")

# Slurm signals every process of a job step, and a stop signal must reach `speechllm` while its launchers
# still wait for it (once they exit, the step ends and what is left is killed). So the launcher replaces the
# rule's shell (`exec`) and ignores SIGTERM / SIGUSR1 (inherited; `speechllm` installs its own handlers), and
# torch's elastic agent (several processes) is told not to handle SIGTERM (torchrun --signals_to_handle, read
# from PET_SIGNALS_TO_HANDLE): it would pass it on and kill the processes 30 s later, checkpoint written or
# not.
SIGNAL_TRANSPARENT = 'trap "" TERM USR1; exec env PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT'
# Precision comes from the config (train.<stage>), not from accelerate's defaults.
ACCELERATE_DEFAULTS = "--mixed_precision no --dynamo_backend no --no_python"

# Decoders whose systems are the baselines of a table (the last columns): the CTC model's transcript put into
# the LLM prompt as text, and the gold text (only the LLM is loaded).
BASELINE_DECODERS = ("cascade", "text")
# The only benchmarks a CTC head can be scored on (it writes transcripts).
CTC_BENCHMARKS = ("fleurs_asr",)
# With released.only the baselines read this released model (the trained ones are not built).
RELEASED_BASELINE_MODEL = {"bloomzmms": "released_ctc", "kang_roy": "released_kang_roy"}
MODELS_DIR = "results/models"


class ConfigError(ValueError):
    """A config value the workflow cannot run with; `key` is its dotted config key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config error at key '{key}': {message}")
        self.key, self.message = key, message


def rule_resources(resources: Mapping[str, Any], rule_name: str) -> dict[str, Any]:
    """config `resources` with `resources.rules.<rule_name>` merged over it."""
    base = {k: v for k, v in resources.items() if k != "rules"}
    return {**base, **(resources.get("rules") or {}).get(rule_name, {})}


def retry_scaled(value: float, scale: float, attempts: int) -> Callable[[Any, int], int]:
    """A resource that grows with each retry, value × scale^(retry), for the first `attempts` retries: a job
    killed for memory (or, if it cannot resume, for time) asks for more when it is retried. Snakemake calls it
    with (wildcards, attempt), attempt counting from 1."""
    return lambda wildcards, attempt: round(value * scale ** min(attempt - 1, attempts))


def stop_signal(rule_name: str, res: Mapping[str, Any], key: str) -> dict[str, str]:
    """sbatch --signal for a resumable step: SIGTERM `stop_signal_seconds` before the time limit (to every
    process of the job's steps, not the batch shell; Slurm may send it up to a minute earlier)."""
    seconds = res.get("stop_signal_seconds")
    if rule_name not in RESUMABLE_RULES or not seconds:
        return {}
    if seconds >= res["runtime"] * 60:
        raise ConfigError(
            f"{key}.stop_signal_seconds",
            f"{seconds} s is not shorter than {rule_name}'s runtime of {res['runtime']} min",
        )
    return {"slurm_extra": f"--signal=TERM@{seconds}"}


def job_resources(resources: Mapping[str, Any], rule_name: str) -> dict[str, Any]:
    """A model step's Snakemake resources from config `resources` (`resources: **job_resources("<rule>")`).

    mem_mb grows on retries (`retry_scale`, for `retry_scale_attempts` retries); runtime too, except for the
    resumable steps, which keep it (a retry goes on where the last attempt stopped) and ask Slurm for SIGTERM
    ahead of their time limit (`stop_signal`). gpu > 0: `gpu` and `cpus_per_gpu` (sbatch --gpus,
    --cpus-per-gpu). nodes > 1: GPUs per node as `gres` (sbatch --gres counts per node) and the `mpi`
    resource, so the Slurm plugin runs the shell command as the batch step itself and the command's own srun
    (see `launch_command`) starts one task per node.
    """
    res = rule_resources(resources, rule_name)
    key = f"resources.rules.{rule_name}" if rule_name in (resources.get("rules") or {}) else "resources"
    scale, attempts = res["retry_scale"], res["retry_scale_attempts"]
    out: dict[str, Any] = {
        "mem_mb": retry_scaled(res["mem_mb"], scale, attempts),
        "runtime": res["runtime"]
        if rule_name in RESUMABLE_RULES
        else retry_scaled(res["runtime"], scale, attempts),
        **stop_signal(rule_name, res, key),
    }
    for name in ("slurm_partition", "slurm_account"):  # unset: the profile's default (environment or cluster)
        if res.get(name):
            out[name] = res[name]
    nodes = res.get("nodes", 1)
    if rule_name not in MULTI_NODE_RULES and res["gpu"] > 1:
        raise ConfigError(f"{key}.gpu", f"{rule_name} runs one process on one GPU: use gpu 0 or 1")
    if rule_name not in MULTI_NODE_RULES and nodes > 1:
        raise ConfigError(f"{key}.nodes", f"{rule_name} runs on one node")
    if nodes > 1:
        if res["gpu"] < 1:
            raise ConfigError(f"{key}.nodes", "several nodes need gpu >= 1 (GPUs per node)")
        # tasks_per_gpu=0: without it the plugin turns `tasks` into --ntasks-per-gpu.
        out.update(
            gres=f"gpu:{res['gpu']}",
            cpus_per_gpu=res["cpus_per_gpu"],
            nodes=nodes,
            mpi="srun",
            tasks=nodes,
            tasks_per_gpu=0,
        )
    else:
        out["gpu"] = res["gpu"]
        if res["gpu"] > 0:
            out["cpus_per_gpu"] = res["cpus_per_gpu"]
    return out


def gpus_per_node(resources: Mapping[str, Any]) -> int:
    """GPUs per node of a job: the `gpu` resource, or the count at the end of a `gres` like gpu:4."""
    if resources.get("gpu"):
        return int(resources["gpu"])
    gres = str(resources.get("gres") or "")
    return int(gres.rsplit(":", 1)[1]) if gres.startswith("gpu:") else 0


def launch_command(resources: Mapping[str, Any], main_process_port: int) -> str:
    """What starts a model step's `speechllm` call (params.launcher, in front of it in the shell line), from
    the job's evaluated resources.

    No GPU: `exec` (the plain call replaces the shell). GPUs on one node: `accelerate launch` with one process
    per GPU, behind `SIGNAL_TRANSPARENT`. Several nodes: `srun` starts one task per node, and each runs
    `accelerate launch` with its machine rank ($SLURM_NODEID) and the main node's address (the first host of
    $SLURM_JOB_NODELIST); the port is offset by the job id so jobs sharing a node do not collide. The
    `speechllm ...` words that follow reach the per-node shell as its arguments ("$@"), so their quoting is
    kept.
    """
    gpus, nodes = gpus_per_node(resources), int(resources.get("nodes") or 1)
    if gpus == 0:
        return "exec"
    if nodes == 1:
        multi = " --multi_gpu" if gpus > 1 else ""
        return (
            f"{SIGNAL_TRANSPARENT} accelerate launch --num_processes {gpus} --num_machines 1{multi} "
            f"{ACCELERATE_DEFAULTS}"
        )
    per_node = (
        f"{SIGNAL_TRANSPARENT} accelerate launch --multi_gpu --num_processes {gpus * nodes} "
        f"--num_machines {nodes} "
        '--machine_rank "$SLURM_NODEID" '
        '--main_process_ip "$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)" '
        f"--main_process_port $(({main_process_port} + SLURM_JOB_ID % 1000)) {ACCELERATE_DEFAULTS}"
    )
    return (
        f"exec {resources.get('mpi') or 'srun'} --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1 "
        f"--cpus-per-task={gpus * int(resources['cpus_per_gpu'])} --mem=0 --kill-on-bad-exit=1 "
        f"bash -c '{per_node} \"$@\"' accelerate-node"
    )


# system -> (model directory, decoder); benchmark -> its systems, in table column order.
Systems = dict[str, tuple[str, str]]
BenchmarkSystems = dict[str, list[str]]


def released_systems(config: Mapping[str, Any], kind: str) -> dict[str, str]:
    """The published checkpoints configured under `released` for this kind of system: released_<name> ->
    decoder (the model is imported into results/models/released_<name>, rules/models.smk)."""
    released = config["released"]
    if kind == "kang_roy":
        return {"released_kang_roy": "llm"} if released["kang_roy"]["checkpoint"] else {}
    return {f"released_{name}": entry["decoder"] for name, entry in released["bloomzmms"].items()}


def evaluation_design(config: Mapping[str, Any]) -> tuple[Systems, BenchmarkSystems]:
    """Which system is evaluated on which benchmark: config `evaluate.design.<system>` (systems: model under
    results/models/ and decoder; benchmarks: their systems), then the `released` checkpoints.

    covost2_st needs a local release (evaluate.covost2.release_dir). Released checkpoints join every benchmark
    (a CTC-decoded one only the ASR benchmarks) after the configured systems and before the baselines
    (`BASELINE_DECODERS`); with released.only the configured systems other than the baselines give way to
    them, and the baselines read the released model `RELEASED_BASELINE_MODEL`.
    """
    kind = config.get("system", "bloomzmms")
    key = f"evaluate.design.{kind}"
    design = config["evaluate"]["design"].get(kind)
    if not design:
        raise ConfigError(key, f"no systems × benchmarks design for system '{kind}'")
    systems = {
        name: (f"{MODELS_DIR}/{entry['model']}", entry["decoder"])
        for name, entry in design["systems"].items()
    }
    benchmarks = {b: list(names) for b, names in design["benchmarks"].items()}
    if not config["evaluate"]["covost2"]["release_dir"]:
        benchmarks.pop("covost2_st", None)
    for benchmark, names in benchmarks.items():
        for name in names:
            if name not in systems:
                raise ConfigError(
                    f"{key}.benchmarks.{benchmark}",
                    f"system '{name}' is not one of {key}.systems ({', '.join(systems)})",
                )
    released = released_systems(config, kind)
    if not released:
        return systems, benchmarks
    only = config["released"]["only"]
    baselines = [s for s, (_, decoder) in systems.items() if decoder in BASELINE_DECODERS]
    if only:
        source = RELEASED_BASELINE_MODEL[kind]
        if baselines and source not in released:
            raise ConfigError("released.only", f"the {' and '.join(baselines)} baselines need {source}")
        systems = {s: v for s, v in systems.items() if s in baselines}
        for s in baselines:
            systems[s] = (f"{MODELS_DIR}/{source}", systems[s][1])
    systems.update({name: (f"{MODELS_DIR}/{name}", decoder) for name, decoder in released.items()})
    for benchmark, names in benchmarks.items():
        own = [] if only else [s for s in names if s not in baselines]
        joining = [s for s, decoder in released.items() if decoder != "ctc" or benchmark in CTC_BENCHMARKS]
        names[:] = own + joining + [s for s in names if s in baselines]
    return systems, benchmarks
