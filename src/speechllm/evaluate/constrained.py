"""The reference's SpeechGLUE / SpeechXNLI decoding: constrained beam search over the answer options.

BLOOMZMMS calls HF `generate(..., num_beams=#options, force_words_ids=<every option's tokens>,
max_new_tokens=<longest option>, renormalize_logits=True)` (spec bloomzmms.md §5.3). transformers 5 moved
constrained beam search out of the library into a Hub `custom_generate` repository (remote code that cannot be
loaded offline), so this module re-implements the algorithm of transformers 4.x's
`ConstrainedBeamSearchScorer` with one phrasal constraint per option:

* each step takes the 2·K best (beam, token) continuations, skipping eos (an eos may only finish a beam that
  fulfilled *all* constraints), and keeps the first K;
* every beam also proposes the tokens that advance its constraints (the next token of the option in progress,
  or the first token of each pending option);
* all candidates are put in "banks" by constraint progress (completed options × longest option length +
  progress of the option in progress) and picked round-robin: the best of every bank, highest bank first, then
  the second best of every bank, ... until K beams are kept;
* at the end, beams that fulfilled every constraint win; otherwise (always, when K ≥ 2 options must all fit in
  the length of the longest) the highest-scoring beam is returned.

So in effect the model chooses among its best continuations, with option prefixes kept alive in the beam. The
decoded answer maps to the option it equals ignoring case, and to class 0 when it equals none (as the
reference).
Differences from running HF: the reference's dummy `input_ids` prompt token is not replayed through the
constraint states (BLOOM's `<s>` is in no option), and beams are scored without a KV cache (same numbers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from speechllm.models.speech_llm import Segment, SpeechLLM

DEAD_BEAM = -1.0e9  # HF's initial score of beams 1..K-1, so the first step expands beam 0 only


@dataclass
class ConstraintState:
    """Progress of one beam through a list of phrasal constraints (HF `ConstraintListState` semantics).

    Attributes:
        phrases: the constraints' token sequences.
        pending: indices of constraints not started (or reset), in HF's order.
        in_progress: (constraint index, tokens matched) of the constraint being matched, or None.
        complete: indices of fulfilled constraints.
    """

    phrases: Sequence[Sequence[int]]
    pending: list[int] = field(default_factory=list)
    in_progress: tuple[int, int] | None = None
    complete: list[int] = field(default_factory=list)

    @classmethod
    def start(cls, phrases: Sequence[Sequence[int]]) -> ConstraintState:
        return cls(phrases, pending=list(range(len(phrases))))

    @classmethod
    def replay(cls, phrases: Sequence[Sequence[int]], tokens: Sequence[int]) -> ConstraintState:
        state = cls.start(phrases)
        for token in tokens:
            if state.completed:
                break
            state.add(token)
        return state

    @property
    def max_length(self) -> int:
        return max(len(p) for p in self.phrases)

    @property
    def completed(self) -> bool:
        return not self.pending and self.in_progress is None

    @property
    def bank(self) -> int:
        """Completed constraints × longest phrase length, plus `longest - remaining` for the one in
        progress."""
        extra = 0
        if self.in_progress is not None:
            index, matched = self.in_progress
            extra = self.max_length - (len(self.phrases[index]) - matched)
        return len(self.complete) * self.max_length + extra

    def copy(self) -> ConstraintState:
        return ConstraintState(self.phrases, list(self.pending), self.in_progress, list(self.complete))

    def advance(self) -> list[int]:
        """Tokens that make progress: the next token of the constraint in progress, else each pending first
        token."""
        if self.in_progress is not None:
            index, matched = self.in_progress
            return [self.phrases[index][matched]]
        return [self.phrases[index][0] for index in self.pending]

    def add(self, token: int) -> None:
        if self.completed:
            return
        if self.in_progress is not None:
            index, matched = self.in_progress
            if self.phrases[index][matched] == token:
                matched += 1
                if matched == len(self.phrases[index]):
                    self.complete.append(index)
                    self.in_progress = None
                else:
                    self.in_progress = (index, matched)
            else:  # broken: back to the end of the pending list (the token is not retried)
                self.pending.append(index)
                self.in_progress = None
            return
        for position, index in enumerate(self.pending):
            if self.phrases[index][0] == token:
                del self.pending[position]
                if len(self.phrases[index]) == 1:
                    self.complete.append(index)
                else:
                    self.in_progress = (index, 1)
                return


def select_by_bank(banks: Sequence[int], scores: Sequence[float], keep: int) -> list[int]:
    """Indices of the `keep` candidates HF keeps: sorted by (bank, score), then round-robin over banks.

    Returns the best of each bank (highest bank first), then the second best of each bank, and so on.
    """
    order = sorted(range(len(scores)), key=lambda i: banks[i] * 100 + scores[i], reverse=True)
    rank_in_bank, counter, current = [], -1, None
    for i in order:
        counter = counter + 1 if banks[i] == current else 0
        current = banks[i]
        rank_in_bank.append(counter)
    round_robin = sorted(range(len(order)), key=lambda j: rank_in_bank[j])  # stable, as numpy's mergesort
    return [order[j] for j in round_robin][:keep]


@torch.no_grad()
def _next_token_log_probs(
    llm: SpeechLLM, prompt: Sequence[Segment], beams: Sequence[list[int]]
) -> torch.Tensor:
    """(K, V) float32 log-probabilities of the next token after `prompt + beam` for each beam."""
    inputs = llm.build_inputs([[*prompt, list(beam)] for beam in beams])
    logits = llm.lm_logits(inputs, logits_to_keep=1)[:, -1]
    return logits.float().log_softmax(dim=-1)  # renormalize_logits: log-softmax after the (absent) processors


def constrained_beam_search(
    llm: SpeechLLM,
    prompt: Sequence[Segment],
    options: Sequence[Sequence[int]],
    eos_token_id: int | None = None,
) -> list[int]:
    """The reference's constrained decoding for one prompt.

    Args:
        llm: the frozen LLM wrapper.
        prompt: the prompt segments (token ids and speech tensors).
        options: K non-empty token sequences; all are forced (`force_words_ids`), num_beams = K,
            max_new_tokens = the longest.
        eos_token_id: defaults to the LLM's.

    Returns:
        The generated token ids of the best beam.
    """
    if not options or any(len(o) == 0 for o in options):
        raise ValueError("constrained beam search needs non-empty answer options")
    eos = llm.eos_token_id if eos_token_id is None else eos_token_id
    num_beams, max_new_tokens = len(options), max(len(o) for o in options)
    beams: list[list[int]] = [[] for _ in range(num_beams)]
    scores = [0.0] + [DEAD_BEAM] * (num_beams - 1)
    finished: list[tuple[list[int], float]] = []
    for _ in range(max_new_tokens):
        vocab_scores = _next_token_log_probs(llm, prompt, beams).cpu() + torch.tensor(scores).unsqueeze(1)
        vocab = vocab_scores.shape[1]
        top_scores, top_flat = vocab_scores.flatten().topk(2 * num_beams)
        candidates: list[tuple[int, int, float]] = []  # (beam, token, score)
        for rank, (score, flat) in enumerate(zip(top_scores.tolist(), top_flat.tolist(), strict=True)):
            beam, token = divmod(flat, vocab)
            if token == eos:
                if rank < num_beams and ConstraintState.replay(options, beams[beam]).completed:
                    finished.append((beams[beam], score))
            else:
                candidates.append((beam, token, score))
            if len(candidates) == num_beams:
                break
        sequences = [beams[b] + [t] for b, t, _ in candidates]
        states = [ConstraintState.replay(options, seq) for seq in sequences]
        for beam, previous in enumerate(beams):
            state = ConstraintState.replay(options, previous)
            if state.completed:
                continue
            for token in state.advance():
                sequence = previous + [token]
                if sequence in sequences:
                    continue
                advanced = state.copy()
                advanced.add(token)
                sequences.append(sequence)
                states.append(advanced)
                candidates.append((beam, token, float(vocab_scores[beam, token])))
        keep = select_by_bank([s.bank for s in states], [c[2] for c in candidates], num_beams)
        beams = [sequences[i] for i in keep]
        scores = [candidates[i][2] for i in keep]
    done = [
        (b, s) for b, s in zip(beams, scores, strict=True) if ConstraintState.replay(options, b).completed
    ]
    pool = finished + done or list(zip(beams, scores, strict=True))
    # HF ranks hypotheses by score / length (length_penalty 1.0); unfinished beams all have the same length.
    best, _ = max(pool, key=lambda item: item[1] / max(len(item[0]), 1))
    return best


def find_option(answer: str, options: Sequence[str]) -> int | None:
    """The index of the option the decoded answer equals, stripped and ignoring case, else None.

    The reference's scoring lower-cases both sides (DigitalPhonetics/bloomzmms@77dc192:
    espnet-bloomzmms-files/egs2/fleurs/asr1/local/speechglue_evaluate.py, speechxnli_evaluate.py), so "no"
    is the option "No".
    """
    folded = [o.strip().lower() for o in options]
    key = answer.strip().lower()
    return folded.index(key) if key in folded else None


def match_option(answer: str, options: Sequence[str]) -> int:
    """The index of the option the decoded answer equals (`find_option`), else 0 as the reference."""
    index = find_option(answer, options)
    return 0 if index is None else index
