"""Frozen CTC output layer whose weight is an LLM's input-embedding matrix (BLOOMZMMS stage 1, spec §2.2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def flatten_targets(
    targets: Sequence[Sequence[int]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate variable-length token sequences for `F.ctc_loss`.

    Args:
        targets: B token-id sequences.
        device: device of the returned tensors.

    Returns:
        flat: (sum of lengths,) long.
        lengths: (B,) long.
    """
    lengths = torch.tensor([len(t) for t in targets], dtype=torch.long, device=device)
    flat = torch.tensor([tok for t in targets for tok in t], dtype=torch.long, device=device)
    return flat, lengths


class CTCHead(nn.Module):
    """Frozen `Linear(hidden_size -> vocab_size, bias=False)` CTC projection.

    The layer is named `ctc_lo` as in ESPnet. Gradients still flow through it to its input.

    Args:
        hidden_size: input size d.
        vocab_size: number of CTC classes V (blank included).
    """

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__()
        self.ctc_lo = nn.Linear(hidden_size, vocab_size, bias=False)
        self.ctc_lo.requires_grad_(False)

    @classmethod
    def from_embeddings(cls, embedding_weight: torch.Tensor, vocab_size: int) -> CTCHead:
        """Build the head from the first `vocab_size` rows of an embedding matrix.

        Args:
            embedding_weight: (V_emb, d) LLM input embeddings (BLOOMZ: V_emb = 250,880).
            vocab_size: tokenizer vocabulary size V <= V_emb (BLOOMZ: 250,680).
        """
        num_rows, hidden_size = embedding_weight.shape
        if vocab_size > num_rows:
            raise ValueError(f"vocab_size {vocab_size} exceeds the {num_rows} embedding rows")
        head = cls(hidden_size, vocab_size)
        with torch.no_grad():
            head.ctc_lo.weight.copy_(embedding_weight[:vocab_size].to(head.ctc_lo.weight.dtype))
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, T, V) logits."""
        return self.ctc_lo(x)

    def loss(
        self,
        x: torch.Tensor,
        x_lengths: torch.Tensor,
        targets: Sequence[Sequence[int]] | torch.Tensor,
        blank_id: int,
        target_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """CTC loss summed over the batch and divided by the batch size (ESPnet `CTC(reduction="sum") / B`).

        Args:
            x: (B, T, d) encoder output.
            x_lengths: (B,) valid frames.
            targets: B token-id lists, or a (B, S) padded long tensor together with `target_lengths`.
            blank_id: CTC blank index.
            target_lengths: (B,) valid target tokens; required iff `targets` is a tensor.

        Returns:
            () float32 loss; infeasible utterances (targets longer than the frames allow) contribute 0.

        Raises:
            ValueError: a target token is the blank (CTC cannot emit it as a label).
        """
        batch_size = x.shape[0]
        if isinstance(targets, torch.Tensor):
            if target_lengths is None:
                raise ValueError("target_lengths is required with padded tensor targets")
            flat_targets, flat_lengths = (
                targets.to(x.device, torch.long),
                target_lengths.to(x.device, torch.long),
            )
            valid = torch.arange(flat_targets.shape[-1], device=x.device) < flat_lengths.unsqueeze(-1)
            labels = flat_targets[valid]
        else:
            flat_targets, flat_lengths = flatten_targets(targets, x.device)
            labels = flat_targets
        if bool((labels == blank_id).any()):
            raise ValueError(
                f"a CTC target contains the blank id {blank_id} (config models.ctc_head.blank_id); "
                "the tokenizer must never produce it for a transcript"
            )
        log_probs = self(x).float().log_softmax(dim=-1).transpose(0, 1)  # (T, B, V)
        total = F.ctc_loss(
            log_probs,
            flat_targets,
            x_lengths.to(torch.long),
            flat_lengths,
            blank=blank_id,
            reduction="sum",
            zero_infinity=True,
        )
        return total / batch_size

    @staticmethod
    def greedy_decode(logits: torch.Tensor, lengths: torch.Tensor, blank_id: int) -> list[list[int]]:
        """Best-path decoding: argmax per frame, collapse repeats, drop blanks.

        Args:
            logits: (B, T, V) scores (logits or log-probabilities).
            lengths: (B,) valid frames.
            blank_id: CTC blank index.

        Returns:
            B token-id lists.
        """
        best = logits.argmax(dim=-1).cpu()
        hyps = []
        for path, length in zip(best, lengths.tolist(), strict=True):
            collapsed = torch.unique_consecutive(path[:length])
            hyps.append(collapsed[collapsed != blank_id].tolist())
        return hyps
