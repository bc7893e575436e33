"""Benchmarks on tiny local models: every decoder (ctc / llm / cascade / text), ASR, ST, SpeechGLUE (rank and
constrained), SpeechXNLI, the score files and their recomputation from Parquet alone."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from speechllm.evaluate import benchmarks
from speechllm.evaluate.benchmarks import STSB_VALUES, parse_similarity, stsb_prediction
from speechllm.evaluate.constrained import constrained_beam_search, match_option
from speechllm.evaluate.metrics import glue_average
from speechllm.evaluate.prompts import MNLI_PROMPT, TASK_PROMPTS
from speechllm.evaluate.rescore import rescore, score_document, write_outputs
from speechllm.evaluate.settings import benchmark_settings
from speechllm.evaluate.shards import BatchRunner, unit
from speechllm.evaluate.summarization import summarization_frame
from speechllm.evaluate.system import EvalSystem, assemble, build_system
from speechllm.report.tables import build_table
from speechllm.text.normalize import basic_normalize

SR = 16000
CPU = torch.device("cpu")
SETTINGS: dict[str, Any] = {
    "num_beams": 2,
    "max_new_tokens": 6,
    "batch_size": 3,
    "glue_scoring": "rank",
    "stsb_rank": "argmax",
    "stsb_max_new_tokens": 4,
    "option_prefix": " ",
    "ctc_branch": True,
    "ctc": {"search": "greedy", "beam_size": 4, "token_top_k": 4},
    "cascade_asr": {"name_or_path": None, "revision": "main", "lowercase": True},
    "st_prompt": {"prefix": "Translate the following text from {language} to English\n", "postfix": "\n"},
    "bleu_tokenize": {"default": "13a", "zh": "zh", "cmn": "zh"},
}
SENTENCES = {
    "en_us": ["the cat sits on the mat", "hello world", "a dog runs"],
    "de_de": ["der hund schläft im garten", "hallo welt", "ein hund läuft"],
}


def _wav(path: Path, seconds: float, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    sf.write(str(path), (rng.standard_normal(int(SR * seconds)) * 0.1).astype(np.float32), SR)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_models) -> dict[str, Any]:
    """Clips, FLEURS/GLUE/XNLI-shaped records and two exported tiny models (stage ctc and a CE stage)."""
    from speechllm.models.adaptor import AdaptorConfig
    from speechllm.models.export import build_model, model_spec, save_model_dir

    root = tmp_path_factory.mktemp("eval_world")
    utterances = []
    for lang, sentences in SENTENCES.items():
        for i, text in enumerate(sentences):
            path = _wav(root / f"{lang}_{i}.wav", 0.25 + 0.1 * i, seed=len(utterances))
            utterances.append(
                {
                    "id": f"{lang}-{i}",
                    "sentence_id": i,
                    "language": lang,
                    "audio": str(path),
                    "num_samples": sf.info(str(path)).frames,
                    "sampling_rate": SR,
                    "raw_transcription": text.capitalize() + ".",
                    "translation": SENTENCES["en_us"][i].capitalize() + ".",
                    "_line": len(utterances) + 1,
                }
            )

    def example(task: str, n: int, fields: list[str], label: Any, language: str = "en_us") -> dict[str, Any]:
        clips = {
            f: {
                "text": f"{task} {f} {n}",
                "audio": str(_wav(root / f"{task}_{n}_{f}.wav", 0.2 + 0.05 * k, seed=100 + n + k)),
                "num_samples": int(SR * (0.2 + 0.05 * k)),
            }
            for k, f in enumerate(fields)
        }
        return {
            "id": f"{task}-{language}-{n}",
            "task": task,
            "language": language,
            "label": label,
            "fields": clips,
            "_line": n + 1,
        }

    glue = {
        "sst2": [example("sst2", n, ["sentence"], n % 2) for n in range(4)],
        "rte": [example("rte", n, ["sentence1", "sentence2"], n % 2) for n in range(3)],
        "stsb": [example("stsb", n, ["sentence1", "sentence2"], [0.4, 3.8, 2.0, 5.0][n]) for n in range(4)],
    }
    xnli = [
        example("xnli", n, ["premise", "hypothesis"], n % 3, lang)
        for lang in ("en_us", "de_de")
        for n in range(3)
    ]

    models_cfg = {
        "llm": {
            "name_or_path": str(tiny_models["llm"]),
            "revision": "main",
            "dtype": "float32",
            "load_in_8bit": False,
        },
        "speech_encoder": {
            "name_or_path": str(tiny_models["encoder"]),
            "revision": "main",
            "normalize_waveform": True,
        },
        "prompt": {"prefix": "Repeat the sentence: ", "postfix": ". "},
    }
    adaptor = AdaptorConfig(
        input_dim=16,
        d_model=32,
        heads=2,
        linear_units=64,
        cgmlp_units=64,
        cgmlp_kernel=5,
        merge_kernel=5,
        num_blocks=2,
        interctc_layer=1,
        num_lid_classes=3,
        llm_hidden_size=32,
    )
    dirs = {}
    for stage in ("ctc", "t"):
        spec = model_spec(models_cfg, adaptor, {"English": 1, "German": 2}, stage=stage)
        torch.manual_seed(0)
        model, _ = build_model(spec, with_ctc=stage == "ctc", with_llm=stage != "ctc")
        with torch.no_grad():  # a non-trivial adaptor, so CTC outputs are not all blank
            for p in model.adaptor.parameters():
                p.add_(0.3 * torch.randn_like(p))
        save_model_dir(model, spec, root / f"model_{stage}")
        dirs[stage] = str(root / f"model_{stage}")
    return {"root": root, "utterances": utterances, "glue": glue, "xnli": xnli, "dirs": dirs}


def ev(benchmark: str, settings: dict[str, Any] = SETTINGS, **overrides: Any) -> Any:
    """The typed settings `speechllm evaluate <benchmark>` parses from these evaluate settings."""
    return benchmark_settings(benchmark, {"evaluate": {**settings, **overrides}})


def system(world: dict[str, Any], stage: str, decoder: str, **overrides: Any) -> EvalSystem:
    built, _ = build_system(world["dirs"][stage], decoder, ev("fleurs_asr", **overrides), SR, CPU)
    return built


def assert_recomputable(
    tmp_path: Path,
    benchmark: str,
    df: pd.DataFrame,
    metrics: dict[str, Any],
    settings: dict[str, Any] = SETTINGS,
) -> dict[str, Any]:
    """Write Parquet + score file as the CLI does, then rescore from the Parquet alone: same metrics."""
    full = {"evaluate": settings, "experiment": "test", "sampling_rate": SR}
    document = score_document(benchmark, "sys", "llm", "dir", full, metrics, {})
    hyps, scores = tmp_path / f"{benchmark}.parquet", tmp_path / f"{benchmark}.scores.json"
    write_outputs(df, document, hyps, scores)
    written = json.loads(scores.read_text())
    again = rescore(benchmark, hyps, scores, full, out=tmp_path / "again.json")
    assert_same(again["metrics"], written["metrics"])
    return written


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12)
    else:
        assert a == b


# --------------------------------------------------------------------------- ASR


def test_asr_every_decoder_with_cascade_and_text_inputs(world, tmp_path) -> None:
    records = world["utterances"]
    prefix, postfix = "Repeat the sentence: ", ". "
    asr = ev("fleurs_asr")
    ctc_df, ctc_metrics = benchmarks.run_asr(system(world, "ctc", "ctc"), records, prefix, postfix, asr)
    assert (ctc_df.prompt == "<ctc>").all() and set(ctc_metrics["per_language"]) == {"de_de", "en_us"}
    per_lang = ctc_metrics["per_language"]["de_de"]
    assert per_lang["primary_metric"] == "wer" and per_lang["primary"] == per_lang["wer"]

    # ce_init: the stage-ctc model in front of the LLM also scores its CTC branch on the same encoder pass
    ce_init_df, ce_init_metrics = benchmarks.run_asr(
        system(world, "ctc", "llm"), records, prefix, postfix, asr
    )
    assert (
        ce_init_df.prompt.iloc[0] == "Repeat the sentence: <speech>. " and ce_init_df.input_text.isna().all()
    )
    assert list(ce_init_df.ctc_hypothesis) == list(ctc_df.hypothesis)
    assert ce_init_metrics["ctc_branch"]["all"]["cer"] == pytest.approx(ctc_metrics["all"]["cer"])
    assert_recomputable(tmp_path, "fleurs_asr", ce_init_df, ce_init_metrics)

    ce = system(world, "t", "llm")
    assert "CE-trained models have no trained CTC branch" in ce.notes["ctc_branch"]
    _, ce_metrics = benchmarks.run_asr(ce, records, prefix, postfix, asr)
    assert "ctc_branch" not in ce_metrics

    cascade = system(world, "ctc", "cascade")
    assert cascade.notes["cascade_asr"] == f"{world['dirs']['ctc']} (own CTC head)"
    assert "cascade_asr" not in system(world, "ctc", "ctc").notes  # the ctc decoder is no cascade
    cascade_df, _ = benchmarks.run_asr(cascade, records, prefix, postfix, asr)
    assert list(cascade_df.input_text) == list(ctc_df.hypothesis)  # the CTC transcript went into the prompt
    text_df, text_metrics = benchmarks.run_asr(system(world, "ctc", "text"), records, prefix, postfix, asr)
    assert list(text_df.input_text) == [r["raw_transcription"] for r in records]
    assert text_df.prompt.iloc[0] == f"Repeat the sentence: {records[0]['raw_transcription']}. "
    assert list(text_df.reference_normalized) == [
        " ".join(SENTENCES[r["language"]][int(r["id"][-1])].split()) for r in records
    ]
    assert_recomputable(tmp_path, "fleurs_asr", text_df, text_metrics)


def test_ctc_prefix_beam_search_is_selectable_and_never_less_probable_than_greedy(world) -> None:
    from speechllm.evaluate.ctc_search import CTCSearch, ctc_decode, sequence_log_prob
    from speechllm.evaluate.decode import load_wavs, postprocess
    from speechllm.models.export import load_model_dir

    beam = {"search": "prefix_beam", "beam_size": 8, "token_top_k": 8}
    ctc_system = system(world, "ctc", "ctc", ctc=beam)
    assert ctc_system.notes["ctc_search"] == "prefix_beam"
    records = world["utterances"][:3]
    df, _ = benchmarks.run_asr(ctc_system, records, "", "", ev("fleurs_asr"))
    model, tok, _ = load_model_dir(Path(world["dirs"]["ctc"]), with_ctc=True, with_llm=False)
    model.eval()
    for rec, hypothesis in zip(records, df.hypothesis, strict=True):
        wav, lengths = load_wavs([rec["audio"]], SR, [None], CPU)
        with torch.no_grad():
            out = model.encode(wav, lengths)
            logits = model.ctc_head(out.speech)
        beam_ids = ctc_decode(logits, out.speech_lengths, model.ctc_blank_id, CTCSearch(**beam))[0]
        greedy_ids = ctc_decode(logits, out.speech_lengths, model.ctc_blank_id, CTCSearch("greedy"))[0]
        assert hypothesis == postprocess(tok.decode(beam_ids, skip_special_tokens=True))
        log_probs = logits[0, : int(out.speech_lengths[0])].float().log_softmax(-1)
        assert (
            sequence_log_prob(log_probs, beam_ids, model.ctc_blank_id)
            >= sequence_log_prob(log_probs, greedy_ids, model.ctc_blank_id) - 1e-4
        )


def test_cer_is_the_primary_figure_for_languages_without_word_spaces() -> None:
    df = pd.DataFrame(
        {
            "id": ["a", "b"],
            "language": ["cmn_hans_cn", "th_th"],
            "reference": ["我们去公园", "สวัสดี"],
            "hypothesis": ["我们去", "สวัสดี"],
        }
    )
    metrics = benchmarks.score_asr(df)
    zh = metrics["per_language"]["cmn_hans_cn"]
    assert zh["primary_metric"] == "cer" and zh["primary"] == pytest.approx(2 / 5)
    assert metrics["per_language"]["th_th"]["primary"] == 0.0


def test_text_prompt_is_tokenised_once_and_speech_pieces_separately(world) -> None:
    text = system(world, "ctc", "text")
    ids = text.tokenizer("Repeat the sentence: hello world. ", add_special_tokens=False).input_ids
    assert text.prompts([["Repeat the sentence: ", "hello world", ". "]]) == [[ids]]
    speech = torch.zeros(3, 32)
    segments = assemble(["Repeat the sentence: ", speech, ". "], text.text_ids)
    assert segments[0] == text.text_ids("Repeat the sentence: ") and segments[1] is speech
    assert segments[2] == text.text_ids(". ")


def test_generation_output_postprocessing_matches_the_reference(world) -> None:
    text = system(world, "ctc", "text")
    tok = text.tokenizer
    ids = tok("hello\nworld ", add_special_tokens=False).input_ids
    # special tokens dropped, newlines to spaces, stripped (the reference's tokenizer overlay)
    assert text.decode([[tok.pad_token_id, *ids, tok.eos_token_id]]) == ["hello world"]
    # batched left-padded beam search gives each prompt what it gets alone
    prompts = text.prompts([["Repeat the sentence: ", "hello world", ". "], ["hallo", ". "]])
    together = text.generate(prompts, num_beams=2, max_new_tokens=5)
    alone = [text.generate([p], num_beams=2, max_new_tokens=5)[0] for p in prompts]
    assert together == alone


def test_unfinished_hypotheses_switch_reaches_the_generation(world) -> None:
    """evaluate.unfinished_hypotheses: drop_last_token cuts the last token of an answer that ran out of budget
    (the reference's asr_inference.py); a wrong value is named before any model loads."""
    prompts = [["Repeat the sentence: ", "hello world", ". "], ["hallo", ". "]]
    kept = system(world, "ctc", "text")
    dropped = system(world, "ctc", "text", unfinished_hypotheses="drop_last_token")
    assert (kept.unfinished_hypotheses, dropped.unfinished_hypotheses) == ("keep", "drop_last_token")
    budget = 3
    ids = kept._require_llm().generate(kept.prompts(prompts), budget)
    assert any(len(i) == budget for i in ids)  # at least one answer ran out of budget
    expected = kept.decode([i[:-1] if len(i) == budget else i for i in ids])
    assert dropped.generate(dropped.prompts(prompts), num_beams=1, max_new_tokens=budget) == expected
    assert kept.generate(kept.prompts(prompts), num_beams=1, max_new_tokens=budget) == kept.decode(ids)
    with pytest.raises(ValueError, match="evaluate.unfinished_hypotheses"):
        system(world, "ctc", "text", unfinished_hypotheses="drop")


# --------------------------------------------------------------------------- speech translation


def test_st_x_to_english_scores_with_target_tokenizer(world, tmp_path) -> None:
    records = world["utterances"]
    df, metrics = benchmarks.run_st(
        system(world, "ctc", "cascade"),
        records,
        SETTINGS["st_prompt"]["prefix"],
        SETTINGS["st_prompt"]["postfix"],
        "en_us",
        ev("fleurs_st"),
    )
    assert set(df.language) == {"de_de"} and (df.target_language == "en_us").all()
    assert df.prompt.iloc[0].startswith("Translate the following text from German to English\n")
    assert list(df.reference) == [r["translation"] for r in records if r["language"] == "de_de"]
    assert "tok:13a" in metrics["all"]["bleu_signature"] and metrics["all"]["normalized"]
    assert_recomputable(tmp_path, "fleurs_st", df, metrics)

    # a Chinese target picks sacreBLEU's zh tokenizer
    zh = df.assign(target_language="cmn_hans_cn", reference="我们今天去公园", hypothesis="我们今天去公园")
    zh_metrics = benchmarks.score_st(zh, ev("fleurs_st"))
    assert "tok:zh" in zh_metrics["all"]["bleu_signature"] and zh_metrics["all"]["bleu"] == pytest.approx(
        100.0
    )


def test_st_last_per_sentence_keeps_the_reference_fleurs_st_set(world) -> None:
    """prepare_fleurs_translate.py: one recording per source sentence (a later one overwrites an earlier one),
    only sentences the target language's test set has."""

    def rec(uid: str, language: str, sentence: int | None) -> dict[str, Any]:
        return {"id": uid, "language": language, "sentence_id": sentence, "translation": f"s{sentence}"}

    records = [
        rec("en-1", "en_us", 1),
        rec("en-2", "en_us", 2),
        rec("de-1a", "de_de", 1),
        rec("de-2a", "de_de", 2),
        rec("de-1b", "de_de", 1),
        rec("de-3", "de_de", 3),  # no en_us test recording of sentence 3
        rec("fr-2", "fr_fr", 2),
        rec("fr-x", "fr_fr", None),  # no sentence id: its own sentence
    ]
    assert [r["id"] for r in benchmarks.st_sources(records, "en_us")] == [
        "de-1a",
        "de-2a",
        "de-1b",
        "de-3",
        "fr-2",
        "fr-x",
    ]
    kept = benchmarks.st_sources(records, "en_us", "last_per_sentence")
    assert [r["id"] for r in kept] == ["de-2a", "de-1b", "fr-2", "fr-x"]
    with pytest.raises(ValueError, match="evaluate.st_recordings"):
        benchmarks.st_sources(records, "en_us", "first")
    # no target-language recordings (CoVoST 2 X->en): one recording per sentence, no sentence filter
    no_target = benchmarks.st_sources(records[2:], "en_us", "last_per_sentence")
    assert [r["id"] for r in no_target] == ["de-2a", "de-1b", "de-3", "fr-2", "fr-x"]

    # decoding and the frame translate the same sources; the world has one recording per sentence
    settings = ev("fleurs_st", {**SETTINGS, "st_recordings": "last_per_sentence"})
    utterances = world["utterances"] + [dict(world["utterances"][3], id="de_de-0b")]
    df, _ = benchmarks.run_st(system(world, "ctc", "text"), utterances, "{language}", "", "en_us", settings)
    assert list(df.id) == ["de_de-1", "de_de-2", "de_de-0b"]


def test_st_leaves_out_sources_whose_sentence_has_no_target_recording(caplog) -> None:
    """FLEURS: a sentence recorded in German but in no en_us split has translation null; it is no test case
    (counted in a warning), while a translation of the wrong type or none at all is an error."""
    records = [
        {"id": "en-1", "language": "en_us", "sentence_id": 1, "translation": "one"},
        {"id": "de-1", "language": "de_de", "sentence_id": 1, "translation": "one"},
        {"id": "de-7", "language": "de_de", "sentence_id": 7, "translation": None},
    ]
    with caplog.at_level("WARNING"):
        assert [r["id"] for r in benchmarks.st_sources(records, "en_us")] == ["de-1"]
    assert "1 of 2 source recordings have no translation" in caplog.text and "de-7" in caplog.text
    with pytest.raises(ValueError, match="no utterance has a translation into en_us"):
        benchmarks.st_sources(records[2:], "en_us")
    with pytest.raises(ValueError, match="de-1: translation is not a string"):
        benchmarks.st_sources([dict(records[1], translation=3)], "en_us")


def test_rescore_records_the_scoring_settings_it_used(world, tmp_path) -> None:
    """A rescore with st_normalize: references must not leave `both` in the score file's settings."""
    records = world["utterances"]
    df, metrics = benchmarks.run_st(
        system(world, "ctc", "text"), records, "{language}", "", "en_us", ev("fleurs_st")
    )
    written = assert_recomputable(tmp_path, "fleurs_st", df, metrics, {**SETTINGS, "st_normalize": "both"})
    assert written["settings"]["st_normalize"] == "both"
    changed = {**SETTINGS, "st_normalize": "references", "num_beams": 7}
    full = {"evaluate": changed, "experiment": "test", "sampling_rate": SR}
    again = rescore("fleurs_st", tmp_path / "fleurs_st.parquet", tmp_path / "fleurs_st.scores.json", full)
    assert again["metrics"]["all"]["normalized"] == "references"
    assert again["settings"]["st_normalize"] == "references"
    assert again["settings"]["num_beams"] == SETTINGS["num_beams"]  # decoding settings stay as decoded
    assert json.loads((tmp_path / "fleurs_st.scores.json").read_text())["settings"] == again["settings"]


def test_rescore_asr_with_sclite_alignment_records_it(tmp_path) -> None:
    """evaluate.asr_alignment is a scoring setting: a rescore with `sclite` recounts the edits (the second
    utterance has 5 substitutions at unit cost, 3 deletions + 3 insertions for sclite) and says so."""
    df = pd.DataFrame(
        {
            "id": ["en_us-0", "en_us-1"],
            "language": ["en_us", "en_us"],
            "reference": ["hello world", "x y a b c"],
            "hypothesis": ["hello world", "d e f x y"],
        }
    )
    written = assert_recomputable(tmp_path, "fleurs_asr", df, benchmarks.score_asr(df, ev("fleurs_asr")))
    assert written["metrics"]["all"]["wer"] == pytest.approx(5 / 7)
    assert written["metrics"]["all"]["alignment"] == "levenshtein"
    full = {"evaluate": {**SETTINGS, "asr_alignment": "sclite"}, "experiment": "test", "sampling_rate": SR}
    again = rescore("fleurs_asr", tmp_path / "fleurs_asr.parquet", tmp_path / "fleurs_asr.scores.json", full)
    assert again["metrics"]["all"]["wer"] == pytest.approx(6 / 7)
    assert again["metrics"]["per_language"]["en_us"]["primary"] == pytest.approx(6 / 7)
    assert again["metrics"]["all"]["alignment"] == "sclite"
    assert again["settings"]["asr_alignment"] == "sclite"


def test_undefined_metrics_are_null_in_a_strict_score_file(tmp_path) -> None:
    """STS-B predictions that are all equal have no Pearson / Spearman correlation (NaN, as in HF evaluate's
    GLUE metric), nor have the GLUE averages over them: the score file stays strict JSON (null, named in
    notes.undefined_metrics), a rescore writes the same, and the table shows the cells as missing."""
    df = pd.DataFrame(
        {
            "task": ["sst2", "sst2", "stsb", "stsb", "stsb"],
            "reference": [1, 0, 0.4, 3.8, 2.0],
            "prediction": [1, 1, 2.0, 2.0, 2.0],
            "matched": [True, True, True, True, True],
        }
    )
    metrics = benchmarks.score_speechglue(df, ev("speechglue"))
    assert math.isnan(metrics["per_task"]["stsb"]["pearson"])

    def refuse(token: str) -> None:
        raise AssertionError(f"non-JSON token {token} in the score file")

    written = assert_recomputable(tmp_path, "speechglue", df, metrics)
    strict = json.loads((tmp_path / "speechglue.scores.json").read_text(), parse_constant=refuse)
    assert strict == written
    stsb = strict["metrics"]["per_task"]["stsb"]
    assert stsb["pearson"] is None and stsb["spearmanr"] is None and stsb["num_examples"] == 3
    assert strict["metrics"]["per_task"]["sst2"]["accuracy"] == 0.5
    undefined = strict["notes"]["undefined_metrics"]
    assert {"per_task.stsb.pearson", "per_task.stsb.spearmanr"} <= set(undefined)
    again = json.loads((tmp_path / "again.json").read_text(), parse_constant=refuse)
    assert again["notes"]["undefined_metrics"] == undefined
    table = build_table("speechglue", [tmp_path / "speechglue.scores.json"])
    assert table.loc[("sst2", "accuracy"), "sys"] == 50.0
    assert math.isnan(table.loc[("stsb", "pearson"), "sys"])


def test_rescore_of_another_benchmarks_outputs_names_the_file_and_columns(tmp_path) -> None:
    """A rescore given an ST Parquet for SpeechGLUE (or any frame without the columns its scorer reads) stops
    with an error naming the Parquet and what it lacks, not pandas' AttributeError."""
    df = pd.DataFrame(
        {
            "id": ["de-0"],
            "language": ["de_de"],
            "target_language": ["en_us"],
            "reference": ["hello"],
            "hypothesis": ["hello"],
        }
    )
    assert_recomputable(tmp_path, "fleurs_st", df, benchmarks.score_st(df, ev("fleurs_st")))
    hyps, scores = tmp_path / "fleurs_st.parquet", tmp_path / "fleurs_st.scores.json"
    document = json.loads(scores.read_text())
    scores.write_text(json.dumps({**document, "benchmark": "speechglue"}))
    full = {"evaluate": SETTINGS, "experiment": "test", "sampling_rate": SR}
    with pytest.raises(ValueError, match=rf"{re.escape(str(hyps))}: no column\(s\) \['task', 'prediction', "):
        rescore("speechglue", hyps, scores, full)


def test_unknown_asr_alignment_stops_before_decoding(world) -> None:
    runner, settings = BatchRunner(), ev("fleurs_asr", asr_alignment="x")
    with pytest.raises(ValueError, match="evaluate.asr_alignment"):
        benchmarks.run_asr(system(world, "ctc", "text"), world["utterances"], "", "", settings, runner)
    assert not runner.rows


def test_st_without_a_translation_names_the_manifest_line(world) -> None:
    records = [dict(world["utterances"][3], translation=None)]
    with pytest.raises(ValueError, match="manifest line 4"):
        benchmarks.run_st(system(world, "ctc", "text"), records, "{language}", "", "en_us", ev("fleurs_st"))


# --------------------------------------------------------------------------- SpeechGLUE / SpeechXNLI


def test_speechglue_rank_scoring_with_stsb(world, tmp_path) -> None:
    df, metrics = benchmarks.run_speechglue(system(world, "t", "llm"), world["glue"], " ", ev("speechglue"))
    assert set(metrics["per_task"]) == {"sst2", "rte", "stsb"}
    assert {len(s) for s in df[df.task == "rte"].option_scores} == {2}
    stsb = df[df.task == "stsb"]
    assert {len(s) for s in stsb.option_scores} == {26}
    assert set(stsb.prediction) <= {float(v) for v in STSB_VALUES}
    assert stsb.prompt.iloc[0].startswith(
        "I need to know how similar these two passages are:\n- <speech:sentence1>"
    )
    assert {"pearson", "spearmanr"} <= set(metrics["per_task"]["stsb"])
    # rank: the argmax option is the answer
    rte = df[df.task == "rte"]
    assert [int(np.argmax(s)) for s in rte.option_scores] == [int(p) for p in rte.prediction]
    average = glue_average(metrics["per_task"])
    assert average["tasks"] == ["rte", "sst2"]  # STS-B is not averaged, as the reference
    assert_same(metrics["average"], average["average"])
    assert_same(metrics["average_without_wnli"], average["average"])  # no WNLI here
    assert_recomputable(tmp_path, "speechglue", df, metrics)

    expected = ev("speechglue", stsb_rank="expectation")
    df_e, _ = benchmarks.run_speechglue(
        system(world, "t", "llm"), {"stsb": world["glue"]["stsb"]}, " ", expected
    )
    for scores, prediction in zip(df_e.option_scores, df_e.prediction, strict=True):
        assert prediction == pytest.approx(stsb_prediction(torch.tensor(list(scores)), "expectation"))
        assert 0.0 <= prediction <= 5.0


def test_speechglue_constrained_scoring_and_text_baseline(world, tmp_path) -> None:
    settings = {**SETTINGS, "glue_scoring": "constrained"}
    text = system(world, "ctc", "text")
    df, metrics = benchmarks.run_speechglue(text, world["glue"], " ", ev("speechglue", settings))
    classes = df[df.task != "stsb"]
    for _, row in classes.iterrows():
        assert row.prediction == match_option(row.hypothesis, list(row.options))
        assert row.matched == (row.hypothesis.strip().lower() in [o.strip().lower() for o in row.options])
    assert metrics["per_task"]["sst2"]["num_unmatched"] == int(
        (~classes[classes.task == "sst2"].matched).sum()
    )
    # RTE's prompt asks about sentence2 first: the texts stand where their clips would, in prompt order
    assert df[df.task == "rte"].input_text.iloc[0] == "rte sentence2 0 | rte sentence1 0"
    assert (
        df[df.task == "rte"]
        .prompt.iloc[0]
        .startswith('Does the claim "rte sentence2 0" follow from the fact')
    )
    assert_recomputable(tmp_path, "speechglue", df, metrics, settings)


def test_constrained_search_with_single_token_options_keeps_the_best_free_token(world) -> None:
    """With one-token options and one step, the beams kept are the best option tokens and the best free token,
    so the answer is the globally best non-eos token (HF's fallback when no beam fulfils every option)."""
    text = system(world, "ctc", "text")
    prompt = text.prompts([["Does the claim hello follow? Please answer either yes or no."]])[0]
    options = [[t] for t in text.text_ids(" yes")[:1] + text.text_ids(" no")[:1]]
    answer = constrained_beam_search(text.llm, prompt, options)
    inputs = text.llm.build_inputs([prompt])
    log_probs = text.llm.lm_logits(inputs, logits_to_keep=1)[0, -1].float().log_softmax(-1)
    log_probs[text.llm.eos_token_id] = -math.inf
    assert answer == [int(log_probs.argmax())]


def test_stsb_answer_parsing() -> None:
    assert parse_similarity(" 3.4 out of 5") == 3.4
    assert parse_similarity("7") == 5.0 and parse_similarity("2,5") == 2.5
    assert parse_similarity("very similar") is None


def test_generation_frames_keep_the_parquet_columns_of_asr_st_and_summarization() -> None:
    records = [
        {
            "id": "a",
            "language": "de_de",
            "raw_transcription": "Hallo, Welt!",
            "translation": "Hello, world!",
            "summary": "A greeting.",
        },
        {
            "id": "b",
            "language": "en_us",
            "raw_transcription": "Hi there.",
            "translation": "Hi there.",
            "summary": "Another.",
        },
    ]
    rows = {
        unit("", i): {"hypothesis": hyp, "prompt": f"p{i}", "input_text": None, "ctc_hypothesis": f"ctc {i}"}
        for i, hyp in enumerate(["hallo welt", "Hi There!"])
    }
    asr = benchmarks.asr_frame(records, rows)
    assert list(asr.columns) == [
        "id",
        "language",
        "prompt",
        "input_text",
        "reference",
        "hypothesis",
        "reference_normalized",
        "hypothesis_normalized",
        "ctc_hypothesis",
    ]
    assert asr.reference.tolist() == ["Hallo, Welt!", "Hi there."]
    assert asr.hypothesis_normalized.tolist() == [basic_normalize("hallo welt"), basic_normalize("Hi There!")]
    assert asr.reference_normalized.tolist() == [
        basic_normalize("Hallo, Welt!"),
        basic_normalize("Hi there."),
    ]
    assert asr.ctc_hypothesis.tolist() == ["ctc 0", "ctc 1"] and asr.prompt.tolist() == ["p0", "p1"]

    st = benchmarks.st_frame(records, "en_us", {unit("", 0): rows[unit("", 0)]})  # only the German source
    assert list(st.columns) == [
        "id",
        "language",
        "target_language",
        "prompt",
        "input_text",
        "reference",
        "hypothesis",
        "reference_normalized",
        "hypothesis_normalized",
    ]
    assert st.id.tolist() == ["a"] and st.target_language.tolist() == ["en_us"]
    assert st.reference.tolist() == ["Hello, world!"]

    summary = summarization_frame(records, rows, "summary")
    assert list(summary.columns) == ["id", "prompt", "input_text", "reference", "hypothesis"]
    assert summary.reference.tolist() == ["A greeting.", "Another."]
    assert summary.hypothesis.tolist() == ["hallo welt", "Hi There!"]

    with pytest.raises(ValueError, match="no decoded output for record 1"):
        benchmarks.generation_frame(records, {unit("", 0): rows[unit("", 0)]}, ["x", "y"])


def test_speechxnli_uses_the_mnli_prompt_and_reports_the_mean(world, tmp_path) -> None:
    assert TASK_PROMPTS["xnli"] is MNLI_PROMPT and MNLI_PROMPT.options == ("Yes", "Maybe", "No")
    assert TASK_PROMPTS["xnli"] is TASK_PROMPTS["mnli_matched"]
    df, metrics = benchmarks.run_speechxnli(system(world, "ctc", "llm"), world["xnli"], " ", ev("speechxnli"))
    assert set(metrics["per_language"]) == {"en_us", "de_de"}
    accuracies = [m["accuracy"] for m in metrics["per_language"].values()]
    assert metrics["all"] == pytest.approx(sum(accuracies) / 2)
    assert (
        df.prompt.iloc[0]
        == '<speech:premise> \n\nQuestion: Does this imply that "<speech:hypothesis>"? Yes, no, or maybe?'
    )
    assert_recomputable(tmp_path, "speechxnli", df, metrics)


def test_missing_field_names_the_manifest_line(world) -> None:
    broken = [
        dict(world["glue"]["rte"][0], fields={"sentence1": world["glue"]["rte"][0]["fields"]["sentence1"]})
    ]
    with pytest.raises(ValueError, match="manifest line 1.*sentence2"):
        benchmarks.run_speechglue(system(world, "ctc", "text"), {"rte": broken}, " ", ev("speechglue"))


# --------------------------------------------------------------------------- CLI


def test_cli_evaluate_then_rescore_without_decoding(world, tmp_path) -> None:
    """`speechllm evaluate fleurs_asr ...` then `speechllm evaluate rescore ...` (in-process: same argv, no
    fork)."""
    from speechllm.cli import main

    manifest = tmp_path / "test.jsonl"
    manifest.write_text(
        "".join(json.dumps({k: v for k, v in r.items() if k != "_line"}) + "\n" for r in world["utterances"])
    )
    settings = json.dumps({"evaluate": SETTINGS, "sampling_rate": SR, "experiment": "test"})
    hyps, scores = tmp_path / "ctc.parquet", tmp_path / "ctc.scores.json"
    main(
        [
            "evaluate",
            "fleurs_asr",
            "--settings",
            settings,
            "--model",
            world["dirs"]["ctc"],
            "--name",
            "ctc",
            "--decoder",
            "ctc",
            "--manifests",
            str(manifest),
            "--hyps",
            str(hyps),
            "--scores",
            str(scores),
        ]
    )
    written = json.loads(scores.read_text())
    assert (
        written["model"] == "ctc"
        and written["decoder"] == "ctc"
        and written["settings"]["ctc"]["search"] == "greedy"
    )
    assert written["versions"]["normalizer"].startswith("transformers==")
    assert set(pd.read_parquet(hyps).columns) >= {
        "id",
        "language",
        "prompt",
        "reference",
        "hypothesis",
        "reference_normalized",
        "hypothesis_normalized",
    }
    main(
        [
            "evaluate",
            "rescore",
            "fleurs_asr",
            "--settings",
            settings,
            "--hyps",
            str(hyps),
            "--scores",
            str(scores),
            "--out",
            str(tmp_path / "again.json"),
        ]
    )
    assert_same(json.loads((tmp_path / "again.json").read_text())["metrics"], written["metrics"])
    with pytest.raises(SystemExit, match="benchmark 'fleurs_asr', not 'fleurs_st'"):
        main(
            [
                "evaluate",
                "rescore",
                "fleurs_st",
                "--settings",
                settings,
                "--hyps",
                str(hyps),
                "--scores",
                str(scores),
            ]
        )
    with pytest.raises(SystemExit, match="only transcribes"):
        main(
            [
                "evaluate",
                "fleurs_st",
                "--settings",
                settings,
                "--model",
                world["dirs"]["ctc"],
                "--name",
                "ctc",
                "--decoder",
                "ctc",
                "--manifests",
                str(manifest),
                "--hyps",
                str(hyps),
                "--scores",
                str(scores),
            ]
        )
