"""Character-CTC fine-tuning of the demo speech encoder (demo/encoder_ctc.py,
`speechllm models demo-speech-encoder`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import Wav2Vec2ForCTC, Wav2Vec2Model, Wav2Vec2Processor

from speechllm.data.manifest import ManifestError, write_manifest
from speechllm.demo.build import build_speech_encoder
from speechllm.demo.encoder_ctc import (
    CtcFinetuneConfig,
    character_vocab,
    finetune_encoder,
    read_transcribed,
)

SR = 16_000
ENCODER = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "conv_dim": [32, 32, 32],
    "conv_stride": [5, 4, 4],
    "conv_kernel": [10, 4, 4],
    "num_conv_pos_embeddings": 16,
    "num_conv_pos_embedding_groups": 2,
}
TONES = {"a": 300.0, "b": 700.0, "c": 1300.0, "d": 2200.0}  # one tone per character: a learnable "speech"
# CTC sits on the all-blank plateau for a few hundred updates before it aligns (as on the demo speech).
FINETUNE = CtcFinetuneConfig(
    updates=1000,
    max_padded_seconds=8.0,
    num_buckets=2,
    lr=3e-3,
    warmup_steps=20,
    grad_clip=5.0,
    dropout=0.0,
    log_every=50,
)


def tone_speech(text: str) -> np.ndarray:
    """0.08 s of a character's tone and a 0.03 s gap per letter (repeats stay apart), 0.06 s of silence per
    space and around the utterance."""
    t = np.arange(int(0.08 * SR)) / SR
    gap, silence = np.zeros(int(0.03 * SR)), np.zeros(int(0.06 * SR))
    parts = [silence]
    for char in text:
        parts.extend([silence] if char == " " else [0.3 * np.sin(2 * np.pi * TONES[char] * t), gap])
    parts.append(silence)
    return np.concatenate(parts).astype(np.float32)


def tone_manifest(path: Path, texts: list[str]) -> Path:
    records = []
    for i, text in enumerate(texts):
        wav = path.parent / f"{path.stem}_{i}.wav"
        sf.write(wav, tone_speech(text), SR)
        records.append(
            {
                "id": f"{path.stem}_{i}",
                "language": "en_us",
                "audio": str(wav),
                "transcription": text,
                "num_samples": len(tone_speech(text)),
                "sampling_rate": SR,
            }
        )
    write_manifest(path, records)
    return path


@pytest.fixture(scope="module")
def tone_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tones")
    rng = np.random.default_rng(0)

    def texts(n: int) -> list[str]:
        return [
            " ".join("".join(rng.choice(list(TONES), size=rng.integers(2, 4))) for _ in range(2))
            for _ in range(n)
        ]

    return {
        "train": tone_manifest(root / "train.jsonl", texts(24)),
        "dev": tone_manifest(root / "dev.jsonl", texts(6)),
    }


def test_character_vocab_has_the_ctc_specials_first():
    vocab = character_vocab(["ab ba", "ca"])
    assert list(vocab) == ["<pad>", "<unk>", "|", "a", "b", "c"] and vocab["<pad>"] == 0


def test_finetuning_learns_the_characters_and_saves_an_mms_all_shaped_model(tone_data, tmp_path):
    """Dev CER falls from the random start; the directory loads as an encoder and as a character CTC model."""
    out = tmp_path / "mms"
    build_speech_encoder(out, {"speech_encoder": ENCODER}, SR, seed=0)
    random_encoder = Wav2Vec2Model.from_pretrained(out).state_dict()
    torch.set_num_threads(2)
    report = finetune_encoder(out, tone_data["train"], tone_data["dev"], FINETUNE, SR, seed=0)
    assert report["updates"] == 1000 and report["train_utterances"] == 24
    assert report["final_loss"] < 0.1 * report["first_loss"], report
    assert report["dev_cer"] < 0.2 < 1.0 < report["dev_cer_before"], report
    assert json.loads((out / "ctc_finetune.json").read_text())["dev_cer"] == report["dev_cer"]

    encoder = Wav2Vec2Model.from_pretrained(out)  # what the pipeline's frontend loads
    assert any(not torch.equal(v, random_encoder[k]) for k, v in encoder.state_dict().items())
    asr = Wav2Vec2ForCTC.from_pretrained(out).eval()
    # the fine-tuned weights themselves, not a fresh initialisation under the CTC checkpoint's names
    tuned = asr.wav2vec2.state_dict()
    assert encoder.state_dict().keys() == tuned.keys()
    assert all(torch.equal(v, tuned[k]) for k, v in encoder.state_dict().items())
    processor = Wav2Vec2Processor.from_pretrained(out)  # the hub model's usage: normalise, logits, decode
    with torch.no_grad():
        logits = asr(
            processor(tone_speech("dcb a"), sampling_rate=SR, return_tensors="pt").input_values
        ).logits
    assert processor.batch_decode(logits.argmax(-1))[0].replace(" ", "") == "dcba"  # word gaps are subtler


def test_an_empty_transcript_names_the_manifest_line(tone_data, tmp_path):
    bad = tmp_path / "bad.jsonl"
    lines = tone_data["train"].read_text().splitlines()[:3]
    record = json.loads(lines[1])
    record["transcription"] = " "
    bad.write_text("\n".join([lines[0], json.dumps(record), lines[2]]) + "\n")
    out = tmp_path / "mms"
    build_speech_encoder(out, {"speech_encoder": ENCODER}, SR, seed=0)
    with pytest.raises(ManifestError, match=rf"{bad}:2: empty 'transcription'"):
        finetune_encoder(out, bad, tone_data["dev"], FINETUNE, SR, seed=0)


def test_an_empty_manifest_is_an_error_not_an_endless_wait(tone_data, tmp_path):
    """No training utterance: the sampler yields no batch, and the update loop would never end."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ManifestError, match=rf"{empty}: no utterances"):
        read_transcribed(empty)
    out = tmp_path / "mms"
    build_speech_encoder(out, {"speech_encoder": ENCODER}, SR, seed=0)
    with pytest.raises(ManifestError, match=rf"{empty}: no utterances"):
        finetune_encoder(out, empty, tone_data["dev"], FINETUNE, SR, seed=0)
    with pytest.raises(ManifestError, match=rf"{empty}: no utterances"):
        finetune_encoder(out, tone_data["train"], empty, FINETUNE, SR, seed=0)


def run_cli(tmp_path: Path, updates: int, *manifest_args: str) -> subprocess.CompletedProcess:
    settings = {
        "demo_build": {
            "speech_encoder": {**ENCODER, "ctc_finetune": {**FINETUNE.__dict__, "updates": updates}}
        },
        "sampling_rate": SR,
        "seed": 0,
    }
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "speechllm.cli",
            "models",
            "demo-speech-encoder",
            "--settings",
            json.dumps(settings),
            "--out-dir",
            str(tmp_path / "mms"),
            *manifest_args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_builds_the_encoder_atomically(tone_data, tmp_path):
    """0 updates: the random encoder alone; updates without manifests: a clear error and no directory; a
    fine-tuning that fails after the encoder was written leaves neither the directory nor its temp copy."""
    res = run_cli(tmp_path, 0)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "mms/config.json").is_file() and not (tmp_path / "mms/ctc_finetune.json").exists()
    res = run_cli(tmp_path / "second", 5)
    assert res.returncode != 0 and "needs --train-manifest and --dev-manifest" in res.stderr
    assert not (tmp_path / "second").exists() or not any((tmp_path / "second").iterdir())
    bad = tmp_path / "bad.jsonl"
    lines = tone_data["train"].read_text().splitlines()
    bad.write_text("\n".join([*lines[:-1], "{not json"]) + "\n")  # read after the encoder is built
    (tmp_path / "failed").mkdir()
    res = run_cli(
        tmp_path / "failed", 5, "--train-manifest", str(bad), "--dev-manifest", str(tone_data["dev"])
    )
    assert res.returncode != 0 and f"{bad}:{len(lines)}: not valid JSON" in res.stderr
    assert list((tmp_path / "failed").iterdir()) == []
    res = run_cli(
        tmp_path / "third",
        5,
        "--train-manifest",
        str(tone_data["train"]),
        "--dev-manifest",
        str(tone_data["dev"]),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads((tmp_path / "third/mms/ctc_finetune.json").read_text())["updates"] == 5
