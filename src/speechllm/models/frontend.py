"""Frozen self-supervised speech encoder with a learnable weighted sum of its hidden states.

BLOOMZMMS frontend (spec bloomzmms.md §2.1): MMS (HF `Wav2Vec2Model`) is frozen; an s3prl-style Featurizer
(softmax over per-layer weights initialised to zeros) mixes all `num_hidden_layers + 1` hidden states, an
ESPnet `UtteranceMVN(norm_means=True, norm_vars=False)` subtracts the per-utterance mean over the valid
frames, and a linear "preencoder" projects to `out_dim`.

Two settings decide how close the features are to the reference's s3prl frontend (config
`models.speech_encoder`): `language_adapters` (MMS-1B-all's per-layer attention adapters; the reference's
s3prl model has none) and `frame_count` (`conv`: the frames the convolutions make; `s3prl`: ceil(L / hop), the
last frame repeated).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from speechllm.models.encoder_inputs import EncoderInputs, encoder_only, input_family
from speechllm.models.frames import InputTooShortError

# `torch.nn.functional.layer_norm`'s default epsilon, which fairseq/s3prl use for MMS waveform normalisation.
WAVEFORM_NORM_EPS = 1e-5
# s3prl's S3PRLUpstream zero-pads waveforms shorter than MIN_SECOND (0.05 s) x 16 kHz before the upstream
# (s3prl/s3prl@v0.4.10:s3prl/nn/upstream.py, `forward`).
S3PRL_MIN_SAMPLES = 800
FRAME_COUNTS = ("conv", "s3prl")


def without_language_adapters(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of a speech encoder's config without MMS's per-layer attention adapters
    (`adapter_attn_dim=None`).

    HF's `facebook/mms-1b-all` config adds an adapter to each of its 48 layers, loaded with the English
    weights; the reference's s3prl `wav2vec2_custom` model (a fairseq `Wav2Vec2Model`) has none, so the
    adapter weights of a checkpoint are left unused. Configs without adapters are returned unchanged.
    """
    if getattr(config, "adapter_attn_dim", None) is None:
        return config
    config = copy.deepcopy(config)
    config.adapter_attn_dim = None
    return config


def frame_hop(config: PretrainedConfig) -> int:
    """Samples per frame of a wav2vec2-family feature extractor (product of the conv strides; MMS: 320)."""
    return math.prod(config.conv_stride)


def s3prl_frame_lengths(config: PretrainedConfig, wav_lengths: torch.Tensor) -> torch.Tensor:
    """Frames s3prl's S3PRLUpstream reports: ceil(L / hop) = (L - 1) // hop + 1 (0 for L = 0).

    s3prl/s3prl@v0.4.10:s3prl/nn/upstream.py `forward`: `h_len = (wavs_len - 1) // stride + 1`, computed from
    the waveform lengths before its short-input padding; the upstream's own frames are 1-2 fewer, and the
    missing ones repeat the last frame (`_match_length`).
    """
    lengths = wav_lengths.to(torch.long)
    frames = torch.div(lengths - 1, frame_hop(config), rounding_mode="floor") + 1
    return torch.where(lengths > 0, frames, torch.zeros_like(frames))


def check_frame_count(frame_count: str) -> str:
    if frame_count not in FRAME_COUNTS:
        raise ValueError(
            f"unknown frame count {frame_count!r} (config key models.speech_encoder.frame_count: "
            f"{' | '.join(FRAME_COUNTS)})"
        )
    return frame_count


def frame_lengths(config: PretrainedConfig, wav_lengths: torch.Tensor, frame_count: str) -> torch.Tensor:
    """Frames per utterance the frontend outputs under `frame_count` (config
    models.speech_encoder.frame_count)."""
    if check_frame_count(frame_count) == "s3prl":
        return s3prl_frame_lengths(config, wav_lengths)
    return conv_frame_lengths(config, wav_lengths)


def repeat_last_frames(feats: torch.Tensor, valid: torch.Tensor, max_length: int) -> torch.Tensor:
    """Extend each utterance's frames to `max_length` by repeating its last valid frame.

    Args:
        feats: (B, T, D) frames.
        valid: (B,) frames the encoder computed from each utterance's own samples (>= 1).
        max_length: output length.

    Returns:
        (B, max_length, D): frame t of utterance b is frame min(t, valid[b] - 1). s3prl repeats the last
        frame of the padded batch, which is the utterance's own last frame at batch size 1 (ESPnet inference);
        taking each utterance's own keeps the features independent of the batch.
    """
    positions = torch.arange(max_length, device=feats.device).unsqueeze(0)  # (1, T')
    source = torch.minimum(positions, (valid.to(feats.device) - 1).clamp(min=0).unsqueeze(1))  # (B, T')
    return torch.gather(feats, 1, source.unsqueeze(-1).expand(-1, -1, feats.shape[-1]))


def conv_frame_lengths(config: PretrainedConfig, wav_lengths: torch.Tensor) -> torch.Tensor:
    """Frames a wav2vec2-family convolutional feature extractor (Wav2Vec2, HuBERT, MMS) makes of each
    waveform.

    Each layer `i` (no padding) maps L samples to floor((L - conv_kernel[i]) / conv_stride[i]) + 1, as in
    fairseq; computed from the public config rather than HF's private `_get_feat_extract_output_lengths`.

    Args:
        config: the encoder's config (`conv_kernel`, `conv_stride`; `add_adapter` must be off).
        wav_lengths: (B,) valid samples per utterance.

    Returns:
        (B,) long, valid frames per utterance (0 for a waveform shorter than the receptive field).
    """
    if getattr(config, "add_adapter", False):
        raise ValueError(
            f"{type(config).__name__} has add_adapter=True: its adapter frames are not counted here"
        )
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
        frame_count: "conv" (the frames the encoder's convolutions make) or "s3prl" (ceil(L / hop) frames, the
            last one repeated, inputs under 0.05 s zero-padded: the reference's s3prl frontend).
        feature_extractor: the encoder's own feature extractor, required by (and only used for) the log-mel
            families (Whisper encoder, w2v-BERT 2.0; see encoder_inputs). An encoder-decoder model
            (WhisperModel) is cut to its encoder. The layer sum and the projection follow the encoder's layer
            count and width.
    """

    def __init__(
        self,
        encoder: PreTrainedModel,
        out_dim: int,
        normalize_waveform: bool,
        waveform_norm_eps: float = WAVEFORM_NORM_EPS,
        frame_count: str = "conv",
        feature_extractor: object | None = None,
    ) -> None:
        super().__init__()
        encoder = encoder_only(encoder)
        if getattr(encoder.config, "add_adapter", False):
            raise ValueError("encoders with a length-changing `add_adapter` are not supported")
        self.family = input_family(encoder.config)
        self.features = (
            None if self.family == "waveform" else EncoderInputs(encoder.config, feature_extractor)
        )
        if self.features is not None and (normalize_waveform or frame_count != "conv"):
            raise ValueError(
                f"a {self.family} encoder reads its feature extractor's normalised log-mel features: "
                "models.speech_encoder.normalize_waveform must be false and frame_count conv"
            )
        self.encoder = encoder
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.normalize_waveform = normalize_waveform
        self.waveform_norm_eps = waveform_norm_eps
        self.frame_count = check_frame_count(frame_count)
        self.num_hidden_states = encoder.config.num_hidden_layers + 1
        self.layer_weights = nn.Parameter(torch.zeros(self.num_hidden_states))
        self.proj = nn.Linear(encoder.config.hidden_size, out_dim)

    def train(self, mode: bool = True) -> SpeechFrontend:
        """Set train/eval mode for the trainable parts; the frozen encoder stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    def output_lengths(self, wav_lengths: torch.Tensor) -> torch.Tensor:
        """Frames per utterance under the frame count (`conv`: the convolutional feature extractor's).

        Args:
            wav_lengths: (B,) valid samples per utterance.

        Returns:
            (B,) long, valid frames per utterance.
        """
        if self.features is not None:
            return self.features.frame_lengths(wav_lengths)
        return frame_lengths(self.encoder.config, wav_lengths, self.frame_count)

    def encoder_input(
        self, wav: torch.Tensor, wav_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The waveforms the encoder reads: under `s3prl`, utterances under 0.05 s get zeros appended to 800
        samples, which count as valid (normalised with the speech), as s3prl's short-input padding at batch
        size 1.
        """
        if self.frame_count != "s3prl" or not bool((wav_lengths < S3PRL_MIN_SAMPLES).any()):
            return wav, wav_lengths
        wav = wav.masked_fill(~lengths_to_mask(wav_lengths, wav.shape[1]), 0.0)
        if wav.shape[1] < S3PRL_MIN_SAMPLES:
            wav = nn.functional.pad(wav, (0, S3PRL_MIN_SAMPLES - wav.shape[1]))
        return wav, wav_lengths.clamp(min=S3PRL_MIN_SAMPLES)

    @torch.no_grad()
    def encode_hidden_states(self, wav: torch.Tensor, wav_lengths: torch.Tensor) -> torch.Tensor:
        """Run the frozen encoder and stack all its hidden states.

        Args:
            wav: (B, N) float waveform.
            wav_lengths: (B,) valid samples per utterance.

        Returns:
            (S, B, T0, D) hidden states, S = num_hidden_layers + 1: the input of every transformer layer
            followed by the encoder output (after the final LayerNorm of stable-layer-norm encoders).
        """
        encoder_dtype = next(self.encoder.parameters()).dtype
        if self.features is not None:
            inputs = self.features(wav, wav_lengths, encoder_dtype)
        else:
            sample_mask = lengths_to_mask(wav_lengths, wav.shape[1])
            if self.normalize_waveform:
                wav = normalize_waveform(wav, sample_mask, self.waveform_norm_eps)
            else:
                wav = wav.masked_fill(~sample_mask, 0.0)
            inputs = {"input_values": wav.to(encoder_dtype), "attention_mask": sample_mask.long()}
        outputs = self.encoder(**inputs, output_hidden_states=True, return_dict=True)
        hidden_states = list(outputs.hidden_states)
        # transformers 5 records the last layer's raw output; s3prl/ESPnet use the final (layer-normed)
        # encoder output.
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
            raise InputTooShortError(
                f"utterance too short for the encoder: wav_lengths={wav_lengths.tolist()}", too_short
            )
        wav, encoder_lengths = self.encoder_input(wav, wav_lengths)
        hidden_states = self.encode_hidden_states(wav, encoder_lengths).to(self.proj.weight.dtype)
        hidden_states = hidden_states[:, :, : int(feat_lengths.max())]  # Whisper: its 30 s window, cut
        weights = torch.softmax(self.layer_weights, dim=0)
        feats = torch.einsum("s,sbtd->btd", weights, hidden_states)
        if self.frame_count == "s3prl":  # repeating a frame commutes with the per-frame layer sum
            computed = conv_frame_lengths(self.encoder.config, encoder_lengths)
            feats = repeat_last_frames(feats, computed, int(feat_lengths.max()))
        frame_mask = lengths_to_mask(feat_lengths, feats.shape[1])
        feats = subtract_utterance_mean(feats, frame_mask)
        feats = self.proj(feats) * frame_mask.unsqueeze(-1).to(feats.dtype)
        return feats, feat_lengths
