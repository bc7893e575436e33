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
    return mono_at_rate(wav, sr, sampling_rate, where)


def mono_at_rate(frames: np.ndarray, rate: int, sampling_rate: int, where: str) -> np.ndarray:
    """(N, C) samples at `rate` -> (N',) mono float32 at `sampling_rate` (channels averaged, resampled).

    Raises AudioError naming `where` for empty or non-finite audio.
    """
    if frames.shape[0] == 0:
        raise AudioError(f"empty audio (0 samples): {where}")
    if not np.isfinite(frames).all():
        raise AudioError(f"audio contains NaN or Inf samples: {where}")
    mono = frames.astype(np.float32, copy=False).mean(axis=1)
    if rate != sampling_rate:
        mono = AF.resample(torch.from_numpy(mono), rate, sampling_rate).numpy()
    return np.ascontiguousarray(mono, dtype=np.float32)


def check_min_length(
    num_samples: int, min_samples: int, sampling_rate: int, path: str | Path, line: int | str | None = None
) -> None:
    """AudioError naming the file if it is shorter than the `min_samples` a model needs."""
    if num_samples < min_samples:
        raise AudioError(
            f"{_where(path, line)}: {num_samples / sampling_rate:.4f} s ({num_samples} samples at "
            f"{sampling_rate} Hz) is too short for this model, which needs at least "
            f"{min_samples / sampling_rate:.4f} s ({min_samples} samples)"
        )


def array_to_mono(samples: np.ndarray, rate: int, sampling_rate: int, where: str) -> np.ndarray:
    """An in-memory waveform at `rate` -> (N',) mono float32 at `sampling_rate`.

    `samples` is (N,) mono or 2-D with channels on its shorter axis: (N, C) as soundfile reads it or (C, N) as
    torchaudio does; float samples in [-1, 1] or signed PCM integers. Raises AudioError naming `where` for
    other shapes, empty or non-finite audio.
    """
    if rate <= 0:
        raise AudioError(f"sampling rate must be positive, got {rate}: {where}")
    if samples.ndim == 1:
        frames = samples[:, None]
    elif samples.ndim == 2:
        frames = samples if samples.shape[0] >= samples.shape[1] else samples.T
    else:
        raise AudioError(f"audio array of shape {samples.shape} is neither (N,) nor (N, C) / (C, N): {where}")
    if np.issubdtype(frames.dtype, np.signedinteger):  # PCM integers (e.g. int16) scaled to [-1, 1)
        frames = frames / np.float32(-np.iinfo(frames.dtype).min)
    elif not np.issubdtype(frames.dtype, np.floating):
        raise AudioError(f"audio array of dtype {frames.dtype} is neither float nor signed PCM: {where}")
    return mono_at_rate(frames, rate, sampling_rate, where)


def speed_perturb(wav: np.ndarray, factor: float, sampling_rate: int) -> np.ndarray:
    """Resampling-based speed change (sox `speed`, ESPnet `_sp`): pitch and tempo both change. Shape
    (N/factor,)."""
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
