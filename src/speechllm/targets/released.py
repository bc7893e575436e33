"""Import of the reference's released targets (zenodo 10900287 `tmi_training_targets.tar.gz`).

The tar holds Kaldi-style `text`, `decoder_prefix` and `decoder_postfix` files: `<utt>-<k> id id ...` with
BLOOM token ids (prefix/postfix lines may hold no ids). The ids are decoded with the LLM tokenizer into the
prefix/postfix/target strings our manifests carry (the training collator re-tokenises them); the import
report counts the items whose re-tokenisation differs from the released ids. Items join the training
manifest on `<utt>`.

TMI keeps the tar's suffixes 1..per_utterance+1 as released (the reference). MI: `reference_pop` keeps
suffixes 1..per_utterance (the reference README); `synthetic_only` keeps an utterance's first
per_utterance items whose prefix is not the transcription prompt, renumbered from 1.
"""

from __future__ import annotations

import logging
import tarfile
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath
from typing import Any

from speechllm.settings import config_choice
from speechllm.targets.assemble import MI_READINGS, base_record, t_records

log = logging.getLogger("speechllm")
# tar member -> manifest field
RELEASED_FILES = {"text": "target", "decoder_prefix": "prefix", "decoder_postfix": "postfix"}
ON_UNMATCHED = ("error", "skip")


class ReleasedTargetsError(ValueError):
    """A malformed released-targets archive, or one that does not fit the training manifest."""


def parse_kaldi_ids(lines: list[str], name: str) -> dict[str, list[int]]:
    """`<utt> id id ...` lines -> {utt: ids}; `name` (archive:member) is used in errors."""
    out: dict[str, list[int]] = {}
    for lineno, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts:
            raise ReleasedTargetsError(f"{name}:{lineno}: blank line (expected '<utt> <token ids>')")
        utt, *ids = parts
        try:
            out_ids = [int(x) for x in ids]
        except ValueError as err:
            raise ReleasedTargetsError(f"{name}:{lineno}: token ids must be integers ({err})") from err
        if utt in out:
            raise ReleasedTargetsError(f"{name}:{lineno}: utterance {utt} appears twice")
        out[utt] = out_ids
    return out


def _member_texts(tar: tarfile.TarFile, path: Path) -> dict[str, tuple[str, str]]:
    """{file name: (member name, text)} of the three target files, found by file name anywhere in the tar."""
    members: dict[str, tarfile.TarInfo] = {}
    for member in tar.getmembers():
        base = PurePosixPath(member.name).name
        if member.isfile() and base in RELEASED_FILES:
            if base in members:
                raise ReleasedTargetsError(
                    f"{path}: two members named {base}: {members[base].name}, {member.name}"
                )
            members[base] = member
    missing = sorted(set(RELEASED_FILES) - set(members))
    if missing:
        raise ReleasedTargetsError(f"{path}: no member named {', '.join(missing)}")
    texts = {}
    for base, member in members.items():
        try:
            texts[base] = (member.name, tar.extractfile(member).read().decode("utf-8"))  # type: ignore[union-attr]
        except UnicodeDecodeError as err:
            raise ReleasedTargetsError(f"{path}:{member.name}: not UTF-8 text") from err
    return texts


def read_released_archive(path: Path) -> dict[str, dict[str, list[int]]]:
    """{field (target/prefix/postfix): {`<utt>-<k>`: token ids}} from the tar."""
    try:
        with tarfile.open(path, "r:*") as tar:
            texts = _member_texts(tar, path)
    except (OSError, tarfile.TarError) as err:
        raise ReleasedTargetsError(f"{path}: not a readable tar archive ({err})") from err
    fields = {
        RELEASED_FILES[base]: parse_kaldi_ids(text.splitlines(), f"{path}:{name}")
        for base, (name, text) in texts.items()
    }
    utts = set(fields["target"])
    for field, table in fields.items():
        if set(table) != utts:
            odd = sorted(set(table) ^ utts)
            raise ReleasedTargetsError(
                f"{path}: {field} and text list different utterances ({len(odd)}, e.g. {odd[:3]})"
            )
    return fields


def split_item_id(item_id: str) -> tuple[str, int]:
    """`<utt>-<k>` -> (utt, k)."""
    utt, _, k = item_id.rpartition("-")
    if not utt or not k.isdigit() or int(k) < 1:
        raise ReleasedTargetsError(f"released item id {item_id!r} is not <utterance>-<k> with k >= 1")
    return utt, int(k)


def decode_fields(
    fields: dict[str, dict[str, list[int]]], tokenizer: Any
) -> tuple[dict[str, dict[str, str]], dict[str, int]]:
    """Strings per field and item, and per field how many items re-tokenise to other ids than released."""
    strings: dict[str, dict[str, str]] = {}
    mismatches: dict[str, int] = {}
    for field, table in fields.items():
        keys = list(table)
        texts = tokenizer.batch_decode(
            [table[k] for k in keys], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        again = tokenizer(texts, add_special_tokens=False).input_ids if texts else []
        mismatches[field] = sum(a != table[k] for k, a in zip(keys, again, strict=True))
        strings[field] = dict(zip(keys, texts, strict=True))
    return strings, mismatches


def suffix_report(
    fields: dict[str, dict[str, list[int]]], transcription_ids: list[int]
) -> dict[int, dict[str, int]]:
    """Per suffix k: items, and how many decoder_prefix lines are the transcription prompt's ids
    (the MI ambiguity check of spec §4.3)."""
    report: dict[int, dict[str, int]] = defaultdict(lambda: {"items": 0, "transcription_prefix": 0})
    for item_id, ids in fields["prefix"].items():
        _, k = split_item_id(item_id)
        report[k]["items"] += 1
        report[k]["transcription_prefix"] += ids == transcription_ids
    return dict(sorted(report.items()))


def import_released(
    train: list[dict[str, Any]],
    fields: dict[str, dict[str, list[int]]],
    tokenizer: Any,
    prefix: str,
    postfix: str,
    mi_reading: str,
    per_utterance: int,
    on_unmatched: str,
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """T / MI / TMI manifest records from the released ids, and the import report."""
    config_choice(mi_reading, MI_READINGS, "targets.mi_reading")
    config_choice(on_unmatched, ON_UNMATCHED, "targets.released.on_unmatched")
    transcription_ids = tokenizer(prefix, add_special_tokens=False).input_ids
    strings, mismatches = decode_fields(fields, tokenizer)
    items: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for item_id in fields["target"]:
        utt, k = split_item_id(item_id)
        items[utt].append((k, item_id))
    train_ids = Counter(rec["id"] for rec in train)
    unmatched = sorted(u for u in items if u not in train_ids)
    if unmatched and on_unmatched == "error":
        raise ReleasedTargetsError(
            f"{len(unmatched)} of {len(items)} released utterances are not in the training manifest "
            f"(e.g. {unmatched[:3]}); check the utterance ids or set targets.released.on_unmatched: skip"
        )
    sets: dict[str, list[dict[str, Any]]] = {"t": t_records(train, prefix, postfix), "mi": [], "tmi": []}
    without = 0
    for rec in train:
        mine = sorted(items.get(rec["id"], []))
        without += not mine
        base = base_record(rec)

        def item(k: int, item_id: str, base: dict[str, Any] = base, utt: str = rec["id"]) -> dict[str, Any]:
            return {**base, "id": f"{utt}-{k}", **{f: strings[f][item_id] for f in RELEASED_FILES.values()}}

        sets["tmi"] += [item(k, i) for k, i in mine if k <= per_utterance + 1]
        if mi_reading == "reference_pop":
            sets["mi"] += [item(k, i) for k, i in mine if k <= per_utterance]
        else:
            synthetic = [i for _, i in mine if fields["prefix"][i] != transcription_ids][:per_utterance]
            sets["mi"] += [item(k, i) for k, i in enumerate(synthetic, start=1)]
    report = {
        "items": len(fields["target"]),
        "utterances": len(items),
        "unmatched_utterances": len(unmatched),
        "train_utterances_without_items": without,
        "retokenisation_mismatches": mismatches,
        "per_suffix": suffix_report(fields, transcription_ids),
        "sets": {name: len(records) for name, records in sets.items()},
    }
    return sets, report


def log_report(report: dict[str, Any], prefix: str) -> None:
    log.info(
        "released targets: %d items over %d utterances; %d not in the training manifest (skipped); "
        "%d training utterances have no item",
        report["items"],
        report["utterances"],
        report["unmatched_utterances"],
        report["train_utterances_without_items"],
    )
    for k, row in report["per_suffix"].items():
        log.info(
            "suffix -%d: %d of %d decoder_prefix lines are the token ids of %r",
            k,
            row["transcription_prefix"],
            row["items"],
            prefix,
        )
    log.info("items whose decoded text re-tokenises to other ids: %s", report["retokenisation_mismatches"])
    log.info("assembled %s", report["sets"])
