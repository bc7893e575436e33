"""Kang & Roy (Interspeech 2024): trainable HuBERT + pooling encoder prompting a frozen LLaMA-type chat LLM.

Spec speech-summarization.md §1.4: the user turn of MiniChat's chat template carries the speech embeddings
(and optionally text, in any order)::

    E(tok(prefix))          "<s>[|User|]"          the tokenizer's BOS + the prefix (reference: PROMPT_PREFIX)
    user turn               [text ids | speech]*   text without BOS (reference: `tok(text).input_ids[1:]`)
    E(tok(suffix)[1:])      "</s>[|Assistant|]"    the suffix with its leading BOS dropped (PROMPT_SUFFIX)
    E(response)             teacher-forced response tokens (training)

For scoring and generation the sequence goes to `SpeechLLM`, which left-pads batches with position ids
`cumsum(mask) - 1` so rotary positions match running each sample alone (the reference passes no position ids
and trains at batch size 1). KD training lays student and teacher sequences out right-padded instead
(`train.distillation.pack_right_padded`): causal attention then needs neither a mask nor position ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from speechllm.models.hubert_pool import HubertPoolEncoder
from speechllm.models.speech_llm import Segment, SpeechLLM, SpeechLLMOutput


@dataclass
class ChatTemplate:
    """MiniChat chat-turn strings (reference `utils.py` with SYSTEM_PROMPT = "")."""

    prefix: str = "[|User|]"
    suffix: str = "</s>[|Assistant|]"


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without a leading BOS (what the reference gets with `tok(text).input_ids[1:]`)."""
    ids = list(tokenizer(text).input_ids)
    if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    return ids


def chat_ids(tokenizer: Any, template: ChatTemplate) -> tuple[list[int], list[int]]:
    """(prefix ids starting with BOS, suffix ids without BOS) of a chat template."""
    prefix = list(tokenizer(template.prefix).input_ids)
    bos = tokenizer.bos_token_id
    if bos is not None and (not prefix or prefix[0] != bos):
        prefix = [bos, *prefix]  # the turn starts with <s> as with MiniChat's tokenizer (add_bos_token)
    return prefix, text_ids(tokenizer, template.suffix)


def reference_text_turn_ids(tokenizer: Any, template: ChatTemplate, text: str) -> list[int]:
    """Token ids of a text-only chat turn as the reference's `generate_text_response` writes it
    (wonjune-kang/llm-speech-summarization@0a3d8e6:inference.py): the one string
    `f"{prefix} {text}{suffix} "` (a space after `[|User|]` and one after `[|Assistant|]`) tokenised at once,
    starting with BOS."""
    ids = list(tokenizer(f"{template.prefix} {text}{template.suffix} ").input_ids)
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]  # as chat_ids: the turn starts with <s> as with MiniChat's tokenizer
    return ids


class KangRoy(nn.Module):
    """Speech encoder (trainable) with an optional frozen chat LLM.

    Args:
        encoder: HuBERT -> pooling -> projection.
        llm: the frozen LLM wrapper (None for encoder-only use).
        prefix_ids: chat prefix token ids, starting with BOS.
        suffix_ids: chat suffix token ids, without BOS.
        label_eos: also train the last response position to predict eos (the reference does not: its targets
            are decoded with `skip_special_tokens=True` and carry no EOS).
    """

    def __init__(
        self,
        encoder: HubertPoolEncoder,
        llm: SpeechLLM | None,
        prefix_ids: Sequence[int],
        suffix_ids: Sequence[int],
        label_eos: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.llm = llm
        self.prefix_ids = list(prefix_ids)
        self.suffix_ids = list(suffix_ids)
        self.label_eos = label_eos

    @classmethod
    def from_tokenizer(
        cls,
        encoder: HubertPoolEncoder,
        llm: SpeechLLM | None,
        tokenizer: Any,
        template: ChatTemplate,
        label_eos: bool = False,
    ) -> KangRoy:
        prefix, suffix = chat_ids(tokenizer, template)
        return cls(encoder, llm, prefix, suffix, label_eos)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only what training changes (the whole encoder and projection); the frozen LLM is referenced by
        id."""
        names = {name for name, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if k in names}

    def min_input_samples(self) -> int:
        """Shortest waveform (samples) that yields one speech embedding."""
        return self.encoder.min_samples()

    def max_input_samples(self) -> int | None:
        """Longest waveform (samples) the encoder reads whole (Whisper: its window), None without a limit."""
        features = self.encoder.features
        return features.max_samples if features is not None else None

    def encode(self, wav: torch.Tensor, wav_lengths: torch.Tensor) -> list[torch.Tensor]:
        """wav (B, N), wav_lengths (B,) -> B speech segments (T_i, H_llm) cut to their valid length."""
        speech, lengths = self.encoder(wav, wav_lengths)
        return [speech[i, : int(n)] for i, n in enumerate(lengths)]

    def chat_segments(self, user_turns: Sequence[Sequence[Segment]]) -> list[list[Segment]]:
        """Wrap each user turn (token-id lists and speech tensors, interleaved freely) in the chat
        template."""
        wrapped = []
        for turn in user_turns:
            parts = [seg for seg in turn if isinstance(seg, torch.Tensor) or len(seg) > 0]
            wrapped.append([self.prefix_ids, *parts, self.suffix_ids])
        return wrapped

    def _require_llm(self) -> SpeechLLM:
        if self.llm is None:
            raise ValueError("this KangRoy model was built without its LLM")
        return self.llm

    def forward(
        self, user_turns: Sequence[Sequence[Segment]], targets: Sequence[Sequence[int]]
    ) -> SpeechLLMOutput:
        """Teacher-forced next-token loss on the response tokens (and eos if `label_eos`)."""
        llm = self._require_llm()
        inputs = llm.build_inputs(self.chat_segments(user_turns), targets, append_eos=self.label_eos)
        return llm.score(inputs)

    def generate(
        self, user_turns: Sequence[Sequence[Segment]], max_new_tokens: int, **generate_kwargs: object
    ) -> list[list[int]]:
        """Greedy decoding of the assistant's response (reference: greedy, no sampling)."""
        return self._require_llm().generate(self.chat_segments(user_turns), max_new_tokens, **generate_kwargs)
