"""Kang & Roy audio encoder: trainable HuBERT -> average pooling over time -> Linear into the LLM's embedding
space.

Spec speech-summarization.md §1.2: `HubertModel` (`facebook/hubert-large-ls960-ft` at scale, CTC head
discarded) is fully trainable and, in train mode, applies its config's SpecAugment time masking and LayerDrop.
It reads the raw, un-normalised waveform (right zero-padded). `AvgPool1d(8, 4)` turns 20 ms frames into one
LLM "token" per 80 ms and `Linear(1024 -> 3072)` (with bias) projects into MiniChat's embedding space.

Unlike the reference (batch size 1, no attention mask), batches pass an attention mask to HuBERT, and only
pooling windows that lie entirely inside an utterance's valid frames are kept, so an utterance's output does
not depend on what else is in the batch (for layer-norm conv extractors such as HuBERT-large's; a group-norm
extractor, as in HuBERT-base, normalises over time and sees the padding). Attribute names (`encoder`,
`embed_projection`) match the reference's `AudioEncoder`, so its released `state_dict` loads by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from speechllm.models.encoder_inputs import EncoderInputs, encoder_only, input_family
from speechllm.models.frames import InputTooShortError, smallest_input
from speechllm.models.frontend import conv_frame_lengths, lengths_to_mask


@dataclass
class PoolConfig:
    """Average pooling over encoder frames (reference `config_full.yaml`: kernel 8, stride 4)."""

    kernel_size: int = 8
    stride: int = 4

    def __post_init__(self) -> None:
        if self.kernel_size < 1 or self.stride < 1:
            raise ValueError(f"pooling kernel_size and stride must be >= 1, got {self}")

    def output_length(self, frames: torch.Tensor) -> torch.Tensor:
        """(B,) valid frames -> (B,) pooled frames `floor((T - k) / s) + 1`, 0 when T < k."""
        pooled = torch.div(frames - self.kernel_size, self.stride, rounding_mode="floor") + 1
        return pooled.clamp(min=0)


class HubertPoolEncoder(nn.Module):
    """Trainable HF speech encoder -> AvgPool1d over time -> Linear(hidden -> llm_hidden_size).

    Args:
        encoder: HF `HubertModel` (any wav2vec2-family model with `last_hidden_state` works). Trainable; its
            SpecAugment (`apply_spec_augment`, `mask_time_prob`, ...) and `layerdrop` act in train mode as in
            HF.
        llm_hidden_size: size of the LLM's input embeddings (MiniChat-2-3B: 3072).
        pool: pooling kernel and stride.
        feature_extractor: the encoder's own feature extractor, for the log-mel families (Whisper encoder,
            w2v-BERT 2.0; see encoder_inputs); an encoder-decoder model is cut to its encoder.
    """

    def __init__(
        self,
        encoder: PreTrainedModel,
        llm_hidden_size: int,
        pool: PoolConfig | None = None,
        feature_extractor: object | None = None,
    ) -> None:
        super().__init__()
        encoder = encoder_only(encoder)
        family = input_family(encoder.config)
        self.features = None if family == "waveform" else EncoderInputs(encoder.config, feature_extractor)
        self.encoder = encoder
        self.pool = pool or PoolConfig()
        self.pooling_layer = nn.AvgPool1d(self.pool.kernel_size, self.pool.stride)
        self.embed_projection = nn.Linear(encoder.config.hidden_size, llm_hidden_size)

    def frame_lengths(self, wav_lengths: torch.Tensor) -> torch.Tensor:
        """(B,) valid samples -> (B,) long valid encoder frames (conv feature extractor or log-mel
        arithmetic)."""
        if self.features is not None:
            return self.features.frame_lengths(wav_lengths)
        return conv_frame_lengths(self.encoder.config, wav_lengths)

    def output_lengths(self, wav_lengths: torch.Tensor) -> torch.Tensor:
        """(B,) valid samples -> (B,) long number of speech embeddings per utterance."""
        return self.pool.output_length(self.frame_lengths(wav_lengths))

    def min_samples(self) -> int:
        """Shortest waveform (samples) that yields one speech embedding."""
        return smallest_input(lambda samples: int(self.output_lengths(torch.tensor([samples]))[0]))

    def forward(self, wav: torch.Tensor, wav_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a right-padded raw waveform batch.

        Args:
            wav: (B, N) float waveform at the encoder's rate (not normalised; padding is zeroed here).
            wav_lengths: (B,) long valid samples per utterance.

        Returns:
            speech: (B, T_pool, llm_hidden_size); rows past an utterance's length are padding (set to 0).
            speech_lengths: (B,) long valid speech embeddings per utterance.
        """
        speech_lengths = self.output_lengths(wav_lengths)
        too_short = (speech_lengths < 1).nonzero().flatten().tolist()
        if too_short:
            raise InputTooShortError(
                f"utterance too short for the encoder + pooling: wav_lengths={wav_lengths.tolist()} "
                f"(need >= {self.min_samples()} samples)",
                too_short,
            )
        encoder_dtype = next(self.encoder.parameters()).dtype
        if self.features is not None:
            inputs = self.features(wav, wav_lengths, encoder_dtype)
        else:
            sample_mask = lengths_to_mask(wav_lengths, wav.shape[1])
            wav = wav.masked_fill(~sample_mask, 0.0).to(encoder_dtype)
            inputs = {"input_values": wav, "attention_mask": sample_mask.long()}
        hidden = self.encoder(**inputs, return_dict=True).last_hidden_state
        hidden = hidden[:, : int(self.frame_lengths(wav_lengths).max())]  # Whisper: its 30 s window, cut
        pooled = self.pooling_layer(hidden.transpose(1, 2)).transpose(1, 2)  # (B, T_pool, D)
        speech = self.embed_projection(pooled)
        # Windows that reach into padding are not part of the utterance.
        valid = lengths_to_mask(speech_lengths, speech.shape[1]).unsqueeze(-1)
        return speech * valid.to(speech.dtype), speech_lengths
