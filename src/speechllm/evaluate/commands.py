"""`speechllm evaluate` subcommands: decode and score a benchmark, rescore from Parquet, build CoVoST 2
manifests."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from speechllm.cliutils import RAW, example, parse_settings, pick_device, set_threads

log = logging.getLogger("speechllm")

DECODE_BENCHMARKS = (
    "fleurs_asr",
    "fleurs_st",
    "covost2_st",
    "speechglue",
    "speechxnli",
    "summarization",
    "response_ppl",
)
ST_TARGETS = {"fleurs_st": "en_us", "covost2_st": "en"}
EXAMPLE = """example:
  speechllm evaluate fleurs_asr --settings "$(cat settings.json)" --model results/models/t --name t \\
      --decoder llm --manifests results/data/test.jsonl --hyps t.parquet --scores t.scores.json
  speechllm evaluate rescore fleurs_asr --settings "$(cat settings.json)" --hyps t.parquet \\
      --scores t.scores.json"""


def cmd_evaluate(args: argparse.Namespace) -> None:
    from speechllm.data.manifest import read_manifest
    from speechllm.evaluate import benchmarks, summarization
    from speechllm.evaluate.rescore import score_document, write_outputs
    from speechllm.evaluate.system import build_system

    s = parse_settings(args.settings)
    set_threads(args.threads)
    device = pick_device()
    ev, sr = s["evaluate"], s["sampling_rate"]
    if args.decoder == "ctc" and args.benchmark != "fleurs_asr":
        raise ValueError(f"decoder 'ctc' only transcribes; {args.benchmark} needs an LLM decoder")
    system, spec = build_system(args.model, args.decoder, ev, sr, device)
    manifests = [Path(m) for m in args.manifests]
    if args.benchmark == "fleurs_asr":
        records = read_manifest(manifests[0], required=("audio", "language", "raw_transcription"))
        df, metrics = benchmarks.run_asr(system, records, spec["prompt"]["prefix"], spec["prompt"]["postfix"], ev)
    elif args.benchmark in ST_TARGETS:
        records = [r for m in manifests for r in read_manifest(m, required=("audio", "language"))]
        df, metrics = benchmarks.run_st(
            system,
            records,
            ev["st_prompt"]["prefix"],
            ev["st_prompt"]["postfix"],
            ST_TARGETS[args.benchmark],
            ev,
        )
    elif args.benchmark == "speechglue":
        tasks = {m.stem: read_manifest(m) for m in manifests}
        df, metrics = benchmarks.run_speechglue(system, tasks, ev["option_prefix"], ev)
    elif args.benchmark == "speechxnli":
        df, metrics = benchmarks.run_speechxnli(system, read_manifest(manifests[0]), ev["option_prefix"], ev)
    elif args.benchmark == "summarization":
        fields = ("audio", ev["summarization"]["text_field"], ev["summarization"]["reference_field"])
        records = [r for m in manifests for r in read_manifest(m, required=fields)]
        df, metrics = summarization.run_summarization(system, records, ev)
    else:
        fields = ("audio", ev["response_ppl"]["text_field"], ev["response_ppl"]["response_field"])
        records = [{"subset": m.stem, **r} for m in manifests for r in read_manifest(m, required=fields)]
        df, metrics = summarization.run_response_ppl(system, records, ev)
    document = score_document(
        args.benchmark, args.name, args.decoder, str(args.model), s, metrics, system.notes
    )
    write_outputs(df, document, Path(args.hyps), Path(args.scores))
    log.info("%s %s (%s): %s", args.benchmark, args.name, args.decoder, json.dumps(metrics)[:400])


def cmd_rescore(args: argparse.Namespace) -> None:
    from speechllm.evaluate.rescore import rescore

    document = rescore(
        args.benchmark,
        Path(args.hyps),
        Path(args.scores),
        parse_settings(args.settings),
        Path(args.out) if args.out else None,
    )
    log.info(
        "rescored %s %s: %s", args.benchmark, document.get("model"), json.dumps(document["metrics"])[:400]
    )


def cmd_covost2(args: argparse.Namespace) -> None:
    from speechllm.evaluate.covost2 import build_covost2_manifest

    cfg = parse_settings(args.settings)["evaluate"]["covost2"]
    if not cfg.get("release_dir"):
        raise ValueError("config key evaluate.covost2.release_dir is not set")
    tsv_dir = Path(cfg["tsv_dir"]) if cfg.get("tsv_dir") else None
    count = build_covost2_manifest(Path(cfg["release_dir"]), list(cfg["languages"]), Path(args.out), tsv_dir)
    log.info("CoVoST 2 test: %d utterances -> %s", count, args.out)


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "evaluate",
        help="decode a benchmark and score it; rescore from Parquet",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = ev.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK|rescore|covost2-manifest")
    for name in DECODE_BENCHMARKS:
        p = which.add_parser(
            name,
            help=f"decode and score {name}",
            epilog=EXAMPLE,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--settings", required=True, help="JSON: evaluate section, sampling_rate, experiment")
        p.add_argument("--model", required=True, help="an exported model directory")
        p.add_argument("--name", required=True, help="system name used in tables")
        p.add_argument(
            "--decoder",
            choices=["ctc", "llm", "cascade", "text"],
            required=True,
            help="ctc: CTC transcript; llm: speech into the LLM; cascade: CTC transcript into the LLM; "
            "text: gold text into the LLM",
        )
        p.add_argument("--manifests", nargs="+", required=True)
        p.add_argument("--hyps", required=True, help="per-utterance outputs (Parquet)")
        p.add_argument("--scores", required=True, help="score file (JSON)")
        p.add_argument("--threads", type=int, default=1)
        p.set_defaults(func=cmd_evaluate)
    rs = which.add_parser("rescore", help="recompute a score file from its Parquet outputs, without decoding",
                          formatter_class=RAW,
                          epilog=example('speechllm evaluate rescore fleurs_asr --settings "$(cat settings.json)" '
                                         "--hyps results/eval/fleurs_asr/t.parquet "
                                         "--scores results/eval/fleurs_asr/t.scores.json"))
    rs.add_argument("rescore_benchmark", choices=DECODE_BENCHMARKS, metavar="BENCHMARK")
    rs.add_argument("--settings", required=True)
    rs.add_argument("--hyps", required=True)
    rs.add_argument("--scores", required=True, help="the score file to recompute")
    rs.add_argument("--out", help="write here instead of replacing --scores")
    rs.set_defaults(
        func=lambda a: cmd_rescore(argparse.Namespace(**{**vars(a), "benchmark": a.rescore_benchmark}))
    )
    cv = which.add_parser("covost2-manifest", help="CoVoST 2 X->English test manifest from a local release",
                          formatter_class=RAW,
                          epilog=example('speechllm evaluate covost2-manifest --settings "$(cat settings.json)" '
                                         "--out resources/covost2/test.jsonl"))
    cv.add_argument("--settings", required=True, help="JSON with the evaluate section (evaluate.covost2.*)")
    cv.add_argument("--out", required=True)
    cv.set_defaults(func=cmd_covost2)
