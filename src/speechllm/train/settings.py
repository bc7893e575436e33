"""Typed `--settings` of `speechllm train init|ctc|ce|kd` (see speechllm/settings.py).

Rules train_init / kang_roy_init pass rules/common.smk `init_settings`, rules train_ctc / train_ce / train_kd
`train_settings(<stage>)`: config `models` without `demo_build`, `models.adaptor` again as `adaptor`, `seed`,
`experiment`, `wandb` and `data.sampling_rate`; the training stages add `train.<stage>` as `stage`, and KD
the teacher prompt's `targets.responses` keys.

The models layer builds the model from the whole `models` section (models/export.py: model_spec,
kang_roy_spec): the command passes it on as given, and the run fingerprint and the tracker's recorded config
hash and dump the settings object as given; the dataclasses here are what the command reads itself.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from speechllm.settings import Prompt, StepSettings, Wandb, check, parse, setting
from speechllm.train.loop import StageConfig

T = TypeVar("T", bound="TrainSettings")


@dataclass(frozen=True)
class Llm:
    name_or_path: str
    """models.llm.name_or_path (its config gives the adaptor's output size)"""
    gradient_checkpointing: bool = setting(default=False)
    """models.llm.gradient_checkpointing"""
    lora: dict[str, Any] | None = setting(default=None)
    """models.llm.lora (null: a frozen LLM; the models layer reads r, alpha, target_modules)"""


@dataclass(frozen=True)
class Models:
    """The keys of config `models` the command reads itself."""

    llm: Llm
    """models.llm"""
    prompt: Prompt
    """models.prompt: the BLOOMZMMS collator's frame around the speech"""


@dataclass(frozen=True)
class Adaptor:
    """models.adaptor: the E-Branchformer adaptor's sizes (models/adaptor.py: AdaptorConfig)."""

    input_dim: int
    d_model: int
    heads: int
    linear_units: int
    cgmlp_units: int
    cgmlp_kernel: int
    merge_kernel: int
    num_blocks: int
    dropout: float
    pos_dropout: float
    attn_dropout: float
    interctc_layer: int
    """1-based block after which the LID inter-CTC reads"""
    lid_classes: int | None = setting(default=None)
    """classes of the LID-CTC head (None: the data's languages + blank; the reference: 140)"""


@dataclass(frozen=True)
class Responses:
    """targets.responses: how the KD teacher's prompt was made from a transcript (as the responses were)."""

    text_field: str = setting(default="raw_transcription")
    """targets.responses.text_field"""
    lowercase: bool = setting(default=True)
    """targets.responses.lowercase"""


@dataclass(frozen=True, kw_only=True)
class InitSettings(StepSettings):
    """`speechllm train init` (rules train_init, kang_roy_init): the untrained model."""

    SECTION = ""
    OBJECTIVE: ClassVar[str] = "init"
    seed: int
    """seed (the untrained adaptor's initialisation and the data order)"""
    experiment: str
    """experiment (the W&B group)"""
    wandb: Wandb
    """wandb"""
    sampling_rate: int = setting(config="data.sampling_rate")
    """data.sampling_rate"""
    models: Models
    """models"""
    adaptor: Adaptor = setting(config="models.adaptor")
    """models.adaptor"""
    system: str = setting(default="bloomzmms")
    """system: bloomzmms | kang_roy (only init_settings("kang_roy") passes it)"""


@dataclass(frozen=True, kw_only=True)
class TrainSettings(InitSettings):
    """A training stage's settings: the model's plus `train.<stage>` (CtcSettings, CeSettings, KdSettings)."""

    OBJECTIVE: ClassVar[str] = ""
    stage: StageConfig = setting(default=None)
    """train.<objective>: StageConfig.from_config reads it (not the field-by-field parser: StageConfig holds
    every objective's knobs, and the objective is the command's); never None after from_settings"""

    @classmethod
    def from_settings(cls: type[T], raw: Any, where: str = "settings") -> T:
        """The common keys as every step's, then `stage` through StageConfig.from_config: a missing stage or
        a value it refuses is a ValueError naming `train.<stage>`."""
        key = f"train.{cls.OBJECTIVE}"
        if not isinstance(raw, dict):
            return parse(cls, raw, "", where)  # raises: not an object
        settings = parse(cls, {k: v for k, v in raw.items() if k != "stage"}, "", where)
        if "stage" not in raw:
            raise ValueError(f"{where} key {key}: missing")
        values = check(raw["stage"], dict[str, Any], key, where)
        try:
            stage = StageConfig.from_config(cls.OBJECTIVE, values)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{where} key {key}: {err}") from err
        return dataclasses.replace(settings, stage=stage)


@dataclass(frozen=True, kw_only=True)
class CtcSettings(TrainSettings):
    """`speechllm train ctc` (rule train_ctc)."""

    OBJECTIVE: ClassVar[str] = "ctc"
    stage: StageConfig = setting(config="train.ctc", default=None)
    """train.ctc"""


@dataclass(frozen=True, kw_only=True)
class CeSettings(TrainSettings):
    """`speechllm train ce` (rule train_ce)."""

    OBJECTIVE: ClassVar[str] = "ce"
    stage: StageConfig = setting(config="train.ce", default=None)
    """train.ce"""


@dataclass(frozen=True, kw_only=True)
class KdSettings(TrainSettings):
    """`speechllm train kd` (rule train_kd)."""

    OBJECTIVE: ClassVar[str] = "kd"
    stage: StageConfig = setting(config="train.kd", default=None)
    """train.kd"""
    responses: Responses = setting(config="targets.responses", default_factory=Responses)
    """targets.responses (text_field, lowercase)"""


STAGE_SETTINGS: dict[str, type[InitSettings]] = {
    "init": InitSettings,
    "ctc": CtcSettings,
    "ce": CeSettings,
    "kd": KdSettings,
}
