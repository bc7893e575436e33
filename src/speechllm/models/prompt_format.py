"""How a prompt sits in the LLM's input: as plain text (BLOOMZ) or inside the tokenizer's chat turn.

Config `models.prompt.format` (speechllm.json `prompt.format`):

- `plain`: `[BOS?] prefix speech postfix`; the BOS only where the tokenizer itself starts every text with it
  (Llama, Gemma, Mistral; BLOOM and Qwen add none), and the tokenizer's eos ends a target.
- `chat`: the user turn of the tokenizer's chat template carries `prefix speech postfix`, followed by the
  template's generation prompt (the assistant turn's opening); the token that closes an assistant turn
  (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`) ends a target. `models.prompt.system` adds a system
  turn.

The frame is found by rendering the template around a marker and splitting at it, so any template works
without knowing its strings; text inside the turn is tokenised without special tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROMPT_FORMATS = ("plain", "chat")
_USER_MARK = "SPEECHLLMUSERMARK"
_REPLY_MARK = "SPEECHLLMREPLYMARK"


@dataclass(frozen=True)
class PromptFrame:
    """What goes before and after a prompt's own segments, and the token that ends a reply.

    Attributes:
        head_text, tail_text: the frame as text (for text-only prompts, e.g. target generation).
        head, tail: the same as token ids (without further special tokens).
        eos_token_id: label after the last target token and generation's stop token.
    """

    head_text: str
    tail_text: str
    head: tuple[int, ...]
    tail: tuple[int, ...]
    eos_token_id: int

    def wrap_text(self, prompt: str) -> str:
        return f"{self.head_text}{prompt}{self.tail_text}"


def check_prompt_format(value: str) -> str:
    if value not in PROMPT_FORMATS:
        raise ValueError(
            f"unknown prompt format {value!r} (config key models.prompt.format: {' | '.join(PROMPT_FORMATS)})"
        )
    return value


def _ids(tokenizer: Any, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False).input_ids) if text else ()


def adds_bos(tokenizer: Any) -> bool:
    """True if the tokenizer starts every text with its BOS by itself (Llama, Gemma, Mistral; not BLOOM,
    Qwen)."""
    bos = tokenizer.bos_token_id
    return bos is not None and list(tokenizer("a").input_ids[:1]) == [bos]


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def prompt_frame(tokenizer: Any, prompt_format: str = "plain", system: str | None = None) -> PromptFrame:
    """The frame of `prompt_format` for this tokenizer (see the module docstring)."""
    if check_prompt_format(prompt_format) == "plain":
        head_text = tokenizer.bos_token if adds_bos(tokenizer) else ""
        return PromptFrame(head_text, "", _ids(tokenizer, head_text), (), int(tokenizer.eos_token_id))
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"models.prompt.format is chat but the tokenizer of {tokenizer.name_or_path} has no chat "
            "template; use format: plain"
        )
    turns = [{"role": "system", "content": system}] if system else []
    user = [*turns, {"role": "user", "content": _USER_MARK}]
    rendered = _render(tokenizer, user, add_generation_prompt=True)
    head_text, tail_text = rendered.split(_USER_MARK)
    full = _render(
        tokenizer, [*user, {"role": "assistant", "content": _REPLY_MARK}], add_generation_prompt=False
    )
    closing = _ids(tokenizer, full.split(_REPLY_MARK, 1)[1].strip())
    eos = closing[0] if closing else int(tokenizer.eos_token_id)
    return PromptFrame(head_text, tail_text, _ids(tokenizer, head_text), _ids(tokenizer, tail_text), int(eos))


FRAME_KEY = "frame"


def frame_record(frame: PromptFrame) -> dict[str, Any]:
    """The frame as written into a model's `speechllm.json` (`prompt.frame` / `chat.frame`)."""
    return {
        "head_text": frame.head_text,
        "tail_text": frame.tail_text,
        "head": list(frame.head),
        "tail": list(frame.tail),
        "eos_token_id": frame.eos_token_id,
    }


def frame_from_record(record: dict[str, Any]) -> PromptFrame:
    return PromptFrame(
        record["head_text"],
        record["tail_text"],
        tuple(record["head"]),
        tuple(record["tail"]),
        int(record["eos_token_id"]),
    )


def frame_from_spec(tokenizer: Any, prompt_cfg: dict[str, Any]) -> PromptFrame:
    """The frame of a spec's / config's `prompt` section: the one recorded when the model was built (a chat
    template may render differently later, e.g. with today's date), else rendered now (specs written before
    `format` existed: plain)."""
    if FRAME_KEY in prompt_cfg:
        return frame_from_record(prompt_cfg[FRAME_KEY])
    return prompt_frame(tokenizer, prompt_cfg.get("format", "plain"), prompt_cfg.get("system"))
