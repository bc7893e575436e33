"""`speechllm models` subcommands: build local demo models, fetch hub models"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from speechllm.cliutils import parse_settings, set_threads

log = logging.getLogger("speechllm")


def cmd_models_demo_llm(args: argparse.Namespace) -> None:
    from speechllm.models.demo_build import build_llm

    s = parse_settings(args.settings)
    set_threads(args.threads)
    stats = build_llm(Path(args.out_dir), s["demo_build"], s["prompt"], s["st_prompt"], s["llm_fraction"],
                      s["option_prefix"], s["seed"])
    log.info("demo LLM: %s", stats)


def cmd_models_fetch(args: argparse.Namespace) -> None:
    from huggingface_hub import snapshot_download

    path = snapshot_download(args.name, revision=args.revision)
    log.info("fetched %s@%s into %s", args.name, args.revision, path)


def cmd_models_demo_speech_encoder(args: argparse.Namespace) -> None:
    from speechllm.models.demo_build import build_speech_encoder

    s = parse_settings(args.settings)
    n = build_speech_encoder(Path(args.out_dir), s["demo_build"], s["sampling_rate"], s["seed"])
    log.info("demo speech encoder: %d parameters", n)


def register(sub: argparse._SubParsersAction) -> None:
    models = sub.add_parser("models", help="build the local demo models")
    msub = models.add_subparsers(dest="action", required=True)
    m = msub.add_parser("demo-llm", help="tokenizer + tiny BLOOM pretrained on the demo text")
    m.add_argument("--settings", required=True)
    m.add_argument("--out-dir", required=True)
    m.add_argument("--threads", type=int, default=1)
    m.set_defaults(func=cmd_models_demo_llm)
    m = msub.add_parser("fetch", help="download a hub model into the Hugging Face cache")
    m.add_argument("--name", required=True)
    m.add_argument("--revision", default="main")
    m.set_defaults(func=cmd_models_fetch)
    m = msub.add_parser("demo-speech-encoder", help="tiny Wav2Vec2 in the MMS architecture")
    m.add_argument("--settings", required=True)
    m.add_argument("--out-dir", required=True)
    m.set_defaults(func=cmd_models_demo_speech_encoder)
