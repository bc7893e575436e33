"""Typed `--settings` of `speechllm import kang-roy` (see speechllm/settings.py): rule
import_released_kang_roy (rules/models.smk) passes `{"models": ...}` with the parts of config `models` a
Kang & Roy model directory records; with `--config`, the experiment's `models` section is parsed alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from speechllm.settings import StepSettings


@dataclass(frozen=True)
class KangRoyModels:
    """The parts of config `models` a Kang & Roy model directory records (models/export.py: kang_roy_spec);
    the models layer reads them as dicts."""

    speech_encoder: dict[str, Any]
    """models.speech_encoder"""
    llm: dict[str, Any]
    """models.llm"""
    pooling: dict[str, int]
    """models.pooling: kernel_size, stride"""
    chat: dict[str, Any]
    """models.chat"""
    prompt: dict[str, Any]
    """models.prompt"""


@dataclass(frozen=True)
class ImportKangRoySettings(StepSettings):
    """`speechllm import kang-roy` (rule import_released_kang_roy; with `--config`: the experiment's
    `models`)."""

    models: KangRoyModels
    """models"""
