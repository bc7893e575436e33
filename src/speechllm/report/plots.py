"""Report figures (matplotlib PNGs): learning curves from a training `metrics.csv`, and per-language /
per-task bar charts of one benchmark's score files (one bar per system).

Figures are drawn on a bare `matplotlib.figure.Figure` (no pyplot state, no display needed) and written
atomically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from speechllm.io import atomic_path
from speechllm.report.tables import SUMMARY_DATA, build_table, load_table_scores

# Bars per benchmark: the value axis label, and which table rows are drawn.
BAR_LABELS: dict[str, str] = {
    "fleurs_asr": "CER (%)",
    "fleurs_st": "BLEU",
    "covost2_st": "BLEU",
    "speechglue": "primary metric (%)",
    "speechxnli": "accuracy (%)",
    "summarization": "score (%)",
}
BAR_TITLES: dict[str, str] = {
    "fleurs_asr": "FLEURS ASR: character error rate per language",
    "fleurs_st": "FLEURS X→English speech translation: BLEU per language",
    "covost2_st": "CoVoST 2 X→English speech translation: BLEU per language",
    "speechglue": "SpeechGLUE: primary metric per task",
    "speechxnli": "SpeechXNLI: accuracy per language",
    "summarization": "Spoken-article summarization: ROUGE, METEOR and BERTScore",
}
GROUPS_PER_PANEL = 24  # paper scale has 102 languages: wrap them over several panels


class PlotError(ValueError):
    """Input that cannot be plotted; the message names the file."""


# --------------------------------------------------------------------------- learning curves


def read_curves(path: Path) -> pd.DataFrame:
    """A training `metrics.csv` (one row per logged step, empty cells where a column was not logged)."""
    try:
        frame = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as err:
        raise PlotError(f"{path}: not a metrics CSV ({err})") from err
    if "step" not in frame.columns:
        raise PlotError(f"{path}: no 'step' column (columns: {list(frame.columns)})")
    return frame.sort_values("step")


def curve_panels(columns: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(panel title, columns) for the learning-curve panels that `columns` can fill, in display order.

    Training losses share a panel with the dev loss; dev error rates / accuracies get their own panel.
    """
    losses = sorted(c for c in columns if c.startswith("loss")) + [c for c in columns if c == "dev_loss"]
    dev = sorted(c for c in columns if c.startswith("dev_") and c != "dev_loss")
    if "acc" in columns:
        dev.append("acc")  # teacher-forced training accuracy, on the same 0-1 scale as dev_acc
    panels = [
        ("loss", losses),
        ("learning rate", [c for c in columns if c == "lr"]),
        ("dev metrics", dev),
        ("gradient norm", [c for c in columns if c == "grad_norm"]),
    ]
    return [(title, cols) for title, cols in panels if cols]


def plot_learning_curves(frame: pd.DataFrame, title: str, out: Path, source: Path | str = "metrics") -> Path:
    """One row of panels (loss, learning rate, dev metrics, gradient norm) against the optimizer step."""
    panels = curve_panels([str(c) for c in frame.columns])
    if not any(t in ("loss", "dev metrics") for t, _ in panels):
        raise PlotError(f"{source}: no loss or dev metric columns to plot (columns: {list(frame.columns)})")
    fig = Figure(figsize=(4.2 * len(panels), 3.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (panel, cols) in zip(axes, panels, strict=True):
        for col in cols:
            points = frame[["step", col]].dropna()
            if points.empty:
                continue
            sparse = col.startswith("dev_") or len(points) < 20  # evaluations: a few points, show them
            ax.plot(
                points["step"],
                points[col],
                marker="o" if sparse else None,
                markersize=3,
                linestyle="--" if col.startswith("dev_") else "-",
                label=col,
            )
        ax.set_title(panel)
        ax.set_xlabel("step")
        if panel == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if len(cols) > 1 or panel in ("loss", "dev metrics"):
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.suptitle(f"training curves: {title}")
    return save_figure(fig, out)


# --------------------------------------------------------------------------- benchmark bars


def _percent(raw: Any) -> float:
    return math.nan if raw is None else 100.0 * float(raw)


def _asr_cer_columns(files: Sequence[Path], model_order: Sequence[str] | None) -> pd.DataFrame:
    """CER (%) per language and pooled ('all') per model, from `fleurs_asr` score files."""
    columns: dict[str, dict[str, float]] = {}
    for path, data in load_table_scores("fleurs_asr", files, model_order):
        metrics = data["metrics"]
        try:
            values = {
                lang: _percent(s.get("cer")) for lang, s in sorted(metrics.get("per_language", {}).items())
            }
            values["all"] = _percent(metrics.get("all", {}).get("cer"))
        except (AttributeError, TypeError, ValueError) as err:
            raise PlotError(f"{path}: malformed fleurs_asr metrics: {err}") from err
        columns[data["model"]] = values
    rows = sorted({row for values in columns.values() for row in values} - {"all"}) + ["all"]
    return pd.DataFrame({m: [v.get(r, math.nan) for r in rows] for m, v in columns.items()}, index=rows)


def bar_values(
    name: str, score_files: Sequence[Path], model_order: Sequence[str] | None = None
) -> pd.DataFrame:
    """Bar heights: rows = languages / tasks / measures (summary rows last), columns = models."""
    if name == "fleurs_asr":
        return _asr_cer_columns(score_files, model_order)
    table = build_table(name, score_files, model_order)
    labels = table.index.get_level_values(0)
    metrics = table.index.get_level_values(1)
    if name in ("fleurs_st", "covost2_st"):
        table = table[metrics == "bleu"].droplevel(1)
    elif name == "summarization":
        table = table[labels == SUMMARY_DATA].droplevel(0)  # perplexity is on another scale: not drawn
    else:
        table = table.droplevel(1)
    return table


def plot_bars(values: pd.DataFrame, title: str, ylabel: str, out: Path) -> Path:
    """Grouped bars (a colour per model), wrapped over panels of at most GROUPS_PER_PANEL groups."""
    if values.empty or values.isna().all().all():
        raise PlotError(f"nothing to plot for '{title}': no values")
    groups = [str(g) for g in values.index]
    models = [str(m) for m in values.columns]
    chunks = [groups[i : i + GROUPS_PER_PANEL] for i in range(0, len(groups), GROUPS_PER_PANEL)]
    width = 0.8 / max(1, len(models))
    fig_width = max(6.0, min(24.0, 0.22 * len(models) * len(chunks[0]) + 2.0))
    fig = Figure(figsize=(fig_width, 3.2 * len(chunks) + 0.6), layout="constrained")
    axes = fig.subplots(len(chunks), 1, squeeze=False)[:, 0]
    colors = [f"C{i % 10}" for i in range(len(models))]
    for ax, chunk in zip(axes, chunks, strict=True):
        part = values.set_axis(groups, axis=0).loc[chunk]
        for i, model in enumerate(models):
            xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(chunk))]
            ax.bar(xs, part.iloc[:, i].to_numpy(dtype=float), width, label=model, color=colors[i])
        ax.set_xticks(
            range(len(chunk)),
            chunk,
            rotation=45 if len(chunk) > 6 else 0,
            ha="right" if len(chunk) > 6 else "center",
            fontsize="small",
        )
        if len(chunks) > 1:
            ax.set_xlim(-0.5, GROUPS_PER_PANEL - 0.5)  # same bar width in the last, shorter panel
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize="small", ncols=min(len(models), 8), loc="lower left", bbox_to_anchor=(0, 1.0))
    fig.suptitle(title)
    return save_figure(fig, out)


def plot_benchmark(
    name: str, score_files: Sequence[Path], out: Path, model_order: Sequence[str] | None = None
) -> Path:
    """The bar chart of one benchmark (see `bar_values`) written to `out`."""
    if name not in BAR_LABELS:
        raise PlotError(f"unknown benchmark {name!r}; expected one of {list(BAR_LABELS)}")
    return plot_bars(bar_values(name, score_files, model_order), BAR_TITLES[name], BAR_LABELS[name], out)


# --------------------------------------------------------------------------- output


def save_figure(fig: Figure, out: Path) -> Path:
    """Write a PNG atomically (the figure appears complete or not at all)."""
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return out
