"""Typed `--settings` of the `speechllm data` steps (see speechllm/settings.py).

Each rule in rules/data.smk copies keys of config `data` (rules/common.smk: data_settings,
source_settings), so every field's config key is `data.<field>` (nested: `data.<field>.<key>`).
"""

from __future__ import annotations

from dataclasses import dataclass

from speechllm.settings import StepSettings, setting


@dataclass(frozen=True)
class Tts:
    """data.tts: the speech synthesiser the demo corpus and TTS-voiced sets are spoken with."""

    backend: str
    """data.tts.backend"""
    words_per_minute: int
    """data.tts.words_per_minute"""
    voices: dict[str, str]
    """data.tts.voices: language code -> voice"""


@dataclass(frozen=True)
class DemoBuild:
    """data.demo: the demo corpus's composed sentences and task items."""

    llm_train_fraction: float
    """data.demo.llm_train_fraction"""
    composed: dict[str, int] | None = setting(default=None)
    """data.demo.composed (absent: no composed sentences)"""
    composed_glue: dict[str, int] | None = setting(default=None)
    """data.demo.composed_glue (absent: no composed GLUE items)"""


@dataclass(frozen=True)
class GlueTasks:
    tasks: list[str]
    """data.speechglue.tasks"""


@dataclass(frozen=True)
class XnliLanguages:
    languages: list[str]
    """data.speechxnli.languages"""


@dataclass(frozen=True)
class DemoSettings(StepSettings):
    """`speechllm data demo` (rule demo_data)."""

    SECTION = "data"
    sampling_rate: int
    """data.sampling_rate"""
    languages: list[str]
    """data.languages"""
    tts: Tts
    """data.tts"""
    demo: DemoBuild
    """data.demo"""
    speechglue: GlueTasks
    """data.speechglue.tasks"""
    speechxnli: XnliLanguages
    """data.speechxnli.languages"""


@dataclass(frozen=True)
class Fleurs:
    dataset: str
    """data.fleurs.dataset: hub id or local copy"""
    revision: str
    """data.fleurs.revision"""


@dataclass(frozen=True)
class FleursSettings(StepSettings):
    """`speechllm data fleurs` (rule fleurs_data)."""

    SECTION = "data"
    languages: list[str]
    """data.languages"""
    fleurs: Fleurs
    """data.fleurs"""
    on_bad_audio: str
    """data.on_bad_audio: error | skip"""


@dataclass(frozen=True)
class CommonVoice:
    max_hours_per_language: float
    """data.common_voice.max_hours_per_language"""
    seed: int
    """data.common_voice.seed"""
    release_dir: str | None = setting(default=None)
    """data.common_voice.release_dir (the step stops when it is unset)"""
    utterance_list: str | None = setting(default=None)
    """data.common_voice.utterance_list (absent / null: redraw the subsample)"""
    durations: str | None = setting(default=None)
    """data.common_voice.durations (absent / null: measured)"""


@dataclass(frozen=True)
class CommonVoiceSettings(StepSettings):
    """`speechllm data common-voice` (rule common_voice_data)."""

    SECTION = "data"
    common_voice: CommonVoice
    """data.common_voice"""
    on_bad_audio: str
    """data.on_bad_audio"""


@dataclass(frozen=True)
class LibriSpeech:
    dataset: str
    """data.librispeech.dataset"""
    revision: str
    """data.librispeech.revision"""
    config: str
    """data.librispeech.config"""
    splits: dict[str, list[str]]
    """data.librispeech.splits: split -> hub splits"""
    max_duration: float
    """data.librispeech.max_duration (seconds)"""


@dataclass(frozen=True)
class LibriSpeechSettings(StepSettings):
    """`speechllm data librispeech` (rule librispeech_data)."""

    SECTION = "data"
    librispeech: LibriSpeech
    """data.librispeech"""
    on_bad_audio: str
    """data.on_bad_audio"""


@dataclass(frozen=True)
class Articles:
    source: str
    """data.articles.source: demo | hub"""
    dataset: str
    """data.articles.dataset"""
    config: str
    """data.articles.config"""
    split: str
    """data.articles.split"""
    revision: str
    """data.articles.revision"""
    max_chars: int
    """data.articles.max_chars"""
    segmentation: str
    """data.articles.segmentation: sentences | whole"""
    pause_seconds: float
    """data.articles.pause_seconds"""
    voice: str
    """data.articles.voice: a key of data.tts.voices"""
    max_articles: int | None = setting(default=None)
    """data.articles.max_articles (absent / null: every article)"""


@dataclass(frozen=True)
class ArticlesSettings(StepSettings):
    """`speechllm data articles` (rule articles_data)."""

    SECTION = "data"
    articles: Articles
    """data.articles"""
    tts: Tts
    """data.tts"""
    sampling_rate: int
    """data.sampling_rate"""


@dataclass(frozen=True)
class SpeechGlue:
    tasks: list[str]
    """data.speechglue.tasks"""
    source: str = setting(default="tts")
    """data.speechglue.source: tts | released"""
    release_dir: str | None = setting(default=None)
    """data.speechglue.release_dir (source released)"""
    dataset: str | None = setting(default=None)
    """data.speechglue.dataset (source tts: the GLUE text sets; required there)"""
    revision: str = setting(default="main")
    """data.speechglue.revision"""


@dataclass(frozen=True)
class SpeechGlueSettings(StepSettings):
    """`speechllm data speechglue` (rule speechglue_data)."""

    SECTION = "data"
    speechglue: SpeechGlue
    """data.speechglue"""
    tts: Tts
    """data.tts"""
    sampling_rate: int
    """data.sampling_rate"""


@dataclass(frozen=True)
class SpeechXnli:
    languages: list[str]
    """data.speechxnli.languages"""
    dataset: str
    """data.speechxnli.dataset"""
    source: str = setting(default="tts")
    """data.speechxnli.source: tts | released"""
    release_dir: str | None = setting(default=None)
    """data.speechxnli.release_dir (source released; absent / null: the --archive)"""
    revision: str = setting(default="main")
    """data.speechxnli.revision"""


@dataclass(frozen=True)
class SpeechXnliSettings(StepSettings):
    """`speechllm data speechxnli` (rule speechxnli_data)."""

    SECTION = "data"
    speechxnli: SpeechXnli
    """data.speechxnli"""
    tts: Tts
    """data.tts"""
    sampling_rate: int
    """data.sampling_rate"""


@dataclass(frozen=True)
class PrepareSettings(StepSettings):
    """`speechllm data prepare` (rule prepare_split)."""

    SECTION = "data"
    sampling_rate: int
    """data.sampling_rate"""
    min_duration: float
    """data.min_duration (the rule resolves `auto` to seconds)"""
    max_duration: float
    """data.max_duration"""
    speed_perturb: list[float]
    """data.speed_perturb (the rule passes [1.0] for dev and test)"""
    on_bad_audio: str
    """data.on_bad_audio"""
    filter_durations: bool
    """the rule's: not the test split, or data.filter_test_durations"""
