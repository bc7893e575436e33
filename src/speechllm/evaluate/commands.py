"""`speechllm evaluate` subcommands: decode and score a benchmark (whole, or one shard of it, resumable, see
evaluate/shards.py), score a benchmark from its shards (`gather`), rescore from Parquet, build CoVoST 2
manifests."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from speechllm import stopping
from speechllm.cliutils import add_command, example, parse_settings, pick_device, set_threads

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


def read_inputs(benchmark: str, manifests: list[Path], ev: Any) -> Any:
    """A benchmark's records from its manifests (SpeechGLUE: task name -> records)."""
    from speechllm.data.manifest import read_manifest

    if benchmark == "fleurs_asr":
        return read_manifest(manifests[0], required=("audio", "language", "raw_transcription"))
    if benchmark in ST_TARGETS:
        return [r for m in manifests for r in read_manifest(m, required=("audio", "language"))]
    if benchmark == "speechglue":
        return {m.stem: read_manifest(m) for m in manifests}
    if benchmark == "speechxnli":
        return read_manifest(manifests[0])
    if benchmark == "summarization":
        fields = ("audio", ev.summarization.text_field, ev.summarization.reference_field)
        return [r for m in manifests for r in read_manifest(m, required=fields)]
    fields = ("audio", ev.response_ppl.text_field, ev.response_ppl.response_field)
    return [{"subset": m.stem, **r} for m in manifests for r in read_manifest(m, required=fields)]


def decode_inputs(
    benchmark: str, system: Any, spec: dict[str, Any], inputs: Any, ev: Any, runner: Any
) -> None:
    """Decode (the runner's shard of) a benchmark's inputs; rows land in `runner.rows`."""
    from speechllm.evaluate import benchmarks, summarization

    if benchmark == "fleurs_asr":
        benchmarks.decode_asr(system, inputs, spec["prompt"]["prefix"], spec["prompt"]["postfix"], ev, runner)
    elif benchmark in ST_TARGETS:
        prompt = ev.st_prompt
        benchmarks.decode_st(system, inputs, prompt.prefix, prompt.postfix, ST_TARGETS[benchmark], ev, runner)
    elif benchmark == "speechglue":
        benchmarks.decode_speechglue(system, inputs, ev.option_prefix, ev, runner)
    elif benchmark == "speechxnli":
        benchmarks.decode_task(system, inputs, "xnli", ev.option_prefix, ev, runner)
    elif benchmark == "summarization":
        summarization.decode_summarization(system, inputs, ev, runner)
    else:
        summarization.decode_response_ppl(system, inputs, ev, runner)


def frame_inputs(benchmark: str, inputs: Any, rows: dict[str, Any], ev: Any) -> Any:
    """The per-utterance frame of a benchmark from its inputs and every record's decoded row."""
    from speechllm.evaluate import benchmarks, summarization

    if benchmark == "fleurs_asr":
        return benchmarks.asr_frame(inputs, rows)
    if benchmark in ST_TARGETS:
        return benchmarks.st_frame(inputs, ST_TARGETS[benchmark], rows, ev.st_recordings)
    if benchmark == "speechglue":
        return benchmarks.speechglue_frame(inputs, rows)
    if benchmark == "speechxnli":
        return benchmarks.task_frame(inputs, "xnli", rows)
    if benchmark == "summarization":
        return summarization.summarization_frame(inputs, rows, ev.summarization.reference_field)
    return summarization.response_ppl_frame(inputs, rows)


def write_scored(
    args: argparse.Namespace, s: dict[str, Any], ev: Any, df: Any, notes: dict[str, Any]
) -> None:
    """Score the frame (`ev`: the benchmark's typed settings) and write the Parquet and the score file, which
    records the settings `s` as given."""
    from speechllm.evaluate.rescore import score_document, score_frame, write_outputs

    metrics = score_frame(args.benchmark, df, ev)
    document = score_document(args.benchmark, args.name, args.decoder, str(args.model), s, metrics, notes)
    write_outputs(df, document, Path(args.hyps), Path(args.scores))
    log.info("%s %s (%s): %s", args.benchmark, args.name, args.decoder, json.dumps(metrics)[:400])


def shard_header(args: argparse.Namespace, inputs: Any) -> dict[str, Any]:
    """What a shard file records of its job, for the gather step to check (`inputs`: the records read from
    the manifests, whose rows the gather pairs by index)."""
    from speechllm.evaluate.shards import inputs_digest

    return {
        "benchmark": args.benchmark,
        "decoder": args.decoder,
        "model": str(args.model),
        "inputs": inputs_digest(inputs),
    }


def cmd_evaluate(args: argparse.Namespace) -> None:
    from speechllm.evaluate.settings import DecodeSettings, benchmark_settings
    from speechllm.evaluate.shards import BatchRunner, partial_path, run_fingerprint, write_shard
    from speechllm.evaluate.system import build_system

    stopping.install()  # SIGTERM / SIGUSR1: finish the batch, keep it in the partial file, exit for a retry
    s = parse_settings(args.settings)
    set_threads(args.threads)
    if args.decoder == "ctc" and args.benchmark != "fleurs_asr":
        raise ValueError(f"decoder 'ctc' only transcribes; {args.benchmark} needs an LLM decoder")
    if not (args.rows or (args.hyps and args.scores)):
        raise ValueError("give --rows (one shard's outputs) or --hyps and --scores (the whole benchmark)")
    if not args.rows and args.num_shards != 1:
        raise ValueError("--num-shards > 1 writes one shard's --rows; `evaluate gather` scores the shards")
    ev = benchmark_settings(args.benchmark, s)
    sampling_rate = DecodeSettings.from_settings(s).sampling_rate
    inputs = read_inputs(args.benchmark, [Path(m) for m in args.manifests], ev)
    system, spec = build_system(args.model, args.decoder, ev, sampling_rate, pick_device())
    fingerprint = run_fingerprint(args.benchmark, args.decoder, Path(args.model), spec, s)
    out = Path(args.rows or args.hyps)
    runner = BatchRunner(fingerprint, partial_path(out), args.shard, args.num_shards)
    decode_inputs(args.benchmark, system, spec, inputs, ev, runner)
    if args.rows:
        write_shard(out, runner, {**shard_header(args, inputs), "notes": system.notes})
    else:
        write_scored(args, s, ev, frame_inputs(args.benchmark, inputs, runner.rows, ev), system.notes)
    runner.finish()
    log.info(
        "%s shard %d/%d: %d batches decoded, %d reused from %s",
        args.benchmark,
        args.shard,
        args.num_shards,
        runner.decoded,
        runner.reused,
        partial_path(out),
    )


def cmd_gather(args: argparse.Namespace) -> None:
    from speechllm.evaluate.settings import benchmark_settings
    from speechllm.evaluate.shards import read_shards

    s = parse_settings(args.settings)
    ev = benchmark_settings(args.benchmark, s)
    inputs = read_inputs(args.benchmark, [Path(m) for m in args.manifests], ev)
    rows, first = read_shards([Path(r) for r in args.rows], shard_header(args, inputs))
    write_scored(args, s, ev, frame_inputs(args.benchmark, inputs, rows, ev), first["notes"])


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
    from speechllm.evaluate.settings import Covost2Settings

    cfg = Covost2Settings.from_section(parse_settings(args.settings)).covost2
    if not cfg.release_dir:
        raise ValueError("config key evaluate.covost2.release_dir is not set")
    tsv_dir = Path(cfg.tsv_dir) if cfg.tsv_dir else None
    count = build_covost2_manifest(Path(cfg.release_dir), list(cfg.languages), Path(args.out), tsv_dir)
    log.info("CoVoST 2 test: %d utterances -> %s", count, args.out)


def _on_benchmark(
    func: Callable[[argparse.Namespace], None], dest: str
) -> Callable[[argparse.Namespace], None]:
    """`func` run with `benchmark` set from the positional `dest` (`evaluate` already uses `benchmark` for the
    subcommand's name)."""
    return lambda args: func(argparse.Namespace(**{**vars(args), "benchmark": getattr(args, dest)}))


def register(sub: argparse._SubParsersAction) -> None:
    ev = add_command(sub, "evaluate", "decode a benchmark and score it; rescore from Parquet", epilog=EXAMPLE)
    which = ev.add_subparsers(
        dest="benchmark", required=True, metavar="BENCHMARK|gather|rescore|covost2-manifest"
    )
    for name in DECODE_BENCHMARKS:
        p = add_command(which, name, f"decode and score {name}", cmd_evaluate, epilog=EXAMPLE)
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
        p.add_argument("--hyps", help="per-utterance outputs (Parquet) of the whole benchmark")
        p.add_argument("--scores", help="score file (JSON) of the whole benchmark")
        p.add_argument("--shard", type=int, default=0, help="decode this shard's batches (with --rows)")
        p.add_argument("--num-shards", type=int, default=1)
        p.add_argument(
            "--rows", help="write this shard's outputs here instead (JSON; `evaluate gather` scores)"
        )
        p.add_argument("--threads", type=int, default=1)
    ga = add_command(
        which,
        "gather",
        "score a benchmark from its shards' outputs, without decoding",
        _on_benchmark(cmd_gather, "gather_benchmark"),
        epilog=example(
            'speechllm evaluate gather fleurs_asr --settings "$(cat settings.json)" '
            "--model results/models/t --name t --decoder llm --manifests "
            "results/data/test.jsonl --rows shard0.json shard1.json "
            "--hyps t.parquet --scores t.scores.json"
        ),
    )
    ga.add_argument("gather_benchmark", choices=DECODE_BENCHMARKS, metavar="BENCHMARK")
    ga.add_argument("--settings", required=True)
    ga.add_argument("--model", required=True, help="the model directory the shards decoded with (not loaded)")
    ga.add_argument("--name", required=True)
    ga.add_argument("--decoder", choices=["ctc", "llm", "cascade", "text"], required=True)
    ga.add_argument("--manifests", nargs="+", required=True)
    ga.add_argument("--rows", nargs="+", required=True, help="every shard's outputs (`evaluate ... --rows`)")
    ga.add_argument("--hyps", required=True)
    ga.add_argument("--scores", required=True)
    rs = add_command(
        which,
        "rescore",
        "recompute a score file from its Parquet outputs, without decoding",
        _on_benchmark(cmd_rescore, "rescore_benchmark"),
        epilog=example(
            'speechllm evaluate rescore fleurs_asr --settings "$(cat settings.json)" '
            "--hyps results/eval/fleurs_asr/t.parquet "
            "--scores results/eval/fleurs_asr/t.scores.json"
        ),
    )
    rs.add_argument("rescore_benchmark", choices=DECODE_BENCHMARKS, metavar="BENCHMARK")
    rs.add_argument("--settings", required=True)
    rs.add_argument("--hyps", required=True)
    rs.add_argument("--scores", required=True, help="the score file to recompute")
    rs.add_argument("--out", help="write here instead of replacing --scores")
    cv = add_command(
        which,
        "covost2-manifest",
        "CoVoST 2 X->English test manifest from a local release",
        cmd_covost2,
        epilog=example(
            'speechllm evaluate covost2-manifest --settings "$(cat settings.json)" '
            "--out resources/covost2/test.jsonl"
        ),
    )
    cv.add_argument("--settings", required=True, help="JSON with the evaluate section (evaluate.covost2.*)")
    cv.add_argument("--out", required=True)
