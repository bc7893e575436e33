"""speechllm: teach multilingual LLMs to understand speech (BLOOMZMMS, speech-prompted summarization).

`speechllm.load(path_or_hub_id, device=..., dtype=...)` returns a `SpeechModel` (see `speechllm.api`); it is
imported on first use, so `import speechllm` stays cheap (no torch).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Audio", "SpeechModel", "load"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from speechllm import api

        return getattr(api, name)
    raise AttributeError(f"module 'speechllm' has no attribute {name!r}")
