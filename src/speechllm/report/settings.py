"""Typed `--settings` of `speechllm report wandb` (see speechllm/settings.py); rule wandb_results builds them
(rules/common.smk: wandb_results_settings)."""

from __future__ import annotations

from dataclasses import dataclass

from speechllm.settings import StepSettings, Wandb, setting


@dataclass(frozen=True)
class ModelRun:
    """The scored model's training run, as rules/train.smk names it (rules/common.smk: TRAINED_MODELS)."""

    job_type: str
    name: str


@dataclass(frozen=True)
class WandbResultsSettings(StepSettings):
    """`speechllm report wandb` (rule wandb_results)."""

    experiment: str
    """experiment"""
    wandb: Wandb
    """wandb"""
    model_run: ModelRun | None = setting(default=None)
    """the rule's: the scored model's training run (absent / null: an untrained model)"""
    model_dir: str | None = setting(default=None)
    """the rule's: the system's model directory (evaluate.design)"""
    decoder: str | None = setting(default=None)
    """the rule's: the system's decoder (evaluate.design)"""
