"""LibriSpeech 960 h for the speech-summarization experiment (spec speech-summarization.md §2.1).

Loaded with `load_dataset` from the hub (`openslr/librispeech_asr`, config `all`; a local directory in the
parquet-conversion layout `{config}/{split}/*.parquet` works the same way, which is what the tests use).
Kang & Roy train on train.clean.100 + train.clean.360 + train.other.500, validate on validation.clean/other
and test on test.clean/other, dropping utterances longer than 20 s in every split; the hub splits go into our
train / dev / test manifests with their hub split kept in `subset`, and every drop is counted in report.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm

from speechllm.audio import AudioError
from speechllm.data.hub import SourceError, audio_bytes_info, load_split, write_clip, write_report
from speechllm.data.manifest import write_manifest

LIBRISPEECH_SPLITS = {
    "train": ["train.clean.100", "train.clean.360", "train.other.500"],
    "dev": ["validation.clean", "validation.other"],
    "test": ["test.clean", "test.other"],
}


def build_librispeech(
    out_dir: Path,
    dataset: str,
    revision: str,
    config: str,
    splits: dict[str, list[str]],
    max_duration: float,
    on_bad_audio: str = "error",
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Write `out_dir/{train,dev,test}.jsonl` and `out_dir/report.json`; clips go to
    `out_dir/audio/{subset}/`.

    Records are utterance-shaped: id (LibriSpeech `{speaker}-{chapter}-{n}`), language en_us, audio,
    num_samples, sampling_rate, raw_transcription (the corpus text, untouched), speaker_id, chapter_id,
    subset. Utterances longer than `max_duration` seconds are dropped and counted per subset."""
    report: dict[str, Any] = {
        "dataset": dataset,
        "revision": revision,
        "config": config,
        "max_duration": max_duration,
        "subsets": {},
        "skipped": [],
    }
    for split, subsets in splits.items():
        records = []
        for subset in subsets:
            ds = load_split(dataset, config, subset, revision, cache_dir=cache_dir, streaming=True)
            counts = {"input": 0, "too_long": 0, "bad": 0, "kept": 0}
            for row_index, row in enumerate(tqdm(ds, desc=f"LibriSpeech {subset}", mininterval=30)):
                counts["input"] += 1
                where = f"LibriSpeech {dataset} {config}/{subset} row {row_index}"
                uid = str(row.get("id") or "")
                if not uid:
                    raise SourceError(f"no utterance id in {where}")
                try:
                    info = audio_bytes_info(row["audio"], where)
                except AudioError as err:
                    if on_bad_audio != "skip":
                        raise
                    counts["bad"] += 1
                    report["skipped"].append({"id": uid, "where": where, "reason": str(err)})
                    continue
                if info.frames / info.samplerate > max_duration:
                    counts["too_long"] += 1
                    continue
                suffix = (
                    Path((row["audio"] or {}).get("path") or row.get("file") or "x.flac").suffix or ".flac"
                )
                path = out_dir / "audio" / subset / f"{uid}{suffix}"
                write_clip(row["audio"]["bytes"], path)
                records.append(
                    {
                        "id": uid,
                        "language": "en_us",
                        "audio": str(path),
                        "num_samples": info.frames,
                        "sampling_rate": info.samplerate,
                        "raw_transcription": row["text"],
                        "speaker_id": row.get("speaker_id"),
                        "chapter_id": row.get("chapter_id"),
                        "subset": subset,
                    }
                )
                counts["kept"] += 1
            report["subsets"][subset] = counts
        write_manifest(out_dir / f"{split}.jsonl", records)
    write_report(out_dir / "report.json", report)
    return report
