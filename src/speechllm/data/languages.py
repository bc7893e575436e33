"""Language codes and names: FLEURS codes, Common Voice locales, short codes, and the English names used in
prompts and as language-ID (LID) labels.

LID labels follow the reference's `local/gen_lang_id.py` (spec bloomzmms.md §2.3): every utterance gets an
English language name (FLEURS names for FLEURS, Common Voice's own English names for CV locales, with a few CV
names patched to the FLEURS spelling), and the label is 1 + the index of that name in the sorted list of names
present in the training and dev data (gen_lang_id.py reads train_t_sp and dev_fleurs; 0 is the CTC blank). A
language without a label stops with the manifest and line named; it never gets the blank. The union of FLEURS'
102 names and the CV 12 locales' names is the paper's "139 languages".
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from speechllm.data.manifest import location

# FLEURS code -> English name (the names of xtreme_s's FLEURS table, which gen_lang_id.py uses).
FLEURS_NAMES: dict[str, str] = {
    "af_za": "Afrikaans",
    "am_et": "Amharic",
    "ar_eg": "Arabic",
    "as_in": "Assamese",
    "ast_es": "Asturian",
    "az_az": "Azerbaijani",
    "be_by": "Belarusian",
    "bg_bg": "Bulgarian",
    "bn_in": "Bengali",
    "bs_ba": "Bosnian",
    "ca_es": "Catalan",
    "ceb_ph": "Cebuano",
    "ckb_iq": "Sorani-Kurdish",
    "cmn_hans_cn": "Mandarin Chinese",
    "cs_cz": "Czech",
    "cy_gb": "Welsh",
    "da_dk": "Danish",
    "de_de": "German",
    "el_gr": "Greek",
    "en_us": "English",
    "es_419": "Spanish",
    "et_ee": "Estonian",
    "fa_ir": "Persian",
    "ff_sn": "Fula",
    "fi_fi": "Finnish",
    "fil_ph": "Filipino",
    "fr_fr": "French",
    "ga_ie": "Irish",
    "gl_es": "Galician",
    "gu_in": "Gujarati",
    "ha_ng": "Hausa",
    "he_il": "Hebrew",
    "hi_in": "Hindi",
    "hr_hr": "Croatian",
    "hu_hu": "Hungarian",
    "hy_am": "Armenian",
    "id_id": "Indonesian",
    "ig_ng": "Igbo",
    "is_is": "Icelandic",
    "it_it": "Italian",
    "ja_jp": "Japanese",
    "jv_id": "Javanese",
    "ka_ge": "Georgian",
    "kam_ke": "Kamba",
    "kea_cv": "Kabuverdianu",
    "kk_kz": "Kazakh",
    "km_kh": "Khmer",
    "kn_in": "Kannada",
    "ko_kr": "Korean",
    "ky_kg": "Kyrgyz",
    "lb_lu": "Luxembourgish",
    "lg_ug": "Ganda",
    "ln_cd": "Lingala",
    "lo_la": "Lao",
    "lt_lt": "Lithuanian",
    "luo_ke": "Luo",
    "lv_lv": "Latvian",
    "mi_nz": "Maori",
    "mk_mk": "Macedonian",
    "ml_in": "Malayalam",
    "mn_mn": "Mongolian",
    "mr_in": "Marathi",
    "ms_my": "Malay",
    "mt_mt": "Maltese",
    "my_mm": "Burmese",
    "nb_no": "Norwegian",
    "ne_np": "Nepali",
    "nl_nl": "Dutch",
    "nso_za": "Northern-Sotho",
    "ny_mw": "Nyanja",
    "oc_fr": "Occitan",
    "om_et": "Oromo",
    "or_in": "Oriya",
    "pa_in": "Punjabi",
    "pl_pl": "Polish",
    "ps_af": "Pashto",
    "pt_br": "Portuguese",
    "ro_ro": "Romanian",
    "ru_ru": "Russian",
    "sd_in": "Sindhi",
    "sk_sk": "Slovak",
    "sl_si": "Slovenian",
    "sn_zw": "Shona",
    "so_so": "Somali",
    "sr_rs": "Serbian",
    "sv_se": "Swedish",
    "sw_ke": "Swahili",
    "ta_in": "Tamil",
    "te_in": "Telugu",
    "tg_tj": "Tajik",
    "th_th": "Thai",
    "tr_tr": "Turkish",
    "uk_ua": "Ukrainian",
    "umb_ao": "Umbundu",
    "ur_pk": "Urdu",
    "uz_uz": "Uzbek",
    "vi_vn": "Vietnamese",
    "wo_sn": "Wolof",
    "xh_za": "Xhosa",
    "yo_ng": "Yoruba",
    "yue_hant_hk": "Cantonese Chinese",
    "zu_za": "Zulu",
}

# Common Voice locale -> English name as Common Voice spells it (web/locales/en/messages.ftl, the table the
# reference copies), covering every locale of CV 12.0 and the other locales CV listed at the time.
CV_LOCALE_NAMES: dict[str, str] = {
    "ab": "Abkhaz",
    "ace": "Acehnese",
    "ady": "Adyghe",
    "af": "Afrikaans",
    "am": "Amharic",
    "an": "Aragonese",
    "ar": "Arabic",
    "arn": "Mapudungun",
    "as": "Assamese",
    "ast": "Asturian",
    "az": "Azerbaijani",
    "ba": "Bashkir",
    "bas": "Basaa",
    "be": "Belarusian",
    "bg": "Bulgarian",
    "bm": "Bambara",
    "bn": "Bengali",
    "bo": "Tibetan",
    "br": "Breton",
    "bs": "Bosnian",
    "bxr": "Buryat",
    "byv": "Medumba",
    "ca": "Catalan",
    "cak": "Kaqchikel",
    "ckb": "Central Kurdish",
    "cnh": "Hakha Chin",
    "co": "Corsican",
    "cs": "Czech",
    "cv": "Chuvash",
    "cy": "Welsh",
    "da": "Danish",
    "dag": "Dagbani",
    "de": "German",
    "dsb": "Sorbian, Lower",
    "dv": "Dhivehi",
    "dyu": "Dioula",
    "el": "Greek",
    "en": "English",
    "eo": "Esperanto",
    "es": "Spanish",
    "et": "Estonian",
    "eu": "Basque",
    "fa": "Persian",
    "ff": "Fulah",
    "fi": "Finnish",
    "fo": "Faroese",
    "fr": "French",
    "fy-NL": "Frisian",
    "ga-IE": "Irish",
    "gl": "Galician",
    "gn": "Guarani",
    "gom": "Goan Konkani",
    "ha": "Hausa",
    "he": "Hebrew",
    "hi": "Hindi",
    "hil": "Hiligaynon",
    "hr": "Croatian",
    "hsb": "Sorbian, Upper",
    "ht": "Haitian",
    "hu": "Hungarian",
    "hy-AM": "Armenian",
    "hyw": "Armenian Western",
    "ia": "Interlingua",
    "id": "Indonesian",
    "ie": "Interlingue",
    "ig": "Igbo",
    "is": "Icelandic",
    "it": "Italian",
    "izh": "Izhorian",
    "ja": "Japanese",
    "jbo": "Lojban",
    "ka": "Georgian",
    "kaa": "Karakalpak",
    "kab": "Kabyle",
    "kbd": "Kabardian",
    "ki": "Kikuyu",
    "kk": "Kazakh",
    "km": "Khmer",
    "kmr": "Kurmanji Kurdish",
    "kn": "Kannada",
    "knn": "Konkani (Devanagari)",
    "ko": "Korean",
    "kpv": "Komi-Zyrian",
    "kw": "Cornish",
    "ky": "Kyrgyz",
    "lb": "Luxembourgish",
    "lg": "Luganda",
    "lij": "Ligurian",
    "ln": "Lingala",
    "lo": "Lao",
    "lt": "Lithuanian",
    "lv": "Latvian",
    "mai": "Maithili",
    "mdf": "Moksha",
    "mg": "Malagasy",
    "mhr": "Meadow Mari",
    "mk": "Macedonian",
    "ml": "Malayalam",
    "mn": "Mongolian",
    "mni": "Meetei Lon",
    "mos": "Mossi",
    "mr": "Marathi",
    "mrj": "Hill Mari",
    "ms": "Malay",
    "mt": "Maltese",
    "my": "Burmese",
    "myv": "Erzya",
    "nan-tw": "Taiwanese (Minnan)",
    "nb-NO": "Norwegian Bokmål",
    "nd": "IsiNdebele (North)",
    "ne-NP": "Nepali",
    "nhe": "Eastern Huasteca Nahuatl",
    "nhi": "Western Sierra Puebla Nahuatl",
    "nia": "Nias",
    "nl": "Dutch",
    "nn-NO": "Norwegian Nynorsk",
    "nr": "IsiNdebele (South)",
    "nso": "Northern Sotho",
    "ny": "Chinyanja",
    "nyn": "Runyankole",
    "oc": "Occitan",
    "om": "Afaan Oromo",
    "or": "Odia",
    "pa-IN": "Punjabi",
    "pap-AW": "Papiamento (Aruba)",
    "pl": "Polish",
    "ps": "Pashto",
    "pt": "Portuguese",
    "quc": "K'iche'",
    "quy": "Quechua Chanka",
    "rm-sursilv": "Romansh Sursilvan",
    "rm-vallader": "Romansh Vallader",
    "ro": "Romanian",
    "ru": "Russian",
    "rw": "Kinyarwanda",
    "sah": "Sakha",
    "sat": "Santali (Ol Chiki)",
    "sc": "Sardinian",
    "scn": "Sicilian",
    "sdh": "Southern Kurdish",
    "shi": "Shilha",
    "si": "Sinhala",
    "sk": "Slovak",
    "skr": "Saraiki",
    "sl": "Slovenian",
    "snk": "Soninke",
    "so": "Somali",
    "sq": "Albanian",
    "sr": "Serbian",
    "ss": "Siswati",
    "st": "Southern Sotho",
    "sv-SE": "Swedish",
    "sw": "Swahili",
    "syr": "Syriac",
    "ta": "Tamil",
    "te": "Telugu",
    "tg": "Tajik",
    "th": "Thai",
    "ti": "Tigrinya",
    "tig": "Tigre",
    "tk": "Turkmen",
    "tl": "Tagalog",
    "tn": "Setswana",
    "tok": "Toki Pona",
    "tr": "Turkish",
    "ts": "Xitsonga",
    "tt": "Tatar",
    "tw": "Twi",
    "ty": "Tahitian",
    "tyv": "Tuvan",
    "uby": "Ubykh",
    "udm": "Udmurt",
    "ug": "Uyghur",
    "uk": "Ukrainian",
    "ur": "Urdu",
    "uz": "Uzbek",
    "ve": "Tshivenda",
    "vec": "Venetian",
    "vi": "Vietnamese",
    "vot": "Votic",
    "wo": "Wolof",
    "xh": "Xhosa",
    "yi": "Yiddish",
    "yo": "Yoruba",
    "yue": "Cantonese",
    "zgh": "Tamazight",
    "zh-CN": "Chinese (China)",
    "zh-HK": "Chinese (Hong Kong)",
    "zh-TW": "Chinese (Taiwan)",
    "zu": "Zulu",
    "zza": "Zaza",
}

# The reference renames exactly these CV names to the FLEURS spelling, so both corpora share one LID label.
# Other near-duplicates stay apart, as in the reference: CV "Odia" vs FLEURS "Oriya", "Luganda" vs "Ganda",
# "Chinyanja" vs "Nyanja" each count as two languages.
CV_TO_FLEURS_NAME: dict[str, str] = {
    "nb-NO": "Norwegian",
    "nn-NO": "Norwegian",
    "ckb": "Sorani-Kurdish",
    "zh-CN": "Mandarin Chinese",
    "zh-HK": "Mandarin Chinese",
    "zh-TW": "Mandarin Chinese",
    "ff": "Fula",
    "om": "Oromo",
    "nso": "Northern-Sotho",
    "yue": "Cantonese Chinese",
}

# Short (ISO 639-1) code -> FLEURS code, for sets keyed by short codes (XNLI, the demo corpus columns).
SHORT_TO_FLEURS: dict[str, str] = {
    "en": "en_us",
    "de": "de_de",
    "fr": "fr_fr",
    "es": "es_419",
    "it": "it_it",
    "pt": "pt_br",
    "ar": "ar_eg",
    "bg": "bg_bg",
    "el": "el_gr",
    "hi": "hi_in",
    "ru": "ru_ru",
    "sw": "sw_ke",
    "th": "th_th",
    "tr": "tr_tr",
    "ur": "ur_pk",
    "vi": "vi_vn",
    "zh": "cmn_hans_cn",
}
FLEURS_TO_SHORT: dict[str, str] = {v: k for k, v in SHORT_TO_FLEURS.items()}


def cv_language_name(locale: str) -> str:
    """LID name of a Common Voice locale (`zh-CN` -> "Mandarin Chinese"); KeyError names the locale."""
    if locale in CV_TO_FLEURS_NAME:
        return CV_TO_FLEURS_NAME[locale]
    if locale in CV_LOCALE_NAMES:
        return CV_LOCALE_NAMES[locale]
    raise KeyError(
        f"unknown Common Voice locale {locale!r}: add it to CV_LOCALE_NAMES in speechllm/data/languages.py"
    )


def language_name(code: str) -> str:
    """English name of a FLEURS code, a Common Voice locale or a short code; KeyError names the code.

    FLEURS codes contain `_`, CV locales never do, and every short code that is also a CV locale has the
    same name in both tables, so the lookup order cannot change a name."""
    if code in FLEURS_NAMES:
        return FLEURS_NAMES[code]
    if code in CV_LOCALE_NAMES:
        return cv_language_name(code)
    if code in SHORT_TO_FLEURS:
        return FLEURS_NAMES[SHORT_TO_FLEURS[code]]
    raise KeyError(f"unknown language code {code!r}")


class UnknownLanguageError(ValueError):
    """A manifest language without an English name or without a language-ID label; the message names the
    manifest and line."""


def language_name_at(code: str, where: str) -> str:
    """`language_name(code)`, or UnknownLanguageError naming `where` (manifest:line)."""
    try:
        return language_name(code)
    except KeyError:
        raise UnknownLanguageError(
            f"{where}: unknown language code {code!r} (not a FLEURS code, Common Voice "
            "locale or short code of speechllm/data/languages.py)"
        ) from None


def lid_label(code: str, language_ids: dict[str, int], where: str) -> int:
    """The language-ID label (1..N) of language `code`. A code without a name or a name without a label is an
    UnknownLanguageError naming `where` (manifest:line): it never becomes 0, the LID-CTC blank."""
    name = language_name_at(code, where)
    if name not in language_ids:
        raise UnknownLanguageError(
            f"{where}: language {code!r} ({name}) has no language-ID label; the labels "
            f"cover the languages of the training and dev manifests: {sorted(language_ids)}"
        )
    return language_ids[name]


def check_lid_labels(records: Iterable[dict[str, Any]], language_ids: dict[str, int], manifest: str) -> None:
    """Every record's language has a label (UnknownLanguageError naming the first that has not)."""
    for record in records:
        lid_label(
            record["language"], language_ids, location(record, manifest) or f"record {record.get('id')}"
        )
