"""CoVoST 2 X→English test manifests from a fake local release (Common Voice mp3 clips + CoVoST tsvs)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechllm.evaluate.benchmarks import score_st
from speechllm.evaluate.covost2 import CoVoSTError, build_covost2_manifest, covost2_test_records
from speechllm.evaluate.settings import Prompt, StSettings

HEADER = "path\tsentence\ttranslation\tclient_id\tsplit\n"


def _mp3(path: Path, samples: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(
        str(path),
        (np.random.default_rng(samples).standard_normal(samples) * 0.1).astype(np.float32),
        48000,
        format="MP3",
    )


@pytest.fixture()
def release(tmp_path) -> Path:
    root = tmp_path / "cv4"
    # de: the CoVoST tsv carries the sentence; quotes inside sentences are not CSV-quoted
    for name, n in (("de_1.mp3", 4800), ("de_2.mp3", 9600), ("de_3.mp3", 4800)):
        _mp3(root / "de" / "clips" / name, n)
    (root / "de" / "covost_v2.de_en.tsv").write_text(
        HEADER + 'de_1.mp3\tEr sagte "Hallo".\tHe said "hello".\tc1\ttest\n'
        "de_2.mp3\tGuten Morgen.\tGood morning.\tc2\ttest\n"
        "de_3.mp3\tTschüss.\tBye.\tc3\ttrain\n",
        encoding="utf-8",
    )
    # fr: translations only, the transcript comes from Common Voice's validated.tsv; the tsv lives in tsv_dir
    _mp3(root / "fr" / "clips" / "fr_1.mp3", 4800)
    (root / "fr" / "validated.tsv").write_text(
        "client_id\tpath\tsentence\tup_votes\nc9\tfr_1.mp3\tBonjour.\t2\n", encoding="utf-8"
    )
    tsvs = tmp_path / "covost_tsv"
    tsvs.mkdir()
    (tsvs / "covost_v2.fr_en.tsv").write_text(
        "path\ttranslation\tsplit\nfr_1.mp3\tHello.\ttest\n", encoding="utf-8"
    )
    return root


def test_test_split_records_in_fleurs_shape(release, tmp_path) -> None:
    records = covost2_test_records(release, "de")
    assert [r["id"] for r in records] == ["covost2-de-de_1", "covost2-de-de_2"]  # the train row is left out
    first = records[0]
    assert first["raw_transcription"] == 'Er sagte "Hallo".' and first["translation"] == 'He said "hello".'
    assert first["language"] == "de" and first["sampling_rate"] == 48000 and first["num_samples"] > 0
    out = tmp_path / "test.jsonl"
    assert build_covost2_manifest(release, ["de", "fr"], out, tsv_dir=tmp_path / "covost_tsv") == 3
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[-1]["raw_transcription"] == "Bonjour." and lines[-1]["translation"] == "Hello."


def test_tsvs_are_read_as_covost_reads_them(release) -> None:
    """A backslash escapes the next character (a tab inside a sentence, a backslash itself), as in CoVoST's
    get_covost_splits.py; quotes stay plain characters."""
    (release / "de" / "covost_v2.de_en.tsv").write_text(
        HEADER + 'de_1.mp3\tEr sagte "Hallo"\\\tdann ging er.\tHe said "hello"\\\tthen left.\tc1\ttest\n'
        "de_2.mp3\tA\\\\B.\tA\\\\B.\tc2\ttest\n",
        encoding="utf-8",
    )
    first, second = covost2_test_records(release, "de")
    assert first["raw_transcription"] == 'Er sagte "Hallo"\tdann ging er.'
    assert first["translation"] == 'He said "hello"\tthen left.'
    assert second["raw_transcription"] == second["translation"] == "A\\B."


def test_bad_release_errors_name_the_file(release, tmp_path) -> None:
    with pytest.raises(CoVoSTError, match="covost_v2.fr_en.tsv"):
        covost2_test_records(release, "fr")  # no tsv_dir given
    (release / "de" / "clips" / "de_2.mp3").unlink()
    with pytest.raises(CoVoSTError, match="de_2.mp3"):
        covost2_test_records(release, "de")
    with pytest.raises(CoVoSTError, match="evaluate.covost2.release_dir"):
        build_covost2_manifest(tmp_path / "nowhere", ["de"], tmp_path / "x.jsonl")


@pytest.mark.parametrize(
    ("row", "fields"),
    [
        ("de_2.mp3\tGuten Morgen.\tGood morning.\tc2", 4),
        ("de_2.mp3\tGuten\tMorgen.\tGood morning.\tc2\ttest", 6),
    ],
)
def test_a_covost_row_with_missing_or_extra_fields_is_an_error_naming_its_line(release, row, fields) -> None:
    """A cut row (no split) or one with an unescaped tab (every later column shifted) would not read as a
    test row and silently drop out of the test set; it stops the manifest naming the tsv line."""
    tsv = release / "de" / "covost_v2.de_en.tsv"
    tsv.write_text(HEADER + 'de_1.mp3\tEr sagte "Hallo".\tHe said "hello".\tc1\ttest\n' + row + "\n")
    with pytest.raises(
        CoVoSTError, match=rf"{re.escape(str(tsv))}:3: {fields} tab-separated fields .* has 5"
    ):
        covost2_test_records(release, "de")


def test_covost2_scores_against_english_with_13a(release) -> None:
    import pandas as pd

    records = covost2_test_records(release, "de")
    df = pd.DataFrame(
        {
            "id": [r["id"] for r in records],
            "language": "de",
            "target_language": "en",
            "reference": [r["translation"] for r in records],
            "hypothesis": ["he said hello", "good day"],
        }
    )
    settings = StSettings(
        batch_size=1,
        num_beams=1,
        max_new_tokens=8,
        st_prompt=Prompt("", ""),
        bleu_tokenize={"default": "13a", "zh": "zh"},
    )
    metrics = score_st(df, settings)
    assert "tok:13a" in metrics["all"]["bleu_signature"] and metrics["target_languages"] == ["en"]
    assert 0 < metrics["per_language"]["de"]["chrf"] < 100
