"""Relative sinusoidal positional encoding (ESPnet ``RelPositionalEncoding``, ``rel_pos_type: latest``).

The encoding does not add anything to the input. It scales the input by ``sqrt(d_model)`` and returns,
next to it, one sinusoidal embedding per *relative* distance ``r = i - j`` between a query frame ``i``
and a key frame ``j``. For a sequence of ``T`` frames there are ``2T - 1`` distances, ordered from
``T - 1`` down to ``-(T - 1)``; index ``m`` of the returned table holds distance ``r = T - 1 - m``.
The attention module (``RelPositionMultiHeadedAttention``) turns that table into a ``(T, T)`` score
matrix with ``rel_shift``.

ESPnet precomputes a 5000-frame table and slices its centre; the values of one distance do not depend
on the table size, so computing only the ``2T - 1`` rows needed gives identical numbers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

DEFAULT_BASE = 10000.0


def relative_sinusoid_table(
    length: int, d_model: int, base: float = DEFAULT_BASE, device: torch.device | None = None
) -> torch.Tensor:
    """Sinusoids for the relative distances ``length - 1, ..., -(length - 1)``.

    Returns a float32 tensor (2 * length - 1, d_model); even channels are ``sin(r * w_k)``, odd channels
    ``cos(r * w_k)`` with ``w_k = base ** (-2k / d_model)``.
    """
    distances = torch.arange(length - 1, -length, -1, dtype=torch.float32, device=device).unsqueeze(1)
    frequencies = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32, device=device) * -(math.log(base) / d_model)
    )
    angles = distances * frequencies  # (2T-1, d/2)
    table = torch.zeros(2 * length - 1, d_model, dtype=torch.float32, device=device)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table


class RelPositionalEncoding(nn.Module):
    """Scale the input by ``sqrt(d_model)`` and produce relative position embeddings.

    Args:
        d_model: feature size ``d``.
        dropout: dropout probability applied to both outputs (ESPnet ``positional_dropout_rate``).
        base: wavelength base of the sinusoids.
    """

    def __init__(self, d_model: int, dropout: float, base: float = DEFAULT_BASE) -> None:
        super().__init__()
        self.d_model = d_model
        self.base = base
        self.scale = math.sqrt(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, d) -> (dropout(x * sqrt(d)) (B, T, d), dropout(pos_emb) (1, 2T-1, d))."""
        table = relative_sinusoid_table(x.size(1), self.d_model, self.base, device=x.device)
        pos_emb = table.to(dtype=x.dtype).unsqueeze(0)
        return self.dropout(x * self.scale), self.dropout(pos_emb)
