"""Choose the generation backend named by `targets.backend`: `hf` (transformers) or `vllm`."""

from __future__ import annotations

from typing import Any

from speechllm.targets.generate import HFGenerator, TextGenerator

BACKENDS = ("hf", "vllm")


def load_tokenizer(llm_cfg: dict[str, Any]) -> Any:
    """The LLM's tokenizer alone (hub id with revision, or a local directory)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    name = llm_cfg["name_or_path"]
    kwargs = {} if Path(name).exists() else {"revision": llm_cfg.get("revision")}
    return AutoTokenizer.from_pretrained(name, **kwargs)


def load_generator(
    llm_cfg: dict[str, Any],
    backend: str,
    batch_size: int,
    num_beams: int,
    seed: int,
    vllm_cfg: dict[str, Any] | None = None,
    add_special_tokens: bool = False,
    clean_up_spaces: bool = False,
) -> TextGenerator:
    """A ready `TextGenerator`; raises BackendUnavailable for `vllm` when it cannot be imported."""
    if backend == "vllm":
        from speechllm.targets.vllm_backend import VLLMGenerator, import_vllm

        import_vllm()  # fail before loading anything
        if not vllm_cfg:
            raise ValueError("targets.backend is 'vllm' but the config has no targets.vllm section")
        return VLLMGenerator(
            llm_cfg,
            load_tokenizer(llm_cfg),
            vllm_cfg["chunk_size"],
            seed,
            vllm_cfg["gpu_memory_utilization"],
            num_beams,
            add_special_tokens,
            clean_up_spaces,
        )
    if backend != "hf":
        raise ValueError(f"targets.backend must be one of {BACKENDS}, got {backend!r}")
    from speechllm.cliutils import pick_device
    from speechllm.models.export import load_llm

    lm, tokenizer = load_llm(llm_cfg, pick_device())
    lm.eval()
    return HFGenerator(lm, tokenizer, batch_size, num_beams, add_special_tokens, clean_up_spaces)
