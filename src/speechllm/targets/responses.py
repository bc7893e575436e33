"""Kang & Roy response targets: the frozen chat LLM's greedy answer to the lower-cased transcript.

Prompt = the config template with `{text}` replaced by the (lower-cased) transcript, tokenised with the
tokenizer's own special tokens (MiniChat's adds `<s>`), so `[|User|] {text}</s>[|Assistant|]` becomes the
reference's `<s>[|User|] ...</s>[|Assistant|]`. Each sample may add `length_factor` × its own prompt length
in new tokens (the paper's rule; the reference's batched script used the batch's longest prompt instead).
The response is decoded without special tokens, so no eos is stored. Cached and resumable as generate.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from speechllm.data.manifest import read_manifest
from speechllm.targets.generate import (
    TextGenerator,
    cached_generate,
    generation_settings,
    partial_path,
    write_jsonl,
)
from speechllm.targets.settings import ResponsesSettings
from speechllm.targets.shards import shard_indices

RESPONSE_FIELD = "llm_response"  # the reference's dataset column
# targets.responses.prompt_template value that puts the text in the tokenizer's own chat turn
# (prompt_format.py).
CHAT_TEMPLATE = "chat"


def response_prompt(text: str, template: str, lowercase: bool) -> str:
    if "{text}" not in template:
        raise ValueError(f"targets.responses.prompt_template has no {{text}} slot: {template!r}")
    return template.replace("{text}", text.lower() if lowercase else text)


def generate_responses_shard(
    manifest: Path,
    shard: int,
    num_shards: int,
    generator: TextGenerator,
    settings: dict[str, Any],
    text_field: str,
    template: str,
    lowercase: bool,
    length_factor: int,
    out: Path,
) -> dict[str, int]:
    """This shard's manifest records with `llm_response` added (JSONL with `index`), written atomically."""
    records = read_manifest(manifest, required=(text_field,))
    mine = shard_indices(len(records), shard, num_shards)
    for i in mine:
        if not isinstance(records[i][text_field], str):
            raise ValueError(
                f"{manifest}:{records[i]['_line']}: field {text_field!r} is not a string "
                "(config key targets.responses.text_field)"
            )
    prompts = [response_prompt(records[i][text_field], template, lowercase) for i in mine]
    limits = [length_factor * generator.prompt_length(p) for p in prompts]
    partial = partial_path(out)
    outputs, generated = cached_generate(prompts, limits, generator, settings, partial)
    rows = []
    for i, output in zip(mine, outputs, strict=True):
        record = {k: v for k, v in records[i].items() if not k.startswith("_")}
        rows.append({"index": i, **record, RESPONSE_FIELD: output})
    write_jsonl(out, rows)
    partial.unlink(missing_ok=True)
    return {
        "items": len(mine),
        "generated": generated,
        "reused": len(mine) - generated,
        "max_new_tokens": max(limits, default=0),
    }


def response_settings(s: ResponsesSettings) -> dict[str, Any]:
    """The cache-key settings of `speechllm targets responses` from its `--settings`. The template and
    lower-casing are part of each prompt, which the key also covers."""
    r = s.responses
    return generation_settings(
        s.llm,
        s.backend,
        r.num_beams,
        kind="responses",
        seed=s.seed,
        length_factor=r.length_factor,
        add_special_tokens=r.add_special_tokens,
        clean_up_spaces=r.clean_up_spaces,
    )
