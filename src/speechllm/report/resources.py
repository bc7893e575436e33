"""What the jobs used, against what they asked for: the benchmark view of the report, for sizing `mem_mb`,
`runtime` and threads (config `resources`, `resources.rules.<rule>`).

Every rule writes a Snakemake benchmark file, `logs/benchmark/<rule>/<wildcards>.tsv` (one line: wall seconds
`s`, `max_rss` in MB, `cpu_time` in seconds, ...; Snakemake samples the job's processes every 0.5 s for 30 s,
then every 30 s; a job done before the first sample has no memory figure). A job retried or resumed keeps the
benchmark of its last attempt only. The requests (first attempt) come from the workflow: `requests` maps a
rule to its `mem_mb`, `runtime` (minutes) and `threads`.

Per rule: the number of jobs, the longest wall time and its share of the requested runtime, the largest
resident memory and its share of `mem_mb`, and the mean busy cores (CPU seconds / wall seconds, against the
threads asked for).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from speechllm.io import atomic_path, atomic_write_text

JOB_COLUMNS = ["rule", "job", "wall_s", "max_rss_mb", "cpu_s"]
SUMMARY_COLUMNS = [
    "rule",
    "jobs",
    "wall_max",
    "wall_total",
    "runtime_min",
    "time_used_pct",
    "max_rss_mb",
    "mem_mb",
    "mem_used_pct",
    "busy_cores",
    "threads",
]


class BenchmarkError(ValueError):
    """A benchmark file that cannot be read; the message names it."""


def read_benchmark(path: Path) -> dict[str, float]:
    """Wall seconds, max RSS (MB; NaN when not sampled) and CPU seconds of one Snakemake benchmark TSV."""
    try:
        frame = pd.read_csv(path, sep="\t")
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as err:
        raise BenchmarkError(f"{path}: not a Snakemake benchmark file ({err})") from err
    missing = [c for c in ("s", "max_rss", "cpu_time") if c not in frame.columns]
    if missing or frame.empty:
        raise BenchmarkError(f"{path}: not a Snakemake benchmark file (no row, or no column {missing})")
    row = frame.apply(pd.to_numeric, errors="coerce").iloc[-1]
    rss = float(row["max_rss"])
    return {
        "wall_s": float(row["s"]),
        "max_rss_mb": rss if rss > 0 else math.nan,
        "cpu_s": float(row["cpu_time"]),
    }


def collect_jobs(root: Path) -> pd.DataFrame:
    """One row per benchmark file under `root` (`<rule>/<wildcards>.tsv`, or `<rule>.tsv` for a rule without
    wildcards; the job is named by that path), sorted by rule and job."""
    rows = []
    for path in sorted(Path(root).rglob("*.tsv")):
        job = path.relative_to(root).with_suffix("")
        rows.append({"rule": job.parts[0], "job": job.as_posix(), **read_benchmark(path)})
    return pd.DataFrame(rows, columns=JOB_COLUMNS)


def clock(seconds: float) -> str:
    """h:mm:ss of a duration ('' when unknown)."""
    if not math.isfinite(seconds):
        return ""
    whole = round(seconds)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _share(used: float, asked: Any) -> float:
    return 100.0 * used / float(asked) if isinstance(asked, int | float) and asked > 0 else math.nan


def summarize(jobs: pd.DataFrame, requests: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Per rule: jobs, wall time (max, total), runtime asked and the share the longest job used, max RSS,
    mem_mb asked and the share used, mean busy cores and threads asked."""
    rows = []
    for rule, group in jobs.groupby("rule", sort=True):
        asked = requests.get(rule, {})
        wall_max, wall_total = float(group.wall_s.max()), float(group.wall_s.sum())
        rss = float(group.max_rss_mb.max()) if group.max_rss_mb.notna().any() else math.nan
        rows.append(
            {
                "rule": rule,
                "jobs": len(group),
                "wall_max": clock(wall_max),
                "wall_total": clock(wall_total),
                "runtime_min": asked.get("runtime"),
                "time_used_pct": _share(wall_max, (asked.get("runtime") or 0) * 60),
                "max_rss_mb": rss,
                "mem_mb": asked.get("mem_mb"),
                "mem_used_pct": _share(rss, asked.get("mem_mb")),
                "busy_cores": float(group.cpu_s.sum()) / wall_total if wall_total > 0 else math.nan,
                "threads": asked.get("threads"),
            }
        )
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def to_markdown(summary: pd.DataFrame) -> str:
    """The summary as a Markdown table (numbers rounded; unknown values empty)."""

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return ""
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in summary.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def plot_usage(summary: pd.DataFrame, out: Path) -> Path:
    """Two panels of horizontal bars per rule: the longest job's share of its runtime, the largest job's share
    of its mem_mb (100 % = the request; a bar past it was retried with more or killed)."""
    rules = list(summary.rule)[::-1]
    figure = Figure(figsize=(11, max(3.0, 0.32 * len(rules) + 1.5)), layout="constrained")
    for axis, column, title in zip(
        figure.subplots(1, 2, sharey=True),
        ("time_used_pct", "mem_used_pct"),
        ("longest job, % of runtime", "max RSS, % of mem_mb"),
        strict=True,
    ):
        values = [float(v) if v is not None else math.nan for v in summary[column]][::-1]
        axis.barh(rules, [0.0 if not math.isfinite(v) else v for v in values], color="tab:blue")
        axis.axvline(100.0, color="tab:red", linewidth=1)
        axis.set_title(title)
        axis.set_xlabel("%")
    figure.suptitle("Resources used by each rule's jobs against their request")
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return Path(out)


def write_usage(
    root: Path, requests: Mapping[str, Mapping[str, Any]], out_stem: Path, plot: Path
) -> pd.DataFrame:
    """`<stem>.csv` and `<stem>.md` (per rule), `<stem>.jobs.csv` (per job) and the figure; returns the
    summary."""
    jobs = collect_jobs(root)
    summary = summarize(jobs, requests)
    stem = Path(out_stem)
    for frame, suffix in ((summary, ".csv"), (jobs, ".jobs.csv")):
        with atomic_path(stem.parent / f"{stem.name}{suffix}") as tmp:
            frame.to_csv(tmp, index=False, float_format="%.2f")
    atomic_write_text(stem.parent / f"{stem.name}.md", to_markdown(summary))
    plot_usage(summary, plot)
    return summary
