"""T / MI / TMI training manifests from the training utterances and the generated (or imported) targets.

T   = every utterance with the default prompt and its normalised transcript (the reference's train_t_sp).
TMI = every utterance three times: `-1` the transcription item (raw transcript, "Repeat the sentence: "),
      `-2`, `-3` two synthetic items (fewer where dropped outputs leave a transcript too few; none is reused).
MI  = `mi_reading: synthetic_only` (our default): `-1`, `-2` two synthetic items;
      `mi_reading: reference_pop`: TMI's `-1`, `-2`, i.e. one transcription + one synthetic item, which is
      what the reference's prepare_data.py produces through its pop() order (spec §4.3).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from speechllm.data.manifest import location, read_manifest, whole_number
from speechllm.settings import config_choice

MI_READINGS = ("synthetic_only", "reference_pop")
GENERATED_FIELDS = ("index", "text", "prefix", "postfix", "output")


def read_generated(paths: list[Path]) -> list[dict[str, Any]]:
    """The items of finished generation shards (JSON Lines); a line that is not an item is an error naming
    file and line. The shards must hold every item index 0..n-1 once: a shard given twice, a stale shard of
    a run with more shards (`--shards shard*.jsonl`) or a missing one would change the pools silently."""
    items = [item for path in paths for item in read_manifest(path, required=GENERATED_FIELDS)]
    first: dict[int, str] = {}
    for item in items:
        index, where = whole_number(item, "index", 0), location(item)
        if index in first:
            raise ValueError(
                f"{where}: item index {index} also at {first[index]} (a shard given twice or stale?)"
            )
        first[index] = where
    missing = sorted(set(range(max(first, default=-1) + 1)) - set(first))
    if missing:
        raise ValueError(
            f"shards {', '.join(map(str, paths))} miss item indices, e.g. {missing[:5]} (a shard left out?)"
        )
    return items


def check_drawn_for(train: list[dict[str, Any]], generated: list[dict[str, Any]], per_utterance: int) -> None:
    """The shards' items are the ones `targets generate` draws for this manifest: `per_utterance` per
    utterance of each transcript (templates.draw_items), none for another text. Shards of an earlier manifest
    or another targets.templates_per_occurrence would otherwise leave utterances silently without items."""
    drawn = Counter(item["text"] for item in generated)
    sharing = Counter(rec["raw_transcription"] for rec in train)
    for rec in train:
        text = rec["raw_transcription"]
        if drawn[text] != per_utterance * sharing[text]:
            raise ValueError(
                f"{location(rec)}: the shards hold {drawn[text]} items for its transcript {text!r}, but "
                f"targets.templates_per_occurrence {per_utterance} x {sharing[text]} utterance(s) draws "
                f"{per_utterance * sharing[text]} (shards of another manifest or setting?)"
            )
    manifest = train[0].get("_manifest", "the training manifest") if train else "the training manifest"
    for item in generated:
        if item["text"] not in sharing:
            raise ValueError(
                f"{location(item)}: transcript {item['text']!r} is not in {manifest} (shards of another "
                "manifest?)"
            )


def usable_output(output: str, drop_blank: bool) -> bool:
    """Whether a continuation can be a target. The reference keeps every output that tokenises to at least
    one id, i.e. any non-empty string (DigitalPhonetics/bloomzmms@77dc192:data/synthetic-targets/
    prepare_data.py); `drop_blank` (config targets.drop_blank_outputs) also drops whitespace-only ones."""
    return bool(output.strip()) if drop_blank else bool(output)


def synthetic_pools(generated: list[dict[str, Any]], drop_blank: bool) -> dict[str, list[dict[str, Any]]]:
    """Usable items per transcript, in generation order. As the reference: a usable output and a non-empty
    prefix or postfix (which drops an empty template)."""
    pools: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for item in sorted(generated, key=lambda x: x["index"]):
        if usable_output(item["output"], drop_blank) and (item["prefix"] or item["postfix"]):
            pools[item["text"]].append(item)
    return pools


def base_record(rec: dict[str, Any]) -> dict[str, Any]:
    """An utterance record without CE prompt/target fields (they are set per training item)."""
    return {k: v for k, v in rec.items() if k not in ("prefix", "postfix", "target")}


def t_records(train: list[dict[str, Any]], prefix: str, postfix: str) -> list[dict[str, Any]]:
    """T: every utterance with the default prompt and its normalised transcript."""
    return [
        {**base_record(rec), "prefix": prefix, "postfix": postfix, "target": rec["transcription"]}
        for rec in train
    ]


def assemble(
    train: list[dict[str, Any]],
    generated: list[dict[str, Any]],
    prefix: str,
    postfix: str,
    mi_reading: str,
    per_utterance: int,
    drop_blank: bool,
) -> dict[str, list[dict[str, Any]]]:
    """Returns {"t": [...], "mi": [...], "tmi": [...]} manifest records. A synthetic target is the LLM's
    continuation as generated: BLOOMZ's continuations mostly begin with a space, which the reference keeps
    (it tokenises the output string itself), so the first target token is a `Ġ...` piece."""
    config_choice(mi_reading, MI_READINGS, "targets.mi_reading")
    pools = synthetic_pools(generated, drop_blank)
    sharing = Counter(rec["raw_transcription"] for rec in train)  # utterances per transcript
    seen: dict[str, int] = defaultdict(int)
    t_set, mi_set, tmi_set = t_records(train, prefix, postfix), [], []
    for rec in train:
        base = base_record(rec)
        transcription = {**base, "prefix": prefix, "postfix": postfix, "target": rec["raw_transcription"]}
        text = rec["raw_transcription"]
        pool = pools.get(text, [])
        position = seen[text]  # this utterance's place among those sharing its transcript
        seen[text] += 1
        # Items are handed out in passes over the utterances of a text, one each per pass, and never twice:
        # when dropped outputs leave the pool short, the last utterances of the last pass get fewer items
        # (DigitalPhonetics/bloomzmms@77dc192:data/synthetic-targets/prepare_data.py pops each item once).
        synthetic = [
            {**base, "prefix": item["prefix"], "postfix": item["postfix"], "target": item["output"]}
            for item in (
                pool[p * sharing[text] + position]
                for p in range(per_utterance)
                if p * sharing[text] + position < len(pool)
            )
        ]
        tmi_items = [transcription, *synthetic]
        for k, item in enumerate(tmi_items, start=1):
            tmi_set.append({**item, "id": f"{rec['id']}-{k}"})
        mi_items = synthetic if mi_reading == "synthetic_only" else tmi_items[:per_utterance]
        for k, item in enumerate(mi_items, start=1):
            mi_set.append({**item, "id": f"{rec['id']}-{k}"})
    return {"t": t_set, "mi": mi_set, "tmi": tmi_set}
