"""Model directories (speechllm.json + safetensors) and the `speechllm transcribe` CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from speechllm.models.export import ModelDirError, build_model, load_model_dir, save_model_dir


@pytest.fixture()
def exported(tiny_spec, tmp_path):
    torch.manual_seed(0)
    model, _ = build_model(tiny_spec, with_ctc=True, with_llm=False)
    with torch.no_grad():
        for p in model.adaptor.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = tmp_path / "model"
    save_model_dir(model, tiny_spec, out)
    return model, out


def test_export_holds_only_trained_weights_and_round_trips(exported):
    model, out = exported
    spec = json.loads((out / "speechllm.json").read_text())
    assert spec["format"] == "speechllm-model/1" and spec["prompt"]["prefix"] == "Repeat the sentence: "
    from safetensors.torch import load_file

    stored = load_file(str(out / "model.safetensors"))
    assert not any(k.startswith(("frontend.encoder.", "ctc_head.", "llm.")) for k in stored)
    loaded, tok, _ = load_model_dir(out, with_ctc=True, with_llm=False)
    for key, value in stored.items():
        assert torch.equal(loaded.state_dict()[key], value)
    # The frozen CTC head is the LLM's input embedding cut to the tokenizer's vocabulary.
    from transformers import AutoModelForCausalLM

    emb = AutoModelForCausalLM.from_pretrained(spec["llm"]["name_or_path"]).get_input_embeddings().weight
    assert loaded.ctc_head.ctc_lo.weight.shape[0] == len(tok) < emb.shape[0]
    assert torch.equal(loaded.ctc_head.ctc_lo.weight, emb[: len(tok)])


def test_not_a_model_dir(tmp_path):
    with pytest.raises(ModelDirError, match="no speechllm.json"):
        load_model_dir(tmp_path, with_ctc=True, with_llm=False)


def test_weights_of_another_shape_are_a_one_line_error_naming_the_file(exported):
    _, out = exported
    spec = json.loads((out / "speechllm.json").read_text())
    spec["adaptor"]["llm_hidden_size"] += 1  # the stored post-encoder no longer fits the configured one
    (out / "speechllm.json").write_text(json.dumps(spec))
    with pytest.raises(
        ModelDirError, match=r"model\.safetensors: adaptor\.postencoder\.linear_in\.(weight|bias) has shape"
    ):
        load_model_dir(out, with_ctc=True, with_llm=False)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_or_missing_weights_file_is_a_one_line_error_naming_it(exported, damage):
    _, out = exported
    weights = out / "model.safetensors"
    if damage == "truncate":  # e.g. a copy cut short
        weights.write_bytes(weights.read_bytes()[:5])
    else:
        weights.unlink()
    with pytest.raises(ModelDirError, match=r"model\.safetensors: (unreadable|missing)"):
        load_model_dir(out, with_ctc=True, with_llm=False)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "speechllm.cli", *args], capture_output=True, text=True)


def test_transcribe_any_format_prints_tsv(exported, tmp_path):
    _, out = exported
    stereo = tmp_path / "stereo_44k.flac"
    t = np.arange(44100) / 44100
    sf.write(str(stereo), np.stack([np.sin(2 * np.pi * 200 * t)] * 2, axis=1) * 0.2, 44100)
    mono = tmp_path / "mono_8k.wav"
    sf.write(str(mono), (np.sin(2 * np.pi * 300 * np.arange(12000) / 8000) * 0.2).astype(np.float32), 8000)
    res = run_cli("transcribe", "--model", str(out), str(stereo), str(mono))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(stereo), str(mono)]
    assert all(len(line.split("\t")) == 2 for line in lines)


def test_transcribe_names_an_unreadable_file(exported, tmp_path):
    _, out = exported
    bad = tmp_path / "broken.wav"
    bad.write_text("not audio at all")
    res = run_cli("transcribe", "--model", str(out), str(bad))
    assert res.returncode != 0
    assert str(bad) in res.stderr and "Traceback" not in res.stderr


def test_help_shows_an_example():
    res = run_cli("transcribe", "--help")
    assert res.returncode == 0 and "example:" in res.stdout
