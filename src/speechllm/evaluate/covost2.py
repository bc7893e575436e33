"""CoVoST 2 X→English test sets from a local release, as FLEURS-shaped utterance manifests.

Expected layout (what the CoVoST 2 instructions produce; the Common Voice 4 clips are not redistributed):

    {release_dir}/{locale}/clips/*.mp3              Common Voice release audio of that locale
    {release_dir}/{locale}/validated.tsv            Common Voice transcripts (`path`, `sentence`)
    covost_v2.{locale}_en.tsv                       CoVoST 2 translations (`path`, `translation`, `split`)

The CoVoST tsv is looked for in `{release_dir}/{locale}/`, then in `tsv_dir` (default `release_dir`).
Utterances of the `test` split are kept; the source text is the tsv's `sentence` column when present, else
Common Voice's.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import soundfile as sf

from speechllm.data.manifest import write_manifest

TARGET = "en"


class CoVoSTError(ValueError):
    """A CoVoST 2 release that cannot be read; the message names the file and what is wrong."""


def _read_tsv(path: Path, required: tuple[str, ...], whole_rows: bool = False) -> list[dict[str, str]]:
    """The rows of a tsv with the `required` columns; with `whole_rows`, a row with fewer or more fields
    than the header (its split and translation would be shifted or missing) is an error naming its line."""
    with path.open(encoding="utf-8", newline="") as fh:
        # As CoVoST's own split script reads its tsv and Common Voice's: quotes are plain characters, a
        # backslash escapes the next one (facebookresearch/covost@4cddf32:get_covost_splits.py).
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise CoVoSTError(f"{path}: missing column(s) {missing} (has {reader.fieldnames})")
        rows = []
        for row in reader:
            # DictReader fills the fields of a short row with None and puts a long row's extras under None.
            if whole_rows and (None in row or None in row.values()):
                fields = sum(len(v) if k is None else v is not None for k, v in row.items())
                raise CoVoSTError(
                    f"{path}:{reader.line_num}: {fields} tab-separated fields where the header has "
                    f"{len(reader.fieldnames or [])} (an unescaped tab, or a cut row)"
                )
            rows.append(row)
        return rows


def covost_tsv(release_dir: Path, locale: str, tsv_dir: Path | None) -> Path:
    name = f"covost_v2.{locale}_{TARGET}.tsv"
    candidates = [release_dir / locale / name, (tsv_dir or release_dir) / name]
    for path in candidates:
        if path.is_file():
            return path
    raise CoVoSTError(
        f"no {name} in {' or '.join(str(p.parent) for p in candidates)} "
        "(config keys evaluate.covost2.release_dir / tsv_dir)"
    )


def covost2_test_records(
    release_dir: Path, locale: str, tsv_dir: Path | None = None, split: str = "test"
) -> list[dict[str, Any]]:
    """FLEURS-shaped records for one source locale: id, language (the CV locale), audio, num_samples,
    sampling_rate, raw_transcription (source text), translation (English reference)."""
    tsv = covost_tsv(release_dir, locale, tsv_dir)
    rows = [
        r for r in _read_tsv(tsv, ("path", "translation", "split"), whole_rows=True) if r["split"] == split
    ]
    sentences: dict[str, str] = {}
    if rows and "sentence" not in rows[0]:
        validated = release_dir / locale / "validated.tsv"
        if not validated.is_file():
            raise CoVoSTError(f"{tsv} has no `sentence` column and {validated} is missing")
        sentences = {r["path"]: r["sentence"] for r in _read_tsv(validated, ("path", "sentence"))}
    records = []
    for row in rows:
        audio = release_dir / locale / "clips" / row["path"]
        if not audio.is_file():
            raise CoVoSTError(f"{tsv}: clip {row['path']} not found at {audio}")
        source = row["sentence"] if "sentence" in row else sentences.get(row["path"])
        if source is None:
            raise CoVoSTError(
                f"{tsv}: clip {row['path']} has no transcript in {release_dir / locale / 'validated.tsv'}"
            )
        info = sf.info(str(audio))
        records.append(
            {
                "id": f"covost2-{locale}-{Path(row['path']).stem}",
                "sentence_id": Path(row["path"]).stem,
                "language": locale,
                "audio": str(audio),
                "num_samples": info.frames,
                "sampling_rate": info.samplerate,
                "raw_transcription": source,
                "translation": row["translation"],
            }
        )
    if not records:
        raise CoVoSTError(f"{tsv}: no utterances of split {split!r}")
    return records


def build_covost2_manifest(
    release_dir: Path, locales: list[str], out: Path, tsv_dir: Path | None = None
) -> int:
    """Write the X→English test manifest for `locales`; returns the number of utterances."""
    if not release_dir.is_dir():
        raise CoVoSTError(
            f"CoVoST 2 release directory not found: {release_dir} (config key evaluate.covost2.release_dir)"
        )
    records = [rec for locale in locales for rec in covost2_test_records(release_dir, locale, tsv_dir)]
    return write_manifest(out, records)
