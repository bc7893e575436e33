"""Scoring for ASR (CER/WER), speech translation (BLEU/chrF) and SpeechGLUE/SpeechXNLI.

Conventions (spec bloomzmms.md §5, ecosystem.md §C):

* ASR: ``basic_normalize`` on references *and* hypotheses, then corpus-level rates
  (total edits / total reference tokens, as sclite), never a mean of per-utterance rates.
  CER counts the space between words as a character (ESPnet's ``<space>`` token). The edits are those of
  the minimum-edit alignment (jiwer) or of sclite's weighted one (config evaluate.asr_alignment,
  evaluate/alignment.py).
* Translation: sacreBLEU corpus BLEU and chrF with default settings (13a, cased) unless told.
* Classification: the metrics of HF ``evaluate.load("glue", task)``, with the same key names.

Rates and correlations are fractions (0.41 = 41 %); BLEU and chrF are on sacreBLEU's 0-100 scale.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from statistics import fmean
from typing import Any, Literal

import jiwer
import sacrebleu

from speechllm.evaluate.alignment import EditCounts, sclite_counts
from speechllm.settings import config_choice
from speechllm.text.normalize import basic_normalize, normalizer_version

ASR_ALIGNMENTS = ("levenshtein", "sclite")  # config evaluate.asr_alignment

CER_PRIMARY_LANGUAGES: frozenset[str] = frozenset(
    {"zh", "ja", "th", "lo", "my", "cmn_hans_cn", "yue_hant_hk", "ja_jp", "th_th", "lo_la", "my_mm"}
)

ACCURACY_TASKS: frozenset[str] = frozenset(
    {"sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli", "xnli"}
)
ACCURACY_F1_TASKS: frozenset[str] = frozenset({"mrpc", "qqp"})
KNOWN_TASKS: frozenset[str] = ACCURACY_TASKS | ACCURACY_F1_TASKS | {"cola", "stsb"}

# One figure per task for averages and tables. MRPC/QQP use accuracy and STS-B uses Pearson, as in
# the BLOOMZMMS evaluation (accuracy for MRPC/QQP), not the GLUE leaderboard's metric means.
GLUE_PRIMARY_METRIC: dict[str, str] = {
    "cola": "matthews_correlation",
    "stsb": "pearson",
    **{task: "accuracy" for task in sorted(ACCURACY_TASKS | ACCURACY_F1_TASKS)},
}


# Scored per task but left out of the GLUE averages (the reference's "Avg." has no STS-B).
NOT_AVERAGED: frozenset[str] = frozenset({"stsb"})


def _check_lengths(refs: Sequence[Any], hyps: Sequence[Any]) -> None:
    """Raise ValueError unless references and hypotheses pair up one-to-one."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")


def primary_asr_metric(language: str) -> Literal["cer", "wer"]:
    """Return ``"cer"`` for languages written without word spaces (zh, ja, th, lo, my), else ``"wer"``.

    Matches the full code (``ja_jp``, ``cmn_hans_cn``) or its first ``_``/``-`` part (``zh-CN``).
    """
    code = language.strip().lower()
    if code in CER_PRIMARY_LANGUAGES or re.split(r"[_-]", code)[0] in CER_PRIMARY_LANGUAGES:
        return "cer"
    return "wer"


def _rate(edits: int, length: int) -> float | None:
    """Error rate, or None when the reference side is empty."""
    return edits / length if length else None


def _chunk_counts(chunks: Sequence[jiwer.AlignmentChunk]) -> EditCounts:
    """Counts of one utterance's jiwer alignment."""
    spans = {"equal": 0, "substitute": 0, "delete": 0, "insert": 0}
    for chunk in chunks:
        if chunk.type == "insert":
            spans["insert"] += chunk.hyp_end_idx - chunk.hyp_start_idx
        else:
            spans[chunk.type] += chunk.ref_end_idx - chunk.ref_start_idx
    return EditCounts(spans["equal"], spans["substitute"], spans["delete"], spans["insert"])


def check_asr_alignment(alignment: str) -> str:
    """`alignment` if it is one of ASR_ALIGNMENTS, else ValueError naming the config key."""
    return config_choice(alignment, ASR_ALIGNMENTS, "evaluate.asr_alignment")


def utterance_edit_counts(
    norm_refs: list[str], norm_hyps: list[str], alignment: str
) -> list[tuple[EditCounts, EditCounts]]:
    """Word and character counts of each normalised utterance, aligned by `alignment` (levenshtein |
    sclite). Both split as jiwer does: words at spaces, characters with the space as one (on normalised text,
    whose whitespace is single spaces and stripped, that is ESPnet's `<space>` token of sclite's CER)."""
    if check_asr_alignment(alignment) == "levenshtein":
        if not norm_refs:
            return []
        words = jiwer.process_words(norm_refs, norm_hyps).alignments
        chars = jiwer.process_characters(norm_refs, norm_hyps).alignments
        return [(_chunk_counts(w), _chunk_counts(c)) for w, c in zip(words, chars, strict=True)]
    return [
        (sclite_counts(ref.split(), hyp.split()), sclite_counts(list(ref), list(hyp)))
        for ref, hyp in zip(norm_refs, norm_hyps, strict=True)
    ]


def _scores(
    counts: Sequence[tuple[EditCounts, EditCounts]], norm_refs: Sequence[str], alignment: str
) -> dict[str, Any]:
    words = sum((w for w, _ in counts), EditCounts())
    chars = sum((c for _, c in counts), EditCounts())
    return {
        "cer": _rate(chars.errors, chars.reference_length),
        "wer": _rate(words.errors, words.reference_length),
        "num_utts": len(norm_refs),
        "num_empty_refs": sum(1 for text in norm_refs if not text),
        "ref_words": words.reference_length,
        "ref_chars": chars.reference_length,
        "word_substitutions": words.substitutions,
        "word_deletions": words.deletions,
        "word_insertions": words.insertions,
        "char_substitutions": chars.substitutions,
        "char_deletions": chars.deletions,
        "char_insertions": chars.insertions,
        "alignment": alignment,
        "normalizer": normalizer_version(),
    }


def asr_scores_by_group(
    refs: list[str], hyps: list[str], groups: Sequence[str], alignment: str = "levenshtein"
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """`asr_scores` of all utterances and of each group's (e.g. each language's), in sorted group order,
    from one alignment per utterance (sclite's costs ~7x jiwer's, so aligning twice would show)."""
    _check_lengths(refs, hyps)
    if len(groups) != len(refs):
        raise ValueError(f"{len(refs)} references but {len(groups)} group labels")
    norm_refs = [basic_normalize(text) for text in refs]
    counts = utterance_edit_counts(norm_refs, [basic_normalize(text) for text in hyps], alignment)
    members: dict[str, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    per_group = {
        group: _scores([counts[i] for i in idx], [norm_refs[i] for i in idx], alignment)
        for group, idx in sorted(members.items())
    }
    return _scores(counts, norm_refs, alignment), per_group


def asr_scores(refs: list[str], hyps: list[str], alignment: str = "levenshtein") -> dict[str, Any]:
    """Corpus-level CER and WER after ``basic_normalize`` on both sides, with counts.

    `alignment` (config evaluate.asr_alignment) picks the per-utterance alignment whose edits are counted:
    ``levenshtein``, the minimum number of edits (jiwer), or ``sclite``, NIST sclite's minimum weighted cost
    (evaluate/alignment.py); the score records it as ``alignment``.
    Empty references (also those that normalise to "") are kept, as sclite does: every hypothesis
    token counts as an insertion and the reference adds 0 to the denominator. ``num_empty_refs``
    reports how many there were. If the total reference length is 0, ``cer``/``wer`` are None.
    """
    return asr_scores_by_group(refs, hyps, [""] * len(refs), alignment)[0]


def translation_scores(
    refs: list[str],
    hyps: list[str],
    normalize: bool,
    tokenize: str | None = None,
    normalize_hypotheses: bool = True,
) -> dict[str, Any]:
    """sacreBLEU corpus BLEU and chrF (one reference per segment) with their signatures.

    ``normalize`` applies ``basic_normalize`` to the references and, with ``normalize_hypotheses``, to the
    hypotheses too (BLOOMZMMS's scoring normalised only the references: config evaluate.st_normalize).
    ``tokenize`` overrides BLEU's tokeniser (e.g. ``"zh"``, ``"ja-mecab"`` for CJK targets); None keeps
    sacreBLEU's default (13a).
    """
    _check_lengths(refs, hyps)
    if normalize:
        refs = [basic_normalize(text) for text in refs]
        if normalize_hypotheses:
            hyps = [basic_normalize(text) for text in hyps]
    try:
        bleu = sacrebleu.metrics.BLEU(tokenize=tokenize)
    except (ImportError, RuntimeError, KeyError, ValueError) as err:
        raise ValueError(
            f"sacreBLEU tokenizer {tokenize!r} is unavailable ({err}); install its extra (e.g. "
            "sacrebleu[ja] for ja-mecab) or change config key evaluate.bleu_tokenize"
        ) from err
    chrf = sacrebleu.metrics.CHRF()
    bleu_score = bleu.corpus_score(hyps, [refs])
    chrf_score = chrf.corpus_score(hyps, [refs])
    return {
        "bleu": bleu_score.score,
        "chrf": chrf_score.score,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
        "num_segments": len(refs),
        "normalized": ("both" if normalize_hypotheses else "references") if normalize else "none",
        "normalizer": normalizer_version() if normalize else None,
    }


def bleu_tokenizer(target_language: str, table: Mapping[str, str]) -> str:
    """sacreBLEU tokeniser for a target language: `table[code]` for the code's first ``_``/``-`` part (``zh``
    for ``zh-CN``, ``cmn`` for ``cmn_hans_cn``), else ``table["default"]`` (13a for English and most
    targets)."""
    if "default" not in table:
        raise ValueError("config key evaluate.bleu_tokenize needs a 'default' entry (13a)")
    code = target_language.strip().lower()
    short = re.split(r"[_-]", code)[0]
    return table.get(code, table.get(short, table["default"]))


def classification_scores(task: str, labels: Sequence[Any], preds: Sequence[Any]) -> dict[str, Any]:
    """GLUE/XNLI metrics with HF ``evaluate`` key names.

    cola: ``matthews_correlation``; sst2, mnli(_matched/_mismatched), qnli, rte, wnli, xnli:
    ``accuracy``; mrpc, qqp: ``accuracy`` and ``f1`` (positive class 1); stsb: ``pearson`` and
    ``spearmanr`` on floats (NaN if either side is constant). Predictions must already be mapped
    to label ids (BLOOMZMMS maps an unmatched answer to class 0).
    """
    # Imported here: scipy and scikit-learn take half a second, which jobs that only read scores (tables,
    # plots) should not pay.
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    _check_lengths(labels, preds)
    if task not in KNOWN_TASKS:
        raise ValueError(f"unknown classification task {task!r}; expected one of {sorted(KNOWN_TASKS)}")
    if not labels:
        raise ValueError(f"no examples to score for task {task!r}")
    scores: dict[str, Any] = {"num_examples": len(labels)}
    if task == "cola":
        scores["matthews_correlation"] = float(matthews_corrcoef(labels, preds))
    elif task == "stsb":
        gold = [float(x) for x in labels]
        pred = [float(x) for x in preds]
        scores["pearson"] = float(pearsonr(gold, pred).statistic)
        scores["spearmanr"] = float(spearmanr(gold, pred).statistic)
    else:
        scores["accuracy"] = float(accuracy_score(labels, preds))
        if task in ACCURACY_F1_TASKS:
            scores["f1"] = float(f1_score(labels, preds, pos_label=1, zero_division=0.0))
    return scores


def glue_average(task_scores: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Mean of each task's primary metric (``GLUE_PRIMARY_METRIC``), with and without WNLI.

    Averages over the tasks given except STS-B (``NOT_AVERAGED``): the reference's "Avg." is the mean over
    cola, sst2, mrpc, qqp, mnli_matched, mnli_mismatched, qnli, rte and wnli, and STS-B, though inferred, is
    not among its scored tasks (DigitalPhonetics/bloomzmms@77dc192:
    espnet-bloomzmms-files/egs2/fleurs/asr1/local/speechglue_evaluate.py). Its Pearson is reported per task.
    The WNLI exclusion really drops the ``wnli`` task (the reference code compared a metric name to "wnli",
    so its "without WNLI" figure still included it). Means of no tasks are None.
    """
    unknown = sorted(set(task_scores) - set(GLUE_PRIMARY_METRIC))
    if unknown:
        raise ValueError(f"no primary metric for task(s) {unknown}")
    primary = {
        task: float(scores[GLUE_PRIMARY_METRIC[task]])
        for task, scores in task_scores.items()
        if task not in NOT_AVERAGED
    }
    without_wnli = {task: value for task, value in primary.items() if task != "wnli"}
    return {
        "average": fmean(primary.values()) if primary else None,
        "average_without_wnli": fmean(without_wnli.values()) if without_wnli else None,
        "tasks": sorted(primary),
        "tasks_without_wnli": sorted(without_wnli),
        "primary_metrics": {task: GLUE_PRIMARY_METRIC[task] for task in sorted(primary)},
    }


ROUGE_TYPES: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge_scores(refs: list[str], hyps: list[str], use_stemmer: bool) -> dict[str, Any]:
    """Mean ROUGE-1/2/L/Lsum F1 (Google's rouge-score, as HF `evaluate`'s "rouge"; rougeLsum splits on
    newlines).

    HF `evaluate` aggregates with a random bootstrap; the plain mean over documents is reported instead
    (deterministic, and what that bootstrap estimates). Values are fractions.
    """
    from rouge_score import rouge_scorer

    _check_lengths(refs, hyps)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    per_doc = [scorer.score(ref, hyp) for ref, hyp in zip(refs, hyps, strict=True)]
    scores: dict[str, Any] = {
        name: (fmean(doc[name].fmeasure for doc in per_doc) if per_doc else None) for name in ROUGE_TYPES
    }
    scores["rouge_stemmer"] = use_stemmer
    return scores


def _nltk_data_found(*resources: str) -> bool:
    """Whether any of nltk's data `resources` is installed locally; nothing is downloaded."""
    import nltk

    for resource in resources:
        try:
            nltk.data.find(resource)
            return True
        except LookupError:
            continue
    return False


def wordnet_available() -> bool:
    """Whether nltk's WordNet data (needed by METEOR) is installed locally; nothing is downloaded."""
    return _nltk_data_found("corpora/wordnet", "corpora/wordnet.zip")


def punkt_available() -> bool:
    """Whether nltk's English Punkt model (`word_tokenize` splits sentences with it) is installed locally."""
    return _nltk_data_found("tokenizers/punkt_tab/english/")


# METEOR's tokenisation: nltk `word_tokenize` (HF evaluate's "meteor", which Kang & Roy's evaluation used) or
# whitespace splitting. Config key evaluate.summarization.meteor_tokenize.
METEOR_TOKENIZERS: tuple[str, ...] = ("word_tokenize", "whitespace")


def meteor(
    refs: list[str], hyps: list[str], tokenize: str = "word_tokenize", wordnet: Any = None
) -> dict[str, Any]:
    """Mean METEOR over documents (nltk `single_meteor_score`, alpha 0.9, beta 3, gamma 0.5, as HF
    `evaluate`).

    Args:
        refs, hyps: one reference per hypothesis.
        tokenize: "word_tokenize" (needs nltk's Punkt data) or "whitespace" (`str.split`).
        wordnet: a WordNet reader for the synonym stage; None: nltk's WordNet data, which must be installed.

    Returns:
        {"meteor": mean, ...}, or {"meteor": None, "meteor_skipped": reason} when nltk data is missing (it is
        never downloaded at run time).
    """
    _check_lengths(refs, hyps)
    config_choice(tokenize, METEOR_TOKENIZERS, "evaluate.summarization.meteor_tokenize")
    import nltk

    if wordnet is None and not wordnet_available():
        return {
            "meteor": None,
            "meteor_skipped": "nltk WordNet data not found (run nltk.download('wordnet') "
            "ahead of time to score METEOR; it is never downloaded at run time)",
        }
    if tokenize == "word_tokenize" and not punkt_available():
        return {
            "meteor": None,
            "meteor_skipped": "nltk Punkt data for word_tokenize not found (run "
            "nltk.download('punkt_tab') ahead of time; it is never downloaded at run time), or set "
            "evaluate.summarization.meteor_tokenize: whitespace",
        }
    from nltk.tokenize import word_tokenize
    from nltk.translate.meteor_score import single_meteor_score

    split = word_tokenize if tokenize == "word_tokenize" else str.split
    kwargs = {} if wordnet is None else {"wordnet": wordnet}
    values = [
        single_meteor_score(split(ref), split(hyp), **kwargs) for ref, hyp in zip(refs, hyps, strict=True)
    ]
    return {
        "meteor": fmean(values) if values else None,
        "meteor_tokenize": tokenize,
        "meteor_version": f"nltk=={nltk.__version__}",
    }


BERTSCORE_PARTS: tuple[str, ...] = ("precision", "recall", "f1")


def bertscore(refs: list[str], hyps: list[str], cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Mean BERTScore precision, recall and F1 over documents (`bert-score`'s `BERTScorer`, which HF
    `evaluate`'s "bertscore" wraps; Kang & Roy's evaluation called it with lang="en": roberta-large, layer 17,
    no idf, no baseline rescaling).

    Args:
        refs, hyps: one reference per hypothesis.
        cfg: config `evaluate.summarization.bertscore`: `model` (hub id or local directory; null: not scored),
            `num_layers` (the layer whose embeddings are matched; null: bert-score's table for known hub ids),
            `lang`, `idf` (idf weights from the references, as `evaluate`), `rescale_with_baseline`,
            `baseline_path` (null: the baseline bert-score ships for `lang` and `model`), `batch_size`.

    Returns:
        {"bertscore_precision", "bertscore_recall", "bertscore_f1": means (fractions), the model, layer and
        bert-score's hash of the settings}, or {"bertscore_f1": None, "bertscore_skipped": reason}.
    """
    _check_lengths(refs, hyps)
    model = cfg.get("model")
    if not model:
        reason = "no scoring model: config key evaluate.summarization.bertscore.model is null"
        return {"bertscore_f1": None, "bertscore_skipped": reason}
    if not refs:
        return {f"bertscore_{part}": None for part in BERTSCORE_PARTS}
    try:
        import bert_score
    except ImportError as err:  # an optional extra: pip install 'speechllm[summarization]'
        raise ValueError(
            "BERTScore needs the bert-score package (pip install 'speechllm[summarization]'), or set "
            f"config key evaluate.summarization.bertscore.model to null to skip it: {err}"
        ) from err

    where = "config keys evaluate.summarization.bertscore.model / num_layers / baseline_path"
    try:
        scorer = bert_score.BERTScorer(
            model_type=str(model),
            num_layers=cfg.get("num_layers"),
            batch_size=int(cfg["batch_size"]),
            idf=bool(cfg["idf"]),
            idf_sents=list(refs) if cfg["idf"] else None,
            lang=cfg.get("lang"),
            rescale_with_baseline=bool(cfg["rescale_with_baseline"]),
            baseline_path=cfg.get("baseline_path"),
        )
        precision, recall, f1 = scorer.score(list(hyps), list(refs), batch_size=int(cfg["batch_size"]))
    except (OSError, KeyError, ValueError, AssertionError) as err:
        raise ValueError(f"BERTScore with model {model!r} failed ({where}): {err!r}") from err
    parts = zip(BERTSCORE_PARTS, (precision, recall, f1), strict=True)
    return {
        **{f"bertscore_{part}": float(values.mean()) for part, values in parts},
        "bertscore_model": str(model),
        "bertscore_num_layers": scorer.num_layers,
        "bertscore_rescaled": bool(cfg["rescale_with_baseline"]),
        "bertscore_signature": scorer.hash,
    }


def perplexity(nll_sums: Sequence[float], token_counts: Sequence[int]) -> dict[str, Any]:
    """Response perplexity of a set of utterances.

    ``ppl``: exp of the mean over utterances of each utterance's mean token NLL (Kang & Roy's evaluation
    averages
    per-utterance losses); ``ppl_token``: exp(total NLL / total tokens).
    """
    _check_lengths(nll_sums, token_counts)
    pairs = [(s, n) for s, n in zip(nll_sums, token_counts, strict=True) if n > 0]
    if not pairs:
        return {"ppl": None, "ppl_token": None, "num_utts": 0, "num_tokens": 0}
    mean_loss = fmean(s / n for s, n in pairs)
    total_tokens = sum(n for _, n in pairs)
    return {
        "ppl": math.exp(mean_loss),
        "ppl_token": math.exp(sum(s for s, _ in pairs) / total_tokens),
        "mean_nll": mean_loss,
        "num_utts": len(pairs),
        "num_tokens": total_tokens,
    }
