"""Spoken articles with reference summaries, for the summarization evaluation (spec speech-summarization.md
§5.1).

Kang & Roy score summaries of CNN/DailyMail test articles shorter than 1,600 (characters or tokens: unknown;
we count characters) spoken with TTS, against the `highlights`. At paper scale the articles come from
`load_dataset` (`abisee/cnn_dailymail`, config 3.0.0, test); the demo reads a few short articles and summaries
written for this project (package data `speechllm/demo/texts/articles.tsv`, read by
`speechllm.demo.corpus.demo_articles`).

Voicing, config `data.articles.segmentation`:
- `sentences` (default): each sentence is its own TTS clip, and the clips are joined with `pause_seconds` of
  silence into one article clip. Short inputs keep the TTS stable, and the sample offsets of every sentence
  are kept in the manifest (`segments`).
- `whole`: one TTS call per article.
Either way each article is one clip: the model hears the whole article, as in the paper.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from speechllm.audio import load_audio
from speechllm.data.hub import SourceError, load_split
from speechllm.data.manifest import write_manifest
from speechllm.data.tts import TTSBackend, speak_all
from speechllm.io import atomic_path

# A sentence ends at . ! or ? (plus closing quotes/brackets) followed by space and an upper-case letter,
# a digit or an opening quote. Abbreviations ("Mr. Smith") split too; that only moves a pause.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'’”)\]]*\s+(?=[\"'‘“(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Sentences of an article, whitespace-normalised; never empty for non-empty text."""
    text = " ".join(text.split())
    parts, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        parts.append(text[start : match.start()] + match.group(0).strip())
        start = match.end()
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def hub_articles(
    dataset: str,
    config: str,
    split: str,
    revision: str,
    max_chars: int,
    max_articles: int | None,
    cache_dir: str | None = None,
) -> list[dict[str, str]]:
    """CNN/DailyMail articles shorter than `max_chars` characters (dataset order), with their highlights."""
    ds = load_split(
        dataset, config, split, revision, columns=["id", "article", "highlights"], cache_dir=cache_dir
    )
    out = []
    for row in ds:
        if len(row["article"]) < max_chars:
            out.append({"id": f"cnndm-{row['id']}", "article": row["article"], "summary": row["highlights"]})
            if max_articles is not None and len(out) >= max_articles:
                break
    if not out:
        raise SourceError(
            f"no article of {dataset} {config}/{split} is shorter than {max_chars} characters "
            "(config key data.articles.max_chars)"
        )
    return out


def join_clips(
    paths: list[Path], pause_seconds: float, sampling_rate: int, out: Path
) -> list[tuple[int, int]]:
    """Concatenate clips with silence between them into one 16-bit wav; returns each clip's (start, end)."""
    pause = np.zeros(int(round(pause_seconds * sampling_rate)), dtype=np.float32)
    pieces, spans, position = [], [], 0
    for k, path in enumerate(paths):
        if k:
            pieces.append(pause)
            position += pause.shape[0]
        wav = load_audio(path, sampling_rate)
        pieces.append(wav)
        spans.append((position, position + wav.shape[0]))
        position += wav.shape[0]
    with atomic_path(out) as tmp:
        sf.write(
            str(tmp),
            np.clip(np.concatenate(pieces), -1.0, 1.0),
            sampling_rate,
            subtype="PCM_16",
            format="WAV",
        )
    return spans


def build_articles(
    out_dir: Path,
    articles: list[dict[str, str]],
    tts: TTSBackend,
    voice: str,
    sampling_rate: int,
    segmentation: str,
    pause_seconds: float,
    threads: int,
) -> int:
    """Voice every article; write `out_dir/articles/test.jsonl` (clips in `out_dir/audio/articles/`).

    Records are utterance-shaped (id, language, audio, num_samples, sampling_rate, raw_transcription = the
    article text) plus `task: summarization`, `summary` (the reference) and `segments` (sentence spans)."""
    if segmentation not in ("sentences", "whole"):
        raise SourceError(f"unknown segmentation {segmentation!r} (config key data.articles.segmentation)")
    audio_dir = out_dir / "audio" / "articles"
    plans = []
    jobs = []
    for article in articles:
        if not article["article"].strip() or not article["summary"].strip():
            raise SourceError(f"article {article['id']}: empty article or summary")
        texts = split_sentences(article["article"]) if segmentation == "sentences" else [article["article"]]
        clips = [audio_dir / article["id"] / f"{k:03d}.wav" for k in range(len(texts))]
        jobs += [(text, voice, clip) for text, clip in zip(texts, clips, strict=True)]
        plans.append((article, texts, clips))
    speak_all(tts, jobs, threads)
    records: list[dict[str, Any]] = []
    for article, texts, clips in plans:
        path = audio_dir / f"{article['id']}.wav"
        spans = join_clips(clips, pause_seconds, sampling_rate, path)
        records.append(
            {
                "id": article["id"],
                "task": "summarization",
                "language": "en_us",
                "audio": str(path),
                "num_samples": spans[-1][1],
                "sampling_rate": sampling_rate,
                "raw_transcription": article["article"],
                "summary": article["summary"],
                "segments": [
                    {"start": s, "end": e, "text": t} for (s, e), t in zip(spans, texts, strict=True)
                ],
            }
        )
    return write_manifest(out_dir / "articles" / "test.jsonl", records)
