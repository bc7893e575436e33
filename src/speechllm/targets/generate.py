"""Target generation with a frozen LLM: batched, cached on disk, sharded.

Batched with a per-prompt `max_new_tokens`: greedy decoding runs a continuous-batching loop over a KV cache
(finished rows leave, waiting prompts take their slots), beam search runs HF `generate` per length-sorted
batch; a greedy output equals generating that prompt alone. Resumable: every finished item is appended to
`<out>.partial.jsonl` under a cache key that covers everything that changes an output (LLM id + revision,
dtype, quantisation, backend, decoding, and the caller's extras such as the template-bank hash and seed), so
a killed shard redoes nothing and a changed setting reuses nothing. After a stop signal (speechllm.stopping) a
shard finishes its current batch, appends it, and exits for a retry.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache, DynamicLayer

from speechllm import stopping
from speechllm.io import atomic_write_text, drop_torn_tail
from speechllm.models.speech_llm import position_ids_from_mask
from speechllm.targets.settings import GenerateSettings
from speechllm.targets.shards import shard_indices

OnBatch = Callable[[list[tuple[int, str]]], None]


class TextGenerator(Protocol):
    """A generation backend: `HFGenerator` here, `VLLMGenerator` in vllm_backend.py."""

    def prompt_length(self, prompt: str) -> int: ...

    def generate(
        self, prompts: list[str], max_new_tokens: list[int], on_batch: OnBatch | None = None
    ) -> list[str]: ...


def cache_key(settings: dict[str, Any], prompt: str) -> str:
    """sha256 over the generation settings (see `generation_settings`) and the prompt."""
    blob = json.dumps({"settings": settings, "prompt": prompt}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def engine_version(backend: str) -> str | None:
    """The generating library's version (another version may decode differently); read without importing."""
    from speechllm.versions import installed_version

    return installed_version(
        "vllm" if backend == "vllm" else "transformers"
    )  # None: loading the backend reports it


def generation_settings(
    llm_cfg: dict[str, Any], backend: str, num_beams: int, **extra: Any
) -> dict[str, Any]:
    """What a cached output depends on besides its prompt: the LLM (id, revision, dtype, 8-bit), the backend
    and its version, the decoding parameters (greedy unless beams) and the caller's extras (bank hash, seed,
    lengths, ...)."""
    return {
        "llm": llm_cfg["name_or_path"],
        "revision": llm_cfg.get("revision"),
        "dtype": llm_cfg["dtype"],
        "load_in_8bit": bool(llm_cfg.get("load_in_8bit", False)),
        "backend": backend,
        "engine_version": engine_version(backend),
        "num_beams": num_beams,
        "do_sample": False,
        **extra,
    }


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


def length_sorted_batches(
    lengths: list[int], limits: list[int], batch_size: int, same_limit: bool
) -> Iterator[list[int]]:
    """Indices longest prompt first, `batch_size` at a time; with `same_limit` a batch never mixes
    `max_new_tokens` values (beam search cannot be cut per row afterwards, greedy can)."""
    order = sorted(
        range(len(lengths)), key=lambda i: (-limits[i], -lengths[i]) if same_limit else -lengths[i]
    )
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


# Generation-config fields that make HF `generate` alter or stop greedy decoding beyond eos and
# `max_new_tokens`; a model setting any of them away from the default is generated with HF `generate` itself.
GREEDY_ALTERING_FIELDS = (
    "min_length",
    "min_new_tokens",
    "repetition_penalty",
    "encoder_repetition_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "sequence_bias",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "suppress_tokens",
    "begin_suppress_tokens",
    "exponential_decay_length_penalty",
    "guidance_scale",
    "watermarking_config",
    "stop_strings",
    "max_time",
    "remove_invalid_values",
    "constraints",
    "force_words_ids",
    "dola_layers",
    "penalty_alpha",
    "prompt_lookup_num_tokens",
    "token_healing",
    "cache_implementation",
)
# Spare room a KV-cache buffer gets beyond what it holds (as a fraction of that), to append tokens in place.
KV_SPARE_FRACTION = 0.5
# Once nothing is left to bring in, finished rows are dropped (a copy of the cache) when they are at least
# this fraction of the batch; until then they ride along, as a copy costs more than a few rows for a few
# steps.
COMPACT_FRACTION = 0.5
# Leading cache positions that are padding in every row get cut once they are this fraction of the cache
# (a copy of the cache; rows that replaced longer ones leave such padding behind).
PADDING_TRIM_FRACTION = 0.25


def greedy_loop_supported(model: Any) -> bool:
    """Whether `GreedyDecoder` reproduces HF greedy `generate` for `model`: a decoder-only LM whose forward
    takes a 2-D attention mask and a `DynamicCache` of plain (non-sliding) layers, with no logits processors
    set in its generation config."""
    if getattr(model.config, "is_encoder_decoder", False):
        return False
    params = inspect.signature(model.forward).parameters
    if not {"attention_mask", "past_key_values"} <= params.keys():
        return False
    default, config = GenerationConfig(), model.generation_config
    if any(getattr(config, f, None) != getattr(default, f, None) for f in GREEDY_ALTERING_FIELDS):
        return False
    try:
        layers = DynamicCache(config=model.config).layers
    except (TypeError, ValueError, AttributeError):
        return False
    return all(type(layer) is DynamicLayer for layer in layers)


class BufferedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys/values [B, heads, L, head_dim] are views into buffers with spare room along
    L, so appending a token writes in place instead of reallocating (and page-faulting in) the whole layer
    every step; rows can be dropped (`keep`) or overwritten in place (`put`)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key_buffer = self.value_buffer = torch.empty(0)

    def _store(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        """Fresh buffers holding `keys`/`values` [B, heads, n, head_dim] left padded with zeros to `length`
        positions, with room for `KV_SPARE_FRACTION` more."""
        capacity = length + max(1, math.ceil(length * KV_SPARE_FRACTION))
        pad = length - keys.shape[2]
        self.key_buffer = keys.new_empty(keys.shape[0], keys.shape[1], capacity, keys.shape[3])
        self.value_buffer = values.new_empty(values.shape[0], values.shape[1], capacity, values.shape[3])
        self.keys, self.values = self.key_buffer[:, :, :length], self.value_buffer[:, :, :length]
        for buffer, part in ((self.keys, keys), (self.values, values)):  # the room after `length` stays unset
            buffer[:, :, :pad] = 0
            buffer[:, :, pad:] = part

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append `key_states`/`value_states` [B, heads, T, head_dim]; returns all keys and values so far."""
        if not self.is_initialized:
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
            self._store(key_states, value_states, key_states.shape[2])
            return self.keys, self.values
        start = self.keys.shape[2]
        end = start + key_states.shape[2]
        if end > self.key_buffer.shape[2] or self.keys.data_ptr() != self.key_buffer.data_ptr():
            self._store(self.keys, self.values, start)  # full, or keys replaced by a DynamicLayer method
        self.key_buffer[:, :, start:end] = key_states
        self.value_buffer[:, :, start:end] = value_states
        self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def keep(self, rows: torch.Tensor, start: int) -> None:
        """Keep batch rows `rows` [B'] and the positions from `start` on (a negative `start` left pads)."""
        keys, values = self.keys.index_select(0, rows), self.values.index_select(0, rows)
        self._store(keys[:, :, max(start, 0) :], values[:, :, max(start, 0) :], self.keys.shape[2] - start)

    def put(self, row: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Overwrite batch row `row` with `keys`/`values` [heads, n, head_dim], right-aligned after zeros."""
        pad = self.keys.shape[2] - keys.shape[1]
        self.keys[row, :, :pad] = 0
        self.values[row, :, :pad] = 0
        self.keys[row, :, pad:] = keys
        self.values[row, :, pad:] = values


def buffered_cache(model: Any) -> DynamicCache:
    """An empty `DynamicCache` for `model` made of `BufferedLayer`s (see `greedy_loop_supported`)."""
    cache = DynamicCache(config=model.config)
    if cache.layer_class_to_replicate is not None:  # layers created lazily, one per decoder layer
        cache.layer_class_to_replicate = BufferedLayer
    cache.layers = [BufferedLayer() for _ in cache.layers]
    return cache


@dataclass
class Slots:
    """Rows decoded together. `cache` holds keys/values for every token but the pending one, left padded;
    `mask` [B, L] marks its real entries; `pending` [B] is each row's next input token and `position` [B] its
    position id; `rows` are the prompt indices (None: a free slot, its contents stale) and `tokens` the
    continuations so far (pending token included)."""

    cache: DynamicCache
    mask: torch.Tensor
    pending: torch.Tensor
    position: torch.Tensor
    rows: list[int | None]
    tokens: list[list[int]]

    def free(self) -> list[int]:
        return [j for j, i in enumerate(self.rows) if i is None]

    def live(self) -> list[int]:
        return [j for j, i in enumerate(self.rows) if i is not None]

    def keep(self, slots: list[int], start: int) -> None:
        """Keep only `slots`, and the cache positions from `start` on (a negative `start` left pads)."""
        index = torch.tensor(slots, device=self.mask.device)
        for layer in self.cache.layers:
            layer.keep(index, start)
        mask = self.mask.index_select(0, index)
        self.mask = (
            mask[:, start:] if start >= 0 else torch.cat([mask.new_zeros(len(slots), -start), mask], dim=1)
        )
        self.pending, self.position = (
            self.pending.index_select(0, index),
            self.position.index_select(0, index),
        )
        self.rows, self.tokens = [self.rows[j] for j in slots], [self.tokens[j] for j in slots]

    def padding(self) -> int:
        """Leading cache positions that are padding in every slot."""
        return int(self.mask.argmax(dim=1).min())  # argmax finds each row's first real entry

    def put(self, slot: int, other: Slots, row: int) -> None:
        """Move `other`'s row `row` into `slot` (the cache must be at least as long as that row's real
        part)."""
        length = int(other.mask[row].sum())
        for layer, source in zip(self.cache.layers, other.cache.layers, strict=True):
            layer.put(slot, source.keys[row, :, -length:], source.values[row, :, -length:])
        self.mask[slot] = 0
        self.mask[slot, self.mask.shape[1] - length :] = 1
        self.pending[slot], self.position[slot] = other.pending[row], other.position[row]
        self.rows[slot], self.tokens[slot] = other.rows[row], other.tokens[row]
        other.rows[row] = None


class GreedyDecoder:
    """Greedy decoding of token-id prompts with continuous batching. Prompts are prefilled `batch_size` at a
    time into a pool; a row that finishes frees its slot in the running batch and the next pooled row is
    written into that slot's KV cache in place, so a batch never runs on for its longest row. When nothing is
    left to bring in, finished rows are dropped (rows, mask, positions and cache index-selected). Each row
    equals HF greedy `generate` on its prompt alone: masked cache entries get zero attention and position ids
    count real tokens only (as HF derives them from the attention mask; BLOOM builds ALiBi from the mask).
    Memory: the running batch plus one pool, each up to `batch_size` rows."""

    def __init__(self, model: Any, pad_id: int, stop_ids: set[int], batch_size: int) -> None:
        self.model, self.pad_id, self.stop_ids, self.batch_size = model, pad_id, stop_ids, batch_size
        params = inspect.signature(model.forward).parameters
        self.with_positions = "position_ids" in params
        self.extra: dict[str, Any] = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.device = next(model.parameters()).device

    def _next_tokens(
        self, input_ids: torch.Tensor, mask: torch.Tensor, position: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        """Greedy next token [B] after `input_ids` [B, T] with `mask` [B, L + T] over cache and input and
        position ids `position` [B, T]."""
        kwargs = {"position_ids": position} if self.with_positions else {}
        out = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
            **kwargs,
            **self.extra,
        )
        return out.logits[:, -1, :].argmax(dim=-1)

    def _prefill(self, prompts: list[list[int]], rows: list[int]) -> Slots:
        """Slots for `prompts` (token ids, left padded) after their forward pass; `pending` is each first
        token."""
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        position = position_ids_from_mask(mask)
        cache = buffered_cache(self.model)
        first = self._next_tokens(ids, mask, position, cache)
        return Slots(cache, mask, first, position[:, -1], list(rows), [[t] for t in first.tolist()])

    def _step(self, slots: Slots) -> None:
        """Feed every slot its pending token; the greedy next token becomes pending."""
        slots.mask = torch.cat([slots.mask, slots.mask.new_ones(len(slots.rows), 1)], dim=1)
        slots.position = slots.position + 1
        slots.pending = self._next_tokens(
            slots.pending[:, None], slots.mask, slots.position[:, None], slots.cache
        )
        for tokens, token in zip(slots.tokens, slots.pending.tolist(), strict=True):
            tokens.append(token)

    def _finish(self, slots: Slots, limits: list[int]) -> list[tuple[int, list[int]]]:
        """Rows of `slots` that just finished (eos or their limit), as (prompt index, ids); their slots are
        freed."""
        done = []
        for j in slots.live():
            i, tokens = slots.rows[j], slots.tokens[j]
            assert i is not None
            if tokens[-1] in self.stop_ids or len(tokens) >= limits[i]:
                done.append((i, row_tokens(tokens, limits[i], self.stop_ids)))
                slots.rows[j] = None
        return done

    def _fill(self, slots: Slots, pool: Slots) -> None:
        """Move pooled rows into free slots, first widening the cache if a row is longer than it."""
        moves = list(zip(slots.free(), pool.live(), strict=False))
        longest = max((int(pool.mask[row].sum()) for _, row in moves), default=0)
        if longest > slots.mask.shape[1]:
            slots.keep(list(range(len(slots.rows))), slots.mask.shape[1] - longest)
        for slot, row in moves:
            slots.put(slot, pool, row)

    def rows(self, prompts: list[list[int]], limits: list[int]) -> Iterator[tuple[int, list[int]]]:
        """(prompt index, continuation ids cut as `row_tokens` cuts) for every prompt, in finishing order;
        prompts are prefilled in the given order."""
        start = 0  # prompts[start:] are still to be prefilled
        running: Slots | None = None
        pool: Slots | None = None  # prefilled rows waiting for a free slot
        while True:
            while (running is None or running.free()) and (start < len(prompts) or pool is not None):
                if pool is None:
                    take = list(range(start, min(start + self.batch_size, len(prompts))))
                    pool, start = self._prefill([prompts[i] for i in take], take), take[-1] + 1
                    yield from self._finish(pool, limits)
                if running is None:
                    running, pool = pool, None
                else:
                    self._fill(running, pool)
                    pool = pool if pool.live() else None
            if running is None or not running.live():
                return
            if len(running.free()) >= COMPACT_FRACTION * len(running.rows):  # nothing left to bring in
                running.keep(running.live(), 0)
            if (padding := running.padding()) >= PADDING_TRIM_FRACTION * running.mask.shape[1]:
                running.keep(list(range(len(running.rows))), padding)
            self._step(running)
            yield from self._finish(running, limits)


def _hf_generate_rows(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    limits: list[int],
    lengths: list[int],
    batch_size: int,
    num_beams: int,
    stop_ids: set[int],
    add_special_tokens: bool,
) -> Iterator[list[tuple[int, list[int]]]]:
    """HF `generate` per length-sorted batch (beam search, or models the greedy loop does not cover): a batch
    runs to its largest limit and each row is cut to its own. Yields [(prompt index, ids)] per batch."""
    device = next(model.parameters()).device
    for idx in length_sorted_batches(lengths, limits, batch_size, same_limit=num_beams > 1):
        enc = tokenizer(
            [prompts[i] for i in idx],
            return_tensors="pt",
            padding=True,
            add_special_tokens=add_special_tokens,
        )
        gen = model.generate(
            input_ids=enc.input_ids.to(device),
            attention_mask=enc.attention_mask.to(device),
            max_new_tokens=max(limits[i] for i in idx),
            num_beams=num_beams,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=list(stop_ids) or None,
            use_cache=True,
        )
        new = gen[:, enc.input_ids.shape[1] :].tolist()
        yield [(i, row_tokens(ids, limits[i], stop_ids)) for i, ids in zip(idx, new, strict=True)]


def _greedy_rows(
    model: Any, tokenizer: Any, ids: list[list[int]], limits: list[int], batch_size: int, stop_ids: set[int]
) -> Iterator[list[tuple[int, list[int]]]]:
    """`GreedyDecoder` over the prompts longest first; yields [(prompt index, ids)] per `batch_size` finished
    prompts (and the rest at the end). A zero limit yields an empty continuation without decoding."""
    order = sorted((i for i in range(len(ids)) if limits[i] > 0), key=lambda i: -len(ids[i]))
    group = [(i, []) for i in range(len(ids)) if limits[i] <= 0]
    decoder = GreedyDecoder(model, tokenizer.pad_token_id, stop_ids, batch_size)
    for j, tokens in decoder.rows([ids[i] for i in order], [limits[i] for i in order]):
        group.append((order[j], tokens))
        if len(group) >= batch_size:
            yield group
            group = []
    if group:
        yield group


@torch.inference_mode()
def generate_batched(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    batch_size: int,
    max_new_tokens: int | list[int],
    num_beams: int,
    on_batch: OnBatch | None = None,
    add_special_tokens: bool = False,
    clean_up_spaces: bool = False,
) -> list[str]:
    """Continuations of `prompts` (new text only, no special tokens), up to `batch_size` rows at a time with
    left padding and a KV cache; each equals HF `generate` on that prompt alone.

    `max_new_tokens` is one limit for all prompts or one per prompt. Greedy decoding runs `GreedyDecoder`
    (finished rows leave the batch, waiting prompts take their slots); beam search, and models it does not
    cover, run HF `generate` per length-sorted batch. `clean_up_spaces` applies the tokenizer's " ." -> "."
    clean-up (the transformers < 4.45 decoding default). `on_batch` receives [(prompt index, text)] after
    every batch (greedy: every `batch_size` finished prompts)."""
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(limits) != len(prompts):
        raise ValueError(f"{len(limits)} max_new_tokens values for {len(prompts)} prompts")
    if tokenizer.pad_token is None:  # LLaMA-style tokenizers: pad with eos, as the reference pipelines
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    ids = tokenizer(prompts, add_special_tokens=add_special_tokens).input_ids if prompts else []
    stop_ids = _stop_ids(model, tokenizer)
    if num_beams == 1 and greedy_loop_supported(model):
        groups = _greedy_rows(model, tokenizer, ids, limits, batch_size, stop_ids)
    else:
        groups = _hf_generate_rows(
            model,
            tokenizer,
            prompts,
            limits,
            [len(x) for x in ids],
            batch_size,
            num_beams,
            stop_ids,
            add_special_tokens,
        )
    outputs: list[str] = [""] * len(prompts)
    with tqdm(total=len(prompts), desc="generating", mininterval=10) as progress:
        for group in groups:
            texts = tokenizer.batch_decode(
                [t for _, t in group], skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
            if (
                clean_up_spaces
            ):  # done here: recent transformers skip it for BPE tokenizers, older ones did not
                texts = [tokenizer.clean_up_tokenization(t) for t in texts]
            for (i, _), text in zip(group, texts, strict=True):
                outputs[i] = text
            if on_batch is not None:
                on_batch([(i, outputs[i]) for i, _ in group])
            progress.update(len(group))
    return outputs


class HFGenerator:
    """The transformers backend: `generate_batched` over a loaded causal LM."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        batch_size: int,
        num_beams: int = 1,
        add_special_tokens: bool = False,
        clean_up_spaces: bool = False,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.num_beams = batch_size, num_beams
        self.add_special_tokens, self.clean_up_spaces = add_special_tokens, clean_up_spaces

    def prompt_length(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, add_special_tokens=self.add_special_tokens).input_ids)

    def generate(
        self, prompts: list[str], max_new_tokens: list[int], on_batch: OnBatch | None = None
    ) -> list[str]:
        return generate_batched(
            self.model,
            self.tokenizer,
            prompts,
            self.batch_size,
            max_new_tokens,
            self.num_beams,
            on_batch,
            self.add_special_tokens,
            self.clean_up_spaces,
        )


def cached_generate(
    prompts: list[str],
    max_new_tokens: list[int],
    generator: TextGenerator,
    settings: dict[str, Any],
    partial: Path,
) -> tuple[list[str], int]:
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
    drop_torn_tail(partial)
    with partial.open("a", encoding="utf-8") as fh:

        def save(results: list[tuple[int, str]]) -> None:
            for j, output in results:
                item = {"key": keys[todo[j]], "output": output}
                done[item["key"]] = item
                fh.write(json.dumps(item, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
            stopping.check(f"{len(done)} finished items in {partial}")  # a stop signal: exit for a retry

        if todo:
            generator.generate([prompts[i] for i in todo], [max_new_tokens[i] for i in todo], on_batch=save)
    return [done[key]["output"] for key in keys], len(todo)


def write_jsonl(out: Path, rows: list[dict[str, Any]]) -> None:
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def generate_shard(
    items: list[tuple[str, str, str]],
    shard: int,
    num_shards: int,
    generator: TextGenerator,
    settings: dict[str, Any],
    out: Path,
    frame: tuple[str, str] = ("", ""),
) -> dict[str, int]:
    """Generate this shard's (text, prefix, postfix) items with `settings["max_new_tokens"]`; write `out`
    (JSONL: index, text, prefix, postfix, output) atomically and drop the partial file. `frame` is the prompt
    format's (head, tail) text around each prompt (models.prompt.format; empty for BLOOMZ)."""
    mine = shard_indices(len(items), shard, num_shards)
    head, tail = frame
    prompts = [head + items[i][1] + items[i][0] + items[i][2] + tail for i in mine]
    partial = partial_path(out)
    outputs, generated = cached_generate(
        prompts, [settings["max_new_tokens"]] * len(prompts), generator, settings, partial
    )
    write_jsonl(
        out,
        [
            {"index": i, "text": items[i][0], "prefix": items[i][1], "postfix": items[i][2], "output": output}
            for i, output in zip(mine, outputs, strict=True)
        ],
    )
    partial.unlink(missing_ok=True)
    return {"items": len(mine), "generated": generated, "reused": len(mine) - generated}


def target_settings(s: GenerateSettings, bank: str) -> dict[str, Any]:
    """The cache-key settings of `speechllm targets generate` from its `--settings` (the rule's config
    slice) and the template bank's hash."""
    return generation_settings(
        s.llm,
        s.backend,
        s.num_beams,
        kind="targets",
        bank=bank,
        seed=s.seed,
        max_new_tokens=s.max_new_tokens,
        clean_up_spaces=s.clean_up_spaces,
    )
