"""CTC decoding over LLM-token posteriors: best path (greedy) and lexicon-free prefix beam search.

The CTC head of BLOOMZMMS scores BLOOM tokens (250,680 classes at paper scale; blank
`models.ctc_head.blank_id`, 0 = `<unk>` as the reference trained), so the search prunes each frame to its
`token_top_k` most likely tokens before extending prefixes. No language model or lexicon is used; a prefix's
score is its total CTC probability (all alignments that collapse to it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from speechllm.models.ctc_head import CTCHead

NEG_INF = -math.inf


@dataclass(frozen=True)
class CTCSearch:
    """How CTC posteriors become token sequences (config `evaluate.ctc`).

    Attributes:
        search: "greedy" (argmax per frame, collapse, drop blanks) or "prefix_beam".
        beam_size: prefixes kept after each frame (prefix_beam).
        token_top_k: tokens per frame considered for extending a prefix (prefix_beam).
    """

    search: str = "greedy"
    beam_size: int = 10
    token_top_k: int = 16

    def __post_init__(self) -> None:
        if self.search not in ("greedy", "prefix_beam"):
            raise ValueError(
                f"unknown CTC search {self.search!r} (config key evaluate.ctc.search: greedy|prefix_beam)"
            )
        if self.beam_size < 1 or self.token_top_k < 1:
            raise ValueError(f"evaluate.ctc.beam_size and token_top_k must be >= 1, got {self}")

    @classmethod
    def from_settings(cls, settings: dict | None) -> CTCSearch:
        return cls(**settings) if settings else cls()


def _logaddexp(a: float, b: float) -> float:
    if a == NEG_INF:
        return b
    if b == NEG_INF:
        return a
    high, low = (a, b) if a > b else (b, a)
    return high + math.log1p(math.exp(low - high))


def prefix_beam_search(
    log_probs: torch.Tensor, blank_id: int, beam_size: int, token_top_k: int
) -> list[tuple[list[int], float]]:
    """Lexicon-free CTC prefix beam search for one utterance.

    Args:
        log_probs: (T, V) log-posteriors of the valid frames.
        blank_id: CTC blank index.
        beam_size: prefixes kept after each frame.
        token_top_k: non-blank tokens per frame that may extend a prefix (the frame's top-k).

    Returns:
        Up to `beam_size` (token ids, log-probability) pairs, best first. With a beam and top-k large enough
        to keep every prefix, the first entry is the exact most probable label sequence.
    """
    lp = log_probs.detach().float().cpu()
    k = min(token_top_k, lp.shape[1])
    top_scores, top_tokens = lp.topk(k, dim=-1)
    blank_scores = lp[:, blank_id].tolist()
    # prefix -> (log P(prefix, ends in blank), log P(prefix, ends in its last token))
    beams: dict[tuple[int, ...], tuple[float, float]] = {(): (0.0, NEG_INF)}
    for t in range(lp.shape[0]):
        candidates = [
            (tok, score)
            for tok, score in zip(top_tokens[t].tolist(), top_scores[t].tolist(), strict=True)
            if tok != blank_id
        ]
        step: dict[tuple[int, ...], list[float]] = {}

        def add(prefix: tuple[int, ...], blank: float, token: float, _step=step) -> None:
            entry = _step.setdefault(prefix, [NEG_INF, NEG_INF])
            entry[0] = _logaddexp(entry[0], blank)
            entry[1] = _logaddexp(entry[1], token)

        for prefix, (p_blank, p_token) in beams.items():
            total = _logaddexp(p_blank, p_token)
            add(prefix, total + blank_scores[t], NEG_INF)
            for tok, score in candidates:
                if prefix and tok == prefix[-1]:
                    add(prefix, NEG_INF, p_token + score)  # repeated frame of the same token
                    add(prefix + (tok,), NEG_INF, p_blank + score)  # a new token after a blank
                else:
                    add(prefix + (tok,), NEG_INF, total + score)
        ranked = sorted(step.items(), key=lambda item: _logaddexp(*item[1]), reverse=True)[:beam_size]
        beams = {prefix: (scores[0], scores[1]) for prefix, scores in ranked}
    return [(list(prefix), _logaddexp(*scores)) for prefix, scores in beams.items()]


def ctc_decode(
    logits: torch.Tensor, lengths: torch.Tensor, blank_id: int, search: CTCSearch
) -> list[list[int]]:
    """Token ids per utterance from CTC logits.

    Args:
        logits: (B, T, V) CTC scores.
        lengths: (B,) valid frames.
        blank_id: CTC blank index.
        search: greedy or prefix beam search settings.

    Returns:
        B token-id lists.
    """
    if search.search == "greedy":
        return CTCHead.greedy_decode(logits, lengths, blank_id)
    # one utterance at a time: (T, V) float32 posteriors of a 250k-token vocabulary are large enough
    return [
        prefix_beam_search(
            logits[i, : int(n)].float().log_softmax(dim=-1), blank_id, search.beam_size, search.token_top_k
        )[0][0]
        for i, n in enumerate(lengths.tolist())
    ]


def sequence_log_prob(log_probs: torch.Tensor, labels: Sequence[int], blank_id: int) -> float:
    """Exact log P(labels | frames) under CTC (the forward algorithm), via torch's CTC loss. (T, V) input."""
    if not labels:
        return float(log_probs[:, blank_id].sum())
    loss = torch.nn.functional.ctc_loss(
        log_probs.float().unsqueeze(1),
        torch.tensor([list(labels)]),
        torch.tensor([log_probs.shape[0]]),
        torch.tensor([len(labels)]),
        blank=blank_id,
        reduction="sum",
        zero_infinity=False,
    )
    return -float(loss)
