"""`speechllm models` subcommands (build local demo models, fetch hub models) and `speechllm plan`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from speechllm.cliutils import add_command, example, parse_settings, set_threads

log = logging.getLogger("speechllm")


def cmd_models_demo_llm(args: argparse.Namespace) -> None:
    from speechllm.demo.build import build_llm
    from speechllm.demo.settings import DemoLlmSettings
    from speechllm.io import atomic_dir

    s = DemoLlmSettings.from_settings(parse_settings(args.settings))
    set_threads(args.threads)
    with atomic_dir(args.out_dir) as tmp:
        stats = build_llm(
            tmp,
            dataclasses.asdict(s.demo_build),
            dataclasses.asdict(s.prompt),
            dataclasses.asdict(s.st_prompt),
            s.llm_fraction,
            s.option_prefix,
            s.seed,
            s.composed,
            s.composed_glue,
        )
    log.info("demo LLM: %s", stats)


def cmd_models_fetch(args: argparse.Namespace) -> None:
    from huggingface_hub import snapshot_download

    path = snapshot_download(args.name, revision=args.revision)
    log.info("fetched %s@%s into %s", args.name, args.revision, path)


def cmd_models_demo_speech_encoder(args: argparse.Namespace) -> None:
    from speechllm.demo.build import build_speech_encoder
    from speechllm.demo.encoder_ctc import finetune_encoder
    from speechllm.demo.settings import DemoSpeechEncoderSettings
    from speechllm.io import atomic_dir

    s = DemoSpeechEncoderSettings.from_settings(parse_settings(args.settings))
    set_threads(args.threads)
    finetune = s.demo_build.speech_encoder.ctc_finetune
    if finetune.updates > 0 and not (args.train_manifest and args.dev_manifest):
        sys.exit(
            "speechllm models demo-speech-encoder: ctc_finetune.updates > 0 needs --train-manifest "
            "and --dev-manifest"
        )
    with atomic_dir(args.out_dir) as tmp:
        n = build_speech_encoder(tmp, dataclasses.asdict(s.demo_build), s.sampling_rate, s.seed)
        log.info("demo speech encoder: %d parameters", n)
        if finetune.updates > 0:
            report = finetune_encoder(
                tmp,
                Path(args.train_manifest),
                Path(args.dev_manifest),
                finetune,
                s.sampling_rate,
                s.seed,
            )
            log.info("character-CTC fine-tuning: %s", report)


def repo_directory(repo: str, revision: str) -> tuple[Path, str]:
    """A model-zoo repository as a local directory: itself when it is one, else its hub snapshot (downloaded
    into the Hugging Face cache, resumable; offline runs use the cache). Returns (directory, source
    description)."""
    if Path(repo).is_dir():
        return Path(repo), str(repo)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo, revision=revision)), f"{repo}@{revision}"


def cmd_import_espnet(args: argparse.Namespace) -> None:
    from speechllm.models.espnet_import import ImportOptions, import_espnet

    set_threads(args.threads)
    repo_dir, source = repo_directory(args.repo, args.revision)
    options = ImportOptions(
        speech_encoder=args.speech_encoder,
        speech_encoder_revision=args.speech_encoder_revision,
        llm=args.llm,
        llm_revision=args.llm_revision,
        llm_dtype=args.llm_dtype,
        load_in_8bit=args.load_in_8bit,
        normalize_waveform=not args.no_waveform_normalization,
        compare_with_sources=args.compare_with_sources,
    )
    spec = import_espnet(repo_dir, Path(args.out_dir), options, source)
    log.info(
        "wrote %s: %s stage, LLM %s, prompt %r ... %r",
        args.out_dir,
        spec["stage"],
        spec["llm"]["name_or_path"],
        spec["prompt"]["prefix"],
        spec["prompt"]["postfix"],
    )


def cmd_import_kang_roy(args: argparse.Namespace) -> None:
    from speechllm.models.espnet_import import import_kang_roy
    from speechllm.plan.planner import load_experiment
    from speechllm.plan.settings import ImportKangRoySettings

    set_threads(args.threads)
    if args.settings:
        s = ImportKangRoySettings.from_settings(parse_settings(args.settings))
    else:
        config = load_experiment(Path(args.config), Path(args.base) if args.base else None)
        s = ImportKangRoySettings.from_settings(config, where=args.config)
    import_kang_roy(Path(args.checkpoint), Path(args.out_dir), dataclasses.asdict(s.models))


def cmd_plan(args: argparse.Namespace) -> None:
    from speechllm.plan.planner import (
        PlanError,
        check_config,
        config_root,
        format_plan,
        load_experiment,
        plan_experiment,
        workflow_schema,
    )

    try:
        cfg = load_experiment([Path(c) for c in args.config], Path(args.base) if args.base else None)
        schema = workflow_schema(Path(args.config[0]))
        if schema is not None:
            check_config(cfg, schema)
        models_dir = (
            Path(args.models_dir) if args.models_dir else config_root(Path(args.config[0])) / "models"
        )
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

Models are built on the meta device from config/models/<hub name>.json (no download). The merged config is
checked against workflow/schemas/config.schema.yaml first, as snakemake checks it. The formulas are in the
docstring of speechllm.plan.planner."""


IMPORT_EPILOG = """examples:
  speechllm import espnet --repo akreal/bloomzmms-ce-t --out-dir results/models/released_t
  speechllm import espnet --repo ./bloomzmms-ctc --out-dir results/models/released_ctc --llm-dtype float32
  speechllm import kang-roy --checkpoint speech_llm_audio_encoder.pt \\
      --out-dir results/models/released_kang_roy --config config/experiments/speech_summarization.yaml

The result is a model directory as `speechllm export` writes it: transcribe, ask, evaluate and push use it."""


def register_import(sub: argparse._SubParsersAction) -> None:
    imp = add_command(
        sub,
        "import",
        "the published BLOOMZMMS / Kang & Roy checkpoints as model directories",
        epilog=IMPORT_EPILOG,
    )
    isub = imp.add_subparsers(dest="action", required=True)
    m = add_command(
        isub,
        "espnet",
        "an ESPnet model-zoo repository of BLOOMZMMS (meta.yaml, exp/*/config.yaml)",
        cmd_import_espnet,
        epilog=IMPORT_EPILOG,
    )
    m.add_argument(
        "--repo", required=True, help="hub id (downloaded into the Hugging Face cache) or local directory"
    )
    m.add_argument("--revision", default="main", help="hub revision of --repo")
    m.add_argument("--out-dir", required=True)
    m.add_argument(
        "--speech-encoder",
        default="facebook/mms-1b-all",
        help="HF architecture (config) of the s3prl upstream; its weights come from the checkpoint",
    )
    m.add_argument("--speech-encoder-revision", default="main")
    m.add_argument("--llm", help="LLM to load at run time (default: the config's decoder / bpemodel)")
    m.add_argument("--llm-revision", default="main")
    m.add_argument("--llm-dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    m.add_argument("--load-in-8bit", action="store_true", help="LLM.int8() as the reference (needs a GPU)")
    m.add_argument(
        "--no-waveform-normalization",
        action="store_true",
        help="skip the per-utterance waveform normalisation (s3prl task_cfg.normalize: true for MMS)",
    )
    m.add_argument(
        "--compare-with-sources",
        action="store_true",
        help="also load --speech-encoder's weights and the LLM and record (speechllm.json "
        "imported_from.equal_to_sources) whether the file's upstream and CTC head equal them",
    )
    m.add_argument("--threads", type=int, default=1)
    m = add_command(
        isub,
        "kang-roy",
        "Kang & Roy's audio-encoder state dict (flat or {'audio_encoder': ...})",
        cmd_import_kang_roy,
        epilog=IMPORT_EPILOG,
    )
    m.add_argument("--checkpoint", required=True)
    m.add_argument("--out-dir", required=True)
    source = m.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--config",
        help="experiment config whose `models` section (HuBERT, LLM, pooling, chat) "
        "the checkpoint belongs to",
    )
    source.add_argument("--settings", help='JSON {"models": ...} (what the workflow passes)')
    m.add_argument("--base", help="base config under --config (default: config.yaml beside experiments/)")
    m.add_argument("--threads", type=int, default=1)


def register(sub: argparse._SubParsersAction) -> None:
    register_import(sub)
    m = add_command(
        sub,
        "plan",
        "parameters, memory per GPU and FLOPs per step of an experiment's models",
        cmd_plan,
        epilog=PLAN_EPILOG,
    )
    m.add_argument(
        "--config",
        required=True,
        nargs="+",
        help="experiment config file(s), merged in order over config/config.yaml (as --configfile)",
    )
    m.add_argument("--base", help="base config to merge under it (default: config.yaml beside experiments/)")
    m.add_argument("--models-dir", help="architecture configs (default: config/models beside the config)")
    m.add_argument("--json", action="store_true", help="print JSON instead of Markdown tables")
    models = add_command(sub, "models", "build the local demo models")
    msub = models.add_subparsers(dest="action", required=True)
    m = add_command(
        msub,
        "demo-llm",
        "tokenizer + tiny BLOOM pretrained on the demo text",
        cmd_models_demo_llm,
        epilog=example(
            'speechllm models demo-llm --settings "$(cat settings.json)" '
            "--out-dir resources/models/demo-llm --threads 2"
        ),
    )
    m.add_argument("--settings", required=True)
    m.add_argument("--out-dir", required=True)
    m.add_argument("--threads", type=int, default=1)
    m = add_command(
        msub,
        "fetch",
        "download a hub model into the Hugging Face cache",
        cmd_models_fetch,
        epilog=example("speechllm models fetch --name bigscience/bloomz-7b1 --revision main"),
    )
    m.add_argument("--name", required=True)
    m.add_argument("--revision", default="main")
    m = add_command(
        msub,
        "demo-speech-encoder",
        "tiny Wav2Vec2 in the MMS architecture, fine-tuned with character CTC as MMS-1B-all",
        cmd_models_demo_speech_encoder,
        epilog=example(
            'speechllm models demo-speech-encoder --settings "$(cat settings.json)" '
            "--out-dir resources/models/demo-mms "
            "--train-manifest results/data/train.jsonl --dev-manifest results/data/dev.jsonl --threads 2"
        ),
    )
    m.add_argument("--settings", required=True)
    m.add_argument("--out-dir", required=True)
    m.add_argument("--train-manifest", help="speech + transcripts for the character-CTC fine-tuning")
    m.add_argument("--dev-manifest", help="held-out speech for the CER before / after (ctc_finetune.json)")
    m.add_argument("--threads", type=int, default=1)
