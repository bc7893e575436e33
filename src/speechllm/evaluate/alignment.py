"""Edit counts of one hypothesis against its reference: the minimum-edit (Levenshtein) alignment or NIST
sclite's weighted one (config evaluate.asr_alignment).

sclite, which scored BLOOMZMMS (ESPnet asr.sh stage 13, `sclite -r ref.trn trn -h hyp.trn trn -i rm -o all`),
aligns each utterance at minimum weighted cost (correct 0, substitution 4, insertion and deletion 3:
usnistgov/SCTK src/sclite/word.c, wwd_WORD) and then counts the S, D and I of that alignment. On a poor
hypothesis they can add up to more than the minimum number of edits: reference "x y a b c" against "d e f x y"
is 5 substitutions at unit cost but 2 correct, 3 deletions and 3 insertions (cost 18 < 20) for sclite.

No maintained library gives this alignment: rapidfuzz's Levenshtein takes weights for the distance only (its
`editops` are unit-cost), and jiwer's alignments are unit-cost. Hence the small DP below, with sclite's
tie-breaking (SCTK src/sclite/net_dp.c, calculate_internal_cells): the diagonal (correct or substitution) when
it costs no more than deletion and insertion, else deletion when strictly cheaper than insertion, else
insertion; the first row is insertions, the first column deletions; the back-trace starts at the last cell.

Tokens are compared as they are: sclite's markup (`@` null words, `(optional)` words, trailing `*`) never
survives the project's normaliser, which drops punctuation and symbols, and sclite's case folding is moot
because the normaliser lower-cases both sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SCLITE_CORRECT = 0
SCLITE_SUBSTITUTION = 4
SCLITE_INSERTION = 3
SCLITE_DELETION = 3

_DIAGONAL, _DELETION, _INSERTION = 0, 1, 2


@dataclass(frozen=True)
class EditCounts:
    """Correct tokens, substitutions, deletions and insertions of an alignment (or a sum of them)."""

    hits: int = 0
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0

    def __add__(self, other: EditCounts) -> EditCounts:
        return EditCounts(
            self.hits + other.hits,
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
        )

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def reference_length(self) -> int:
        return self.hits + self.substitutions + self.deletions


def _token_ids(ref: Sequence[str], hyp: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Both sequences as integer ids of one shared vocabulary (equal tokens, equal ids)."""
    vocab: dict[str, int] = {}
    ref_ids = np.array([vocab.setdefault(t, len(vocab)) for t in ref], dtype=np.int64)
    hyp_ids = np.array([vocab.setdefault(t, len(vocab)) for t in hyp], dtype=np.int64)
    return ref_ids, hyp_ids


def _sclite_moves(ref_ids: np.ndarray, hyp_ids: np.ndarray) -> np.ndarray:
    """The move chosen into each cell of sclite's DP table ((len(ref)+1) × (len(hyp)+1)).

    Row by row: the diagonal and deletion candidates come from the row above; the insertion chain along the
    row is a running minimum, row[b] = min(best[b], row[b-1] + 3) = min_k(best[k] + 3(b - k)).
    """
    n, m = len(ref_ids), len(hyp_ids)
    moves = np.empty((n + 1, m + 1), dtype=np.int8)
    moves[0, :] = _INSERTION
    moves[:, 0] = _DELETION
    steps = np.arange(m + 1, dtype=np.int64) * SCLITE_INSERTION
    row = steps.copy()
    for a in range(1, n + 1):
        match = np.where(hyp_ids == ref_ids[a - 1], SCLITE_CORRECT, SCLITE_SUBSTITUTION)
        diagonal = row[:-1] + match
        deletion = row + SCLITE_DELETION
        best = np.empty(m + 1, dtype=np.int64)
        best[0] = deletion[0]
        best[1:] = np.minimum(diagonal, deletion[1:])
        new_row = np.minimum.accumulate(best - steps) + steps
        insertion = new_row[:-1] + SCLITE_INSERTION
        moves[a, 1:] = np.where(
            (diagonal <= deletion[1:]) & (diagonal <= insertion),
            _DIAGONAL,
            np.where(deletion[1:] < insertion, _DELETION, _INSERTION),
        )
        row = new_row
    return moves


def sclite_counts(ref: Sequence[str], hyp: Sequence[str]) -> EditCounts:
    """Counts of sclite's alignment of `hyp` to `ref` (token sequences): minimum cost at substitution 4,
    insertion 3, deletion 3, ties broken as sclite breaks them."""
    ref_ids, hyp_ids = _token_ids(ref, hyp)
    moves = _sclite_moves(ref_ids, hyp_ids)
    hits = substitutions = deletions = insertions = 0
    a, b = len(ref_ids), len(hyp_ids)
    while a > 0 or b > 0:
        move = moves[a, b]
        if move == _DIAGONAL:
            if ref_ids[a - 1] == hyp_ids[b - 1]:
                hits += 1
            else:
                substitutions += 1
            a, b = a - 1, b - 1
        elif move == _DELETION:
            deletions += 1
            a -= 1
        else:
            insertions += 1
            b -= 1
    return EditCounts(hits, substitutions, deletions, insertions)
