"""CTC prefix beam search against exhaustive enumeration, and the constrained-beam-search state machine."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from speechllm.evaluate.constrained import ConstraintState, find_option, match_option, select_by_bank
from speechllm.evaluate.ctc_search import CTCSearch, ctc_decode, prefix_beam_search, sequence_log_prob
from speechllm.models.ctc_head import CTCHead

BLANK = 0


def collapse(path: tuple[int, ...]) -> tuple[int, ...]:
    out = [tok for i, tok in enumerate(path) if (i == 0 or tok != path[i - 1])]
    return tuple(tok for tok in out if tok != BLANK)


def exhaustive(log_probs: torch.Tensor) -> dict[tuple[int, ...], float]:
    """log P(label sequence) by summing every frame path that collapses to it."""
    totals: dict[tuple[int, ...], float] = {}
    num_frames, vocab = log_probs.shape
    for path in itertools.product(range(vocab), repeat=num_frames):
        score = float(sum(log_probs[t, tok] for t, tok in enumerate(path)))
        labels = collapse(path)
        totals[labels] = float(
            torch.logaddexp(torch.tensor(totals.get(labels, -math.inf)), torch.tensor(score))
        )
    return totals


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefix_beam_search_finds_the_exact_best_sequence(seed: int) -> None:
    torch.manual_seed(seed)
    log_probs = (torch.randn(5, 4) * 2).log_softmax(dim=-1)
    truth = exhaustive(log_probs)
    best_labels = max(truth, key=truth.get)
    nbest = prefix_beam_search(log_probs, BLANK, beam_size=200, token_top_k=4)
    labels, score = nbest[0]
    assert tuple(labels) == best_labels
    assert score == pytest.approx(truth[best_labels], abs=1e-4)
    # every returned prefix carries its exact total probability
    for prefix, prefix_score in nbest[:5]:
        assert prefix_score == pytest.approx(truth[tuple(prefix)], abs=1e-4)
        assert prefix_score == pytest.approx(sequence_log_prob(log_probs, prefix, BLANK), abs=1e-4)


def test_greedy_can_lose_to_prefix_beam_search() -> None:
    # Frame-wise argmax is blank twice (0.6 each), but "1" collects 1 - 0.36 = 0.64 over its alignments.
    probs = torch.tensor([[0.6, 0.4], [0.6, 0.4]])
    log_probs = probs.log()
    greedy = CTCHead.greedy_decode(log_probs.unsqueeze(0), torch.tensor([2]), BLANK)[0]
    beam = ctc_decode(log_probs.unsqueeze(0), torch.tensor([2]), BLANK, CTCSearch("prefix_beam", 4, 2))[0]
    assert greedy == [] and beam == [1]
    assert sequence_log_prob(log_probs, beam, BLANK) > sequence_log_prob(log_probs, greedy, BLANK)


def test_ctc_decode_respects_lengths_and_matches_greedy_with_beam_one_on_peaky_posteriors() -> None:
    torch.manual_seed(3)
    logits = torch.randn(2, 6, 5) * 8  # peaky: one path dominates
    lengths = torch.tensor([6, 3])
    greedy = ctc_decode(logits, lengths, BLANK, CTCSearch("greedy"))
    assert greedy == CTCHead.greedy_decode(logits, lengths, BLANK)
    beam = ctc_decode(logits, lengths, BLANK, CTCSearch("prefix_beam", beam_size=8, token_top_k=5))
    assert beam == greedy


def test_ctc_search_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="evaluate.ctc.search"):
        CTCSearch("viterbi")
    with pytest.raises(ValueError, match="beam_size"):
        CTCSearch("prefix_beam", beam_size=0)
    assert CTCSearch.from_settings({"search": "prefix_beam", "beam_size": 3, "token_top_k": 2}).beam_size == 3


# --------------------------------------------------------------------------- constrained beam search


def test_constraint_state_follows_phrases_resets_and_banks() -> None:
    phrases = [[5, 6, 7], [8]]
    state = ConstraintState.start(phrases)
    assert sorted(state.advance()) == [5, 8] and state.bank == 0
    state.add(5)
    assert state.in_progress == (0, 1) and state.advance() == [6]
    assert state.bank == 3 - 2  # longest (3) minus what remains of the phrase in progress (2)
    state.add(9)  # breaks the phrase: back to pending (at the end), the token is not retried
    assert state.in_progress is None and state.pending == [1, 0] and state.bank == 0
    state.add(8)
    assert state.complete == [1] and state.bank == 3 and not state.completed
    for token in (5, 6, 7):
        state.add(token)
    assert state.completed and state.bank == 6 and state.advance() == []
    assert ConstraintState.replay(phrases, [8, 5, 6, 7, 1]).completed


def test_select_by_bank_is_round_robin_over_banks() -> None:
    banks = [0, 0, 1, 1, 2]
    scores = [-0.1, -0.2, -5.0, -6.0, -9.0]
    # best of bank 2, best of bank 1, best of bank 0, then second bests (bank 1, bank 0)
    assert select_by_bank(banks, scores, 5) == [4, 2, 0, 3, 1]
    assert select_by_bank(banks, scores, 2) == [4, 2]


def test_match_option_maps_unknown_answers_to_class_zero() -> None:
    assert match_option(" Maybe ", ["Yes", "Maybe", "No"]) == 1
    assert match_option("yes", ["Yes", "Maybe", "No"]) == 0
    assert match_option("very confident", ["not confident", "very confident"]) == 1
    assert match_option("maybe so", ["Yes", "Maybe", "No"]) == 0


def test_match_option_ignores_case_as_the_reference() -> None:
    """speechglue_evaluate.py / speechxnli_evaluate.py compare lower-cased answers and options."""
    assert match_option("no", ["Yes", "Maybe", "No"]) == 2
    assert match_option(" MAYBE", ["Yes", "Maybe", "No"]) == 1
    assert match_option("yes", ["No", "Yes"]) == 1
    assert match_option("Positive", ["negative", "positive"]) == 1
    assert find_option("Not Confident", ["not confident", "very confident"]) == 0
    assert find_option("unsure", ["Yes", "Maybe", "No"]) is None
