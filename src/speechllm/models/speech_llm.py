"""A frozen HF causal LM prompted with interleaved text-token and speech-vector segments via `inputs_embeds`.

BLOOMZMMS stage 2 (spec bloomzmms.md §2.4-2.5) builds `[E(prefix); speech; E(postfix); E(target)]`, trains
with token-summed cross-entropy over `[target, eos]` divided by the batch size, and decodes with HF
`generate`. The same wrapper serves LLaMA-type models with rotary positions (speech-summarization.md §1):
sequences are left-padded with the pad-token embedding and `position_ids = cumsum(attention_mask) - 1`, so
every sample sees the same positions as when run alone (BLOOM's ALiBi derives them from the attention mask
itself).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer

from speechllm.settings import config_choice

IGNORE_INDEX = -100
# How a hypothesis ends that used the whole `max_new_tokens` budget without eos (config
# evaluate.unfinished_hypotheses): `keep` every generated token; `drop_last_token`, the reference's: its
# asr_inference.py cuts the last token of every output (`yseq[1:-1]`), which is eos when the beam finished but
# a real token when it ran out of budget (DigitalPhonetics/bloomzmms@77dc192:
# espnet-bloomzmms-files/espnet2/bin/asr_inference.py). Finished hypotheses end at their eos either way.
UNFINISHED_HYPOTHESES = ("keep", "drop_last_token")

# A prompt segment: token ids (embedded with the LM's input embeddings) or speech vectors (T_i, H).
Segment = Sequence[int] | torch.Tensor


@dataclass
class BuiltInputs:
    """Left-padded LM inputs.

    Attributes:
        inputs_embeds: (B, L, H) in the LM's dtype.
        attention_mask: (B, L) long, 0 on (left) padding.
        position_ids: (B, L) long, `cumsum(attention_mask) - 1` clamped at 0.
        labels: (B, L) long or None. Aligned with the logits (already shifted): `labels[b, t]` is the token
            the logit at position t must predict, IGNORE_INDEX elsewhere. With targets, the last prompt
            position predicts target[0] and the last target position predicts eos.
        prompt_lengths: (B,) long, prompt (segments) length per sample.
        target_lengths: (B,) long, number of target tokens fed per sample (0 without targets).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    prompt_lengths: torch.Tensor
    target_lengths: torch.Tensor

    @property
    def target_mask(self) -> torch.Tensor:
        """(B, L) bool, True at positions that carry a label."""
        if self.labels is None:
            raise ValueError("inputs were built without targets")
        return self.labels != IGNORE_INDEX

    @property
    def label_span(self) -> int:
        """Number K of final positions that hold every label (left padding right-aligns all sequences)."""
        return int(self.target_lengths.max().item()) + 1


@dataclass
class SpeechLLMOutput:
    """Teacher-forced scores.

    Attributes:
        loss: () float32, cross-entropy summed over all label tokens (target + eos) divided by the batch size.
        num_tokens: () long, number of label tokens.
        num_correct: () long, label tokens whose argmax prediction is right (teacher-forced accuracy
            numerator).
        logits: (B, K, V) logits of the last K = `label_span` positions.
        labels: (B, K) labels aligned with `logits`.
    """

    loss: torch.Tensor
    num_tokens: torch.Tensor
    num_correct: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor


def _accepts_argument(fn: object, name: str) -> bool:
    return name in inspect.signature(fn).parameters


def _first_rows(module: nn.Module, args: tuple, output: torch.Tensor, rows: int) -> torch.Tensor:
    """Forward hook of an LM head: (..., V) logits → (..., rows)."""
    return output[..., :rows]


def is_speech_segment(segment: Segment) -> bool:
    """A (T, H) speech tensor, as opposed to token ids."""
    return isinstance(segment, torch.Tensor) and segment.dim() == 2


def token_list(segment: Segment) -> list[int]:
    """Token ids of a token segment (a list or a 1-D tensor) as a Python list."""
    return segment.tolist() if isinstance(segment, torch.Tensor) else [int(tok) for tok in segment]


def left_pad(sequences: Sequence[torch.Tensor], pad_vector: torch.Tensor) -> torch.Tensor:
    """Stack variable-length sequences, left-padded with one vector.

    Args:
        sequences: B tensors (L_b, H).
        pad_vector: (H,) fill vector.

    Returns:
        (B, max L_b, H).
    """
    max_length = max(seq.shape[0] for seq in sequences)
    padded = [torch.cat([pad_vector.expand(max_length - seq.shape[0], -1), seq], dim=0) for seq in sequences]
    return torch.stack(padded, dim=0)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) 0/1 mask -> (B, L) long positions `cumsum - 1`, clamped at 0 on the left padding."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def shifted_labels(prompt_length: int, target: Sequence[int], eos_token_id: int | None) -> list[int]:
    """Labels aligned with the logits of one unpadded sequence `prompt + target`.

    Args:
        prompt_length: P >= 1 prompt positions.
        target: n target token ids (fed as inputs after the prompt).
        eos_token_id: appended as the label of the last target position, or None to predict only `target`.

    Returns:
        P + n labels: IGNORE_INDEX up to position P - 2, then target (and eos), IGNORE_INDEX after.
    """
    if prompt_length < 1:
        raise ValueError("a prompt of at least one position is needed to predict the first target token")
    predicted = list(target) + ([eos_token_id] if eos_token_id is not None else [])
    labels = [IGNORE_INDEX] * (prompt_length - 1) + predicted
    return labels + [IGNORE_INDEX] * (prompt_length + len(target) - len(labels))


def check_unfinished_hypotheses(value: str) -> str:
    return config_choice(value, UNFINISHED_HYPOTHESES, "evaluate.unfinished_hypotheses")


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (float32) of the labels, 0 where labels are IGNORE_INDEX.

    Args:
        logits: (B, K, V).
        labels: (B, K).

    Returns:
        (B, K) float32.
    """
    mask = labels != IGNORE_INDEX
    log_probs = logits.float().log_softmax(dim=-1)
    picked = log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * mask


class SpeechLLM(nn.Module):
    """Frozen causal LM fed with interleaved token/speech segments.

    Args:
        lm: HF causal LM (e.g. `BloomForCausalLM`, `LlamaForCausalLM`). All parameters are frozen and the
            model is kept in eval mode.
        pad_token_id: token whose embedding fills the left padding and that `generate` pads finished beams
            with.
        eos_token_id: end-of-sequence token appended to the labels and used to stop generation.
        gradient_checkpointing: enable non-reentrant activation checkpointing of the LM's decoder layers. The
            LM stays in eval mode; only the checkpointed decoder layers get `training=True` while this module
            trains (HF checkpoints only in training mode). Their submodules stay in eval mode, so BLOOM and
            LLaMA apply no dropout; a model whose layer reads its own `training` flag for dropout would
            (warned).
        output_rows: the LM head's output cut to its first `output_rows` logits (the tokenizer's ids) by a
            forward hook, so the LM scores and generates as if resized to the tokenizer, as ESPnet resized
            BLOOMZ's 250,880 rows to 250,680 (`models.llm.output_rows: tokenizer`). None: every row of the
            head.
    """

    def __init__(
        self,
        lm: PreTrainedModel,
        pad_token_id: int,
        eos_token_id: int,
        gradient_checkpointing: bool = False,
        output_rows: int | None = None,
    ) -> None:
        super().__init__()
        self.lm = lm
        self.lm.requires_grad_(False)
        self.lm.eval()
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.gradient_checkpointing = gradient_checkpointing
        head_rows = lm.get_output_embeddings().weight.shape[0]
        if output_rows is not None and not 0 < output_rows <= head_rows:
            raise ValueError(f"output_rows={output_rows} must be in 1..{head_rows} (the LM head's rows)")
        self.output_rows = output_rows if output_rows is not None and output_rows < head_rows else None
        if self.output_rows is not None:
            # Cut at the head itself, so every softmax (the loss, scoring, and beam search's log-softmax,
            # which HF applies before any logits processor) is over the tokenizer's ids alone, as after a
            # resize.
            lm.get_output_embeddings().register_forward_hook(partial(_first_rows, rows=self.output_rows))
        self._lm_takes_position_ids = _accepts_argument(lm.forward, "position_ids")
        self.lm_takes_logits_to_keep = _accepts_argument(lm.forward, "logits_to_keep")
        if gradient_checkpointing:
            self._enable_gradient_checkpointing()
        self.train(self.training)

    # ------------------------------------------------------------------ modes

    def _enable_gradient_checkpointing(self) -> None:
        kwargs = {"use_reentrant": False}
        if hasattr(self.lm, "activation_checkpointing_enable"):  # transformers >= 5.x
            self.lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        dropouts = {
            name: value
            for name, value in self.lm.config.to_dict().items()
            if "dropout" in name and isinstance(value, float) and value > 0
        }
        if dropouts:
            warnings.warn(
                f"gradient checkpointing flags the LM's decoder layers as training; non-zero {dropouts} "
                "apply if a layer reads its own `training` flag",
                stacklevel=2,
            )

    def _checkpointed_layers(self) -> list[nn.Module]:
        return [
            module
            for module in self.lm.modules()
            if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing
        ]

    def _set_layer_training(self, mode: bool) -> None:
        for layer in self._checkpointed_layers():
            layer.training = mode

    def train(self, mode: bool = True) -> SpeechLLM:
        """Keep the LM in eval mode; with gradient checkpointing, flag its decoder layers as training."""
        super().train(mode)
        self.lm.eval()
        self._set_layer_training(mode and self.gradient_checkpointing)
        return self

    @contextlib.contextmanager
    def _inference_layers(self) -> Iterator[None]:
        """Temporarily turn off the checkpointing flags (HF disables the KV cache of checkpointed layers)."""
        self._set_layer_training(False)
        try:
            yield
        finally:
            self._set_layer_training(self.training and self.gradient_checkpointing)

    # ------------------------------------------------------------------ inputs

    @property
    def embed_dtype(self) -> torch.dtype:
        return self.lm.get_input_embeddings().weight.dtype

    @property
    def embed_device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    @property
    def hidden_size(self) -> int:
        return self.lm.get_input_embeddings().weight.shape[1]

    def embed_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(...,) long token ids -> (..., H) input embeddings in the LM's dtype."""
        return self.lm.get_input_embeddings()(token_ids.to(self.embed_device))

    def _check_speech(self, segment: torch.Tensor) -> None:
        if segment.shape[-1] != self.hidden_size:
            raise ValueError(
                f"speech segment of shape {tuple(segment.shape)} does not match H={self.hidden_size}"
            )

    def _embed_sequences(self, pieces: Sequence[Sequence[Segment]]) -> list[torch.Tensor]:
        """Embed each sample's ordered pieces (one embedding lookup for all token pieces of the batch).

        Args:
            pieces: per sample, an ordered list of token-id segments and (T_i, H) speech tensors.

        Returns:
            B tensors (L_b, H) in the LM's dtype.
        """
        token_pieces = [token_list(seg) for sample in pieces for seg in sample if not is_speech_segment(seg)]
        flat_ids = [tok for seg in token_pieces for tok in seg]
        flat_embeds = self.embed_tokens(torch.tensor(flat_ids, dtype=torch.long))
        token_embeds = iter(torch.split(flat_embeds, [len(seg) for seg in token_pieces]))
        sequences = []
        for sample in pieces:
            parts = []
            for seg in sample:
                if is_speech_segment(seg):
                    self._check_speech(seg)
                    parts.append(seg.to(self.embed_device, self.embed_dtype))
                else:
                    parts.append(next(token_embeds))
            sequences.append(torch.cat(parts, dim=0))
        return sequences

    def build_inputs(
        self,
        segments: Sequence[Sequence[Segment]],
        targets: Sequence[Sequence[int]] | None = None,
        append_eos: bool = True,
    ) -> BuiltInputs:
        """Build left-padded `inputs_embeds` for a batch of prompts (and teacher-forced targets).

        Args:
            segments: per sample, the prompt as an ordered list of segments: token-id lists (or 1-D long
                tensors) and speech tensors (T_i, H) already cut to their valid length, in any interleaving,
                e.g. `[prefix_ids, speech, postfix_ids]` or `[ids, speech_1, ids, speech_2, ids]`.
            targets: per sample, target token ids fed after the prompt (teacher forcing), or None.
            append_eos: label the last target position with eos (training); False scores only `targets`.

        Returns:
            BuiltInputs with sequences `prompt + target` right-aligned to length L.
        """
        if targets is not None and len(targets) != len(segments):
            raise ValueError(f"{len(segments)} prompts but {len(targets)} targets")
        target_lists = [token_list(t) for t in targets] if targets is not None else [[] for _ in segments]
        pieces = [list(sample) + [target] for sample, target in zip(segments, target_lists, strict=True)]
        sequences = self._embed_sequences(pieces)
        device = self.embed_device
        target_lengths = torch.tensor([len(t) for t in target_lists], dtype=torch.long, device=device)
        lengths = torch.tensor([seq.shape[0] for seq in sequences], dtype=torch.long, device=device)
        prompt_lengths = lengths - target_lengths
        max_length = int(lengths.max().item())

        pad_vector = self.embed_tokens(torch.tensor(self.pad_token_id, dtype=torch.long))
        inputs_embeds = left_pad(sequences, pad_vector)
        positions = torch.arange(max_length, device=device)
        attention_mask = (positions.unsqueeze(0) >= (max_length - lengths).unsqueeze(1)).long()

        labels = None
        if targets is not None:
            eos = self.eos_token_id if append_eos else None
            rows = [
                [IGNORE_INDEX] * (max_length - int(n)) + shifted_labels(int(p), t, eos)
                for n, p, t in zip(lengths, prompt_lengths, target_lists, strict=True)
            ]
            labels = torch.tensor(rows, dtype=torch.long, device=device)
        return BuiltInputs(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            labels=labels,
            prompt_lengths=prompt_lengths,
            target_lengths=target_lengths,
        )

    # ------------------------------------------------------------------ scoring

    def lm_logits(self, inputs: BuiltInputs, logits_to_keep: int = 0) -> torch.Tensor:
        """Run the LM on built inputs.

        Args:
            inputs: from `build_inputs`.
            logits_to_keep: compute the LM head only on the last K positions (0 = all L).

        Returns:
            (B, K or L, V) logits in the LM's dtype.
        """
        kwargs = {
            "inputs_embeds": inputs.inputs_embeds,
            "attention_mask": inputs.attention_mask,
            "use_cache": False,
        }
        if self._lm_takes_position_ids:
            kwargs["position_ids"] = inputs.position_ids
        if self.lm_takes_logits_to_keep:
            kwargs["logits_to_keep"] = logits_to_keep
        logits = self.lm(**kwargs).logits
        if logits_to_keep and not self.lm_takes_logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return logits

    def score(self, inputs: BuiltInputs) -> SpeechLLMOutput:
        """Teacher-forced cross-entropy and accuracy of built inputs that carry labels."""
        if inputs.labels is None:
            raise ValueError("inputs were built without targets")
        span = inputs.label_span
        logits = self.lm_logits(inputs, logits_to_keep=span)
        labels = inputs.labels[:, -span:].to(logits.device)
        mask = labels != IGNORE_INDEX
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        num_correct = ((logits.argmax(dim=-1) == labels) & mask).sum()
        return SpeechLLMOutput(
            loss=loss / labels.shape[0],
            num_tokens=mask.sum(),
            num_correct=num_correct,
            logits=logits,
            labels=labels,
        )

    def forward(
        self, segments: Sequence[Sequence[Segment]], targets: Sequence[Sequence[int]]
    ) -> SpeechLLMOutput:
        """Teacher-forced loss over `target + eos` for a batch of prompts (see `build_inputs`)."""
        return self.score(self.build_inputs(segments, targets))

    @torch.no_grad()
    def option_logprobs(
        self, segments: Sequence[Sequence[Segment]], options: Sequence[Sequence[int]]
    ) -> torch.Tensor:
        """Rank classification: summed log-probability of each option's tokens after each prompt (no eos).

        Args:
            segments: B prompts (see `build_inputs`).
            options: K non-empty token-id sequences shared by all prompts.

        Returns:
            (B, K) float32 log-probabilities.
        """
        if not options or any(len(option) == 0 for option in options):
            raise ValueError("options must be a non-empty list of non-empty token sequences")
        num_options = len(options)
        expanded = [sample for sample in segments for _ in range(num_options)]
        expanded_targets = [option for _ in segments for option in options]
        with self._inference_layers():
            inputs = self.build_inputs(expanded, expanded_targets, append_eos=False)
            span = inputs.label_span
            logits = self.lm_logits(inputs, logits_to_keep=span)
        labels = inputs.labels[:, -span:].to(logits.device)
        return token_logprobs(logits, labels).sum(dim=-1).view(len(segments), num_options)

    # ------------------------------------------------------------------ generation

    def _strip(self, tokens: Sequence[int], budget: int | None = None) -> list[int]:
        """Cut at the first eos, then drop trailing pad tokens (HF pads finished sequences). With a
        `budget`, a sequence of that many tokens without eos (it ran out of budget) loses its last token
        (`drop_last_token`, see UNFINISHED_HYPOTHESES)."""
        out = list(tokens)
        if self.eos_token_id in out:
            out = out[: out.index(self.eos_token_id)]
        elif budget is not None and len(out) >= budget:
            out = out[:-1]
        while out and out[-1] == self.pad_token_id:
            out.pop()
        return out

    @torch.no_grad()
    def generate(
        self,
        segments: Sequence[Sequence[Segment]],
        max_new_tokens: int,
        num_beams: int = 1,
        unfinished_hypotheses: str = "keep",
        **generate_kwargs: object,
    ) -> list[list[int]]:
        """Decode continuations of the prompts with HF `generate(inputs_embeds=...)`.

        Greedy/beam search by default (`do_sample=False` unless overridden). transformers 5 returns only the
        new tokens when generating from `inputs_embeds`.

        Args:
            segments: B prompts (see `build_inputs`).
            max_new_tokens: generation budget.
            num_beams: beam size (BLOOMZMMS: 5).
            unfinished_hypotheses: `keep` | `drop_last_token` (config evaluate.unfinished_hypotheses): what
                becomes of the last token of a sequence that reached `max_new_tokens` without eos.
            generate_kwargs: passed to HF `generate` (e.g. `num_return_sequences`, `repetition_penalty`).

        Returns:
            B * num_return_sequences token-id lists, each cut at the first eos and without trailing pad
            tokens.
        """
        check_unfinished_hypotheses(unfinished_hypotheses)
        with self._inference_layers():
            inputs = self.build_inputs(segments)
            kwargs: dict[str, object] = {
                "inputs_embeds": inputs.inputs_embeds,
                "attention_mask": inputs.attention_mask,
                "max_new_tokens": max_new_tokens,
                "num_beams": num_beams,
                "pad_token_id": self.pad_token_id,
                "eos_token_id": self.eos_token_id,
                "do_sample": False,
            }
            if self._lm_takes_position_ids:
                kwargs["position_ids"] = inputs.position_ids
            kwargs.update(generate_kwargs)
            output = self.lm.generate(**kwargs)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        budget = max_new_tokens if unfinished_hypotheses == "drop_last_token" else None
        return [self._strip(row, budget) for row in sequences.tolist()]
