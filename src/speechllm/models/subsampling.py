"""Convolutional 4x time subsampling (ESPnet ``Conv2dSubsampling``, encoder ``input_layer: conv2d``).

Two ``Conv2d(kernel 3, stride 2)`` + ReLU layers treat the feature sequence as a one-channel image
(time x feature), then a linear layer maps the flattened ``channels x reduced features`` back to ``d``.
With the default kernel 3 / stride 2 a sequence of ``T`` frames becomes ``((T - 1) // 2 - 1) // 2``
frames (20 ms MMS frames -> 80 ms).

Output lengths apply the same formula to each utterance's own length. ESPnet instead slices the
padding mask (``mask[:, :, :-2:2]`` twice), which gives padded utterances up to two extra 80 ms frames
(e.g. 45 frames padded to 97 -> 12 instead of 10); the extra frames mostly see padding.

The positional encoding, which ESPnet attaches to this module's output layer, lives in
``speechllm.models.positional`` and is applied by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from speechllm.models.frames import DEFAULT_SUBSAMPLING_KERNEL, DEFAULT_SUBSAMPLING_STRIDE, conv_output_length

DEFAULT_KERNEL = DEFAULT_SUBSAMPLING_KERNEL
DEFAULT_STRIDE = DEFAULT_SUBSAMPLING_STRIDE

# Input channels x kernel area (the GEMM's reduction size) from which a convolution's backward runs as ATen's
# im2col + GEMM on the CPU: measured (benchmarks/adaptor_vs_espnet.py) 1.1x at 4.6k (512 channels, 3x3) and
# 1.4-1.8x at 9.2k (1024) faster than oneDNN's backward on an AVX-512 Xeon and 1.25x at 9.2k on an AVX2 EPYC,
# while 0.9k-2.3k (96-256 channels) are 5-20 % slower. The forward stays on oneDNN: as fast on the Xeon, 1.6x
# faster on the EPYC.
IM2COL_MIN_REDUCTION = 4096


class _Im2colBackwardConv2d(torch.autograd.Function):
    """``F.conv2d`` forward (oneDNN on the CPU) with the backward of ATen's im2col + GEMM kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None
        return F.conv2d(x, weight, bias, stride, padding)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        wanted = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        grad_x, grad_weight, grad_bias = torch.ops.aten._slow_conv2d_backward(
            grad.contiguous(), x, weight, weight.shape[2:], ctx.stride, ctx.padding, wanted
        )
        return grad_x, grad_weight, grad_bias if ctx.has_bias else None, None, None


def conv2d(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)``; a wide ungrouped convolution on the CPU keeps oneDNN's forward but takes its backward
    from ATen's im2col + GEMM kernel, which is faster for it. The results agree to float rounding."""
    plain = conv.groups == 1 and conv.dilation == (1, 1) and conv.padding_mode == "zeros"
    wide = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] >= IM2COL_MIN_REDUCTION
    if x.device.type != "cpu" or not plain or not wide or isinstance(conv.padding, str):
        return conv(x)
    return _Im2colBackwardConv2d.apply(x, conv.weight, conv.bias, conv.stride, conv.padding)


class Conv2dSubsampling(nn.Module):
    """Conv2d(1, d, k, s) + ReLU, Conv2d(d, d, k, s) + ReLU, Linear(d * F1 -> d).

    ``F1`` is the feature axis after the two convolutions (``((idim - 1) // 2 - 1) // 2`` for k 3, s 2).
    The flattening order is channel-major (``c * F1 + f``), as in ESPnet, so checkpoints map one-to-one.

    Args:
        idim: input feature size.
        odim: output size ``d`` (also the number of conv channels).
        kernel_size: kernel of both convolutions.
        stride: stride of both convolutions.
    """

    def __init__(
        self, idim: int, odim: int, kernel_size: int = DEFAULT_KERNEL, stride: int = DEFAULT_STRIDE
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride
        self.conv = nn.Sequential(
            nn.Conv2d(1, odim, kernel_size, stride),
            nn.ReLU(inplace=True),  # in place: a convolution's backward needs its input, not its output
            nn.Conv2d(odim, odim, kernel_size, stride),
            nn.ReLU(inplace=True),
        )
        reduced_features = self.output_length(idim)
        if reduced_features < 1:
            raise ValueError(f"idim={idim} is too small for two convolutions of kernel {kernel_size}")
        self.out = nn.Linear(odim * reduced_features, odim)

    def output_length(self, length: torch.Tensor | int) -> torch.Tensor | int:
        """Frames (or features) left after both convolutions."""
        once = conv_output_length(length, self.kernel_size, self.stride)
        return conv_output_length(once, self.kernel_size, self.stride)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, idim), lengths (B,) -> x (B, T1, odim), lengths (B,) with T1 = output_length(T)."""
        hidden = x.unsqueeze(1)
        for layer in self.conv:  # Conv2d, ReLU, Conv2d, ReLU
            hidden = conv2d(layer, hidden) if isinstance(layer, nn.Conv2d) else layer(hidden)
        # hidden: (B, d, T1, F1)
        batch, channels, frames, features = hidden.shape
        hidden = hidden.transpose(1, 2).reshape(batch, frames, channels * features)
        return self.out(hidden), self.output_length(lengths)
