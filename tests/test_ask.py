"""`speechllm ask`: mixed text/{audio:PATH} prompts into a BLOOMZMMS or Kang & Roy model's LLM, and its
errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import HubertConfig, HubertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from speechllm.cli import main
from speechllm.evaluate.decode import encode_speech, load_wavs
from speechllm.infer import AudioPart, PromptError, answer, parse_prompt
from speechllm.models.export import build_model, kang_roy_spec, load_model_dir, save_model_dir
from speechllm.models.kang_roy import ChatTemplate, chat_ids, text_ids

SR = 16000


def write_tone(path: Path, seconds: float, freq: float, rate: int = SR) -> Path:
    t = np.arange(int(seconds * rate)) / rate
    sf.write(str(path), (0.2 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate)
    return path


@pytest.fixture()
def clips(tmp_path) -> list[Path]:
    return [
        write_tone(tmp_path / "a.wav", 1.0, 220.0),
        write_tone(tmp_path / "b.flac", 0.8, 330.0, rate=8000),
    ]


class GenerateSpy:
    """Stands in for the LM's HF `generate`: records the prompt embeddings, returns fixed tokens."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.calls: list[dict] = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        return torch.tensor([self.tokens])


# --------------------------------------------------------------------------- prompt parsing


def test_parse_prompt_keeps_order_of_text_and_audio() -> None:
    parts = parse_prompt("Compare {audio:a.wav} with { audio:ignored} and {audio: dir/b c.flac }.")
    assert parts == [
        "Compare ",
        AudioPart("a.wav"),
        " with { audio:ignored} and ",
        AudioPart("dir/b c.flac"),
        ".",
    ]
    assert parse_prompt("{audio:x.wav}{audio:y.wav}") == [AudioPart("x.wav"), AudioPart("y.wav")]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("just text", "no {audio:PATH} part"),
        ("say {audio:} now", "empty {audio:} part"),
        ("say {audio:a.wav now", "unclosed"),
    ],
)
def test_parse_prompt_errors(prompt: str, message: str) -> None:
    with pytest.raises(PromptError, match=message.replace("{", r"\{").replace("}", r"\}")):
        parse_prompt(prompt)


# --------------------------------------------------------------------------- BLOOMZMMS


@pytest.fixture()
def bloomzmms_dir(tiny_spec, tmp_path) -> Path:
    torch.manual_seed(0)
    spec = {**tiny_spec, "stage": "ce"}
    model, _ = build_model(spec, with_ctc=False, with_llm=True)
    out = tmp_path / "ce_model"
    save_model_dir(model, spec, out)
    return out


def test_bloomzmms_speech_vectors_go_where_each_audio_part_stands(bloomzmms_dir, clips) -> None:
    model, tokenizer, _ = load_model_dir(bloomzmms_dir, with_ctc=False, with_llm=True)
    model.eval()
    spy = GenerateSpy([5, 6, 7, tokenizer.eos_token_id])
    model.llm.lm.generate = spy
    texts = ["Repeat the sentence: ", " and then ", ". "]
    parts = [texts[0], AudioPart(str(clips[0])), texts[1], AudioPart(str(clips[1])), texts[2]]
    out = answer(model, tokenizer, "bloomzmms", parts, SR, "cpu", num_beams=3, max_new_tokens=9)
    assert out == tokenizer.decode([5, 6, 7], skip_special_tokens=True).strip()
    (call,) = spy.calls
    assert call["num_beams"] == 3 and call["max_new_tokens"] == 9
    embed = model.llm.lm.get_input_embeddings()
    with torch.no_grad():
        speech = [encode_speech(model, [str(c)], SR, [None], "cpu")[0][0] for c in clips]
        text = [embed(torch.tensor(tokenizer(t, add_special_tokens=False).input_ids)) for t in texts]
        expected = torch.cat([text[0], speech[0], text[1], speech[1], text[2]])
    assert speech[0].shape[0] != speech[1].shape[0]  # the two clips give different lengths: order is visible
    assert call["inputs_embeds"].shape == (1, *expected.shape)
    assert torch.allclose(call["inputs_embeds"][0], expected, atol=1e-6)
    assert call["attention_mask"].all()


def test_ask_cli_prints_the_answer(bloomzmms_dir, clips, capsys) -> None:
    main(
        [
            "ask",
            "--model",
            str(bloomzmms_dir),
            "--prompt",
            f"Repeat the sentence: {{audio:{clips[0]}}}. ",
            "--max-new-tokens",
            "4",
            "--num-beams",
            "2",
            "--threads",
            "1",
        ]
    )
    printed = capsys.readouterr().out
    model, tokenizer, _ = load_model_dir(bloomzmms_dir, with_ctc=False, with_llm=True)
    model.eval()
    parts = ["Repeat the sentence: ", AudioPart(str(clips[0])), ". "]
    assert (
        printed
        == answer(model, tokenizer, "bloomzmms", parts, SR, "cpu", num_beams=2, max_new_tokens=4) + "\n"
    )


def test_ask_refuses_a_ctc_only_model(tiny_spec, tmp_path, clips) -> None:
    model, _ = build_model(tiny_spec, with_ctc=True, with_llm=False)
    ctc_dir = tmp_path / "ctc"
    save_model_dir(model, tiny_spec, ctc_dir)
    with pytest.raises(SystemExit) as exc:
        main(["ask", "--model", str(ctc_dir), "--prompt", f"Repeat: {{audio:{clips[0]}}}"])
    message = str(exc.value.code)
    assert (
        message.startswith("speechllm ask: error:")
        and "CTC-stage model" in message
        and "transcribe" in message
    )


def test_ask_names_a_missing_audio_file_before_loading_anything(tmp_path) -> None:
    missing = tmp_path / "nowhere" / "clip.wav"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "speechllm.cli",
            "ask",
            "--model",
            str(tmp_path / "no_model"),
            "--prompt",
            f"Summarize: {{audio:{missing}}}",
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert (
        lines[0].startswith("speechllm ask: error:")
        and str(missing) in lines[0]
        and "no such audio" in lines[0]
    )


@pytest.mark.parametrize("command", ["ask", "transcribe", "plan"])
def test_help_shows_an_example(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "example" in capsys.readouterr().out


# --------------------------------------------------------------------------- Kang & Roy


def chat_tokenizer(out_dir: Path) -> PreTrainedTokenizerFast:
    """A small BPE tokenizer with LLaMA's special ids (<unk> 0, <s> 1, </s> 2) that prepends <s>."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    texts = ["[|User|] summarize the following article</s>[|Assistant|] the article says", "compare it"] * 10
    tok.train_from_iterator(
        texts,
        trainer=trainers.BpeTrainer(
            vocab_size=90, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
        ),
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out_dir)
    return fast


def kang_roy_model_dir(root: Path, initializer_range: float = 0.02, projection_scale: float = 1.0) -> Path:
    """A tiny Kang & Roy model directory `root/kd` over a LLaMA chat LLM and a HuBERT saved under `root`.

    `initializer_range` sets the LLaMA's weight spread; `projection_scale` scales the speech projection."""
    torch.manual_seed(0)
    tokenizer = chat_tokenizer(root / "llm")
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=4,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
            initializer_range=initializer_range,
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
            conv_bias=True,
            feat_extract_norm="layer",
            do_stable_layer_norm=True,
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=2,
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
    model, _ = build_model(spec, with_ctc=False, with_llm=True)
    with torch.no_grad():
        model.encoder.embed_projection.weight.mul_(projection_scale)
    save_model_dir(model, spec, root / "kd")
    return root / "kd"


@pytest.fixture()
def kang_roy_dir(tmp_path) -> Path:
    return kang_roy_model_dir(tmp_path)


def test_kang_roy_prompt_goes_inside_the_chat_template(kang_roy_dir, clips) -> None:
    model, tokenizer, spec = load_model_dir(kang_roy_dir, with_ctc=False, with_llm=True)
    model.eval()
    spy = GenerateSpy([7, 8, tokenizer.eos_token_id])
    model.llm.lm.generate = spy
    parts = [AudioPart(str(clips[1])), " compare it with ", AudioPart(str(clips[0]))]
    out = answer(model, tokenizer, "kang_roy", parts, SR, "cpu", num_beams=1, max_new_tokens=5)
    assert out == tokenizer.decode([7, 8], skip_special_tokens=True).strip()
    prefix, suffix = chat_ids(tokenizer, ChatTemplate(**{k: spec["chat"][k] for k in ("prefix", "suffix")}))
    assert prefix[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in text_ids(tokenizer, parts[1])
    embed = model.llm.lm.get_input_embeddings()
    with torch.no_grad():
        speech = [model.encode(*load_wavs([str(c)], SR, [None], "cpu"))[0] for c in (clips[1], clips[0])]
        ids = [prefix, text_ids(tokenizer, parts[1]), suffix]
        text = [embed(torch.tensor(i)) for i in ids]
        expected = torch.cat([text[0], speech[0], text[1], speech[1], text[2]])
    (call,) = spy.calls
    assert call["inputs_embeds"].shape == (1, *expected.shape)
    assert torch.allclose(call["inputs_embeds"][0], expected, atol=1e-6)
    assert call["num_beams"] == 1  # greedy, as the reference


def test_transcribe_points_kang_roy_models_to_ask(kang_roy_dir, clips) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["transcribe", "--model", str(kang_roy_dir), str(clips[0])])
    assert "speechllm ask" in str(exc.value.code)


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [
        ("transcribe", "--batch-size", "-1"),  # decoded nothing and printed nothing, exit 0
        ("transcribe", "--batch-size", "0"),
        ("ask", "--num-beams", "0"),  # fell back to the default beam size
        ("ask", "--max-new-tokens", "0"),
    ],
)
def test_counts_below_one_are_refused_before_the_model_loads(command, option, value, capsys) -> None:
    args = ["--prompt", "Repeat the sentence: {audio:a.wav}. "] if command == "ask" else ["a.wav"]
    with pytest.raises(SystemExit) as exc:
        main([command, "--model", "no/such-model", option, value, *args])
    assert exc.value.code == 2 and f"argument {option}: " in capsys.readouterr().err


def test_a_prompts_file_that_is_not_utf8_is_named(tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("Répète: {audio:a.wav}\n".encode("latin-1"))
    with pytest.raises(SystemExit, match=f"speechllm ask: error: --prompts {prompts}: not UTF-8 text"):
        main(["ask", "--model", str(tmp_path / "no_model"), "--prompts", str(prompts)])


def test_transcribe_names_a_missing_audio_file_before_loading_anything(tmp_path) -> None:
    missing = tmp_path / "nowhere.wav"
    with pytest.raises(SystemExit, match=f"speechllm transcribe: error: {missing}: no such audio file"):
        main(["transcribe", "--model", str(tmp_path / "no_model"), str(missing)])
