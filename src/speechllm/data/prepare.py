"""Prepare a split: check every clip, normalise text, add speed-perturbed copies, drop copies by duration.

Bad audio or an empty transcript stops with the file and manifest line named, or, with
`on_bad_audio: skip`, is dropped and counted in the data report. Nothing is dropped silently.

The duration filter runs after speed perturbation, on each copy's own length, as ESPnet's asr.sh stage 4
filters `train_*_sp` (espnet v.202304 egs2/TEMPLATE/asr1/asr.sh, run by the reference with
`--max_wav_duration 30`): a clip of 28 s keeps its 1.0 and 1.1 copies and loses its 0.9 copy (31.1 s).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from speechllm.audio import AudioError, load_audio, perturbed_length
from speechllm.data.manifest import (
    UTTERANCE_FIELDS,
    ManifestError,
    location,
    read_manifest,
    whole_number,
    write_manifest,
)
from speechllm.io import atomic_write_text
from speechllm.text.normalize import basic_normalize, normalizer_version


def check_fields(record: dict[str, Any]) -> None:
    """ManifestError naming the record's manifest line for a field of the wrong type: a text or audio path
    that is not a string, a length or rate that is not a whole number (the rate above zero)."""
    for key in ("audio", "raw_transcription"):
        if not isinstance(record[key], str):
            raise ManifestError(f"{location(record)}: field {key} must be a string, got {record[key]!r}")
    whole_number(record, "num_samples", 0)
    whole_number(record, "sampling_rate", 1)


def check_record(record: dict[str, Any], manifest: Path, sampling_rate: int) -> None:
    """Raise AudioError naming the file and line if the audio or transcript is unusable."""
    where = f"{manifest}:{record.get('_line')}"
    if not str(record.get("raw_transcription", "")).strip():
        raise AudioError(f"empty transcript for {record['id']} ({where})")
    wav = load_audio(record["audio"], sampling_rate, line=where)
    if wav.shape[0] != record["num_samples"] and record.get("sampling_rate") == sampling_rate:
        # A truncated file: the header or the manifest promised more samples than are there.
        raise AudioError(
            f"audio has {wav.shape[0]} samples, manifest says {record['num_samples']}: "
            f"{record['audio']} ({where})"
        )


def prepare_split(
    manifest: Path,
    out: Path,
    report_path: Path,
    sampling_rate: int,
    min_duration: float,
    max_duration: float,
    speed_factors: list[float],
    on_bad_audio: str,
    *,
    filter_durations: bool,
) -> dict[str, Any]:
    """Write the prepared manifest `out` and the data report `report_path`; returns the report.
    `filter_durations: false` keeps every copy (config data.filter_test_durations for the test split)."""
    records = read_manifest(manifest, required=UTTERANCE_FIELDS)
    for record in records:  # a malformed line is an error even with on_bad_audio: skip (it is not bad audio)
        check_fields(record)
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
        # The reference's transcripts pass through Kaldi `text` files, read back stripped (DigitalPhonetics/
        # bloomzmms@77dc192:data/synthetic-targets/make_labels.py, prepare_data.py): the prompts and targets
        # built from them never carry surrounding whitespace.
        record["raw_transcription"] = record["raw_transcription"].strip()
        record["transcription"] = basic_normalize(record["raw_transcription"])
        # Clips are resampled on load; num_samples is stated at the pipeline rate.
        record["num_samples"] = round(record["num_samples"] * sampling_rate / record["sampling_rate"])
        record["sampling_rate"] = sampling_rate
        kept.append(record)
    out_records = speed_perturbed_copies(kept, speed_factors, sampling_rate)
    dropped: dict[str, Counter[str]] = {}
    if filter_durations:
        out_records, dropped = filter_by_duration(out_records, sampling_rate, min_duration, max_duration)
        for reasons in dropped.values():
            counts.update(reasons)
    counts["kept"] = len({r.get("_source", r["id"]) for r in out_records})  # utterances with a copy left
    counts["output"] = len(out_records)
    write_manifest(out, out_records)
    report = {
        "manifest": str(manifest),
        "counts": dict(counts),
        "skipped": skipped,
        "min_duration": min_duration,
        "max_duration": max_duration,
        "speed_factors": speed_factors,
        "filter_durations": filter_durations,
        "dropped_per_speed": {factor: dict(reasons) for factor, reasons in dropped.items()},
        "hours": sum(perturbed_samples(r) for r in out_records) / sampling_rate / 3600,
        "normalizer": normalizer_version(),
    }
    atomic_write_text(report_path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report


def speed_perturbed_copies(
    records: list[dict[str, Any]], speed_factors: list[float], sampling_rate: int
) -> list[dict[str, Any]]:
    """One copy of every record per factor, factor by factor; a copy other than 1.0 is `sp<f>-<id>` (ESPnet's
    naming) with its `speed` and perturbed length; `_source` (not written) is the utterance it was made
    from."""
    copies = []
    for factor in speed_factors:
        for record in records:
            rec = dict(record)
            if factor != 1.0:
                rec["id"] = f"sp{factor}-{record['id']}"
                rec["_source"] = record["id"]
                rec["speed"] = factor
                rec["num_samples_perturbed"] = perturbed_length(record["num_samples"], factor, sampling_rate)
            copies.append(rec)
    return copies


def perturbed_samples(record: dict[str, Any]) -> int:
    """A prepared record's length in samples after its speed perturbation."""
    return record.get("num_samples_perturbed", record["num_samples"])


def duration_verdict(
    num_samples: int, sampling_rate: int, min_duration: float, max_duration: float
) -> str | None:
    """Why a clip of `num_samples` is dropped ("too_short" / "too_long"), or None if kept. As ESPnet asr.sh
    stage 4, a clip is kept when int(min_duration * fs) < samples < int(max_duration * fs) (both
    exclusive)."""
    if num_samples <= int(min_duration * sampling_rate):
        return "too_short"
    if num_samples >= int(max_duration * sampling_rate):
        return "too_long"
    return None


def filter_by_duration(
    copies: list[dict[str, Any]], sampling_rate: int, min_duration: float, max_duration: float
) -> tuple[list[dict[str, Any]], dict[str, Counter[str]]]:
    """The copies whose own (perturbed) length passes `duration_verdict`, and per speed factor how many were
    dropped as too short / too long."""
    kept: list[dict[str, Any]] = []
    dropped: dict[str, Counter[str]] = {}
    for rec in copies:
        verdict = duration_verdict(perturbed_samples(rec), sampling_rate, min_duration, max_duration)
        if verdict is None:
            kept.append(rec)
        else:
            dropped.setdefault(str(rec.get("speed", 1.0)), Counter())[verdict] += 1
    return kept, dropped


def language_ids(manifests: list[Path], out: Path) -> dict[str, int]:
    """LID labels: 1 + index in the sorted list of language names present in `manifests` (the training and dev
    sets, as the reference's gen_lang_id.py); 0 is the CTC blank. An unknown code names its manifest line."""
    from speechllm.data.languages import language_name_at

    names = {
        language_name_at(r["language"], location(r, str(path)) or str(path))
        for path in manifests
        for r in read_manifest(path, required=("language",))
    }
    mapping = {name: i + 1 for i, name in enumerate(sorted(names))}
    atomic_write_text(out, json.dumps(mapping, indent=2, ensure_ascii=False) + "\n")
    return mapping
