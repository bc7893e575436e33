"""The Snakemake workflow: config validation, lint, the paper-scale dry run and, end to end, a reduced
demo."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from reduced_demo import SNAKEMAKE, snakemake_environment

REPO = Path(__file__).resolve().parents[1]
STAGE_RULES = {
    "fleurs_data",
    "speechglue_data",
    "speechxnli_data",
    "fetch_model",
    "prepare_split",
    "language_ids",
    "generate_targets",
    "assemble_targets",
    "init_model",
    "train_ctc",
    "train_ce",
    "evaluate",
    "table",
}


def snakemake(*args: str, cwd: Path = REPO, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SNAKEMAKE, "-s", str(REPO / "Snakefile"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=snakemake_environment(),
        timeout=timeout,
    )


KANG_ROY_WITHOUT_POOLING = yaml.safe_load((REPO / "config/demo_summarization.yaml").read_text())
del KANG_ROY_WITHOUT_POOLING["models"]["pooling"]


def override(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"train": {"ctc": {"learning_rate": 0.1}}}, "train.ctc"),
        ({"train": {"ce": {"lr": "fast"}}}, "train.ce.lr"),
        ({"train": {"ce": {"batch_budget": "per_gpu"}}}, "train.ce.batch_budget"),
        ({"data": {"on_bad_audio": "ignore"}}, "data.on_bad_audio"),
        ({"evaluate": {"num_beams": 0}}, "evaluate.num_beams"),
        (
            {"models": {"demo_build": {"llm_pretrain": {"freeze_embeddings": "yes"}}}},
            "models.demo_build.llm_pretrain.freeze_embeddings",
        ),
        (
            {"models": {"demo_build": {"speech_encoder": {"ctc_finetune": {"updates": -1}}}}},
            "models.demo_build.speech_encoder.ctc_finetune.updates",
        ),
        ({"models": {"speech_encoder": {"frame_count": "ceil"}}}, "models.speech_encoder.frame_count"),
        ({"models": {"ctc_head": {"blank_id": -1}}}, "models.ctc_head.blank_id"),
        ({"train": {"ctc": {"lid_ctc_lengths": "quartered"}}}, "train.ctc.lid_ctc_lengths"),
        ({"surprise": 1}, "<top level>"),
        ({"data": {"min_duration": 0.05}}, "data.min_duration"),  # below the demo model's shortest input
        ({"data": {"min_duration": "short"}}, "data.min_duration"),
        ({"data": {"max_duration": 0.1}}, "data.max_duration"),  # below auto's 0.115 s: nothing would be kept
        ({"data": {"min_duration": 2.0, "max_duration": 2.0}}, "data.max_duration"),
        # kang_roy's shortest clip comes from models.pooling: the workflow has no numbers to fall back on
        (KANG_ROY_WITHOUT_POOLING, "models.pooling"),
    ],
)
def test_config_errors_name_the_key(tmp_path, data, key):
    res = snakemake(
        "-n",
        "-d",
        str(tmp_path),
        "--configfile",
        str(REPO / "config/config.yaml"),
        str(override(tmp_path, data)),
    )
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if "config error at key" in line]
    assert len(lines) == 1 and f"'{key}'" in lines[0], res.stderr[-2000:]


@pytest.mark.parametrize(
    ("configfile", "data", "key"),
    [
        ("config/config.yaml", {"targets": {"templates": "my_templates.json"}}, "targets.templates"),
        (
            "config/config.yaml",
            {"evaluate": {"covost2": {"release_dir": "covost2"}}},
            "evaluate.covost2.release_dir",
        ),
        ("config/experiments/bloomzmms.yaml", {}, "data.common_voice.release_dir"),
    ],
)
def test_missing_config_paths_stop_the_run_before_any_job(tmp_path, configfile, data, key):
    """A path the config names (and no rule makes) is checked before the first job, in one line naming the
    key; a dry run still lists the jobs."""
    configs = ("--configfile", str(REPO / configfile), str(override(tmp_path, data)))
    assert snakemake("-n", "-d", str(tmp_path), *configs).returncode == 0
    res = snakemake("-c1", "-d", str(tmp_path), *configs)
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if "config error at key" in line]
    assert len(lines) == 1 and f"'{key}': no such" in lines[0], res.stderr[-2000:]
    assert not (tmp_path / "results").exists() and not (tmp_path / "resources").exists()


@pytest.mark.parametrize(
    ("configfile", "seconds"), [("config/config.yaml", 0.115), ("config/experiments/bloomzmms.yaml", 0.225)]
)
def test_min_duration_auto_is_the_models_shortest_input(tmp_path, configfile, seconds):
    """`data.min_duration: auto` becomes the shortest clip the encoder + adaptor turn into a speech vector
    (demo encoder 10 ms frames: 1840 samples; MMS-1B 20 ms frames: 3600), which data preparation then drops
    below."""
    res = snakemake(
        "results/data/dev.jsonl", "-n", "-p", "-d", str(tmp_path), "--configfile", str(REPO / configfile)
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f'"min_duration": {seconds}' in res.stdout + res.stderr


def test_lint_is_clean(tmp_path):
    res = snakemake("--lint", "-d", str(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_paper_scale_dry_run_lists_every_stage(tmp_path):
    res = snakemake(
        "-n", "-d", str(tmp_path), "--configfile", str(REPO / "config/experiments/bloomzmms.yaml")
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    jobs = {
        line.split()[0]
        for line in out.split("Job stats:")[1].splitlines()[3:]
        if line.strip() and not line.startswith("total")
    }
    assert jobs >= STAGE_RULES, STAGE_RULES - jobs
    assert "generate_targets" in out and "61" in out.split("generate_targets")[1].splitlines()[0]


def test_test_split_duration_filter_follows_the_config(tmp_path):
    """rule prepare_split filters train and dev always and test only under data.filter_test_durations."""
    for flag in (True, False):
        res = snakemake(
            "-n",
            "-p",
            "-d",
            str(tmp_path),
            "--configfile",
            str(REPO / "config/config.yaml"),
            str(override(tmp_path, {"data": {"filter_test_durations": flag}})),
            "--",
            "results/data/test.jsonl",
            "results/data/dev.jsonl",
        )
        assert res.returncode == 0, res.stderr[-3000:]
        filtered = {}
        for line in res.stdout.splitlines():
            if line.startswith("Shell command: speechllm data prepare"):
                args = shlex.split(line.removeprefix("Shell command: "))
                out = args[args.index("--out") + 1]
                filtered[out] = json.loads(args[args.index("--settings") + 1])["filter_durations"]
        assert filtered == {"results/data/test.jsonl": flag, "results/data/dev.jsonl": True}


@pytest.mark.slow
def test_reduced_demo_end_to_end(reduced_demo):
    """The whole DAG on a reduced demo: tables with real numbers; a rerun does nothing; one table alone."""
    workdir = reduced_demo.workdir
    for name in ("fleurs_asr", "fleurs_st", "speechglue", "speechxnli"):
        for ext in ("md", "csv", "tex"):
            assert (workdir / f"results/tables/{name}.{ext}").stat().st_size > 0
    asr = pd.read_csv(workdir / "results/tables/fleurs_asr.csv")
    assert {"ctc_init", "ctc", "ce_init", "t", "mi", "tmi"} <= set(asr.columns)
    assert asr[["ctc_init", "ctc", "t"]].notna().all().all()
    md = (workdir / "results/tables/fleurs_asr.md").read_text()
    assert "transformers==" in md and "results/models/ctc" in md
    # Exported models: speechllm.json + safetensors, and training curves were written.
    for model in ("ctc", "t", "mi", "tmi"):
        assert (workdir / f"results/models/{model}/speechllm.json").is_file()
        assert (workdir / f"results/models/{model}/model.safetensors").is_file()
        assert len(pd.read_csv(workdir / f"results/train/{model}/metrics.csv")) > 0
    # Per-utterance outputs make every score recomputable.
    hyps = pd.read_parquet(workdir / "results/eval/fleurs_asr/ctc.parquet")
    assert {"id", "language", "reference", "hypothesis", "reference_normalized"} <= set(hyps.columns)
    # Every job was measured (its benchmark file); the resource view sets each rule against its request.
    usage = pd.read_csv(workdir / "results/resources/usage.csv").set_index("rule")
    assert {"demo_data", "train_ctc", "train_ce", "evaluate", "table"} <= set(usage.index)
    assert usage.loc["train_ctc", "max_rss_mb"] > 100 and usage.loc["train_ctc", "mem_mb"] == 8000
    assert usage.loc["evaluate", "jobs"] == len(list(workdir.glob("results/eval/*/*.parquet")))
    # Every job recorded its settings and command beside its log, and one step reruns by hand from its record.
    logs = workdir / "logs"
    assert {p.with_suffix("") for p in logs.rglob("*.log")} == {
        p.with_name(p.name.removesuffix(".run.json")) for p in logs.rglob("*.run.json")
    }
    table = workdir / "results/tables/fleurs_asr.csv"
    before = table.read_bytes()
    table.unlink()
    by_hand = subprocess.run(
        [sys.executable, "-m", "speechllm.cli", "rerun", str(logs / "report/table_fleurs_asr.run.json")],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=600,
    )
    assert by_hand.returncode == 0 and table.read_bytes() == before, by_hand.stderr[-3000:]
    rerun = snakemake(
        "-n",
        "-d",
        str(workdir),
        "--configfile",
        str(REPO / "config/config.yaml"),
        str(reduced_demo.override),
    )
    assert rerun.returncode == 0 and "Nothing to be done" in rerun.stdout + rerun.stderr
    shutil.rmtree(workdir / "results/tables")
    one = snakemake(
        "results/tables/speechglue.md",
        "-n",
        "-d",
        str(workdir),
        "--configfile",
        str(REPO / "config/config.yaml"),
        str(reduced_demo.override),
    )
    out = one.stdout + one.stderr
    assert (
        one.returncode == 0
        and "table" in out
        and "train_ce" not in out
        and "evaluate" not in out.split("Job stats")[1]
    )


REDUCED_SUMMARIZATION = {
    "data": {"demo": {"composed": {"train": 12, "dev": 2, "test": 2, "seed": 0}}},
    "models": {
        "demo_build": {
            "llm_pretrain": {
                "steps": 100,
                "batch_size": 16,
                "warmup_steps": 10,
                "templates_per_sentence": 1,
                "task_repeats": 1,
            },
            "speech_encoder": {"ctc_finetune": {"updates": 10, "warmup_steps": 2}},
        }
    },
    "train": {"kd": {"max_steps": 12, "eval_every": 6, "warmup_steps": 2, "checkpoint_every": 6}},
    "evaluate": {"summarization": {"max_new_tokens": 8}},
}


@pytest.mark.slow
def test_reduced_summarization_demo_end_to_end(tmp_path):
    """Kang & Roy's DAG offline (config/demo_summarization.yaml, reduced): responses from the demo LLM, the
    untrained and the KD-trained model, summarization and response perplexity in one table."""
    configs = (
        "--configfile",
        str(REPO / "config/config.yaml"),
        str(REPO / "config/demo_summarization.yaml"),
        str(override(tmp_path, REDUCED_SUMMARIZATION)),
    )
    res = snakemake("-c2", "-d", str(tmp_path), *configs)
    assert res.returncode == 0, res.stderr[-5000:]
    table = pd.read_csv(tmp_path / "results/tables/summarization.csv")
    systems = ["kang_roy_init", "kang_roy", "kang_roy_cascade", "kang_roy_text"]
    assert set(systems) <= set(table.columns)
    ppl = table[table["metric"] == "perplexity"]
    assert (ppl[systems] >= 1).all().all()  # exp of a mean NLL: real numbers for every system
    assert "ROUGE-1" in set(table["metric"])
    responses = [json.loads(line) for line in (tmp_path / "results/responses/demo_train.jsonl").open()]
    assert responses and all(isinstance(r["llm_response"], str) for r in responses)
    # The responses were generated from the very token ids the KD teacher's chat turn is built from.
    from transformers import AutoTokenizer

    from speechllm.models.kang_roy import ChatTemplate, chat_ids, text_ids

    demo = yaml.safe_load((REPO / "config/demo_summarization.yaml").read_text())
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "resources/models/demo-llm")
    chat = demo["models"]["chat"]
    prefix, suffix = chat_ids(tokenizer, ChatTemplate(chat["prefix"], chat["suffix"]))
    text = responses[0]["raw_transcription"].lower()
    template = demo["targets"]["responses"]["prompt_template"]
    assert tokenizer(template.format(text=text)).input_ids == prefix + text_ids(tokenizer, text) + suffix
    summary = json.loads((tmp_path / "results/train/kang_roy/summary.json").read_text())
    assert summary["objective"] == "kd" and summary["stopped"] == "max_steps"
    assert summary["final_step"] == REDUCED_SUMMARIZATION["train"]["kd"]["max_steps"] and summary["history"]
    for model in ("kang_roy_init", "kang_roy"):
        spec = json.loads((tmp_path / f"results/models/{model}/speechllm.json").read_text())
        assert (
            spec["kind"] == "kang_roy" and (tmp_path / f"results/models/{model}/model.safetensors").is_file()
        )
    rerun = snakemake("-n", "-d", str(tmp_path), *configs)
    assert rerun.returncode == 0 and "Nothing to be done" in rerun.stdout + rerun.stderr


def dry_run_jobs(out: str) -> dict[str, int]:
    """rule -> job count from a dry run's "Job stats" table."""
    rows = out.split("Job stats:")[1].split("\n\n")[0].splitlines()[3:]
    return {
        line.split()[0]: int(line.split()[1])
        for line in rows
        if line.strip() and not line.startswith("total")
    }


def test_released_models_dry_run_plans_download_import_evaluate_tables(tmp_path):
    """The published BLOOMZMMS repositories: fetched (on the submit host when compute nodes are offline),
    imported, evaluated on every benchmark and tabulated, with nothing trained."""
    res = snakemake(
        "-n",
        "-p",
        "-d",
        str(tmp_path),
        "--configfile",
        str(REPO / "config/experiments/bloomzmms_released.yaml"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    jobs = dry_run_jobs(out)
    assert jobs["fetch_released"] == 4 and jobs["import_released"] == 4 and jobs["table"] == 4
    assert not {"train_ctc", "train_ce", "init_model", "generate_targets", "learning_curves"} & set(jobs)
    for variant, repo in (("ctc", "akreal/bloomzmms-ctc"), ("tmi", "akreal/bloomzmms-ce-tmi")):
        assert f"speechllm models fetch --name {repo} --revision main" in out
        assert f"--out-dir results/models/released_{variant} --speech-encoder facebook/mms-1b-all" in out
    evaluated = evaluated_systems(out)
    assert {
        "released_ctc@fleurs_asr",
        "released_t@fleurs_st",
        "released_mi@speechglue",
        "released_tmi@speechxnli",
        "cascade@fleurs_st",
        "text@speechxnli",
    } <= evaluated
    assert "released_ctc@fleurs_st" not in evaluated and not any(s.startswith("ce_init@") for s in evaluated)
    assert "--models released_ctc released_t released_mi released_tmi cascade text" in out


def test_released_models_beside_own_runs(tmp_path):
    """A `released` section in a training experiment adds the released columns next to the trained systems."""
    extra = override(
        tmp_path,
        {
            "released": {
                "bloomzmms": {
                    "t": {"repo": "akreal/bloomzmms-ce-t", "decoder": "llm"},
                    "ctc": {"repo": "akreal/bloomzmms-ctc", "decoder": "ctc"},
                }
            }
        },
    )
    res = snakemake(
        "-n",
        "-p",
        "-d",
        str(tmp_path),
        "--configfile",
        str(REPO / "config/experiments/bloomzmms.yaml"),
        str(extra),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "--models ctc_init ctc ce_init t mi tmi released_ctc released_t cascade text" in out
    assert "--models ce_init t mi tmi released_t cascade text" in out
    assert {"train_ce", "import_released"} <= set(dry_run_jobs(out))


def test_released_kang_roy_dry_run_imports_and_evaluates(tmp_path):
    """Kang & Roy's published encoder (a local file): imported and scored, nothing trained."""
    checkpoint = tmp_path / "resources" / "released" / "speech_llm_audio_encoder.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    res = snakemake(
        "-n",
        "-p",
        "-d",
        str(tmp_path),
        "--configfile",
        str(REPO / "config/experiments/speech_summarization_released.yaml"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    jobs = dry_run_jobs(out)
    assert jobs["import_released_kang_roy"] == 1 and "train_kd" not in jobs and "init_kang_roy" not in jobs
    assert "speechllm import kang-roy --checkpoint resources/released/speech_llm_audio_encoder.pt" in out
    assert "--models released_kang_roy kang_roy_cascade kang_roy_text" in out


def evaluated_systems(out: str) -> set[str]:
    """system@benchmark of every evaluation job in a dry run's shell commands."""
    return {
        line.split("--name ")[1].split()[0] + "@" + line.split("speechllm evaluate ")[1].split()[0]
        for line in out.splitlines()
        if "speechllm evaluate " in line and "--name " in line
    }


def test_dropping_a_system_by_config_drops_its_jobs_and_columns(tmp_path):
    """evaluate.design without tmi: tmi is neither trained nor evaluated nor tabulated, the rest is
    unchanged."""
    benchmarks = {
        "fleurs_asr": ["ctc_init", "ctc", "ce_init", "t", "mi", "cascade", "text"],
        **{b: ["ce_init", "t", "mi", "cascade", "text"] for b in ("fleurs_st", "speechglue", "speechxnli")},
    }
    extra = override(tmp_path, {"evaluate": {"design": {"bloomzmms": {"benchmarks": benchmarks}}}})
    res = snakemake(
        "-n", "-p", "-d", str(tmp_path), "--configfile", str(REPO / "config/config.yaml"), str(extra)
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    jobs, evaluated = dry_run_jobs(out), evaluated_systems(out)
    assert jobs["train_ce"] == 2 and jobs["evaluate"] == 7 + 3 * 5 and jobs["table"] == 4
    assert not any(s.startswith("tmi@") for s in evaluated) and "mi@speechxnli" in evaluated
    assert "--models ctc_init ctc ce_init t mi cascade text" in out
    assert "--models ce_init t mi cascade text" in out and "results/plots/train/tmi.png" not in out


def test_a_second_decoder_of_a_model_is_a_new_column(tmp_path):
    """A system added by config (the untrained model decoded by the LLM) is evaluated and tabulated."""
    extra = override(
        tmp_path,
        {
            "evaluate": {
                "design": {
                    "bloomzmms": {
                        "systems": {"ctc_init_llm": {"model": "ctc_init", "decoder": "llm"}},
                        "benchmarks": {
                            "fleurs_st": ["ctc_init_llm", "ce_init", "t", "mi", "tmi", "cascade", "text"]
                        },
                    }
                }
            }
        },
    )
    res = snakemake(
        "-n", "-p", "-d", str(tmp_path), "--configfile", str(REPO / "config/config.yaml"), str(extra)
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert dry_run_jobs(out)["evaluate"] == 8 + 3 * 6 + 1
    assert evaluated_systems(out) & {"ctc_init_llm@fleurs_st", "ctc_init_llm@fleurs_asr"} == {
        "ctc_init_llm@fleurs_st"
    }
    line = next(ln for ln in out.splitlines() if "--name ctc_init_llm" in ln)
    assert "--model results/models/ctc_init " in line and "--decoder llm " in line
    assert "--models ctc_init_llm ce_init t mi tmi cascade text" in out
