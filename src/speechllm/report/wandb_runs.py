"""W&B dashboards: each system's evaluation tables and summary metrics in a results run next to its training
run, and `wandb sync` of offline run directories (for clusters whose compute nodes have no internet).

Layout in W&B (project = config `wandb.project`):

- group = the experiment (`config.experiment`): every run of one experiment (training, evaluation, results);
- training runs: job_type `train_ctc` / `train_ce` / `train_kd`, named `<experiment>-ctc`,
  `<experiment>-ce-<variant>`;
- one results run per system: job_type `results`, named `<experiment>-<system>`. Its summary holds the
  system's table values (`<benchmark>/<row>/<metric>`, the numbers of `results/tables/*`), its
  `<benchmark>/table` entries are W&B tables of the same values, and `config.model_run` names and gives the id
  of the training run of the model it scores (null for the untrained `ctc_init`).

Why not write the results into the training run itself (resuming it by id): W&B cannot resume offline runs --
a second offline run with the same id is a separate directory, and `wandb sync` of both keeps only one of them
(wandb/wandb#3841, #4624) -- and several evaluation jobs of one model would write to the run at the same time.
A separate run in the same group, linked by config, keeps every run append-only and single-writer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from speechllm.io import read_json
from speechllm.report.settings import ModelRun, WandbResultsSettings
from speechllm.report.tables import ROW_LEVEL, build_table, load_score_file, table_for_benchmark
from speechllm.train.tracking import Tracker, run_id

log = logging.getLogger("speechllm")

RESULTS_JOB_TYPE = "results"


class SyncError(RuntimeError):
    """`wandb sync` failed for some run directories; the message names them."""


def results_run_name(experiment: str, system: str) -> str:
    return f"{experiment}-{system}"


def system_tables(system: str, score_files: Sequence[Path]) -> dict[str, pd.DataFrame]:
    """table name -> the system's column of that result table, as rows (row label, metric, value)."""
    by_table: dict[str, list[Path]] = {}
    for path in score_files:
        data = load_score_file(Path(path))
        if data["model"] != system:
            raise ValueError(f"{path}: scores of system {data['model']!r}, expected {system!r}")
        by_table.setdefault(table_for_benchmark(data["benchmark"]), []).append(Path(path))
    tables: dict[str, pd.DataFrame] = {}
    for name, files in by_table.items():
        frame = build_table(name, files)[system].rename("value").reset_index()
        frame.columns = [ROW_LEVEL[name], "metric", "value"]
        tables[name] = frame
    return tables


def summary_metrics(tables: dict[str, pd.DataFrame]) -> dict[str, float]:
    """Flat `<table>/<row>/<metric>` -> value (as in the result tables), missing values left out."""
    metrics = {}
    for benchmark, frame in tables.items():
        for label, metric, value in frame.itertuples(index=False):
            if value is not None and math.isfinite(value):
                metrics[f"{benchmark}/{label}/{metric}"] = float(value)
    return metrics


def linked_run(
    experiment: str, model_run: ModelRun | None, train_summary: Path | None = None
) -> dict[str, str] | None:
    """The training run of the scored model: its name, job type and id.

    The id is the one the training job recorded in its `summary.json` (`wandb_run_id`) when present, else the
    Tracker's stable id of (experiment, job type, run name).
    """
    if not model_run:
        return None
    link = {
        "name": model_run.name,
        "job_type": model_run.job_type,
        "id": run_id(experiment, model_run.job_type, model_run.name),
    }
    if train_summary is not None and Path(train_summary).is_file():
        recorded = read_json(train_summary).get("wandb_run_id")
        if recorded:
            link["id"] = str(recorded)
    return link


def _table_rows(frame: pd.DataFrame) -> list[list[Any]]:
    return frame.astype(object).where(frame.notna(), None).values.tolist()


def log_system_results(
    settings: WandbResultsSettings,
    system: str,
    score_files: Sequence[Path],
    log_dir: Path,
    train_summary: Path | None = None,
) -> dict[str, Any]:
    """Log one system's tables and summary metrics to its results run; return what was logged.

    Args:
        settings: the step's settings (report/settings.py, built by the rule).
        score_files: the system's score files, one per benchmark.
        log_dir: where the run's files go (W&B under `<log_dir>/wandb`, plus the Tracker's metrics files).
        train_summary: the scored model's training `summary.json` (for a recorded run id), if it was trained.
    """
    experiment = settings.experiment
    tables = system_tables(system, score_files)
    metrics = summary_metrics(tables)
    link = linked_run(experiment, settings.model_run, train_summary)
    name = results_run_name(experiment, system)
    config = {
        "system": system,
        "experiment": experiment,
        "model_dir": settings.model_dir,
        "decoder": settings.decoder,
        "model_run": link,
        "benchmarks": sorted(tables),
        "score_files": [str(p) for p in score_files],
    }
    tracker = Tracker(
        Path(log_dir),
        dataclasses.asdict(settings.wandb),
        group=experiment,
        job_type=RESULTS_JOB_TYPE,
        name=name,
        config=config,
    )
    run = tracker.run
    # The run's next step: 0 for a new run, one past its last row when a rerun resumes it online (stable id,
    # resume="allow"); W&B drops a log call at a step below the current one (wandb/wandb#5632), which left
    # the tables of a rerun unlogged.
    step = int(run.step) if run is not None else 0
    if run is not None:
        import wandb

        run.log(
            {
                f"{benchmark}/table": wandb.Table(columns=list(frame.columns), data=_table_rows(frame))
                for benchmark, frame in tables.items()
            },
            step=step,
        )
    tracker.log(metrics, step=step)
    tracker.summary(metrics)
    record = {
        "run": {
            "project": settings.wandb.project,
            "group": experiment,
            "job_type": RESULTS_JOB_TYPE,
            "name": name,
            "id": run.id if run is not None else run_id(experiment, RESULTS_JOB_TYPE, name),
            "mode": os.environ.get("WANDB_MODE") or settings.wandb.mode,
            "dir": str(Path(log_dir) / "wandb"),
        },
        "model_run": link,
        "summary": metrics,
        "tables": {
            benchmark: {"columns": list(frame.columns), "rows": _table_rows(frame)}
            for benchmark, frame in tables.items()
        },
    }
    tracker.close()
    return record


# --------------------------------------------------------------------------- wandb sync


def offline_run_dirs(roots: Sequence[Path]) -> list[Path]:
    """Every W&B offline run directory (`.../wandb/offline-run-*`) under the roots, sorted."""
    found = {
        p
        for root in roots
        for p in Path(root).rglob("offline-run-*")
        if p.is_dir() and p.parent.name == "wandb"
    }
    return sorted(found)


def is_synced(run_dir: Path) -> bool:
    """`wandb sync` leaves `run-<id>.wandb.synced` next to the run file once it has uploaded it."""
    return any(Path(run_dir).glob("*.wandb.synced"))


def sync_offline_runs(
    roots: Sequence[Path], wandb_bin: str = "wandb", resync: bool = False
) -> list[dict[str, str]]:
    """`wandb sync` each offline run directory under `roots` not yet synced (all of them with `resync`).

    Returns one `{"dir", "status"}` per directory (`synced` / `already synced`). Raises SyncError naming every
    directory that failed, after trying all of them.
    """
    results, failures = [], []
    for run_dir in offline_run_dirs(roots):
        if is_synced(run_dir) and not resync:
            results.append({"dir": str(run_dir), "status": "already synced"})
            continue
        log.info("wandb sync %s", run_dir)
        try:
            proc = subprocess.run([wandb_bin, "sync", str(run_dir)], capture_output=True, text=True)
        except FileNotFoundError as err:
            raise SyncError(
                f"the `{wandb_bin}` command was not found: install wandb where this job runs"
            ) from err
        for line in (proc.stdout + proc.stderr).splitlines():
            log.info("  %s", line)
        if proc.returncode != 0:
            last = next((ln for ln in reversed((proc.stderr + proc.stdout).splitlines()) if ln.strip()), "")
            failures.append(f"{run_dir} (exit {proc.returncode}: {last.strip()})")
            continue
        results.append({"dir": str(run_dir), "status": "synced"})
    if failures:
        raise SyncError(
            f"wandb sync failed for {len(failures)} of {len(failures) + len(results)} run directories "
            f"(network access and WANDB_API_KEY are needed where this job runs): " + "; ".join(failures)
        )
    return results
