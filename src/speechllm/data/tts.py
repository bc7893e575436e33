"""Text-to-speech backends used to voice text-only sets (demo corpus, SpeechGLUE/SpeechXNLI fallbacks).

A backend turns (text, voice) into a 16-bit wav at a given path. espeak-ng is the offline default;
a neural TTS plugs in by implementing `TTSBackend.synthesize`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import soundfile as sf
from tqdm import tqdm

from speechllm.audio import load_audio
from speechllm.io import atomic_path, atomic_write_text


class TTSBackend(Protocol):
    name: str
    settings: dict[str, Any]  # what else changes its output (rate, speed, ...): part of every clip's key

    def synthesize(self, text: str, voice: str, out_path: Path) -> None:
        """Write `text` spoken with `voice` to `out_path` (wav, mono, the pipeline's sampling rate)."""


class EspeakNG:
    """espeak-ng (Debian package `espeak-ng`), resampled to `sampling_rate`."""

    name = "espeak-ng"

    def __init__(self, sampling_rate: int, words_per_minute: int) -> None:
        self.binary = shutil.which("espeak-ng")
        if self.binary is None:
            raise RuntimeError("espeak-ng not found on PATH: install it with `apt-get install -y espeak-ng`")
        self.sampling_rate = sampling_rate
        self.words_per_minute = words_per_minute
        self.settings = {"sampling_rate": sampling_rate, "words_per_minute": words_per_minute}

    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True, check=True)
        return out.stdout.strip()

    def synthesize(self, text: str, voice: str, out_path: Path) -> None:
        with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
            # `--` ends the options: a text starting with "-" (SST-2's "-lrb- ...", a quoted "--") would be
            # parsed as options, and espeak-ng would then read its text from stdin, exiting 0 without a clip.
            cmd = [self.binary, "-v", voice, "-s", str(self.words_per_minute), "-w", tmp.name, "--", text]
            proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            if proc.returncode != 0 or Path(tmp.name).stat().st_size == 0:
                raise RuntimeError(
                    f"espeak-ng wrote no clip for voice {voice!r} on {text!r}: {proc.stderr.strip()}"
                )
            wav = load_audio(tmp.name, self.sampling_rate)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out_path) as part:  # a killed job leaves no clip that looks finished
            sf.write(str(part), np.clip(wav, -1.0, 1.0), self.sampling_rate, subtype="PCM_16")


def voice_for(voices: dict[str, str], code: str) -> str:
    """The TTS voice of language `code`, or an error naming the config key."""
    if code not in voices:
        raise ValueError(f"no TTS voice for {code!r} (config key data.tts.voices)")
    return voices[code]


def make_tts(backend: str, sampling_rate: int, words_per_minute: int) -> TTSBackend:
    if backend == "espeak-ng":
        return EspeakNG(sampling_rate, words_per_minute)
    raise ValueError(f"unknown TTS backend {backend!r} (config key data.tts.backend); available: espeak-ng")


def clip_key(tts: TTSBackend, text: str, voice: str) -> str:
    """What a clip was voiced from: backend, its settings, voice and text (sha256)."""
    blob = {"backend": tts.name, "settings": getattr(tts, "settings", {}), "voice": voice, "text": text}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def key_path(clip: Path) -> Path:
    """The file next to a clip that holds its `clip_key`."""
    return clip.with_name(clip.name + ".key")


def speak_all(tts: TTSBackend, jobs: list[tuple[str, str, Path]], threads: int) -> None:
    """Voice every (text, voice, path) job on `threads` threads, except those whose wav was already voiced
    from the same text, voice and backend settings (its `.key` file says so). A clip at the same path from
    another text (a changed segmentation, data set or voice) is voiced again, never reused."""

    def done(job: tuple[str, str, Path]) -> bool:
        text, voice, path = job
        key = key_path(path)
        return path.exists() and key.exists() and key.read_text() == clip_key(tts, text, voice)

    todo = [job for job in jobs if not done(job)]

    def run(job: tuple[str, str, Path]) -> None:
        text, voice, path = job
        tts.synthesize(text, voice, path)
        atomic_write_text(key_path(path), clip_key(tts, text, voice))  # after the clip: a kill re-voices it

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(tqdm(pool.map(run, todo), total=len(todo), desc=f"TTS ({tts.name})", mininterval=5))
