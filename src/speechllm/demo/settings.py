"""Typed `--settings` of `speechllm models demo-llm` and `models demo-speech-encoder` (see
speechllm/settings.py); rules demo_llm and demo_speech_encoder (rules/models.smk) build them from config
slices, so each field names its config key.

The demo builders (demo/build.py) read `models.demo_build` as a dict (benchmarks build with it too); the
commands pass them `dataclasses.asdict` of the parsed parts, which holds exactly the keys typed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from speechllm.demo.encoder_ctc import CtcFinetuneConfig
from speechllm.settings import Prompt, StepSettings, setting


@dataclass(frozen=True)
class LlmPretrain:
    """models.demo_build.llm_pretrain: the tiny BLOOM's instruction pretraining."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    max_length: int
    sort_pool_batches: int
    weight_decay: float
    grad_clip: float
    templates_per_sentence: int
    task_repeats: int
    freeze_embeddings: bool


@dataclass(frozen=True)
class DemoLlmBuild:
    """models.demo_build: the keys of the demo LLM and its tokenizer."""

    tokenizer_vocab_size: int
    """models.demo_build.tokenizer_vocab_size"""
    llm_vocab_pad_to: int
    """models.demo_build.llm_vocab_pad_to"""
    llm_embedding_norm: float
    """models.demo_build.llm_embedding_norm"""
    llm: dict[str, Any]
    """models.demo_build.llm: BloomConfig keywords (hidden_size, n_layer, n_head)"""
    llm_pretrain: LlmPretrain
    """models.demo_build.llm_pretrain"""


@dataclass(frozen=True)
class DemoLlmSettings(StepSettings):
    """`speechllm models demo-llm` (rule demo_llm)."""

    demo_build: DemoLlmBuild = setting(config="models.demo_build")
    """models.demo_build"""
    prompt: Prompt = setting(config="models.prompt")
    """models.prompt: the repeat prompt the CTC / CE stages train with"""
    st_prompt: Prompt = setting(config="evaluate.st_prompt")
    """evaluate.st_prompt"""
    llm_fraction: float = setting(config="data.demo.llm_train_fraction")
    """data.demo.llm_train_fraction"""
    option_prefix: str = setting(config="evaluate.option_prefix")
    """evaluate.option_prefix"""
    seed: int = setting(config="seed")
    """seed"""
    composed: dict[str, int] | None = setting(config="data.demo.composed", default=None)
    """data.demo.composed (absent / null: no composed sentences)"""
    composed_glue: dict[str, int] | None = setting(config="data.demo.composed_glue", default=None)
    """data.demo.composed_glue (absent / null: no composed GLUE items)"""


@dataclass(frozen=True)
class DemoSpeechEncoder:
    """models.demo_build.speech_encoder: MMS's stable-layer-norm Wav2Vec2 at demo size."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    conv_dim: list[int]
    conv_stride: list[int]
    conv_kernel: list[int]
    num_conv_pos_embeddings: int
    num_conv_pos_embedding_groups: int
    ctc_finetune: CtcFinetuneConfig
    """models.demo_build.speech_encoder.ctc_finetune (demo/encoder_ctc.py)"""


@dataclass(frozen=True)
class DemoEncoderBuild:
    speech_encoder: DemoSpeechEncoder
    """models.demo_build.speech_encoder"""


@dataclass(frozen=True)
class DemoSpeechEncoderSettings(StepSettings):
    """`speechllm models demo-speech-encoder` (rule demo_speech_encoder)."""

    demo_build: DemoEncoderBuild = setting(config="models.demo_build")
    """models.demo_build"""
    sampling_rate: int = setting(config="data.sampling_rate")
    """data.sampling_rate"""
    seed: int = setting(config="seed")
    """seed"""
