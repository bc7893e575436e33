"""Synthetic multi-instruction targets: the frozen LLM's greedy continuation of prefix + transcript + postfix.

Batched (prompts sorted by length, left padding, KV cache), sharded (one job per shard) and resumable: every
finished item is appended to `<out>.partial.jsonl` under a cache key, so a killed shard redoes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from speechllm.io import atomic_write_text


def cache_key(settings: dict[str, Any], prompt: str) -> str:
    """Keyed on everything that changes the output: LLM id + revision, dtype, bank hash, seed, decoding."""
    blob = json.dumps({"settings": settings, "prompt": prompt}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_partial(path: Path) -> dict[str, dict[str, Any]]:
    """Finished items of an interrupted run; a torn last line (killed mid-write) is ignored."""
    done: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return done
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[item["key"]] = item
    return done


def _length_sorted_batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for i in range(0, len(order), batch_size):
        yield order[i: i + batch_size]


@torch.no_grad()
def generate_batched(model: Any, tokenizer: Any, prompts: list[str], batch_size: int, max_new_tokens: int,
                     num_beams: int, on_batch: Any = None) -> list[str]:
    """Greedy (or beam) continuations, batched by length with left padding. Returns decoded new text."""
    tokenizer.padding_side = "left"
    lengths = [len(tokenizer(p, add_special_tokens=False).input_ids) for p in prompts]
    outputs: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    for idx in tqdm(list(_length_sorted_batches(lengths, batch_size)), desc="generating targets", mininterval=10):
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device),
                             max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             use_cache=True)
        new = gen[:, enc.input_ids.shape[1]:]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        for i, text in zip(idx, texts, strict=True):
            outputs[i] = text
        if on_batch is not None:
            on_batch([(i, outputs[i]) for i in idx])
    return outputs


def generate_shard(items: list[tuple[str, str, str]], shard: int, num_shards: int, model: Any, tokenizer: Any,
                   settings: dict[str, Any], batch_size: int, out: Path) -> dict[str, int]:
    """Generate this shard's items (every `num_shards`-th from `shard`); write `out` (JSONL) atomically."""
    mine = [(i, item) for i, item in enumerate(items) if i % num_shards == shard]
    partial = out.with_name(out.name + ".partial.jsonl")
    done = read_partial(partial)
    keyed = [(i, text, prefix, postfix, cache_key(settings, prefix + text + postfix))
             for i, (text, prefix, postfix) in mine]
    todo = [k for k in keyed if k[4] not in done]
    partial.parent.mkdir(parents=True, exist_ok=True)
    with partial.open("a", encoding="utf-8") as fh:
        def save(results: list[tuple[int, str]]) -> None:
            for j, output in results:
                _, text, prefix, postfix, key = todo[j]
                item = {"key": key, "text": text, "prefix": prefix, "postfix": postfix, "output": output}
                done[key] = item
                fh.write(json.dumps(item, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

        if todo:
            generate_batched(model, tokenizer, [t[2] + t[1] + t[3] for t in todo], batch_size,
                             settings["max_new_tokens"], settings["num_beams"], on_batch=save)
    lines = [json.dumps({"index": i, **{k: done[key][k] for k in ("text", "prefix", "postfix", "output")}},
                        ensure_ascii=False) for i, _t, _p, _q, key in keyed]
    atomic_write_text(out, "".join(line + "\n" for line in lines))
    partial.unlink(missing_ok=True)
    return {"items": len(keyed), "generated": len(todo), "reused": len(keyed) - len(todo)}
