"""Result tables (Markdown, CSV, LaTeX) built from per-model score files.

A score file is JSON with ``benchmark``, ``model``, ``metrics`` and optionally ``decoder``,
``checkpoint``, ``experiment`` and ``versions`` (see ``load_score_file``). Tables have a
``(language|task|data, metric)`` row index and one column per model; values are percentages
(CER, WER, accuracy, Matthews/Pearson × 100), except BLEU and chrF, which keep sacreBLEU's
0-100 scale, and perplexity, which is reported as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from speechllm.evaluate.metrics import GLUE_PRIMARY_METRIC, glue_average, primary_asr_metric
from speechllm.io import atomic_write_text, read_json

TABLE_NAMES: tuple[str, ...] = (
    "fleurs_asr",
    "fleurs_st",
    "covost2_st",
    "speechglue",
    "speechxnli",
    "summarization",
)
# The benchmarks whose score files a table reads (default: the table's own name). The summarization table adds
# the response perplexity on LibriSpeech, scored as benchmark `response_ppl`.
TABLE_BENCHMARKS: dict[str, tuple[str, ...]] = {"summarization": ("summarization", "response_ppl")}
GLUE_TASK_ORDER: tuple[str, ...] = (
    "cola",
    "sst2",
    "mrpc",
    "qqp",
    "stsb",
    "mnli",
    "mnli_matched",
    "mnli_mismatched",
    "qnli",
    "rte",
    "wnli",
)
ROW_LEVEL: dict[str, str] = {
    "fleurs_asr": "language",
    "fleurs_st": "language",
    "covost2_st": "language",
    "speechglue": "task",
    "speechxnli": "language",
    "summarization": "data",
}
SUMMARY_ROWS: dict[str, tuple[str, ...]] = {
    "fleurs_asr": ("all",),
    "fleurs_st": ("all",),
    "covost2_st": ("all",),
    "speechglue": ("average", "average_without_wnli"),
    "speechxnli": ("mean",),
    "summarization": ("all",),
}
VALUE_NOTES: dict[str, str] = {
    "fleurs_asr": "Primary metric per language in % (CER for zh/ja/th/lo/my, WER otherwise; "
    "corpus-level, Whisper basic normaliser on both sides); 'all' = pooled over all utterances.",
    "fleurs_st": "sacreBLEU corpus BLEU and chrF (0-100); 'all' = pooled corpus score; Whisper basic "
    "normaliser on the sides each model's 'normalized' names.",
    "covost2_st": "CoVoST 2 X->English: sacreBLEU corpus BLEU and chrF (0-100); 'all' = pooled corpus score; "
    "Whisper basic normaliser on the sides each model's 'normalized' names.",
    "speechglue": "Primary metric per task in % (CoLA Matthews, STS-B Pearson, accuracy otherwise); "
    "averages are means of the primary metrics of every task but STS-B (as the reference's Avg.).",
    "speechxnli": "Accuracy in %; 'mean' = mean over languages.",
    "summarization": "ROUGE-1/2/L F-measures, METEOR and BERTScore P/R/F1 in % against the reference "
    "summaries (mean over articles; METEOR and BERTScore where measured); perplexity of the text-prompted "
    "LLM's responses per test set (exp of the mean over utterances of the mean token NLL).",
}
METRIC_ORDER: tuple[str, ...] = ("cer", "wer", "bleu", "chrf")
# Summary-quality metrics in table order (score-file key, row label); absent ones are left out.
SUMMARY_METRICS: tuple[tuple[str, str], ...] = (
    ("rouge1", "ROUGE-1"),
    ("rouge2", "ROUGE-2"),
    ("rougeL", "ROUGE-L"),
    ("meteor", "METEOR"),
    ("bertscore_precision", "BERTScore-P"),
    ("bertscore_recall", "BERTScore-R"),
    ("bertscore_f1", "BERTScore-F1"),
)
SUMMARY_LABELS: tuple[str, ...] = tuple(label for _, label in SUMMARY_METRICS)
SUMMARY_DATA = "articles"  # row label of the summary-quality metrics (the spoken articles)

Row = tuple[str, str]


def load_score_file(path: Path) -> dict[str, Any]:
    """Read one score file and check it has ``benchmark``, ``model`` and ``metrics``."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a score file (a JSON object with benchmark, model and metrics)")
    missing = [key for key in ("benchmark", "model", "metrics") if key not in data]
    if missing:
        raise ValueError(f"{path}: score file lacks {missing}")
    return data


def _value(raw: Any, scale: float) -> float:
    """Scale a metric value; None/missing becomes NaN."""
    return math.nan if raw is None else float(raw) * scale


def _fleurs_asr_rows(metrics: Mapping[str, Any]) -> dict[Row, float]:
    """Each language's primary ASR metric, then pooled CER and WER as 'all'."""
    rows: dict[Row, float] = {}
    for lang, scores in metrics.get("per_language", {}).items():
        metric = primary_asr_metric(lang)
        rows[(lang, metric)] = _value(scores.get(metric), 100.0)
    for metric in ("cer", "wer"):
        if metric in metrics.get("all", {}):
            rows[("all", metric)] = _value(metrics["all"][metric], 100.0)
    return rows


def _fleurs_st_rows(metrics: Mapping[str, Any]) -> dict[Row, float]:
    """BLEU and chrF per language and pooled ('all')."""
    sections = {**metrics.get("per_language", {}), "all": metrics.get("all", {})}
    return {
        (row, metric): _value(scores.get(metric), 1.0)
        for row, scores in sections.items()
        for metric in ("bleu", "chrf")
        if metric in scores
    }


def _speechglue_rows(metrics: Mapping[str, Any]) -> dict[Row, float]:
    """Primary metric per task, then the averages (recorded, or computed from ``per_task``)."""
    per_task: Mapping[str, Mapping[str, Any]] = metrics.get("per_task", {})
    rows: dict[Row, float] = {}
    for task, scores in per_task.items():
        metric = GLUE_PRIMARY_METRIC.get(task, "accuracy")
        rows[(task, metric)] = _value(scores.get(metric), 100.0)
    computed = glue_average(per_task) if per_task.keys() <= GLUE_PRIMARY_METRIC.keys() else {}
    for key in SUMMARY_ROWS["speechglue"]:
        recorded = metrics.get(key)
        if isinstance(recorded, Mapping):
            recorded = recorded.get(key)
        raw = recorded if recorded is not None else computed.get(key)
        if raw is not None:
            rows[(key, "primary")] = _value(raw, 100.0)
    return rows


def _speechxnli_rows(metrics: Mapping[str, Any]) -> dict[Row, float]:
    """Accuracy per language, then the recorded mean ('all')."""
    rows = {
        (lang, "accuracy"): _value(scores.get("accuracy"), 100.0)
        for lang, scores in metrics.get("per_language", {}).items()
    }
    overall = metrics.get("all")
    if isinstance(overall, Mapping):
        overall = overall.get("accuracy")
    if overall is not None:
        rows[("mean", "accuracy")] = _value(overall, 100.0)
    return rows


def _score_value(raw: Any, keys: Sequence[str]) -> Any:
    """A metric recorded as a number or as a mapping holding it under the first of ``keys`` present."""
    if isinstance(raw, Mapping):
        return next((raw[key] for key in keys if key in raw), None)
    return raw


def _summarization_rows(metrics: Mapping[str, Any]) -> dict[Row, float]:
    """ROUGE-1/2/L, METEOR and BERTScore (x 100) as rows of the 'articles', then the perplexity of each test
    set (unscaled).

    Reads a `summarization` score file (ROUGE/METEOR/BERTScore fractions at the top level or under ``all``;
    optionally
    ``perplexity``: a number, or test set -> number) and a `response_ppl` one (``per_subset``: test set ->
    {"ppl": ...}, and ``all``: {"ppl": ...}).
    """
    rows: dict[Row, float] = {}
    overall = metrics.get("all")
    summary = overall if isinstance(overall, Mapping) else {}
    for key, label in SUMMARY_METRICS:
        source = metrics if key in metrics else summary
        if key in source:
            rows[(SUMMARY_DATA, label)] = _value(_score_value(source[key], (key, "fmeasure")), 100.0)
    if "per_subset" in metrics:
        sets = {**metrics["per_subset"], **({"all": overall} if overall is not None else {})}
    else:
        perplexity = metrics.get("perplexity")
        sets = (
            perplexity
            if isinstance(perplexity, Mapping)
            else {}
            if perplexity is None
            else {"all": perplexity}
        )
    for name, raw in sets.items():
        rows[(str(name), "perplexity")] = _value(_score_value(raw, ("ppl", "perplexity")), 1.0)
    return rows


ROW_BUILDERS: dict[str, Callable[[Mapping[str, Any]], dict[Row, float]]] = {
    "fleurs_asr": _fleurs_asr_rows,
    "fleurs_st": _fleurs_st_rows,
    "covost2_st": _fleurs_st_rows,
    "speechglue": _speechglue_rows,
    "speechxnli": _speechxnli_rows,
    "summarization": _summarization_rows,
}


def _row_sort_key(name: str, row: Row) -> tuple[int, int, str, int, str]:
    """Body rows first (GLUE tasks in canonical order, languages A-Z), summary rows last."""
    label, metric = row
    summary = SUMMARY_ROWS[name]
    group = summary.index(label) + 1 if label in summary else 0
    canonical = 99
    if name == "speechglue" and label in GLUE_TASK_ORDER:
        canonical = GLUE_TASK_ORDER.index(label)
    elif name == "summarization" and label == SUMMARY_DATA and metric in SUMMARY_LABELS:
        canonical = SUMMARY_LABELS.index(metric)
    metric_rank = METRIC_ORDER.index(metric) if metric in METRIC_ORDER else 99
    return (group, canonical, label, metric_rank, metric)


def order_models(models: Iterable[str], model_order: Sequence[str] | None = None) -> list[str]:
    """Models listed in ``model_order`` first, in that order; any others after, sorted."""
    present = set(models)
    first = [model for model in (model_order or ()) if model in present]
    return first + sorted(present - set(first))


def load_table_scores(
    name: str, score_files: Sequence[Path], model_order: Sequence[str] | None
) -> list[tuple[Path, dict[str, Any]]]:
    """Load score files, check benchmarks and (model, benchmark) uniqueness, return them in column order."""
    if name not in ROW_BUILDERS:
        raise ValueError(f"unknown table {name!r}; expected one of {list(TABLE_NAMES)}")
    accepted = table_benchmarks(name)
    seen: dict[tuple[str, str], Path] = {}
    loaded: list[tuple[Path, dict[str, Any]]] = []
    for path in score_files:
        data = load_score_file(path)
        if data["benchmark"] not in accepted:
            raise ValueError(f"{path}: benchmark {data['benchmark']!r} in a {name!r} table")
        key = (data["model"], data["benchmark"])
        if key in seen:
            raise ValueError(f"model {data['model']!r} in both {seen[key]} and {path}")
        seen[key] = Path(path)
        loaded.append((Path(path), data))
    rank = {
        model: i for i, model in enumerate(order_models({data["model"] for _, data in loaded}, model_order))
    }
    return sorted(loaded, key=lambda item: (rank[item[1]["model"]], accepted.index(item[1]["benchmark"])))


def table_benchmarks(name: str) -> tuple[str, ...]:
    """The benchmarks whose score files table `name` reads."""
    return TABLE_BENCHMARKS.get(name, (name,))


def table_for_benchmark(benchmark: str) -> str:
    """The table that shows a benchmark's scores."""
    return next(
        (table for table, benchmarks in TABLE_BENCHMARKS.items() if benchmark in benchmarks), benchmark
    )


def table_column(name: str, path: Path, data: Mapping[str, Any]) -> dict[Row, float]:
    """One model's table values by row; a malformed metric raises ValueError naming the score file."""
    try:
        return ROW_BUILDERS[name](data["metrics"])
    except KeyError as err:  # e.g. a GLUE task without its primary metric, needed for the averages
        raise ValueError(f"{path}: malformed {name} metrics: no {err}") from err
    except (AttributeError, TypeError, ValueError) as err:
        raise ValueError(f"{path}: malformed {name} metrics: {err}") from err


def build_table(
    name: str, score_files: Sequence[Path], model_order: Sequence[str] | None = None
) -> pd.DataFrame:
    """One column per model (ordered by ``model_order``), rows indexed by (language|task, metric).

    Missing values are NaN. Models in ``model_order`` without a score file are left out; models
    not in it are appended in alphabetical order.
    """
    loaded = load_table_scores(name, score_files, model_order)
    columns: dict[str, dict[Row, float]] = {}
    for path, data in loaded:
        columns.setdefault(data["model"], {}).update(table_column(name, path, data))
    rows = sorted(
        {row for values in columns.values() for row in values}, key=lambda r: _row_sort_key(name, r)
    )
    index = pd.MultiIndex.from_tuples(rows, names=[ROW_LEVEL[name], "metric"])
    table = pd.DataFrame(
        {model: [values.get(row, math.nan) for row in rows] for model, values in columns.items()},
        index=index,
        dtype=float,
    )
    table.columns.name = "model"
    return table


def _walk(node: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """Yield every (key, value) pair of a nested mapping, depth first."""
    for key, value in node.items():
        yield key, value
        if isinstance(value, Mapping):
            yield from _walk(value)


def _signatures(metrics: Mapping[str, Any]) -> list[str]:
    """Distinct metric signatures, versions, skip reasons (e.g. METEOR without WordNet), the ASR edit
    alignment (config evaluate.asr_alignment) and which sides BLEU/chrF normalised (evaluate.st_normalize:
    `normalized`) recorded anywhere in a score file's ``metrics``, first-seen order."""
    found = (
        f"{key}: {value}"
        for key, value in _walk(metrics)
        if (key.endswith(("signature", "_version", "_skipped", "alignment")) or key == "normalized")
        and not isinstance(value, Mapping)
    )
    return list(dict.fromkeys(found))


def table_footer(name: str, score_files: Sequence[Path], model_order: Sequence[str] | None = None) -> str:
    """Footer lines: value conventions, then per model its experiment, checkpoint, versions, signatures."""
    loaded = load_table_scores(name, score_files, model_order)
    lines = [f"Benchmark: {name}. {VALUE_NOTES[name]}", ""]
    for path, data in loaded:
        parts = [f"experiment={data.get('experiment', '?')}", f"checkpoint={data.get('checkpoint', '?')}"]
        if "decoder" in data:
            parts.append(f"decoder={data['decoder']}")
        parts += [f"{key}={value}" for key, value in sorted(data.get("versions", {}).items())]
        parts += _signatures(data["metrics"])
        parts.append(f"scores={path}")
        label = (
            data["model"] if len(table_benchmarks(name)) == 1 else f"{data['model']} ({data['benchmark']})"
        )
        lines.append(f"- {label}: " + "; ".join(parts))
    return "\n".join(lines)


def _flat(table: pd.DataFrame) -> pd.DataFrame:
    """Move named index levels into leading columns."""
    return table.reset_index() if any(table.index.names) else table


def render_table(table: pd.DataFrame, footer: str) -> dict[str, str]:
    """Render Markdown (with footer), CSV, and a booktabs LaTeX tabular (footer as % comments)."""
    flat = _flat(table)
    with_none = flat.astype(object).where(flat.notna(), None)
    markdown = with_none.to_markdown(index=False, floatfmt=".2f", missingval="--")
    latex = flat.to_latex(index=False, float_format="%.2f", na_rep="--", escape=True)
    comments = "".join(f"% {line}\n" if line else "%\n" for line in footer.splitlines())
    return {
        "md": f"{markdown}\n\n{footer.rstrip()}\n",
        "csv": flat.to_csv(index=False, float_format="%.4f"),
        "tex": f"% requires \\usepackage{{booktabs}}\n{comments}{latex}",
    }


def write_table(table: pd.DataFrame, out_stem: Path, footer: str) -> list[Path]:
    """Write ``<stem>.md``, ``<stem>.csv`` and ``<stem>.tex``, each atomically; return the paths.

    All three are rendered before anything is written, so a rendering error writes nothing.
    """
    out_stem = Path(out_stem)
    rendered = render_table(table, footer)
    paths = []
    for ext, text in rendered.items():
        path = out_stem.with_name(f"{out_stem.name}.{ext}")
        atomic_write_text(path, text)
        paths.append(path)
    return paths
