"""Kang & Roy's evaluations (speech-summarization.md §5): spoken-article summarization and response
perplexity.

* Summarization: the user turn is the instruction text followed by the article's speech (the reference puts
  the text prompt before the audio), e.g. "Summarize the following article in 3 sentences or less: " +
  <speech>; greedy decoding as the reference; ROUGE-1/2/L/Lsum (rouge-score), METEOR (nltk, only when its
  WordNet and Punkt data are installed locally) and BERTScore P/R/F1 (bert-score, when a scoring model is
  configured) against the reference summaries. The text and cascade baselines write the chat turn as the
  reference's `generate_text_response` (`evaluate.summarization.text_turn: reference`).
* Response perplexity on LibriSpeech test-clean / test-other: the frozen LLM's text-prompted response to each
  utterance (`llm_response`, made by `speechllm targets responses`) scored teacher-forced after the speech
  (decoder llm), the CTC transcript (cascade) or the gold transcript (text).

Manifests: one JSON object per line with `id`, `audio`, `num_samples` and the configured text fields
(`evaluate.summarization.text_field` / `reference_field`, `evaluate.response_ppl.text_field` /
`response_field`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd

from speechllm.data.manifest import location
from speechllm.evaluate.benchmarks import chunks_by_length, generate_for_records, generation_frame
from speechllm.evaluate.metrics import bertscore, meteor, perplexity, rouge_scores
from speechllm.evaluate.settings import ResponsePpl, ResponsePplSettings, Summarization, SummarizationSettings
from speechllm.evaluate.shards import BatchRunner, take
from speechllm.evaluate.system import Clip, EvalSystem


def _require(records: list[dict[str, Any]], keys: tuple[str, ...], config_key: str) -> None:
    for rec in records:
        missing = [k for k in keys if not isinstance(rec.get(k), str)]
        if missing:
            raise ValueError(
                f"{location(rec)}: record {rec.get('id')} has no text field(s) "
                f"{missing} (config key {config_key})"
            )


def score_summarization(df: pd.DataFrame, settings: SummarizationSettings) -> dict[str, Any]:
    cfg = settings.summarization
    refs, hyps = list(df.reference), list(df.hypothesis)
    return {
        "all": {
            **rouge_scores(refs, hyps, cfg.rouge_stemmer),
            **meteor(refs, hyps, cfg.meteor_tokenize),
            **bertscore(refs, hyps, cfg.bertscore),
            "num_docs": len(df),
        }
    }


def decode_summarization(
    system: EvalSystem, records: list[dict[str, Any]], settings: SummarizationSettings, runner: BatchRunner
) -> None:
    """Summarize (this shard's batches of) every spoken article with the configured instruction."""
    cfg = settings.summarization
    _require(
        records,
        (cfg.reference_field,) + ((cfg.text_field,) if system.decoder == "text" else ()),
        "evaluate.summarization.text_field/reference_field",
    )
    generate_for_records(
        system,
        records,
        lambda r: Clip(r["audio"], _article_text(r, cfg), location(r)),
        lambda _r, fill: [cfg.prompt, fill],
        cfg.num_beams,
        cfg.max_new_tokens,
        settings.batch_size,
        f"summarization ({system.decoder})",
        runner,
        cfg.text_turn,
    )


def summarization_frame(
    records: list[dict[str, Any]], rows: Mapping[str, dict[str, Any]], reference_field: str
) -> pd.DataFrame:
    """The per-document frame; `reference_field` (evaluate.summarization.reference_field) holds the
    reference."""
    return generation_frame(records, rows, [r[reference_field] for r in records])


def run_summarization(
    system: EvalSystem,
    records: list[dict[str, Any]],
    settings: SummarizationSettings,
    runner: BatchRunner | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Summarize every spoken article; the per-article frame and its scores."""
    runner = runner or BatchRunner()
    decode_summarization(system, records, settings, runner)
    df = summarization_frame(records, runner.rows, settings.summarization.reference_field)
    return df, score_summarization(df, settings)


def _article_text(record: dict[str, Any], cfg: Summarization | ResponsePpl) -> str:
    text = record.get(cfg.text_field, "")
    return text.lower() if cfg.lowercase_text and isinstance(text, str) else text


def score_response_ppl(df: pd.DataFrame, settings: ResponsePplSettings | None = None) -> dict[str, Any]:
    """Perplexity per LibriSpeech subset and over all utterances."""
    per_subset = {
        subset: perplexity(list(g.nll), list(g.num_tokens)) for subset, g in df.groupby("subset", sort=True)
    }
    return {"per_subset": per_subset, "all": perplexity(list(df.nll), list(df.num_tokens))}


def decode_response_ppl(
    system: EvalSystem, records: list[dict[str, Any]], settings: ResponsePplSettings, runner: BatchRunner
) -> None:
    """Teacher-forced NLL of each utterance's LLM response after its speech / transcript in the chat turn
    (this shard's batches). Utterances are grouped by their `subset` (LibriSpeech `test.clean` /
    `test.other`)."""
    cfg = settings.response_ppl
    _require(
        records,
        (cfg.response_field,) + ((cfg.text_field,) if system.decoder == "text" else ()),
        "evaluate.response_ppl.text_field/response_field",
    )

    def decode(idx: list[int]) -> list[dict[str, Any]]:
        chunk = [records[i] for i in idx]
        fills, _ = system.fills([Clip(r["audio"], _article_text(r, cfg), location(r)) for r in chunk])
        targets = [system.text_ids(r[cfg.response_field]) for r in chunk]
        nll, counts = system.response_nll(system.prompts([[f] for f in fills]), targets, cfg.append_eos)
        return [
            {
                "id": rec["id"],
                "subset": rec.get("subset", "all"),
                "prompt": system.describe([fill]),
                "input_text": None if system.decoder == "llm" else str(fill),
                "response": rec[cfg.response_field],
                "nll": loss,
                "num_tokens": count,
            }
            for rec, fill, loss, count in zip(chunk, fills, nll, counts, strict=True)
        ]

    batches = list(chunks_by_length([r.get("num_samples", 0) for r in records], settings.batch_size))
    runner.run("", records, batches, decode, f"response ppl ({system.decoder})")


def response_ppl_frame(records: list[dict[str, Any]], rows: Mapping[str, dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(take(rows, "", len(records)))


def run_response_ppl(
    system: EvalSystem,
    records: list[dict[str, Any]],
    settings: ResponsePplSettings,
    runner: BatchRunner | None = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Response perplexity of every utterance (see `decode_response_ppl`); the frame and its scores."""
    runner = runner or BatchRunner()
    decode_response_ppl(system, records, settings, runner)
    df = response_ppl_frame(records, runner.rows)
    return df, score_response_ppl(df)
