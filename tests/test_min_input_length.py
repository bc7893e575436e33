"""Clips too short for the model: the shortest input follows the encoder's and the adaptor's frame arithmetic,
and a shorter clip is one line naming its file (transcribe, ask, evaluation, training), never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from speechllm.audio import AudioError
from speechllm.data.manifest import read_manifest, write_manifest
from speechllm.models.adaptor import AdaptorConfig, SpeechAdaptor
from speechllm.models.export import build_model, save_model_dir
from speechllm.models.frames import (
    InputTooShortError,
    adaptor_frames_from_config,
    conv_output_length,
    conv_stack_length,
    min_input_samples,
)

REPO = Path(__file__).resolve().parents[1]
SR = 16000


def arch(name: str) -> tuple[list[int], list[int]]:
    data = json.loads((REPO / "config/models" / name).read_text())
    return data["conv_kernel"], data["conv_stride"]


def brute_force_min(output: object) -> int:
    return next(n for n in range(1, 100_000) if output(n) >= 1)


def test_paper_and_demo_minimums_follow_the_frame_arithmetic():
    import yaml

    # MMS-1B: 20 ms frames (25 ms receptive field); the adaptor needs 11 frames: 400 + 10 x 320 samples.
    mms = min_input_samples(
        lambda n: conv_stack_length(n, *arch("mms-1b-all.json")), AdaptorConfig().output_frames
    )
    assert (
        mms
        == 3600
        == brute_force_min(
            lambda n: AdaptorConfig().output_frames(conv_stack_length(n, *arch("mms-1b-all.json")))
        )
    )
    # The demo encoder (10 ms frames, 15 ms receptive field) with the demo adaptor, read from config.yaml.
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    encoder = config["models"]["demo_build"]["speech_encoder"]
    demo = min_input_samples(
        lambda n: conv_stack_length(n, encoder["conv_kernel"], encoder["conv_stride"]),
        adaptor_frames_from_config(config["models"]["adaptor"]),
    )
    assert demo == 240 + 10 * 160 == 1840
    # Kang & Roy: HuBERT-large (20 ms) and AvgPool1d(8, 4): 8 frames.
    hubert = min_input_samples(
        lambda n: conv_stack_length(n, *arch("hubert-large-ls960-ft.json")),
        lambda t: conv_output_length(t, 8, 4),
    )
    assert hubert == 400 + 7 * 320


@pytest.fixture()
def ctc_model(tiny_spec):
    torch.manual_seed(0)
    model, _ = build_model(tiny_spec, with_ctc=True, with_llm=False)
    return model.eval()


def test_the_adaptor_checks_lengths_before_its_convolutions(ctc_model):
    config = ctc_model.adaptor.config
    adaptor = SpeechAdaptor(config).eval()
    shortest = adaptor.min_input_frames()
    assert shortest == brute_force_min(config.output_frames) == 11
    adaptor(torch.randn(1, shortest, 16), torch.tensor([shortest]))
    for frames in (shortest - 1, 3, 1):  # 3 frames used to fail inside Conv2d with a RuntimeError
        with pytest.raises(InputTooShortError, match=f"needs at least {shortest} frames") as err:
            adaptor(torch.randn(1, frames, 16), torch.tensor([frames]))
        assert err.value.indices == [0]
    # A short utterance padded inside a batch of long ones is refused too (it would yield no speech vector).
    with pytest.raises(InputTooShortError) as err:
        adaptor(torch.randn(3, 40, 16), torch.tensor([40, 5, 40]))
    assert err.value.indices == [1]


def test_the_model_minimum_is_exact(ctc_model):
    shortest = ctc_model.min_input_samples()
    frames = lambda n: int(ctc_model.frontend.output_lengths(torch.tensor([n]))[0])  # noqa: E731
    assert shortest == brute_force_min(lambda n: ctc_model.adaptor.config.output_frames(frames(n)))
    with torch.no_grad():
        out = ctc_model.encode(torch.randn(1, shortest), torch.tensor([shortest]))
        assert out.speech_lengths.tolist() == [1]
        with pytest.raises(InputTooShortError):
            ctc_model.encode(torch.randn(1, shortest - 1), torch.tensor([shortest - 1]))


def write_clip(path: Path, samples: int) -> Path:
    sf.write(str(path), (0.1 * np.sin(np.arange(samples) / 5)).astype(np.float32), SR)
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "speechllm.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_transcribe_names_a_too_short_clip_in_one_line(ctc_model, tiny_spec, tmp_path):
    save_model_dir(ctc_model, tiny_spec, tmp_path / "model")
    shortest = ctc_model.min_input_samples()
    for samples in (shortest - 1, 30):  # a few frames short, and too short for the subsampling convolutions
        clip = write_clip(tmp_path / f"short_{samples}.wav", samples)
        res = run_cli("transcribe", "--model", str(tmp_path / "model"), str(clip))
        assert res.returncode != 0
        assert "Traceback" not in res.stderr, res.stderr
        (line,) = [line for line in res.stderr.splitlines() if str(clip) in line]
        assert f"is too short for this model, which needs at least {shortest / SR:.4f} s" in line
    fine = write_clip(tmp_path / "fine.wav", shortest)
    res = run_cli("transcribe", "--model", str(tmp_path / "model"), str(fine))
    assert res.returncode == 0 and res.stdout.startswith(f"{fine}\t"), res.stderr


def test_ask_names_a_too_short_clip(tiny_spec, tmp_path):
    from speechllm.cli import main

    torch.manual_seed(0)
    spec = {**tiny_spec, "stage": "ce"}
    model, _ = build_model(spec, with_ctc=False, with_llm=True)
    save_model_dir(model, spec, tmp_path / "ce")
    clip = write_clip(tmp_path / "blip.wav", 40)
    with pytest.raises(SystemExit) as exc:
        main(["ask", "--model", str(tmp_path / "ce"), "--prompt", f"Repeat the sentence: {{audio:{clip}}}. "])
    message = str(exc.value.code)
    assert "speechllm ask: error:" in message and f"{clip}: " in message and "too short" in message
    assert "\n" not in message


def test_evaluation_names_the_clip_and_its_manifest_line(ctc_model, tmp_path):
    from speechllm.evaluate.benchmarks import _utterance_clip as clip_of
    from speechllm.evaluate.ctc_search import CTCSearch
    from speechllm.evaluate.system import bloomzmms_speech_reader

    short = write_clip(tmp_path / "short.wav", 50)
    manifest = tmp_path / "test.jsonl"
    write_manifest(manifest, [{"id": "a", "audio": str(short), "raw_transcription": "x"}])
    (record,) = read_manifest(manifest)
    read = bloomzmms_speech_reader(ctc_model, None, SR, torch.device("cpu"), CTCSearch())
    with pytest.raises(AudioError, match=f"{short} \\({manifest}:1\\): 0.0031 s .* too short"):
        read([clip_of(record)])


def test_training_refuses_clips_shorter_than_the_model_up_front(tmp_path):
    from speechllm.train.commands import check_min_durations

    manifest = tmp_path / "train.jsonl"
    write_manifest(
        manifest,
        [
            {"id": "long", "audio": "a.wav", "num_samples": 4000, "sampling_rate": SR},
            {"id": "sp1.1-edge", "audio": "b.wav", "num_samples": 2000, "sampling_rate": SR, "speed": 1.1},
        ],
    )
    records = read_manifest(manifest)
    check_min_durations(records[:1], 1840, SR)
    with pytest.raises(
        ValueError,
        match=f"{manifest}:2: utterance sp1.1-edge has 0.1137 s of audio after speed "
        "perturbation, shorter than the model's shortest input 0.1150 s",
    ):
        check_min_durations(records, 1840, SR)


def test_a_too_short_clip_in_a_training_batch_is_named(ctc_model, tmp_path):
    """The safety net behind the up-front check: the objective names the batch's too-short clip."""
    from speechllm.data.batches import Batch
    from speechllm.train.objectives import ObjectiveModule

    manifest = tmp_path / "train.jsonl"
    write_manifest(manifest, [{"id": "ok", "audio": "ok.wav"}, {"id": "blip", "audio": "blip.wav"}])
    records = read_manifest(manifest)
    batch = Batch(
        torch.randn(2, 4000),
        torch.tensor([4000, 60]),
        records,
        ctc_targets=[[5], [6]],
        lid=torch.tensor([1, 1]),
    )
    with pytest.raises(InputTooShortError, match=f"blip.wav \\({manifest}:2\\): "):
        ObjectiveModule(ctc_model, "ctc")(batch)
