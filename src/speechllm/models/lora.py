"""Optional LoRA adapters on the frozen LLM (config `models.llm.lora`), for the CE and KD stages.

Both papers keep the LLM frozen (`models.llm.lora: null`, the default). With a LoRA section, low-rank adapters
(Hu et al. 2022, via peft's `inject_adapter_in_model`) are added to the named linear layers of the LLM after
it is frozen: their weights are trainable, so they are in `trainable_state_dict`, the optimizer, every
checkpoint (exact resume) and the exported `model.safetensors`; a model directory whose `speechllm.json` names
the same LoRA section rebuilds them before its weights load. B starts at zero, so a fresh adapter leaves the
LLM's outputs unchanged. The adapters act in the stages that train through the LLM (spec stage other than
`ctc`); Kang & Roy's teacher (the text-prompted run of the same LLM) runs with them switched off: it is the
frozen LLM.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

LORA_KEYS = ("r", "alpha", "target_modules")
LORA_MARK = ".lora_"  # in every adapter parameter's name (peft: `<layer>.lora_A.default.weight`)


class LoraUnavailable(RuntimeError):
    """`models.llm.lora` is set but peft is not installed."""


def check_lora_config(lora: dict[str, Any]) -> dict[str, Any]:
    missing = [k for k in LORA_KEYS if k not in lora]
    if missing:
        raise ValueError(f"models.llm.lora needs {', '.join(missing)}")
    return lora


def add_lora(lm: nn.Module, lora: dict[str, Any]) -> nn.Module:
    """Inject LoRA adapters (dropout 0: the LLM stays in eval mode) into `lm` in place; returns `lm`."""
    check_lora_config(lora)
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as error:
        raise LoraUnavailable(
            "models.llm.lora is set but peft is not installed (pip install 'speechllm[lora]')"
        ) from error
    config = LoraConfig(
        r=int(lora["r"]),
        lora_alpha=float(lora["alpha"]),
        target_modules=list(lora["target_modules"]),
        lora_dropout=0.0,
        bias="none",
    )
    inject_adapter_in_model(config, lm)
    for name, param in lm.named_parameters():
        param.requires_grad_(LORA_MARK in name)
    return lm


def is_lora_weight(name: str) -> bool:
    return LORA_MARK in name


def adapter_layers(lm: nn.Module) -> list[nn.Module]:
    return [m for m in lm.modules() if hasattr(m, "enable_adapters") and hasattr(m, "lora_A")]


@contextlib.contextmanager
def adapters_disabled(lm: nn.Module) -> Iterator[None]:
    """Run `lm` as the frozen LLM (LoRA switched off) inside the block; a no-op without adapters."""
    layers = adapter_layers(lm)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
