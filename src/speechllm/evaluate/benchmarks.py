"""Benchmarks: FLEURS-shaped ASR, X→English ST (FLEURS, CoVoST 2), SpeechGLUE- and SpeechXNLI-shaped
classification.

Each `run_*` decodes into a per-utterance frame (saved as Parquet) and scores it with the matching `score_*`,
which reads nothing but that frame (and the settings), so `speechllm evaluate rescore` reproduces every score
file without decoding again.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pandas as pd
import torch

from speechllm.data.languages import language_name
from speechllm.data.manifest import location
from speechllm.evaluate.constrained import constrained_beam_search, find_option, match_option
from speechllm.evaluate.metrics import (
    asr_scores_by_group,
    bleu_tokenizer,
    check_asr_alignment,
    classification_scores,
    glue_average,
    primary_asr_metric,
    translation_scores,
)
from speechllm.evaluate.prompts import TASK_PROMPTS, Field
from speechllm.evaluate.settings import AsrSettings, StSettings, TaskSettings
from speechllm.evaluate.shards import BatchRunner, take
from speechllm.evaluate.system import Clip, EvalSystem, Fill
from speechllm.settings import config_choice
from speechllm.text.normalize import basic_normalize

log = logging.getLogger(__name__)

STSB_VALUES: tuple[str, ...] = tuple(
    f"{i / 5:.1f}" for i in range(26)
)  # the reference's round(5·label)/5 targets
ST_NORMALIZE = ("both", "references")  # config evaluate.st_normalize
ST_RECORDINGS = ("all", "last_per_sentence")  # config evaluate.st_recordings
NUMBER = re.compile(r"\d+(?:[.,]\d+)?")


def chunks_by_length(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Index batches, longest first (least padding per batch)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _utterance_clip(record: dict[str, Any]) -> Clip:
    return Clip(record["audio"], record.get("raw_transcription", ""), location(record))


def _text_input(system: EvalSystem, fills: Sequence[Fill]) -> str | None:
    """The text that stood in for speech (cascade/text), for the Parquet outputs."""
    return None if system.decoder == "llm" else " | ".join(str(f) for f in fills)


def generation_frame(
    records: list[dict[str, Any]],
    rows: Mapping[str, dict[str, Any]],
    references: list[str],
    *,
    labels: Mapping[str, list[Any]] | None = None,
    normalized: bool = False,
    row_fields: Sequence[str] = (),
) -> pd.DataFrame:
    """The per-utterance frame of a generation benchmark (ASR, ST, summarization), in record order.

    Columns, in the order the Parquet outputs keep: `id`, the `labels` columns (one value per record),
    `prompt`, `input_text`, `reference`, `hypothesis`; with `normalized` their `basic_normalize` forms
    (`reference_normalized`, `hypothesis_normalized`); then each of `row_fields` from the decoded rows.
    """
    got = take(rows, "", len(records))
    hyps = [r["hypothesis"] for r in got]
    columns: dict[str, list[Any]] = {
        "id": [r["id"] for r in records],
        **(labels or {}),
        "prompt": [r["prompt"] for r in got],
        "input_text": [r["input_text"] for r in got],
        "reference": references,
        "hypothesis": hyps,
    }
    if normalized:
        columns["reference_normalized"] = [basic_normalize(r) for r in references]
        columns["hypothesis_normalized"] = [basic_normalize(h) for h in hyps]
    for field in row_fields:
        columns[field] = [r[field] for r in got]
    return pd.DataFrame(columns)


# ---------------------------------------------------------------------- ASR


def _with_primary(language: str, scores: dict[str, Any]) -> dict[str, Any]:
    metric = primary_asr_metric(language)
    return {**scores, "primary_metric": metric, "primary": scores[metric]}


def _asr_metrics(df: pd.DataFrame, column: str, alignment: str) -> dict[str, Any]:
    """Pooled and per-language scores of `df[column]` against `df.reference`, each utterance aligned once."""
    pooled, per_language = asr_scores_by_group(
        list(df.reference), list(df[column]), [str(lang) for lang in df.language], alignment
    )
    return {
        "all": pooled,
        "per_language": {lang: _with_primary(lang, scores) for lang, scores in per_language.items()},
    }


def score_asr(df: pd.DataFrame, settings: AsrSettings | None = None) -> dict[str, Any]:
    """Pooled and per-language CER/WER (`primary` = CER for zh/ja/th/lo/my, WER otherwise).

    Adds `ctc_branch` (same layout) when the frame has the CTC head's own transcripts of the same clips.
    The edits are counted on `settings.asr_alignment`'s alignment (levenshtein without settings).
    """
    alignment = settings.asr_alignment if settings is not None else "levenshtein"
    metrics = _asr_metrics(df, "hypothesis", alignment)
    if "ctc_hypothesis" in df and len(df) and df.ctc_hypothesis.notna().all():
        metrics["ctc_branch"] = _asr_metrics(df, "ctc_hypothesis", alignment)
    return metrics


def decode_asr(
    system: EvalSystem,
    records: list[dict[str, Any]],
    prefix: str,
    postfix: str,
    settings: AsrSettings,
    runner: BatchRunner,
) -> None:
    """Transcribe (this shard's batches of) every utterance: CTC output (decoder ctc) or `prefix + <clip> +
    postfix` to the LLM."""
    check_asr_alignment(settings.asr_alignment)  # a wrong value stops before the decoding, not after

    def decode(idx: list[int]) -> list[dict[str, Any]]:
        fills, ctc = system.fills([_utterance_clip(records[i]) for i in idx])
        if system.decoder == "ctc":
            out = [str(f) for f in fills]
            described = ["<ctc>"] * len(idx)
        else:
            pieces = [[prefix, fill, postfix] for fill in fills]
            out = system.generate(system.prompts(pieces), settings.num_beams, settings.max_new_tokens)
            described = [system.describe(p) for p in pieces]
        return [
            {
                "hypothesis": out[j],
                "prompt": described[j],
                "input_text": str(fills[j]) if system.decoder in ("cascade", "text") else None,
                "ctc_hypothesis": ctc[j] if ctc is not None and system.decoder == "llm" else None,
            }
            for j in range(len(idx))
        ]

    batches = list(chunks_by_length([r.get("num_samples", 0) for r in records], settings.batch_size))
    runner.run("", records, batches, decode, f"ASR ({system.decoder})")


def asr_frame(records: list[dict[str, Any]], rows: Mapping[str, dict[str, Any]]) -> pd.DataFrame:
    return generation_frame(
        records,
        rows,
        [r["raw_transcription"] for r in records],
        labels={"language": [r["language"] for r in records]},
        normalized=True,
        row_fields=("ctc_hypothesis",),
    )


def run_asr(
    system: EvalSystem,
    records: list[dict[str, Any]],
    prefix: str,
    postfix: str,
    settings: AsrSettings,
    runner: BatchRunner | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Transcribe every utterance (see `decode_asr`); the per-utterance frame and its scores."""
    runner = runner or BatchRunner()
    decode_asr(system, records, prefix, postfix, settings, runner)
    df = asr_frame(records, runner.rows)
    return df, score_asr(df, settings)


# ---------------------------------------------------------------------- speech translation


def score_st(df: pd.DataFrame, settings: StSettings) -> dict[str, Any]:
    """sacreBLEU BLEU/chrF per source language and pooled; references and hypotheses normalised alike
    (`evaluate.st_normalize: both`) or the references only, as the reference's scoring (`references`).

    BLEU's tokeniser follows the target language (`evaluate.bleu_tokenize`: 13a for English, zh/ja-mecab/...
    as configured).
    """
    table = settings.bleu_tokenize
    mode = config_choice(settings.st_normalize, ST_NORMALIZE, "evaluate.st_normalize")
    hyps_too = mode == "both"
    targets = sorted(set(df.target_language)) if len(df) else []
    pooled_tokenize = bleu_tokenizer(targets[0], table) if len(targets) == 1 else table["default"]
    per_language = {}
    for lang, g in df.groupby("language", sort=True):
        target = g.target_language.iloc[0]
        per_language[lang] = {
            **translation_scores(
                list(g.reference),
                list(g.hypothesis),
                normalize=True,
                tokenize=bleu_tokenizer(target, table),
                normalize_hypotheses=hyps_too,
            ),
            "target_language": target,
        }
    return {
        "all": translation_scores(
            list(df.reference),
            list(df.hypothesis),
            normalize=True,
            tokenize=pooled_tokenize,
            normalize_hypotheses=hyps_too,
        ),
        "per_language": per_language,
        "target_languages": targets,
    }


def generate_for_records(
    system: EvalSystem,
    records: list[dict[str, Any]],
    clip: Callable[[dict[str, Any]], Clip],
    pieces: Callable[[dict[str, Any], Any], list[Any]],
    num_beams: int,
    max_new_tokens: int,
    batch_size: int,
    desc: str,
    runner: BatchRunner,
    text_turn: str = "segments",
) -> None:
    """Generate one answer per record (this shard's batches) from the prompt `pieces(record, fill)`, where
    `fill` is the system's speech vectors or text for `clip(record)`; batched by length. Rows: `hypothesis`,
    `prompt` as written, `input_text` (None when speech was the input). `text_turn`: see
    `EvalSystem.prompts`."""

    def decode(idx: list[int]) -> list[dict[str, Any]]:
        fills, _ = system.fills([clip(records[i]) for i in idx])
        built = [pieces(records[i], fill) for i, fill in zip(idx, fills, strict=True)]
        out = system.generate(system.prompts(built, text_turn), num_beams, max_new_tokens)
        return [
            {
                "hypothesis": out[j],
                "prompt": system.describe(built[j]),
                "input_text": None if system.decoder == "llm" else str(fills[j]),
            }
            for j in range(len(idx))
        ]

    batches = list(chunks_by_length([r.get("num_samples", 0) for r in records], batch_size))
    runner.run("", records, batches, decode, desc)


def last_recording_per_sentence(
    sources: list[dict[str, Any]], target_sentences: set[Any] | None
) -> list[dict[str, Any]]:
    """One recording per (language, sentence): the last in manifest order, of the sentences in
    `target_sentences` (None: of every sentence); records without a `sentence_id` are each their own sentence.

    As the reference's FLEURS ST sets (DigitalPhonetics/bloomzmms@77dc192:
    espnet-bloomzmms-files/egs2/fleurs/asr1/local/prepare_fleurs_translate.py maps each sentence id to its
    source recording, a later recording overwriting an earlier one, and keeps the ids of the target
    language's test sentences).
    """
    last: dict[tuple[str, Any], int] = {}
    for index, record in enumerate(sources):
        sentence = record.get("sentence_id")
        if sentence is None:
            last[(record["language"], ("record", index))] = index
        elif target_sentences is None or sentence in target_sentences:
            last[(record["language"], sentence)] = index
    return [sources[i] for i in sorted(last.values())]


def st_sources(
    records: list[dict[str, Any]], target_language: str, recordings: str = "all"
) -> list[dict[str, Any]]:
    """The utterances to translate, each with its `translation`: every one not in the target language
    (`recordings` "all"), or the reference's one recording per source sentence ("last_per_sentence", config
    evaluate.st_recordings), of the sentences the target language's own recordings have when the manifest
    holds any (FLEURS; a CoVoST 2 manifest has none, and each of its rows is its own sentence).

    A FLEURS recording whose sentence has no recording in the target language (`translation` null) has no
    reference: it is left out, with a warning that counts them; none left is an error."""
    config_choice(recordings, ST_RECORDINGS, "evaluate.st_recordings")
    sources = [r for r in records if r["language"] != target_language]
    if recordings == "last_per_sentence":
        targets = {r.get("sentence_id") for r in records if r["language"] == target_language} - {None}
        sources = last_recording_per_sentence(sources, targets or None)
    untranslated = [r for r in sources if r.get("translation") is None]
    wrong = [r for r in sources if r.get("translation") is not None and not isinstance(r["translation"], str)]
    if wrong:
        raise ValueError(
            f"{location(wrong[0])}: utterance {wrong[0]['id']}: translation is not a string "
            f"({type(wrong[0]['translation']).__name__})"
        )
    if untranslated and len(untranslated) == len(sources):
        raise ValueError(
            f"{location(untranslated[0])}: no utterance has a translation into {target_language} "
            f"({len(sources)} sources, e.g. {untranslated[0]['id']})"
        )
    if untranslated:
        log.warning(
            "ST into %s: %d of %d source recordings have no translation (their sentence has no %s recording) "
            "and are left out, e.g. %s (%s)",
            target_language,
            len(untranslated),
            len(sources),
            target_language,
            untranslated[0]["id"],
            location(untranslated[0]),
        )
    return [r for r in sources if r.get("translation") is not None]


def decode_st(
    system: EvalSystem,
    records: list[dict[str, Any]],
    prefix_template: str,
    postfix: str,
    target_language: str,
    settings: StSettings,
    runner: BatchRunner,
) -> None:
    """X→target: every utterance not in the target language, or one per sentence (`settings.st_recordings`;
    this shard's batches)."""
    sources = st_sources(records, target_language, settings.st_recordings)
    target_name = language_name(target_language)

    def pieces(record: dict[str, Any], fill: Any) -> list[Any]:
        language = language_name(record["language"])
        return [prefix_template.format(language=language, target=target_name), fill, postfix]

    generate_for_records(
        system,
        sources,
        _utterance_clip,
        pieces,
        settings.num_beams,
        settings.max_new_tokens,
        settings.batch_size,
        f"ST ({system.decoder})",
        runner,
    )


def st_frame(
    records: list[dict[str, Any]],
    target_language: str,
    rows: Mapping[str, dict[str, Any]],
    recordings: str = "all",
) -> pd.DataFrame:
    """Reference = each source's `translation` (FLEURS joins the English sentence with the same sentence id;
    CoVoST 2 ships it); the sources `decode_st` translated (`recordings`: config evaluate.st_recordings)."""
    sources = st_sources(records, target_language, recordings)
    return generation_frame(
        sources,
        rows,
        [r["translation"] for r in sources],
        labels={
            "language": [r["language"] for r in sources],
            "target_language": [target_language] * len(sources),
        },
        normalized=True,
    )


def run_st(
    system: EvalSystem,
    records: list[dict[str, Any]],
    prefix_template: str,
    postfix: str,
    target_language: str,
    settings: StSettings,
    runner: BatchRunner | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """X→target translation of every utterance not in the target language, and its scores."""
    runner = runner or BatchRunner()
    decode_st(system, records, prefix_template, postfix, target_language, settings, runner)
    df = st_frame(records, target_language, runner.rows, settings.st_recordings)
    return df, score_st(df, settings)


# ---------------------------------------------------------------------- classification


def parse_similarity(answer: str) -> float | None:
    """The first number in a generated STS-B answer, clipped to [0, 5]; None if there is none."""
    match = NUMBER.search(answer)
    if match is None:
        return None
    return min(max(float(match.group().replace(",", ".")), 0.0), 5.0)


def stsb_prediction(option_scores: torch.Tensor, method: str) -> float:
    """A similarity from the 26 values' log-likelihoods: the most likely value, or the expectation under their
    renormalised probabilities (config `evaluate.stsb_rank: argmax|expectation`)."""
    values = torch.tensor([float(v) for v in STSB_VALUES])
    if method == "argmax":
        return float(values[int(option_scores.argmax())])
    if method == "expectation":
        return float((option_scores.float().softmax(dim=-1) * values).sum())
    raise ValueError(
        f"unknown STS-B rank method {method!r} (config key evaluate.stsb_rank: argmax|expectation)"
    )


def _example_length(record: dict[str, Any]) -> int:
    return sum(int(f.get("num_samples", 0)) for f in record["fields"].values())


def decode_task(
    system: EvalSystem,
    records: list[dict[str, Any]],
    task: str,
    option_prefix: str,
    settings: TaskSettings,
    runner: BatchRunner,
) -> None:
    """Answer (this shard's batches of) every example of one task with the reference's prompt (each text field
    replaced by its clip); one row per example, in the group named by the task.

    `evaluate.glue_scoring`: ``rank`` picks the option with the highest log-likelihood (STS-B: the 26 values
    0.0..5.0 ranked, then `evaluate.stsb_rank`); ``constrained`` runs the reference's constrained beam search
    and maps an answer that is no option to class 0 (STS-B: beam search, the first number of the answer, 0.0
    if none).
    """
    if task not in TASK_PROMPTS:
        raise ValueError(f"no prompt for task {task!r}; expected one of {sorted(TASK_PROMPTS)}")
    prompt = TASK_PROMPTS[task]
    fields = [p.name for p in prompt.pieces if isinstance(p, Field)]
    stsb = task == "stsb"
    option_texts = list(STSB_VALUES if stsb else prompt.options)
    option_ids = [system.text_ids(option_prefix + o) for o in option_texts]
    scoring = settings.glue_scoring
    if scoring not in ("rank", "constrained"):
        raise ValueError(
            f"unknown glue_scoring {scoring!r} (config key evaluate.glue_scoring: rank|constrained)"
        )
    for rec in records:
        absent = [f for f in fields if f not in rec.get("fields", {})]
        if absent:
            raise ValueError(f"{location(rec)}: {task} example {rec.get('id')} lacks field(s) {absent}")

    def decode(idx: list[int]) -> list[dict[str, Any]]:
        chunk = [records[i] for i in idx]
        clips = [
            Clip(r["fields"][f]["audio"], r["fields"][f].get("text", ""), location(r))
            for r in chunk
            for f in fields
        ]
        fills, _ = system.fills(clips)
        per_example = [
            dict(zip(fields, fills[k * len(fields) : (k + 1) * len(fields)], strict=True))
            for k in range(len(chunk))
        ]
        pieces = [
            [fill[p.name] if isinstance(p, Field) else p for p in prompt.pieces] for fill in per_example
        ]
        segments = system.prompts(pieces)
        if scoring == "rank":
            scores = system.option_logprobs(segments, option_ids).cpu()
            best = scores.argmax(dim=-1).tolist()
            predictions = (
                [stsb_prediction(s, settings.stsb_rank) for s in scores] if stsb else [float(b) for b in best]
            )
            answers = [option_texts[b] for b in best]
            matched = [True] * len(chunk)
            option_scores = [[float(x) for x in s] for s in scores]
        elif stsb:
            answers = system.generate(segments, settings.num_beams, settings.stsb_max_new_tokens)
            parsed = [parse_similarity(a) for a in answers]
            predictions = [0.0 if p is None else p for p in parsed]
            matched = [p is not None for p in parsed]
            option_scores = [[] for _ in chunk]
        else:
            ids = [constrained_beam_search(system.llm, seg, option_ids) for seg in segments]
            answers = system.decode(ids)
            predictions = [float(match_option(a, option_texts)) for a in answers]
            matched = [find_option(a, option_texts) is not None for a in answers]
            option_scores = [[] for _ in chunk]
        return [
            {
                "id": rec["id"],
                "language": rec.get("language", "en_us"),
                "task": task,
                "prompt": system.describe(pieces[k], fields),
                "input_text": _text_input(system, list(per_example[k].values())),
                "reference": float(rec["label"]),
                "prediction": predictions[k],
                "hypothesis": answers[k],
                "matched": matched[k],
                "option_scores": option_scores[k],
                "options": option_texts,
                "scoring": scoring,
            }
            for k, rec in enumerate(chunk)
        ]

    batches = list(chunks_by_length([_example_length(r) for r in records], settings.batch_size))
    runner.run(task, records, batches, decode, f"{task} ({system.decoder}, {scoring})")


def task_frame(records: list[dict[str, Any]], task: str, rows: Mapping[str, dict[str, Any]]) -> pd.DataFrame:
    """One task's rows in record order."""
    return pd.DataFrame(take(rows, task, len(records)))


def classify_records(
    system: EvalSystem,
    records: list[dict[str, Any]],
    task: str,
    option_prefix: str,
    settings: TaskSettings,
    runner: BatchRunner | None = None,
) -> pd.DataFrame:
    """Every example of one task answered (see `decode_task`), as a frame."""
    runner = runner or BatchRunner()
    decode_task(system, records, task, option_prefix, settings, runner)
    return task_frame(records, task, runner.rows)


def _task_scores(task: str, g: pd.DataFrame) -> dict[str, Any]:
    labels = list(g.reference) if task == "stsb" else [int(x) for x in g.reference]
    preds = list(g.prediction) if task == "stsb" else [int(x) for x in g.prediction]
    scores = classification_scores(task, labels, preds)
    scores["num_unmatched"] = int(
        (~g.matched.astype(bool)).sum()
    )  # constrained: answers mapped to class 0 / 0.0
    return scores


def score_speechglue(df: pd.DataFrame, settings: TaskSettings | None = None) -> dict[str, Any]:
    """Per-task GLUE metrics, then the averages with and without WNLI."""
    per_task = {task: _task_scores(task, g) for task, g in df.groupby("task", sort=False)}
    average = glue_average(per_task)
    return {
        "per_task": per_task,
        "average": average["average"],
        "average_without_wnli": average["average_without_wnli"],
        "scoring": sorted(set(df.scoring)) if "scoring" in df else None,
    }


def decode_speechglue(
    system: EvalSystem,
    task_records: dict[str, list[dict[str, Any]]],
    option_prefix: str,
    settings: TaskSettings,
    runner: BatchRunner,
) -> None:
    for task, records in task_records.items():
        decode_task(system, records, task, option_prefix, settings, runner)


def speechglue_frame(
    task_records: dict[str, list[dict[str, Any]]], rows: Mapping[str, dict[str, Any]]
) -> pd.DataFrame:
    frames = [task_frame(records, task, rows) for task, records in task_records.items()]
    return pd.concat(frames, ignore_index=True)


def run_speechglue(
    system: EvalSystem,
    task_records: dict[str, list[dict[str, Any]]],
    option_prefix: str,
    settings: TaskSettings,
    runner: BatchRunner | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    runner = runner or BatchRunner()
    decode_speechglue(system, task_records, option_prefix, settings, runner)
    df = speechglue_frame(task_records, runner.rows)
    return df, score_speechglue(df)


def score_speechxnli(df: pd.DataFrame, settings: TaskSettings | None = None) -> dict[str, Any]:
    """Accuracy per language and its mean over languages (`all`)."""
    per_language = {lang: _task_scores("xnli", g) for lang, g in df.groupby("language", sort=True)}
    accuracies = [s["accuracy"] for s in per_language.values()]
    return {
        "per_language": per_language,
        "all": sum(accuracies) / len(accuracies) if accuracies else math.nan,
    }


def run_speechxnli(
    system: EvalSystem,
    records: list[dict[str, Any]],
    option_prefix: str,
    settings: TaskSettings,
    runner: BatchRunner | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The MNLI prompt and Yes/Maybe/No (labels 0 entailment, 1 neutral, 2 contradiction) in every
    language."""
    df = classify_records(system, records, "xnli", option_prefix, settings, runner)
    return df, score_speechxnli(df)
