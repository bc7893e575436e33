"""speechllm: teach multilingual LLMs to understand speech (BLOOMZMMS, speech-prompted summarization)."""

__version__ = "0.1.0"
