"""The Python API (`speechllm.load` -> SpeechModel) and the batched `transcribe` / `ask` commands.

The tiny LLMs here are initialised with a wide weight spread so their greedy and beam outputs vary with the
input: with the usual 0.02 a random LM repeats one token whatever the prompt, and batched-vs-single checks
would hold trivially."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import bloomzmms_models_cfg, tiny_adaptor, tiny_bloom
from test_ask import kang_roy_model_dir
from transformers import AutoTokenizer

import speechllm
from speechllm.api import Audio, SpeechModel
from speechllm.audio import AudioError, array_to_mono
from speechllm.cli import main
from speechllm.evaluate.decode import ctc_transcribe
from speechllm.infer import AudioPart, PromptError, answer, parse_prompt
from speechllm.models.export import build_model, model_spec, save_model_dir
from speechllm.models.kang_roy import ChatTemplate, chat_ids, text_ids

SR = 16000
LIVELY = 0.5  # initializer_range of the test LLMs (see the module docstring)


def lively_bloom(tokenizer_dir: Path, out_dir: Path) -> Path:
    """A tiny BLOOM (with the tokenizer of `tokenizer_dir`) whose outputs depend on its input."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(out_dir)
    tiny_bloom(out_dir, len(tokenizer), initializer_range=LIVELY)
    return out_dir


def bloomzmms_dirs(
    llm_dir: Path,
    encoder_dir: Path,
    out_root: Path,
    stages: tuple[str, ...] = ("ctc", "ce"),
    names: dict[str, str] | None = None,
) -> dict[str, Path]:
    """Exported BLOOMZMMS models (adaptor weights perturbed off their initialisation) per stage."""
    out = {}
    for stage in stages:
        spec = model_spec(
            bloomzmms_models_cfg(llm_dir, encoder_dir), tiny_adaptor(), {"English": 1, "German": 2}, stage
        )
        torch.manual_seed(1)
        model, _ = build_model(spec, with_ctc=stage == "ctc", with_llm=stage != "ctc")
        with torch.no_grad():
            for p in model.adaptor.parameters():
                p.add_(0.2 * torch.randn_like(p))
        out[stage] = out_root / (names or {}).get(stage, stage)
        save_model_dir(model, spec, out[stage], extra={"training": {"final_step": 7}})
    return out


@pytest.fixture(scope="module")
def bloomzmms_models(tiny_models, tmp_path_factory) -> dict[str, Path]:
    """A CTC-stage model (its CTC head: the usual tiny LLM's embeddings) and a CE one (the lively LLM)."""
    root = tmp_path_factory.mktemp("api_bloomzmms")
    lively = lively_bloom(tiny_models["llm"], root / "llm")
    return {
        **bloomzmms_dirs(tiny_models["llm"], tiny_models["encoder"], root, ("ctc",)),
        **bloomzmms_dirs(lively, tiny_models["encoder"], root, ("ce",)),
    }


@pytest.fixture(scope="module")
def kang_roy_model(tmp_path_factory) -> Path:
    # the speech projection scaled to the lively LLM's embedding scale
    return kang_roy_model_dir(tmp_path_factory.mktemp("api_kang_roy"), LIVELY, projection_scale=20.0)


def write_clips(root: Path) -> list[str]:
    """Five clips of different lengths, rates and channel counts (noise shaped by a tone)."""
    rng = np.random.default_rng(0)
    shapes = [(0.6, 16000, 1), (1.4, 8000, 1), (0.9, 44100, 2), (2.1, 16000, 1), (1.1, 22050, 2)]
    paths = []
    for i, (seconds, rate, channels) in enumerate(shapes):
        t = np.arange(int(seconds * rate)) / rate
        wave = 0.2 * np.sin(2 * np.pi * (150 + 60 * i) * t) + 0.05 * rng.standard_normal(t.shape[0])
        samples = np.stack([wave, 0.5 * wave], axis=1) if channels == 2 else wave
        path = root / f"clip{i}.{'flac' if channels == 2 else 'wav'}"
        sf.write(str(path), samples.astype(np.float32), rate)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[str]:
    return write_clips(tmp_path_factory.mktemp("api_clips"))


def varied(texts: list[str]) -> bool:
    """Outputs that differ between inputs (a degenerate model would make every comparison trivially equal)."""
    return len(set(texts)) > 1 and all(texts)


# --------------------------------------------------------------------------- import and loading


def test_import_speechllm_stays_cheap_and_load_is_lazy() -> None:
    code = (
        "import sys, speechllm; assert 'torch' not in sys.modules, 'torch imported'; "
        "load = speechllm.load; assert 'torch' in sys.modules; print(load.__module__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "speechllm.api"


def test_steps_that_read_scores_or_gather_shards_start_without_the_heavy_libraries() -> None:
    """Tables, plots, the W&B summary, the resource view and the gather of response shards run as many small
    jobs: none imports torch, transformers, scipy or scikit-learn (seconds per job)."""
    modules = [
        "speechllm.report.tables",
        "speechllm.report.plots",
        "speechllm.report.wandb_runs",
        "speechllm.report.resources",
        "speechllm.targets.shards",
    ]
    code = (
        f"import sys; [__import__(m) for m in {modules!r}]; "
        "print(sorted({'torch', 'transformers', 'scipy', 'sklearn'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_load_picks_the_decoder_from_the_stage(bloomzmms_models) -> None:
    ctc = speechllm.load(bloomzmms_models["ctc"], device="cpu")
    ce = speechllm.load(bloomzmms_models["ce"], device="cpu")
    assert (ctc.decoder, ce.decoder) == ("ctc", "llm")
    assert ctc.model.llm is None and ce.model.ctc_head is None
    with pytest.raises(ValueError, match="CTC-stage model"):
        ctc.ask("Repeat the sentence: {audio:a.wav}. ")


def test_dtype_casts_the_whole_model(bloomzmms_models, clips) -> None:
    model = speechllm.load(bloomzmms_models["ce"], device="cpu", dtype="bfloat16")
    assert {p.dtype for p in model.model.parameters()} == {torch.bfloat16}
    texts = model.transcribe(clips[:2], batch_size=2, num_beams=1, max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    with pytest.raises(ValueError, match="dtype must be one of"):
        speechllm.load(bloomzmms_models["ce"], device="cpu", dtype="int8")


# --------------------------------------------------------------------------- transcription


def test_ctc_transcribe_batched_equals_one_at_a_time(bloomzmms_models, clips) -> None:
    model = speechllm.load(bloomzmms_models["ctc"], device="cpu")
    batched = model.transcribe(clips, batch_size=3)
    single = [model.transcribe(clip, batch_size=1) for clip in clips]
    assert varied(single)
    assert batched == single
    # and the evaluation's decoder, one file at a time, agrees
    assert single == [ctc_transcribe(model.model, model.tokenizer, [c], SR, [None], "cpu")[0] for c in clips]


def test_llm_transcribe_batched_equals_one_at_a_time(bloomzmms_models, clips) -> None:
    model = speechllm.load(bloomzmms_models["ce"], device="cpu")
    options = {"num_beams": 3, "max_new_tokens": 6}
    batched = model.transcribe(clips, batch_size=4, **options)
    single = [model.transcribe(clip, batch_size=1, **options) for clip in clips]
    assert varied(single)
    assert batched == single


def test_audio_in_any_form_gives_the_same_text(bloomzmms_models, clips) -> None:
    model = speechllm.load(bloomzmms_models["ctc"], device="cpu")
    path = clips[2]  # stereo, 44.1 kHz
    samples, rate = sf.read(path, dtype="float32")
    assert samples.ndim == 2 and rate == 44100
    expected = model.transcribe(path)
    forms = [
        (samples, rate),
        {"array": samples, "sampling_rate": rate},
        Audio(samples, rate),
        Path(path),
        Audio(torch.from_numpy(samples.T.copy()), rate),
    ]
    assert model.transcribe(forms) == [expected] * len(forms)
    assert model.transcribe(torch.from_numpy(samples.T.copy()), sampling_rate=rate) == expected
    mono_16k = array_to_mono(samples, rate, SR, "test")
    assert model.transcribe(mono_16k) == expected  # a bare array is at the model's rate


def test_array_to_mono_reads_pcm_integers_and_either_channel_layout() -> None:
    pcm = np.array([[16384, -16384], [-32768, 0], [0, 8192]], dtype=np.int16)
    assert np.allclose(array_to_mono(pcm, SR, SR, "x"), [0.0, -0.5, 0.125])
    assert np.allclose(array_to_mono(pcm.T, SR, SR, "x"), [0.0, -0.5, 0.125])
    with pytest.raises(AudioError, match="neither"):
        array_to_mono(np.zeros((2, 3, 4), dtype=np.float32), SR, SR, "clip x")


def test_too_short_a_clip_is_named(bloomzmms_models, clips, tmp_path) -> None:
    model = speechllm.load(bloomzmms_models["ctc"], device="cpu")
    shortest = model.min_samples()
    model.transcribe((np.full(shortest, 0.1, dtype=np.float32), SR))  # just long enough
    with pytest.raises(AudioError, match=r"audio #1: .* is too short for this model, which needs at least"):
        model.transcribe([clips[0], (np.full(shortest - 1, 0.1, dtype=np.float32), SR)])
    short = tmp_path / "blip.wav"
    sf.write(str(short), np.full(40, 0.1, dtype=np.float32), SR)
    with pytest.raises(AudioError, match="blip.wav: .* is too short for this model"):
        model.transcribe([clips[0], str(short)], batch_size=2)


# --------------------------------------------------------------------------- prompts


def ask_prompts(clips: list[str]) -> list[str]:
    return [
        f"Repeat the sentence: {{audio:{clips[0]}}}. ",
        f"Translate the following text from German to English\n{{audio:{clips[3]}}}\n",
        f"{{audio:{clips[1]}}} and then {{audio:{clips[2]}}}",
        f"Repeat the sentence: {{audio:{clips[4]}}}. ",
        f"hello {{audio:{clips[2]}}}",
    ]


@pytest.mark.parametrize("num_beams", [1, 3])
def test_bloomzmms_ask_batched_equals_one_at_a_time(bloomzmms_models, clips, num_beams) -> None:
    model = speechllm.load(bloomzmms_models["ce"], device="cpu")
    prompts = ask_prompts(clips)
    batched = model.ask(prompts, batch_size=4, num_beams=num_beams, max_new_tokens=8)
    one_by_one = [
        answer(model.model, model.tokenizer, "bloomzmms", parse_prompt(p), SR, "cpu", num_beams, 8)
        for p in prompts
    ]  # the unbatched path `speechllm ask` took before
    assert varied(one_by_one)
    assert batched == one_by_one
    assert model.ask(prompts[0], batch_size=1, num_beams=num_beams, max_new_tokens=8) == one_by_one[0]


def test_kang_roy_ask_batched_equals_one_at_a_time(kang_roy_model, clips) -> None:
    model = speechllm.load(kang_roy_model, device="cpu")
    prompts = ask_prompts(clips)
    batched = model.ask(prompts, batch_size=4, max_new_tokens=8)
    one_by_one = [
        answer(model.model, model.tokenizer, "kang_roy", parse_prompt(p), SR, "cpu", 1, 8) for p in prompts
    ]
    assert varied(one_by_one)
    assert batched == one_by_one


def test_left_padding_needs_its_attention_mask(bloomzmms_models, clips) -> None:
    """The batched-equals-single check can fail: without the mask the padded prompts' answers change."""
    model = speechllm.load(bloomzmms_models["ce"], device="cpu")
    prompts = ask_prompts(clips)
    single = [model.ask(p, batch_size=1, num_beams=1, max_new_tokens=8) for p in prompts]
    generate = model.model.llm.lm.generate

    def unmasked(**kwargs):
        kwargs["attention_mask"] = torch.ones_like(kwargs["attention_mask"])
        kwargs.pop("position_ids", None)
        return generate(**kwargs)

    model.model.llm.lm.generate = unmasked
    assert model.ask(prompts, batch_size=5, num_beams=1, max_new_tokens=8) != single


def test_prompts_as_parts_and_named_audio(bloomzmms_models, clips) -> None:
    model = speechllm.load(bloomzmms_models["ce"], device="cpu")
    options = {"num_beams": 1, "max_new_tokens": 6}
    expected = model.ask(f"Repeat the sentence: {{audio:{clips[2]}}}. ", **options)
    samples, rate = sf.read(clips[2], dtype="float32")
    assert model.ask(["Repeat the sentence: ", Path(clips[2]), ". "], **options) == expected
    assert model.ask(["Repeat the sentence: ", (samples, rate), ". "], **options) == expected
    assert (
        model.ask("Repeat the sentence: {audio:mine}. ", audio={"mine": (samples, rate)}, **options)
        == expected
    )
    both = model.ask([["Repeat the sentence: ", AudioPart(clips[2]), ". "], ask_prompts(clips)[0]], **options)
    assert both[0] == expected and len(both) == 2
    with pytest.raises(PromptError, match="no audio part"):
        model.ask([["just", " text"]])


def test_kang_roy_names(kang_roy_model, clips) -> None:
    model = speechllm.load(kang_roy_model, device="cpu")
    options = {"max_new_tokens": 6}
    summary = model.generate_audio_response(clips[3], "summarize the following article: ", **options)
    assert summary == model.ask(["summarize the following article: ", Path(clips[3])], **options)
    samples, rate = sf.read(clips[1], dtype="float32")
    batch = model.generate_audio_response(
        [clips[3], (samples, rate)], "summarize the following article: ", batch_size=2, **options
    )
    assert batch[0] == summary and len(batch) == 2

    calls = []
    generate = model.model.llm.lm.generate
    model.model.llm.lm.generate = lambda **kw: calls.append(kw) or generate(**kw)
    text = "compare it with the article"
    reply = model.generate_text_response(text, **options)
    assert isinstance(reply, str)
    prefix, suffix = chat_ids(model.tokenizer, ChatTemplate("[|User|]", "</s>[|Assistant|]"))
    ids = torch.tensor(prefix + text_ids(model.tokenizer, text) + suffix)
    expected = model.model.llm.lm.get_input_embeddings()(ids)
    assert torch.allclose(calls[0]["inputs_embeds"][0], expected)
    assert model.generate_text_response([text, "the article says"], batch_size=2, **options)[0] == reply
    with pytest.raises(ValueError, match="Kang & Roy model"):
        model.transcribe(clips[0])


# --------------------------------------------------------------------------- command line


def run_main(args: list[str], capsys, stdin: str | None = None, monkeypatch=None) -> str:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    main(args)
    return capsys.readouterr().out


def test_transcribe_cli_batched_json_equals_one_at_a_time(bloomzmms_models, clips, capsys) -> None:
    model = str(bloomzmms_models["ce"])
    common = [
        "transcribe",
        "--model",
        model,
        "--num-beams",
        "2",
        "--max-new-tokens",
        "5",
        "--threads",
        "1",
        "--device",
        "cpu",
        *clips,
    ]
    batched = run_main([*common, "--batch-size", "3", "--json"], capsys)
    single = run_main([*common, "--batch-size", "1", "--json"], capsys)
    rows = [json.loads(line) for line in batched.splitlines()]
    assert batched == single
    assert [row["audio"] for row in rows] == clips
    assert [row["text"] for row in rows] == SpeechModel.from_pretrained(model, device="cpu").transcribe(
        clips, num_beams=2, max_new_tokens=5
    )
    tsv = run_main([*common, "--batch-size", "2"], capsys)
    assert tsv.splitlines() == [f"{row['audio']}\t{row['text']}" for row in rows]


def test_ask_cli_answers_many_prompts_in_one_load(
    bloomzmms_models, clips, capsys, monkeypatch, tmp_path
) -> None:
    model = str(bloomzmms_models["ce"])
    prompts = ask_prompts(clips)
    expected = speechllm.load(model, device="cpu").ask(prompts, num_beams=1, max_new_tokens=6)
    prompt_file = tmp_path / "prompts.txt"
    lines = [
        prompts[0],
        "",
        json.dumps(prompts[1]),
        *prompts[2:],
    ]  # a blank line; a prompt with newlines as JSON
    prompt_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    common = ["ask", "--model", model, "--num-beams", "1", "--max-new-tokens", "6", "--threads", "1"]
    out = run_main([*common, "--prompts", str(prompt_file), "--batch-size", "2", "--json"], capsys)
    assert [json.loads(line) for line in out.splitlines()] == [
        {"prompt": p, "answer": a} for p, a in zip(prompts, expected, strict=True)
    ]
    out = run_main([*common, "--prompts", "-"], capsys, stdin="\n".join(lines), monkeypatch=monkeypatch)
    assert out.splitlines() == [" ".join(a.splitlines()) for a in expected]
    out = run_main([*common, "--prompt", prompts[0], "--prompt", prompts[3], "--json"], capsys)
    assert [json.loads(line)["answer"] for line in out.splitlines()] == [expected[0], expected[3]]


def test_ask_cli_names_the_bad_prompt_line(tmp_path, clips) -> None:
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text(f"Repeat: {{audio:{clips[0]}}}\nno audio here\n", encoding="utf-8")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "speechllm.cli",
            "ask",
            "--model",
            str(tmp_path / "nowhere"),
            "--prompts",
            str(prompt_file),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"{prompt_file}:2: the prompt has no {{audio:PATH}} part" in done.stderr
