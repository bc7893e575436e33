"""The `speechllm` command: every Snakemake rule calls one of its subcommands.

Settings come as JSON (`--settings`), the part of the validated config a step needs, so a rule's
`params` hold every knob and a changed knob reruns exactly the steps it affects.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

EXAMPLES = {
    "transcribe": "example:\n  speechllm transcribe --model results/models/ctc clip1.wav clip2.flac > hyps.tsv",
    "data": "example:\n  speechllm data prepare --manifest raw.jsonl --out train.jsonl --report report.json "
            "--settings '{\"sampling_rate\": 16000, ...}'",
    "train": "example:\n  speechllm train ctc --settings \"$(cat settings.json)\" --train train.jsonl "
             "--dev dev.jsonl --language-ids lid.json --out-dir results/models/ctc",
}

log = logging.getLogger("speechllm")


def _settings(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise SystemExit(f"--settings is not valid JSON: {err.msg}") from err
    if not isinstance(value, dict):
        raise SystemExit("--settings must be a JSON object")
    return value


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


# ----------------------------------------------------------------------------------------------- data
def cmd_data_demo(args: argparse.Namespace) -> None:
    from speechllm.data import demo
    from speechllm.data.tts import make_tts

    s = _settings(args.settings)
    tts = make_tts(s["tts"]["backend"], s["sampling_rate"], s["tts"]["words_per_minute"])
    out = Path(args.out_dir)
    counts = demo.build_corpus(out, s["languages"], s["tts"]["voices"], tts, s["sampling_rate"], args.threads)
    glue = demo.build_speechglue(out, s["speechglue"]["tasks"], s["tts"]["voices"]["en_us"], tts,
                                 s["sampling_rate"], s["demo"]["llm_train_fraction"], args.threads)
    xnli = demo.build_speechxnli(out, s["speechxnli"]["languages"], s["tts"]["voices"], tts, s["sampling_rate"],
                                 s["demo"]["llm_train_fraction"], args.threads)
    log.info("demo corpus %s; speechglue %s; speechxnli %d examples", counts, glue, xnli)


def cmd_data_fleurs(args: argparse.Namespace) -> None:
    from speechllm.data.hub import build_fleurs

    s = _settings(args.settings)
    counts = build_fleurs(Path(args.out_dir), s["languages"], s["fleurs"]["dataset"], s["fleurs"]["revision"],
                          s["sampling_rate"])
    log.info("FLEURS: %s", counts)


def cmd_data_speechglue(args: argparse.Namespace) -> None:
    from speechllm.data.hub import build_speechglue_tts
    from speechllm.data.tts import make_tts

    s = _settings(args.settings)
    tts = make_tts(s["tts"]["backend"], s["sampling_rate"], s["tts"]["words_per_minute"])
    counts = build_speechglue_tts(Path(args.out_dir), s["speechglue"]["tasks"], tts, s["tts"]["voices"]["en_us"],
                                  s["sampling_rate"], s["speechglue"]["dataset"], args.threads)
    log.info("SpeechGLUE (TTS): %s", counts)


def cmd_data_speechxnli(args: argparse.Namespace) -> None:
    from speechllm.data.hub import build_speechxnli_tts
    from speechllm.data.tts import make_tts

    s = _settings(args.settings)
    tts = make_tts(s["tts"]["backend"], s["sampling_rate"], s["tts"]["words_per_minute"])
    n = build_speechxnli_tts(Path(args.out_dir), s["speechxnli"]["languages"], tts, s["tts"]["voices"],
                             s["sampling_rate"], s["speechxnli"]["dataset"], args.threads)
    log.info("SpeechXNLI (TTS): %d examples", n)


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from speechllm.data.prepare import prepare_split

    s = _settings(args.settings)
    report = prepare_split(Path(args.manifest), Path(args.out), Path(args.report), s["sampling_rate"],
                           s["min_duration"], s["max_duration"], s["speed_perturb"], s["on_bad_audio"])
    log.info("%s: %s", args.out, report["counts"])


def cmd_data_language_ids(args: argparse.Namespace) -> None:
    from speechllm.data.prepare import language_ids

    log.info("language ids: %s", language_ids(Path(args.manifest), Path(args.out)))


# --------------------------------------------------------------------------------------------- models
def cmd_models_demo_llm(args: argparse.Namespace) -> None:
    from speechllm.models.demo_build import build_llm

    s = _settings(args.settings)
    _threads(args.threads)
    stats = build_llm(Path(args.out_dir), s["demo_build"], s["prompt"], s["st_prompt"], s["llm_fraction"],
                      s["option_prefix"], s["seed"])
    log.info("demo LLM: %s", stats)


def cmd_models_fetch(args: argparse.Namespace) -> None:
    from huggingface_hub import snapshot_download

    path = snapshot_download(args.name, revision=args.revision)
    log.info("fetched %s@%s into %s", args.name, args.revision, path)


def cmd_models_demo_speech_encoder(args: argparse.Namespace) -> None:
    from speechllm.models.demo_build import build_speech_encoder

    s = _settings(args.settings)
    n = build_speech_encoder(Path(args.out_dir), s["demo_build"], s["sampling_rate"], s["seed"])
    log.info("demo speech encoder: %d parameters", n)


# -------------------------------------------------------------------------------------------- targets
def cmd_targets_generate(args: argparse.Namespace) -> None:
    from collections import Counter

    from speechllm.data.manifest import read_manifest
    from speechllm.models.export import load_llm
    from speechllm.targets.generate import generate_shard
    from speechllm.targets.templates import bank_hash, draw_items, load_templates

    s = _settings(args.settings)
    _threads(args.threads)
    templates = load_templates(s["templates"])
    counts = Counter(r["raw_transcription"] for r in read_manifest(args.manifest))
    items = draw_items(counts, templates, s["templates_per_occurrence"], s["seed"])
    lm, tokenizer = load_llm(s["llm"], _device())
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

    s = _settings(args.settings)
    train = read_manifest(args.manifest)
    generated = [json.loads(line) for path in args.shards for line in Path(path).read_text("utf-8").splitlines()]
    sets = assemble(train, generated, s["prompt"]["prefix"], s["prompt"]["postfix"], s["mi_reading"],
                    s["templates_per_occurrence"])
    out = Path(args.out_dir)
    for name, records in sets.items():
        write_manifest(out / f"train_{name}.jsonl", records)
    log.info("assembled %s", {k: len(v) for k, v in sets.items()})


# ---------------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> None:
    from speechllm.data.batches import Collator, SpeechDataset
    from speechllm.data.manifest import read_manifest
    from speechllm.models.export import build_model, load_trained_weights, model_spec, save_model_dir
    from speechllm.train.loop import StageConfig, train, write_json
    from speechllm.train.tracking import Tracker

    s = _settings(args.settings)
    _threads(args.threads)
    lid = json.loads(Path(args.language_ids).read_text("utf-8"))
    adaptor = dict(s["adaptor"], num_lid_classes=len(lid) + 1)
    from transformers import AutoConfig

    llm_cfg = AutoConfig.from_pretrained(s["models"]["llm"]["name_or_path"])
    adaptor["llm_hidden_size"] = llm_cfg.hidden_size
    from speechllm.models.adaptor import AdaptorConfig

    objective = args.stage if args.stage != "init" else "ctc"
    spec = model_spec(s["models"], AdaptorConfig(**adaptor), lid, stage=objective)
    device = _device()
    model, tokenizer = build_model(spec, with_ctc=objective == "ctc", with_llm=objective == "ce", device=device,
                                   gradient_checkpointing=s["models"]["llm"].get("gradient_checkpointing", False))
    if args.init_from:
        load_trained_weights(model, Path(args.init_from) / "model.safetensors")
    out_dir = Path(args.out_dir)
    if args.stage == "init":
        save_model_dir(model, spec, out_dir, extra={"training": {"steps": 0}})
        return
    stage = StageConfig.from_config(objective, s["stage"])
    sr = s["sampling_rate"]
    train_set = SpeechDataset(read_manifest(args.train), sr, args.train)
    dev_set = SpeechDataset(read_manifest(args.dev), sr, args.dev)
    collator = Collator(tokenizer, lid, s["models"]["prompt"]["prefix"], s["models"]["prompt"]["postfix"])
    log_dir = Path(args.log_dir)
    tracker = Tracker(log_dir / "metrics.csv", s["wandb"], group=s["experiment"], job_type=f"train_{args.stage}",
                      name=args.run_name, config=s, wandb_dir=log_dir)
    summary = train(model, tokenizer, stage, train_set, dev_set, collator, tracker, s["seed"])
    tracker.close()
    write_json(log_dir / "summary.json", summary)
    save_model_dir(model, spec, out_dir, extra={"training": {k: summary[k] for k in
                                                             ("selected_steps", "final_step", "epochs")},
                                                "init_from": args.init_from})


# ------------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> None:
    from speechllm import __version__
    from speechllm.data.manifest import read_manifest
    from speechllm.evaluate import benchmarks
    from speechllm.io import atomic_path
    from speechllm.models.export import load_model_dir
    from speechllm.text.normalize import normalizer_version

    s = _settings(args.settings)
    _threads(args.threads)
    device = _device()
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


def cmd_report_table(args: argparse.Namespace) -> None:
    from speechllm.report.tables import build_table, table_footer, write_table

    files = [Path(p) for p in args.scores]
    df = build_table(args.name, files, model_order=args.models)
    write_table(df, Path(args.out_stem), table_footer(args.name, files, model_order=args.models))


# ---------------------------------------------------------------------------------------------- infer
def cmd_transcribe(args: argparse.Namespace) -> None:
    from speechllm.audio import AudioError
    from speechllm.evaluate.decode import ctc_transcribe, encode_speech, llm_generate
    from speechllm.models.export import load_model_dir, read_spec

    device = _device()
    spec = read_spec(Path(args.model))
    use_ctc = args.decoder == "ctc" or (args.decoder == "auto" and spec["stage"] == "ctc")
    model, tokenizer, spec = load_model_dir(Path(args.model), with_ctc=use_ctc, with_llm=not use_ctc, device=device)
    model.eval()
    for path in args.audio:
        try:
            if use_ctc:
                text = ctc_transcribe(model, tokenizer, [path], args.sampling_rate, [None], device)[0]
            else:
                speech, _ = encode_speech(model, [path], args.sampling_rate, [None], device)
                ids = lambda t: tokenizer(t, add_special_tokens=False).input_ids  # noqa: E731
                segs = [[ids(spec["prompt"]["prefix"]), speech[0], ids(spec["prompt"]["postfix"])]]
                text = llm_generate(model, tokenizer, segs, args.num_beams, args.max_new_tokens)[0]
        except AudioError as err:
            raise SystemExit(f"speechllm transcribe: {err}") from err
        print(f"{path}\t{text}", flush=True)


# ----------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="speechllm", description=__doc__, formatter_class=fmt)
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build and prepare manifests", epilog=EXAMPLES["data"], formatter_class=fmt)
    dsub = data.add_subparsers(dest="action", required=True)
    d = dsub.add_parser("demo", help="speak the embedded demo corpus and task sets with TTS")
    d.add_argument("--settings", required=True)
    d.add_argument("--out-dir", required=True)
    d.add_argument("--threads", type=int, default=1)
    d.set_defaults(func=cmd_data_demo)
    for name, func, text in (("fleurs", cmd_data_fleurs, "FLEURS from the hub's parquet conversion"),
                             ("speechglue", cmd_data_speechglue, "SpeechGLUE-shaped sets voiced with TTS"),
                             ("speechxnli", cmd_data_speechxnli, "SpeechXNLI-shaped set voiced with TTS")):
        d = dsub.add_parser(name, help=text)
        d.add_argument("--settings", required=True)
        d.add_argument("--out-dir", required=True)
        d.add_argument("--threads", type=int, default=1)
        d.set_defaults(func=func)
    d = dsub.add_parser("prepare", help="check audio, normalise text, filter durations, speed-perturb")
    d.add_argument("--settings", required=True)
    d.add_argument("--manifest", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--report", required=True)
    d.set_defaults(func=cmd_data_prepare)
    d = dsub.add_parser("language-ids", help="language-ID labels (1..N, 0 = blank) from a training manifest")
    d.add_argument("--manifest", required=True)
    d.add_argument("--out", required=True)
    d.set_defaults(func=cmd_data_language_ids)

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

    tr = sub.add_parser("train", help="train (or initialise) a model and export it", epilog=EXAMPLES["train"],
                        formatter_class=fmt)
    tr.add_argument("stage", choices=["init", "ctc", "ce"])
    tr.add_argument("--settings", required=True)
    tr.add_argument("--train")
    tr.add_argument("--dev")
    tr.add_argument("--language-ids", required=True)
    tr.add_argument("--init-from")
    tr.add_argument("--out-dir", required=True)
    tr.add_argument("--log-dir", default="logs/train")
    tr.add_argument("--run-name", default="run")
    tr.add_argument("--threads", type=int, default=1)
    tr.set_defaults(func=cmd_train)

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

    rep = sub.add_parser("report", help="result tables")
    rsub = rep.add_subparsers(dest="action", required=True)
    r = rsub.add_parser("table", help="one table as .md, .csv and .tex")
    r.add_argument("--name", required=True)
    r.add_argument("--scores", nargs="+", required=True)
    r.add_argument("--models", nargs="+", required=True)
    r.add_argument("--out-stem", required=True)
    r.set_defaults(func=cmd_report_table)

    tx = sub.add_parser("transcribe", help="transcribe audio files (TSV: path<TAB>text)",
                        epilog=EXAMPLES["transcribe"], formatter_class=fmt)
    tx.add_argument("--model", required=True, help="an exported model directory (speechllm.json + safetensors)")
    tx.add_argument("audio", nargs="+")
    tx.add_argument("--decoder", choices=["auto", "ctc", "llm"], default="auto")
    tx.add_argument("--sampling-rate", type=int, default=16000)
    tx.add_argument("--num-beams", type=int, default=5)
    tx.add_argument("--max-new-tokens", type=int, default=192)
    tx.set_defaults(func=cmd_transcribe)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        # Bad input: one clear line naming the file/key; the traceback goes to the log at debug level.
        log.debug("failure", exc_info=True)
        raise SystemExit(f"speechllm {args.command}: error: {err}") from err


if __name__ == "__main__":
    main()
