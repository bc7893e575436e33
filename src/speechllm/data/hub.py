"""Paper-scale sources through `datasets`: FLEURS (the hub's parquet conversion, since `datasets` ≥ 4 cannot
run the `google/fleurs` loading script), and GLUE / XNLI validation text voiced with the TTS backend where no
released audio is configured. A local directory in the same layout works in place of a hub id (tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import soundfile as sf
from tqdm import tqdm

from speechllm.data.demo import _example, _speak_all
from speechllm.data.languages import SHORT_TO_FLEURS
from speechllm.data.manifest import write_manifest
from speechllm.data.tts import TTSBackend

FLEURS_SPLITS = {"train": "train", "dev": "validation", "test": "test"}
GLUE_TEXT_FIELDS = {
    "cola": ("sentence",), "sst2": ("sentence",), "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"), "stsb": ("sentence1", "sentence2"), "mnli_matched": ("premise", "hypothesis"),
    "mnli_mismatched": ("premise", "hypothesis"), "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"), "wnli": ("sentence1", "sentence2"),
}


def parquet_base(dataset: str, revision: str) -> str:
    """Root of `{config}/{split}/*.parquet`: a local directory, or the hub repo at `revision` via hf://."""
    if Path(dataset).is_dir():
        return str(Path(dataset))
    return f"hf://datasets/{dataset}@{quote(revision, safe='')}"


def load_fleurs_split(dataset: str, revision: str, language: str, split: str):
    from datasets import Audio, load_dataset

    files = f"{parquet_base(dataset, revision)}/{language}/{FLEURS_SPLITS[split]}/*.parquet"
    ds = load_dataset("parquet", data_files={split: files}, split=split)
    return ds.cast_column("audio", Audio(decode=False))  # keep the original bytes; decoding happens on load


def build_fleurs(out_dir: Path, languages: list[str], dataset: str, revision: str,
                 sampling_rate: int) -> dict[str, int]:
    """Write audio files as released and FLEURS-shaped manifests `out_dir/{split}.jsonl`.

    Utterance ids `{language}-{split}-{recording}` come from the recording's file name, stable across reruns;
    `sentence_id` is FLEURS `id`, which joins the same sentence across languages (speech translation)."""
    counts = {}
    english: dict[int, str] = {}
    for split in FLEURS_SPLITS:
        records = []
        for language in languages:
            ds = load_fleurs_split(dataset, revision, language, split)
            for row in tqdm(ds, desc=f"FLEURS {language} {split}", mininterval=30):
                name = Path(row["audio"]["path"] or row["path"]).name
                path = out_dir / "audio" / language / split / name
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    part = path.with_name(path.name + ".part")
                    part.write_bytes(row["audio"]["bytes"])
                    part.replace(path)
                info = sf.info(str(path))
                records.append({
                    "id": f"{language}-{split}-{Path(name).stem}", "sentence_id": int(row["id"]),
                    "language": language, "audio": str(path), "num_samples": info.frames,
                    "sampling_rate": info.samplerate, "raw_transcription": row["raw_transcription"],
                    "gender": row.get("gender"),
                })
                if language == "en_us":
                    english[int(row["id"])] = row["raw_transcription"]
        counts[split] = len(records)
        for rec in records:
            rec["translation"] = english.get(rec["sentence_id"])
        write_manifest(out_dir / f"{split}.jsonl", records)
    return counts


def build_speechglue_tts(out_dir: Path, tasks: list[str], tts: TTSBackend, voice: str, sampling_rate: int,
                         dataset: str, threads: int) -> dict[str, int]:
    """SpeechGLUE-shaped validation sets: every text field of every example voiced as its own clip."""
    from datasets import load_dataset

    counts = {}
    for task in tasks:
        config, split = (("mnli", f"validation_{task.split('_')[1]}") if task.startswith("mnli")
                         else (task, "validation"))
        ds = load_dataset(dataset, config, split=split)
        jobs, pending = [], []
        for i, row in enumerate(ds):
            paths = {f: out_dir / "audio" / "speechglue" / task / f"{i:06d}_{f}.wav" for f in GLUE_TEXT_FIELDS[task]}
            jobs += [(row[f], voice, p) for f, p in paths.items()]
            pending.append((i, row, paths))
        _speak_all(tts, jobs, threads)
        examples = [_example(task, f"{task}-{i:06d}", "en_us", paths, {f: row[f] for f in paths}, row["label"],
                             sampling_rate) for i, row, paths in pending]
        counts[task] = write_manifest(out_dir / "speechglue" / f"{task}.jsonl", examples)
    return counts


def build_speechxnli_tts(out_dir: Path, languages: list[str], tts: TTSBackend, voices: dict[str, str],
                         sampling_rate: int, dataset: str, threads: int) -> int:
    """SpeechXNLI-shaped set from XNLI validation, voiced per language."""
    from datasets import load_dataset

    examples: list[dict[str, Any]] = []
    for lang in languages:
        ds = load_dataset(dataset, lang, split="validation")
        jobs, pending = [], []
        for i, row in enumerate(ds):
            paths = {f: out_dir / "audio" / "speechxnli" / lang / f"{i:05d}_{f}.wav" for f in ("premise", "hypothesis")}
            jobs += [(row[f], voices[lang], p) for f, p in paths.items()]
            pending.append((i, row, paths))
        _speak_all(tts, jobs, threads)
        examples += [_example("xnli", f"xnli-{lang}-{i:05d}", SHORT_TO_FLEURS[lang], paths,
                              {f: row[f] for f in paths}, row["label"], sampling_rate) for i, row, paths in pending]
    return write_manifest(out_dir / "speechxnli" / "test.jsonl", examples)
