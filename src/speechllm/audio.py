"""Audio input: any file soundfile reads → 16 kHz mono float32, with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF


class AudioError(ValueError):
    """A file that cannot be used as speech input; the message names the file (and manifest line)."""


def _where(path: str | Path, line: int | str | None) -> str:
    if line is None:
        return f"{path}"
    return f"{path} ({line})" if isinstance(line, str) else f"{path} (manifest line {line})"


def load_audio(path: str | Path, sampling_rate: int, line: int | str | None = None) -> np.ndarray:
    """Read `path` as mono float32 at `sampling_rate`. Shape (N,).

    `line` says where the file was listed, for errors: a manifest location `<manifest>:<line>` (see
    `speechllm.data.manifest.location`), or a bare line number.
    Raises AudioError for a missing, unreadable, empty, truncated or non-finite file.
    """
    where = _where(path, line)
    if not Path(path).is_file():
        raise AudioError(f"audio file not found: {where}")
    try:
        wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:  # soundfile raises several types for broken/non-audio files
        raise AudioError(f"cannot read audio {where}: {err}") from err
    if wav.shape[0] == 0:
        raise AudioError(f"empty audio (0 samples): {where}")
    if not np.isfinite(wav).all():
        raise AudioError(f"audio contains NaN or Inf samples: {where}")
    mono = wav.mean(axis=1)
    if sr != sampling_rate:
        mono = AF.resample(torch.from_numpy(mono), sr, sampling_rate).numpy()
    return np.ascontiguousarray(mono, dtype=np.float32)


def check_min_length(
    num_samples: int, min_samples: int, sampling_rate: int, path: str | Path, line: int | str | None = None
) -> None:
    """AudioError naming the file if it is shorter than the `min_samples` a model needs."""
    if num_samples < min_samples:
        raise AudioError(
            f"{_where(path, line)}: {num_samples / sampling_rate:.4f} s ({num_samples} samples at {sampling_rate} Hz) "
            f"is too short for this model, which needs at least {min_samples / sampling_rate:.4f} s "
            f"({min_samples} samples)"
        )


def speed_perturb(wav: np.ndarray, factor: float, sampling_rate: int) -> np.ndarray:
    """Resampling-based speed change (sox `speed`, ESPnet `_sp`): pitch and tempo both change. Shape (N/factor,)."""
    if factor == 1.0:
        return wav
    # Playing a signal `factor` times faster = treating it as recorded at sr*factor and resampling to sr.
    src = int(round(sampling_rate * factor))
    out = AF.resample(torch.from_numpy(wav), src, sampling_rate)
    return out.numpy().astype(np.float32)


def perturbed_length(num_samples: int, factor: float, sampling_rate: int) -> int:
    """Length after `speed_perturb`, without doing it."""
    if factor == 1.0:
        return num_samples
    src = int(round(sampling_rate * factor))
    return int(np.ceil(num_samples * sampling_rate / src))
