"""Manifests: JSON Lines, one utterance (or example) per line — the single format data flows through.

An utterance line (FLEURS-shaped) holds at least:
  id, sentence_id (joins parallel sentences across languages, FLEURS `id`), language, audio (path),
  num_samples, sampling_rate, raw_transcription, transcription (normalised), translation (English);
optional: speed (perturbation factor; audio is perturbed when loaded), prefix/postfix/target (CE targets).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import soundfile as sf

from speechllm.io import atomic_write_text

UTTERANCE_FIELDS = ("id", "language", "audio", "num_samples", "sampling_rate", "raw_transcription")


class ManifestError(ValueError):
    """A malformed manifest line; the message names the file and line."""


def iter_manifest(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record) for each non-empty line of a JSON Lines manifest."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ManifestError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise ManifestError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, record


def read_manifest(path: str | Path, required: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Read all records, checking `required` keys; records get `_line` and `_manifest` for error messages."""
    records = []
    required = tuple(required)
    for lineno, record in iter_manifest(path):
        missing = [key for key in required if key not in record]
        if missing:
            raise ManifestError(f"{path}:{lineno}: missing field(s) {', '.join(missing)}")
        record["_line"] = lineno
        record["_manifest"] = str(path)
        records.append(record)
    return records


def location(record: dict[str, Any], manifest: str | None = None) -> str | None:
    """`<manifest>:<line>` of a record read by `read_manifest` (errors name it); `manifest line N` for a
    record that knows only its line; `<manifest>:?` for one that knows only the manifest (its own or
    `manifest`); None for others."""
    path = record.get("_manifest") or manifest or None
    line = record.get("_line")
    if line is None:
        return f"{path}:?" if path else None
    return f"{path}:{line}" if path else f"manifest line {line}"


def whole_number(record: dict[str, Any], key: str, least: int) -> int:
    """`record[key]` if it is a whole number of at least `least`, else ManifestError naming the record's
    manifest line (`location`) and the field."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        where = location(record)
        raise ManifestError(f"{where}: field {key} must be a whole number >= {least}, got {value!r}")
    return value


def write_manifest(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Write records atomically (temp file + rename); private `_`-keys are dropped. Returns the count."""
    lines = []
    for record in records:
        clean = {k: v for k, v in record.items() if not k.startswith("_")}
        lines.append(json.dumps(clean, ensure_ascii=False))
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


def duration_seconds(record: dict[str, Any]) -> float:
    """Duration after speed perturbation."""
    return record["num_samples"] / record["sampling_rate"] / record.get("speed", 1.0)


def spoken_example(
    task: str,
    ex_id: str,
    language: str,
    fields: dict[str, Path],
    texts: dict[str, str],
    label: Any,
    sampling_rate: int,
) -> dict[str, Any]:
    """An example line (SpeechGLUE/SpeechXNLI-shaped): every field's text with its voiced clip."""
    return {
        "id": ex_id,
        "task": task,
        "language": language,
        "label": label,
        "sampling_rate": sampling_rate,
        "fields": {
            name: {"text": texts[name], "audio": str(path), "num_samples": sf.info(str(path)).frames}
            for name, path in fields.items()
        },
    }
