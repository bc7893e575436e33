"""Prepare a split: check every clip, normalise text, drop by duration, add speed-perturbed copies.

Bad audio or an empty transcript stops with the file and manifest line named, or, with
`on_bad_audio: skip`, is dropped and counted in the data report. Nothing is dropped silently.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from speechllm.audio import AudioError, load_audio, perturbed_length
from speechllm.data.manifest import UTTERANCE_FIELDS, read_manifest, write_manifest
from speechllm.io import atomic_write_text
from speechllm.text.normalize import basic_normalize, normalizer_version


def check_record(record: dict[str, Any], manifest: Path, sampling_rate: int) -> None:
    """Raise AudioError naming the file and line if the audio or transcript is unusable."""
    where = f"{manifest}:{record.get('_line')}"
    if not str(record.get("raw_transcription", "")).strip():
        raise AudioError(f"empty transcript for {record['id']} ({where})")
    wav = load_audio(record["audio"], sampling_rate, line=where)
    if wav.shape[0] != record["num_samples"] and record.get("sampling_rate") == sampling_rate:
        # A truncated file: the header or the manifest promised more samples than are there.
        raise AudioError(f"audio has {wav.shape[0]} samples, manifest says {record['num_samples']}: "
                         f"{record['audio']} ({where})")


def prepare_split(
    manifest: Path, out: Path, report_path: Path, sampling_rate: int, min_duration: float, max_duration: float,
    speed_factors: list[float], on_bad_audio: str,
) -> dict[str, Any]:
    records = read_manifest(manifest, required=UTTERANCE_FIELDS)
    counts: Counter[str] = Counter(input=len(records))
    skipped: list[dict[str, Any]] = []
    kept = []
    for record in records:
        try:
            check_record(record, manifest, sampling_rate)
        except AudioError as err:
            if on_bad_audio != "skip":
                raise
            counts["bad"] += 1
            skipped.append({"id": record["id"], "line": record["_line"], "reason": str(err)})
            continue
        seconds = record["num_samples"] / record["sampling_rate"]
        if seconds < min_duration:
            counts["too_short"] += 1
            continue
        if seconds > max_duration:
            counts["too_long"] += 1
            continue
        record["transcription"] = basic_normalize(record["raw_transcription"])
        # Clips are resampled on load; num_samples is stated at the pipeline rate.
        record["num_samples"] = round(record["num_samples"] * sampling_rate / record["sampling_rate"])
        record["sampling_rate"] = sampling_rate
        kept.append(record)
    out_records = []
    for factor in speed_factors:
        for record in kept:
            rec = dict(record)
            if factor != 1.0:
                rec["id"] = f"sp{factor}-{record['id']}"
                rec["speed"] = factor
                rec["num_samples_perturbed"] = perturbed_length(record["num_samples"], factor, sampling_rate)
            out_records.append(rec)
    counts["kept"] = len(kept)
    counts["output"] = len(out_records)
    write_manifest(out, out_records)
    report = {
        "manifest": str(manifest), "counts": dict(counts), "skipped": skipped,
        "min_duration": min_duration, "max_duration": max_duration, "speed_factors": speed_factors,
        "hours": sum(r["num_samples"] / sampling_rate / r.get("speed", 1.0) for r in out_records) / 3600,
        "normalizer": normalizer_version(),
    }
    atomic_write_text(report_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def language_ids(train_manifest: Path, out: Path) -> dict[str, int]:
    """LID labels: 1 + index in the sorted list of language names present (0 is the CTC blank)."""
    from speechllm.data.languages import language_name

    langs = sorted({language_name(r["language"]) for r in read_manifest(train_manifest, required=("language",))})
    mapping = {name: i + 1 for i, name in enumerate(langs)}
    atomic_write_text(out, json.dumps(mapping, indent=2, ensure_ascii=False) + "\n")
    return mapping
