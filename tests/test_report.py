"""Report figures, W&B results runs and `wandb sync`, the CLI error line, and the report/table rules of the
workflow (dry runs and `snakemake --report` on a small prepared results tree)."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest

from speechllm.cli import main
from speechllm.report.plots import (
    PlotError,
    bar_values,
    curve_panels,
    plot_benchmark,
    plot_learning_curves,
    read_curves,
)
from speechllm.report.settings import ModelRun, WandbResultsSettings
from speechllm.report.wandb_runs import (
    SyncError,
    linked_run,
    log_system_results,
    offline_run_dirs,
    sync_offline_runs,
)
from speechllm.train.tracking import run_id

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def score_file(root: Path, benchmark: str, model: str, metrics: dict) -> Path:
    path = root / "results" / "eval" / benchmark / f"{model}.scores.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "benchmark": benchmark,
                "model": model,
                "decoder": "llm",
                "experiment": "demo",
                "checkpoint": f"results/models/{model}",
                "metrics": metrics,
                "versions": {"speechllm": "0.1.0"},
            }
        )
    )
    return path


def asr_metrics(offset: float) -> dict:
    return {
        "all": {"cer": 0.2 + offset, "wer": 0.4 + offset},
        "per_language": {
            "en_us": {"cer": 0.1 + offset, "wer": 0.3},
            "de_de": {"cer": 0.3 + offset, "wer": 0.5},
        },
    }


GLUE = {"per_task": {"sst2": {"accuracy": 0.6}, "cola": {"matthews_correlation": 0.1}}, "average": 0.35}


def metrics_csv(path: Path, stage: str) -> Path:
    """A training metrics.csv as the loop writes it: dev rows every 5 steps, empty cells elsewhere."""
    rows = []
    for step in range(0, 21):
        row = {"step": step}
        if step:
            row.update(loss=10 / step, lr=1e-3 * min(1, step / 5), grad_norm=2.0, epoch=0)
            row.update({"loss_ctc": 8 / step, "loss_lid": 2 / step} if stage == "ctc" else {"acc": step / 25})
        if step % 5 == 0:
            row.update(
                {"dev_cer": 1 - step / 40, "dev_wer": 1.0}
                if stage == "ctc"
                else {"dev_acc": step / 30, "dev_loss": 5 - step / 10}
            )
        rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def png_shape(path: Path) -> tuple[int, ...]:
    return matplotlib.image.imread(str(path)).shape


# --------------------------------------------------------------------------- figures


def test_learning_curves_from_ctc_and_ce_metrics(tmp_path) -> None:
    ctc = read_curves(metrics_csv(tmp_path / "ctc.csv", "ctc"))
    ce = read_curves(metrics_csv(tmp_path / "ce.csv", "ce"))
    assert curve_panels(list(ctc.columns)) == [
        ("loss", ["loss", "loss_ctc", "loss_lid"]),
        ("learning rate", ["lr"]),
        ("dev metrics", ["dev_cer", "dev_wer"]),
        ("gradient norm", ["grad_norm"]),
    ]
    assert curve_panels(list(ce.columns))[0] == ("loss", ["loss", "dev_loss"])
    assert curve_panels(list(ce.columns))[2] == ("dev metrics", ["dev_acc", "acc"])
    out = plot_learning_curves(ctc, "ctc", tmp_path / "plots" / "ctc.png")
    height, width, _ = png_shape(out)
    assert width > 3 * height  # four panels side by side
    assert sorted(p.name for p in out.parent.iterdir()) == ["ctc.png"]  # written atomically, no temp left


def test_learning_curve_errors_name_the_file(tmp_path) -> None:
    bad = tmp_path / "metrics.csv"
    bad.write_text("loss,lr\n1,2\n")
    with pytest.raises(PlotError, match=re.escape(str(bad))):
        read_curves(bad)
    only_lr = tmp_path / "lr.csv"
    only_lr.write_text("step,lr\n1,0.1\n")
    with pytest.raises(PlotError, match="no loss or dev metric"):
        plot_learning_curves(read_curves(only_lr), "x", tmp_path / "x.png", source=only_lr)
    assert not (tmp_path / "x.png").exists()


def test_bar_values_per_benchmark(tmp_path) -> None:
    asr = [score_file(tmp_path, "fleurs_asr", m, asr_metrics(o)) for m, o in (("tmi", 0.0), ("ctc", 0.1))]
    cer = bar_values("fleurs_asr", asr, ["ctc", "tmi"])
    assert list(cer.columns) == ["ctc", "tmi"] and list(cer.index) == ["de_de", "en_us", "all"]
    assert cer.loc["de_de", "ctc"] == pytest.approx(40.0) and cer.loc["all", "tmi"] == pytest.approx(20.0)
    # models covering different languages: one A-Z order, not the order the files list them in
    fr = asr_metrics(0.0)
    fr["per_language"] = {"fr_fr": fr["per_language"]["en_us"]}
    mixed = [score_file(tmp_path, "fleurs_asr", "mi", fr), asr[0]]
    assert list(bar_values("fleurs_asr", mixed, ["mi", "tmi"]).index) == ["de_de", "en_us", "fr_fr", "all"]
    st_entry = {"bleu": 12.0, "chrf": 40.0}
    st = [score_file(tmp_path, "fleurs_st", "t", {"all": st_entry, "per_language": {"de_de": st_entry}})]
    assert bar_values("fleurs_st", st).to_dict() == {"t": {"de_de": 12.0, "all": 12.0}}
    glue = bar_values("speechglue", [score_file(tmp_path, "speechglue", "t", GLUE)])
    assert list(glue.index) == ["cola", "sst2", "average", "average_without_wnli"] and glue.loc[
        "average", "t"
    ] == pytest.approx(35.0)
    out = plot_benchmark("fleurs_asr", asr, tmp_path / "asr.png", ["ctc", "tmi"])
    assert png_shape(out)[1] > 400


def test_summarization_bars_leave_perplexity_to_the_table(tmp_path) -> None:
    files = [
        score_file(
            tmp_path,
            "summarization",
            "text",
            {"all": {"rouge1": 0.4, "rouge2": 0.2, "rougeL": 0.3, "meteor": None}},
        ),
        score_file(
            tmp_path,
            "response_ppl",
            "text",
            {"per_subset": {"test.clean": {"ppl": 3.0}}, "all": {"ppl": 3.0}},
        ),
    ]
    bars = bar_values("summarization", files)
    assert list(bars.index) == ["ROUGE-1", "ROUGE-2", "ROUGE-L", "METEOR"]
    assert bars.loc["ROUGE-2", "text"] == pytest.approx(20.0) and pd.isna(bars.loc["METEOR", "text"])
    assert png_shape(plot_benchmark("summarization", files, tmp_path / "s.png"))[0] > 100


def test_report_plots_cli(tmp_path) -> None:
    curves = metrics_csv(tmp_path / "results/train/t/metrics.csv", "ce")
    main(["report", "plots", "curves", "--metrics", str(curves), "--out", str(tmp_path / "curves.png")])
    glue = [score_file(tmp_path, "speechglue", m, GLUE) for m in ("t", "mi")]
    main(
        [
            "report",
            "plots",
            "bars",
            "--name",
            "speechglue",
            "--scores",
            *map(str, glue),
            "--models",
            "mi",
            "t",
            "--out",
            str(tmp_path / "glue.png"),
        ]
    )
    assert png_shape(tmp_path / "curves.png")[0] > 100 and png_shape(tmp_path / "glue.png")[0] > 100


def test_cli_error_is_one_line_naming_the_file(tmp_path) -> None:
    missing = tmp_path / "results/eval/speechglue/t.scores.json"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "speechllm.cli",
            "report",
            "table",
            "--name",
            "speechglue",
            "--scores",
            str(missing),
            "--models",
            "t",
            "--out-stem",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
    )
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1, res.stderr
    assert lines[0].startswith("speechllm report table: error:") and str(missing) in lines[0]


def test_cli_crash_ends_with_a_line_naming_the_step(tmp_path, monkeypatch, caplog) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr("speechllm.report.plots.plot_benchmark", boom)
    glue = score_file(tmp_path, "speechglue", "t", GLUE)
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "report",
                "plots",
                "bars",
                "--name",
                "speechglue",
                "--scores",
                str(glue),
                "--out",
                str(tmp_path / "g.png"),
            ]
        )
    assert str(exc.value.code) == (
        "speechllm report plots bars: failed: RuntimeError: CUDA out of memory (traceback above)"
    )
    assert "Traceback" in caplog.text or any(r.exc_info for r in caplog.records)


# --------------------------------------------------------------------------- W&B


def typed(settings: dict) -> WandbResultsSettings:
    return WandbResultsSettings.from_settings(settings)


def test_results_run_holds_the_system_tables_and_links_the_training_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    files = [
        score_file(tmp_path, "fleurs_asr", "t", asr_metrics(0.0)),
        score_file(tmp_path, "speechglue", "t", GLUE),
    ]
    settings = {
        "experiment": "demo",
        "wandb": {"project": "speechllm", "mode": "offline"},
        "model_run": {"job_type": "train_ce", "name": "demo-ce-t"},
        "model_dir": "results/models/t",
        "decoder": "llm",
    }
    record = log_system_results(typed(settings), "t", files, tmp_path / "results/wandb/t")
    assert record["run"]["name"] == "demo-t" and record["run"]["group"] == "demo"
    assert record["run"]["id"] == run_id("demo", "results", "demo-t")
    assert record["model_run"] == {
        "name": "demo-ce-t",
        "job_type": "train_ce",
        "id": run_id("demo", "train_ce", "demo-ce-t"),
    }
    assert record["summary"]["fleurs_asr/de_de/wer"] == pytest.approx(
        50.0
    )  # the table's numbers (primary metric)
    assert record["summary"]["speechglue/average/primary"] == pytest.approx(35.0)
    assert record["tables"]["fleurs_asr"]["columns"] == ["language", "metric", "value"]
    runs = offline_run_dirs([tmp_path])
    assert len(runs) == 1 and runs[0].name.endswith(record["run"]["id"])
    logged = [
        json.loads(line) for line in (tmp_path / "results/wandb/t/metrics.jsonl").read_text().splitlines()
    ]
    assert logged[0]["speechglue/cola/matthews_correlation"] == pytest.approx(10.0)
    config = json.loads((tmp_path / "results/wandb/t/config.json").read_text())
    assert config["model_run"]["name"] == "demo-ce-t"
    with pytest.raises(ValueError, match="scores of system 't', expected 'mi'"):
        log_system_results(typed(settings), "mi", files, tmp_path / "other")


def test_a_rerun_logs_at_the_resumed_runs_next_step(tmp_path, monkeypatch) -> None:
    """Online, a rerun resumes the results run (stable id); W&B ignores a log call below the run's step."""
    import wandb

    class ResumedRun:
        id, step = "resumed", 3  # three rows logged by earlier runs

        def __init__(self) -> None:
            self.logged: list[tuple[list[str], int]] = []
            self.summary: dict = {}

        def log(self, values: dict, step: int) -> None:
            self.logged.append((sorted(values), step))

        def finish(self) -> None:
            pass

    run = ResumedRun()
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setattr(wandb, "init", lambda **kwargs: run)
    files = [score_file(tmp_path, "speechglue", "t", GLUE)]
    settings = {"experiment": "demo", "wandb": {"project": "p", "mode": "online"}, "model_run": None}
    record = log_system_results(typed(settings), "t", files, tmp_path / "results/wandb/t")
    assert [step for _, step in run.logged] == [3, 3]
    assert run.logged[0][0] == ["speechglue/table"] and run.summary == record["summary"]


def test_results_without_wandb_and_recorded_run_ids(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")
    files = [score_file(tmp_path, "speechxnli", "ctc_init", {"per_language": {"en": {"accuracy": 0.4}}})]
    settings = {"experiment": "demo", "wandb": {"project": "p", "mode": "disabled"}, "model_run": None}
    record = log_system_results(typed(settings), "ctc_init", files, tmp_path / "run")
    assert record["model_run"] is None and record["summary"] == {
        "speechxnli/en/accuracy": pytest.approx(40.0)
    }
    assert offline_run_dirs([tmp_path]) == []
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"final_step": 3, "wandb_run_id": "abc123"}))
    assert linked_run("demo", ModelRun(name="demo-ctc", job_type="train_ctc"), summary)["id"] == "abc123"


def fake_wandb(tmp_path: Path, exit_code: int) -> Path:
    """A `wandb` stand-in: records its arguments, marks the run synced (as wandb does) or fails."""
    script = tmp_path / f"wandb_{exit_code}"
    script.write_text(f"""#!/bin/sh
echo "$@" >> {tmp_path}/calls.txt
if [ {exit_code} -ne 0 ]; then echo "wandb: ERROR Network error (ConnectionError)" >&2; exit {exit_code}; fi
touch "$2"/run-x.wandb.synced
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def test_wandb_sync_uploads_each_offline_run_once(tmp_path) -> None:
    runs = [
        tmp_path / "results/train/ctc/wandb/offline-run-20260101_000000-aaa",
        tmp_path / "results/wandb/t/wandb/offline-run-20260101_000001-bbb",
    ]
    for run in runs:
        run.mkdir(parents=True)
    (tmp_path / "results/wandb/t/wandb/latest-run").symlink_to(runs[1])
    failing = fake_wandb(tmp_path, 1)
    with pytest.raises(SyncError) as exc:
        sync_offline_runs([tmp_path / "results", tmp_path / "logs"], str(failing))
    assert all(str(run) in str(exc.value) for run in runs) and "ConnectionError" in str(exc.value)
    ok = fake_wandb(tmp_path, 0)
    first = sync_offline_runs([tmp_path / "results"], str(ok))
    assert [r["status"] for r in first] == ["synced", "synced"]
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert calls[-2:] == [f"sync {runs[0]}", f"sync {runs[1]}"]
    again = sync_offline_runs([tmp_path / "results"], str(ok))
    assert [r["status"] for r in again] == ["already synced", "already synced"]
    main(
        [
            "report",
            "wandb-sync",
            "--roots",
            str(tmp_path / "results"),
            "--out",
            str(tmp_path / "sync.json"),
            "--wandb-bin",
            str(ok),
            "--resync",
        ]
    )
    assert [r["status"] for r in json.loads((tmp_path / "sync.json").read_text())] == ["synced", "synced"]


# --------------------------------------------------------------------------- workflow: dry runs and --report


def snakemake(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "WANDB_MODE": "offline",
    }
    return subprocess.run(
        [SNAKEMAKE, "-s", str(REPO / "Snakefile"), "-d", str(cwd), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def job_counts(output: str) -> dict[str, int]:
    """Rule -> job count from a dry run's `Job stats` table ({} when there is nothing to do)."""
    if "Job stats:" not in output:
        return {}
    lines = output.split("Job stats:")[1].splitlines()[3:]
    counts = {}
    for line in lines:
        words = line.split()
        if len(words) != 2 or words[0] == "total":
            break
        counts[words[0]] = int(words[1])
    return counts


def test_one_table_from_scratch_runs_only_its_evaluations(tmp_path) -> None:
    res = snakemake("-n", "results/tables/speechglue.md", cwd=tmp_path)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    counts = job_counts(out)
    assert counts["table"] == 1 and "benchmark_plot" not in counts and "wandb_results" not in counts
    benchmarks = set(re.findall(r"wildcards: benchmark=(\w+), system=\w+", out))
    assert benchmarks == {"speechglue"}
    table_inputs = re.search(r"rule table:\n\s+input: (.*)\n", out).group(1).split(", ")
    evaluated = re.findall(r"output: \S+\.parquet, (\S+\.scores\.json)", out)
    assert sorted(evaluated) == sorted(table_inputs) and counts["evaluate"] == len(table_inputs)


@pytest.fixture(scope="module")
def prepared_tree(tmp_path_factory) -> Path:
    """Every output of the default DAG as a small placeholder (score files, tables and figures real), made
    current with `snakemake --touch`."""
    root = tmp_path_factory.mktemp("results_tree")
    listing = snakemake("--summary", cwd=root)
    assert listing.returncode == 0, listing.stderr[-3000:]
    outputs = [line.split("\t")[0] for line in listing.stdout.splitlines()[1:] if "\t" in line]
    for name in outputs:
        path = root / name
        if path.suffix:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}\n")
        else:
            (path / "placeholder").parent.mkdir(parents=True, exist_ok=True)  # a directory() output
    scores = sorted(root.glob("results/eval/speechglue/*.scores.json"))
    for path in scores:
        score_file(root, "speechglue", path.name.split(".")[0], GLUE)
    bars = plot_benchmark("speechglue", scores, root / "results/plots/speechglue.png")
    curves = plot_learning_curves(
        read_curves(metrics_csv(root / "results/train/t/metrics.csv", "ce")),
        "t",
        root / "results/plots/train/t.png",
    )
    for png in root.glob("results/plots/**/*.png"):
        png.write_bytes((curves if "train" in png.parts else bars).read_bytes())
    touched = snakemake("--touch", "-c1", cwd=root)
    assert touched.returncode == 0, touched.stderr[-3000:]
    return root


def test_current_table_does_nothing_and_a_changed_score_reruns_only_its_consumers(prepared_tree) -> None:
    current = snakemake("-n", "results/tables/speechglue.md", cwd=prepared_tree)
    assert "Nothing to be done" in current.stdout + current.stderr, current.stdout[-2000:]
    score = prepared_tree / "results/eval/speechglue/t.scores.json"
    original = score.read_text()
    score.write_text(original.replace('"average": 0.35', '"average": 0.4'))
    try:
        one = snakemake("-n", "results/tables/speechglue.md", cwd=prepared_tree)
        assert job_counts(one.stdout + one.stderr) == {"table": 1}
        everything = snakemake("-n", cwd=prepared_tree)
        assert job_counts(everything.stdout + everything.stderr) == {
            "benchmark_plot": 1,
            "table": 1,
            "wandb_results": 1,
            "resource_usage": 1,
            "all": 1,
        }
    finally:
        score.write_text(original)


def test_report_renders_offline_with_a_caption_per_output(prepared_tree) -> None:
    res = snakemake("--report", "results/report.html", cwd=prepared_tree)
    assert res.returncode == 0, res.stderr[-3000:]
    html = (prepared_tree / "results/report.html").read_text(encoding="utf-8")
    assert not re.search(
        r"""<(script|link|img)[^>]+(src|href)=["']https?://""", html
    )  # nothing fetched online
    for needle in (
        "Bar chart of benchmark <strong>speechglue</strong>",
        "Learning curves of model <strong>tmi</strong>",
        "Result table <strong>fleurs_asr</strong>",
        "Training curve of model <strong>ctc</strong>",
        "Data report of split <strong>dev</strong>",
        'experiment <tt class=\\"docutils literal\\">demo',
    ):
        assert needle in html, needle
    for name in ("speechglue.png", "fleurs_st.png", "speechxnli.csv", "t.png", "resources.png", "usage.csv"):
        assert name in html
    assert "Resources each rule's jobs used in this run" in html


def test_wandb_sync_is_a_target_for_offline_runs_only(prepared_tree, tmp_path) -> None:
    offline = snakemake("-n", "wandb_sync", cwd=prepared_tree)
    assert job_counts(offline.stdout + offline.stderr) == {"wandb_sync": 1}
    override = tmp_path / "online.yaml"
    override.write_text("wandb: {project: speechllm, mode: online}\n")
    online = snakemake(
        "-n", "wandb_sync", "--configfile", str(REPO / "config/config.yaml"), str(override), cwd=prepared_tree
    )
    assert online.returncode != 0 and "wandb.mode is 'online'" in online.stdout + online.stderr
