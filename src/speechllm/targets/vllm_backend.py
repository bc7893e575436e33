"""Optional vLLM backend (GPU clusters): the same prompts, limits and output text as `HFGenerator`.

Prompts are tokenised with the HF tokenizer and handed to vLLM as token ids, and the generated ids are
decoded with that tokenizer, so both backends see and write exactly the same strings.
"""

from __future__ import annotations

from typing import Any

from speechllm.targets.generate import OnBatch, row_tokens


class BackendUnavailable(ValueError):
    """The configured generation backend cannot be used on this machine (a config problem: one clear line)."""


def import_vllm() -> Any:
    try:
        import vllm
    except ImportError as err:  # also raised when a broken install fails to import its CUDA parts
        raise BackendUnavailable(
            f"targets.backend is 'vllm' but vLLM cannot be imported here ({err}); install it on a GPU "
            "machine (pip install vllm) or set targets.backend: hf"
        ) from err
    return vllm


class VLLMGenerator:
    """Greedy generation through `vllm.LLM`, `chunk_size` prompts per call (each chunk is then cached)."""

    def __init__(
        self,
        llm_cfg: dict[str, Any],
        tokenizer: Any,
        chunk_size: int,
        seed: int,
        gpu_memory_utilization: float,
        num_beams: int = 1,
        add_special_tokens: bool = False,
        clean_up_spaces: bool = False,
    ) -> None:
        vllm = import_vllm()
        if num_beams != 1:
            raise ValueError(
                "targets.backend 'vllm' decodes greedily only; set num_beams: 1 or targets.backend: hf"
            )
        if llm_cfg.get("load_in_8bit"):
            raise ValueError(
                "targets.backend 'vllm' does not load bitsandbytes 8-bit models; set "
                "models.llm.load_in_8bit: false (and a dtype) or targets.backend: hf"
            )
        self.vllm, self.tokenizer, self.chunk_size = vllm, tokenizer, chunk_size
        self.add_special_tokens, self.clean_up_spaces = add_special_tokens, clean_up_spaces
        self.llm = vllm.LLM(
            model=llm_cfg["name_or_path"],
            tokenizer=llm_cfg["name_or_path"],
            revision=llm_cfg.get("revision"),
            tokenizer_revision=llm_cfg.get("revision"),
            dtype=llm_cfg["dtype"],
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
        )
        eos = tokenizer.eos_token_id
        self.stop_ids = {eos} if eos is not None else set()

    def prompt_length(self, prompt: str) -> int:
        return len(self._ids(prompt))

    def _ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=self.add_special_tokens).input_ids

    def generate(
        self, prompts: list[str], max_new_tokens: list[int], on_batch: OnBatch | None = None
    ) -> list[str]:
        outputs: list[str] = [""] * len(prompts)
        for start in range(0, len(prompts), self.chunk_size):
            idx = list(range(start, min(start + self.chunk_size, len(prompts))))
            params = [
                self.vllm.SamplingParams(n=1, temperature=0.0, max_tokens=max_new_tokens[i], detokenize=False)
                for i in idx
            ]
            results = self.llm.generate(
                [{"prompt_token_ids": self._ids(prompts[i])} for i in idx], params, use_tqdm=False
            )
            for i, result in zip(idx, results, strict=True):
                ids = row_tokens(list(result.outputs[0].token_ids), max_new_tokens[i], self.stop_ids)
                text = self.tokenizer.decode(
                    ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
                )
                outputs[i] = self.tokenizer.clean_up_tokenization(text) if self.clean_up_spaces else text
            if on_batch is not None:
                on_batch([(i, outputs[i]) for i in idx])
        return outputs
