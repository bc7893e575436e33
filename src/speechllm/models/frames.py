"""Frame arithmetic of the speech side: how many frames each stage makes of an input, and the shortest input
that still yields one output frame. Torch-free, so the workflow can check `data.min_duration` at parse time.

Stages compose as plain functions `length -> length`: a wav2vec2-family encoder's convolutional feature
extractor (samples -> frames), then the BLOOMZMMS adaptor (Conv2dSubsampling, then the length adaptor) or Kang
& Roy's average pooling. `min_input_samples(frame_count, downstream)` takes the encoder's frame count as a
function, so another frame-count rule of the encoder composes with the same adaptor arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

# ESPnet Conv2dSubsampling (`input_layer: conv2d`) and the BLOOMZMMS length adaptor (kernel == stride 2, 1
# layer).
DEFAULT_SUBSAMPLING_KERNEL = 3
DEFAULT_SUBSAMPLING_STRIDE = 2
DEFAULT_LENGTH_ADAPTOR_KERNEL = 2
DEFAULT_LENGTH_ADAPTOR_LAYERS = 1
MAX_SEARCH_SAMPLES = 1 << 40

Length = Callable[[int], int]


class InputTooShortError(ValueError):
    """Inputs shorter than a model's minimum; `indices` are their positions in the batch (callers name
    files)."""

    def __init__(self, message: str, indices: Sequence[int]) -> None:
        super().__init__(message)
        self.indices = list(indices)


def conv_output_length(length: Any, kernel_size: int, stride: int) -> Any:
    """Length after one unpadded convolution, `(length - kernel_size) // stride + 1` (>= 0); an int or a
    tensor."""
    out = (length - kernel_size) // stride + 1
    return out.clamp(min=0) if hasattr(out, "clamp") else max(out, 0)


def conv_stack_length(samples: int, kernels: Sequence[int], strides: Sequence[int]) -> int:
    """Frames a wav2vec2-style convolutional feature extractor makes of `samples` samples (fairseq
    arithmetic)."""
    for kernel, stride in zip(kernels, strides, strict=True):
        samples = conv_output_length(samples, kernel, stride)
    return samples


# Whisper's feature extractor (10 ms hop at 16 kHz) and its encoder's second convolution (kernel 3, stride 2,
# padding 1): openai/whisper model.py `AudioEncoder`, HF `WhisperEncoder`.
WHISPER_HOP = 160
# SeamlessM4T / w2v-BERT 2.0 Kaldi fbanks: 25 ms window, 10 ms hop at 16 kHz, no centring; 2 frames stacked.
FBANK_WINDOW = 400
FBANK_HOP = 160
FBANK_STRIDE = 2


def whisper_frame_count(samples: int, hop_length: int = WHISPER_HOP) -> int:
    """Whisper encoder frames of a clip: ceil(samples / hop) valid mel frames (the feature extractor's
    attention mask), halved by the stride-2 convolution with padding 1: ceil(mel / 2)."""
    mel = -(-samples // hop_length) if samples > 0 else 0
    return (mel - 1) // 2 + 1 if mel > 0 else 0


def fbank_frame_count(
    samples: int, window: int = FBANK_WINDOW, hop: int = FBANK_HOP, stride: int = FBANK_STRIDE
) -> int:
    """w2v-BERT 2.0 frames of a clip: 1 + (samples - window) // hop fbank frames (none under one window), then
    `stride` consecutive frames stacked into one (a trailing odd frame dropped)."""
    fbanks = conv_output_length(samples, window, hop)
    return fbanks // stride


def encoder_frame_count(encoder: dict[str, Any]) -> Length | None:
    """Samples -> frames of a speech encoder from its config.json content (None when the family is unknown):
    wav2vec2-family conv stacks, the Whisper encoder, w2v-BERT 2.0 (default hops: their feature
    extractors')."""
    model_type = encoder.get("model_type")
    if model_type == "whisper":
        return whisper_frame_count
    if model_type == "wav2vec2-bert":
        return fbank_frame_count
    if "conv_kernel" in encoder and "conv_stride" in encoder:
        kernels, strides = list(encoder["conv_kernel"]), list(encoder["conv_stride"])
        return lambda samples: conv_stack_length(samples, kernels, strides)
    return None


def adaptor_output_frames(
    frames: int,
    subsampling_kernel: int = DEFAULT_SUBSAMPLING_KERNEL,
    subsampling_stride: int = DEFAULT_SUBSAMPLING_STRIDE,
    length_adaptor_kernel: int = DEFAULT_LENGTH_ADAPTOR_KERNEL,
    length_adaptor_layers: int = DEFAULT_LENGTH_ADAPTOR_LAYERS,
) -> int:
    """Speech vectors the BLOOMZMMS adaptor makes of `frames` encoder frames: two subsampling convolutions,
    then the length adaptor's `kernel ** layers` reduction (the LID-CTC head has the same length)."""
    once = conv_output_length(frames, subsampling_kernel, subsampling_stride)
    twice = conv_output_length(once, subsampling_kernel, subsampling_stride)
    return twice // length_adaptor_kernel**length_adaptor_layers


def adaptor_frames_from_config(adaptor: dict[str, Any]) -> Length:
    """`adaptor_output_frames` with the sizes of a config `models.adaptor` section (defaults where unset)."""
    keys = ("subsampling_kernel", "subsampling_stride", "length_adaptor_kernel", "length_adaptor_layers")
    sizes = {k: adaptor[k] for k in keys if k in adaptor}
    return lambda frames: adaptor_output_frames(frames, **sizes)


def smallest_input(output_length: Length, at_least: int = 1) -> int:
    """Smallest input length whose `output_length` is at least `at_least` (output_length is
    non-decreasing)."""
    low, high = 1, 1
    while output_length(high) < at_least:
        if high > MAX_SEARCH_SAMPLES:
            raise ValueError("no input length is long enough")
        low, high = high, high * 2
    while low < high:
        middle = (low + high) // 2
        if output_length(middle) >= at_least:
            high = middle
        else:
            low = middle + 1
    return high


def min_input_samples(frame_count: Length, downstream: Length) -> int:
    """Shortest waveform (samples) from which the encoder (`frame_count`: samples -> frames) and what follows
    it (`downstream`: frames -> speech vectors) make at least one speech vector."""
    return smallest_input(lambda samples: downstream(frame_count(samples)))


def describe_min(samples: int, sampling_rate: int) -> str:
    """'0.2250 s (3600 samples at 16000 Hz)'."""
    return f"{samples / sampling_rate:.4f} s ({samples} samples at {sampling_rate} Hz)"
