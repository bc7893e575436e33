"""The offline demo world: a written corpus spoken with TTS, and the tiny LLM and speech encoder it trains."""
