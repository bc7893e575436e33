"""Typed `--settings` of the `speechllm evaluate` steps (see speechllm/settings.py).

Rules evaluate / evaluate_gather pass `{"evaluate": <config evaluate without shards and design>,
"sampling_rate": <data.sampling_rate>, "experiment": ...}` (rules/common.smk: eval_settings) whichever the
benchmark; each benchmark parses the `evaluate` object into its own dataclass (`BENCHMARK_SETTINGS`), with the
keys its decoding and scoring read. The score file and the shards' fingerprint record the settings object as
given (evaluate/rescore.py, evaluate/shards.py), not these dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from speechllm.settings import Prompt, StepSettings, setting


@dataclass(frozen=True)
class CascadeAsr:
    name_or_path: str | None = setting(default=None)
    """evaluate.cascade_asr.name_or_path (null: the CTC model's own head)"""
    revision: str = setting(default="main")
    """evaluate.cascade_asr.revision"""
    lowercase: bool = setting(default=True)
    """evaluate.cascade_asr.lowercase"""


@dataclass(frozen=True, kw_only=True)
class SystemSettings(StepSettings):
    """What building the evaluated system (evaluate/system.py: build_system) and batching read."""

    SECTION = "evaluate"
    batch_size: int
    """evaluate.batch_size"""
    ctc: dict[str, Any] | None = setting(default=None)
    """evaluate.ctc: CTC search (evaluate/ctc_search.py: CTCSearch.from_settings checks it; absent: greedy)"""
    cascade_asr: CascadeAsr | None = setting(default=None)
    """evaluate.cascade_asr (absent / null: the CTC model's own head)"""
    ctc_branch: bool = setting(default=True)
    """evaluate.ctc_branch"""
    unfinished_hypotheses: str = setting(default="keep")
    """evaluate.unfinished_hypotheses: keep | drop_last_token (an answer that ran out of budget)"""


@dataclass(frozen=True, kw_only=True)
class AsrSettings(SystemSettings):
    """`speechllm evaluate fleurs_asr`."""

    num_beams: int
    """evaluate.num_beams"""
    max_new_tokens: int
    """evaluate.max_new_tokens"""
    asr_alignment: str = setting(default="levenshtein")
    """evaluate.asr_alignment: levenshtein | sclite (the alignment whose edits CER/WER count)"""


@dataclass(frozen=True, kw_only=True)
class StSettings(AsrSettings):
    """`speechllm evaluate fleurs_st` / `covost2_st`."""

    st_prompt: Prompt
    """evaluate.st_prompt"""
    bleu_tokenize: dict[str, str]
    """evaluate.bleu_tokenize: target language -> sacreBLEU tokeniser (`default` for the rest)"""
    st_normalize: str = setting(default="both")
    """evaluate.st_normalize: both | references"""
    st_recordings: str = setting(default="all")
    """evaluate.st_recordings: all | last_per_sentence"""


@dataclass(frozen=True, kw_only=True)
class TaskSettings(AsrSettings):
    """`speechllm evaluate speechglue` / `speechxnli`."""

    option_prefix: str
    """evaluate.option_prefix"""
    glue_scoring: str
    """evaluate.glue_scoring: rank | constrained"""
    stsb_rank: str
    """evaluate.stsb_rank: argmax | expectation"""
    stsb_max_new_tokens: int
    """evaluate.stsb_max_new_tokens"""


@dataclass(frozen=True)
class Summarization:
    prompt: str
    """evaluate.summarization.prompt"""
    num_beams: int
    """evaluate.summarization.num_beams"""
    max_new_tokens: int
    """evaluate.summarization.max_new_tokens"""
    text_field: str
    """evaluate.summarization.text_field"""
    reference_field: str
    """evaluate.summarization.reference_field"""
    rouge_stemmer: bool
    """evaluate.summarization.rouge_stemmer"""
    meteor_tokenize: str
    """evaluate.summarization.meteor_tokenize"""
    text_turn: str
    """evaluate.summarization.text_turn: reference | segments"""
    bertscore: dict[str, Any]
    """evaluate.summarization.bertscore (evaluate/metrics.py: bertscore reads it)"""
    lowercase_text: bool = setting(default=False)
    """evaluate.summarization.lowercase_text"""


@dataclass(frozen=True, kw_only=True)
class SummarizationSettings(SystemSettings):
    """`speechllm evaluate summarization`."""

    summarization: Summarization
    """evaluate.summarization"""


@dataclass(frozen=True)
class ResponsePpl:
    text_field: str
    """evaluate.response_ppl.text_field"""
    response_field: str
    """evaluate.response_ppl.response_field"""
    append_eos: bool
    """evaluate.response_ppl.append_eos"""
    lowercase_text: bool = setting(default=False)
    """evaluate.response_ppl.lowercase_text"""


@dataclass(frozen=True, kw_only=True)
class ResponsePplSettings(SystemSettings):
    """`speechllm evaluate response_ppl`."""

    response_ppl: ResponsePpl
    """evaluate.response_ppl"""


BenchmarkSettings = AsrSettings | StSettings | TaskSettings | SummarizationSettings | ResponsePplSettings
BENCHMARK_SETTINGS: dict[str, type[SystemSettings]] = {
    "fleurs_asr": AsrSettings,
    "fleurs_st": StSettings,
    "covost2_st": StSettings,
    "speechglue": TaskSettings,
    "speechxnli": TaskSettings,
    "summarization": SummarizationSettings,
    "response_ppl": ResponsePplSettings,
}


def benchmark_settings(benchmark: str, raw: dict[str, Any], where: str = "settings") -> Any:
    """The `evaluate` object of an evaluation step's settings, parsed for `benchmark`."""
    if benchmark not in BENCHMARK_SETTINGS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {list(BENCHMARK_SETTINGS)}")
    return BENCHMARK_SETTINGS[benchmark].from_section(raw, where)


@dataclass(frozen=True)
class DecodeSettings(StepSettings):
    """The rest of `speechllm evaluate <benchmark>`'s settings: what the clips are read at."""

    sampling_rate: int = setting(config="data.sampling_rate")
    """data.sampling_rate"""


@dataclass(frozen=True)
class Covost2:
    languages: list[str]
    """evaluate.covost2.languages"""
    release_dir: str | None = setting(default=None)
    """evaluate.covost2.release_dir (the step stops when it is unset)"""
    tsv_dir: str | None = setting(default=None)
    """evaluate.covost2.tsv_dir (absent / null: the release's own TSVs)"""


@dataclass(frozen=True)
class Covost2Settings(StepSettings):
    """`speechllm evaluate covost2-manifest` (rule covost2_data): `{"evaluate": {"covost2": ...}}`."""

    SECTION = "evaluate"
    covost2: Covost2
    """evaluate.covost2"""
