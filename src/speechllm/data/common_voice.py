"""Common Voice 12 subsample from a local release directory (`cv-corpus-12.0-*/<locale>/train.tsv` +
`clips/`).

Two ways to pick the utterances (spec bloomzmms.md §4.1):
- the published utterance list (`cv12_train_utts.lst[.gz]`, zenodo 10900287): exactly the paper's selection;
- the reference's text-diverse round robin (`data/subsample-common-voice/cv12_sample.py`): one random stream
  seeded once (seed 1) runs over the languages in turn; per language the train utterances are grouped by
  sentence, the sentences shuffled, then each sentence's utterances shuffled (in the shuffled sentence order),
  and utterances are taken one per sentence per round, sentences in their shuffled order, until the running
  duration first exceeds the budget (that utterance included) or nothing is left.
  Durations come from a durations TSV (`cv12_durations.tsv[.gz]`: `<clip file>\\t<seconds>`) if given, else
  from soundfile's header of each clip. With the durations TSV the languages run in the order they first
  appear in it, as in the reference (so its published list is reproduced); without it, in sorted locale order.

Clips are read in place (mp3; soundfile decodes them). Utterance ids are the clip names without extension
(`common_voice_fr_17299458`), `language` is the CV locale (mapped to its LID name by languages.py).
"""

from __future__ import annotations

import gzip
import random
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import soundfile as sf

from speechllm.audio import AudioError
from speechllm.data.hub import SourceError, write_report
from speechllm.data.languages import cv_language_name
from speechllm.data.manifest import write_manifest

TRAIN_TSV_COLUMNS = ("client_id", "path", "sentence")


@dataclass(frozen=True)
class Clip:
    """One row of a locale's train.tsv."""

    file: str  # file name under clips/, e.g. common_voice_fr_17299458.mp3
    sentence: str  # the prompt text, untouched
    speaker: str  # client_id
    locale: str
    line: int  # line number in train.tsv

    @property
    def uid(self) -> str:
        return self.file.rsplit(".", 1)[0]


def open_text(path: Path) -> TextIO:
    """A text file, gzip-compressed if its name ends in .gz (the zenodo files are)."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def locale_of(clip_name: str, where: str) -> str:
    """The locale in a CV clip name `common_voice_<locale>_<n>[.mp3]` (as the reference splits it)."""
    parts = clip_name.split("_")
    if len(parts) < 4 or parts[:2] != ["common", "voice"]:
        raise SourceError(f"not a Common Voice clip name: {clip_name!r} ({where})")
    return parts[2]


def find_release_root(release_dir: Path) -> Path:
    """The `cv-corpus-*` directory: `release_dir` itself or its only `cv-corpus-*` child."""
    if not release_dir.is_dir():
        raise SourceError(
            f"Common Voice release directory not found: {release_dir} "
            "(config key data.common_voice.release_dir)"
        )
    if any(release_dir.glob("*/train.tsv")):
        return release_dir
    children = sorted(p for p in release_dir.glob("cv-corpus-*") if p.is_dir())
    if len(children) == 1 and any(children[0].glob("*/train.tsv")):
        return children[0]
    raise SourceError(f"no <locale>/train.tsv under {release_dir} (config key data.common_voice.release_dir)")


def read_train_tsv(root: Path, locale: str) -> list[Clip]:
    """A locale's train.tsv in Common Voice's column layout (client_id, path, sentence, up_votes, ...)."""
    path = root / locale / "train.tsv"
    if not path.is_file():
        raise SourceError(f"Common Voice train list not found: {path}")
    clips = []
    with path.open(encoding="utf-8") as fh:
        header = fh.readline().rstrip("\r\n").split("\t")
        missing = [c for c in TRAIN_TSV_COLUMNS if c not in header]
        if missing:
            raise SourceError(f"{path}:1: header lacks column(s) {', '.join(missing)}")
        col = {c: header.index(c) for c in TRAIN_TSV_COLUMNS}
        width = max(col.values()) + 1
        for lineno, line in enumerate(fh, start=2):
            if not line.strip():
                continue
            parts = line.strip().split("\t")  # whitespace-stripped line, as the reference reads it
            if len(parts) < width:
                raise SourceError(f"{path}:{lineno}: expected at least {width} tab-separated columns")
            clips.append(
                Clip(
                    file=parts[col["path"]],
                    sentence=parts[col["sentence"]],
                    speaker=parts[col["client_id"]],
                    locale=locale,
                    line=lineno,
                )
            )
    return clips


def read_durations(path: Path) -> tuple[dict[str, float], list[str]]:
    """`<clip file>\\t<seconds>` lines -> (durations by clip file, locales in order of first appearance)."""
    if not path.is_file():
        raise SourceError(f"durations file not found: {path} (config key data.common_voice.durations)")
    durations: dict[str, float] = {}
    locales: dict[str, None] = {}
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                name, seconds = line.strip().split("\t")
                durations[name] = float(seconds)
            except ValueError as err:
                raise SourceError(f"{path}:{lineno}: expected <clip file><TAB><seconds>") from err
            locales.setdefault(locale_of(name, f"{path}:{lineno}"), None)
    return durations, list(locales)


def read_utterance_list(path: Path) -> dict[str, set[str]]:
    """The published list (one clip id per line) grouped by locale."""
    if not path.is_file():
        raise SourceError(f"utterance list not found: {path} (config key data.common_voice.utterance_list)")
    by_locale: dict[str, set[str]] = {}
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            uid = line.strip()
            if uid:
                by_locale.setdefault(locale_of(uid, f"{path}:{lineno}"), set()).add(uid)
    return by_locale


def round_robin_order(clips: list[Clip], rng: random.Random) -> list[Clip]:
    """Every clip, in the reference's text-diverse order: rounds of one clip per sentence.

    Random draws happen in the reference's order (sentences shuffled first, then each sentence's clips in the
    shuffled sentence order), so the same `rng` state gives the same order."""
    by_sentence: dict[str, list[Clip]] = {}
    for clip in clips:
        by_sentence.setdefault(clip.sentence, []).append(clip)
    sentences = list(by_sentence)
    rng.shuffle(sentences)
    for sentence in sentences:
        rng.shuffle(by_sentence[sentence])
    queues = [by_sentence[s] for s in sentences]
    rounds = max((len(q) for q in queues), default=0)
    return [q[r] for r in range(rounds) for q in queues if r < len(q)]


def take_budget(
    order: list[Clip], duration_of: Callable[[list[Clip]], list[float]], max_seconds: float, chunk: int = 256
) -> list[Clip]:
    """The shortest prefix of `order` whose duration exceeds `max_seconds` (all of it if it never does).
    Durations are asked for a chunk at a time, so only about as many clips as are kept get probed."""
    total = 0.0
    for start in range(0, len(order), chunk):
        block = order[start : start + chunk]
        for k, seconds in enumerate(duration_of(block)):
            total += seconds
            if total > max_seconds:
                return order[: start + k + 1]
    return order


class ClipProber:
    """soundfile header info of clips, probed in parallel and cached (also gives the manifest's
    num_samples)."""

    def __init__(self, root: Path, threads: int, on_bad_audio: str = "error") -> None:
        self.root = root
        self.threads = max(1, threads)
        self.on_bad_audio = on_bad_audio
        self.info: dict[str, sf._SoundFileInfo | AudioError] = {}

    def path(self, clip: Clip) -> Path:
        return self.root / clip.locale / "clips" / clip.file

    def _probe(self, clip: Clip) -> sf._SoundFileInfo | AudioError:
        path = self.path(clip)
        where = f"{path} ({self.root / clip.locale / 'train.tsv'} line {clip.line})"
        if not path.is_file():
            return AudioError(f"audio file not found: {where}")
        try:
            info = sf.info(str(path))
        except Exception as err:  # soundfile raises several types for broken/non-audio files
            return AudioError(f"cannot read audio {where}: {err}")
        if info.frames == 0:
            return AudioError(f"empty audio (0 samples): {where}")
        return info

    def probe(self, clips: Iterable[Clip]) -> None:
        todo = [c for c in clips if c.file not in self.info]
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            for clip, result in zip(todo, pool.map(self._probe, todo), strict=True):
                self.info[clip.file] = result

    def seconds(self, clips: list[Clip]) -> list[float]:
        """Durations for the round robin. An unreadable clip stops it, or with `on_bad_audio: skip` counts as
        0 s here and is listed as skipped when the manifest is written."""
        self.probe(clips)
        out = []
        for clip in clips:
            info = self.info[clip.file]
            if isinstance(info, AudioError):
                if self.on_bad_audio != "skip":
                    raise info
                out.append(0.0)
            else:
                out.append(info.frames / info.samplerate)
        return out


def known_durations(durations: dict[str, float], source: Path) -> Callable[[list[Clip]], list[float]]:
    def seconds(clips: list[Clip]) -> list[float]:
        missing = [c.file for c in clips if c.file not in durations]
        if missing:
            raise SourceError(f"{source}: no duration for {missing[0]} (and {len(missing) - 1} more)")
        return [durations[c.file] for c in clips]

    return seconds


def select_round_robin(
    root: Path, max_seconds: float, seed: int, prober: ClipProber, durations_path: Path | None
) -> list[Clip]:
    """The reference's per-language subsample, one rng over all languages in the reference's order."""
    if durations_path is not None:
        durations, locales = read_durations(durations_path)
        duration_of = known_durations(durations, durations_path)
    else:
        locales = sorted(p.parent.name for p in root.glob("*/train.tsv"))
        duration_of = prober.seconds
    rng = random.Random(seed)
    chosen: list[Clip] = []
    for locale in locales:
        order = round_robin_order(read_train_tsv(root, locale), rng)
        chosen += take_budget(order, duration_of, max_seconds)
    return chosen


def select_listed(root: Path, list_path: Path) -> list[Clip]:
    """The clips named in the published list, in train.tsv order; a listed clip not found is an error."""
    chosen: list[Clip] = []
    for locale, wanted in read_utterance_list(list_path).items():
        found = [c for c in read_train_tsv(root, locale) if c.uid in wanted]
        missing = wanted - {c.uid for c in found}
        if missing:
            raise SourceError(
                f"{len(missing)} utterance(s) of {list_path} not in {root / locale / 'train.tsv'}, "
                f"e.g. {sorted(missing)[0]}"
            )
        chosen += found
    return chosen


def build_common_voice(
    out_dir: Path,
    release_dir: Path,
    max_hours_per_language: float,
    seed: int,
    utterance_list: Path | None = None,
    durations: Path | None = None,
    on_bad_audio: str = "error",
    threads: int = 1,
) -> dict[str, Any]:
    """Write `out_dir/train.jsonl` (FLEURS-shaped utterance records) and `out_dir/report.json`.

    A selected clip soundfile cannot read stops the build naming the file and its train.tsv line, or with
    `on_bad_audio: skip` is left out and listed in the report (never silently)."""
    root = find_release_root(release_dir)
    prober = ClipProber(root, threads, on_bad_audio)
    if utterance_list is not None:
        mode = "utterance_list"
        chosen = select_listed(root, utterance_list)
    else:
        mode = "round_robin"
        chosen = select_round_robin(root, max_hours_per_language * 3600.0, seed, prober, durations)
    for locale in dict.fromkeys(c.locale for c in chosen):
        try:  # fail now, naming the locale, rather than at the language-ID step
            cv_language_name(locale)
        except KeyError as err:
            raise SourceError(err.args[0]) from err
    prober.probe(chosen)
    records, skipped = [], []
    per_language: dict[str, dict[str, float]] = {}
    for clip in chosen:
        info = prober.info[clip.file]
        if isinstance(info, AudioError):
            if on_bad_audio != "skip":
                raise info
            skipped.append({"id": clip.uid, "reason": str(info)})
            continue
        records.append(
            {
                "id": clip.uid,
                "language": clip.locale,
                "corpus": "common_voice",
                "audio": str(prober.path(clip)),
                "num_samples": info.frames,
                "sampling_rate": info.samplerate,
                "raw_transcription": clip.sentence,
                "speaker": clip.speaker,
            }
        )
        stats = per_language.setdefault(clip.locale, {"utterances": 0, "hours": 0.0})
        stats["utterances"] += 1
        stats["hours"] += info.frames / info.samplerate / 3600.0
    write_manifest(out_dir / "train.jsonl", records)
    report = {
        "release": str(root),
        "mode": mode,
        "seed": seed,
        "max_hours_per_language": max_hours_per_language,
        "utterance_list": str(utterance_list) if utterance_list else None,
        "durations": str(durations) if durations else None,
        "utterances": len(records),
        "languages": per_language,
        "skipped": skipped,
    }
    write_report(out_dir / "report.json", report)
    return report


def combine_manifests(inputs: list[Path], out: Path) -> int:
    """Concatenate utterance manifests (FLEURS + Common Voice train); ids must be unique across them."""
    from speechllm.data.manifest import ManifestError, iter_manifest

    seen: dict[str, str] = {}
    records = []
    for path in inputs:
        for lineno, record in iter_manifest(path):
            uid = record.get("id")
            if uid in seen:
                raise ManifestError(f"{path}:{lineno}: id {uid!r} already used at {seen[uid]}")
            seen[uid] = f"{path}:{lineno}"
            records.append(record)
    return write_manifest(out, records)
