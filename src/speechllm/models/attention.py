"""Multi-head self-attention with relative positional encoding (Transformer-XL style).

Equivalent to ESPnet ``RelPositionMultiHeadedAttention`` with ``rel_pos_type: latest`` and
``zero_triu: False``. For query frame ``i``, key frame ``j`` and head ``h``::

    score[h, i, j] = ((q_i + u_h) . k_j + (q_i + v_h) . p_(i-j)) / sqrt(d_k)

where ``p_r = linear_pos(pos_emb(r))`` (no bias) and ``u``/``v`` are the learned ``pos_bias_u`` /
``pos_bias_v``. Padded keys are excluded with a key padding mask; attention weights get dropout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def rel_shift(scores: torch.Tensor) -> torch.Tensor:
    """Turn position scores indexed by relative distance into a (query, key) matrix.

    scores (B, H, T, 2T-1), whose last axis ``m`` stands for distance ``i - j = T - 1 - m``
    -> (B, H, T, T) with ``out[..., i, j] = scores[..., i, T - 1 - i + j]``.

    Done without an index tensor: prepend one zero column, reinterpret the (T, 2T) block as (2T, T),
    drop the first row and read the buffer back as (T, 2T - 1); row ``i`` is then shifted left by
    ``T - 1 - i`` places, and its first ``T`` entries are the wanted ones.
    """
    batch, heads, length, positions = scores.shape
    padded = F.pad(scores, (1, 0))  # (B, H, T, 2T)
    padded = padded.reshape(batch, heads, positions + 1, length)  # (B, H, 2T, T)
    shifted = padded[:, :, 1:].reshape(batch, heads, length, positions)  # (B, H, T, 2T-1)
    return shifted[..., :length]


class RelPositionMultiHeadedAttention(nn.Module):
    """Relative-position multi-head self-attention.

    Args:
        num_heads: number of heads ``H``.
        d_model: model size ``d`` (``d_k = d / H`` per head).
        dropout: dropout on the attention weights.
    """

    def __init__(self, num_heads: int, d_model: int, dropout: float) -> None:
        super().__init__()
        if d_model % num_heads != 0:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.d_k = d_model // num_heads
        self.linear_q = nn.Linear(d_model, d_model)
        self.linear_k = nn.Linear(d_model, d_model)
        self.linear_v = nn.Linear(d_model, d_model)
        self.linear_out = nn.Linear(d_model, d_model)
        self.linear_pos = nn.Linear(d_model, d_model, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(num_heads, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(num_heads, self.d_k))
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, T, H, d_k)."""
        return x.view(x.size(0), x.size(1), self.num_heads, self.d_k)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        pos_emb: torch.Tensor,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attend.

        query/key/value (B, T, d), pos_emb (1 or B, 2T-1, d), mask (B, T) bool, True at valid key frames
        (or None) -> (B, T, d).
        """
        batch = query.size(0)
        q = self._split_heads(self.linear_q(query))  # (B, T, H, d_k)
        k = self._split_heads(self.linear_k(key)).transpose(1, 2)  # (B, H, T, d_k)
        v = self._split_heads(self.linear_v(value)).transpose(1, 2)  # (B, H, T, d_k)
        p = self._split_heads(self.linear_pos(pos_emb)).transpose(1, 2)  # (1|B, H, 2T-1, d_k)

        q_u = (q + self.pos_bias_u).transpose(1, 2)  # (B, H, T, d_k)
        q_v = (q + self.pos_bias_v).transpose(1, 2)
        content = torch.matmul(q_u, k.transpose(-2, -1))  # (B, H, T, T)
        position = rel_shift(torch.matmul(q_v, p.transpose(-2, -1)))  # (B, H, T, T)
        scores = (content + position) / math.sqrt(self.d_k)

        if mask is not None:
            padded_keys = ~mask[:, None, None, :]  # (B, 1, 1, T)
            scores = scores.masked_fill(padded_keys, torch.finfo(scores.dtype).min)
            weights = torch.softmax(scores, dim=-1).masked_fill(padded_keys, 0.0)
        else:
            weights = torch.softmax(scores, dim=-1)

        context = torch.matmul(self.dropout(weights), v)  # (B, H, T, d_k)
        context = context.transpose(1, 2).reshape(batch, -1, self.num_heads * self.d_k)
        return self.linear_out(context)
