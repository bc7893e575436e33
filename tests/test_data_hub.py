"""Hub-loaded sources on local fixtures in the hub's exact layouts, through the real `load_dataset` paths:
FLEURS (parquet conversion), LibriSpeech, spoken articles, released SpeechXNLI / SpeechGLUE audio."""

from __future__ import annotations

import io
import json
import random
import shutil
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechllm.audio import AudioError
from speechllm.data.hub import (
    SourceError,
    build_fleurs,
    build_speechglue_released,
    build_speechglue_tts,
    build_speechxnli_released,
    extract_archive,
    fetch_url,
    parquet_split_files,
)
from speechllm.data.languages import FLEURS_NAMES
from speechllm.data.manifest import read_manifest

SR = 16000
FLEURS_GROUPS = [
    "western_european_we",
    "eastern_european_ee",
    "central_asia_middle_north_african_cmn",
    "sub_saharan_african_ssa",
    "south_asian_sa",
    "south_east_asian_sea",
    "chinese_japanase_korean_cjk",
]
# (split, FLEURS id, recording, English text, German text); sentence 1 has two English recordings, as FLEURS
# has several speakers per sentence. Texts carry casing, punctuation and spacing raw_transcription must keep.
FLEURS_ROWS = [
    ("train", 101, "1786", "The cat sleeps.", "Die Katze schläft."),
    ("train", 101, "1787", "The cat sleeps.", None),
    ("train", 102, "2201", "Open the window, please!", "Mach bitte das Fenster auf!"),
    ("validation", 103, "3050", "It rains  today.", "Heute regnet es."),
    ("test", 104, "4111", "Where is the station?", "Wo ist der Bahnhof?"),
]


def wav_bytes(wav: np.ndarray, sr: int = SR, fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wav, sr, format=fmt, subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture(scope="module")
def speak(tmp_path_factory):
    """Real short speech from espeak-ng at 16 kHz (the pipeline's TTS backend), cached per (text, voice)."""
    from speechllm.data.tts import EspeakNG

    try:
        tts = EspeakNG(SR, 175)
    except RuntimeError as err:
        pytest.skip(str(err))
    root = tmp_path_factory.mktemp("speech")
    cache: dict[tuple[str, str], np.ndarray] = {}

    def run(text: str, voice: str) -> np.ndarray:
        if (text, voice) not in cache:
            path = root / f"{len(cache)}.wav"
            tts.synthesize(text, voice, path)
            cache[(text, voice)] = sf.read(str(path), dtype="float32")[0]
        return cache[(text, voice)]

    return run


def write_parquet(rows: dict[str, list], features, path: Path) -> None:
    """The hub's parquet with its `datasets` feature metadata. Audio cells are already encoded ({bytes,
    path}), so they go in as a plain struct and are cast to `Audio` at the Arrow level: `Dataset.from_dict`
    with an `Audio` feature would re-encode them through torchcodec (and FFmpeg), which the pipeline itself
    never needs."""
    from datasets import Audio, Dataset, Features, Value

    audio = [name for name, feature in features.items() if isinstance(feature, Audio)]
    plain = Features(
        {
            name: {"bytes": Value("binary"), "path": Value("string")} if name in audio else feature
            for name, feature in features.items()
        }
    )
    ds = Dataset.from_dict(rows, features=plain)
    for name in audio:
        ds = ds.cast_column(name, features[name])
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))


def fleurs_features():
    from datasets import Audio, ClassLabel, Features, Value

    return Features(
        {
            "id": Value("int32"),
            "num_samples": Value("int32"),
            "path": Value("string"),
            "audio": Audio(sampling_rate=SR),
            "transcription": Value("string"),
            "raw_transcription": Value("string"),
            "gender": ClassLabel(names=["male", "female", "other"]),
            "lang_id": ClassLabel(names=sorted(FLEURS_NAMES)),
            "language": Value("string"),
            "lang_group_id": ClassLabel(names=FLEURS_GROUPS),
        }
    )


def fleurs_rows(language: str, split: str, speak, shuffle_seed: int | None = None) -> dict[str, list]:
    col = 3 if language == "en_us" else 4
    voice = "en-us" if language == "en_us" else "de"
    rows = [r for r in FLEURS_ROWS if r[0] == split and r[col] is not None]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    wavs = [speak(r[col], voice) for r in rows]
    return {
        "id": [r[1] for r in rows],
        "num_samples": [w.shape[0] for w in wavs],
        # en_us carries the archive path in `path`; de_de has only the audio cell's (dir-prefixed) path.
        "path": [f"/cache/extracted/{split}/{r[2]}.wav" if language == "en_us" else None for r in rows],
        "audio": [
            {"bytes": wav_bytes(w), "path": f"{split}/{r[2]}.wav"} for r, w in zip(rows, wavs, strict=True)
        ],
        "transcription": [" ".join(r[col].lower().replace(",", "").replace(".", "").split()) for r in rows],
        "raw_transcription": [r[col] for r in rows],
        "gender": [i % 2 for i in range(len(rows))],
        "lang_id": [sorted(FLEURS_NAMES).index(language)] * len(rows),
        "language": [FLEURS_NAMES[language]] * len(rows),
        "lang_group_id": [0] * len(rows),
    }


def make_fleurs(root: Path, speak, shuffle_seed: int | None = None) -> Path:
    """`{config}/{split}/0000.parquet`, the layout of the hub's refs/convert/parquet branch."""
    for language in ("en_us", "de_de"):
        for split in ("train", "validation", "test"):
            write_parquet(
                fleurs_rows(language, split, speak, shuffle_seed),
                fleurs_features(),
                root / language / split / "0000.parquet",
            )
    return root


@pytest.fixture(scope="module")
def fleurs_hub(tmp_path_factory, speak) -> Path:
    return make_fleurs(tmp_path_factory.mktemp("fleurs_hub"), speak)


def test_fleurs_manifests_through_load_dataset(fleurs_hub, tmp_path):
    out = tmp_path / "fleurs"
    counts = build_fleurs(
        out, ["en_us", "de_de"], str(fleurs_hub), "refs/convert/parquet", cache_dir=str(tmp_path / "cache")
    )
    assert counts == {"train": 5, "dev": 2, "test": 2}
    train = read_manifest(out / "train.jsonl")
    by_id = {r["id"]: r for r in train}
    assert set(by_id) == {
        "en_us-train-1786",
        "en_us-train-1787",
        "en_us-train-2201",
        "de_de-train-1786",
        "de_de-train-2201",
    }
    # raw_transcription untouched (case, punctuation, double space); translation joined on FLEURS id.
    dev = {r["id"]: r for r in read_manifest(out / "dev.jsonl")}
    assert dev["en_us-dev-3050"]["raw_transcription"] == "It rains  today."
    assert dev["de_de-dev-3050"]["translation"] == "It rains  today."
    assert by_id["de_de-train-2201"]["raw_transcription"] == "Mach bitte das Fenster auf!"
    assert by_id["de_de-train-2201"]["translation"] == "Open the window, please!"
    assert {r["sentence_id"] for r in train if r["language"] == "de_de"} == {101, 102}
    # Clips are the released bytes; num_samples and rate come from them.
    rec = by_id["en_us-train-1787"]
    wav, sr = sf.read(rec["audio"], dtype="int16")
    assert sr == rec["sampling_rate"] == SR and wav.shape[0] == rec["num_samples"] > SR // 4
    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == counts and report["skipped"] == []


def test_fleurs_ids_stable_across_reruns_and_row_order(fleurs_hub, tmp_path, speak):
    first = tmp_path / "first"
    build_fleurs(
        first, ["en_us", "de_de"], str(fleurs_hub), "refs/convert/parquet", cache_dir=str(tmp_path / "c")
    )
    before = (first / "test.jsonl").read_bytes()
    build_fleurs(
        first, ["en_us", "de_de"], str(fleurs_hub), "refs/convert/parquet", cache_dir=str(tmp_path / "c")
    )
    assert (first / "test.jsonl").read_bytes() == before
    # The same data with rows in another order (a re-upload) gives the same ids, sentences and texts.
    shuffled = make_fleurs(tmp_path / "shuffled_hub", speak, shuffle_seed=3)
    second = tmp_path / "second"
    build_fleurs(
        second, ["en_us", "de_de"], str(shuffled), "refs/convert/parquet", cache_dir=str(tmp_path / "c")
    )

    def keyed(path):
        return {
            r["id"]: (r["sentence_id"], r["raw_transcription"], r["translation"], r["num_samples"])
            for r in read_manifest(path)
        }

    assert keyed(first / "train.jsonl") == keyed(second / "train.jsonl")


def test_a_rerun_replaces_a_clip_of_the_same_size_but_other_content(fleurs_hub, tmp_path):
    """A WAV's size follows from its length alone: a clip left by an earlier build from other data (another
    revision, a re-encoded release) must not be kept because its size matches."""
    out = tmp_path / "fleurs"
    build = [["en_us", "de_de"], str(fleurs_hub), "refs/convert/parquet"]
    build_fleurs(out, *build, cache_dir=str(tmp_path / "c"))
    clip = Path(read_manifest(out / "test.jsonl")[0]["audio"])
    released = clip.read_bytes()
    header = sf.info(str(clip))
    sf.write(str(clip), np.zeros(header.frames, dtype=np.int16), header.samplerate, subtype="PCM_16")
    assert clip.stat().st_size == len(released) and clip.read_bytes() != released
    build_fleurs(out, *build, cache_dir=str(tmp_path / "c"))
    assert clip.read_bytes() == released


def test_parquet_layouts_old_and_partial(tmp_path, fleurs_hub):
    old = tmp_path / "old"
    (old / "en_us").mkdir(parents=True)
    shutil.copy(
        fleurs_hub / "en_us" / "train" / "0000.parquet", old / "en_us" / "fleurs-train-00000-of-00002.parquet"
    )
    shutil.copy(
        fleurs_hub / "en_us" / "validation" / "0000.parquet", old / "en_us" / "fleurs-validation.parquet"
    )
    assert [Path(p).name for p in parquet_split_files(str(old), "en_us", "train")] == [
        "fleurs-train-00000-of-00002.parquet"
    ]
    assert [Path(p).name for p in parquet_split_files(str(old), "en_us", "validation")] == [
        "fleurs-validation.parquet"
    ]
    partial = tmp_path / "partial" / "en_us" / "partial-train"
    partial.mkdir(parents=True)
    shutil.copy(fleurs_hub / "en_us" / "train" / "0000.parquet", partial / "0000.parquet")
    with pytest.raises(SourceError, match="partial"):
        parquet_split_files(str(tmp_path / "partial"), "en_us", "train")
    with pytest.raises(SourceError, match="no parquet files"):
        parquet_split_files(str(tmp_path / "partial"), "de_de", "train")


def test_fleurs_bad_clip_names_row_or_is_skipped_and_reported(tmp_path, speak):
    hub = make_fleurs(tmp_path / "hub", speak)
    rows = fleurs_rows("de_de", "test", speak)
    rows["audio"][0] = {"bytes": b"this is not audio", "path": "test/4111.wav"}
    write_parquet(rows, fleurs_features(), hub / "de_de" / "test" / "0000.parquet")
    with pytest.raises(AudioError, match=r"de_de/test row 0"):
        build_fleurs(
            tmp_path / "out",
            ["en_us", "de_de"],
            str(hub),
            "refs/convert/parquet",
            cache_dir=str(tmp_path / "c"),
        )
    counts = build_fleurs(
        tmp_path / "out",
        ["en_us", "de_de"],
        str(hub),
        "refs/convert/parquet",
        "skip",
        cache_dir=str(tmp_path / "c"),
    )
    assert counts["test"] == 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [s["id"] for s in report["skipped"]] == ["de_de-test-4111"]


# --------------------------------------------------------------------------------------------------------
# LibriSpeech and spoken articles


def test_librispeech_splits_and_duration_filter(tmp_path, speak):
    from datasets import Audio, Features, Value

    from speechllm.data.librispeech import build_librispeech

    features = Features(
        {
            "file": Value("string"),
            "audio": Audio(sampling_rate=SR),
            "text": Value("string"),
            "speaker_id": Value("int64"),
            "chapter_id": Value("int64"),
            "id": Value("string"),
        }
    )
    short = speak("Go.", "en-us")
    long = np.concatenate([speak("A much longer sentence is read here.", "en-us")] * 3)
    hub = tmp_path / "librispeech"
    subsets = {"train.clean.100": [short, long], "validation.clean": [short], "test.other": [long, short]}
    for k, (subset, wavs) in enumerate(subsets.items()):
        ids = [f"{100 + k}-7-{n:04d}" for n in range(len(wavs))]
        write_parquet(
            {
                "file": [f"{i}.flac" for i in ids],
                "audio": [
                    {"bytes": wav_bytes(w, fmt="FLAC"), "path": f"{i}.flac"}
                    for i, w in zip(ids, wavs, strict=True)
                ],
                "text": [f"UTTERANCE {n} OF {subset.upper()}" for n in range(len(wavs))],
                "speaker_id": [100 + k] * len(wavs),
                "chapter_id": [7] * len(wavs),
                "id": ids,
            },
            features,
            hub / "all" / subset / "0000.parquet",
        )
    max_duration = (short.shape[0] + long.shape[0]) / 2 / SR
    splits = {"train": ["train.clean.100"], "dev": ["validation.clean"], "test": ["test.other"]}
    report = build_librispeech(
        tmp_path / "out", str(hub), "main", "all", splits, max_duration, cache_dir=str(tmp_path / "c")
    )
    assert report["subsets"]["train.clean.100"] == {"input": 2, "too_long": 1, "bad": 0, "kept": 1}
    assert report["subsets"]["test.other"]["too_long"] == 1
    test = read_manifest(tmp_path / "out" / "test.jsonl")
    assert [(r["id"], r["subset"], r["raw_transcription"]) for r in test] == [
        ("102-7-0001", "test.other", "UTTERANCE 1 OF TEST.OTHER")
    ]
    assert sf.info(test[0]["audio"]).frames == test[0]["num_samples"] and test[0]["audio"].endswith(".flac")
    assert json.loads((tmp_path / "out" / "report.json").read_text())["max_duration"] == max_duration


def test_split_sentences():
    from speechllm.data.articles import split_sentences

    text = 'The mayor spoke.  "We will build it," she said! Is it 2024? Yes. ok then.'
    assert split_sentences(text) == [
        "The mayor spoke.",
        '"We will build it," she said!',
        "Is it 2024?",
        "Yes. ok then.",
    ]
    assert split_sentences("No full stop") == ["No full stop"]


def test_spoken_demo_articles(tmp_path):
    from speechllm.data.articles import build_articles
    from speechllm.data.tts import EspeakNG
    from speechllm.demo.corpus import demo_articles

    try:
        tts = EspeakNG(SR, 220)
    except RuntimeError as err:
        pytest.skip(str(err))
    articles = demo_articles()
    assert len(articles) >= 3 and all(len(a["article"]) < 1600 and a["summary"] for a in articles)
    n = build_articles(tmp_path, articles[:2], tts, "en-us", SR, "sentences", 0.25, threads=2)
    assert n == 2
    records = read_manifest(tmp_path / "articles" / "test.jsonl")
    rec = records[0]
    assert rec["task"] == "summarization" and rec["summary"] == articles[0]["summary"]
    assert rec["raw_transcription"] == articles[0]["article"]
    spans = [(s["start"], s["end"]) for s in rec["segments"]]
    assert len(spans) == 6 and spans[0][0] == 0 and spans[-1][1] == rec["num_samples"]
    assert all(b[0] - a[1] == int(0.25 * SR) for a, b in zip(spans, spans[1:], strict=False))
    wav, sr = sf.read(rec["audio"], dtype="float32")
    assert sr == SR and wav.shape[0] == rec["num_samples"]
    assert np.abs(wav[spans[0][1] : spans[1][0]]).max() == 0.0  # the pause is silence


class LengthTTS:
    """A stand-in backend: 100 samples of silence per character, counting its calls."""

    name = "length"

    def __init__(self, words_per_minute: int = 150) -> None:
        self.settings = {"words_per_minute": words_per_minute}
        self.calls = 0

    def synthesize(self, text: str, voice: str, out_path: Path) -> None:
        self.calls += 1
        out_path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(str(out_path), np.zeros(100 * len(text), dtype="float32"), SR, subtype="PCM_16")


def test_a_clip_voiced_from_other_text_or_settings_is_voiced_again(tmp_path):
    """Clips are named by position (article id / sentence index); a rerun with another segmentation, voice or
    TTS setting must not reuse the clip left at the same path, while an unchanged rerun voices nothing."""
    from speechllm.data.articles import build_articles

    article = "First sentence here. Second sentence is a lot longer than the first one."
    articles = [{"id": "a1", "article": article, "summary": "s"}]

    def num_samples(tts: LengthTTS, voice: str, segmentation: str) -> int:
        build_articles(tmp_path, articles, tts, voice, SR, segmentation, 0.0, threads=1)
        return read_manifest(tmp_path / "articles" / "test.jsonl")[0]["num_samples"]

    tts = LengthTTS()
    assert num_samples(tts, "en-us", "sentences") == 100 * (len(article) - 1) and tts.calls == 2
    assert num_samples(tts, "en-us", "sentences") == 100 * (len(article) - 1) and tts.calls == 2
    assert num_samples(tts, "en-us", "whole") == 100 * len(article) and tts.calls == 3  # not sentence 1
    assert num_samples(tts, "en-gb", "whole") == 100 * len(article) and tts.calls == 4
    assert num_samples(LengthTTS(220), "en-gb", "whole") == 100 * len(article)
    assert num_samples(tts, "en-gb", "whole") == 100 * len(article) and tts.calls == 5  # 220 wpm replaced it


def test_hub_articles_filter_by_length(tmp_path):
    from datasets import Features, Value

    from speechllm.data.articles import hub_articles

    features = Features({"article": Value("string"), "highlights": Value("string"), "id": Value("string")})
    write_parquet(
        {
            "article": ["Short one. Two.", "x" * 2000, "Another short one."],
            "highlights": ["s1", "s2", "s3"],
            "id": ["a", "b", "c"],
        },
        features,
        tmp_path / "cnndm" / "3.0.0" / "test" / "0000.parquet",
    )
    got = hub_articles(str(tmp_path / "cnndm"), "3.0.0", "test", "main", 1600, None, str(tmp_path / "c"))
    assert [(a["id"], a["summary"]) for a in got] == [("cnndm-a", "s1"), ("cnndm-c", "s3")]
    assert (
        len(hub_articles(str(tmp_path / "cnndm"), "3.0.0", "test", "main", 1600, 1, str(tmp_path / "c"))) == 1
    )
    with pytest.raises(SourceError, match="max_chars"):
        hub_articles(str(tmp_path / "cnndm"), "3.0.0", "test", "main", 5, None, str(tmp_path / "c"))


# --------------------------------------------------------------------------------------------------------
# Released SpeechXNLI (zenodo tar layout) and SpeechGLUE (speechGLUE data-prep layout); TTS fallback


XNLI_PAIRS = [
    ("A man plays a guitar.", "A person makes music.", 0),
    ("A man plays a guitar.", "Nobody is playing.", 2),
    ("The shop opens at nine.", "The shop is busy.", 1),
]


def xnli_text(root: Path, lang: str = "en") -> Path:
    from datasets import ClassLabel, Features, Value

    features = Features(
        {
            "premise": Value("string"),
            "hypothesis": Value("string"),
            "label": ClassLabel(names=["entailment", "neutral", "contradiction"]),
        }
    )
    write_parquet(
        {
            "premise": [p for p, _, _ in XNLI_PAIRS],
            "hypothesis": [h for _, h, _ in XNLI_PAIRS],
            "label": [label for _, _, label in XNLI_PAIRS],
        },
        features,
        root / lang / "validation" / "0000.parquet",
    )
    return root


def speechxnli_release(root: Path, lang: str = "en") -> Path:
    """sentences_{lang}.txt (unique sentences, set order) + audios/{lang}/xnli_validation_{i:04d}.flac."""
    sentences = [
        "The shop is busy.",
        "A man plays a guitar.",
        "Nobody is playing.",
        "The shop opens at nine.",
        "A person makes music.",
    ]
    (root / "audios" / lang).mkdir(parents=True)
    (root / f"sentences_{lang}.txt").write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
    for i, _ in enumerate(sentences):
        # Clip i lasts (i + 1) * 0.1 s at 24 kHz, so the lookup can be checked by length.
        sf.write(
            str(root / "audios" / lang / f"xnli_validation_{i:04d}.flac"),
            np.full(2400 * (i + 1), 0.1, dtype=np.float32),
            24000,
        )
    return root


def test_speechxnli_released_from_archive(tmp_path):
    release = speechxnli_release(tmp_path / "build" / "speech_xnli")
    archive = tmp_path / "speech_xnli.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(release, arcname="speech_xnli")
    extracted = extract_archive(archive, tmp_path / "out" / "audio" / "speechxnli_release")
    assert extract_archive(archive, extracted) == extracted  # reused, not unpacked twice
    n = build_speechxnli_released(
        tmp_path / "out",
        extracted,
        ["en"],
        str(xnli_text(tmp_path / "xnli")),
        SR,
        cache_dir=str(tmp_path / "c"),
    )
    assert n == 3
    examples = read_manifest(tmp_path / "out" / "speechxnli" / "test.jsonl")
    first = examples[0]
    assert first["id"] == "xnli-en-00000" and first["language"] == "en_us" and first["label"] == 0
    assert first["fields"]["premise"]["audio"].endswith("audios/en/xnli_validation_0001.flac")
    assert first["fields"]["hypothesis"]["audio"].endswith("audios/en/xnli_validation_0004.flac")
    assert first["fields"]["hypothesis"]["num_samples"] == 5 * 1600  # 0.5 s stated at 16 kHz
    assert [e["label"] for e in examples] == [0, 2, 1]


def test_speechxnli_released_missing_sentence_is_named(tmp_path):
    release = speechxnli_release(tmp_path / "speech_xnli")
    lines = (release / "sentences_en.txt").read_text(encoding="utf-8").splitlines()
    (release / "sentences_en.txt").write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")
    with pytest.raises(SourceError, match="A person makes music"):
        build_speechxnli_released(
            tmp_path / "out",
            tmp_path,
            ["en"],
            str(xnli_text(tmp_path / "xnli")),
            SR,
            cache_dir=str(tmp_path / "c"),
        )


def speechglue_release(root: Path, task_dir: str, fields: tuple[str, ...], rows: list[dict]) -> Path:
    """speechGLUE's data-prep output: data.csv with file_<field> paths recorded on another machine."""
    import csv

    split_dir = root / task_dir
    split_dir.mkdir(parents=True)
    with (split_dir / "data.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [*fields, "label", "idx", *(f"file_{f}" for f in fields), *(f"length_{f}" for f in fields)]
        )
        for row in rows:
            files = []
            for f in fields:
                clip = (
                    split_dir / f / "0" / f"{row['idx']}.flac"
                )  # converted to flac, as the reference reads them
                clip.parent.mkdir(parents=True, exist_ok=True)
                sf.write(str(clip), np.full(1600 * (row["idx"] + 1), 0.1, dtype=np.float32), SR)
                files.append(f"/mount/other/machine/dump/{task_dir}/{f}/0/{row['idx']}.wav")
            writer.writerow(
                [*(row[f] for f in fields), row["label"], row["idx"], *files, *([1600] * len(fields))]
            )
    return root


def test_speechglue_released_layouts(tmp_path):
    root = tmp_path / "speechglue"
    speechglue_release(
        root,
        "rte/validation",
        ("sentence1", "sentence2"),
        [
            {
                "sentence1": "the sky is blue, said he.",
                "sentence2": "the sky has a colour.",
                "label": 0,
                "idx": 0,
            },
            {"sentence1": "dogs bark.", "sentence2": "cats bark.", "label": 1, "idx": 2},
        ],
    )
    speechglue_release(
        root,
        "mnli/validation_matched",
        ("premise", "hypothesis"),
        [{"premise": "he ran.", "hypothesis": "he moved.", "label": 0, "idx": 0}],
    )
    speechglue_release(
        root,
        "stsb/validation",
        ("sentence1", "sentence2"),
        [{"sentence1": "a b.", "sentence2": "a c.", "label": 3.8, "idx": 1}],
    )
    counts = build_speechglue_released(tmp_path / "out", root, ["rte", "mnli_matched", "stsb"], SR)
    assert counts == {"rte": 2, "mnli_matched": 1, "stsb": 1}
    rte = read_manifest(tmp_path / "out" / "speechglue" / "rte.jsonl")
    assert [e["id"] for e in rte] == ["rte-000000", "rte-000002"] and rte[1]["label"] == 1
    assert rte[0]["fields"]["sentence1"]["text"] == "the sky is blue, said he."
    assert rte[1]["fields"]["sentence2"]["audio"] == str(root / "rte/validation/sentence2/0/2.flac")
    assert rte[1]["fields"]["sentence2"]["num_samples"] == 3 * 1600
    stsb = read_manifest(tmp_path / "out" / "speechglue" / "stsb.jsonl")
    assert stsb[0]["label"] == 3.8
    with pytest.raises(SourceError, match="cola"):
        build_speechglue_released(tmp_path / "out", root, ["cola"], SR)
    (root / "rte/validation/sentence1/0/2.flac").unlink()
    with pytest.raises(AudioError, match=r"data.csv line 3"):
        build_speechglue_released(tmp_path / "out", root, ["rte"], SR)
    speechglue_release(
        root,
        "cola/validation",
        ("sentence",),
        [{"sentence": "a b.", "label": 1, "idx": 0}, {"sentence": "b a.", "label": "unacceptable", "idx": 1}],
    )
    with pytest.raises(SourceError, match=r"cola/validation/data.csv line 3: label 'unacceptable'"):
        build_speechglue_released(tmp_path / "out", root, ["cola"], SR)


def test_speechglue_tts_fallback_through_load_dataset(tmp_path):
    from datasets import ClassLabel, Features, Value

    from speechllm.data.tts import EspeakNG

    try:
        tts = EspeakNG(SR, 220)
    except RuntimeError as err:
        pytest.skip(str(err))
    features = Features(
        {
            "sentence": Value("string"),
            "label": ClassLabel(names=["negative", "positive"]),
            "idx": Value("int32"),
        }
    )
    write_parquet(
        {"sentence": ["a fine film.", "dull."], "label": [1, 0], "idx": [0, 1]},
        features,
        tmp_path / "glue" / "sst2" / "validation" / "0000.parquet",
    )
    counts = build_speechglue_tts(
        tmp_path / "out", ["sst2"], tts, "en-us", SR, str(tmp_path / "glue"), threads=1
    )
    assert counts == {"sst2": 2}
    ex = read_manifest(tmp_path / "out" / "speechglue" / "sst2.jsonl")[1]
    assert ex["label"] == 0 and ex["fields"]["sentence"]["text"] == "dull."
    assert sf.info(ex["fields"]["sentence"]["audio"]).frames == ex["fields"]["sentence"]["num_samples"] > 0


@pytest.mark.parametrize("text", ["-lrb- a fine film -rrb- .", "-- and then it rained."])
def test_espeak_voices_a_text_that_starts_with_a_dash(speak, text):
    """SST-2 validation sentences may start with "-lrb-", MNLI premises with "--": espeak-ng must read them as
    text, not as options (which left it with no text and no clip, exit status 0)."""
    wav = speak(text, "en-us")
    assert wav.shape[0] > SR // 2


def test_fetch_url_file_scheme(tmp_path):
    src = tmp_path / "cv12_train_utts.lst.gz"
    src.write_bytes(b"\x1f\x8b" + bytes(range(200)))
    out = tmp_path / "resources" / "zenodo" / "cv12_train_utts.lst.gz"
    assert fetch_url(src.as_uri(), out, timeout=10) == 202 and out.read_bytes() == src.read_bytes()
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(SourceError, match="0 bytes"):
        fetch_url((tmp_path / "empty").as_uri(), tmp_path / "empty.out", timeout=10)
    assert not (tmp_path / "empty.out").exists()


def test_fetch_url_refuses_a_cut_download_and_keeps_the_earlier_file(tmp_path, bad_server):
    """http.client ends a connection cut before Content-Length as a short read: the 10 bytes must not become
    the finished output (Snakemake would never fetch it again), and an earlier complete file stays."""
    cut_server = bad_server("cut")
    out = tmp_path / "zenodo" / "speech_xnli.tar.gz"
    with pytest.raises(SourceError, match=r"cut short: 10 of 1000 bytes"):
        fetch_url(cut_server, out, timeout=10)
    assert not out.exists() and list(out.parent.iterdir()) == []
    out.write_bytes(b"complete earlier download")
    with pytest.raises(SourceError, match="cut short"):
        fetch_url(cut_server, out, timeout=10)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(SourceError, match="0 bytes"):
        fetch_url((tmp_path / "empty").as_uri(), out, timeout=10)
    assert out.read_bytes() == b"complete earlier download" and list(out.parent.iterdir()) == [out]


def test_fetch_url_gives_up_on_a_silent_server(tmp_path, bad_server):
    """A server that stops sending fails the download after the timeout (config
    resources.download_timeout_seconds) instead of holding the job until its time limit."""
    out = tmp_path / "zenodo" / "speech_xnli.tar.gz"
    started = time.monotonic()
    with pytest.raises(
        SourceError, match=r"download of http://127\.0\.0\.1:\d+/speech_xnli.tar.gz failed: timed out"
    ):
        fetch_url(bad_server("stall"), out, timeout=0.5)
    assert time.monotonic() - started < 20  # the server stays silent for 30 s
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    with pytest.raises(SourceError, match=r"speech_xnli.tar.gz failed: HTTP Error 404: Not Found$"):
        fetch_url(bad_server("missing"), out, timeout=10)


def test_cli_released_speechxnli_and_hub_articles(tmp_path):
    """The `speechllm data` subcommands the rules call, with settings as the rules build them."""
    from datasets import Features, Value

    from speechllm.cli import main as speechllm

    release = speechxnli_release(tmp_path / "build" / "speech_xnli")
    archive = tmp_path / "zenodo" / "speech_xnli.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(release, arcname="speech_xnli")
    tts = {"backend": "espeak-ng", "words_per_minute": 220, "voices": {"en_us": "en-us", "en": "en-us"}}
    xnli = {
        "languages": ["en"],
        "dataset": str(xnli_text(tmp_path / "xnli")),
        "revision": "main",
        "source": "released",
        "release_dir": None,
    }
    settings = {"speechxnli": xnli, "tts": tts, "sampling_rate": SR, "on_bad_audio": "error"}
    out = tmp_path / "resources"
    speechllm(
        [
            "data",
            "speechxnli",
            "--settings",
            json.dumps(settings),
            "--out-dir",
            str(out),
            "--archive",
            str(archive),
            "--cache-dir",
            str(tmp_path / "c"),
        ]
    )
    examples = read_manifest(out / "speechxnli" / "test.jsonl")
    assert len(examples) == 3 and "speechxnli_release" in examples[0]["fields"]["premise"]["audio"]
    with pytest.raises(SystemExit, match="release_dir"):
        speechllm(["data", "speechxnli", "--settings", json.dumps(settings), "--out-dir", str(out)])

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not on PATH")
    features = Features({"article": Value("string"), "highlights": Value("string"), "id": Value("string")})
    write_parquet(
        {
            "article": ["x" * 1700, "Rain fell all day. The river rose."],
            "highlights": ["h1", "Rain."],
            "id": ["long", "k1"],
        },
        features,
        tmp_path / "cnndm" / "3.0.0" / "test" / "0000.parquet",
    )
    articles = {
        "source": "hub",
        "dataset": str(tmp_path / "cnndm"),
        "revision": "main",
        "config": "3.0.0",
        "split": "test",
        "max_chars": 1600,
        "max_articles": 1,
        "segmentation": "whole",
        "pause_seconds": 0.3,
        "voice": "en_us",
    }
    settings = {"articles": articles, "tts": tts, "sampling_rate": SR, "on_bad_audio": "error"}
    speechllm(
        [
            "data",
            "articles",
            "--settings",
            json.dumps(settings),
            "--out-dir",
            str(out),
            "--cache-dir",
            str(tmp_path / "c"),
        ]
    )
    (rec,) = read_manifest(out / "articles" / "test.jsonl")
    assert rec["id"] == "cnndm-k1" and rec["summary"] == "Rain." and len(rec["segments"]) == 1
    assert rec["segments"][0] == {
        "start": 0,
        "end": rec["num_samples"],
        "text": "Rain fell all day. The river rose.",
    }


def test_spoken_sets_check_every_voice_and_task_before_downloading(tmp_path, monkeypatch):
    """A bad last entry (a language without a voice, an unknown task) fails before the first download, not
    after voicing the ones before it."""
    from speechllm.data import hub

    def no_download(*args, **kwargs):
        raise AssertionError(f"downloaded {args}")

    monkeypatch.setattr(hub, "load_split", no_download)
    with pytest.raises(ValueError, match=r"no TTS voice for 'fr' \(config key data\.tts\.voices\)"):
        hub.build_speechxnli_tts(tmp_path, ["en", "fr"], None, {"en": "en-us"}, 16_000, "xnli", 1)
    with pytest.raises(hub.SourceError, match=r"unknown SpeechGLUE task 'nope' \(config key"):
        hub.build_speechglue_tts(tmp_path, ["sst2", "nope"], None, "en-us", 16_000, "glue", 1)
    assert not list(tmp_path.iterdir())
