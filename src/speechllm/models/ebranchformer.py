"""E-Branchformer encoder layer (Kim et al., SLT 2022), following ESPnet ``EBranchformerEncoderLayer``.

One layer, with ``d`` the model size::

    x = x + 0.5 * dropout(FFN_macaron(LN(x)))
    a = dropout(RelPosMHSA(LN(x)))                      # branch 1: global context
    g = dropout(cgMLP(LN(x)))                           # branch 2: local context
    c = concat(a, g)                                    # (B, T, 2d)
    x = x + dropout(merge_proj(c + DepthwiseConv(c)))   # merge, 2d -> d
    x = x + 0.5 * dropout(FFN(LN(x)))
    x = LN(x)

Submodule names match ESPnet's so that ESPnet checkpoints map one-to-one.

Padding: ESPnet runs its two depthwise convolutions (cgMLP gate, merge) over padded frames as they are,
so in a padded batch the last valid frames see non-zero padding. Here padded frames are set to zero
right before each depthwise convolution, which is what the same utterance would see on its own (the
convolutions pad with zeros). Unpadded sequences give exactly ESPnet's result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from speechllm.models.attention import RelPositionMultiHeadedAttention

MACARON_FFN_SCALE = 0.5


def zero_padded_frames(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x (B, T, C), mask (B, T) bool True at valid frames (or None) -> x with padded frames set to 0."""
    if mask is None:
        return x
    return x.masked_fill(~mask.unsqueeze(-1), 0.0)


def depthwise_conv_over_time(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """x (B, T, C) -> ``conv`` (a 'same' depthwise Conv1d over time) applied to it, (B, T, C).

    On the CPU it runs as a 2-D convolution with time on the height axis (input (B, C, T, 1), kernel
    (C, 1, K, 1)): the same arithmetic, but oneDNN's depthwise kernel for a (K, 1) filter is 2.5-4x faster,
    forward and backward, than for the (1, K) filter `Conv1d` becomes (benchmarks/adaptor_vs_espnet.py).
    Other devices keep `Conv1d`.
    """
    if x.device.type != "cpu":
        return conv(x.transpose(1, 2)).transpose(1, 2)
    out = F.conv2d(
        x.transpose(1, 2).unsqueeze(-1),
        conv.weight.unsqueeze(-1),
        conv.bias,
        padding=(conv.padding[0], 0),
        groups=conv.groups,
    )
    return out.squeeze(-1).transpose(1, 2)


def check_odd_kernel(kernel_size: int, name: str) -> None:
    """'Same' depthwise convolutions need an odd kernel to keep the sequence length."""
    if kernel_size % 2 != 1:
        raise ValueError(f"{name} must be odd to keep the time axis length, got {kernel_size}")


class PositionwiseFeedForward(nn.Module):
    """Linear(d -> units) -> swish -> dropout -> Linear(units -> d)."""

    def __init__(self, d_model: int, units: int, dropout: float) -> None:
        super().__init__()
        self.w_1 = nn.Linear(d_model, units)
        self.w_2 = nn.Linear(units, d_model)
        self.activation = nn.SiLU()
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d)."""
        return self.w_2(self.dropout(self.activation(self.w_1(x))))


class ConvolutionalSpatialGatingUnit(nn.Module):
    """Split (B, T, units) into halves ``r, g``; return ``dropout(r * DepthwiseConv(LN(g)))`` (B, T, units/2).

    The gate activation is the identity and there is no linear layer after the convolution
    (``gate_activation: identity``, ``use_linear_after_conv: false``).
    """

    def __init__(self, units: int, kernel_size: int, dropout: float, layer_norm_eps: float) -> None:
        super().__init__()
        check_odd_kernel(kernel_size, "cgmlp_kernel")
        channels = units // 2
        self.norm = nn.LayerNorm(channels, eps=layer_norm_eps)
        self.conv = nn.Conv1d(
            channels, channels, kernel_size, padding=(kernel_size - 1) // 2, groups=channels
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, units), mask (B, T) bool valid frames -> (B, T, units/2)."""
        residual_half, gate = x.chunk(2, dim=-1)
        gate = depthwise_conv_over_time(self.conv, zero_padded_frames(self.norm(gate), mask))
        return self.dropout(residual_half * gate)


class ConvolutionalGatingMLP(nn.Module):
    """cgMLP: Linear(d -> units) + GELU, spatial gating unit (units -> units/2), Linear(units/2 -> d)."""

    def __init__(
        self, d_model: int, units: int, kernel_size: int, dropout: float, layer_norm_eps: float
    ) -> None:
        super().__init__()
        if units % 2 != 0:
            raise ValueError(f"cgmlp_units must be even (split in halves), got {units}")
        self.channel_proj1 = nn.Sequential(nn.Linear(d_model, units), nn.GELU())
        self.csgu = ConvolutionalSpatialGatingUnit(units, kernel_size, dropout, layer_norm_eps)
        self.channel_proj2 = nn.Linear(units // 2, d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, d), mask (B, T) bool valid frames -> (B, T, d)."""
        return self.channel_proj2(self.csgu(self.channel_proj1(x), mask))


class EBranchformerLayer(nn.Module):
    """One E-Branchformer block (macaron FFN, MHSA || cgMLP, depthwise-conv merge, FFN, final LN).

    Args:
        d_model: model size ``d``.
        num_heads: attention heads.
        linear_units: hidden size of both feed-forward modules.
        cgmlp_units: hidden size of the cgMLP (split in two halves of ``cgmlp_units / 2``).
        cgmlp_kernel: depthwise conv kernel in the cgMLP gate.
        merge_kernel: depthwise conv kernel over the concatenated branches.
        dropout: dropout of residual branches, FFN and cgMLP.
        attn_dropout: dropout on attention weights.
        layer_norm_eps: epsilon of every LayerNorm (ESPnet uses 1e-12).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        linear_units: int,
        cgmlp_units: int,
        cgmlp_kernel: int,
        merge_kernel: int,
        dropout: float,
        attn_dropout: float,
        layer_norm_eps: float,
    ) -> None:
        super().__init__()
        check_odd_kernel(merge_kernel, "merge_kernel")
        self.ff_scale = MACARON_FFN_SCALE
        self.feed_forward_macaron = PositionwiseFeedForward(d_model, linear_units, dropout)
        self.norm_ff_macaron = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.attn = RelPositionMultiHeadedAttention(num_heads, d_model, attn_dropout)
        self.norm_mha = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.cgmlp = ConvolutionalGatingMLP(d_model, cgmlp_units, cgmlp_kernel, dropout, layer_norm_eps)
        self.norm_mlp = nn.LayerNorm(d_model, eps=layer_norm_eps)
        merged = 2 * d_model
        self.depthwise_conv_fusion = nn.Conv1d(
            merged, merged, merge_kernel, padding=(merge_kernel - 1) // 2, groups=merged
        )
        self.merge_proj = nn.Linear(merged, d_model)
        self.feed_forward = PositionwiseFeedForward(d_model, linear_units, dropout)
        self.norm_ff = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm_final = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def merge(self, x_att: torch.Tensor, x_mlp: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Branches (B, T, d) each -> merge_proj(c + DepthwiseConv(c)) (B, T, d), c = concat (B, T, 2d)."""
        concat = torch.cat([x_att, x_mlp], dim=-1)
        fused = depthwise_conv_over_time(self.depthwise_conv_fusion, zero_padded_frames(concat, mask))
        return self.merge_proj(concat + fused)

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, d), pos_emb (1, 2T-1, d), mask (B, T) bool True at valid frames -> (B, T, d)."""
        x = x + self.ff_scale * self.dropout(self.feed_forward_macaron(self.norm_ff_macaron(x)))

        attn_in = self.norm_mha(x)
        x_att = self.dropout(self.attn(attn_in, attn_in, attn_in, pos_emb, mask))
        x_mlp = self.dropout(self.cgmlp(self.norm_mlp(x), mask))
        x = x + self.dropout(self.merge(x_att, x_mlp, mask))

        x = x + self.ff_scale * self.dropout(self.feed_forward(self.norm_ff(x)))
        return self.norm_final(x)
