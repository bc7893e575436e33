"""Typed `--settings` of the `speechllm targets` steps (see speechllm/settings.py).

The rules in rules/targets.smk build these from config `targets` plus `models.llm`, `models.prompt` and
`seed`.
`llm` stays the models-config dict: the models layer (targets/backends.py) builds the LLM from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from speechllm.settings import Prompt, StepSettings, setting


@dataclass(frozen=True)
class GenerateSettings(StepSettings):
    """`speechllm targets generate` (rule generate_targets)."""

    SECTION = "targets"
    templates: str
    """targets.templates: builtin | path to templates.json"""
    templates_per_occurrence: int
    """targets.templates_per_occurrence"""
    batch_size: int
    """targets.batch_size"""
    max_new_tokens: int
    """targets.max_new_tokens"""
    num_beams: int
    """targets.num_beams"""
    clean_up_spaces: bool
    """targets.clean_up_spaces"""
    backend: str
    """targets.backend: hf | vllm"""
    seed: int = setting(config="seed")
    """seed"""
    llm: dict[str, Any] = setting(config="models.llm")
    """models.llm (the models layer reads it)"""
    vllm: dict[str, Any] | None = setting(default=None)
    """targets.vllm (absent: the backend's defaults)"""
    prompt: dict[str, Any] = setting(config="models.prompt", default_factory=dict)
    """models.prompt: the frame around each prompt (absent: plain)"""


@dataclass(frozen=True)
class AssembleSettings(StepSettings):
    """`speechllm targets assemble` (rule assemble_targets)."""

    SECTION = "targets"
    mi_reading: str
    """targets.mi_reading: synthetic_only | reference_pop"""
    templates_per_occurrence: int
    """targets.templates_per_occurrence"""
    drop_blank_outputs: bool
    """targets.drop_blank_outputs"""
    prompt: Prompt = setting(config="models.prompt")
    """models.prompt"""


@dataclass(frozen=True)
class ImportReleasedSettings(StepSettings):
    """`speechllm targets import-released` (rule import_released_targets)."""

    SECTION = "targets"
    mi_reading: str
    """targets.mi_reading"""
    templates_per_occurrence: int
    """targets.templates_per_occurrence"""
    on_unmatched: str = setting(config="targets.released.on_unmatched")
    """targets.released.on_unmatched: error | skip"""
    llm: dict[str, Any] = setting(config="models.llm")
    """models.llm (its tokenizer maps the released token ids back to text)"""
    prompt: Prompt = setting(config="models.prompt")
    """models.prompt"""


@dataclass(frozen=True)
class Responses:
    text_field: str
    """targets.responses.text_field"""
    prompt_template: str
    """targets.responses.prompt_template: with {text}, or chat"""
    lowercase: bool
    """targets.responses.lowercase"""
    add_special_tokens: bool
    """targets.responses.add_special_tokens"""
    length_factor: int
    """targets.responses.length_factor"""
    num_beams: int
    """targets.responses.num_beams"""
    clean_up_spaces: bool
    """targets.responses.clean_up_spaces"""
    batch_size: int
    """targets.responses.batch_size"""


@dataclass(frozen=True)
class ResponsesSettings(StepSettings):
    """`speechllm targets responses` (rule generate_responses)."""

    SECTION = "targets"
    backend: str
    """targets.backend"""
    responses: Responses
    """targets.responses"""
    seed: int = setting(config="seed")
    """seed"""
    llm: dict[str, Any] = setting(config="models.llm")
    """models.llm (the models layer reads it)"""
    vllm: dict[str, Any] | None = setting(default=None)
    """targets.vllm (absent: the backend's defaults)"""
