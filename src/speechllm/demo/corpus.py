"""The embedded offline world: a parallel corpus and SpeechGLUE/SpeechXNLI-shaped sets written for this
project (package data in `speechllm/demo/texts/`), spoken with a TTS backend into FLEURS-shaped manifests."""

from __future__ import annotations

import csv
import itertools
import math
import random
from importlib import resources
from pathlib import Path

import soundfile as sf

from speechllm.data.languages import FLEURS_TO_SHORT, SHORT_TO_FLEURS
from speechllm.data.manifest import spoken_example, write_manifest
from speechllm.data.tts import TTSBackend, speak_all, voice_for

GLUE_FIELDS: dict[str, tuple[str, ...]] = {
    "sst2": ("sentence",),
    "cola": ("sentence",),
    "rte": ("sentence1", "sentence2"),
}
XNLI_FIELDS = ("premise", "hypothesis")


def demo_file(name: str) -> Path:
    return Path(str(resources.files("speechllm.demo") / "texts" / name))


def read_tsv(path: Path) -> list[dict[str, str]]:
    """The rows of a tab-separated table with a header; a row with more fields than the header or an empty
    field is an error naming the file and line (blank lines, which csv skips, still count)."""
    rows = []
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:  # csv's key for the fields past the header's
                raise ValueError(
                    f"{where}: {len(row) - 1 + len(row[None])} fields, the header has {len(row) - 1}"
                )
            empty = [key for key, value in row.items() if not (value or "").strip()]
            if empty:
                raise ValueError(f"{where}: empty field(s) {', '.join(empty)}")
            rows.append(row)
    return rows


def parallel_sentences() -> list[dict[str, str]]:
    return read_tsv(demo_file("sentences.tsv"))


COMPOSED_SLOTS = ("subject", "verb", "object", "adverbial")
COMPOSED_FIRST_ID = 1001  # composed sentence ids start here, after the written ones
SPLITS = ("train", "dev", "test")


def phrases_by_slot() -> dict[str, list[dict[str, str]]]:
    """The rows of `phrases.tsv` per slot of COMPOSED_SLOTS, in file order; every row in one slot, none
    empty."""
    path = demo_file("phrases.tsv")
    phrases = read_tsv(path)
    by_slot = {slot: [row for row in phrases if row["slot"] == slot] for slot in COMPOSED_SLOTS}
    if any(not rows for rows in by_slot.values()) or len(phrases) != sum(map(len, by_slot.values())):
        raise ValueError(f"{path}: every row's slot must be one of {COMPOSED_SLOTS}, each slot non-empty")
    return by_slot


def composed_sentences(counts: dict[str, int], seed: int) -> list[dict[str, str]]:
    """Parallel sentences composed from `phrases.tsv` (subject verb object adverbial, one phrase per slot).

    The written corpus uses most words once, too few times for a tiny model to learn what they sound like;
    composed sentences repeat each phrase across many sentences, and the dev/test sentences are combinations
    not seen in training (every phrase of which is). `counts` gives sentences per split (config key
    data.demo.composed); the same seeded draw serves the TTS corpus and the demo LLM's text.
    """
    path = demo_file("phrases.tsv")
    by_slot = phrases_by_slot()
    sizes = [len(by_slot[slot]) for slot in COMPOSED_SLOTS]
    rng = random.Random(seed)
    # The first training sentences walk a shuffled order of every slot at once, so each phrase occurs in
    # training.
    orders = [rng.sample(range(n), n) for n in sizes]
    cover = [tuple(order[i % len(order)] for order in orders) for i in range(max(sizes))]
    if counts.get("train", 0) < len(cover):
        raise ValueError(
            f"data.demo.composed.train is too small: it must be at least {len(cover)} so that every "
            f"phrase of {path} occurs in training"
        )
    rest = sorted(set(itertools.product(*(range(n) for n in sizes))) - set(cover))
    wanted = sum(counts.get(split, 0) for split in SPLITS)
    if wanted > len(cover) + len(rest):
        raise ValueError(
            f"data.demo.composed asks for {wanted} sentences; {path} makes {len(cover) + len(rest)}"
        )
    drawn = cover + rng.sample(rest, wanted - len(cover))
    columns = [c for c in by_slot[COMPOSED_SLOTS[0]][0] if c != "slot"]
    rows, start = [], 0
    for split in SPLITS:
        for combo in drawn[start : start + counts.get(split, 0)]:
            parts = [by_slot[slot][j] for slot, j in zip(COMPOSED_SLOTS, combo, strict=True)]
            row = {"id": str(COMPOSED_FIRST_ID + len(rows)), "split": split}
            row.update({c: " ".join(part[c] for part in parts) + "." for c in columns})
            rows.append(row)
        start += counts.get(split, 0)
    return rows


# GLUE-shaped items composed from the English phrases (data.demo.composed_glue). The written sets hold 40-48
# natural items each, too few for the tiny demo LLM to learn a task from the half it trains on (its `text`
# row stays at chance); composed items follow one rule per task that a small model learns from text, in
# phrases the demo's training speech contains, so the speech models have a task to gain on:
#   sst2: "S V O A." with a verb of sentiment.tsv, whose polarity is the label (1 positive);
#   cola: "S V O A." (1, acceptable), or the same phrases in an order English does not allow (0);
#   rte:  premise "S V O A."; the hypothesis "S V O." follows (0, entailment) or names another subject or
#         object (1, not entailment).
COLA_BAD_ORDERS = ("VSOA", "SOVA", "OVSA", "VOSA", "SOAV")  # S V O A slots; "A S V O" is acceptable English
COMPOSED_GLUE_TASKS = ("sst2", "cola", "rte")
ARTICLES = ("The", "A", "An", "My", "Our")  # lower-cased when their phrase does not open the sentence
# Draws per item before giving up on a fresh combination: the sets are small next to the combinations, so only
# a request close to the number of combinations exhausts them (and gets a clear error).
COMPOSED_GLUE_DRAWS = 1000


def _sentence(parts: list[str]) -> str:
    """Phrases joined into a sentence: capitalised first, lower-case article/pronoun elsewhere."""
    words = [part[0].lower() + part[1:] if part.split()[0] in ARTICLES else part for part in parts]
    return words[0][0].upper() + " ".join(words)[1:] + "."


def composed_glue(task: str, count: int, seed: int) -> list[dict[str, str]]:
    """`count` balanced rows of a GLUE-shaped task (columns as the written `{task}.tsv`), composed as
    above."""
    if task not in COMPOSED_GLUE_TASKS:
        raise ValueError(
            f"data.demo.composed_glue: no composed items for task {task!r} ({COMPOSED_GLUE_TASKS})"
        )
    slots = {slot: [row["en"] for row in rows] for slot, rows in phrases_by_slot().items()}
    path = demo_file("sentiment.tsv")
    polarity = {row["verb"]: row["label"] for row in read_tsv(path)}
    unknown = sorted(set(polarity) - set(slots["verb"]))
    if unknown or set(polarity.values()) != {"0", "1"}:
        raise ValueError(
            f"{path}: verbs {unknown} are not English verbs of phrases.tsv, or labels are not 0 and 1"
        )
    # sst2 draws a verb of the label's polarity; cola and rte the neutral verbs
    polar = {label: [v for v in polarity if polarity[v] == label] for label in ("0", "1")}
    neutral = [v for v in slots["verb"] if v not in polarity]
    rng = random.Random(f"{seed}-{task}")
    labels = [str(i % 2) for i in range(count)]
    rng.shuffle(labels)
    rows: list[dict[str, str]] = []
    seen: set[tuple[str, ...]] = set()
    for label in labels:
        for _ in range(COMPOSED_GLUE_DRAWS):  # a fresh combination
            verb = rng.choice(polar[label] if task == "sst2" else neutral)
            s, o, a = (rng.choice(slots[slot]) for slot in ("subject", "object", "adverbial"))
            order = "SVOA" if task != "cola" or label == "1" else rng.choice(COLA_BAD_ORDERS)
            key = (s, verb, o, a, order)
            if key not in seen:
                break
        else:
            raise ValueError(
                f"data.demo.composed_glue: taught + held_out = {count} {task} items, more than the "
                f"phrases of phrases.tsv make"
            )
        seen.add(key)
        by_slot = dict(zip("SVOA", (s, verb, o, a), strict=True))
        row = {"id": str(COMPOSED_FIRST_ID + len(rows))}
        if task == "rte":
            hypothesis = [s, verb, o]
            if label == "1":  # another subject or another object
                which = rng.choice((0, 2))
                slot = "subject" if which == 0 else "object"
                hypothesis[which] = rng.choice([p for p in slots[slot] if p != hypothesis[which]])
            row.update(sentence1=_sentence([s, verb, o, a]), sentence2=_sentence(hypothesis))
        else:
            row["sentence"] = _sentence([by_slot[k] for k in order])
        row["label"] = label
        rows.append(row)
    return rows


def glue_split(
    task: str, llm_fraction: float, composed: dict[str, int] | None
) -> tuple[list[dict], list[dict]]:
    """(taught to the demo LLM, held out and spoken) rows of a demo GLUE task: the written set split by
    `split_for_llm`, plus, when configured (data.demo.composed_glue), `taught` and `held_out` composed
    rows."""
    seen, held_out = split_for_llm(read_tsv(demo_file(f"{task}.tsv")), llm_fraction)
    if composed and task in COMPOSED_GLUE_TASKS:
        taught = composed["taught"]
        rows = composed_glue(task, taught + composed["held_out"], composed["seed"])
        seen, held_out = seen + rows[:taught], held_out + rows[taught:]
    return seen, held_out


def demo_sentences(composed: dict[str, int] | None) -> list[dict[str, str]]:
    """The written parallel corpus plus, when configured (data.demo.composed), the composed sentences."""
    rows = parallel_sentences()
    if composed:
        rows += composed_sentences({k: v for k, v in composed.items() if k in SPLITS}, composed["seed"])
    return rows


def split_for_llm(rows: list[dict[str, str]], fraction: float) -> tuple[list[dict], list[dict]]:
    """Split a classification set: the first `fraction` teaches the demo LLM the task, the rest is
    evaluated."""
    cut = math.ceil(len(rows) * fraction)
    return rows[:cut], rows[cut:]


def build_corpus(
    out_dir: Path,
    languages: list[str],
    voices: dict[str, str],
    tts: TTSBackend,
    sampling_rate: int,
    threads: int,
    composed: dict[str, int] | None = None,
) -> dict[str, int]:
    """Speak the parallel corpus; write `out_dir/fleurs/{train,dev,test}.jsonl`. Returns counts per split."""
    rows = demo_sentences(composed)
    jobs, records = [], {"train": [], "dev": [], "test": []}
    for code in languages:
        short = FLEURS_TO_SHORT.get(code)
        if short is None or short not in rows[0]:
            raise ValueError(f"language {code!r} (config key data.languages) is not in the demo corpus")
        voice = voice_for(voices, code)
        for row in rows:
            sid = int(row["id"])
            path = out_dir / "audio" / code / f"{sid:04d}.wav"
            jobs.append((row[short], voice, path))
            records[row["split"]].append(
                {
                    "id": f"{code}-{row['split']}-{sid:04d}",
                    "sentence_id": sid,
                    "language": code,
                    "audio": str(path),
                    "raw_transcription": row[short],
                    "translation": row["en"],
                }
            )
    speak_all(tts, jobs, threads)
    for split, recs in records.items():
        for rec in recs:
            rec["num_samples"] = sf.info(rec["audio"]).frames
            rec["sampling_rate"] = sampling_rate
        write_manifest(out_dir / "fleurs" / f"{split}.jsonl", recs)
    return {split: len(recs) for split, recs in records.items()}


def build_speechglue(
    out_dir: Path,
    tasks: list[str],
    voice: str,
    tts: TTSBackend,
    sampling_rate: int,
    llm_fraction: float,
    threads: int,
    composed: dict[str, int] | None = None,
) -> dict[str, int]:
    """Speak each text field of the held-out part of each task; `out_dir/speechglue/{task}.jsonl`."""
    counts = {}
    for task in tasks:
        if task not in GLUE_FIELDS:
            raise ValueError(f"demo SpeechGLUE has no task {task!r} (config key data.speechglue.tasks)")
        _, held_out = glue_split(task, llm_fraction, composed)
        jobs, pending = [], []
        for row in held_out:
            paths = {
                f: out_dir / "audio" / "speechglue" / task / f"{int(row['id']):04d}_{f}.wav"
                for f in GLUE_FIELDS[task]
            }
            jobs += [(row[f], voice, p) for f, p in paths.items()]
            pending.append((row, paths))
        speak_all(tts, jobs, threads)
        examples = [
            spoken_example(
                task, f"{task}-{int(row['id']):04d}", "en_us", paths, row, int(row["label"]), sampling_rate
            )
            for row, paths in pending
        ]
        counts[task] = write_manifest(out_dir / "speechglue" / f"{task}.jsonl", examples)
    return counts


def xnli_split(llm_fraction: float) -> tuple[list[dict], list[dict]]:
    """Split XNLI-shaped pairs by pair id, so no translation of a held-out pair teaches the demo LLM."""
    rows = read_tsv(demo_file("xnli.tsv"))
    ids = sorted({int(row["id"]) for row in rows})
    llm_ids = set(ids[: math.ceil(len(ids) * llm_fraction)])
    return [r for r in rows if int(r["id"]) in llm_ids], [r for r in rows if int(r["id"]) not in llm_ids]


def build_speechxnli(
    out_dir: Path,
    languages: list[str],
    voices: dict[str, str],
    tts: TTSBackend,
    sampling_rate: int,
    llm_fraction: float,
    threads: int,
) -> int:
    """Speak premise and hypothesis of every held-out pair; `out_dir/speechxnli/test.jsonl`."""
    rows = [row for row in xnli_split(llm_fraction)[1] if row["language"] in languages]
    missing = set(languages) - {row["language"] for row in rows}
    if missing:
        raise ValueError(
            f"demo SpeechXNLI has no language(s) {sorted(missing)} (config key data.speechxnli.languages)"
        )
    voice = {lang: voice_for(voices, lang) for lang in languages}
    jobs, pending = [], []
    for row in rows:
        lang = row["language"]
        paths = {
            f: out_dir / "audio" / "speechxnli" / lang / f"{int(row['id']):04d}_{f}.wav" for f in XNLI_FIELDS
        }
        jobs += [(row[f], voice[lang], p) for f, p in paths.items()]
        pending.append((row, paths))
    speak_all(tts, jobs, threads)
    examples = [
        spoken_example(
            "xnli",
            f"xnli-{row['language']}-{int(row['id']):04d}",
            SHORT_TO_FLEURS[row["language"]],
            paths,
            row,
            int(row["label"]),
            sampling_rate,
        )
        for row, paths in pending
    ]
    return write_manifest(out_dir / "speechxnli" / "test.jsonl", examples)


def demo_articles() -> list[dict[str, str]]:
    """The demo's articles: id, article, summary."""
    return [
        {"id": f"demo-{int(row['id']):04d}", "article": row["article"], "summary": row["summary"]}
        for row in read_tsv(demo_file("articles.tsv"))
    ]
