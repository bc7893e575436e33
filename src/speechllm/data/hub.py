"""Paper-scale sources through `datasets`: FLEURS (the hub's parquet conversion, since `datasets` ≥ 4 cannot
run the `google/fleurs` loading script), GLUE / XNLI validation text voiced with the TTS backend, and the
released SpeechGLUE / SpeechXNLI audio where configured. A local directory in the hub's layout works in place
of a hub id (tests), and every loader goes through `load_dataset` either way.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

import soundfile as sf
from tqdm import tqdm

from speechllm.audio import AudioError
from speechllm.data.languages import SHORT_TO_FLEURS
from speechllm.data.manifest import spoken_example, write_manifest
from speechllm.data.tts import TTSBackend, speak_all, voice_for
from speechllm.io import DownloadFailed, atomic_path, atomic_write_bytes, atomic_write_text, copy_source

PARQUET_REVISION = "refs/convert/parquet"
FLEURS_SPLITS = {"train": "train", "dev": "validation", "test": "test"}
GLUE_TEXT_FIELDS = {
    "cola": ("sentence",),
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "stsb": ("sentence1", "sentence2"),
    "mnli_matched": ("premise", "hypothesis"),
    "mnli_mismatched": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}
XNLI_TEXT_FIELDS = ("premise", "hypothesis")


class SourceError(ValueError):
    """A source that cannot be read as configured; the message names the file, row or config key."""


# ---------------------------------------------------------------------------------------------------------
# Loading splits


def parquet_base(dataset: str, revision: str) -> str:
    """Root of `{config}/{split}/*.parquet`: a local directory, or the hub repo at `revision` via hf://."""
    if Path(dataset).is_dir():
        return str(Path(dataset))
    return f"hf://datasets/{dataset}@{quote(revision, safe='')}"


def parquet_split_files(base: str, config: str, split: str) -> list[str]:
    """The parquet files of one split under `base`, in the hub conversion's layout.

    `{config}/{split}/NNNN.parquet` is the current layout; `{config}/<name>-{split}[-NNNNN-of-NNNNN].parquet`
    the converter's 2023 layout (still what some repos hold). A partial conversion
    (`{config}/partial-{split}`, the converter's cut at 5 GB) is refused rather than read: it would drop
    utterances silently."""
    from fsspec.core import url_to_fs
    from fsspec.implementations.local import LocalFileSystem

    fs, root = url_to_fs(base)
    patterns = (
        f"{root}/{config}/{split}/*.parquet",
        f"{root}/{config}/*-{split}.parquet",
        f"{root}/{config}/*-{split}-*-of-*.parquet",
    )
    for pattern in patterns:
        found = sorted(fs.glob(pattern))
        if found:
            return found if isinstance(fs, LocalFileSystem) else [fs.unstrip_protocol(p) for p in found]
    if fs.glob(f"{root}/{config}/partial-{split}/*.parquet"):
        raise SourceError(
            f"{base}/{config} holds only a partial parquet conversion of split {split!r} "
            f"(partial-{split}/): the hub converter stops at 5 GB; use the full data instead"
        )
    raise SourceError(f"no parquet files for config {config!r}, split {split!r} under {base}")


def load_split(
    dataset: str,
    config: str,
    split: str,
    revision: str = "main",
    columns: list[str] | None = None,
    cache_dir: str | None = None,
    streaming: bool = False,
):
    """One split of a hub dataset, or of a local directory in the parquet-conversion layout.

    A local directory, or `revision: refs/convert/parquet`, reads `{config}/{split}/*.parquet` with
    `load_dataset("parquet", ...)`; any other revision is a native (parquet) hub repo read by config and
    split. `streaming` iterates the parquet files without an Arrow copy in the datasets cache (the audio
    corpora: the clips are written out once anyway). Audio columns stay undecoded ({bytes, path}): clips are
    kept as released."""
    from datasets import Audio, load_dataset

    if Path(dataset).is_dir() or revision == PARQUET_REVISION:
        files = parquet_split_files(parquet_base(dataset, revision), config, split)
        ds = load_dataset(
            "parquet",
            data_files={split: files},
            split=split,
            columns=columns,
            cache_dir=cache_dir,
            streaming=streaming,
        )
    else:
        ds = load_dataset(
            dataset, config, split=split, revision=revision, cache_dir=cache_dir, streaming=streaming
        )
        if columns is not None:
            ds = ds.select_columns(columns)
    if "audio" in (ds.column_names or ()):
        ds = ds.cast_column("audio", Audio(decode=False))
    return ds


def audio_bytes_info(audio: dict[str, Any] | None, where: str) -> sf._SoundFileInfo:
    """soundfile's header info for an undecoded audio cell; AudioError names the row if it is unusable."""
    if not audio or not audio.get("bytes"):
        raise AudioError(f"no audio bytes in {where}")
    try:
        return sf.info(io.BytesIO(audio["bytes"]))
    except Exception as err:  # soundfile raises several types for broken/non-audio data
        raise AudioError(f"cannot read audio in {where}: {err}") from err


def write_clip(data: bytes, path: Path) -> None:
    """Write released audio bytes once; a rerun leaves an identical file alone and replaces any other (a
    WAV's size depends only on its length, so a clip re-released with the same length differs in content)."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    atomic_write_bytes(path, data)


def write_report(path: Path, report: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------------
# FLEURS


def english_sentences(dataset: str, revision: str, cache_dir: str | None = None) -> dict[int, str]:
    """FLEURS `id` -> en_us `raw_transcription` over all splits (text columns only: no audio is read)."""
    english: dict[int, str] = {}
    for split in FLEURS_SPLITS.values():
        ds = load_split(
            dataset,
            "en_us",
            split,
            revision,
            columns=["id", "raw_transcription"],
            cache_dir=cache_dir,
            streaming=True,
        )
        for row in ds:
            english.setdefault(int(row["id"]), row["raw_transcription"])
    return english


def build_fleurs(
    out_dir: Path,
    languages: list[str],
    dataset: str,
    revision: str,
    on_bad_audio: str = "error",
    cache_dir: str | None = None,
) -> dict[str, int]:
    """Write the clips as released and FLEURS-shaped manifests `out_dir/{train,dev,test}.jsonl` + report.json.

    Utterance ids `{language}-{split}-{recording}` come from the recording's file name, so they are stable
    across reruns and row orders. `sentence_id` is FLEURS `id`, which joins one FLoRes sentence across
    languages; `translation` is the en_us `raw_transcription` of that sentence (the X→English ST reference).
    `raw_transcription` is copied untouched. A clip soundfile cannot read stops the build naming the row, or
    with `on_bad_audio: skip` is left out and listed in the report."""
    english = english_sentences(dataset, revision, cache_dir)
    counts: dict[str, int] = {}
    skipped: list[dict[str, Any]] = []
    for split, hub_split in FLEURS_SPLITS.items():
        records: list[dict[str, Any]] = []
        seen: dict[str, str] = {}
        for language in languages:
            ds = load_split(dataset, language, hub_split, revision, cache_dir=cache_dir, streaming=True)
            for row_index, row in enumerate(tqdm(ds, desc=f"FLEURS {language} {hub_split}", mininterval=30)):
                where = f"FLEURS {dataset} {language}/{hub_split} row {row_index}"
                name = Path((row["audio"] or {}).get("path") or row.get("path") or "").name
                if not name:
                    raise SourceError(f"no recording file name in {where}")
                uid = f"{language}-{split}-{Path(name).stem}"
                if uid in seen:
                    raise SourceError(f"recording {name!r} appears twice ({seen[uid]} and {where})")
                seen[uid] = where
                try:
                    info = audio_bytes_info(row["audio"], where)
                except AudioError as err:
                    if on_bad_audio != "skip":
                        raise
                    skipped.append({"id": uid, "where": where, "reason": str(err)})
                    continue
                path = out_dir / "audio" / language / split / name
                write_clip(row["audio"]["bytes"], path)
                sentence_id = int(row["id"])
                records.append(
                    {
                        "id": uid,
                        "sentence_id": sentence_id,
                        "language": language,
                        "audio": str(path),
                        "num_samples": info.frames,
                        "sampling_rate": info.samplerate,
                        "raw_transcription": row["raw_transcription"],
                        "translation": english.get(sentence_id),
                        "gender": row.get("gender"),
                    }
                )
        counts[split] = write_manifest(out_dir / f"{split}.jsonl", records)
    write_report(
        out_dir / "report.json",
        {
            "dataset": dataset,
            "revision": revision,
            "languages": languages,
            "counts": counts,
            "skipped": skipped,
        },
    )
    return counts


# ---------------------------------------------------------------------------------------------------------
# SpeechGLUE and SpeechXNLI voiced with TTS


def glue_config_split(task: str) -> tuple[str, str]:
    """GLUE config and split of a SpeechGLUE task: mnli_matched -> (mnli, validation_matched)."""
    if task.startswith("mnli_"):
        return "mnli", f"validation_{task.split('_')[1]}"
    return task, "validation"


def build_speechglue_tts(
    out_dir: Path,
    tasks: list[str],
    tts: TTSBackend,
    voice: str,
    sampling_rate: int,
    dataset: str,
    threads: int,
    revision: str = "main",
) -> dict[str, int]:
    """SpeechGLUE-shaped validation sets: every text field of every example voiced as its own clip."""
    counts = {}
    for task in tasks:  # all, before any download
        if task not in GLUE_TEXT_FIELDS:
            raise SourceError(f"unknown SpeechGLUE task {task!r} (config key data.speechglue.tasks)")
    for task in tasks:
        config, split = glue_config_split(task)
        ds = load_split(dataset, config, split, revision)
        jobs, pending = [], []
        for i, row in enumerate(ds):
            paths = {
                f: out_dir / "audio" / "speechglue" / task / f"{i:06d}_{f}.wav"
                for f in GLUE_TEXT_FIELDS[task]
            }
            jobs += [(row[f], voice, p) for f, p in paths.items()]
            pending.append((i, row, paths))
        speak_all(tts, jobs, threads)
        examples = [
            spoken_example(
                task,
                f"{task}-{i:06d}",
                "en_us",
                paths,
                {f: row[f] for f in paths},
                row["label"],
                sampling_rate,
            )
            for i, row, paths in pending
        ]
        counts[task] = write_manifest(out_dir / "speechglue" / f"{task}.jsonl", examples)
    return counts


def build_speechxnli_tts(
    out_dir: Path,
    languages: list[str],
    tts: TTSBackend,
    voices: dict[str, str],
    sampling_rate: int,
    dataset: str,
    threads: int,
    revision: str = "main",
) -> int:
    """SpeechXNLI-shaped set from XNLI validation, voiced per language."""
    examples: list[dict[str, Any]] = []
    language_voices = {lang: voice_for(voices, lang) for lang in languages}  # all, before any download
    for lang, voice in language_voices.items():
        ds = load_split(dataset, lang, "validation", revision)
        jobs, pending = [], []
        for i, row in enumerate(ds):
            paths = {
                f: out_dir / "audio" / "speechxnli" / lang / f"{i:05d}_{f}.wav" for f in XNLI_TEXT_FIELDS
            }
            jobs += [(row[f], voice, p) for f, p in paths.items()]
            pending.append((i, row, paths))
        speak_all(tts, jobs, threads)
        examples += [
            spoken_example(
                "xnli",
                f"xnli-{lang}-{i:05d}",
                SHORT_TO_FLEURS[lang],
                paths,
                {f: row[f] for f in paths},
                row["label"],
                sampling_rate,
            )
            for i, row, paths in pending
        ]
    return write_manifest(out_dir / "speechxnli" / "test.jsonl", examples)


# ---------------------------------------------------------------------------------------------------------
# Released audio: SpeechXNLI (zenodo 10900287) and SpeechGLUE (ashi-ta/speechGLUE data-prep output)


def _field(path: Path, text: str, sampling_rate: int, where: str) -> dict[str, Any]:
    """A manifest field for a released clip; num_samples is stated at the pipeline rate (clips are
    resampled on load), like the TTS sets."""
    if not path.is_file():
        raise AudioError(f"audio file not found: {path} ({where})")
    try:
        info = sf.info(str(path))
    except Exception as err:
        raise AudioError(f"cannot read audio {path} ({where}): {err}") from err
    return {
        "text": text,
        "audio": str(path),
        "num_samples": round(info.frames * sampling_rate / info.samplerate),
    }


def find_speechxnli_root(release_dir: Path, languages: list[str]) -> Path:
    """The directory holding `sentences_{lang}.txt` and `audios/`: the release dir or one level below it."""
    probe = f"sentences_{languages[0]}.txt"
    candidates = (
        [release_dir, *sorted(p for p in release_dir.iterdir() if p.is_dir())] if release_dir.is_dir() else []
    )
    for candidate in candidates:
        if (candidate / probe).is_file():
            return candidate
    raise SourceError(
        f"no {probe} in {release_dir} or its subdirectories "
        "(config key data.speechxnli.release_dir; expected the extracted speech_xnli.tar.gz)"
    )


def speechxnli_sentence_clips(root: Path, lang: str) -> dict[str, Path]:
    """Sentence -> clip: line i of `sentences_{lang}.txt` (0-based) is
    `audios/{lang}/xnli_validation_{i:04d}.flac`.

    A sentence listed twice maps to its last line, as in the reference's lookup."""
    path = root / f"sentences_{lang}.txt"
    if not path.is_file():
        raise SourceError(f"SpeechXNLI sentence list not found: {path}")
    clips = {}
    with path.open(encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            clips[line.rstrip("\n")] = root / "audios" / lang / f"xnli_validation_{i:04d}.flac"
    return clips


def build_speechxnli_released(
    out_dir: Path,
    release_dir: Path,
    languages: list[str],
    dataset: str,
    sampling_rate: int,
    revision: str = "main",
    cache_dir: str | None = None,
) -> int:
    """The SpeechXNLI manifest over the released clips (read in place): XNLI validation pairs and labels from
    `dataset`, each premise and hypothesis looked up in the release's sentence list."""
    root = find_speechxnli_root(release_dir, languages)
    examples: list[dict[str, Any]] = []
    for lang in languages:
        clips = speechxnli_sentence_clips(root, lang)
        ds = load_split(dataset, lang, "validation", revision, cache_dir=cache_dir)
        for i, row in enumerate(ds):
            fields = {}
            for name in XNLI_TEXT_FIELDS:
                where = f"XNLI {lang} validation row {i}, {name}"
                if row[name] not in clips:
                    raise SourceError(
                        f"{where}: sentence not in {root / f'sentences_{lang}.txt'}: {row[name]!r}"
                    )
                fields[name] = _field(clips[row[name]], row[name], sampling_rate, where)
            examples.append(
                {
                    "id": f"xnli-{lang}-{i:05d}",
                    "task": "xnli",
                    "language": SHORT_TO_FLEURS[lang],
                    "label": row["label"],
                    "sampling_rate": sampling_rate,
                    "fields": fields,
                }
            )
    return write_manifest(out_dir / "speechxnli" / "test.jsonl", examples)


def speechglue_csv(release_dir: Path, task: str) -> Path:
    """`{task}/validation/data.csv` (the reference's layout), or speechGLUE's own
    `mnli/validation_{m}/data.csv`."""
    candidates = [release_dir / task / "validation" / "data.csv"]
    if task.startswith("mnli_"):
        config, split = glue_config_split(task)
        candidates.append(release_dir / config / split / "data.csv")
    for path in candidates:
        if path.is_file():
            return path
    raise SourceError(
        f"no SpeechGLUE data.csv for {task!r}: looked for {', '.join(map(str, candidates))} "
        "(config key data.speechglue.release_dir)"
    )


def resolve_released_clip(recorded: str, csv_path: Path) -> Path:
    """A clip path as recorded in data.csv (absolute on the machine that ran the TTS): used as is if it
    exists, else re-rooted at the csv's directory by its last three parts (`{field}/{bucket}/{idx}.wav`);
    `.flac` is accepted where the `.wav` was converted, as the reference does."""
    recorded_path = Path(recorded)
    local = csv_path.parent.joinpath(*recorded_path.parts[-3:])
    for path in (recorded_path, local):
        for candidate in (path, path.with_suffix(".flac")):
            if candidate.is_file():
                return candidate
    return local


def build_speechglue_released(
    out_dir: Path, release_dir: Path, tasks: list[str], sampling_rate: int
) -> dict[str, int]:
    """SpeechGLUE manifests over speechGLUE's synthesized validation sets (clips read in place): texts as the
    TTS read them, labels from data.csv (rows speechGLUE could not voice are absent there, as in the
    paper)."""
    counts = {}
    for task in tasks:
        if task not in GLUE_TEXT_FIELDS:
            raise SourceError(f"unknown SpeechGLUE task {task!r} (config key data.speechglue.tasks)")
        csv_path = speechglue_csv(release_dir, task)
        fields = GLUE_TEXT_FIELDS[task]
        with csv_path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            needed = {"idx", "label", *fields, *(f"file_{f}" for f in fields)}
            missing = needed - set(reader.fieldnames or [])
            if missing:
                raise SourceError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))}")
            examples = []
            for lineno, row in enumerate(reader, start=2):
                where = f"{csv_path} line {lineno}"
                clips = {
                    f: _field(resolve_released_clip(row[f"file_{f}"], csv_path), row[f], sampling_rate, where)
                    for f in fields
                }
                try:
                    label: float | int = float(row["label"]) if task == "stsb" else int(row["label"])
                    idx = int(row["idx"])
                except ValueError as err:
                    raise SourceError(
                        f"{where}: label {row['label']!r} / idx {row['idx']!r} ({err})"
                    ) from err
                examples.append(
                    {
                        "id": f"{task}-{idx:06d}",
                        "task": task,
                        "language": "en_us",
                        "label": label,
                        "sampling_rate": sampling_rate,
                        "fields": clips,
                    }
                )
        counts[task] = write_manifest(out_dir / "speechglue" / f"{task}.jsonl", examples)
    return counts


# ---------------------------------------------------------------------------------------------------------
# Released files: download and unpack


def fetch_url(url: str, out: Path, timeout: float) -> int:
    """Stream `url` (https://, or file:// for local copies) to `out` atomically. Returns the byte count.

    Nothing replaces `out` unless the whole body arrived: a failed, stalled (nothing for `timeout` seconds),
    empty or cut-short download (io.copy_source) is a SourceError naming the URL; write errors name `out`."""
    with atomic_path(out) as tmp, tmp.open("wb") as fh:
        try:
            total, _ = copy_source(url, fh, timeout)
        except DownloadFailed as err:
            raise SourceError(str(err)) from err
    return total


def extract_archive(archive: Path, dest: Path) -> Path:
    """Unpack a tar archive into `dest` (all or nothing: into a sibling temp dir, then renamed). Members that
    would land outside `dest` are refused (tarfile's "data" filter). Reuses a complete earlier extraction."""
    marker = dest / ".extracted"
    if marker.is_file() and marker.read_text().strip() == str(archive.stat().st_size):
        return dest
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
    except (tarfile.TarError, OSError) as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SourceError(f"cannot unpack {archive}: {err}") from err
    (tmp / ".extracted").write_text(f"{archive.stat().st_size}\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.replace(dest)
    return dest
