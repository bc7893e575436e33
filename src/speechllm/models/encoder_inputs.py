"""What a speech encoder family reads and how many frames it makes: raw waveform or its own log-mel features.

Three input families cover the encoders the project takes by config (`models.speech_encoder.name_or_path`):

- `waveform`: wav2vec2-family models (Wav2Vec2 / MMS, HuBERT, WavLM, Data2VecAudio) read the waveform through
  a convolutional feature extractor; frames follow its `conv_kernel` / `conv_stride`
  (frames.conv_stack_length).
- `whisper`: the Whisper encoder reads the 30 s log-mel spectrogram of its `WhisperFeatureExtractor` (every
  clip padded to `chunk_length` seconds, hop `hop_length`), then two convolutions (stride 1, then 2): one
  frame per two mel frames. The encoder always sees the whole padded window, so a clip's frames do not depend
  on the batch.
- `w2v-bert`: `Wav2Vec2BertModel` (w2v-BERT 2.0) reads the Kaldi-style 80-bin fbanks of its
  `SeamlessM4TFeatureExtractor` (25 ms windows, 10 ms hop, no centring), two consecutive frames stacked
  (`stride`).

The log-mel families take their features from the encoder's own feature extractor (`AutoFeatureExtractor`,
`preprocessor_config.json` beside the model), which normalises them itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel

from speechllm.models.frames import fbank_frame_count, whisper_frame_count

INPUT_FAMILIES = ("waveform", "whisper", "w2v-bert")
LOG_MEL_FAMILIES = ("whisper", "w2v-bert")


def input_family(config: PretrainedConfig) -> str:
    """The input family of a speech encoder's config (see the module docstring)."""
    model_type = getattr(config, "model_type", "")
    if model_type == "whisper":
        return "whisper"
    if model_type == "wav2vec2-bert":
        return "w2v-bert"
    if hasattr(config, "conv_kernel") and hasattr(config, "conv_stride"):
        return "waveform"
    raise ValueError(
        f"unsupported speech encoder {type(config).__name__} (model_type {model_type!r}): "
        "models.speech_encoder must be a wav2vec2-family model (Wav2Vec2, HuBERT, WavLM), the "
        "Whisper encoder or Wav2Vec2BertModel"
    )


def encoder_only(model: PreTrainedModel) -> PreTrainedModel:
    """The encoder of an encoder-decoder speech model (`WhisperModel` -> `WhisperEncoder`); others
    unchanged."""
    if getattr(model.config, "is_encoder_decoder", False):
        return model.get_encoder()
    return model


class EncoderInputs:
    """Turns right-padded waveforms into a log-mel encoder's keyword inputs and counts its frames.

    Args:
        config: the encoder's config (model_type `whisper` or `wav2vec2-bert`).
        feature_extractor: its `WhisperFeatureExtractor` / `SeamlessM4TFeatureExtractor`.
    """

    def __init__(self, config: PretrainedConfig, feature_extractor: Any) -> None:
        self.family = input_family(config)
        if self.family not in LOG_MEL_FAMILIES:
            raise ValueError(f"{self.family} encoders read the waveform itself: no feature extractor is used")
        if feature_extractor is None:
            raise ValueError(
                f"a {self.family} encoder needs its feature extractor (preprocessor_config.json "
                "beside models.speech_encoder.name_or_path)"
            )
        self.config = config
        self.feature_extractor = feature_extractor
        self.sampling_rate = int(feature_extractor.sampling_rate)

    @property
    def max_samples(self) -> int | None:
        """Longest clip the encoder reads whole (Whisper: its `chunk_length` window), None without a limit."""
        return int(self.feature_extractor.n_samples) if self.family == "whisper" else None

    def frame_count(self, samples: int) -> int:
        """Encoder frames of a clip of `samples` samples."""
        fe = self.feature_extractor
        if self.family == "whisper":
            return whisper_frame_count(samples, int(fe.hop_length))
        return fbank_frame_count(samples, stride=int(fe.stride))

    def frame_lengths(self, wav_lengths: torch.Tensor) -> torch.Tensor:
        """(B,) valid samples -> (B,) long valid encoder frames."""
        return torch.tensor(
            [self.frame_count(int(n)) for n in wav_lengths.tolist()],
            dtype=torch.long,
            device=wav_lengths.device,
        )

    def check_lengths(self, wav_lengths: torch.Tensor) -> None:
        limit = self.max_samples
        if limit is not None and int(wav_lengths.max()) > limit:
            raise ValueError(
                f"a clip of {int(wav_lengths.max())} samples is longer than the Whisper encoder's "
                f"{limit}-sample window ({limit / self.sampling_rate:g} s); split it or drop it "
                "(data.max_duration)"
            )

    def __call__(
        self, wav: torch.Tensor, wav_lengths: torch.Tensor, dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """Keyword inputs of the encoder's forward for a (B, N) right-padded waveform batch."""
        self.check_lengths(wav_lengths)
        clips = [
            wav[i, : int(n)].detach().float().cpu().numpy().astype(np.float32)
            for i, n in enumerate(wav_lengths.tolist())
        ]
        features = self.feature_extractor(
            clips, sampling_rate=self.sampling_rate, return_attention_mask=True, return_tensors="pt"
        )
        inputs = {"input_features": features["input_features"].to(wav.device, dtype)}
        if self.family == "w2v-bert":  # the Whisper encoder reads the whole window, with no mask
            inputs["attention_mask"] = features["attention_mask"].to(wav.device)
        return inputs
