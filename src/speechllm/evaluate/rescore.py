"""Score files: written from a benchmark's per-utterance frame, and recomputed from its Parquet alone.

A score file is JSON: `benchmark`, `model`, `decoder`, `checkpoint`, `experiment`, `metrics` (what the tables
read), `versions` (speechllm, normaliser, sacreBLEU, rouge-score), `settings` (the decoding/scoring knobs that
shaped it) and `notes` (e.g. why a model has no CTC-branch score). Strict JSON: an undefined metric is null.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from speechllm.evaluate import benchmarks, summarization
from speechllm.evaluate.settings import benchmark_settings
from speechllm.io import atomic_path, read_json
from speechllm.versions import installed_version

SCORERS: dict[str, Callable[[pd.DataFrame, dict[str, Any]], dict[str, Any]]] = {
    "fleurs_asr": benchmarks.score_asr,
    "fleurs_st": benchmarks.score_st,
    "covost2_st": benchmarks.score_st,
    "speechglue": benchmarks.score_speechglue,
    "speechxnli": benchmarks.score_speechxnli,
    "summarization": summarization.score_summarization,
    "response_ppl": summarization.score_response_ppl,
}
BENCHMARKS: tuple[str, ...] = tuple(SCORERS)
# The per-utterance columns each scorer reads (the frames of evaluate/benchmarks.py and summarization.py).
SCORED_COLUMNS: dict[str, tuple[str, ...]] = {
    "fleurs_asr": ("language", "reference", "hypothesis"),
    "fleurs_st": ("language", "target_language", "reference", "hypothesis"),
    "covost2_st": ("language", "target_language", "reference", "hypothesis"),
    "speechglue": ("task", "reference", "prediction", "matched"),
    "speechxnli": ("language", "reference", "prediction", "matched"),
    "summarization": ("reference", "hypothesis"),
    "response_ppl": ("subset", "nll", "num_tokens"),
}
SETTING_KEYS = (
    "num_beams",
    "max_new_tokens",
    "glue_scoring",
    "stsb_rank",
    "stsb_max_new_tokens",
    "option_prefix",
    "ctc",
    "bleu_tokenize",
    "st_normalize",
    "st_recordings",
    "asr_alignment",
    "st_prompt",
    "summarization",
    "response_ppl",
    "cascade_asr",
    "unfinished_hypotheses",
)
# The settings the scorers read (the rest shaped the decoding, which a rescore does not redo): a rescore
# records the values it scored with. Top-level keys, and keys inside `summarization`.
SCORING_KEYS = ("st_normalize", "bleu_tokenize", "asr_alignment")
SUMMARIZATION_SCORING_KEYS = ("rouge_stemmer", "meteor_tokenize", "bertscore")


def versions() -> dict[str, Any]:
    from speechllm import __version__
    from speechllm.text.normalize import normalizer_version

    return {
        "speechllm": __version__,
        "normalizer": normalizer_version(),
        "sacrebleu": installed_version("sacrebleu"),
        "jiwer": installed_version("jiwer"),
        "rouge_score": installed_version("rouge-score"),
    }


def score_frame(benchmark: str, df: pd.DataFrame, settings: Any) -> dict[str, Any]:
    """The metrics of a benchmark's frame; `settings`: the benchmark's evaluate settings
    (evaluate/settings.py: benchmark_settings)."""
    if benchmark not in SCORERS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {list(BENCHMARKS)}")
    return SCORERS[benchmark](df, settings)


def write_outputs(df: pd.DataFrame, scores: dict[str, Any], hyps: Path, scores_path: Path) -> None:
    """Parquet of per-utterance outputs and the score file, each written atomically."""
    with atomic_path(hyps) as tmp:
        df.to_parquet(tmp, index=False)
    with atomic_path(scores_path) as tmp:
        tmp.write_text(score_file_text(scores), encoding="utf-8")


def _undefined_to_null(value: Any, path: str, undefined: list[str]) -> Any:
    """`value` with each NaN / infinite float replaced by None, whose dotted paths go into `undefined`."""
    if isinstance(value, float) and not math.isfinite(value):
        undefined.append(path)
        return None
    if isinstance(value, dict):
        return {k: _undefined_to_null(v, f"{path}.{k}".lstrip("."), undefined) for k, v in value.items()}
    if isinstance(value, list):
        return [_undefined_to_null(v, f"{path}.{i}", undefined) for i, v in enumerate(value)]
    return value


def strict_scores(document: dict[str, Any]) -> dict[str, Any]:
    """A score document as strict JSON holds it: an undefined metric (NaN: STS-B predictions that are all
    equal, so no correlation; averages over it) becomes null and is named in notes.undefined_metrics.
    Tables and plots show it as missing."""
    undefined: list[str] = []
    metrics = _undefined_to_null(document.get("metrics"), "", undefined)
    notes = {k: v for k, v in (document.get("notes") or {}).items() if k != "undefined_metrics"}
    if undefined:
        notes["undefined_metrics"] = undefined
    return {**document, "metrics": metrics, "notes": notes}


def score_file_text(document: dict[str, Any]) -> str:
    """The score file's text: `strict_scores(document)` as indented JSON (no NaN / Infinity tokens)."""
    return json.dumps(strict_scores(document), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def score_document(
    benchmark: str,
    model: str,
    decoder: str,
    checkpoint: str,
    settings: dict[str, Any],
    metrics: dict[str, Any],
    notes: dict[str, Any],
) -> dict[str, Any]:
    evaluate = settings["evaluate"]
    return {
        "benchmark": benchmark,
        "model": model,
        "decoder": decoder,
        "checkpoint": checkpoint,
        "experiment": settings.get("experiment"),
        "metrics": metrics,
        "versions": versions(),
        "settings": {k: evaluate[k] for k in SETTING_KEYS if k in evaluate},
        "notes": notes,
    }


def scored_settings(recorded: dict[str, Any], evaluate: dict[str, Any]) -> dict[str, Any]:
    """A score file's `settings` after a rescore with the `evaluate` settings: the scoring keys as scored, the
    decoding keys as decoded."""
    updated = {**recorded, **{k: evaluate[k] for k in SCORING_KEYS if k in evaluate}}
    if isinstance(recorded.get("summarization"), dict) and isinstance(evaluate.get("summarization"), dict):
        new = evaluate["summarization"]
        updated["summarization"] = {
            **recorded["summarization"],
            **{k: new[k] for k in SUMMARIZATION_SCORING_KEYS if k in new},
        }
    return updated


def rescore(
    benchmark: str, hyps: Path, scores_path: Path, settings: dict[str, Any], out: Path | None = None
) -> dict:
    """Recompute `metrics` of a score file from its Parquet (no decoding); write to `out` (default: in
    place)."""
    if not Path(hyps).is_file():
        raise FileNotFoundError(f"per-utterance outputs not found: {hyps}")
    document = read_json(scores_path)
    if document.get("benchmark") != benchmark:
        raise ValueError(f"{scores_path}: benchmark {document.get('benchmark')!r}, not {benchmark!r}")
    evaluate = benchmark_settings(benchmark, settings)
    df = pd.read_parquet(hyps)
    missing = [column for column in SCORED_COLUMNS[benchmark] if column not in df]
    if missing:
        raise ValueError(
            f"{hyps}: no column(s) {missing}, which {benchmark} scores (columns: {list(df.columns)}); "
            f"not the per-utterance outputs of a {benchmark} evaluation"
        )
    document["metrics"] = score_frame(benchmark, df, evaluate)
    document["versions"] = versions()
    document["settings"] = scored_settings(document.get("settings", {}), settings["evaluate"])
    with atomic_path(out or scores_path) as tmp:
        tmp.write_text(score_file_text(document), encoding="utf-8")
    return strict_scores(document)  # as written
