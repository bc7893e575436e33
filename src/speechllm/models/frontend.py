"""Frozen self-supervised speech encoder with a learnable weighted sum of its hidden states.

BLOOMZMMS frontend (spec bloomzmms.md §2.1): MMS (HF `Wav2Vec2Model`) is frozen; an s3prl-style Featurizer
(softmax over per-layer weights initialised to zeros) mixes all `num_hidden_layers + 1` hidden states, an ESPnet
`UtteranceMVN(norm_means=True, norm_vars=False)` subtracts the per-utterance mean over the valid frames, and a
linear "preencoder" projects to `out_dim`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from speechllm.models.frames import InputTooShortError

# `torch.nn.functional.layer_norm`'s default epsilon, which fairseq/s3prl use for MMS waveform normalisation.
WAVEFORM_NORM_EPS = 1e-5


def conv_frame_lengths(config: PretrainedConfig, wav_lengths: torch.Tensor) -> torch.Tensor:
    """Frames a wav2vec2-family convolutional feature extractor (Wav2Vec2, HuBERT, MMS) makes of each waveform.

    Each layer `i` (no padding) maps L samples to floor((L - conv_kernel[i]) / conv_stride[i]) + 1, as in fairseq;
    computed from the public config rather than HF's private `_get_feat_extract_output_lengths`.

    Args:
        config: the encoder's config (`conv_kernel`, `conv_stride`; `add_adapter` must be off).
        wav_lengths: (B,) valid samples per utterance.

    Returns:
        (B,) long, valid frames per utterance (0 for a waveform shorter than the receptive field).
    """
    if getattr(config, "add_adapter", False):
        raise ValueError(f"{type(config).__name__} has add_adapter=True: its adapter frames are not counted here")
    lengths = wav_lengths.to(torch.long)
    for kernel, stride in zip(config.conv_kernel, config.conv_stride, strict=True):
        lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
    return lengths.clamp(min=0)


def lengths_to_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """Valid-position mask.

    Args:
        lengths: (B,) number of valid positions per row.
        max_length: padded length T.

    Returns:
        (B, T) bool, True on valid positions.
    """
    positions = torch.arange(max_length, device=lengths.device)
    return positions.unsqueeze(0) < lengths.unsqueeze(1)


def normalize_waveform(wav: torch.Tensor, mask: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-utterance zero-mean / unit-variance normalisation over the valid samples only.

    Equals `F.layer_norm(wav[:n], (n,), eps=eps)` applied to each utterance alone (biased variance).

    Args:
        wav: (B, N) waveform.
        mask: (B, N) bool, True on valid samples.
        eps: added to the variance.

    Returns:
        (B, N) normalised waveform with padded samples set to 0.
    """
    valid = mask.to(wav.dtype)
    num_valid = valid.sum(dim=1, keepdim=True).clamp(min=1)
    mean = (wav * valid).sum(dim=1, keepdim=True) / num_valid
    centered = (wav - mean) * valid
    var = centered.pow(2).sum(dim=1, keepdim=True) / num_valid
    return centered * torch.rsqrt(var + eps)


def subtract_utterance_mean(feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ESPnet `UtteranceMVN(norm_means=True, norm_vars=False)`: subtract the mean over the valid frames.

    Args:
        feats: (B, T, D) features.
        mask: (B, T) bool, True on valid frames.

    Returns:
        (B, T, D) mean-subtracted features with padded frames set to 0.
    """
    valid = mask.unsqueeze(-1).to(feats.dtype)
    num_valid = valid.sum(dim=1, keepdim=True).clamp(min=1)
    mean = (feats * valid).sum(dim=1, keepdim=True) / num_valid
    return (feats - mean) * valid


class SpeechFrontend(nn.Module):
    """Frozen speech encoder -> softmax-weighted layer sum -> utterance mean subtraction -> Linear.

    Args:
        encoder: HF speech model returning `hidden_states` (e.g. `Wav2Vec2Model` for MMS, `HubertModel`).
            It is frozen and always kept in eval mode.
        out_dim: output feature size (BLOOMZMMS preencoder: 128).
        normalize_waveform: per-utterance waveform normalisation before the encoder (MMS `normalize=True`).
        waveform_norm_eps: epsilon of that normalisation.
    """

    def __init__(
        self,
        encoder: PreTrainedModel,
        out_dim: int,
        normalize_waveform: bool,
        waveform_norm_eps: float = WAVEFORM_NORM_EPS,
    ) -> None:
        super().__init__()
        if getattr(encoder.config, "add_adapter", False):
            raise ValueError("encoders with a length-changing `add_adapter` are not supported")
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.normalize_waveform = normalize_waveform
        self.waveform_norm_eps = waveform_norm_eps
        self.num_hidden_states = encoder.config.num_hidden_layers + 1
        self.layer_weights = nn.Parameter(torch.zeros(self.num_hidden_states))
        self.proj = nn.Linear(encoder.config.hidden_size, out_dim)

    def train(self, mode: bool = True) -> SpeechFrontend:
        """Set train/eval mode for the trainable parts; the frozen encoder stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    def output_lengths(self, wav_lengths: torch.Tensor) -> torch.Tensor:
        """Frame counts of the encoder's convolutional feature extractor.

        Args:
            wav_lengths: (B,) valid samples per utterance.

        Returns:
            (B,) long, valid frames per utterance.
        """
        return conv_frame_lengths(self.encoder.config, wav_lengths)

    @torch.no_grad()
    def encode_hidden_states(self, wav: torch.Tensor, wav_lengths: torch.Tensor) -> torch.Tensor:
        """Run the frozen encoder and stack all its hidden states.

        Args:
            wav: (B, N) float waveform.
            wav_lengths: (B,) valid samples per utterance.

        Returns:
            (S, B, T0, D) hidden states, S = num_hidden_layers + 1: the input of every transformer layer followed by
            the encoder output (after the final LayerNorm of stable-layer-norm encoders).
        """
        sample_mask = lengths_to_mask(wav_lengths, wav.shape[1])
        if self.normalize_waveform:
            wav = normalize_waveform(wav, sample_mask, self.waveform_norm_eps)
        else:
            wav = wav.masked_fill(~sample_mask, 0.0)
        encoder_dtype = next(self.encoder.parameters()).dtype
        outputs = self.encoder(
            wav.to(encoder_dtype),
            attention_mask=sample_mask.long(),
            output_hidden_states=True,
            return_dict=True,
        )
        hidden_states = list(outputs.hidden_states)
        # transformers 5 records the last layer's raw output; s3prl/ESPnet use the final (layer-normed) encoder output.
        hidden_states[-1] = outputs.last_hidden_state
        if len(hidden_states) != self.num_hidden_states:
            raise RuntimeError(f"expected {self.num_hidden_states} hidden states, got {len(hidden_states)}")
        return torch.stack(hidden_states, dim=0)

    def forward(self, wav: torch.Tensor, wav_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a padded waveform batch.

        Args:
            wav: (B, N) float32 waveform, right-padded.
            wav_lengths: (B,) long, valid samples per utterance.

        Returns:
            feats: (B, T0, out_dim), padded frames set to 0.
            feat_lengths: (B,) long, valid frames per utterance.
        """
        feat_lengths = self.output_lengths(wav_lengths)
        too_short = (feat_lengths < 1).nonzero().flatten().tolist()
        if too_short:
            raise InputTooShortError(f"utterance too short for the encoder: wav_lengths={wav_lengths.tolist()}",
                                     too_short)
        hidden_states = self.encode_hidden_states(wav, wav_lengths).to(self.proj.weight.dtype)
        weights = torch.softmax(self.layer_weights, dim=0)
        feats = torch.einsum("s,sbtd->btd", weights, hidden_states)
        frame_mask = lengths_to_mask(feat_lengths, feats.shape[1])
        feats = subtract_utterance_mean(feats, frame_mask)
        feats = self.proj(feats) * frame_mask.unsqueeze(-1).to(feats.dtype)
        return feats, feat_lengths
