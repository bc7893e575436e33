"""Target generation with a frozen LLM: batched, cached on disk, sharded.

Batched (prompts sorted by length, left padding, KV cache) with a per-prompt `max_new_tokens`; resumable:
every finished item is appended to `<out>.partial.jsonl` under a cache key that covers everything that
changes an output (LLM id + revision, dtype, quantisation, backend, decoding, and the caller's extras such
as the template-bank hash and seed), so a killed shard redoes nothing and a changed setting reuses nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from speechllm.io import atomic_write_text

OnBatch = Callable[[list[tuple[int, str]]], None]


class TextGenerator(Protocol):
    """A generation backend: `HFGenerator` here, `VLLMGenerator` in vllm_backend.py."""

    def prompt_length(self, prompt: str) -> int: ...

    def generate(self, prompts: list[str], max_new_tokens: list[int],
                 on_batch: OnBatch | None = None) -> list[str]: ...


def cache_key(settings: dict[str, Any], prompt: str) -> str:
    """sha256 over the generation settings (see `generation_settings`) and the prompt."""
    blob = json.dumps({"settings": settings, "prompt": prompt}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def engine_version(backend: str) -> str | None:
    """The generating library's version (another version may decode differently); read without importing."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vllm" if backend == "vllm" else "transformers")
    except PackageNotFoundError:
        return None  # vllm absent: loading the backend reports it


def generation_settings(llm_cfg: dict[str, Any], backend: str, num_beams: int,
                        **extra: Any) -> dict[str, Any]:
    """What a cached output depends on besides its prompt: the LLM (id, revision, dtype, 8-bit), the backend
    and its version, the decoding parameters (greedy unless beams) and the caller's extras (bank hash, seed,
    lengths, ...)."""
    return {"llm": llm_cfg["name_or_path"], "revision": llm_cfg.get("revision"), "dtype": llm_cfg["dtype"],
            "load_in_8bit": bool(llm_cfg.get("load_in_8bit", False)), "backend": backend,
            "engine_version": engine_version(backend), "num_beams": num_beams, "do_sample": False, **extra}


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
            if isinstance(item, dict) and "key" in item and "output" in item:
                done[item["key"]] = item
    return done


def partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial.jsonl")


def length_sorted_batches(lengths: list[int], limits: list[int], batch_size: int,
                          same_limit: bool) -> Iterator[list[int]]:
    """Indices longest prompt first, `batch_size` at a time; with `same_limit` a batch never mixes
    `max_new_tokens` values (beam search cannot be cut per row afterwards, greedy can)."""
    order = sorted(range(len(lengths)),
                   key=lambda i: (-limits[i], -lengths[i]) if same_limit else -lengths[i])
    batch: list[int] = []
    for i in order:
        if batch and (len(batch) == batch_size or (same_limit and limits[i] != limits[batch[0]])):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def row_tokens(new_ids: list[int], limit: int, stop_ids: set[int]) -> list[int]:
    """A row's continuation cut at its own `max_new_tokens` and before its first end-of-sequence token.
    Greedy decoding is causal, so this equals generating that row alone with `limit`."""
    out = []
    for token in new_ids[:limit]:
        if token in stop_ids:
            break
        out.append(token)
    return out


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())


@torch.no_grad()
def generate_batched(model: Any, tokenizer: Any, prompts: list[str], batch_size: int,
                     max_new_tokens: int | list[int], num_beams: int, on_batch: OnBatch | None = None,
                     add_special_tokens: bool = False, clean_up_spaces: bool = False) -> list[str]:
    """Continuations of `prompts` (new text only, no special tokens), batched by length with left padding.

    `max_new_tokens` is one limit for all prompts or one per prompt; a batch runs to its largest limit and
    each row is cut to its own. `clean_up_spaces` applies the tokenizer's " ." -> "." clean-up (the
    transformers < 4.45 decoding default). `on_batch` receives [(prompt index, text)] after every batch."""
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts):
        raise ValueError(f"{len(limits)} max_new_tokens values for {len(prompts)} prompts")
    if tokenizer.pad_token is None:  # LLaMA-style tokenizers: pad with eos, as the reference pipelines
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    lengths = [len(tokenizer(p, add_special_tokens=add_special_tokens).input_ids) for p in prompts]
    stop_ids = _stop_ids(model, tokenizer)
    outputs: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    batches = list(length_sorted_batches(lengths, limits, batch_size, same_limit=num_beams > 1))
    for idx in tqdm(batches, desc="generating", mininterval=10):
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                        add_special_tokens=add_special_tokens)
        gen = model.generate(input_ids=enc.input_ids.to(device), attention_mask=enc.attention_mask.to(device),
                             max_new_tokens=max(limits[i] for i in idx), num_beams=num_beams, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=list(stop_ids) or None,
                             use_cache=True)
        new = gen[:, enc.input_ids.shape[1]:].tolist()
        rows = [row_tokens(ids, limits[i], stop_ids) for i, ids in zip(idx, new, strict=True)]
        texts = tokenizer.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if clean_up_spaces:  # done here: recent transformers skip it for BPE tokenizers, older ones did not
            texts = [tokenizer.clean_up_tokenization(t) for t in texts]
        for i, text in zip(idx, texts, strict=True):
            outputs[i] = text
        if on_batch is not None:
            on_batch([(i, outputs[i]) for i in idx])
    return outputs


class HFGenerator:
    """The transformers backend: `generate_batched` over a loaded causal LM."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int, num_beams: int = 1,
                 add_special_tokens: bool = False, clean_up_spaces: bool = False) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.num_beams = batch_size, num_beams
        self.add_special_tokens, self.clean_up_spaces = add_special_tokens, clean_up_spaces

    def prompt_length(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, add_special_tokens=self.add_special_tokens).input_ids)

    def generate(self, prompts: list[str], max_new_tokens: list[int],
                 on_batch: OnBatch | None = None) -> list[str]:
        return generate_batched(self.model, self.tokenizer, prompts, self.batch_size, max_new_tokens,
                                self.num_beams, on_batch, self.add_special_tokens, self.clean_up_spaces)


def cached_generate(prompts: list[str], max_new_tokens: list[int], generator: TextGenerator,
                    settings: dict[str, Any], partial: Path) -> tuple[list[str], int]:
    """Outputs for `prompts`, reusing those already in `partial` and appending each new batch to it (fsynced),
    so an interrupted run resumes where it stopped. Returns (outputs, number of prompts generated now)."""
    done = read_partial(partial)
    keys = [cache_key(settings, p) for p in prompts]
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        if key not in done:
            first.setdefault(key, i)  # the same prompt twice is generated once
    todo = list(first.values())
    partial.parent.mkdir(parents=True, exist_ok=True)
    with partial.open("a", encoding="utf-8") as fh:
        def save(results: list[tuple[int, str]]) -> None:
            for j, output in results:
                item = {"key": keys[todo[j]], "output": output}
                done[item["key"]] = item
                fh.write(json.dumps(item, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

        if todo:
            generator.generate([prompts[i] for i in todo], [max_new_tokens[i] for i in todo], on_batch=save)
    return [done[key]["output"] for key in keys], len(todo)


def shard_indices(n: int, shard: int, num_shards: int) -> list[int]:
    """Every `num_shards`-th item from `shard`: shards partition the items and balance lengths."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is outside 0..{num_shards - 1}")
    return list(range(shard, n, num_shards))


def write_jsonl(out: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def generate_shard(items: list[tuple[str, str, str]], shard: int, num_shards: int, generator: TextGenerator,
                   settings: dict[str, Any], out: Path) -> dict[str, int]:
    """Generate this shard's (text, prefix, postfix) items with `settings["max_new_tokens"]`; write `out`
    (JSONL: index, text, prefix, postfix, output) atomically and drop the partial file."""
    mine = shard_indices(len(items), shard, num_shards)
    prompts = [items[i][1] + items[i][0] + items[i][2] for i in mine]
    partial = partial_path(out)
    outputs, generated = cached_generate(prompts, [settings["max_new_tokens"]] * len(prompts), generator,
                                         settings, partial)
    write_jsonl(out, [{"index": i, "text": items[i][0], "prefix": items[i][1], "postfix": items[i][2],
                       "output": output} for i, output in zip(mine, outputs, strict=True)])
    partial.unlink(missing_ok=True)
    return {"items": len(mine), "generated": generated, "reused": len(mine) - generated}


def target_settings(s: dict[str, Any], bank: str) -> dict[str, Any]:
    """The cache-key settings of `speechllm targets generate` from its `--settings` (the rule's config
    slice) and the template bank's hash."""
    return generation_settings(s["llm"], s["backend"], s["num_beams"], kind="targets", bank=bank,
                               seed=s["seed"], max_new_tokens=s["max_new_tokens"],
                               clean_up_spaces=s["clean_up_spaces"])
