"""Audio input and split preparation: any readable format in, clear errors naming file and line out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechllm.audio import AudioError, load_audio, perturbed_length, speed_perturb
from speechllm.data.manifest import ManifestError, read_manifest, write_manifest
from speechllm.data.prepare import prepare_split

SR = 16000


def tone(seconds: float, sr: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    wav = 0.3 * np.sin(2 * np.pi * 220 * t).astype(np.float32)
    return np.stack([wav] * channels, axis=1) if channels > 1 else wav


def record(path: Path, text: str = "Hello there.", uid: str = "u1", num_samples: int | None = None) -> dict:
    n = num_samples if num_samples is not None else sf.info(str(path)).frames if path.exists() else 16000
    return {
        "id": uid,
        "language": "en_us",
        "audio": str(path),
        "num_samples": n,
        "sampling_rate": SR,
        "raw_transcription": text,
    }


def prepare(
    manifest: Path,
    out_dir: Path,
    max_duration: float,
    speeds: tuple[float, ...] = (1.0,),
    on_bad_audio: str = "error",
    filter_durations: bool = True,
) -> dict:
    """`prepare_split` of `manifest` into `out_dir`/out.jsonl and r.json, with a 0.1 s minimum duration."""
    return prepare_split(
        manifest,
        out_dir / "out.jsonl",
        out_dir / "r.json",
        SR,
        0.1,
        max_duration,
        list(speeds),
        on_bad_audio,
        filter_durations=filter_durations,
    )


def test_any_rate_and_channels_become_16k_mono(tmp_path):
    path = tmp_path / "stereo44k.flac"
    sf.write(str(path), tone(1.0, 44100, channels=2), 44100)
    wav = load_audio(path, SR)
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(wav.shape[0] - SR) <= 1


def test_real_clips_load(shared_data):
    clips = sorted((shared_data / "speech").rglob("*.wav")) + sorted((shared_data / "speech").rglob("*.flac"))
    clips += sorted((shared_data / "speech").rglob("*.mp3"))
    assert clips, "no clips found in shared data"
    for clip in clips[:5]:
        wav = load_audio(clip, SR)
        assert wav.ndim == 1 and wav.shape[0] > SR // 10 and np.isfinite(wav).all()


@pytest.mark.parametrize("factor", [0.9, 1.1])
def test_speed_perturbation_changes_length_as_predicted(factor):
    wav = tone(2.0, SR)
    out = speed_perturb(wav, factor, SR)
    assert out.shape[0] == perturbed_length(wav.shape[0], factor, SR)
    assert abs(out.shape[0] - wav.shape[0] / factor) <= 2


def bad_files(tmp_path: Path) -> dict[str, Path]:
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros((0,), dtype=np.float32), SR)
    nan = tmp_path / "nan.wav"
    data = tone(0.5, SR)
    data[100] = np.nan
    sf.write(str(nan), data, SR, subtype="FLOAT")
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio")
    good = tmp_path / "good.wav"
    sf.write(str(good), tone(1.0, SR), SR)
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    zero_bytes = tmp_path / "zero.wav"
    zero_bytes.write_bytes(b"")
    return {
        "missing": tmp_path / "missing.wav",
        "empty": empty,
        "nan": nan,
        "non-audio": text,
        "zero-bytes": zero_bytes,
        "truncated": truncated,
    }


@pytest.mark.parametrize("kind", ["missing", "empty", "nan", "non-audio", "zero-bytes", "truncated"])
def test_bad_audio_is_named_with_its_manifest_line(tmp_path, kind):
    files = bad_files(tmp_path)
    good = tmp_path / "good.wav"
    manifest = tmp_path / "raw.jsonl"
    write_manifest(manifest, [record(good, uid="ok"), record(files[kind], uid="bad", num_samples=16000)])
    with pytest.raises(AudioError) as err:
        prepare(manifest, tmp_path, 30.0)
    message = str(err.value)
    assert str(files[kind]) in message and f"{manifest}:2" in message  # the file, the manifest and its line
    assert not (tmp_path / "out.jsonl").exists()


def test_bad_audio_while_training_names_the_manifest_and_line(tmp_path):
    """The training / evaluation loaders name the manifest too, not just "manifest line N"."""
    from speechllm.data.batches import SpeechDataset

    good = tmp_path / "good.wav"
    sf.write(str(good), tone(1.0, SR), SR)
    manifest = tmp_path / "train.jsonl"
    write_manifest(manifest, [record(good, uid="ok"), record(tmp_path / "gone.wav", uid="gone")])
    dataset = SpeechDataset(read_manifest(manifest), SR)
    with pytest.raises(AudioError, match=f"audio file not found: {tmp_path / 'gone.wav'} \\({manifest}:2\\)"):
        dataset[1]


def test_skip_mode_counts_every_bad_file(tmp_path):
    files = bad_files(tmp_path)
    manifest = tmp_path / "raw.jsonl"
    recs = [record(tmp_path / "good.wav", uid="ok")]
    recs += [record(p, uid=k, num_samples=16000) for k, p in files.items()]
    recs.append(record(tmp_path / "good.wav", text="  ", uid="no-text"))
    write_manifest(manifest, recs)
    report = prepare(manifest, tmp_path, 30.0, speeds=(0.9, 1.0, 1.1), on_bad_audio="skip")
    assert report["counts"]["bad"] == len(files) + 1
    assert {s["id"] for s in report["skipped"]} == set(files) | {"no-text"}
    out = read_manifest(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == ["sp0.9-ok", "ok", "sp1.1-ok"]
    assert out[0]["speed"] == 0.9 and out[0]["transcription"] == "hello there"
    assert out[0]["raw_transcription"] == "Hello there."
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["normalizer"].startswith("transformers==")


def test_duration_filter_is_counted(tmp_path):
    short, long_ = tmp_path / "short.wav", tmp_path / "long.wav"
    sf.write(str(short), tone(0.05, SR), SR)
    sf.write(str(long_), tone(3.0, SR), SR)
    manifest = tmp_path / "raw.jsonl"
    write_manifest(manifest, [record(short, uid="s"), record(long_, uid="l")])
    report = prepare(manifest, tmp_path, 2.0)
    assert report["counts"] == {"input": 2, "too_short": 1, "too_long": 1, "kept": 0, "output": 0}


def test_duration_filter_runs_on_each_speed_perturbed_copy(tmp_path):
    """As ESPnet's stage 4 on `train_*_sp`: a copy goes when its own (perturbed) length is out of bounds, so a
    1.9 s clip with a 2 s limit loses only its 0.9 copy (2.11 s) and a 0.105 s clip only its 1.1 copy
    (0.095 s)."""
    clips = {"long": 1.9, "short": 0.105, "mid": 1.0}
    for uid, seconds in clips.items():
        sf.write(str(tmp_path / f"{uid}.wav"), tone(seconds, SR), SR)
    manifest = tmp_path / "raw.jsonl"
    write_manifest(manifest, [record(tmp_path / f"{uid}.wav", uid=uid) for uid in clips])
    report = prepare(manifest, tmp_path, 2.0, speeds=(0.9, 1.0, 1.1))
    ids = [r["id"] for r in read_manifest(tmp_path / "out.jsonl")]
    assert ids == ["sp0.9-short", "sp0.9-mid", "long", "short", "mid", "sp1.1-long", "sp1.1-mid"]
    assert report["counts"] == {"input": 3, "too_short": 1, "too_long": 1, "kept": 3, "output": 7}
    assert report["dropped_per_speed"] == {"0.9": {"too_long": 1}, "1.1": {"too_short": 1}}
    assert json.loads((tmp_path / "r.json").read_text())["dropped_per_speed"] == report["dropped_per_speed"]


@pytest.mark.parametrize(
    ("seconds", "kept"), [(0.1, False), (0.1 + 1 / SR, True), (2.0 - 1 / SR, True), (2.0, False)]
)
def test_duration_bounds_are_exclusive_as_espnet(tmp_path, seconds, kept):
    """ESPnet keeps a clip when int(min * fs) < samples < int(max * fs): exactly 0.1 s or 2 s is dropped."""
    path = tmp_path / "clip.wav"
    sf.write(str(path), tone(seconds, SR), SR)
    manifest = tmp_path / "raw.jsonl"
    write_manifest(manifest, [record(path, num_samples=round(seconds * SR))])
    report = prepare(manifest, tmp_path, 2.0)
    assert report["counts"]["output"] == int(kept)


def test_test_split_may_keep_every_duration(tmp_path):
    """filter_durations=False (the test split under data.filter_test_durations: false, as ESPnet) keeps
    all."""
    path = tmp_path / "long.wav"
    sf.write(str(path), tone(3.0, SR), SR)
    manifest = tmp_path / "raw.jsonl"
    write_manifest(manifest, [record(path)])
    report = prepare(manifest, tmp_path, 2.0, filter_durations=False)
    assert report["counts"] == {"input": 1, "kept": 1, "output": 1} and report["dropped_per_speed"] == {}


def test_malformed_manifest_names_file_and_line(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a"}\n{not json}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl:2"):
        read_manifest(manifest)
    manifest.write_text('{"id": "a"}\n')
    with pytest.raises(ManifestError, match=r"m\.jsonl:1: missing field\(s\) audio"):
        read_manifest(manifest, required=("id", "audio"))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("raw_transcription", None),
        ("raw_transcription", 5),
        ("audio", None),
        ("sampling_rate", "16000"),
        ("sampling_rate", 0),
        ("num_samples", 1.5),
        ("num_samples", -1),
    ],
)
@pytest.mark.parametrize("on_bad_audio", ["error", "skip"])
def test_a_field_of_the_wrong_type_names_file_line_and_field(tmp_path, field, value, on_bad_audio):
    """Not a traceback from deep inside (ZeroDivisionError, AttributeError on None.lower()), and not skipped:
    a malformed line is no bad audio."""
    good = tmp_path / "good.wav"
    sf.write(good, tone(1.0, SR), SR)
    manifest = tmp_path / "raw.jsonl"
    write_manifest(manifest, [record(good, uid="ok"), {**record(good, uid="bad"), field: value}])
    with pytest.raises(ManifestError, match=rf"raw\.jsonl:2: field {field} must be"):
        prepare(manifest, tmp_path, 30.0, on_bad_audio=on_bad_audio)
    assert not (tmp_path / "out.jsonl").exists()


def test_surrounding_whitespace_of_a_transcript_is_stripped_as_the_reference(tmp_path):
    """The reference reads its transcripts back from Kaldi `text` files, stripped; the synthetic-target
    prompts and the TMI transcription targets are built from the prepared manifest's raw_transcription."""
    clip = tmp_path / "a.wav"
    sf.write(clip, tone(1.0, SR), SR)
    manifest = tmp_path / "raw.jsonl"
    write_manifest(manifest, [record(clip, text="  Hello, there. \t")])
    prepare(manifest, tmp_path, 30.0)
    (out,) = read_manifest(tmp_path / "out.jsonl")
    assert out["raw_transcription"] == "Hello, there." and out["transcription"] == "hello there"
