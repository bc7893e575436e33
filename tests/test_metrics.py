"""Checks for text normalisation and the ASR, translation and classification metrics."""

from __future__ import annotations

import math
from itertools import islice
from pathlib import Path
from statistics import fmean

import jiwer
import pytest

from speechllm.evaluate import metrics
from speechllm.evaluate.metrics import (
    asr_scores,
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
    assert average["average"] == pytest.approx((0.2 + 0.8 + 0.5 + 0.1) / 4)
    assert average["average_without_wnli"] == pytest.approx((0.2 + 0.8 + 0.5) / 3)
    assert "wnli" not in average["tasks_without_wnli"]
    assert average["primary_metrics"]["stsb"] == "pearson"


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
    [("en", "13a"), ("en_us", "13a"), ("zh-CN", "zh"), ("cmn_hans_cn", "zh"), ("ja", "ja-mecab"),
     ("de_de", "13a")],
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
