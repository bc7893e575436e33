"""Kang & Roy response targets: per-sample length limits, batched = one at a time, resumable, gathered."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from tokenizers import processors
from transformers import AutoModelForCausalLM, AutoTokenizer

from speechllm.cli import main
from speechllm.data.manifest import ManifestError, read_manifest
from speechllm.targets.generate import HFGenerator, cache_key, partial_path
from speechllm.targets.responses import (
    generate_responses_shard,
    response_prompt,
    response_settings,
)
from speechllm.targets.settings import ResponsesSettings
from speechllm.targets.shards import gather_shards

TEMPLATE = "[|User|] {text}</s>[|Assistant|]"
TRANSCRIPTS = [
    "THE CAT SITS ON THE MAT",
    "HELLO",
    "DER HUND SCHLÄFT IM GARTEN UND DIE KATZE",
    "HELLO WORLD",
    "REPEAT THE SENTENCE THE CAT",
    "A",
    "TRANSLATE THE FOLLOWING TEXT",
    "THE MAT",
]
SETTINGS = {
    "llm": {
        "name_or_path": "GeneZC/MiniChat-2-3B",
        "revision": "main",
        "dtype": "float16",
        "load_in_8bit": False,
    },
    "backend": "hf",
    "seed": 1234,
    "vllm": {"chunk_size": 8, "gpu_memory_utilization": 0.9},
    "responses": {
        "text_field": "raw_transcription",
        "prompt_template": TEMPLATE,
        "lowercase": True,
        "add_special_tokens": True,
        "length_factor": 2,
        "num_beams": 1,
        "clean_up_spaces": True,
        "batch_size": 4,
    },
}


def key_settings(raw: dict) -> dict:
    """The cache-key settings of the responses step for its `--settings` object."""
    return response_settings(ResponsesSettings.from_settings(raw))


@pytest.fixture(scope="module")
def chat_lm(tiny_models):
    """The tiny LM with a tokenizer that adds <s> in front, as MiniChat's (LLaMA) tokenizer does."""
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llm"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_models["llm"])
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)]
    )
    return model, tok


def write_manifest(path: Path, texts: list[str] = TRANSCRIPTS) -> Path:
    path.write_text(
        "".join(json.dumps({"id": f"utt{i}", "raw_transcription": t}) + "\n" for i, t in enumerate(texts))
    )
    return path


def one_at_a_time(model, tok, prompt: str) -> str:
    """The paper's rule with plain HF generate: batch 1, max_new_tokens = 2 x this prompt's length."""
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids[0, 0].item() == tok.bos_token_id
    gen = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2 * ids.shape[1], do_sample=False
    )
    text = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return tok.clean_up_tokenization(text)


def test_batched_responses_equal_one_at_a_time_with_per_sample_limits(chat_lm, tmp_path):
    model, tok = chat_lm
    prefills = []  # forward passes over whole prompts: (rows, prompt lengths)

    def record(_, args, kwargs):
        if kwargs["input_ids"].shape[1] > 1:
            prefills.append((kwargs["input_ids"].shape[0], kwargs["attention_mask"].sum(1).tolist()))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        out = tmp_path / "shard0.jsonl"
        stats = generate_responses_shard(
            write_manifest(tmp_path / "m.jsonl"),
            0,
            1,
            HFGenerator(model, tok, 4, add_special_tokens=True, clean_up_spaces=True),
            key_settings(SETTINGS),
            "raw_transcription",
            TEMPLATE,
            True,
            2,
            out,
        )
    finally:
        hook.remove()
    # prompts are prefilled four at a time, each batch mixing prompt lengths (and so per-sample limits)
    assert [n for n, _ in prefills] == [4, 4]
    assert all(len(set(lengths)) > 1 for _, lengths in prefills)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"utt{i}" for i in range(len(TRANSCRIPTS))]
    for row, text in zip(rows, TRANSCRIPTS, strict=True):
        prompt = f"[|User|] {text.lower()}</s>[|Assistant|]"
        assert row["llm_response"] == one_at_a_time(model, tok, prompt)
        assert "</s>" not in row["llm_response"]
    longest = f"[|User|] {TRANSCRIPTS[2].lower()}</s>[|Assistant|]"
    assert stats["max_new_tokens"] == 2 * len(tok(longest).input_ids)


def test_killed_responses_shard_resumes(chat_lm, tmp_path):
    model, tok = chat_lm
    manifest = write_manifest(tmp_path / "m.jsonl")
    settings = key_settings(SETTINGS)
    full = tmp_path / "full.jsonl"
    generate_responses_shard(
        manifest,
        0,
        1,
        HFGenerator(model, tok, 4, add_special_tokens=True),
        settings,
        "raw_transcription",
        TEMPLATE,
        True,
        2,
        full,
    )
    out = tmp_path / "resumed.jsonl"
    with partial_path(out).open("w") as fh:  # a shard killed after three items and a torn line
        for row in [json.loads(x) for x in full.read_text().splitlines()][:3]:
            prompt = response_prompt(row["raw_transcription"], TEMPLATE, True)
            fh.write(json.dumps({"key": cache_key(settings, prompt), "output": row["llm_response"]}) + "\n")
        fh.write('{"key": "0f')
    stats = generate_responses_shard(
        manifest,
        0,
        1,
        HFGenerator(model, tok, 4, add_special_tokens=True),
        settings,
        "raw_transcription",
        TEMPLATE,
        True,
        2,
        out,
    )
    assert (stats["generated"], stats["reused"]) == (5, 3)
    assert out.read_text() == full.read_text() and not partial_path(out).exists()


@pytest.mark.parametrize(
    ("key", "value"),
    [("length_factor", 3), ("add_special_tokens", False), ("clean_up_spaces", False), ("num_beams", 2)],
)
def test_response_settings_reach_the_cache_key(key, value):
    changed = copy.deepcopy(SETTINGS)
    changed["responses"][key] = value
    assert cache_key(key_settings(changed), "p") != cache_key(key_settings(SETTINGS), "p")


def test_cli_shards_and_gather(tiny_models, tmp_path):
    manifest = write_manifest(tmp_path / "librispeech_dev.jsonl", TRANSCRIPTS[:5])
    settings = copy.deepcopy(SETTINGS)
    settings["llm"] = {
        "name_or_path": str(tiny_models["llm"]),
        "revision": "main",
        "dtype": "float32",
        "load_in_8bit": False,
    }
    shards = [tmp_path / f"shard{s}.jsonl" for s in range(2)]
    for s, path in enumerate(shards):
        main(
            [
                "targets",
                "responses",
                "--settings",
                json.dumps(settings),
                "--manifest",
                str(manifest),
                "--shard",
                str(s),
                "--num-shards",
                "2",
                "--out",
                str(path),
            ]
        )
    assert [json.loads(x)["index"] for x in shards[1].read_text().splitlines()] == [1, 3]
    out = tmp_path / "responses.jsonl"
    main(["targets", "gather", "--shards", *map(str, shards), "--out", str(out)])
    rows = read_manifest(out)
    assert [r["id"] for r in rows] == [f"utt{i}" for i in range(5)]
    assert all(isinstance(r["llm_response"], str) and "index" not in r for r in rows)
    with pytest.raises(ValueError, match="miss indices"):
        gather_shards(shards[:1])
    with pytest.raises(ValueError, match="index 0 appears in more than one"):
        gather_shards([shards[0], shards[0]])


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="no {text} slot"):
        response_prompt("hi", "[|User|] </s>[|Assistant|]", True)
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "a", "text": "HI"}) + "\n")
    with pytest.raises(ManifestError, match=r"m.jsonl:1: missing field\(s\) raw_transcription"):
        generate_responses_shard(
            manifest, 0, 1, None, {}, "raw_transcription", TEMPLATE, True, 2, tmp_path / "o.jsonl"
        )


@pytest.mark.parametrize("line", ['["a list"]', '{"index": 1.5}', '{"index": "1"}', '{"index": -1}', "{}"])
def test_gather_names_a_shard_row_without_a_whole_number_index(tmp_path, line):
    shard = tmp_path / "shard0.jsonl"
    shard.write_text(json.dumps({"index": 0, "id": "a"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=f"{shard}:2: not a shard row"):
        gather_shards([shard])
