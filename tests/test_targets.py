"""Synthetic targets: template banks, reproducible draws, batched + resumable generation, T/MI/TMI assembly."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from speechllm.targets.assemble import assemble
from speechllm.targets.generate import generate_batched, generate_shard, read_partial
from speechllm.targets.templates import TemplateError, bank_hash, draw_items, load_templates


def test_reference_template_bank(shared_data):
    bank = load_templates(str(shared_data / "bloomzmms" / "templates.json"))
    assert len(bank) == 4300
    assert ("Translate the following text from English to Swahili ", "") in bank or any(
        p.startswith("Translate the following text from") for p, _ in bank)


def test_builtin_bank_and_bad_bank(tmp_path):
    assert len(load_templates("builtin")) > 10
    bad = tmp_path / "t.json"
    bad.write_text('[["a", "b"], ["only one"]]')
    with pytest.raises(TemplateError, match="entry 1"):
        load_templates(str(bad))
    with pytest.raises(TemplateError, match="targets.templates"):
        load_templates(str(tmp_path / "missing.json"))


def test_draws_are_reproducible_and_per_occurrence():
    bank = [("A: ", ""), ("B: ", ""), ("", " C")]
    counts = {"hello": 3, "world": 1}
    a, b = draw_items(counts, bank, 2, seed=1), draw_items(counts, bank, 2, seed=1)
    assert a == b and len(a) == 8
    assert draw_items(counts, bank, 2, seed=2) != a
    assert sum(1 for t, _, _ in a if t == "hello") == 6
    assert bank_hash(bank) != bank_hash(bank[:2])


@pytest.fixture(scope="module")
def lm(tiny_models):
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llm"]).eval()
    tok = AutoTokenizer.from_pretrained(tiny_models["llm"])
    return model, tok


def test_batched_generation_equals_one_at_a_time(lm):
    model, tok = lm
    prompts = ["Repeat the sentence: the cat", "hello", "Der Hund schläft im Garten. The same text in English:"]
    batched = generate_batched(model, tok, prompts, batch_size=3, max_new_tokens=6, num_beams=1)
    single = [generate_batched(model, tok, [p], batch_size=1, max_new_tokens=6, num_beams=1)[0] for p in prompts]
    assert batched == single


def test_killed_shard_resumes_without_redoing_or_duplicating(lm, tmp_path):
    model, tok = lm
    items = [(f"text {i} the cat", "Repeat the sentence: ", ". ") for i in range(7)]
    settings = {"llm": "tiny", "max_new_tokens": 4, "num_beams": 1}
    full = tmp_path / "full.jsonl"
    generate_shard(items, 0, 1, model, tok, settings, 3, full)
    # Simulate a kill after the first batch: keep 3 finished items and a torn line in the partial file.
    out = tmp_path / "resumed.jsonl"
    partial = out.with_name(out.name + ".partial.jsonl")
    lines = [json.loads(x) for x in full.read_text().splitlines()]
    from speechllm.targets.generate import cache_key

    with partial.open("w") as fh:
        for item in lines[:3]:
            key = cache_key(settings, item["prefix"] + item["text"] + item["postfix"])
            fh.write(json.dumps({"key": key, **{k: item[k] for k in ("text", "prefix", "postfix", "output")}}) + "\n")
        fh.write('{"key": "torn')
    calls = []
    original = model.generate

    def counting_generate(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    model.generate = counting_generate
    try:
        stats = generate_shard(items, 0, 1, model, tok, settings, 3, out)
    finally:
        model.generate = original
    assert stats == {"items": 7, "generated": 4, "reused": 3}
    assert sum(calls) == 4
    assert out.read_text() == full.read_text()
    assert not partial.exists()
    assert read_partial(partial) == {}


def test_shards_partition_the_items(lm, tmp_path):
    model, tok = lm
    items = [(f"t{i}", "", " C") for i in range(5)]
    settings = {"llm": "tiny", "max_new_tokens": 2, "num_beams": 1}
    got = []
    for shard in range(2):
        generate_shard(items, shard, 2, model, tok, settings, 2, tmp_path / f"s{shard}.jsonl")
        got += [json.loads(x)["index"] for x in (tmp_path / f"s{shard}.jsonl").read_text().splitlines()]
    assert sorted(got) == list(range(5))


def test_t_mi_tmi_assembly():
    train = [{"id": f"u{i}", "raw_transcription": "Hello, World.", "transcription": "hello world"}
             for i in range(2)]
    generated = [{"index": i, "text": "Hello, World.", "prefix": f"P{i}: ", "postfix": "", "output": f" out{i}"}
                 for i in range(4)]
    generated.append({"index": 9, "text": "Hello, World.", "prefix": "", "postfix": "", "output": "dropped"})
    sets = assemble(train, generated, "Repeat the sentence: ", ". ", "synthetic_only", 2)
    assert [r["target"] for r in sets["t"]] == ["hello world", "hello world"]
    assert [r["id"] for r in sets["tmi"]] == ["u0-1", "u0-2", "u0-3", "u1-1", "u1-2", "u1-3"]
    assert sets["tmi"][0]["target"] == "Hello, World." and sets["tmi"][0]["prefix"] == "Repeat the sentence: "
    assert [r["target"] for r in sets["mi"]] == ["out0", "out1", "out2", "out3"]
    assert all(r["prefix"] != "Repeat the sentence: " for r in sets["mi"])
    pop = assemble(train, generated, "Repeat the sentence: ", ". ", "reference_pop", 2)
    assert [r["target"] for r in pop["mi"]] == ["Hello, World.", "out0", "Hello, World.", "out2"]
    with pytest.raises(ValueError, match="mi_reading"):
        assemble(train, generated, "", "", "other", 2)


def test_generation_is_deterministic_under_torch_seed_changes(lm):
    model, tok = lm
    torch.manual_seed(123)
    a = generate_batched(model, tok, ["hello"], 1, 5, 1)
    torch.manual_seed(7)
    assert generate_batched(model, tok, ["hello"], 1, 5, 1) == a
