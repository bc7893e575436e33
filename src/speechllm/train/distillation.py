"""Kang & Roy's objective (speech-summarization.md §3.1), batched.

The student is the frozen LLM prompted with speech, the teacher the same LLM prompted with the transcript;
both are teacher-forced on the LLM's own text response. Per sample, with R = n + 1 "response positions" (the
last prompt position and the n response tokens, i.e. including the position after the last response token):

    NTP = mean over the n response tokens of CE(student logits, token)                    (reference's loss)
    LD  = mean over the R positions of -sum_v softmax(teacher)_v * log_softmax(student)_v (soft cross-entropy)
    FD  = sum over layers l of mean over R x H of (student h_l - teacher h_l)^2           (hidden-state MSE)
    loss = ntp_weight * NTP + ld_weight * LD + fd_weight * FD                             (0.5 / 0.5 / 1.0)

The reference runs batch size 1 and averages over 16 accumulated samples; here a batch of B samples gives the
mean of the B per-sample losses. Each run is one LM forward over the batch, right-padded: every sequence
starts at position 0 and causal attention never looks ahead, so the real positions compute exactly what they
compute alone, with no attention mask or position ids (with SDPA, its plain causal kernel). Only the N = sum_b
R_b response positions are read out (flat index tensors): the LM head, the losses and the hidden-state MSE
never touch the prompts or the padding, and the per-sample means are one weighted sum over those N rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from speechllm.models.lora import adapters_disabled
from speechllm.models.speech_llm import IGNORE_INDEX, Segment, SpeechLLM, is_speech_segment, token_list


@dataclass
class DistillationConfig:
    """Loss weights and feature-distillation layers (reference `config_full.yaml`)."""

    ntp_weight: float = 0.5
    ld_weight: float = 0.5
    fd_weight: float = 1.0
    fd_layers: list[int] = field(
        default_factory=lambda: [0, 5, 11, 17, 23]
    )  # indices into HF `hidden_states`


ENCODER_MODES = ("train", "reference")


def reference_encoder_training(batch_index: int, epoch_start: int, validation_interval: int) -> bool:
    """Whether Kang & Roy's trainer has its audio encoder in train mode for micro-batch `batch_index`
    (0-based, counted over the whole run) of an epoch that began at micro-batch `epoch_start`.

    The reference (wonjune-kang/llm-speech-summarization@0a3d8e6:trainer.py) calls `audio_encoder.train()`
    only at the start of each epoch; after every `validation_interval` batches of its global count
    (`self.step`, batches of one utterance) `validate()` puts the encoder in eval mode and leaves it there. So
    the encoder trains (dropout, SpecAugment, LayerDrop) until the first multiple of the interval inside the
    epoch and runs in eval mode for the rest of it.
    """
    return batch_index // validation_interval == epoch_start // validation_interval


def set_reference_encoder_mode(
    model: torch.nn.Module, batch_index: int, epoch_start: int, validation_interval: int
) -> None:
    """Put `model.encoder` (the Kang & Roy speech encoder) in the reference's mode for this micro-batch."""
    model.encoder.train(reference_encoder_training(batch_index, epoch_start, validation_interval))


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


@dataclass
class PackedBatch:
    """B prompt + response sequences, right-padded, with their response positions.

    Attributes:
        inputs_embeds: (B, L, H) in the LM's dtype; padding rows hold the pad-token embedding.
        keep: (B, L) bool, True on each sample's R_b response positions (N = keep.sum() in all).
        rows: (N,) long, the kept positions as flat indices into B * L, sample-major (the order of `keep`).
    """

    inputs_embeds: torch.Tensor
    keep: torch.Tensor
    rows: torch.Tensor


@dataclass
class ResponseTargets:
    """Labels and per-sample averaging weights of the N response rows (shared by student and teacher).

    Attributes:
        labels: (N,) long next-token label per row, IGNORE_INDEX on a response's last row without eos.
        position_weights: (N,) float32, 1 / (R_b * B): a weighted sum is the mean over samples of per-sample
            means over the R_b response positions.
        label_weights: (N,) float32, 1 / (labels_b * B) on labelled rows and 0 elsewhere: the same for the NTP
            mean over each sample's label tokens.
    """

    labels: torch.Tensor
    position_weights: torch.Tensor
    label_weights: torch.Tensor


def _tensor(
    values: Sequence[float] | np.ndarray, dtype: type[np.number], device: torch.device
) -> torch.Tensor:
    """A Python list as a tensor via numpy (several times faster than `torch.tensor` on long lists)."""
    return torch.from_numpy(np.asarray(values, dtype=dtype)).to(device)


def response_rows(prompt_lengths: Sequence[int], response_lengths: Sequence[int], span: int) -> list[int]:
    """Flat indices into (B, span) of each sample's response positions: the last prompt position and the n_b
    response tokens of a sequence that starts at position 0 (right padding)."""
    rows: list[int] = []
    for b, (prompt, n) in enumerate(zip(prompt_lengths, response_lengths, strict=True)):
        start = b * span + prompt - 1
        rows.extend(range(start, start + n + 1))
    return rows


def _embed_sources(
    llm: SpeechLLM, sequences: Sequence[Sequence[Segment]]
) -> tuple[torch.Tensor, list[list[range]]]:
    """All rows the sequences are made of, embedded at once.

    Row 0 is the pad token, then every token id of the batch (one embedding lookup), then every speech segment
    (one concatenation, through which the gradient reaches them).

    Args:
        llm: the LM wrapper (input embeddings, pad token).
        sequences: B ordered lists of token-id segments and speech tensors (T_i, H).

    Returns:
        source (S, H) in the LM's dtype, and per sequence the source rows of its positions, one range per
        segment.
    """
    embedding = llm.lm.get_input_embeddings()
    device, dtype, hidden_size = embedding.weight.device, embedding.weight.dtype, embedding.weight.shape[1]
    token_ids: list[int] = [llm.pad_token_id]
    speech: list[torch.Tensor] = []
    pieces: list[list[tuple[bool, int, int]]] = []  # per sequence: (is_speech, first row of its kind, length)
    speech_rows = 0
    for sequence in sequences:
        layout = []
        for segment in sequence:
            if is_speech_segment(segment):
                if segment.shape[-1] != hidden_size:
                    raise ValueError(
                        f"speech segment of shape {tuple(segment.shape)} does not match H={hidden_size}"
                    )
                speech.append(segment.to(device, dtype))
                layout.append((True, speech_rows, segment.shape[0]))
                speech_rows += segment.shape[0]
            else:
                ids = token_list(segment)
                layout.append((False, len(token_ids), len(ids)))
                token_ids.extend(ids)
        pieces.append(layout)
    source = embedding(_tensor(token_ids, np.int64, device))
    if speech:
        source = torch.cat([source, *speech], dim=0)
    rows = []
    for layout in pieces:
        starts = [
            first + len(token_ids) if is_speech else first for is_speech, first, _ in layout
        ]  # speech last
        rows.append([range(start, start + n) for start, (_, _, n) in zip(starts, layout, strict=True)])
    return source, rows


def pack_right_padded(
    llm: SpeechLLM, prompts: Sequence[Sequence[Segment]], responses: Sequence[Sequence[int]]
) -> PackedBatch:
    """Lay `prompt + response` out per sample in one right-padded batch with a single gather of source rows.

    Args:
        llm: the LM wrapper.
        prompts: B prompts, each an ordered list of token-id segments and speech tensors (T_i, H).
        responses: B teacher-forced response token-id lists.

    Returns:
        PackedBatch with L = the longest `prompt + response`, the padding pointing at the pad embedding.
    """
    source, rows = _embed_sources(
        llm, [[*prompt, response] for prompt, response in zip(prompts, responses, strict=True)]
    )
    lengths = [sum(len(r) for r in ranges) for ranges in rows]
    span = max(lengths)
    index: list[int] = []
    for ranges, length in zip(rows, lengths, strict=True):
        for r in ranges:
            index.extend(r)
        index.extend([0] * (span - length))
    batch = len(lengths)
    inputs_embeds = source.index_select(0, _tensor(index, np.int64, source.device)).view(batch, span, -1)

    response_lengths = [len(r) for r in responses]
    prompt_lengths = [n - r for n, r in zip(lengths, response_lengths, strict=True)]
    if min(prompt_lengths) < 1:
        raise ValueError("a prompt of at least one position is needed to predict the first response token")
    kept = response_rows(prompt_lengths, response_lengths, span)
    keep = np.zeros(batch * span, dtype=bool)
    keep[kept] = True
    return PackedBatch(
        inputs_embeds=inputs_embeds,
        keep=torch.from_numpy(keep).view(batch, span).to(source.device),
        rows=_tensor(kept, np.int64, source.device),
    )


def response_targets(
    responses: Sequence[Sequence[int]], eos_token_id: int | None, device: torch.device
) -> ResponseTargets:
    """Labels and averaging weights of the response rows (see `ResponseTargets`); eos labels the last row."""
    batch = len(responses)
    last = IGNORE_INDEX if eos_token_id is None else eos_token_id
    labels = [tok for response in responses for tok in (*response, last)]
    positions = np.array([len(r) + 1 for r in responses])
    labelled = positions - (eos_token_id is None)
    position_weights = np.repeat(1.0 / (positions * batch), positions)
    label_weights = np.repeat(1.0 / (labelled * batch), positions)
    if eos_token_id is None:
        label_weights[np.cumsum(positions) - 1] = 0.0  # the last row of each response has no label
    return ResponseTargets(
        labels=_tensor(labels, np.int64, device),
        position_weights=_tensor(position_weights, np.float32, device),
        label_weights=_tensor(label_weights, np.float32, device),
    )


def run_llm(llm: SpeechLLM, batch: PackedBatch, layers: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One LM forward over a right-padded batch, read out at the response rows only.

    Returns:
        logits (N, V) and the hidden states of `layers` stacked as (len(layers), N, H).
    """
    kwargs: dict[str, object] = {
        "inputs_embeds": batch.inputs_embeds,
        "output_hidden_states": True,
        "use_cache": False,
    }
    takes_keep = llm.lm_takes_logits_to_keep
    if takes_keep:
        kwargs["logits_to_keep"] = batch.keep  # LM head on the N kept rows only, flattened sample-major
    out = llm.lm(**kwargs)
    hidden = out.hidden_states
    bad = [i for i in layers if not -len(hidden) <= i < len(hidden)]
    if bad:
        raise ValueError(f"fd_layers {bad} out of range: the LLM returns {len(hidden)} hidden states")
    logits = out.logits if takes_keep else out.logits.flatten(0, 1).index_select(0, batch.rows)
    selected = torch.stack([hidden[i] for i in layers]).flatten(1, 2).index_select(1, batch.rows)
    return logits, selected


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
    if not len(student_prompts) == len(teacher_prompts) == len(responses):
        raise ValueError(
            f"{len(student_prompts)} student prompts, {len(teacher_prompts)} teacher prompts and "
            f"{len(responses)} responses"
        )
    responses = [token_list(r) for r in responses]
    empty = [i for i, r in enumerate(responses) if len(r) == 0]
    if empty:
        raise ValueError(f"empty responses at batch positions {empty}: nothing to distil")
    s_logits, s_hidden = run_llm(llm, pack_right_padded(llm, student_prompts, responses), config.fd_layers)
    with torch.no_grad(), adapters_disabled(llm.lm):  # the teacher is the frozen LLM (no LoRA)
        t_logits, t_hidden = run_llm(
            llm, pack_right_padded(llm, teacher_prompts, responses), config.fd_layers
        )
        t_probs = t_logits.float().softmax(dim=-1)
    targets = response_targets(responses, llm.eos_token_id if append_eos else None, s_logits.device)

    s_logp = s_logits.float().log_softmax(dim=-1)  # (N, V)
    token_ce = F.nll_loss(s_logp, targets.labels, ignore_index=IGNORE_INDEX, reduction="none")
    # Elementwise products and sums, not dot/vecdot: autocast would run those in bf16 (and mix dtypes).
    soft_ce = -(t_probs * s_logp).sum(dim=-1)
    sq_error = (s_hidden.float() - t_hidden.float()).pow(2).mean(dim=-1).sum(dim=0)  # (N,) summed over layers
    ntp = (token_ce.float() * targets.label_weights).sum()
    ld = (soft_ce * targets.position_weights).sum()
    fd = (sq_error * targets.position_weights).sum()
    labelled = targets.labels != IGNORE_INDEX
    return DistillationOutput(
        loss=config.ntp_weight * ntp + config.ld_weight * ld + config.fd_weight * fd,
        ntp=ntp,
        ld=ld,
        fd=fd,
        num_tokens=labelled.sum(),
        # `max` returns the first maximal index, as `argmax` does, and is several times faster on CPU.
        num_correct=((s_logits.detach().max(dim=-1).indices == targets.labels) & labelled).sum(),
    )
