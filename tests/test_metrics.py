"""Checks for text normalisation and the ASR, translation and classification metrics."""

from __future__ import annotations

import math
import random
from itertools import islice
from pathlib import Path
from statistics import fmean

import jiwer
import pytest
from rapidfuzz.distance import Levenshtein

from speechllm.evaluate import metrics
from speechllm.evaluate.alignment import EditCounts, sclite_counts
from speechllm.evaluate.metrics import (
    asr_scores,
    asr_scores_by_group,
    bertscore,
    bleu_tokenizer,
    classification_scores,
    glue_average,
    meteor,
    perplexity,
    primary_asr_metric,
    rouge_scores,
    translation_scores,
)
from speechllm.text.normalize import basic_normalize, normalizer_version

FLORES_ENG = Path("/work/shared/data/flores200/devtest/eng_Latn.devtest")


def test_basic_normalize_matches_whisper_basic() -> None:
    assert basic_normalize("  Hello, World! [noise] (aside) Ça va?  ") == "hello world ça va"
    assert basic_normalize("...") == ""
    assert basic_normalize("didn't") == "didn t"  # punctuation becomes a space


def test_normalizer_version_names_transformers() -> None:
    version = normalizer_version()
    assert version.startswith("transformers==")
    assert version.endswith("BasicTextNormalizer")


def test_cer_wer_hand_counted() -> None:
    # "abc de" vs "abd de": 1 substituted char out of 6 (the space counts), 1 of 2 words.
    scores = asr_scores(["abc de"], ["abd de"])
    assert scores["cer"] == pytest.approx(1 / 6)
    assert scores["wer"] == pytest.approx(1 / 2)
    assert (scores["ref_chars"], scores["ref_words"], scores["num_utts"]) == (6, 2, 1)
    assert scores["normalizer"] == normalizer_version()


def test_asr_normalises_both_sides() -> None:
    scores = asr_scores(["Hello, World!"], ["hello world"])
    assert scores["wer"] == 0.0
    assert scores["cer"] == 0.0


def test_corpus_level_differs_from_mean_of_rates() -> None:
    refs = ["a b c d e f g h i j", "k"]
    hyps = ["a b c d e f g h i j", "x"]
    mean_of_rates = fmean(jiwer.wer(r, h) for r, h in zip(refs, hyps, strict=True))
    scores = asr_scores(refs, hyps)
    assert scores["wer"] == pytest.approx(1 / 11)
    assert mean_of_rates == pytest.approx(0.5)
    assert scores["wer"] != pytest.approx(mean_of_rates)


def test_empty_reference_counts_insertions() -> None:
    scores = asr_scores(["", "a b"], ["x y", "a b"])
    assert scores["num_empty_refs"] == 1
    assert scores["word_insertions"] == 2
    assert scores["wer"] == pytest.approx(2 / 2)


def test_all_references_empty_gives_none() -> None:
    scores = asr_scores(["?!", ""], ["", "x"])
    assert scores["wer"] is None and scores["cer"] is None
    assert scores["num_empty_refs"] == 2
    empty = asr_scores([], [])
    assert empty["num_utts"] == 0 and empty["wer"] is None


def test_asr_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        asr_scores(["a", "b"], ["a"])


# sclite's alignment (config evaluate.asr_alignment: sclite; costs: substitution 4, insertion/deletion 3).


def test_sclite_alignment_trades_substitutions_for_more_insertions_and_deletions() -> None:
    # Unit cost: 5 substitutions. sclite: keep "x y" correct, 3 insertions + 3 deletions (18 < 20): 6 errors.
    assert sclite_counts(list("xyabc"), list("defxy")) == EditCounts(2, 0, 3, 3)
    assert Levenshtein.distance(list("xyabc"), list("defxy")) == 5
    default = asr_scores(["x y a b c"], ["d e f x y"])
    sclite = asr_scores(["x y a b c"], ["d e f x y"], "sclite")
    assert default["wer"] == pytest.approx(5 / 5) and default["alignment"] == "levenshtein"
    assert sclite["wer"] == pytest.approx(6 / 5) and sclite["alignment"] == "sclite"
    assert (sclite["word_substitutions"], sclite["word_deletions"], sclite["word_insertions"]) == (0, 3, 3)


def test_sclite_alignment_breaks_cost_ties_as_sclite() -> None:
    # Two alignments cost 15: 1 correct, 3 substitutions, 1 deletion (4 errors), and sclite's pick, which
    # ends on a diagonal move and so keeps "b" and "c" correct: 3 deletions, 2 insertions (5 errors).
    assert sclite_counts(list("aaabc"), list("bccb")) == EditCounts(2, 0, 3, 2)
    assert Levenshtein.distance(list("aaabc"), list("bccb")) == 4


def test_sclite_cer_counts_the_space_as_a_character() -> None:
    # ESPnet's char-level trn writes the space as `<space>`: a token like any other character.
    scores = asr_scores(["ab cd"], ["abcd"], "sclite")
    assert (scores["ref_chars"], scores["char_deletions"], scores["cer"]) == (5, 1, pytest.approx(1 / 5))
    chars = asr_scores(["xyabc"], ["defxy"], "sclite")
    assert chars["cer"] == pytest.approx(6 / 5)
    assert asr_scores(["xyabc"], ["defxy"])["cer"] == pytest.approx(5 / 5)


def test_sclite_alignment_has_minimum_weighted_cost_and_never_fewer_errors() -> None:
    """Against rapidfuzz's weighted distance (ins 3, del 3, sub 4) and its unit-cost distance."""
    rng = random.Random(0)
    for _ in range(500):
        ref = rng.choices("abcd", k=rng.randint(0, 10))
        hyp = rng.choices("abcd", k=rng.randint(0, 10))
        counts = sclite_counts(ref, hyp)
        cost = 4 * counts.substitutions + 3 * (counts.deletions + counts.insertions)
        assert cost == Levenshtein.distance(ref, hyp, weights=(3, 3, 4))
        assert counts.errors >= Levenshtein.distance(ref, hyp)
        assert (counts.reference_length, counts.hits + counts.substitutions + counts.insertions) == (
            len(ref),
            len(hyp),
        )


def test_sclite_alignment_of_empty_sides() -> None:
    assert sclite_counts([], []) == EditCounts()
    assert sclite_counts([], ["a", "b"]) == EditCounts(insertions=2)
    assert sclite_counts(["a", "b"], []) == EditCounts(deletions=2)
    scores = asr_scores(["", "a b"], ["x y", ""], "sclite")
    assert (scores["word_insertions"], scores["word_deletions"], scores["wer"]) == (2, 2, pytest.approx(2.0))


@pytest.mark.parametrize("alignment", ["levenshtein", "sclite"])
def test_grouped_asr_scores_align_once_and_equal_separate_scoring(alignment, monkeypatch) -> None:
    refs = ["x y a b c", "Hello, world", "", "a b c d", "kot pies"]
    hyps = ["d e f x y", "hello word", "extra", "a c d e", "kot"]
    groups = ["en", "en", "de", "de", "pl"]
    separate = {
        g: asr_scores(
            [r for r, k in zip(refs, groups, strict=True) if k == g],
            [h for h, k in zip(hyps, groups, strict=True) if k == g],
            alignment,
        )
        for g in sorted(set(groups))
    }
    calls = []
    counts = metrics.sclite_counts
    monkeypatch.setattr(metrics, "sclite_counts", lambda r, h: calls.append((r, h)) or counts(r, h))
    pooled, per_group = asr_scores_by_group(refs, hyps, groups, alignment)
    # grouped scoring aligned each utterance once: words and characters, one call each
    assert len(calls) == (2 * len(refs) if alignment == "sclite" else 0)
    assert pooled == asr_scores(refs, hyps, alignment)
    assert list(per_group) == ["de", "en", "pl"] and per_group == separate
    assert sum(scores["num_utts"] for scores in per_group.values()) == pooled["num_utts"] == 5
    with pytest.raises(ValueError, match="5 references but 4 group labels"):
        asr_scores_by_group(refs, hyps, groups[:4], alignment)


def test_unknown_asr_alignment_names_the_config_key() -> None:
    with pytest.raises(ValueError, match="evaluate.asr_alignment"):
        asr_scores(["a"], ["a"], "weighted")


@pytest.mark.parametrize(
    ("language", "metric"),
    [
        ("cmn_hans_cn", "cer"),
        ("yue_hant_hk", "cer"),
        ("ja_jp", "cer"),
        ("th_th", "cer"),
        ("lo_la", "cer"),
        ("my_mm", "cer"),
        ("zh", "cer"),
        ("zh-CN", "cer"),
        ("ja", "cer"),
        ("de_de", "wer"),
        ("en_us", "wer"),
        ("mn_mn", "wer"),
        ("hi_in", "wer"),
    ],
)
def test_primary_asr_metric(language: str, metric: str) -> None:
    assert primary_asr_metric(language) == metric


def test_bleu_identical_is_100_with_13a_signature() -> None:
    text = ["The quick brown fox jumps over the lazy dog."]
    scores = translation_scores(text, text, normalize=False)
    assert scores["bleu"] == pytest.approx(100.0)
    assert scores["chrf"] == pytest.approx(100.0)
    assert "tok:13a" in scores["bleu_signature"]
    assert "case:mixed" in scores["bleu_signature"]
    assert "nc:6" in scores["chrf_signature"]
    assert scores["normalizer"] is None


def test_bleu_tokenizer_override_in_signature() -> None:
    scores = translation_scores(
        ["我们今天去公园散步"], ["我们今天去公园散步"], normalize=False, tokenize="zh"
    )
    assert "tok:zh" in scores["bleu_signature"]
    assert scores["bleu"] == pytest.approx(100.0)


def test_normalising_both_sides_changes_bleu() -> None:
    refs = ["The cat sat on the mat, didn't it?"]
    hyps = ["the cat sat on the mat didn't it"]
    raw = translation_scores(refs, hyps, normalize=False)
    both = translation_scores(refs, hyps, normalize=True)
    assert raw["bleu"] < 50.0
    assert both["bleu"] == pytest.approx(100.0)
    assert both["normalizer"] == normalizer_version()
    # The reference script normalised only the refs: a cased, punctuated hyp then loses points.
    refs_only = translation_scores([basic_normalize(r) for r in refs], refs, normalize=False)
    assert refs_only["bleu"] < both["bleu"]
    # ... which is what normalize_hypotheses=False (evaluate.st_normalize: references) computes.
    as_reference = translation_scores(refs, refs, normalize=True, normalize_hypotheses=False)
    assert as_reference["bleu"] == pytest.approx(refs_only["bleu"])
    assert (as_reference["normalized"], both["normalized"], raw["normalized"]) == (
        "references",
        "both",
        "none",
    )


def test_st_normalize_switch_selects_the_reference_scoring() -> None:
    import pandas as pd

    from speechllm.evaluate.benchmarks import score_st
    from speechllm.evaluate.settings import Prompt, StSettings

    df = pd.DataFrame(
        {
            "language": ["de_de"],
            "target_language": ["en_us"],
            "reference": ["The cat sat on the mat, didn't it?"],
            "hypothesis": ["The cat sat on the mat, didn't it?"],
        }
    )

    def settings(st_normalize: str) -> StSettings:
        return StSettings(
            batch_size=1,
            num_beams=1,
            max_new_tokens=8,
            st_prompt=Prompt("", ""),
            bleu_tokenize={"default": "13a"},
            st_normalize=st_normalize,
        )

    assert score_st(df, settings("both"))["all"]["bleu"] == pytest.approx(100.0)
    assert score_st(df, settings("references"))["all"]["bleu"] < 50.0
    with pytest.raises(ValueError, match="evaluate.st_normalize"):
        score_st(df, settings("hypotheses"))


def test_translation_length_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        translation_scores(["a"], [], normalize=True)


def test_cola_matthews() -> None:
    # TP=1, TN=2, FP=0, FN=1: (1*2 - 0*1) / sqrt(1*2*2*3) = 2 / sqrt(12)
    scores = classification_scores("cola", [1, 1, 0, 0], [1, 0, 0, 0])
    assert scores["matthews_correlation"] == pytest.approx(2 / math.sqrt(12))
    assert scores["num_examples"] == 4


def test_accuracy_tasks() -> None:
    assert classification_scores("sst2", [1, 0, 1, 1], [1, 1, 1, 0])["accuracy"] == pytest.approx(0.5)
    xnli = classification_scores("xnli", [0, 1, 2, 2, 1], [0, 1, 2, 0, 0])
    assert xnli["accuracy"] == pytest.approx(0.6)
    assert set(classification_scores("mnli_matched", [0], [0])) == {"accuracy", "num_examples"}


def test_mrpc_accuracy_and_f1() -> None:
    # TP=2, FN=1, FP=0: precision 1, recall 2/3, F1 0.8
    scores = classification_scores("mrpc", [1, 1, 1, 0], [1, 1, 0, 0])
    assert scores["accuracy"] == pytest.approx(0.75)
    assert scores["f1"] == pytest.approx(0.8)


def test_stsb_pearson_spearman() -> None:
    labels = [0.0, 1.0, 2.0, 3.0]
    linear = classification_scores("stsb", labels, [0.0, 2.0, 4.0, 6.0])
    assert linear["pearson"] == pytest.approx(1.0)
    assert linear["spearmanr"] == pytest.approx(1.0)
    monotone = classification_scores("stsb", labels, ["0", "1", "8", "27"])
    assert monotone["spearmanr"] == pytest.approx(1.0)
    assert monotone["pearson"] < 0.99
    assert classification_scores("stsb", labels, [3, 2, 1, 0])["pearson"] == pytest.approx(-1.0)


def test_unknown_task_raises_with_name() -> None:
    with pytest.raises(ValueError, match="'foo'"):
        classification_scores("foo", [0], [0])


def test_glue_average_excludes_wnli() -> None:
    scores = {
        "cola": {"matthews_correlation": 0.2},
        "sst2": {"accuracy": 0.8},
        "stsb": {"pearson": 0.5, "spearmanr": 0.1},
        "wnli": {"accuracy": 0.1},
    }
    average = glue_average(scores)
    assert average["average"] == pytest.approx((0.2 + 0.8 + 0.1) / 3)
    assert average["average_without_wnli"] == pytest.approx((0.2 + 0.8) / 2)
    assert "wnli" not in average["tasks_without_wnli"]


def test_glue_average_leaves_out_stsb_as_the_reference() -> None:
    """speechglue_evaluate.py's "Avg." has no STS-B; a constant STS-B answer (NaN Pearson) cannot void it."""
    scores = {"cola": {"matthews_correlation": 0.2}, "rte": {"accuracy": 0.6}}
    for pearson in (0.9, math.nan):
        average = glue_average({**scores, "stsb": {"pearson": pearson, "spearmanr": pearson}})
        assert average["average"] == pytest.approx(0.4)
        assert average["average_without_wnli"] == pytest.approx(0.4)
        assert "stsb" not in average["tasks"] and "stsb" not in average["tasks_without_wnli"]
    assert glue_average({"stsb": {"pearson": 0.9}})["average"] is None


def test_glue_average_unknown_task_raises() -> None:
    with pytest.raises(ValueError, match="bogus"):
        glue_average({"bogus": {"accuracy": 1.0}})


@pytest.mark.skipif(not FLORES_ENG.is_file(), reason=f"FLORES-200 devtest not available at {FLORES_ENG}")
def test_flores_refs_against_themselves() -> None:
    with FLORES_ENG.open(encoding="utf-8") as handle:
        refs = [line.rstrip("\n") for line in islice(handle, 20)]
    assert len(refs) == 20
    identical = translation_scores(refs, refs, normalize=False)
    assert identical["bleu"] == pytest.approx(100.0)
    # Light corruption: drop the last word of every other sentence.
    corrupted = [" ".join(r.split()[:-1]) if i % 2 else r for i, r in enumerate(refs)]
    light = translation_scores(refs, corrupted, normalize=False)
    assert 70.0 < light["bleu"] < 100.0
    assert 80.0 < light["chrf"] < 100.0
    lowered = [r.lower() for r in refs]
    assert translation_scores(refs, lowered, normalize=False)["bleu"] < 100.0
    assert translation_scores(refs, lowered, normalize=True)["bleu"] == pytest.approx(100.0)


BLEU_TABLE = {"default": "13a", "zh": "zh", "cmn": "zh", "ja": "ja-mecab"}


@pytest.mark.parametrize(
    ("target", "tokenizer"),
    [
        ("en", "13a"),
        ("en_us", "13a"),
        ("zh-CN", "zh"),
        ("cmn_hans_cn", "zh"),
        ("ja", "ja-mecab"),
        ("de_de", "13a"),
    ],
)
def test_bleu_tokenizer_by_target_language(target: str, tokenizer: str) -> None:
    assert bleu_tokenizer(target, BLEU_TABLE) == tokenizer


def test_bleu_tokenizer_needs_a_default() -> None:
    with pytest.raises(ValueError, match="evaluate.bleu_tokenize"):
        bleu_tokenizer("en", {"zh": "zh"})


def test_rouge_hand_counted() -> None:
    # ref "the cat sat", hyp "the cat ran": unigram P = R = 2/3; bigram "the cat" 1 of 2; LCS 2 of 3.
    scores = rouge_scores(["the cat sat", "a b"], ["the cat ran", "a b"], use_stemmer=False)
    assert scores["rouge1"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert scores["rouge2"] == pytest.approx((1 / 2 + 1.0) / 2)
    assert scores["rougeL"] == pytest.approx((2 / 3 + 1.0) / 2)
    assert scores["rouge_stemmer"] is False
    stemmed = rouge_scores(["the cats sat"], ["the cat sat"], use_stemmer=True)
    assert stemmed["rouge1"] == pytest.approx(1.0)


def test_meteor_is_skipped_with_a_reason_without_wordnet(monkeypatch) -> None:
    monkeypatch.setattr(metrics, "wordnet_available", lambda: False)
    result = meteor(["the cat sat"], ["the cat sat"])
    assert result["meteor"] is None and "never downloaded" in result["meteor_skipped"]


class NoSynonyms:
    """A WordNet stand-in without synsets: METEOR's exact and stem stages only (no WordNet data offline)."""

    @staticmethod
    def synsets(word: str) -> list:
        return []


@pytest.fixture()
def punkt_english(tmp_path, monkeypatch) -> Path:
    """A locally written English `punkt_tab` model with no learnt abbreviations or collocations (nltk's
    sentence splitter then breaks at every sentence-final period), on nltk's data path."""
    import nltk
    from nltk.tokenize import _get_punkt_tokenizer

    model = tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    model.mkdir(parents=True)
    for name in ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab"):
        (model / name).write_text("")
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "nltk_data")])
    _get_punkt_tokenizer.cache_clear()
    yield model
    _get_punkt_tokenizer.cache_clear()


def test_meteor_tokenises_with_word_tokenize_as_hf_evaluate(punkt_english) -> None:
    from nltk.tokenize import word_tokenize
    from nltk.translate.meteor_score import single_meteor_score

    refs = ["It rained. Two roads closed.", "The council approved a park."]
    hyps = ["It rained . Two roads closed .", "The council approved a new park."]
    # sentence splitting (the Punkt data) separates the period from "rained"
    assert word_tokenize(refs[0]) == ["It", "rained", ".", "Two", "roads", "closed", "."]
    # HF evaluate's meteor: single_meteor_score(word_tokenize(ref), word_tokenize(pred), 0.9, 3, 0.5), then a
    # mean
    expected = fmean(
        single_meteor_score(
            word_tokenize(r), word_tokenize(h), wordnet=NoSynonyms(), alpha=0.9, beta=3, gamma=0.5
        )
        for r, h in zip(refs, hyps, strict=True)
    )
    tokenised = meteor(refs, hyps, "word_tokenize", wordnet=NoSynonyms())
    assert tokenised["meteor"] == pytest.approx(expected) and tokenised["meteor_tokenize"] == "word_tokenize"
    by_space = meteor(refs, hyps, "whitespace", wordnet=NoSynonyms())
    assert by_space["meteor"] < tokenised["meteor"] - 0.05  # "rained." / "closed." do not match "rained", "."


def test_meteor_without_punkt_data_is_skipped_with_a_reason(tmp_path, monkeypatch) -> None:
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    result = meteor(["the cat sat."], ["the cat sat."], "word_tokenize", wordnet=NoSynonyms())
    assert result["meteor"] is None and "punkt_tab" in result["meteor_skipped"]
    assert "meteor_tokenize: whitespace" in result["meteor_skipped"]
    assert meteor(["the cat sat."], ["the cat sat."], "whitespace", wordnet=NoSynonyms())["meteor"] > 0.9
    with pytest.raises(ValueError, match="evaluate.summarization.meteor_tokenize"):
        meteor(["a"], ["a"], "spacy")


BERTSCORE = {
    "model": None,
    "num_layers": 2,
    "lang": "en",
    "idf": False,
    "rescale_with_baseline": False,
    "baseline_path": None,
    "batch_size": 2,
}


def _hand_bertscore(model_dir: Path, layer: int, ref: str, hyp: str) -> tuple[float, float, float]:
    """BERTScore as bert-score defines it: each token's best cosine match among the other text's token
    embeddings at the layer (<s> and </s> included as candidates), averaged over the text's own tokens without
    <s> and </s>: precision over the hypothesis, recall over the reference, F1 their harmonic mean."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()

    def embed(text: str) -> torch.Tensor:
        ids = tokenizer.encode(text, add_special_tokens=True, add_prefix_space=True)
        with torch.no_grad():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer][0]
        return torch.nn.functional.normalize(hidden, dim=-1)

    sim = embed(hyp) @ embed(ref).T
    precision = float(sim.max(dim=1).values[1:-1].mean())
    recall = float(sim.max(dim=0).values[1:-1].mean())
    return precision, recall, 2 * precision * recall / (precision + recall)


def test_bertscore_matches_its_definition_on_a_local_model(tiny_bertscore_model) -> None:
    refs = ["The council approved a new park on Monday.", "Heavy rain closed two roads."]
    hyps = ["The council approved a park.", "A local team won the cup."]
    cfg = {**BERTSCORE, "model": str(tiny_bertscore_model)}
    scores = bertscore(refs, hyps, cfg)
    hand = [_hand_bertscore(tiny_bertscore_model, 2, r, h) for r, h in zip(refs, hyps, strict=True)]
    for i, part in enumerate(("precision", "recall", "f1")):
        assert scores[f"bertscore_{part}"] == pytest.approx(fmean(h[i] for h in hand), abs=1e-5)
    assert scores["bertscore_num_layers"] == 2 and scores["bertscore_rescaled"] is False
    assert "_L2_no-idf" in scores["bertscore_signature"]
    layer1 = bertscore(refs, hyps, {**cfg, "num_layers": 1})
    assert layer1["bertscore_f1"] != pytest.approx(scores["bertscore_f1"])


def test_bertscore_rescales_only_when_configured(tiny_bertscore_model, tmp_path) -> None:
    refs, hyps = ["Heavy rain closed two roads."], ["Rain closed roads."]
    cfg = {**BERTSCORE, "model": str(tiny_bertscore_model)}
    raw = bertscore(refs, hyps, cfg)
    baseline = tmp_path / "baseline.tsv"  # bert-score's format: one row per layer, columns LAYER,P,R,F
    baseline.write_text("LAYER,P,R,F\n0,0.1,0.1,0.1\n1,0.2,0.2,0.2\n2,0.5,0.4,0.3\n3,0.1,0.1,0.1\n")
    rescaled = bertscore(refs, hyps, {**cfg, "rescale_with_baseline": True, "baseline_path": str(baseline)})
    for part, b in (("precision", 0.5), ("recall", 0.4), ("f1", 0.3)):
        expected = (raw[f"bertscore_{part}"] - b) / (1 - b)
        assert rescaled[f"bertscore_{part}"] == pytest.approx(expected, abs=1e-6)
    assert rescaled["bertscore_rescaled"] is True


def test_bertscore_without_a_model_is_skipped_and_a_bad_model_names_the_key(tmp_path) -> None:
    skipped = bertscore(["a"], ["a"], BERTSCORE)
    assert skipped["bertscore_f1"] is None and "bertscore.model" in skipped["bertscore_skipped"]
    with pytest.raises(ValueError, match="evaluate.summarization.bertscore.model"):
        bertscore(["a"], ["a"], {**BERTSCORE, "model": str(tmp_path / "missing")})


def test_perplexity_per_utterance_mean_and_token_level() -> None:
    # two utterances: mean NLL 1.0 over 2 tokens and 3.0 over 1 token
    result = perplexity([2.0, 3.0], [2, 1])
    assert result["ppl"] == pytest.approx(math.exp((1.0 + 3.0) / 2))
    assert result["ppl_token"] == pytest.approx(math.exp(5.0 / 3))
    assert (result["num_utts"], result["num_tokens"]) == (2, 3)
    assert perplexity([], [])["ppl"] is None


def test_unavailable_bleu_tokenizer_names_the_config_key(monkeypatch) -> None:
    import sacrebleu

    def broken(*args, **kwargs):
        raise ImportError("MeCab not installed")

    monkeypatch.setattr(sacrebleu.metrics, "BLEU", broken)
    with pytest.raises(ValueError, match="evaluate.bleu_tokenize"):
        translation_scores(["a"], ["a"], normalize=False, tokenize="ja-mecab")
