"""Benchmarks: FLEURS-shaped ASR and X→English ST, SpeechGLUE- and SpeechXNLI-shaped classification.

Each writes per-utterance outputs (Parquet; every score recomputable without decoding) and a score file.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

from speechllm.data.languages import language_name
from speechllm.evaluate.decode import ctc_transcribe, encode_speech, length_sorted_chunks, llm_generate
from speechllm.evaluate.metrics import asr_scores, classification_scores, glue_average, translation_scores
from speechllm.evaluate.prompts import TASK_PROMPTS, Field
from speechllm.models.bloomzmms import BloomzMMS
from speechllm.text.normalize import basic_normalize


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


def transcribe_records(model: BloomzMMS, tokenizer: Any, records: list[dict[str, Any]], decoder: str,
                       prompts: list[tuple[str, str]], settings: dict[str, Any], sampling_rate: int,
                       device: torch.device, desc: str) -> list[str]:
    """Hypotheses for `records` (CTC greedy, or LLM beam search with a (prefix, postfix) per record)."""
    hyps = [""] * len(records)
    chunks = list(length_sorted_chunks(records, "num_samples", settings["batch_size"]))
    for idx in tqdm(chunks, desc=desc, mininterval=10):
        paths = [records[i]["audio"] for i in idx]
        lines = [records[i].get("_line") for i in idx]
        if decoder == "ctc":
            out = ctc_transcribe(model, tokenizer, paths, sampling_rate, lines, device)
        else:
            speech, _ = encode_speech(model, paths, sampling_rate, lines, device)
            segments = [[_ids(tokenizer, prompts[i][0]), s, _ids(tokenizer, prompts[i][1])]
                        for i, s in zip(idx, speech, strict=True)]
            out = llm_generate(model, tokenizer, segments, settings["num_beams"], settings["max_new_tokens"])
        for i, text in zip(idx, out, strict=True):
            hyps[i] = text
    return hyps


def run_asr(model: BloomzMMS, tokenizer: Any, records: list[dict[str, Any]], decoder: str,
            prefix: str, postfix: str, settings: dict[str, Any], sampling_rate: int,
            device: torch.device) -> tuple[pd.DataFrame, dict[str, Any]]:
    prompts = [(prefix, postfix)] * len(records)
    hyps = transcribe_records(model, tokenizer, records, decoder, prompts, settings, sampling_rate, device,
                              f"ASR ({decoder})")
    rows = pd.DataFrame({
        "id": [r["id"] for r in records], "language": [r["language"] for r in records],
        "prompt": [f"{prefix}<speech>{postfix}" if decoder == "llm" else "<ctc>"] * len(records),
        "reference": [r["raw_transcription"] for r in records], "hypothesis": hyps,
        "reference_normalized": [basic_normalize(r["raw_transcription"]) for r in records],
        "hypothesis_normalized": [basic_normalize(h) for h in hyps],
    })
    per_language = {lang: asr_scores(list(g.reference), list(g.hypothesis)) for lang, g in rows.groupby("language")}
    metrics = {"all": asr_scores(list(rows.reference), list(rows.hypothesis)), "per_language": per_language}
    return rows, metrics


def run_st(model: BloomzMMS, tokenizer: Any, records: list[dict[str, Any]], prefix_template: str, postfix: str,
           target_language: str, settings: dict[str, Any], sampling_rate: int,
           device: torch.device) -> tuple[pd.DataFrame, dict[str, Any]]:
    """X→English: every non-English utterance, reference = the English sentence with the same sentence id."""
    sources = [r for r in records if r["language"] != target_language]
    prompts = [(prefix_template.format(language=language_name(r["language"])), postfix) for r in sources]
    hyps = transcribe_records(model, tokenizer, sources, "llm", prompts, settings, sampling_rate, device, "ST")
    rows = pd.DataFrame({
        "id": [r["id"] for r in sources], "language": [r["language"] for r in sources],
        "prompt": [p + "<speech>" + q for p, q in prompts],
        "reference": [r["translation"] for r in sources], "hypothesis": hyps,
        "reference_normalized": [basic_normalize(r["translation"]) for r in sources],
        "hypothesis_normalized": [basic_normalize(h) for h in hyps],
    })
    per_language = {lang: translation_scores(list(g.reference), list(g.hypothesis), normalize=True)
                    for lang, g in rows.groupby("language")}
    metrics = {"all": translation_scores(list(rows.reference), list(rows.hypothesis), normalize=True),
               "per_language": per_language}
    return rows, metrics


@torch.no_grad()
def classify_records(model: BloomzMMS, tokenizer: Any, records: list[dict[str, Any]], task: str,
                     option_prefix: str, settings: dict[str, Any], sampling_rate: int,
                     device: torch.device) -> pd.DataFrame:
    """Rank classification: the option with the highest log-likelihood after the spoken prompt."""
    prompt = TASK_PROMPTS[task]
    options = [_ids(tokenizer, option_prefix + o) for o in prompt.options]
    out_rows = []
    for start in tqdm(range(0, len(records), settings["batch_size"]), desc=f"{task}", mininterval=10):
        chunk = records[start: start + settings["batch_size"]]
        fields = [f.name for f in prompt.pieces if isinstance(f, Field)]
        paths = [r["fields"][f]["audio"] for r in chunk for f in fields]
        lines = [r.get("_line") for r in chunk for _ in fields]
        speech, _ = encode_speech(model, paths, sampling_rate, lines, device)
        segments = []
        for i, _rec in enumerate(chunk):
            clip = dict(zip(fields, speech[i * len(fields): (i + 1) * len(fields)], strict=True))
            segments.append([clip[p.name] if isinstance(p, Field) else _ids(tokenizer, p) for p in prompt.pieces])
        scores = model.llm.option_logprobs(segments, options).cpu()
        for rec, row_scores in zip(chunk, scores, strict=True):
            out_rows.append({
                "id": rec["id"], "language": rec["language"], "task": task,
                "prompt": "".join(p if isinstance(p, str) else f"<speech:{p.name}>" for p in prompt.pieces),
                "reference": int(rec["label"]), "prediction": int(row_scores.argmax()),
                "option_scores": [float(x) for x in row_scores], "options": list(prompt.options),
            })
    return pd.DataFrame(out_rows)


def run_speechglue(model: BloomzMMS, tokenizer: Any, task_records: dict[str, list[dict[str, Any]]],
                   option_prefix: str, settings: dict[str, Any], sampling_rate: int,
                   device: torch.device) -> tuple[pd.DataFrame, dict[str, Any]]:
    frames, per_task = [], {}
    for task, records in task_records.items():
        df = classify_records(model, tokenizer, records, task, option_prefix, settings, sampling_rate, device)
        per_task[task] = classification_scores(task, list(df.reference), list(df.prediction))
        frames.append(df)
    avg = glue_average(per_task)
    return pd.concat(frames, ignore_index=True), {"per_task": per_task, "average": avg["average"],
                                                   "average_without_wnli": avg["average_without_wnli"]}


def run_speechxnli(model: BloomzMMS, tokenizer: Any, records: list[dict[str, Any]], option_prefix: str,
                   settings: dict[str, Any], sampling_rate: int,
                   device: torch.device) -> tuple[pd.DataFrame, dict[str, Any]]:
    df = classify_records(model, tokenizer, records, "xnli", option_prefix, settings, sampling_rate, device)
    per_language: dict[str, Any] = defaultdict(dict)
    for lang, g in df.groupby("language"):
        per_language[lang] = classification_scores("xnli", list(g.reference), list(g.prediction))
    mean = sum(s["accuracy"] for s in per_language.values()) / max(len(per_language), 1)
    return df, {"per_language": dict(per_language), "all": mean}
