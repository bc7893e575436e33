"""Shared fixtures: paths to ../shared/data (read in place, skipped where absent) and tiny local models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SPEECHLLM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (CI has it beside the checkout; "
                    "set SPEECHLLM_SHARED_DATA to use another copy)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer + tiny BLOOM and a tiny MMS-architecture Wav2Vec2, saved with save_pretrained."""
    from speechllm.models.demo_build import build_speech_encoder, build_tokenizer

    root = tmp_path_factory.mktemp("tiny_models")
    texts = ["Repeat the sentence: the cat sits on the mat. ", "Der Hund schläft im Garten.",
             "Translate the following text from German to English\n", "hello world"] * 20
    tok = build_tokenizer(texts, 300, root / "llm")
    tiny_bloom(root / "llm", len(tok))
    enc_cfg = {"speech_encoder": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                                  "intermediate_size": 64, "conv_dim": [32, 32, 32], "conv_stride": [5, 4, 4],
                                  "conv_kernel": [10, 4, 4], "num_conv_pos_embeddings": 16,
                                  "num_conv_pos_embedding_groups": 2}}
    build_speech_encoder(root / "mms", enc_cfg, 16000, seed=0)
    return {"llm": root / "llm", "encoder": root / "mms"}


def tiny_bloom(out_dir: Path, tokenizer_size: int, initializer_range: float = 0.02) -> None:
    """A 2-layer BLOOM (hidden 32), 8 more embedding rows than tokenizer entries as BLOOM, saved to out_dir."""
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    config = BloomConfig(vocab_size=tokenizer_size + 8, hidden_size=32, n_layer=2, n_head=4, bos_token_id=1,
                         eos_token_id=2, pad_token_id=3, initializer_range=initializer_range)
    BloomForCausalLM(config).save_pretrained(out_dir)


def tiny_adaptor():
    """An AdaptorConfig small enough for tests, for a 32-wide LLM and 2 languages."""
    from speechllm.models.adaptor import AdaptorConfig

    return AdaptorConfig(input_dim=16, d_model=32, heads=2, linear_units=64, cgmlp_units=64, cgmlp_kernel=5,
                         merge_kernel=5, num_blocks=2, interctc_layer=1, num_lid_classes=3,
                         llm_hidden_size=32)


def bloomzmms_models_cfg(llm_dir: Path, encoder_dir: Path) -> dict:
    """The `models` config section of a BLOOMZMMS model over a local LLM and speech encoder."""
    return {
        "llm": {"name_or_path": str(llm_dir), "revision": "main", "dtype": "float32", "load_in_8bit": False},
        "speech_encoder": {"name_or_path": str(encoder_dir), "revision": "main", "normalize_waveform": True},
        "prompt": {"prefix": "Repeat the sentence: ", "postfix": ". "},
    }


@pytest.fixture()
def tiny_spec(tiny_models) -> dict:
    """A speechllm.json-style spec over the tiny models."""
    from speechllm.models.export import model_spec

    models_cfg = bloomzmms_models_cfg(tiny_models["llm"], tiny_models["encoder"])
    return model_spec(models_cfg, tiny_adaptor(), {"English": 1, "German": 2}, stage="ctc")
