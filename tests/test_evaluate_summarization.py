"""Kang & Roy evaluations on a tiny KangRoy model: spoken-article summarization and response perplexity, with
the speech (llm), cascade (an HF CTC checkpoint, as their HuBERT-CTC baseline) and text inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import (
    AutoTokenizer,
    HubertConfig,
    HubertModel,
    LlamaConfig,
    LlamaForCausalLM,
    Wav2Vec2Config,
    Wav2Vec2CTCTokenizer,
    Wav2Vec2ForCTC,
)

from speechllm.evaluate import summarization
from speechllm.evaluate.metrics import wordnet_available
from speechllm.evaluate.rescore import rescore, score_document, write_outputs
from speechllm.evaluate.settings import benchmark_settings
from speechllm.evaluate.system import build_system

SR = 16000
CPU = torch.device("cpu")
PROMPT = "Summarize the following article in 3 sentences or less: "
SETTINGS: dict[str, Any] = {
    "batch_size": 2,
    "num_beams": 1,
    "max_new_tokens": 4,
    "ctc": {"search": "greedy", "beam_size": 4, "token_top_k": 4},
    "cascade_asr": {"name_or_path": None, "revision": "main", "lowercase": True},
    "summarization": {
        "prompt": PROMPT,
        "num_beams": 1,
        "max_new_tokens": 5,
        "text_field": "raw_transcription",
        "reference_field": "summary",
        "lowercase_text": False,
        "rouge_stemmer": False,
        "meteor_tokenize": "word_tokenize",
        "text_turn": "reference",
        "bertscore": {
            "model": None,
            "num_layers": None,
            "lang": "en",
            "idf": False,
            "rescale_with_baseline": False,
            "baseline_path": None,
            "batch_size": 4,
        },
    },
    "response_ppl": {
        "text_field": "raw_transcription",
        "response_field": "llm_response",
        "lowercase_text": True,
        "append_eos": False,
    },
}
ARTICLES = [
    ("The council approved a new park on Monday. Work starts in May.", "Council approves a new park."),
    ("Heavy rain closed two roads. Officials expect them to reopen soon.", "Rain closes two roads."),
    ("A local team won the cup after a late goal.", "Local team wins the cup."),
]


def _wav(path: Path, seconds: float, seed: int) -> str:
    sf.write(
        str(path),
        (np.random.default_rng(seed).standard_normal(int(SR * seconds)) * 0.1).astype(np.float32),
        SR,
    )
    return str(path)


@pytest.fixture(scope="module")
def kr_world(tmp_path_factory, tiny_models) -> dict[str, Any]:
    """A tiny KangRoy model directory, a tiny HF CTC checkpoint, spoken articles and LibriSpeech-shaped
    records."""
    from speechllm.models.export import build_model, kang_roy_spec, save_model_dir

    root = tmp_path_factory.mktemp("kr_world")
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llm"])
    tokenizer.save_pretrained(root / "llm")
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer) + 8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=3,
        )
    ).save_pretrained(root / "llm")
    HubertModel(
        HubertConfig(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            conv_dim=(32, 32, 32),
            conv_stride=(5, 4, 4),
            conv_kernel=(10, 4, 4),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
            apply_spec_augment=False,
            layerdrop=0.0,
        )
    ).save_pretrained(root / "hubert")
    models_cfg = {
        "llm": {
            "name_or_path": str(root / "llm"),
            "revision": "main",
            "dtype": "float32",
            "load_in_8bit": False,
        },
        "speech_encoder": {
            "name_or_path": str(root / "hubert"),
            "revision": "main",
            "normalize_waveform": False,
        },
        "pooling": {"kernel_size": 8, "stride": 4},
        "chat": {"prefix": "[|User|]", "suffix": "</s>[|Assistant|]", "label_eos": False},
        "prompt": {"prefix": "", "postfix": ""},
    }
    spec = kang_roy_spec(models_cfg, stage="kd")
    model, _ = build_model(spec, with_ctc=False, with_llm=False)
    save_model_dir(model, spec, root / "kang_roy")

    # An HF CTC checkpoint standing in for facebook/hubert-large-ls960-ft (characters, "|" between words).
    letters = "abcdefghijklmnopqrstuvwxyz'"
    vocab = {
        "<pad>": 0,
        "<s>": 1,
        "</s>": 2,
        "<unk>": 3,
        "|": 4,
        **{c.upper(): 5 + i for i, c in enumerate(letters)},
    }
    (root / "asr").mkdir()
    (root / "asr" / "vocab.json").write_text(json.dumps(vocab))
    Wav2Vec2CTCTokenizer(str(root / "asr" / "vocab.json")).save_pretrained(root / "asr")
    torch.manual_seed(1)
    asr = Wav2Vec2ForCTC(
        Wav2Vec2Config(
            vocab_size=len(vocab),
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            conv_dim=(32, 32, 32),
            conv_stride=(5, 4, 4),
            conv_kernel=(10, 4, 4),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
            pad_token_id=0,
        )
    )
    with torch.no_grad():  # favour letters over blank so the transcript is not empty
        asr.lm_head.bias[5:] += 3.0
    asr.save_pretrained(root / "asr")

    articles = [
        {
            "id": f"art-{i}",
            "audio": _wav(root / f"art{i}.wav", 0.5 + 0.1 * i, i),
            "num_samples": int(SR * (0.5 + 0.1 * i)),
            "raw_transcription": text,
            "summary": summary,
            "_line": i + 1,
        }
        for i, (text, summary) in enumerate(ARTICLES)
    ]
    utterances = [
        {
            "id": f"ls-{i}",
            "subset": "test.clean" if i < 2 else "test.other",
            "audio": _wav(root / f"ls{i}.wav", 0.4, 10 + i),
            "num_samples": int(SR * 0.4),
            "raw_transcription": "HELLO THERE HOW ARE YOU",
            "llm_response": "I am fine, thank you.",
            "_line": i + 1,
        }
        for i in range(3)
    ]
    return {
        "root": root,
        "model_dir": str(root / "kang_roy"),
        "asr_dir": str(root / "asr"),
        "articles": articles,
        "utterances": utterances,
    }


def _system(kr_world, decoder: str):
    settings = dict(SETTINGS)
    if decoder == "cascade":
        settings["cascade_asr"] = {"name_or_path": kr_world["asr_dir"], "revision": "main", "lowercase": True}
    return build_system(kr_world["model_dir"], decoder, ev("summarization", settings), SR, CPU)[0]


def ev(benchmark: str, settings: dict[str, Any] = SETTINGS) -> Any:
    """The typed settings `speechllm evaluate <benchmark>` parses from these evaluate settings."""
    return benchmark_settings(benchmark, {"evaluate": settings})


def _recompute(tmp_path: Path, benchmark: str, df, metrics, settings=SETTINGS) -> dict[str, Any]:
    full = {"evaluate": settings, "experiment": "test", "sampling_rate": SR}
    write_outputs(
        df,
        score_document(benchmark, "kr", "llm", "dir", full, metrics, {}),
        tmp_path / "h.parquet",
        tmp_path / "s.json",
    )
    again = rescore(benchmark, tmp_path / "h.parquet", tmp_path / "s.json", full, out=tmp_path / "again.json")
    assert json.dumps(again["metrics"], sort_keys=True) == json.dumps(
        json.loads((tmp_path / "s.json").read_text())["metrics"], sort_keys=True
    )
    return again["metrics"]


def test_summarization_speech_text_and_cascade(kr_world, tmp_path, tiny_bertscore_model) -> None:
    speech = _system(kr_world, "llm")
    bert = {**SETTINGS["summarization"]["bertscore"], "model": str(tiny_bertscore_model), "num_layers": 2}
    settings = {**SETTINGS, "summarization": {**SETTINGS["summarization"], "bertscore": bert}}
    df, metrics = summarization.run_summarization(speech, kr_world["articles"], ev("summarization", settings))
    assert list(df.prompt) == [PROMPT + "<speech>"] * 3 and df.input_text.isna().all()
    scores = metrics["all"]
    assert scores["num_docs"] == 3 and all(
        0.0 <= scores[k] <= 1.0 for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")
    )
    if wordnet_available():
        assert 0.0 <= scores["meteor"] <= 1.0
    else:  # never downloaded at run time: skipped with the reason recorded
        assert scores["meteor"] is None and "WordNet" in scores["meteor_skipped"]
    assert all(-1.0 <= scores[f"bertscore_{k}"] <= 1.0 for k in ("precision", "recall", "f1"))
    assert scores["bertscore_model"] == str(tiny_bertscore_model) and scores["bertscore_num_layers"] == 2
    _recompute(tmp_path, "summarization", df, metrics, settings)
    skipped = summarization.score_summarization(df, ev("summarization"))["all"]["bertscore_f1"]
    assert skipped is None  # no model: skipped

    text = _system(kr_world, "text")
    # the instruction and the article are one user-turn string inside the chat template
    prefix, suffix = text.wrap([[]])[0]
    segments = text.prompts([[PROMPT, ARTICLES[0][0]]])[0]
    assert segments == [prefix, text.text_ids(PROMPT + ARTICLES[0][0]), suffix]
    assert prefix[0] == text.tokenizer.bos_token_id
    text_df, _ = summarization.run_summarization(text, kr_world["articles"], ev("summarization"))
    assert list(text_df.input_text) == [a for a, _ in ARTICLES]

    cascade = _system(kr_world, "cascade")
    casc_df, _ = summarization.run_summarization(cascade, kr_world["articles"], ev("summarization"))
    transcripts = list(casc_df.input_text)
    assert all(t and t == t.lower() for t in transcripts)  # lower-cased, as the reference's cascade
    assert casc_df.prompt.iloc[0] == PROMPT + transcripts[0]


def _generate_text_response_ids(tokenizer, text: str) -> list[int]:
    """The reference's `generate_text_response` prompt (inference.py @0a3d8e6), tokenised with BOS first."""
    ids = list(tokenizer(f"[|User|] {text}</s>[|Assistant|] ").input_ids)
    return ids if ids[0] == tokenizer.bos_token_id else [tokenizer.bos_token_id, *ids]


def test_text_and_cascade_turns_are_written_as_generate_text_response(kr_world) -> None:
    text = _system(kr_world, "text")
    article = ARTICLES[0][0]
    expected = _generate_text_response_ids(text.tokenizer, PROMPT + article)
    assert text.prompts([[PROMPT, article]], "reference") == [[expected]]
    # the spaced one-string turn is not the segment layout of the speech prompt
    assert [t for seg in text.prompts([[PROMPT, article]])[0] for t in seg] != expected
    direct = text.generate([[expected]], 1, SETTINGS["summarization"]["max_new_tokens"])
    text_df, _ = summarization.run_summarization(text, kr_world["articles"][:1], ev("summarization"))
    assert list(text_df.hypothesis) == direct

    cascade = _system(kr_world, "cascade")
    casc_df, _ = summarization.run_summarization(cascade, kr_world["articles"][:1], ev("summarization"))
    transcript = casc_df.input_text.iloc[0]
    turn = _generate_text_response_ids(cascade.tokenizer, PROMPT + transcript)
    assert cascade.prompts([[PROMPT, transcript]], "reference") == [[turn]]
    max_new_tokens = SETTINGS["summarization"]["max_new_tokens"]
    assert list(casc_df.hypothesis) == cascade.generate([[turn]], 1, max_new_tokens)

    speech = _system(kr_world, "llm")  # speech prompts keep the segment layout (the reference's as well)
    vectors = torch.zeros(3, speech.llm.lm.config.hidden_size)
    assert speech.prompts([[PROMPT, vectors]], "reference") == speech.prompts([[PROMPT, vectors]])
    with pytest.raises(ValueError, match="text_turn"):
        text.prompts([[PROMPT]], "one_string")


def test_response_perplexity_matches_teacher_forced_loss(kr_world, tmp_path) -> None:
    from speechllm.evaluate.decode import load_wavs
    from speechllm.models.export import load_model_dir

    speech = _system(kr_world, "llm")
    df, metrics = summarization.run_response_ppl(speech, kr_world["utterances"], ev("response_ppl"))
    assert set(metrics["per_subset"]) == {"test.clean", "test.other"} and metrics["all"]["num_utts"] == 3
    # each utterance's NLL is the KangRoy training loss on that utterance alone (batch of one, no eos label)
    model, tokenizer, _ = load_model_dir(Path(kr_world["model_dir"]), with_ctc=False, with_llm=True)
    model.eval()
    for rec, nll, count in zip(kr_world["utterances"], df.nll, df.num_tokens, strict=True):
        wav, lengths = load_wavs([rec["audio"]], SR, [None], CPU)
        with torch.no_grad():
            loss = model([[model.encode(wav, lengths)[0]]], [speech.text_ids(rec["llm_response"])]).loss
        assert nll == pytest.approx(float(loss), rel=1e-4)
        assert count == len(speech.text_ids(rec["llm_response"]))
    clean = df[df.subset == "test.clean"]
    expected = math.exp(float(np.mean(clean.nll / clean.num_tokens)))
    assert metrics["per_subset"]["test.clean"]["ppl"] == pytest.approx(expected)
    _recompute(tmp_path, "response_ppl", df, metrics)

    text = _system(kr_world, "text")
    text_df, _ = summarization.run_response_ppl(text, kr_world["utterances"], ev("response_ppl"))
    assert (
        text_df.input_text == "hello there how are you"
    ).all()  # the lower-cased transcript, as the responses


def test_missing_reference_names_the_manifest_line(kr_world) -> None:
    broken = [dict(kr_world["articles"][1], summary=None)]
    with pytest.raises(ValueError, match="manifest line 2.*summary"):
        summarization.run_summarization(_system(kr_world, "text"), broken, ev("summarization"))
