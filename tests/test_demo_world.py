"""The embedded demo world: written sentences plus sentences composed from a phrase table; the demo LLM."""

from __future__ import annotations

import random
import re

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM

from speechllm.data.languages import language_name
from speechllm.data.tts import voice_for
from speechllm.demo.build import (
    _batches,
    _template_target,
    build_llm,
    instruction_examples,
    pretraining_batch,
    rescale_embeddings,
)
from speechllm.demo.corpus import (
    COMPOSED_SLOTS,
    build_speechxnli,
    composed_glue,
    composed_sentences,
    demo_file,
    demo_sentences,
    glue_split,
    read_tsv,
    split_for_llm,
)
from speechllm.evaluate.prompts import TASK_PROMPTS, render_text
from speechllm.targets.templates import builtin_templates
from speechllm.text.normalize import basic_normalize

COUNTS = {"train": 60, "dev": 6, "test": 6}
LANGUAGES = ("en", "de", "fr", "es", "it", "pt")


def phrase_sets() -> dict[str, list[str]]:
    """English phrase of each slot, the slot order of a composed sentence."""
    rows = read_tsv(demo_file("phrases.tsv"))
    return {slot: [r["en"] for r in rows if r["slot"] == slot] for slot in COMPOSED_SLOTS}


def english_parts(sentence: str, phrases: dict[str, list[str]]) -> tuple[str, ...]:
    """Split an English composed sentence back into its four phrases."""
    rest = sentence.removesuffix(".")
    parts = []
    for slot in COMPOSED_SLOTS:
        match = [p for p in phrases[slot] if rest.startswith(p)]
        assert len(match) == 1, (sentence, slot)
        parts.append(match[0])
        rest = rest[len(match[0]) :].lstrip()
    assert rest == "", sentence
    return tuple(parts)


def test_composed_splits_are_unseen_combinations_of_seen_phrases():
    rows = composed_sentences(COUNTS, seed=0)
    phrases = phrase_sets()
    by_split = {s: [english_parts(r["en"], phrases) for r in rows if r["split"] == s] for s in COUNTS}
    assert {s: len(v) for s, v in by_split.items()} == COUNTS
    train = set(by_split["train"])
    assert len(train) == COUNTS["train"]
    for split in ("dev", "test"):
        assert not train & set(by_split[split])
        for combo in by_split[split]:
            for i, phrase in enumerate(combo):
                assert any(t[i] == phrase for t in train), (split, phrase)
    for row in rows:
        assert all(row[c].endswith(".") and row[c][0].isupper() for c in LANGUAGES)


def test_composed_draw_is_reproducible_and_ids_follow_the_written_corpus():
    assert composed_sentences(COUNTS, seed=3) == composed_sentences(COUNTS, seed=3)
    assert composed_sentences(COUNTS, seed=3) != composed_sentences(COUNTS, seed=4)
    rows = demo_sentences({**COUNTS, "seed": 0})
    ids = [int(r["id"]) for r in rows]
    assert len(set(ids)) == len(ids)
    assert demo_sentences(None) == rows[: len(ids) - sum(COUNTS.values())]


def test_too_many_or_too_few_composed_sentences_name_the_config_key():
    with pytest.raises(ValueError, match="data.demo.composed asks for"):
        composed_sentences({"train": 10**6, "dev": 0, "test": 0}, seed=0)
    with pytest.raises(ValueError, match="data.demo.composed.train is too small"):
        composed_sentences({"train": 7, "dev": 1, "test": 1}, seed=0)


def test_rescaled_embeddings_leave_the_llm_function_unchanged():
    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=50, hidden_size=32, n_layer=2, n_head=4)).eval()
    with torch.no_grad():  # a trained model's final LayerNorm is not the identity
        model.transformer.ln_f.weight.uniform_(0.5, 1.5)
        model.transformer.ln_f.bias.uniform_(-0.5, 0.5)
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    before = model(input_ids=ids, attention_mask=mask).logits
    factor = rescale_embeddings(model, mean_norm=5.0)
    after = model(input_ids=ids, attention_mask=mask).logits
    norms = model.get_input_embeddings().weight.detach().norm(dim=1)
    assert factor > 1 and float(norms.mean()) == pytest.approx(5.0, rel=1e-5)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


def tiny_llm_settings(steps: int, freeze: bool) -> dict:
    return {
        "tokenizer_vocab_size": 300,
        "llm_vocab_pad_to": 64,
        "llm_embedding_norm": 5.0,
        "llm": {"hidden_size": 32, "n_layer": 1, "n_head": 2},
        "llm_pretrain": {
            "steps": steps,
            "batch_size": 4,
            "lr": 1e-2,
            "warmup_steps": 1,
            "max_length": 160,
            "sort_pool_batches": 2,
            "weight_decay": 0.0,
            "grad_clip": 1.0,
            "templates_per_sentence": 1,
            "task_repeats": 1,
            "freeze_embeddings": freeze,
        },
    }


@pytest.mark.parametrize("freeze", [True, False])
def test_demo_llm_embeddings_stay_random_and_frozen_when_asked(tmp_path, freeze):
    """freeze_embeddings: pretraining leaves the (tied) table at its random rows of norm ~5; otherwise it
    moves."""
    prompt = {"prefix": "Repeat the sentence: ", "postfix": ". "}
    st_prompt = {"prefix": "Translate the following text from {language} to English\n", "postfix": "\n"}
    models = {}
    for steps in (1, 3):
        out = tmp_path / f"llm{steps}"
        build_llm(out, tiny_llm_settings(steps, freeze), prompt, st_prompt, 0.5, " ", seed=0)
        models[steps] = BloomForCausalLM.from_pretrained(out)
    one, three = (models[s].get_input_embeddings().weight.detach() for s in (1, 3))
    assert float(three.norm(dim=1).mean()) == pytest.approx(5.0, rel=1e-4)
    blocks = [m.transformer.h[0].mlp.dense_4h_to_h.weight.detach() for m in models.values()]
    assert not torch.equal(*blocks)
    if freeze:
        torch.testing.assert_close(three, one)
        cosine = torch.nn.functional.normalize(three, dim=1) @ torch.nn.functional.normalize(three, dim=1).T
        assert float(cosine.fill_diagonal_(0).abs().max()) < 0.9  # random rows: no two tokens alike
    else:
        assert not torch.allclose(three, one)


def test_demo_llm_refuses_to_cut_answers_off(tmp_path):
    """An instruction example longer than max_length is an error naming the key, not a silent truncation."""
    settings = tiny_llm_settings(1, freeze=False)
    settings["llm_pretrain"]["max_length"] = 24
    prompt = {"prefix": "Repeat the sentence: ", "postfix": ". "}
    st_prompt = {"prefix": "Translate the following text from {language} to English\n", "postfix": "\n"}
    with pytest.raises(ValueError, match=r"models\.demo_build\.llm_pretrain\.max_length=24 .* at least \d+"):
        build_llm(tmp_path / "llm", settings, prompt, st_prompt, 0.5, " ", seed=0)
    assert not (tmp_path / "llm" / "model.safetensors").exists()


def plain(sentence: str) -> str:
    """A composed English sentence as its phrases read in order, whatever their capitalisation."""
    return sentence.removesuffix(".").lower()


def test_composed_glue_follows_one_rule_per_task():
    phrases = {slot: [p.lower() for p in values] for slot, values in phrase_sets().items()}
    polarity = {r["verb"]: r["label"] for r in read_tsv(demo_file("sentiment.tsv"))}
    for task in ("sst2", "cola", "rte"):
        rows = composed_glue(task, 40, seed=0)
        assert [r["label"] for r in rows].count("1") == 20  # balanced
        assert len({tuple(r.values())[1:] for r in rows}) == 40  # no item twice
        assert [int(r["id"]) for r in rows] == list(range(1001, 1041))  # after the written ids (<= 48)
        for r in rows:
            if task == "sst2":
                verb = next(v for v in polarity if f" {v} " in r["sentence"])
                assert polarity[verb] == r["label"], r
            elif task == "cola" and r["label"] == "1":
                english_parts(r["sentence"], phrase_sets())  # subject verb object adverbial, in that order
            elif task == "cola":  # the same kinds of phrases, in an order English does not allow
                words = plain(r["sentence"])
                assert not any(
                    words.startswith(f"{s} {v} ") for s in phrases["subject"] for v in phrases["verb"]
                )
                assert sum(words.count(a) for a in phrases["adverbial"]) == 1, r
            else:
                premise, hypothesis = plain(r["sentence1"]), plain(r["sentence2"])
                entailed = any(premise == hypothesis + " " + a for a in phrases["adverbial"])
                assert entailed == (r["label"] == "0"), r


def test_composed_glue_adds_to_the_written_sets_on_both_sides_of_the_llm_split():
    written = {t: read_tsv(demo_file(f"{t}.tsv")) for t in ("sst2", "rte")}
    composed = {"taught": 12, "held_out": 4, "seed": 0}
    seen, held_out = glue_split("sst2", 0.5, composed)
    assert len(seen) == len(written["sst2"]) // 2 + 12 and len(held_out) == len(written["sst2"]) // 2 + 4
    assert not {r["sentence"] for r in seen} & {r["sentence"] for r in held_out}
    assert glue_split("rte", 0.5, None) == tuple(split_for_llm(written["rte"], 0.5))
    assert (
        composed_glue("cola", 12, seed=1) == composed_glue("cola", 12, seed=1) != composed_glue("cola", 12, 2)
    )
    # The demo LLM is taught the seen composed items in the evaluation's own prompt.
    examples = instruction_examples(
        0.5, "Repeat: ", ". ", "Translate from {language}:\n", "\n", 1, 1, " ", 0, None, composed
    )
    prompts = {e.prompt: e.completion for e in examples}
    for row in seen[-5:]:
        assert (
            prompts[render_text(TASK_PROMPTS["sst2"], row)]
            == " " + TASK_PROMPTS["sst2"].options[int(row["label"])]
        )
    for row in held_out:
        assert render_text(TASK_PROMPTS["sst2"], row) not in prompts


def test_composed_glue_errors_name_the_config_key():
    with pytest.raises(ValueError, match=r"data\.demo\.composed_glue: no composed items for task 'qqp'"):
        composed_glue("qqp", 4, seed=0)
    with pytest.raises(
        ValueError, match=r"data\.demo\.composed_glue: taught \+ held_out = 100000 sst2 items, more than"
    ):
        composed_glue("sst2", 100_000, seed=0)


def test_demo_llm_batches_group_similar_lengths_and_cover_every_sequence():
    """Sorted pools: each pass yields every sequence once, with far less padding than random batches."""
    rng = random.Random(0)
    seqs = [([7] * rng.randint(5, 120), 3) for _ in range(640)]
    batches = _batches(seqs, 8, 10, random.Random(1))
    one_pass = [next(batches) for _ in range(80)]
    assert sorted(len(ids) for b in one_pass for ids, _ in b) == sorted(len(ids) for ids, _ in seqs)

    def padded(bs: list[list[tuple[list[int], int]]]) -> int:
        return sum(len(b) * max(len(ids) for ids, _ in b) for b in bs)

    unsorted = [seqs[i : i + 8] for i in range(0, 640, 8)]
    assert padded(one_pass) < 0.75 * padded(unsorted)
    firsts = [len(b[0][0]) for b in one_pass]
    assert firsts != sorted(firsts)  # batches still shuffled


def test_demo_llm_pretraining_scores_only_the_completion():
    """Prompt and padding positions are -100; completion and eos carry their ids, at their own positions
    (the model shifts labels itself)."""
    batch = pretraining_batch([([10, 11, 12, 20, 21, 2], 3), ([13, 22, 2], 1)], pad_id=3)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21, 2], [13, 22, 2, 3, 3, 3]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 20, 21, 2], [-100, 22, 2, -100, -100, -100]]
    model = BloomForCausalLM(BloomConfig(vocab_size=32, hidden_size=16, n_layer=1, n_head=2))
    logits = model(**batch).logits
    # The loss is the mean NLL of exactly the 5 completion tokens, each predicted from the position before it.
    nll = torch.nn.functional.cross_entropy(
        torch.stack([logits[0, 2], logits[0, 3], logits[0, 4], logits[1, 0], logits[1, 1]]),
        torch.tensor([20, 21, 2, 22, 2]),
    )
    assert torch.allclose(model(**batch).loss, nll)


def test_template_translations_answer_in_the_language_the_template_asks_for():
    """A template that names two languages ("A text in English: ... The same text in German:", "from German
    to English") asks for the one it names last: the demo LLM's answer is the sentence in that language."""
    names = {col: language_name(col) for col in LANGUAGES}
    assert _template_target("A text in English: ", "\nThe same text in German:", names) == "de"
    assert _template_target("Translate the following text from German to English\n", "\n", names) == "en"
    assert (
        _template_target("", " The previous text is in French. Here is a translation to Italian:", names)
        == "it"
    )
    assert _template_target("Say this sentence again: ", "\n", names) is None
    bank = sum(_template_target(p, q, names) is not None for p, q in builtin_templates())
    examples = instruction_examples(0.5, "Repeat: ", ". ", "From {language}:\n", "\n", bank, 0, " ", 0)
    sentences = {col: {" " + row[col] for row in demo_sentences(None)} for col in LANGUAGES}
    column = {name: col for col, name in names.items()}
    asked = re.compile(r"(?:^Translate the following text from \w+ to (\w+)\n|(?:in|to) (\w+):$)")
    checked = 0
    for example in examples:
        if match := asked.search(example.prompt):
            assert example.completion in sentences[column[match[1] or match[2]]], example
            checked += 1
    assert checked == 52 * len(LANGUAGES) * len(demo_sentences(None))  # every template names its target
    with pytest.raises(ValueError, match=r"llm_pretrain\.templates_per_sentence=53 exceeds the 52"):
        instruction_examples(0.5, "Repeat: ", ". ", "From {language}:\n", "\n", bank + 1, 0, " ", 0)


def test_a_missing_tts_voice_names_the_config_key(tmp_path):
    """Every spoken set checks its languages' voices before voicing anything (SpeechXNLI's codes are
    short)."""
    voices = {"en": "en-us", "de": "de"}
    with pytest.raises(ValueError, match=r"no TTS voice for 'fr' \(config key data\.tts\.voices\)"):
        build_speechxnli(tmp_path, ["en", "de", "fr"], voices, None, 16_000, 0.5, 1)
    with pytest.raises(ValueError, match=r"no TTS voice for 'en_us' \(config key data\.tts\.voices\)"):
        voice_for(voices, "en_us")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("seed", [0, 1])
def test_no_demo_sentence_is_in_two_splits_in_any_language(seed):
    """Written and composed sentences together: no text (raw or as the normalised CTC target) of one split
    appears in another, in any of the six languages."""
    rows = demo_sentences({**COUNTS, "seed": seed})
    for col in LANGUAGES:
        splits: dict[str, set[str]] = {}
        for row in rows:
            for text in (row[col], basic_normalize(row[col])):
                splits.setdefault(text, set()).add(row["split"])
        assert not {text: s for text, s in splits.items() if len(s) > 1}, col


def test_a_malformed_demo_table_names_the_file_and_line(tmp_path):
    table = tmp_path / "t.tsv"
    table.write_text("id\ten\n1\tone\n2\ttwo\textra\n3\t\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{table}:3: 3 fields, the header has 2"):
        read_tsv(table)
    table.write_text("id\ten\n1\tone\n\n3\t\n", encoding="utf-8")  # a blank line is still a line
    with pytest.raises(ValueError, match=rf"{table}:4: empty field\(s\) en"):
        read_tsv(table)
