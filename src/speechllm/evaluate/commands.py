"""`speechllm evaluate` subcommands: decode and score benchmarks"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from speechllm.cliutils import parse_settings, pick_device, set_threads

log = logging.getLogger("speechllm")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from speechllm import __version__
    from speechllm.data.manifest import read_manifest
    from speechllm.evaluate import benchmarks
    from speechllm.io import atomic_path
    from speechllm.models.export import load_model_dir
    from speechllm.text.normalize import normalizer_version

    s = parse_settings(args.settings)
    set_threads(args.threads)
    device = pick_device()
    model, tokenizer, spec = load_model_dir(Path(args.model), with_ctc=args.decoder == "ctc",
                                            with_llm=args.decoder == "llm", device=device)
    model.eval()
    sr = s["sampling_rate"]
    ev = s["evaluate"]
    if args.benchmark == "fleurs_asr":
        records = read_manifest(args.manifests[0])
        df, metrics = benchmarks.run_asr(model, tokenizer, records, args.decoder, spec["prompt"]["prefix"],
                                         spec["prompt"]["postfix"], ev, sr, device)
    elif args.benchmark == "fleurs_st":
        records = read_manifest(args.manifests[0])
        df, metrics = benchmarks.run_st(model, tokenizer, records, ev["st_prompt"]["prefix"],
                                        ev["st_prompt"]["postfix"], "en_us", ev, sr, device)
    elif args.benchmark == "speechglue":
        tasks = {Path(m).stem: read_manifest(m) for m in args.manifests}
        df, metrics = benchmarks.run_speechglue(model, tokenizer, tasks, ev["option_prefix"], ev, sr, device)
    else:
        records = read_manifest(args.manifests[0])
        df, metrics = benchmarks.run_speechxnli(model, tokenizer, records, ev["option_prefix"], ev, sr, device)
    import sacrebleu

    scores = {"benchmark": args.benchmark, "model": args.name, "decoder": args.decoder,
              "checkpoint": str(args.model), "experiment": s["experiment"], "metrics": metrics,
              "versions": {"speechllm": __version__, "normalizer": normalizer_version(),
                           "sacrebleu": sacrebleu.__version__}}
    with atomic_path(args.hyps) as tmp:
        df.to_parquet(tmp, index=False)
    with atomic_path(args.scores) as tmp:
        tmp.write_text(json.dumps(scores, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log.info("%s %s (%s): %s", args.benchmark, args.name, args.decoder, json.dumps(metrics)[:400])


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("evaluate", help="decode a benchmark and score it")
    ev.add_argument("benchmark", choices=["fleurs_asr", "fleurs_st", "speechglue", "speechxnli"])
    ev.add_argument("--settings", required=True)
    ev.add_argument("--model", required=True)
    ev.add_argument("--name", required=True, help="system name used in tables")
    ev.add_argument("--decoder", choices=["ctc", "llm"], required=True)
    ev.add_argument("--manifests", nargs="+", required=True)
    ev.add_argument("--hyps", required=True)
    ev.add_argument("--scores", required=True)
    ev.add_argument("--threads", type=int, default=1)
    ev.set_defaults(func=cmd_evaluate)
