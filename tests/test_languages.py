"""Language names and LID labels as the reference's gen_lang_id.py maps them (spec bloomzmms.md §2.3)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from speechllm.data.languages import (
    CV_LOCALE_NAMES,
    CV_TO_FLEURS_NAME,
    FLEURS_NAMES,
    SHORT_TO_FLEURS,
    UnknownLanguageError,
    check_lid_labels,
    cv_language_name,
    language_name,
)
from speechllm.data.manifest import ManifestError, read_manifest, write_manifest
from speechllm.data.prepare import language_ids

# Common Voice 11.0's 100 locales (the subsets of the hub's mozilla-foundation/common_voice_11_0). With
# FLEURS' 102 names they give 138 LID names; CV 12.0 lists 101 locales on the hub, consistent with the paper's
# 139 if the added locale is one FLEURS lacks (not verifiable offline).
CV11_LOCALES = (
    "ab",
    "ar",
    "as",
    "ast",
    "az",
    "ba",
    "bas",
    "be",
    "bg",
    "bn",
    "br",
    "ca",
    "ckb",
    "cnh",
    "cs",
    "cv",
    "cy",
    "da",
    "de",
    "dv",
    "el",
    "en",
    "eo",
    "es",
    "et",
    "eu",
    "fa",
    "fi",
    "fr",
    "fy-NL",
    "ga-IE",
    "gl",
    "gn",
    "ha",
    "hi",
    "hsb",
    "hu",
    "hy-AM",
    "ia",
    "id",
    "ig",
    "it",
    "ja",
    "ka",
    "kab",
    "kk",
    "kmr",
    "ky",
    "lg",
    "lt",
    "lv",
    "mdf",
    "mhr",
    "mk",
    "ml",
    "mn",
    "mr",
    "mrj",
    "mt",
    "myv",
    "nan-tw",
    "ne-NP",
    "nl",
    "nn-NO",
    "or",
    "pa-IN",
    "pl",
    "pt",
    "rm-sursilv",
    "rm-vallader",
    "ro",
    "ru",
    "rw",
    "sah",
    "sat",
    "sc",
    "sk",
    "skr",
    "sl",
    "sr",
    "sv-SE",
    "sw",
    "ta",
    "th",
    "ti",
    "tig",
    "tok",
    "tr",
    "tt",
    "tw",
    "ug",
    "uk",
    "ur",
    "uz",
    "vi",
    "vot",
    "yue",
    "zh-CN",
    "zh-HK",
    "zh-TW",
)


def test_fleurs_has_102_distinct_names():
    assert len(FLEURS_NAMES) == 102 and len(set(FLEURS_NAMES.values())) == 102


@pytest.mark.parametrize(
    ("locale", "name"),
    [
        ("nb-NO", "Norwegian"),
        ("nn-NO", "Norwegian"),
        ("zh-CN", "Mandarin Chinese"),
        ("zh-HK", "Mandarin Chinese"),
        ("zh-TW", "Mandarin Chinese"),
        ("yue", "Cantonese Chinese"),
        ("ckb", "Sorani-Kurdish"),
        ("ff", "Fula"),
        ("om", "Oromo"),
        ("nso", "Northern-Sotho"),
    ],
)
def test_cv_names_patched_to_fleurs(locale, name):
    assert cv_language_name(locale) == name == language_name(locale)
    assert name in FLEURS_NAMES.values()


def test_reference_quirks_kept():
    # Only the patched names merge: CV's own spellings of these FLEURS languages stay separate labels.
    assert cv_language_name("or") == "Odia" and language_name("or_in") == "Oriya"
    assert cv_language_name("lg") == "Luganda" and language_name("lg_ug") == "Ganda"
    assert cv_language_name("hsb") == "Sorbian, Upper"  # sorts under S, as in the reference


def test_short_codes_agree_with_cv_names():
    for short, fleurs in SHORT_TO_FLEURS.items():
        if short in CV_LOCALE_NAMES:
            assert cv_language_name(short) == FLEURS_NAMES[fleurs], short
    assert language_name("zh") == "Mandarin Chinese" and language_name("de") == "German"


def test_every_patch_targets_a_known_locale_and_fleurs_codes_never_clash():
    assert set(CV_TO_FLEURS_NAME) <= set(CV_LOCALE_NAMES)
    assert all("_" in code for code in FLEURS_NAMES) and not any("_" in loc for loc in CV_LOCALE_NAMES)


def test_union_with_common_voice_counts_the_papers_languages():
    assert len(CV11_LOCALES) == 100
    names = set(FLEURS_NAMES.values()) | {cv_language_name(loc) for loc in CV11_LOCALES}
    assert len(names) == 138
    extra = {cv_language_name(loc) for loc in CV11_LOCALES} - set(FLEURS_NAMES.values())
    assert {"Esperanto", "Kinyarwanda", "Odia", "Luganda", "Taiwanese (Minnan)"} <= extra


def test_unknown_codes_are_named():
    with pytest.raises(KeyError, match="'xx_yy'"):
        language_name("xx_yy")
    with pytest.raises(KeyError, match="'qq'"):
        cv_language_name("qq")


def test_lid_labels_are_one_plus_sorted_index(tmp_path):
    langs = ["yue", "af_za", "hsb", "nn-NO", "nb_no", "cmn_hans_cn", "zh-TW", "en_us", "en"]
    write_manifest(
        tmp_path / "train.jsonl",
        [
            {
                "id": f"u{i}",
                "language": lang,
                "audio": "a.wav",
                "num_samples": 1,
                "sampling_rate": 16000,
                "raw_transcription": "x",
            }
            for i, lang in enumerate(langs)
        ],
    )
    labels = language_ids([tmp_path / "train.jsonl"], tmp_path / "lid.json")
    expected = sorted(
        {"Cantonese Chinese", "Afrikaans", "Sorbian, Upper", "Norwegian", "Mandarin Chinese", "English"}
    )
    assert labels == {name: i + 1 for i, name in enumerate(expected)}
    assert 0 not in labels.values()
    write_manifest(tmp_path / "bad.jsonl", [{"id": "u0", "language": "en_us"}, {"id": "u1"}])
    with pytest.raises(ManifestError, match=r"bad\.jsonl:2: missing field\(s\) language"):
        language_ids([tmp_path / "bad.jsonl"], tmp_path / "lid2.json")
    assert not (tmp_path / "lid2.json").exists()


def utterances(langs: list[str]) -> list[dict]:
    return [
        {
            "id": f"u{i}",
            "language": lang,
            "audio": "a.wav",
            "num_samples": 1,
            "sampling_rate": 16000,
            "raw_transcription": "x",
        }
        for i, lang in enumerate(langs)
    ]


def test_lid_labels_cover_train_and_dev_and_unknown_codes_name_the_line(tmp_path):
    """As gen_lang_id.py: the names of the training and the dev set are labelled together; a code without a
    name stops with the manifest and line."""
    write_manifest(tmp_path / "train.jsonl", utterances(["de_de", "en_us"]))
    write_manifest(tmp_path / "dev.jsonl", utterances(["en_us", "fr_fr"]))
    labels = language_ids([tmp_path / "train.jsonl", tmp_path / "dev.jsonl"], tmp_path / "lid.json")
    assert labels == {"English": 1, "French": 2, "German": 3}
    write_manifest(tmp_path / "odd.jsonl", utterances(["en_us", "en_us", "xx_yy"]))
    with pytest.raises(
        UnknownLanguageError, match=rf"^{tmp_path / 'odd.jsonl'}:3: unknown language code 'xx_yy'"
    ):
        language_ids([tmp_path / "train.jsonl", tmp_path / "odd.jsonl"], tmp_path / "lid2.json")
    assert not (tmp_path / "lid2.json").exists()


@pytest.mark.parametrize(
    ("lang", "message"),
    [
        ("fr_fr", r"language 'fr_fr' \(French\) has no language-ID label"),
        ("xx_yy", "unknown language code 'xx_yy'"),
    ],
)
def test_a_language_without_a_label_is_an_error_naming_manifest_and_line(tmp_path, lang, message):
    """Never label 0, the LID-CTC blank: the check before training and the collator both stop."""
    import numpy as np
    import soundfile as sf

    from speechllm.data.batches import Collator, SpeechDataset

    sf.write(str(tmp_path / "a.wav"), np.zeros(1600, dtype=np.float32), 16000)
    manifest = tmp_path / "dev.jsonl"
    write_manifest(manifest, [{**r, "audio": str(tmp_path / "a.wav")} for r in utterances(["en_us", lang])])
    records = read_manifest(manifest)
    labels = {"English": 1, "German": 2}
    with pytest.raises(UnknownLanguageError, match=rf"^{manifest}:2: {message}"):
        check_lid_labels(records, labels, str(manifest))
    dataset = SpeechDataset(records, 16000)
    collator = Collator(
        lambda text, add_special_tokens: SimpleNamespace(input_ids=[ord(c) for c in text]), labels
    )
    assert collator([dataset[0]]).lid.tolist() == [1]
    with pytest.raises(UnknownLanguageError, match=rf"^{manifest}:2: {message}"):
        collator([dataset[0], dataset[1]])
