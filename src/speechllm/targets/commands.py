"""`speechllm targets` subcommands: synthetic multi-instruction targets, released targets, chat responses"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from speechllm import stopping
from speechllm.cliutils import add_command, add_download_timeout, parse_settings, set_threads

log = logging.getLogger("speechllm")

EXAMPLES = {
    "generate": 'example:\n  speechllm targets generate --settings "$(cat settings.json)" '
    "--manifest results/data/train.jsonl --shard 0 --num-shards 2 "
    "--out results/targets/shard0.jsonl",
    "assemble": "example:\n  speechllm targets assemble --settings '{...}' "
    "--manifest results/data/train.jsonl --shards results/targets/shard*.jsonl "
    "--out-dir results/data",
    "fetch-templates": "example:\n  speechllm targets fetch-templates --url https://raw.githubusercontent.com/"
    "DigitalPhonetics/bloomzmms/<commit>/data/synthetic-targets/templates.json "
    "--sha256 3baa3c49... --out resources/bloomzmms/templates.json --timeout 60",
    "fetch-released": "example:\n  speechllm targets fetch-released --url 'https://zenodo.org/records/10900287/"
    "files/tmi_training_targets.tar.gz?download=1' --out resources/bloomzmms/tmi.tar.gz --timeout 60",
    "import-released": "example:\n  speechllm targets import-released --settings '{...}' "
    "--manifest results/data/train.jsonl --archive resources/bloomzmms/tmi.tar.gz "
    "--out-dir results/data",
    "responses": 'example:\n  speechllm targets responses --settings "$(cat settings.json)" '
    "--manifest librispeech_train.jsonl --shard 0 --num-shards 4 "
    "--out results/responses/x/shard0.jsonl",
    "gather": "example:\n  speechllm targets gather --shards results/responses/x/shard*.jsonl "
    "--out results/responses/x.jsonl",
}


def cmd_targets_generate(args: argparse.Namespace) -> None:
    from collections import Counter

    from speechllm.data.manifest import read_manifest
    from speechllm.models.prompt_format import frame_from_spec
    from speechllm.targets.backends import load_generator
    from speechllm.targets.generate import generate_shard, target_settings
    from speechllm.targets.settings import GenerateSettings
    from speechllm.targets.templates import bank_hash, draw_items, load_templates

    stopping.install()  # SIGTERM / SIGUSR1: finish the batch, keep it in the partial file, exit for a retry
    s = GenerateSettings.from_settings(parse_settings(args.settings))
    set_threads(args.threads)
    templates = load_templates(s.templates)
    train = read_manifest(args.manifest, required=("raw_transcription",))
    counts = Counter(r["raw_transcription"] for r in train)
    items = draw_items(counts, templates, s.templates_per_occurrence, s.seed)
    settings = target_settings(s, bank_hash(templates))
    generator = load_generator(
        s.llm, s.backend, s.batch_size, s.num_beams, s.seed, s.vllm, clean_up_spaces=s.clean_up_spaces
    )
    frame = frame_from_spec(generator.tokenizer, s.prompt)
    stats = generate_shard(
        items,
        args.shard,
        args.num_shards,
        generator,
        settings,
        Path(args.out),
        (frame.head_text, frame.tail_text),
    )
    log.info("shard %d/%d: %s", args.shard, args.num_shards, stats)


def cmd_targets_assemble(args: argparse.Namespace) -> None:
    from speechllm.data.manifest import read_manifest, write_manifest
    from speechllm.targets.assemble import assemble, check_drawn_for, read_generated
    from speechllm.targets.settings import AssembleSettings

    s = AssembleSettings.from_settings(parse_settings(args.settings))
    train = read_manifest(args.manifest, required=("raw_transcription", "transcription"))
    generated = read_generated([Path(p) for p in args.shards])
    check_drawn_for(train, generated, s.templates_per_occurrence)
    sets = assemble(
        train,
        generated,
        s.prompt.prefix,
        s.prompt.postfix,
        s.mi_reading,
        s.templates_per_occurrence,
        s.drop_blank_outputs,
    )
    out = Path(args.out_dir)
    for name, records in sets.items():
        write_manifest(out / f"train_{name}.jsonl", records)
    log.info("assembled %s", {k: len(v) for k, v in sets.items()})


def cmd_targets_fetch_templates(args: argparse.Namespace) -> None:
    from speechllm.targets.templates import fetch_templates

    count = fetch_templates(args.url, args.sha256, Path(args.out), args.timeout)
    log.info("template bank: %d (prefix, postfix) pairs", count)


def cmd_targets_fetch_released(args: argparse.Namespace) -> None:
    from speechllm.targets.download import fetch_verified

    fetch_verified(args.url, args.sha256 or None, Path(args.out), "targets.released", args.timeout)


def cmd_targets_import_released(args: argparse.Namespace) -> None:
    from speechllm.data.manifest import read_manifest, write_manifest
    from speechllm.targets.backends import load_tokenizer
    from speechllm.targets.released import import_released, log_report, read_released_archive
    from speechllm.targets.settings import ImportReleasedSettings

    s = ImportReleasedSettings.from_settings(parse_settings(args.settings))
    train = read_manifest(args.manifest, required=("id", "transcription"))
    fields = read_released_archive(Path(args.archive))
    sets, report = import_released(
        train,
        fields,
        load_tokenizer(s.llm),
        s.prompt.prefix,
        s.prompt.postfix,
        s.mi_reading,
        s.templates_per_occurrence,
        s.on_unmatched,
    )
    log_report(report, s.prompt.prefix)
    out = Path(args.out_dir)
    for name, records in sets.items():
        write_manifest(out / f"train_{name}.jsonl", records)


def cmd_targets_responses(args: argparse.Namespace) -> None:
    from speechllm.models.prompt_format import prompt_frame
    from speechllm.targets.backends import load_generator
    from speechllm.targets.responses import CHAT_TEMPLATE, generate_responses_shard, response_settings
    from speechllm.targets.settings import ResponsesSettings

    stopping.install()  # as `targets generate`
    s = ResponsesSettings.from_settings(parse_settings(args.settings))
    set_threads(args.threads)
    r = s.responses
    generator = load_generator(
        s.llm,
        s.backend,
        r.batch_size,
        r.num_beams,
        s.seed,
        s.vllm,
        add_special_tokens=r.add_special_tokens,
        clean_up_spaces=r.clean_up_spaces,
    )
    template = r.prompt_template
    if template == CHAT_TEMPLATE:  # the tokenizer's own chat turn around the text
        template = prompt_frame(generator.tokenizer, "chat").wrap_text("{text}")
    stats = generate_responses_shard(
        Path(args.manifest),
        args.shard,
        args.num_shards,
        generator,
        response_settings(s),
        r.text_field,
        template,
        r.lowercase,
        r.length_factor,
        Path(args.out),
    )
    log.info("responses shard %d/%d: %s", args.shard, args.num_shards, stats)


def cmd_targets_gather(args: argparse.Namespace) -> None:
    from speechllm.data.manifest import write_manifest
    from speechllm.targets.shards import gather_shards

    count = write_manifest(args.out, gather_shards([Path(p) for p in args.shards]))
    log.info("gathered %d records into %s", count, args.out)


def register(sub: argparse._SubParsersAction) -> None:
    targets = add_command(sub, "targets", "synthetic multi-instruction targets, released targets, responses")
    tsub = targets.add_subparsers(dest="action", required=True)
    t = add_command(
        tsub,
        "generate",
        "generate one shard of targets with the frozen LLM",
        cmd_targets_generate,
        epilog=EXAMPLES["generate"],
    )
    t.add_argument("--settings", required=True)
    t.add_argument("--manifest", required=True)
    t.add_argument("--shard", type=int, required=True)
    t.add_argument("--num-shards", type=int, required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--threads", type=int, default=1)
    t = add_command(
        tsub, "assemble", "T / MI / TMI training manifests", cmd_targets_assemble, epilog=EXAMPLES["assemble"]
    )
    t.add_argument("--settings", required=True)
    t.add_argument("--manifest", required=True)
    t.add_argument("--shards", nargs="+", required=True)
    t.add_argument("--out-dir", required=True)
    t = add_command(
        tsub,
        "fetch-templates",
        "download the reference's templates.json, verified by sha256",
        cmd_targets_fetch_templates,
        epilog=EXAMPLES["fetch-templates"],
    )
    t.add_argument("--url", required=True, help="http(s):// or file:// URL, or a local path")
    t.add_argument("--sha256", required=True)
    t.add_argument("--out", required=True)
    add_download_timeout(t)
    t = add_command(
        tsub,
        "fetch-released",
        "download the released targets archive (sha256-verified if given)",
        cmd_targets_fetch_released,
        epilog=EXAMPLES["fetch-released"],
    )
    t.add_argument("--url", required=True, help="http(s):// or file:// URL, or a local path")
    t.add_argument("--sha256", default="", help="expected sha256; empty: not verified, logged")
    t.add_argument("--out", required=True)
    add_download_timeout(t)
    t = add_command(
        tsub,
        "import-released",
        "T / MI / TMI manifests from the released token-id targets",
        cmd_targets_import_released,
        epilog=EXAMPLES["import-released"],
    )
    t.add_argument("--settings", required=True)
    t.add_argument("--manifest", required=True)
    t.add_argument("--archive", required=True)
    t.add_argument("--out-dir", required=True)
    t = add_command(
        tsub,
        "responses",
        "Kang & Roy targets: the LLM's greedy response to each transcript (one shard)",
        cmd_targets_responses,
        epilog=EXAMPLES["responses"],
    )
    t.add_argument("--settings", required=True)
    t.add_argument("--manifest", required=True)
    t.add_argument("--shard", type=int, default=0)
    t.add_argument("--num-shards", type=int, default=1)
    t.add_argument("--out", required=True)
    t.add_argument("--threads", type=int, default=1)
    t = add_command(
        tsub,
        "gather",
        "shards with `index` back into one manifest, in order",
        cmd_targets_gather,
        epilog=EXAMPLES["gather"],
    )
    t.add_argument("--shards", nargs="+", required=True)
    t.add_argument("--out", required=True)
