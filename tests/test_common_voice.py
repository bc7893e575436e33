"""Common Voice 12 subsample on a fake release tree in CV's layout (train.tsv columns, clips/*.mp3)."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechllm.audio import AudioError
from speechllm.cli import main as speechllm
from speechllm.data.common_voice import build_common_voice, combine_manifests
from speechllm.data.hub import SourceError
from speechllm.data.manifest import ManifestError, read_manifest, write_manifest
from speechllm.data.prepare import language_ids

HEADER = "client_id\tpath\tsentence\tup_votes\tdown_votes\tage\tgender\taccents\tlocale\tsegment\n"
# locale -> sentence per clip (repeats: several speakers read the same sentence, as in CV).
CORPUS = {
    "fr": [
        "Il pleut.",
        "Il pleut.",
        "Le chat dort.",
        "Il pleut.",
        "Bonjour à tous.",
        "Le chat dort.",
        "Une phrase unique.",
        "Il pleut.",
        "Bonjour à tous.",
        "Encore une.",
        "Le chat dort.",
        "Il pleut.",
    ],
    "nn-NO": ["Eg et brød.", "Eg et brød.", "Det snør.", "Kva heiter du?", "Det snør."],
    "zh-CN": ["今天很冷。", "我喜欢茶。", "今天很冷。", "你好。"],
}


def make_release(root: Path) -> Path:
    """cv-corpus-12.0-2022-12-07/<locale>/train.tsv + clips/common_voice_<locale>_<n>.mp3 (48 kHz, varied
    length)."""
    release = root / "cv-corpus-12.0-2022-12-07"
    rng = np.random.default_rng(0)
    for locale, sentences in CORPUS.items():
        (release / locale / "clips").mkdir(parents=True)
        lines = [HEADER]
        for n, sentence in enumerate(sentences):
            name = f"common_voice_{locale}_{1000 + n}.mp3"
            seconds = 0.4 + 0.1 * (n % 5)
            wav = (0.1 * rng.standard_normal(int(48000 * seconds))).astype(np.float32)
            sf.write(str(release / locale / "clips" / name), wav, 48000, format="MP3")
            lines.append(f"spk{n % 3}{locale}\t{name}\t{sentence}\t2\t0\t\t\t\t{locale}\t\n")
        (release / locale / "train.tsv").write_text("".join(lines), encoding="utf-8")
    return release


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    return make_release(tmp_path_factory.mktemp("cv"))


def clip_seconds(release: Path, locale: str, name: str) -> float:
    info = sf.info(str(release / locale / "clips" / name))
    return info.frames / info.samplerate


def reference_selection(release: Path, locales: list[str], max_seconds: float, seed: int = 1) -> list[str]:
    """The spec's algorithm written out directly: one seeded stream; group by sentence, shuffle sentences,
    then each sentence's clips; pop one clip per sentence per round until the total first exceeds the
    budget."""
    rng = random.Random(seed)
    chosen = []
    for locale in locales:
        text2clips: dict[str, list[str]] = {}
        for line in (release / locale / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]:
            parts = line.split("\t")
            text2clips.setdefault(parts[2], []).append(parts[1])
        texts = list(text2clips)
        rng.shuffle(texts)
        for text in texts:
            rng.shuffle(text2clips[text])
        total = 0.0
        while total <= max_seconds and any(text2clips.values()):
            for text in texts:
                if text2clips[text]:
                    name = text2clips[text].pop(0)
                    chosen.append(name[:-4])
                    total += clip_seconds(release, locale, name)
                    if total > max_seconds:
                        break
    return chosen


def test_round_robin_is_the_reference_selection(release, tmp_path):
    budget = 2.0  # seconds per language: a few clips each, so the cut matters
    report = build_common_voice(tmp_path, release.parent, budget / 3600, seed=1, threads=2)
    records = read_manifest(tmp_path / "train.jsonl")
    ids = [r["id"] for r in records]
    assert ids == reference_selection(release, sorted(CORPUS), budget)
    for locale in CORPUS:
        secs = [r["num_samples"] / r["sampling_rate"] for r in records if r["language"] == locale]
        assert sum(secs) > budget >= sum(secs[:-1])  # the clip crossing the budget is the last one kept
    fr = [r for r in records if r["language"] == "fr"]
    assert len({r["raw_transcription"] for r in fr}) == len(fr)  # first round: one clip per sentence
    assert report["mode"] == "round_robin" and report["utterances"] == len(records)
    rec = fr[0]
    assert rec["audio"].endswith(f"fr/clips/{rec['id']}.mp3") and rec["sampling_rate"] == 48000
    assert rec["corpus"] == "common_voice" and rec["speaker"].startswith("spk")


def test_whole_language_when_under_budget_and_seed_matters(release, tmp_path):
    build_common_voice(tmp_path / "all", release, 1.0, seed=1)
    records = read_manifest(tmp_path / "all" / "train.jsonl")
    assert sorted(r["id"] for r in records) == sorted(
        f"common_voice_{loc}_{1000 + n}" for loc, s in CORPUS.items() for n in range(len(s))
    )
    fr = [r["raw_transcription"] for r in records if r["language"] == "fr"]
    # Rounds of one clip per sentence still having clips: 5 sentences, then the 3 read twice or more, ...
    assert len(set(fr[:5])) == 5
    assert set(fr[5:8]) == {"Il pleut.", "Le chat dort.", "Bonjour à tous."}
    assert set(fr[8:10]) == {"Il pleut.", "Le chat dort."} and fr[10:] == ["Il pleut.", "Il pleut."]
    build_common_voice(tmp_path / "seed2", release, 1.0, seed=2)
    other = [r["id"] for r in read_manifest(tmp_path / "seed2" / "train.jsonl")]
    assert sorted(other) == sorted(r["id"] for r in records) and other != [r["id"] for r in records]


def test_durations_file_sets_durations_and_language_order(release, tmp_path):
    # Durations file in zenodo's format, gzipped, languages in a non-sorted order (the reference's lang
    # order).
    order = ["zh-CN", "fr", "nn-NO"]
    lines = [
        f"{name}\t{clip_seconds(release, loc, name):.6f}\n"
        for loc in order
        for name in sorted(p.name for p in (release / loc / "clips").iterdir())
    ]
    durations = tmp_path / "cv12_durations.tsv.gz"
    with gzip.open(durations, "wt", encoding="utf-8") as fh:
        fh.writelines(lines)
    build_common_voice(tmp_path / "out", release, 2.0 / 3600, seed=1, durations=durations)
    ids = [r["id"] for r in read_manifest(tmp_path / "out" / "train.jsonl")]
    assert ids == reference_selection(release, order, 2.0)
    assert ids != reference_selection(release, sorted(CORPUS), 2.0)  # the shared stream makes order matter
    # A durations file that lacks a clip the round robin reaches is an error naming the file.
    with gzip.open(durations, "wt", encoding="utf-8") as fh:
        fh.writelines(line for line in lines if "_fr_" not in line or "1000" in line)
    with pytest.raises(SourceError, match="cv12_durations.tsv.gz: no duration"):
        build_common_voice(tmp_path / "bad", release, 2.0 / 3600, seed=1, durations=durations)


def test_published_utterance_list(release, tmp_path):
    wanted = [
        "common_voice_fr_1003",
        "common_voice_zh-CN_1001",
        "common_voice_fr_1000",
        "common_voice_nn-NO_1004",
    ]
    lst = tmp_path / "cv12_train_utts.lst.gz"
    with gzip.open(lst, "wt") as fh:
        fh.write("".join(u + "\n" for u in wanted))
    report = build_common_voice(tmp_path / "out", release, 25.0, seed=1, utterance_list=lst)
    records = read_manifest(tmp_path / "out" / "train.jsonl")
    assert [r["id"] for r in records] == [
        "common_voice_fr_1000",
        "common_voice_fr_1003",
        "common_voice_zh-CN_1001",
        "common_voice_nn-NO_1004",
    ]
    assert records[2]["raw_transcription"] == "我喜欢茶。" and report["mode"] == "utterance_list"
    lst.write_bytes(gzip.compress(b"common_voice_fr_1000\ncommon_voice_fr_99999\n"))
    with pytest.raises(SourceError, match="common_voice_fr_99999"):
        build_common_voice(tmp_path / "out2", release, 25.0, seed=1, utterance_list=lst)


def test_bad_clip_names_file_and_line_or_is_skipped(release, tmp_path):
    broken = make_release(tmp_path / "broken")
    (broken / "nn-NO" / "clips" / "common_voice_nn-NO_1002.mp3").write_bytes(b"ID3 but no audio at all")
    with pytest.raises(AudioError, match=r"common_voice_nn-NO_1002.mp3 .*train.tsv line 4"):
        build_common_voice(tmp_path / "out", broken, 1.0, seed=1)
    report = build_common_voice(tmp_path / "out", broken, 1.0, seed=1, on_bad_audio="skip")
    assert [s["id"] for s in report["skipped"]] == ["common_voice_nn-NO_1002"]
    assert report["utterances"] == sum(len(s) for s in CORPUS.values()) - 1


def test_malformed_release_is_named(tmp_path):
    (tmp_path / "fr").mkdir()
    (tmp_path / "fr" / "train.tsv").write_text("client_id\tsentence\nx\ty\n", encoding="utf-8")
    with pytest.raises(SourceError, match=r"fr/train.tsv:1: header lacks column\(s\) path"):
        build_common_voice(tmp_path / "out", tmp_path, 1.0, seed=1)
    with pytest.raises(SourceError, match="release_dir"):
        build_common_voice(tmp_path / "out", tmp_path / "missing", 1.0, seed=1)
    # A locale with no LID name is refused before anything is written, naming the locale.
    (tmp_path / "fr" / "train.tsv").unlink()
    (tmp_path / "xx" / "clips").mkdir(parents=True)
    (tmp_path / "xx" / "train.tsv").write_text(HEADER + "a\tcommon_voice_xx_1.mp3\tHi.\t1\t0\t\t\t\txx\t\n")
    sf.write(
        str(tmp_path / "xx" / "clips" / "common_voice_xx_1.mp3"),
        np.zeros(4800, dtype=np.float32),
        48000,
        format="MP3",
    )
    with pytest.raises(SourceError, match="unknown Common Voice locale 'xx'"):
        build_common_voice(tmp_path / "out", tmp_path, 1.0, seed=1)
    assert not (tmp_path / "out" / "train.jsonl").exists()


def test_language_ids_over_fleurs_and_common_voice(release, tmp_path):
    build_common_voice(tmp_path / "cv", release, 1.0, seed=1)
    fleurs = [
        {
            "id": f"{lang}-train-{n}",
            "language": lang,
            "audio": "x.wav",
            "num_samples": 16000,
            "sampling_rate": 16000,
            "raw_transcription": "x",
        }
        for n, lang in enumerate(["fr_fr", "nb_no", "de_de"])
    ]
    write_manifest(tmp_path / "fleurs_train.jsonl", fleurs)
    n = combine_manifests(
        [tmp_path / "fleurs_train.jsonl", tmp_path / "cv" / "train.jsonl"], tmp_path / "train.jsonl"
    )
    assert n == 3 + sum(len(s) for s in CORPUS.values())
    labels = language_ids([tmp_path / "train.jsonl"], tmp_path / "lid.json")
    # CV fr and FLEURS fr_fr share "French"; nn-NO joins FLEURS nb_no as "Norwegian"; zh-CN is Mandarin.
    assert labels == {"French": 1, "German": 2, "Mandarin Chinese": 3, "Norwegian": 4}
    assert json.loads((tmp_path / "lid.json").read_text()) == labels
    with pytest.raises(ManifestError, match="already used"):
        combine_manifests(
            [tmp_path / "train.jsonl", tmp_path / "fleurs_train.jsonl"], tmp_path / "twice.jsonl"
        )


def test_cli_common_voice_and_combine(release, tmp_path):
    settings = {
        "common_voice": {
            "release_dir": str(release.parent),
            "utterance_list": None,
            "durations": None,
            "max_hours_per_language": 1.5 / 3600,
            "seed": 1,
        },
        "on_bad_audio": "error",
    }
    speechllm(
        [
            "data",
            "common-voice",
            "--settings",
            json.dumps(settings),
            "--out-dir",
            str(tmp_path / "cv"),
            "--threads",
            "2",
        ]
    )
    assert [r["id"] for r in read_manifest(tmp_path / "cv" / "train.jsonl")] == reference_selection(
        release, sorted(CORPUS), 1.5
    )
    settings["common_voice"]["release_dir"] = None
    with pytest.raises(SystemExit, match="data.common_voice.release_dir"):
        speechllm(
            ["data", "common-voice", "--settings", json.dumps(settings), "--out-dir", str(tmp_path / "x")]
        )


def test_subsample_goes_through_split_preparation(release, tmp_path):
    from speechllm.data.prepare import prepare_split

    build_common_voice(tmp_path / "cv", release, 1.5 / 3600, seed=1)
    report = prepare_split(
        tmp_path / "cv" / "train.jsonl",
        tmp_path / "train.jsonl",
        tmp_path / "report.json",
        16000,
        0.1,
        30.0,
        [0.9, 1.0],
        "error",
        filter_durations=True,
    )
    kept = report["counts"]["kept"]
    assert (
        kept == len(read_manifest(tmp_path / "cv" / "train.jsonl")) and report["counts"]["output"] == 2 * kept
    )
    out = read_manifest(tmp_path / "train.jsonl")
    assert out[0]["id"].startswith("sp0.9-common_voice_") and out[0]["sampling_rate"] == 16000
    assert all(r["transcription"] for r in out)
