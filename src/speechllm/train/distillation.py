"""Kang & Roy's objective (speech-summarization.md §3.1), batched.

The student is the frozen LLM prompted with speech, the teacher the same LLM prompted with the transcript;
both are teacher-forced on the LLM's own text response. Per sample, with R = n + 1 "response positions" (the
last prompt position and the n response tokens, i.e. including the position after the last response token):

    NTP = mean over the n response tokens of CE(student logits, token)                    (reference's loss)
    LD  = mean over the R positions of -sum_v softmax(teacher)_v * log_softmax(student)_v (soft cross-entropy)
    FD  = sum over layers l of mean over R x H of (student h_l - teacher h_l)^2           (hidden-state MSE)
    loss = ntp_weight * NTP + ld_weight * LD + fd_weight * FD                             (0.5 / 0.5 / 1.0)

The reference runs batch size 1 and averages over 16 accumulated samples; here a batch of B samples gives the
mean of the B per-sample losses. Both prompts are left-padded (`SpeechLLM.build_inputs`, with
`position_ids = cumsum(mask) - 1`), so every sample's response positions are its last R positions in both runs
and line up across student and teacher without any gather.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from speechllm.models.speech_llm import IGNORE_INDEX, BuiltInputs, Segment, SpeechLLM


@dataclass
class DistillationConfig:
    """Loss weights and feature-distillation layers (reference `config_full.yaml`)."""

    ntp_weight: float = 0.5
    ld_weight: float = 0.5
    fd_weight: float = 1.0
    fd_layers: list[int] = field(
        default_factory=lambda: [0, 5, 11, 17, 23]
    )  # indices into HF `hidden_states`


@dataclass
class DistillationOutput:
    """Batched KD loss and its parts, each the mean over samples of the per-sample value.

    Attributes:
        loss: () weighted total.
        ntp: () next-token cross-entropy.
        ld: () logit distillation (soft cross-entropy to the teacher).
        fd: () feature distillation (hidden-state MSE summed over layers).
        num_tokens: () long, NTP label tokens in the batch.
        num_correct: () long, of which the student's argmax is right.
    """

    loss: torch.Tensor
    ntp: torch.Tensor
    ld: torch.Tensor
    fd: torch.Tensor
    num_tokens: torch.Tensor
    num_correct: torch.Tensor


def response_mask(target_lengths: torch.Tensor, span: int) -> torch.Tensor:
    """(B,) response lengths n_b -> (B, span) bool, True on each sample's last n_b + 1 positions."""
    offsets = torch.arange(span, device=target_lengths.device)
    return offsets.unsqueeze(0) >= (span - target_lengths - 1).unsqueeze(1)


def _lm_kwargs(llm: SpeechLLM, inputs: BuiltInputs, span: int) -> dict[str, object]:
    params = inspect.signature(llm.lm.forward).parameters
    kwargs: dict[str, object] = {
        "inputs_embeds": inputs.inputs_embeds,
        "attention_mask": inputs.attention_mask,
        "output_hidden_states": True,
        "use_cache": False,
    }
    if "position_ids" in params:
        kwargs["position_ids"] = inputs.position_ids
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = span
    return kwargs


def run_llm(
    llm: SpeechLLM, inputs: BuiltInputs, span: int, layers: Sequence[int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and selected hidden states of the last `span` positions.

    Returns:
        logits (B, span, V) and one (B, span, H) tensor per entry of `layers`.
    """
    out = llm.lm(**_lm_kwargs(llm, inputs, span))
    hidden = out.hidden_states
    bad = [i for i in layers if not -len(hidden) <= i < len(hidden)]
    if bad:
        raise ValueError(f"fd_layers {bad} out of range: the LLM returns {len(hidden)} hidden states")
    return out.logits[:, -span:], [hidden[i][:, -span:] for i in layers]


def _per_sample_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, K) values, (B, K) bool mask -> (B,) mean over each row's masked entries."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def distillation_loss(
    llm: SpeechLLM,
    student_prompts: Sequence[Sequence[Segment]],
    teacher_prompts: Sequence[Sequence[Segment]],
    responses: Sequence[Sequence[int]],
    config: DistillationConfig,
    append_eos: bool = False,
) -> DistillationOutput:
    """Batched NTP + logit + feature distillation loss.

    Args:
        llm: the frozen LLM wrapper (student and teacher).
        student_prompts: B prompts with speech, e.g. `[prefix_ids, speech (T_b, H), suffix_ids]`.
        teacher_prompts: B prompts with the transcript instead: `[prefix_ids, transcript_ids, suffix_ids]`.
        responses: B non-empty response token-id lists (teacher-forced in both runs).
        config: weights and layers.
        append_eos: also train the last response position to predict eos (the reference has no eos).

    Returns:
        DistillationOutput; gradients reach the speech segments of `student_prompts` only.
    """
    empty = [i for i, r in enumerate(responses) if len(r) == 0]
    if empty:
        raise ValueError(f"empty responses at batch positions {empty}: nothing to distil")
    student = llm.build_inputs(student_prompts, responses, append_eos=append_eos)
    span = student.label_span
    s_logits, s_hidden = run_llm(llm, student, span, config.fd_layers)
    with torch.no_grad():
        teacher = llm.build_inputs(teacher_prompts, responses, append_eos=append_eos)
        t_logits, t_hidden = run_llm(llm, teacher, span, config.fd_layers)

    labels = student.labels[:, -span:].to(s_logits.device)
    positions = response_mask(student.target_lengths.to(s_logits.device), span)
    labelled = labels != IGNORE_INDEX
    s_logp = s_logits.float().log_softmax(dim=-1)
    token_ce = F.nll_loss(s_logp.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    ntp = _per_sample_mean(token_ce, labelled)
    soft_ce = -(t_logits.float().softmax(dim=-1) * s_logp).sum(dim=-1)
    ld = _per_sample_mean(soft_ce, positions)
    fd = torch.zeros_like(ntp)
    for s_h, t_h in zip(s_hidden, t_hidden, strict=True):
        fd = fd + _per_sample_mean((s_h.float() - t_h.float()).pow(2).mean(dim=-1), positions)
    total = config.ntp_weight * ntp + config.ld_weight * ld + config.fd_weight * fd
    num_correct = ((s_logits.argmax(dim=-1) == labels) & labelled).sum()
    return DistillationOutput(
        loss=total.mean(),
        ntp=ntp.mean(),
        ld=ld.mean(),
        fd=fd.mean(),
        num_tokens=labelled.sum(),
        num_correct=num_correct,
    )
