"""`speechllm models` subcommands (build local demo models, fetch hub models) and `speechllm plan`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from speechllm.cliutils import RAW, example, parse_settings, set_threads

log = logging.getLogger("speechllm")


def cmd_models_demo_llm(args: argparse.Namespace) -> None:
    from speechllm.io import atomic_dir
    from speechllm.models.demo_build import build_llm

    s = parse_settings(args.settings)
    set_threads(args.threads)
    with atomic_dir(args.out_dir) as tmp:
        stats = build_llm(tmp, s["demo_build"], s["prompt"], s["st_prompt"], s["llm_fraction"],
                          s["option_prefix"], s["seed"], s.get("composed"), s.get("composed_glue"))
    log.info("demo LLM: %s", stats)


def cmd_models_fetch(args: argparse.Namespace) -> None:
    from huggingface_hub import snapshot_download

    path = snapshot_download(args.name, revision=args.revision)
    log.info("fetched %s@%s into %s", args.name, args.revision, path)


def cmd_models_demo_speech_encoder(args: argparse.Namespace) -> None:
    from speechllm.io import atomic_dir
    from speechllm.models.demo_build import build_speech_encoder
    from speechllm.models.encoder_ctc import CtcFinetuneConfig, finetune_encoder

    s = parse_settings(args.settings)
    set_threads(args.threads)
    finetune = CtcFinetuneConfig(**s["demo_build"]["speech_encoder"]["ctc_finetune"])
    if finetune.updates > 0 and not (args.train_manifest and args.dev_manifest):
        sys.exit("speechllm models demo-speech-encoder: ctc_finetune.updates > 0 needs --train-manifest "
                 "and --dev-manifest")
    with atomic_dir(args.out_dir) as tmp:
        n = build_speech_encoder(tmp, s["demo_build"], s["sampling_rate"], s["seed"])
        log.info("demo speech encoder: %d parameters", n)
        if finetune.updates > 0:
            report = finetune_encoder(tmp, Path(args.train_manifest), Path(args.dev_manifest), finetune,
                                      s["sampling_rate"], s["seed"])
            log.info("character-CTC fine-tuning: %s", report)


def cmd_plan(args: argparse.Namespace) -> None:
    from speechllm.models.plan import PlanError, config_root, format_plan, load_experiment, plan_experiment

    try:
        cfg = load_experiment([Path(c) for c in args.config], Path(args.base) if args.base else None)
        models_dir = Path(args.models_dir) if args.models_dir else config_root(Path(args.config[0])) / "models"
        plans = plan_experiment(cfg, models_dir)
    except (PlanError, KeyError) as error:
        sys.exit(f"speechllm plan: {' '.join(args.config)}: {error}")
    if args.json:
        print(json.dumps([p.to_dict() for p in plans], indent=2))
    else:
        print(format_plan(plans))


PLAN_EPILOG = """example:
  speechllm plan --config config/experiments/bloomzmms.yaml
  speechllm plan --config config/experiments/speech_summarization.yaml --json
  speechllm plan --config config/experiments/bloomzmms.yaml config/experiments/bloomzmms_exact.yaml

Models are built on the meta device from config/models/<hub name>.json (no download). The formulas are in the
docstring of speechllm.models.plan."""


def register(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("plan", help="parameters, memory per GPU and FLOPs per step of an experiment's models",
                       epilog=PLAN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    m.add_argument("--config", required=True, nargs="+",
                   help="experiment config file(s), merged in order over config/config.yaml (as --configfile)")
    m.add_argument("--base", help="base config to merge under it (default: config.yaml beside experiments/)")
    m.add_argument("--models-dir", help="architecture configs (default: config/models beside the config)")
    m.add_argument("--json", action="store_true", help="print JSON instead of Markdown tables")
    m.set_defaults(func=cmd_plan)
    models = sub.add_parser("models", help="build the local demo models")
    msub = models.add_subparsers(dest="action", required=True)
    m = msub.add_parser("demo-llm", help="tokenizer + tiny BLOOM pretrained on the demo text", formatter_class=RAW,
                        epilog=example('speechllm models demo-llm --settings "$(cat settings.json)" '
                                       "--out-dir resources/models/demo-llm --threads 2"))
    m.add_argument("--settings", required=True)
    m.add_argument("--out-dir", required=True)
    m.add_argument("--threads", type=int, default=1)
    m.set_defaults(func=cmd_models_demo_llm)
    m = msub.add_parser("fetch", help="download a hub model into the Hugging Face cache", formatter_class=RAW,
                        epilog=example("speechllm models fetch --name bigscience/bloomz-7b1 --revision main"))
    m.add_argument("--name", required=True)
    m.add_argument("--revision", default="main")
    m.set_defaults(func=cmd_models_fetch)
    m = msub.add_parser("demo-speech-encoder",
                        help="tiny Wav2Vec2 in the MMS architecture, fine-tuned with character CTC as MMS-1B-all",
                        formatter_class=RAW,
                        epilog=example('speechllm models demo-speech-encoder --settings "$(cat settings.json)" '
                                       "--out-dir resources/models/demo-mms --train-manifest results/data/train.jsonl "
                                       "--dev-manifest results/data/dev.jsonl --threads 2"))
    m.add_argument("--settings", required=True)
    m.add_argument("--out-dir", required=True)
    m.add_argument("--train-manifest", help="speech + transcripts for the character-CTC fine-tuning")
    m.add_argument("--dev-manifest", help="held-out speech for the CER before / after (ctc_finetune.json)")
    m.add_argument("--threads", type=int, default=1)
    m.set_defaults(func=cmd_models_demo_speech_encoder)
