"""speechllm.workflow without Snakemake: job resources, the launch command and the systems × benchmarks
design."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from speechllm import workflow as wf

REPO = Path(__file__).resolve().parents[1]
RESOURCES = {
    "cpu_threads": 2,
    "gpu": 0,
    "cpus_per_gpu": 4,
    "mem_mb": 8000,
    "runtime": 60,
    "retry_scale": 1.5,
    "retry_scale_attempts": 2,
    "stop_signal_seconds": 600,
    "main_process_port": 29500,
    "slurm_partition": None,
    "slurm_account": None,
    "offline_compute_nodes": False,
    "download_timeout_seconds": 60,
    "rules": {},
}


def resources(**rules: dict) -> dict:
    return {**RESOURCES, "rules": rules}


@pytest.fixture(scope="module")
def default_config() -> dict:
    return yaml.safe_load((REPO / "config/config.yaml").read_text())


def test_rule_overrides_merge_over_the_defaults():
    merged = wf.rule_resources(resources(evaluate={"mem_mb": 2000}), "evaluate")
    assert merged["mem_mb"] == 2000 and merged["runtime"] == 60 and "rules" not in merged
    assert wf.rule_resources(resources(evaluate={"mem_mb": 2000}), "train_ce")["mem_mb"] == 8000


def test_memory_grows_per_retry_up_to_the_configured_retries():
    mem = wf.job_resources(resources(), "init_model")["mem_mb"]
    assert [mem(None, attempt) for attempt in (1, 2, 3, 4, 9)] == [8000, 12000, 18000, 18000, 18000]


def test_resumable_steps_keep_their_runtime_and_others_scale_it():
    for rule in wf.RESUMABLE_RULES:
        assert wf.job_resources(resources(), rule)["runtime"] == 60
    runtime = wf.job_resources(resources(), "init_model")["runtime"]
    assert [runtime(None, attempt) for attempt in (1, 2, 3)] == [60, 90, 135]


def test_stop_signal_only_for_resumable_steps_and_shorter_than_the_runtime():
    assert wf.job_resources(resources(), "train_ctc")["slurm_extra"] == "--signal=TERM@600"
    assert "slurm_extra" not in wf.job_resources(resources(), "init_model")
    assert "slurm_extra" not in wf.job_resources({**RESOURCES, "stop_signal_seconds": None}, "train_ctc")
    with pytest.raises(wf.ConfigError) as error:
        wf.job_resources(resources(train_ce={"runtime": 5}), "train_ce")
    assert error.value.key == "resources.rules.train_ce.stop_signal_seconds"


@pytest.mark.parametrize(
    ("rule", "override", "key"),
    [
        ("evaluate", {"gpu": 2}, "resources.rules.evaluate.gpu"),
        ("init_model", {"nodes": 2, "gpu": 1}, "resources.rules.init_model.nodes"),
        ("train_ce", {"nodes": 2, "gpu": 0}, "resources.rules.train_ce.nodes"),
    ],
)
def test_impossible_layouts_name_the_key(rule, override, key):
    with pytest.raises(wf.ConfigError) as error:
        wf.job_resources(resources(**{rule: override}), rule)
    assert error.value.key == key


def test_gpu_jobs_ask_for_cpus_per_gpu_and_slurm_options_only_when_set():
    single = wf.job_resources(resources(train_ctc={"gpu": 2, "slurm_partition": "gpu"}), "train_ctc")
    assert single["gpu"] == 2 and single["cpus_per_gpu"] == 4 and single["slurm_partition"] == "gpu"
    assert "slurm_account" not in single and "nodes" not in single
    cpu = wf.job_resources(resources(), "evaluate")
    assert cpu["gpu"] == 0 and "cpus_per_gpu" not in cpu


def test_multi_node_jobs_ask_for_gpus_per_node_as_gres():
    res = wf.job_resources(resources(train_ce={"gpu": 4, "nodes": 2}), "train_ce")
    assert "gpu" not in res
    assert {k: res[k] for k in ("gres", "cpus_per_gpu", "nodes", "mpi", "tasks", "tasks_per_gpu")} == {
        "gres": "gpu:4",
        "cpus_per_gpu": 4,
        "nodes": 2,
        "mpi": "srun",
        "tasks": 2,
        "tasks_per_gpu": 0,
    }
    assert wf.gpus_per_node(res) == 4


@pytest.mark.parametrize(
    ("res", "gpus"), [({"gpu": 3}, 3), ({"gpu": 0, "gres": "gpu:2"}, 2), ({"gres": "shard:1"}, 0), ({}, 0)]
)
def test_gpus_per_node(res, gpus):
    assert wf.gpus_per_node(res) == gpus


def test_cpu_steps_replace_the_shell():
    assert wf.launch_command({"gpu": 0}, 29500) == "exec"


def test_one_node_launches_one_process_per_gpu_behind_the_signal_wrapper():
    one = wf.launch_command({"gpu": 1}, 29500)
    two = wf.launch_command({"gpu": 2}, 29500)
    assert one.startswith(wf.SIGNAL_TRANSPARENT) and two.startswith(wf.SIGNAL_TRANSPARENT)
    assert "--num_processes 1 --num_machines 1 --mixed_precision" in one and "--multi_gpu" not in one
    assert "--num_processes 2 --num_machines 1 --multi_gpu" in two and "srun" not in two


def test_several_nodes_run_one_accelerate_per_node_under_srun():
    command = wf.launch_command({"gres": "gpu:4", "nodes": 2, "mpi": "srun", "cpus_per_gpu": 3}, 29600)
    words = shlex.split(command)
    assert words[:2] == ["exec", "srun"] and words[-1] == "accelerate-node"
    assert {"--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--cpus-per-task=12", "--mem=0"} <= set(words)
    per_node = words[words.index("-c") + 1]
    assert per_node.startswith(wf.SIGNAL_TRANSPARENT) and per_node.endswith('"$@"')
    assert "--num_processes 8 --num_machines 2" in per_node and '--machine_rank "$SLURM_NODEID"' in per_node
    # The rendezvous port, offset by the job id: evaluated by each node's shell.
    expression = re.search(r"--main_process_port (\$\(\(.*?\)\))", per_node).group(1)
    port = subprocess.run(
        ["bash", "-c", f"echo {expression}"],
        env={"SLURM_JOB_ID": "123456"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert port.stdout.strip() == str(29600 + 456)


def test_default_design_is_the_papers(default_config):
    systems, benchmarks = wf.evaluation_design(default_config)
    assert systems["ce_init"] == ("results/models/ctc", "llm") and systems["text"] == (
        "results/models/ctc_init",
        "text",
    )
    assert benchmarks["fleurs_asr"] == ["ctc_init", "ctc", "ce_init", "t", "mi", "tmi", "cascade", "text"]
    assert benchmarks["speechxnli"] == ["ce_init", "t", "mi", "tmi", "cascade", "text"]
    assert "covost2_st" not in benchmarks  # no local CoVoST 2 release configured


def test_covost2_is_evaluated_with_a_release(default_config):
    config = copy.deepcopy(default_config)
    config["evaluate"]["covost2"]["release_dir"] = "/data/covost2"
    assert wf.evaluation_design(config)[1]["covost2_st"] == ["ce_init", "t", "mi", "tmi", "cascade", "text"]


def test_a_benchmark_naming_an_undefined_system_names_the_key(default_config):
    config = copy.deepcopy(default_config)
    config["evaluate"]["design"]["bloomzmms"]["benchmarks"]["fleurs_st"].append("tmi_beam")
    with pytest.raises(wf.ConfigError) as error:
        wf.evaluation_design(config)
    assert (
        error.value.key == "evaluate.design.bloomzmms.benchmarks.fleurs_st"
        and "tmi_beam" in error.value.message
    )


def test_released_checkpoints_join_before_the_baselines(default_config):
    config = copy.deepcopy(default_config)
    config["released"]["bloomzmms"] = {
        "ctc": {"repo": "a/ctc", "decoder": "ctc"},
        "t": {"repo": "a/t", "decoder": "llm"},
    }
    systems, benchmarks = wf.evaluation_design(config)
    assert benchmarks["fleurs_asr"][-4:] == ["released_ctc", "released_t", "cascade", "text"]
    assert benchmarks["fleurs_st"] == ["ce_init", "t", "mi", "tmi", "released_t", "cascade", "text"]
    assert systems["released_ctc"] == ("results/models/released_ctc", "ctc") and systems["cascade"][
        0
    ].endswith("/ctc")
    config["released"]["only"] = True
    systems, benchmarks = wf.evaluation_design(config)
    assert list(systems) == ["cascade", "text", "released_ctc", "released_t"]
    assert systems["text"] == ("results/models/released_ctc", "text")
    assert benchmarks["fleurs_st"] == ["released_t", "cascade", "text"]
    del config["released"]["bloomzmms"]["ctc"]
    with pytest.raises(wf.ConfigError, match="released_ctc"):
        wf.evaluation_design(config)


def test_kang_roy_design_and_its_released_encoder(default_config):
    config = copy.deepcopy(default_config)
    config["system"] = "kang_roy"
    systems, benchmarks = wf.evaluation_design(config)
    assert set(benchmarks) == {"summarization", "response_ppl"}
    assert systems["kang_roy_cascade"] == ("results/models/kang_roy", "cascade")
    config["released"]["kang_roy"]["checkpoint"] = "encoder.pt"
    config["released"]["only"] = True
    systems, benchmarks = wf.evaluation_design(config)
    assert benchmarks["summarization"] == ["released_kang_roy", "kang_roy_cascade", "kang_roy_text"]
    assert systems["kang_roy_text"] == ("results/models/released_kang_roy", "text")
