"""`speechllm targets` subcommands: synthetic multi-instruction targets"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from speechllm.cliutils import parse_settings, pick_device, set_threads

log = logging.getLogger("speechllm")


def cmd_targets_generate(args: argparse.Namespace) -> None:
    from collections import Counter

    from speechllm.data.manifest import read_manifest
    from speechllm.models.export import load_llm
    from speechllm.targets.generate import generate_shard
    from speechllm.targets.templates import bank_hash, draw_items, load_templates

    s = parse_settings(args.settings)
    set_threads(args.threads)
    templates = load_templates(s["templates"])
    counts = Counter(r["raw_transcription"] for r in read_manifest(args.manifest))
    items = draw_items(counts, templates, s["templates_per_occurrence"], s["seed"])
    lm, tokenizer = load_llm(s["llm"], pick_device())
    lm.eval()
    settings = {"llm": s["llm"]["name_or_path"], "revision": s["llm"].get("revision"), "dtype": s["llm"]["dtype"],
                "bank": bank_hash(templates), "seed": s["seed"], "max_new_tokens": s["max_new_tokens"],
                "num_beams": s["num_beams"]}
    stats = generate_shard(items, args.shard, args.num_shards, lm, tokenizer, settings, s["batch_size"],
                           Path(args.out))
    log.info("shard %d/%d: %s", args.shard, args.num_shards, stats)


def cmd_targets_assemble(args: argparse.Namespace) -> None:
    from speechllm.data.manifest import read_manifest, write_manifest
    from speechllm.targets.assemble import assemble

    s = parse_settings(args.settings)
    train = read_manifest(args.manifest)
    generated = [json.loads(line) for path in args.shards for line in Path(path).read_text("utf-8").splitlines()]
    sets = assemble(train, generated, s["prompt"]["prefix"], s["prompt"]["postfix"], s["mi_reading"],
                    s["templates_per_occurrence"])
    out = Path(args.out_dir)
    for name, records in sets.items():
        write_manifest(out / f"train_{name}.jsonl", records)
    log.info("assembled %s", {k: len(v) for k, v in sets.items()})


def register(sub: argparse._SubParsersAction) -> None:
    targets = sub.add_parser("targets", help="synthetic multi-instruction targets")
    tsub = targets.add_subparsers(dest="action", required=True)
    t = tsub.add_parser("generate", help="generate one shard of targets with the frozen LLM")
    t.add_argument("--settings", required=True)
    t.add_argument("--manifest", required=True)
    t.add_argument("--shard", type=int, required=True)
    t.add_argument("--num-shards", type=int, required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--threads", type=int, default=1)
    t.set_defaults(func=cmd_targets_generate)
    t = tsub.add_parser("assemble", help="T / MI / TMI training manifests")
    t.add_argument("--settings", required=True)
    t.add_argument("--manifest", required=True)
    t.add_argument("--shards", nargs="+", required=True)
    t.add_argument("--out-dir", required=True)
    t.set_defaults(func=cmd_targets_assemble)
