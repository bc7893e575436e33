"""Import of the reference's released targets: a tar of Kaldi-style token-id files, built here in the test."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from speechllm.cli import main
from speechllm.data.batches import Collator
from speechllm.data.manifest import read_manifest
from speechllm.targets.assemble import assemble
from speechllm.targets.released import ReleasedTargetsError, import_released, read_released_archive

REPEAT = "Repeat the sentence: "
# (item id, prefix, postfix, target): u1 has the transcription item first (the reference's pop() order),
# u2 has it second; u3 has no item.
ITEMS = [
    ("u1-1", REPEAT, ". ", "Hello, World."),
    ("u1-2", "A text in German: ", "\nThe same text in English:", " Hello world."),
    ("u1-3", "", " Summarize", " A greeting."),
    ("u2-1", "Translate the following text from German to English\n", "", " The dog sleeps."),
    ("u2-2", REPEAT, ". ", "Der Hund schläft."),
    ("u2-3", "Title: ", "", " Dogs"),
]
TRAIN = [
    {"id": u, "transcription": t, "raw_transcription": t, "language": "en_us", "audio": f"{u}.wav"}
    for u, t in (("u1", "hello world"), ("u2", "der hund schläft"), ("u3", "the cat"))
]


@pytest.fixture(scope="module")
def tok(tiny_models):
    return AutoTokenizer.from_pretrained(tiny_models["llm"])


def ids_line(item_id: str, text: str, tok) -> str:
    return " ".join([item_id, *map(str, tok(text, add_special_tokens=False).input_ids)])


def build_tar(path: Path, files: dict[str, str], folder: str = "") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(folder + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def released_files(tok, items=ITEMS) -> dict[str, str]:
    columns = {"text": 3, "decoder_prefix": 1, "decoder_postfix": 2}
    return {
        name: "".join(ids_line(item[0], item[col], tok) + "\n" for item in items)
        for name, col in columns.items()
    }


def test_import_decodes_joins_and_reports(tok, tiny_models, tmp_path, caplog):
    archive = build_tar(tmp_path / "tmi_training_targets.tar.gz", released_files(tok), folder="./")
    manifest = tmp_path / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in TRAIN))
    settings = {
        "llm": {"name_or_path": str(tiny_models["llm"]), "revision": "main", "dtype": "float32"},
        "prompt": {"prefix": REPEAT, "postfix": ". "},
        "mi_reading": "synthetic_only",
        "templates_per_occurrence": 2,
        "on_unmatched": "error",
    }
    with caplog.at_level(logging.INFO, logger="speechllm"):
        main(
            [
                "targets",
                "import-released",
                "--settings",
                json.dumps(settings),
                "--manifest",
                str(manifest),
                "--archive",
                str(archive),
                "--out-dir",
                str(tmp_path / "out"),
            ]
        )
    sets = {v: read_manifest(tmp_path / "out" / f"train_{v}.jsonl") for v in ("t", "mi", "tmi")}
    by_id = {item[0]: item for item in ITEMS}
    assert [r["id"] for r in sets["tmi"]] == [item[0] for item in ITEMS]
    for rec in sets["tmi"]:  # ids decoded back to the strings they were made from, joined to the manifest
        _, prefix, postfix, target = by_id[rec["id"]]
        assert (rec["prefix"], rec["postfix"], rec["target"]) == (prefix, postfix, target)
        assert rec["audio"] == rec["id"].split("-")[0] + ".wav"
    # synthetic_only: MI skips the transcription items and renumbers
    assert [(r["id"], r["target"]) for r in sets["mi"]] == [
        ("u1-1", " Hello world."),
        ("u1-2", " A greeting."),
        ("u2-1", " The dog sleeps."),
        ("u2-2", " Dogs"),
    ]
    assert [(r["id"], r["target"], r["prefix"]) for r in sets["t"]] == [
        (r["id"], r["transcription"], REPEAT) for r in TRAIN
    ]
    log = caplog.text
    assert f"suffix -1: 1 of 2 decoder_prefix lines are the token ids of {REPEAT!r}" in log
    assert f"suffix -2: 1 of 2 decoder_prefix lines are the token ids of {REPEAT!r}" in log
    assert f"suffix -3: 0 of 2 decoder_prefix lines are the token ids of {REPEAT!r}" in log
    assert "1 training utterances have no item" in log


def test_generated_and_released_targets_give_the_same_token_ids(tok, tmp_path):
    """The same continuations reach training as the same token ids whether assembled from generation shards
    or imported from the released tar, whose ids are the reference's tokenisation of each output string as
    generated (prepare_data.py), leading space included."""
    raw = {"u1": "Hello, World.", "u2": "Der Hund schläft."}
    train = [{**rec, "raw_transcription": raw[rec["id"]]} for rec in TRAIN if rec["id"] in raw]
    synthetic = {"u1": [ITEMS[1], ITEMS[2]], "u2": [ITEMS[3], ITEMS[5]]}  # (id, prefix, postfix, output)
    pairs = [(rec, item) for rec in train for item in synthetic[rec["id"]]]
    generated = [
        {
            "index": i,
            "text": rec["raw_transcription"],
            "prefix": item[1],
            "postfix": item[2],
            "output": item[3],
        }
        for i, (rec, item) in enumerate(pairs)
    ]
    made = assemble(train, generated, REPEAT, ". ", "synthetic_only", 2, True)
    released = [
        (f"{rec['id']}-{k}", *item)
        for rec in train
        for k, item in enumerate(
            [(REPEAT, ". ", rec["raw_transcription"]), *(s[1:] for s in synthetic[rec["id"]])], start=1
        )
    ]
    fields = read_released_archive(build_tar(tmp_path / "t.tar.gz", released_files(tok, released)))
    imported, _ = import_released(train, fields, tok, REPEAT, ". ", "synthetic_only", 2, "error")
    collator = Collator(tok)

    def token_ids(records: list[dict]) -> dict[str, tuple[list[int], list[int], list[int]]]:
        batch = collator([{"record": r, "wav": torch.zeros(4)} for r in records])
        return {
            r["id"]: (p, q, t)
            for r, p, q, t in zip(records, batch.prefix, batch.postfix, batch.target, strict=True)
        }

    for name in ("mi", "tmi"):
        assert token_ids(made[name]) == token_ids(imported[name])
    assert {i: ids[2] for i, ids in token_ids(made["tmi"]).items()} == fields["target"]
    first = tok.convert_ids_to_tokens(token_ids(made["tmi"])["u1-2"][2])[0]
    assert first.startswith("Ġ")  # " Hello world.": the continuation's leading space is its first token's


def test_reference_pop_reading_keeps_the_first_suffixes(tok, tmp_path):
    fields = read_released_archive(build_tar(tmp_path / "t.tar.gz", released_files(tok)))
    sets, report = import_released(TRAIN, fields, tok, REPEAT, ". ", "reference_pop", 2, "error")
    assert [(r["id"], r["target"]) for r in sets["mi"]] == [
        ("u1-1", "Hello, World."),
        ("u1-2", " Hello world."),
        ("u2-1", " The dog sleeps."),
        ("u2-2", "Der Hund schläft."),
    ]
    assert report["per_suffix"][1] == {"items": 2, "transcription_prefix": 1}
    assert report["retokenisation_mismatches"] == {"target": 0, "prefix": 0, "postfix": 0}
    assert report["sets"] == {"t": 3, "mi": 4, "tmi": 6}


def test_unmatched_utterances_error_or_are_counted(tok, tmp_path):
    items = [*ITEMS, ("ghost-1", REPEAT, ". ", "Boo.")]
    fields = read_released_archive(build_tar(tmp_path / "t.tar.gz", released_files(tok, items)))
    with pytest.raises(
        ReleasedTargetsError, match="1 of 3 released utterances are not in the training manifest"
    ):
        import_released(TRAIN, fields, tok, REPEAT, ". ", "synthetic_only", 2, "error")
    sets, report = import_released(TRAIN, fields, tok, REPEAT, ". ", "synthetic_only", 2, "skip")
    assert report["unmatched_utterances"] == 1 and all(not r["id"].startswith("ghost") for r in sets["tmi"])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda f: f.update(text=f["text"].replace("u1-2 ", "u1-2 x", 1)),
            r"text:2: token ids must be integers",
        ),
        (lambda f: f.pop("decoder_postfix"), "no member named decoder_postfix"),
        (
            lambda f: f.update(decoder_prefix=f["decoder_prefix"] + "u9-1 5\n"),
            "prefix and text list different",
        ),
        (lambda f: f.update(text=f["text"] + "u1-1 5\n"), r"text:7: utterance u1-1 appears twice"),
        (lambda f: f.update(text=f["text"] + "\n"), r"text:7: blank line"),
    ],
)
def test_malformed_archives_name_the_member_and_line(tok, tmp_path, edit, message):
    files = released_files(tok)
    edit(files)
    with pytest.raises(ReleasedTargetsError, match=message):
        read_released_archive(build_tar(tmp_path / "t.tar.gz", files))


def test_item_ids_need_a_suffix(tok, tmp_path):
    files = {name: text.replace("u1-3", "u1x") for name, text in released_files(tok).items()}
    fields = read_released_archive(build_tar(tmp_path / "t.tar.gz", files))
    with pytest.raises(ReleasedTargetsError, match="'u1x' is not <utterance>-<k>"):
        import_released(TRAIN, fields, tok, REPEAT, ". ", "synthetic_only", 2, "error")
    with pytest.raises(ReleasedTargetsError, match="not a readable tar"):
        read_released_archive(tmp_path / "missing.tar.gz")
