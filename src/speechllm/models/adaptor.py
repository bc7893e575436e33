"""Trainable speech adaptor between the frozen MMS features and the frozen LLM (BLOOMZMMS spec §2.1-2.3).

Data flow (frame rates for 20 ms input frames)::

    feats (B, T0, input_dim)
     -> Conv2dSubsampling + RelPositionalEncoding                    (B, T1, d)     80 ms
     -> E-Branchformer blocks 1..interctc_layer
     -> LID-CTC head: LengthAdaptor + Linear(d -> num_lid_classes)  lid_logits (B, T1//2, C)
        self-conditioning: x += conditioning_layer(upsample(softmax(lid_logits)))
     -> remaining E-Branchformer blocks, after_norm LayerNorm(d)
     -> post-encoder: LengthAdaptor (Conv1d k 2 s 2 + ReLU) + Linear(d -> llm_hidden_size)
                                                                     speech (B, T2, llm_hidden)  160 ms

This equals ESPnet's ``EBranchformerEncoder`` (``interctc_use_conditioning``), the BLOOMZMMS overlay's
``lid_ctc`` (``CTC(odim=140, length_adaptor_n_layers=1)``) and its ``hugging_face_transformers``
post-encoder with ``model_name_or_path: dummy``. Module names follow ESPnet (``embed``, ``encoders``,
``after_norm``, ``conditioning_layer``, ``lid_ctc.length_adaptor``, ``lid_ctc.ctc_lo``,
``postencoder.length_adaptor``, ``postencoder.linear_in``) so checkpoints can be mapped by name.

Unlike ESPnet, the adaptor is padding invariant: the valid outputs of an utterance do not depend on
what else is in the batch (see ``upsample_nearest`` and ``speechllm.models.ebranchformer``).

There is no layer drop. The reference's ``encoder_conf`` sets ``layer_drop_rate: 0.1``
(DigitalPhonetics/bloomzmms@77dc192:espnet-bloomzmms-files/egs2/fleurs/asr1/conf/tuning/
train_asr_e_branchformer_mms1b-asr_bloomz7b_{ctc,aed}.yaml), but ESPnet v.202304's ``EBranchformerEncoder``
drops layers only inside ``MultiSequential.forward``, which it calls when ``interctc_layer_idx`` is empty.
With ``interctc_layer_idx: [3]`` it loops over the blocks itself and runs every block, so the setting never
takes effect.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from speechllm.models.ebranchformer import EBranchformerLayer
from speechllm.models.frames import (
    DEFAULT_LENGTH_ADAPTOR_KERNEL,
    DEFAULT_LENGTH_ADAPTOR_LAYERS,
    DEFAULT_SUBSAMPLING_KERNEL,
    DEFAULT_SUBSAMPLING_STRIDE,
    InputTooShortError,
    adaptor_output_frames,
    smallest_input,
)
from speechllm.models.positional import RelPositionalEncoding
from speechllm.models.subsampling import Conv2dSubsampling


def lid_class_count(configured: int | None, languages: int) -> int:
    """Classes of the LID-CTC head: `configured` (config models.adaptor.lid_classes; the reference: 140 =
    139 languages + blank), or, when None, the `languages` of the data + the CTC blank 0."""
    needed = languages + 1
    if configured is None:
        return needed
    if configured < needed:
        raise ValueError(
            f"models.adaptor.lid_classes is {configured}, but the data has {languages} languages "
            "(+ the blank)"
        )
    return configured


def adaptor_config(sizes: Mapping[str, Any], languages: int, **fields: Any) -> AdaptorConfig:
    """AdaptorConfig from a config `models.adaptor` section, its `lid_classes` resolved for the data's
    `languages` (lid_class_count), and further `fields` (llm_hidden_size, ...)."""
    sizes = dict(sizes)
    lid_classes = lid_class_count(sizes.pop("lid_classes", None), languages)
    return AdaptorConfig(**sizes, num_lid_classes=lid_classes, **fields)


@dataclass
class AdaptorConfig:
    """Sizes of the speech adaptor; defaults are the paper's (ESPnet yaml ``encoder_conf`` etc.)."""

    input_dim: int = 128  # preencoder output (Linear 1280 -> 128)
    d_model: int = 1024
    heads: int = 8
    linear_units: int = 2048  # macaron / plain FFN hidden size
    cgmlp_units: int = 8192
    cgmlp_kernel: int = 31
    merge_kernel: int = 31
    num_blocks: int = 17
    dropout: float = 0.1
    pos_dropout: float = 0.1
    attn_dropout: float = 0.1
    interctc_layer: int = 3  # 1-based: LID-CTC + self-conditioning after this block
    num_lid_classes: int = 140  # 139 languages + CTC blank 0
    llm_hidden_size: int = 4096
    subsampling_kernel: int = DEFAULT_SUBSAMPLING_KERNEL
    subsampling_stride: int = DEFAULT_SUBSAMPLING_STRIDE
    length_adaptor_kernel: int = (
        DEFAULT_LENGTH_ADAPTOR_KERNEL  # kernel == stride of each length-adaptor Conv1d
    )
    length_adaptor_layers: int = (
        DEFAULT_LENGTH_ADAPTOR_LAYERS  # same for the post-encoder and the LID-CTC head
    )
    layer_norm_eps: float = 1e-12  # ESPnet's LayerNorm default

    def __post_init__(self) -> None:
        if not 1 <= self.interctc_layer < self.num_blocks:
            raise ValueError(
                f"interctc_layer must be in [1, {self.num_blocks}) (1-based, not the last block), "
                f"got {self.interctc_layer}"
            )

    def output_frames(self, frames: int) -> int:
        """Speech vectors (and LID-CTC frames) made of `frames` input frames."""
        return adaptor_output_frames(
            frames,
            self.subsampling_kernel,
            self.subsampling_stride,
            self.length_adaptor_kernel,
            self.length_adaptor_layers,
        )

    @property
    def length_adaptor_ratio(self) -> int:
        """Time reduction of one length adaptor stack."""
        return self.length_adaptor_kernel**self.length_adaptor_layers


class AdaptorOutput(NamedTuple):
    """speech (B, T2, llm_hidden), speech_lengths (B,), lid_logits (B, T1//2, C), lid_lengths (B,)."""

    speech: torch.Tensor
    speech_lengths: torch.Tensor
    lid_logits: torch.Tensor
    lid_lengths: torch.Tensor


def lengths_to_mask(lengths: torch.Tensor, max_length: int) -> torch.Tensor:
    """lengths (B,) -> (B, max_length) bool, True at valid frames."""
    return torch.arange(max_length, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def upsample_nearest(
    x: torch.Tensor, source_lengths: torch.Tensor, target_lengths: torch.Tensor, target_max: int
) -> torch.Tensor:
    """Per-utterance nearest-neighbour upsampling along time.

    x (B, S, C), source_lengths (B,), target_lengths (B,) -> (B, target_max, C) with
    ``out[b, t] = x[b, floor(t * source_lengths[b] / target_lengths[b])]``.

    For an unpadded batch this is ``F.interpolate(x.transpose(1, 2), target_max)`` (mode ``nearest``),
    which ESPnet applies with the *batch* lengths; using each utterance's own lengths keeps the result
    independent of padding. Padded target frames repeat the last valid source frame.
    """
    target = torch.arange(target_max, device=x.device).unsqueeze(0)  # (1, T)
    source = torch.div(
        target * source_lengths.unsqueeze(1), target_lengths.clamp(min=1).unsqueeze(1), rounding_mode="floor"
    )
    last_valid = (source_lengths - 1).clamp(min=0).unsqueeze(1)
    source = torch.minimum(source, last_valid).clamp(max=x.size(1) - 1)  # (B, T)
    return torch.gather(x, 1, source.unsqueeze(-1).expand(-1, -1, x.size(-1)))


class LengthAdaptor(nn.Sequential):
    """``num_layers`` x (Conv1d(d, d, k, stride k) + ReLU) over time (Li et al., ACL 2021)."""

    def __init__(self, d_model: int, num_layers: int, kernel_size: int) -> None:
        layers: list[nn.Module] = []
        for _ in range(num_layers):
            layers += [nn.Conv1d(d_model, d_model, kernel_size, kernel_size), nn.ReLU()]
        super().__init__(*layers)
        self.ratio = kernel_size**num_layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, d) -> (B, T // ratio, d)."""
        return super().forward(x.transpose(1, 2)).transpose(1, 2)

    def output_length(self, lengths: torch.Tensor) -> torch.Tensor:
        """lengths (B,) -> floor(lengths / ratio) (B,)."""
        return torch.div(lengths, self.ratio, rounding_mode="floor")


class LidCtcHead(nn.Module):
    """Intermediate language-ID CTC head: LengthAdaptor then Linear(d -> num_lid_classes), with bias."""

    def __init__(self, config: AdaptorConfig) -> None:
        super().__init__()
        self.length_adaptor = LengthAdaptor(
            config.d_model, config.length_adaptor_layers, config.length_adaptor_kernel
        )
        self.ctc_lo = nn.Linear(config.d_model, config.num_lid_classes)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T1, d), lengths (B,) -> logits (B, T1 // 2, C), lengths (B,)."""
        return self.ctc_lo(self.length_adaptor(x)), self.length_adaptor.output_length(lengths)


class SpeechPostEncoder(nn.Module):
    """LengthAdaptor then Linear(d -> llm_hidden_size): one speech embedding per 160 ms."""

    def __init__(self, config: AdaptorConfig) -> None:
        super().__init__()
        self.length_adaptor = LengthAdaptor(
            config.d_model, config.length_adaptor_layers, config.length_adaptor_kernel
        )
        self.linear_in = nn.Linear(config.d_model, config.llm_hidden_size)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T1, d), lengths (B,) -> (B, T1 // 2, llm_hidden), lengths (B,)."""
        return self.linear_in(self.length_adaptor(x)), self.length_adaptor.output_length(lengths)


class SpeechAdaptor(nn.Module):
    """Conv2dSubsampling -> E-Branchformer (with LID self-conditioning) -> post-encoder."""

    def __init__(self, config: AdaptorConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = Conv2dSubsampling(
            config.input_dim, config.d_model, config.subsampling_kernel, config.subsampling_stride
        )
        self.pos_enc = RelPositionalEncoding(config.d_model, config.pos_dropout)
        self.encoders = nn.ModuleList(
            EBranchformerLayer(
                d_model=config.d_model,
                num_heads=config.heads,
                linear_units=config.linear_units,
                cgmlp_units=config.cgmlp_units,
                cgmlp_kernel=config.cgmlp_kernel,
                merge_kernel=config.merge_kernel,
                dropout=config.dropout,
                attn_dropout=config.attn_dropout,
                layer_norm_eps=config.layer_norm_eps,
            )
            for _ in range(config.num_blocks)
        )
        self.after_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.lid_ctc = LidCtcHead(config)
        self.conditioning_layer = nn.Linear(config.num_lid_classes, config.d_model)
        self.postencoder = SpeechPostEncoder(config)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (works on the ``meta`` device)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def min_input_frames(self) -> int:
        """Shortest input (in frames) whose subsampled length survives the length adaptors."""
        return smallest_input(self.config.output_frames)

    def lid_conditioning(
        self, lid_logits: torch.Tensor, lid_lengths: torch.Tensor, lengths: torch.Tensor, max_length: int
    ) -> torch.Tensor:
        """lid_logits (B, T1//2, C) -> conditioning_layer(upsampled softmax) (B, T1, d), added to x."""
        probs = torch.softmax(lid_logits, dim=-1)
        return self.conditioning_layer(upsample_nearest(probs, lid_lengths, lengths, max_length))

    def forward(self, feats: torch.Tensor, feat_lengths: torch.Tensor) -> AdaptorOutput:
        """feats (B, T0, input_dim), feat_lengths (B,) -> AdaptorOutput (see its docstring).

        T1 = ((T0 - 1) // 2 - 1) // 2 (80 ms frames), T2 = T1 // 2 (160 ms); lengths follow the same
        formulas per utterance. Frames past an utterance's length are padding and carry no meaning.
        """
        shortest = self.min_input_frames()
        too_short = (feat_lengths < shortest).nonzero().flatten().tolist()
        if too_short:  # checked before the subsampling convolutions, which fail on too few frames
            raise InputTooShortError(
                f"input of {int(feat_lengths.min())} frames is too short: the adaptor needs at least "
                f"{shortest} frames",
                too_short,
            )
        x, lengths = self.embed(feats, feat_lengths)
        mask = lengths_to_mask(lengths, x.size(1))
        x, pos_emb = self.pos_enc(x)

        lid_logits = lid_lengths = None
        for index, layer in enumerate(self.encoders, start=1):
            x = layer(x, pos_emb, mask)
            if index == self.config.interctc_layer:
                lid_logits, lid_lengths = self.lid_ctc(x, lengths)
                x = x + self.lid_conditioning(lid_logits, lid_lengths, lengths, x.size(1))
        assert lid_logits is not None and lid_lengths is not None  # guaranteed by AdaptorConfig

        speech, speech_lengths = self.postencoder(self.after_norm(x), lengths)
        return AdaptorOutput(speech, speech_lengths, lid_logits, lid_lengths)
