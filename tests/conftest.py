"""Shared fixtures: paths to ../shared/data (read in place, skipped where absent) and tiny local models."""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SPEECHLLM_SHARED_DATA", REPO.parent / "shared" / "data"))
# Caches that Python and the tools write into the checkout by design.
TOOL_CACHES = ("__pycache__", ".pytest_cache", ".ruff_cache")


def checkout_state() -> set[str] | None:
    """`git status --porcelain --ignored` of the checkout (ignored outputs such as results/ included), tool
    caches aside; None outside a git checkout."""
    try:
        res = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--ignored"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if res.returncode != 0:
        return None
    return {line for line in res.stdout.splitlines() if not any(cache in line for cache in TOOL_CACHES)}


@pytest.fixture(scope="session", autouse=True)
def checkout_untouched():
    """The tests write only under tmp: the checkout (with its ignored files) is as it was before them."""
    before = checkout_state()
    yield
    after = checkout_state()
    if before is not None and after is not None:
        assert after == before, f"the tests changed the checkout {REPO}: {sorted(after ^ before)}"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"shared test data not found at {SHARED_DATA} (CI has it beside the checkout; "
            "set SPEECHLLM_SHARED_DATA to use another copy)"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer + tiny BLOOM and a tiny MMS-architecture Wav2Vec2, saved with save_pretrained."""
    from speechllm.demo.build import build_speech_encoder, build_tokenizer

    root = tmp_path_factory.mktemp("tiny_models")
    texts = [
        "Repeat the sentence: the cat sits on the mat. ",
        "Der Hund schläft im Garten.",
        "Translate the following text from German to English\n",
        "hello world",
    ] * 20
    tok = build_tokenizer(texts, 300, root / "llm")
    tiny_bloom(root / "llm", len(tok))
    enc_cfg = {
        "speech_encoder": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "conv_dim": [32, 32, 32],
            "conv_stride": [5, 4, 4],
            "conv_kernel": [10, 4, 4],
            "num_conv_pos_embeddings": 16,
            "num_conv_pos_embedding_groups": 2,
        }
    }
    build_speech_encoder(root / "mms", enc_cfg, 16000, seed=0)
    return {"llm": root / "llm", "encoder": root / "mms"}


@pytest.fixture(scope="session")
def reduced_demo(tmp_path_factory):
    """The reduced demo DAG, run once for the session (reduced_demo.py)."""
    from reduced_demo import run_reduced_demo

    return run_reduced_demo(tmp_path_factory.mktemp("reduced_demo"))


@pytest.fixture(scope="session")
def tiny_bertscore_model(tmp_path_factory) -> Path:
    """A 3-layer RoBERTa with a byte-level BPE tokenizer (the kind of bert-score's English roberta-large),
    saved with save_pretrained: a local BERTScore scoring model."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    root = tmp_path_factory.mktemp("tiny_roberta")
    texts = [
        "The council approved a new park on Monday.",
        "Heavy rain closed two roads.",
        "A local team won the cup after a late goal.",
        "the cat sat on the mat",
    ] * 10
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=300, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False
    )
    bpe.save_model(str(root))
    tokenizer = RobertaTokenizer(str(root / "vocab.json"), str(root / "merges.txt"), model_max_length=128)
    tokenizer.save_pretrained(root)
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=130,
        pad_token_id=tokenizer.pad_token_id,
    )
    RobertaModel(config).save_pretrained(root)
    return root


def tiny_bloom(out_dir: Path, tokenizer_size: int, initializer_range: float = 0.02) -> None:
    """A 2-layer BLOOM (hidden 32), 8 more embedding rows than tokenizer entries as BLOOM, saved to
    out_dir."""
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    config = BloomConfig(
        vocab_size=tokenizer_size + 8,
        hidden_size=32,
        n_layer=2,
        n_head=4,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        initializer_range=initializer_range,
    )
    BloomForCausalLM(config).save_pretrained(out_dir)


def tiny_adaptor():
    """An AdaptorConfig small enough for tests, for a 32-wide LLM and 2 languages."""
    from speechllm.models.adaptor import AdaptorConfig

    return AdaptorConfig(
        input_dim=16,
        d_model=32,
        heads=2,
        linear_units=64,
        cgmlp_units=64,
        cgmlp_kernel=5,
        merge_kernel=5,
        num_blocks=2,
        interctc_layer=1,
        num_lid_classes=3,
        llm_hidden_size=32,
    )


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


@pytest.fixture()
def stop_signals():
    """`speechllm.stopping` installed in this (pytest) process for one test: SIGTERM / SIGUSR1 only record a
    stop request. Yields a function that sends SIGTERM to this process; the handlers are restored
    afterwards."""
    import signal

    from speechllm import stopping

    saved = {sig: signal.getsignal(sig) for sig in stopping.STOP_SIGNALS}
    stopping.reset()
    stopping.install()
    try:
        yield lambda: os.kill(os.getpid(), signal.SIGTERM)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        stopping.reset()


@pytest.fixture()
def bad_server():
    """`bad_server(kind)` starts a loopback HTTP server and returns the URL of a file it serves badly: "cut"
    announces 1000 bytes and closes the connection after 10 (a dropped download); "stall" sends the headers
    and 10 bytes, then nothing for 30 s (a stalled server); "missing" answers 404. Stopped at teardown."""
    started = []
    released = threading.Event()

    def start(kind: str) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                if kind == "missing":
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b"\x1f\x8b" + bytes(8))
                self.wfile.flush()
                if kind == "stall":
                    released.wait(30)
                self.close_connection = True

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        started.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}/speech_xnli.tar.gz"

    yield start
    released.set()
    for server, thread in started:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
