"""`speechllm data` subcommands: build and prepare manifests"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from speechllm.cliutils import EXAMPLES, parse_settings

log = logging.getLogger("speechllm")


def cmd_data_demo(args: argparse.Namespace) -> None:
    from speechllm.data import demo
    from speechllm.data.tts import make_tts

    s = parse_settings(args.settings)
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

    s = parse_settings(args.settings)
    counts = build_fleurs(Path(args.out_dir), s["languages"], s["fleurs"]["dataset"], s["fleurs"]["revision"],
                          s["sampling_rate"])
    log.info("FLEURS: %s", counts)


def cmd_data_speechglue(args: argparse.Namespace) -> None:
    from speechllm.data.hub import build_speechglue_tts
    from speechllm.data.tts import make_tts

    s = parse_settings(args.settings)
    tts = make_tts(s["tts"]["backend"], s["sampling_rate"], s["tts"]["words_per_minute"])
    counts = build_speechglue_tts(Path(args.out_dir), s["speechglue"]["tasks"], tts, s["tts"]["voices"]["en_us"],
                                  s["sampling_rate"], s["speechglue"]["dataset"], args.threads)
    log.info("SpeechGLUE (TTS): %s", counts)


def cmd_data_speechxnli(args: argparse.Namespace) -> None:
    from speechllm.data.hub import build_speechxnli_tts
    from speechllm.data.tts import make_tts

    s = parse_settings(args.settings)
    tts = make_tts(s["tts"]["backend"], s["sampling_rate"], s["tts"]["words_per_minute"])
    n = build_speechxnli_tts(Path(args.out_dir), s["speechxnli"]["languages"], tts, s["tts"]["voices"],
                             s["sampling_rate"], s["speechxnli"]["dataset"], args.threads)
    log.info("SpeechXNLI (TTS): %d examples", n)


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from speechllm.data.prepare import prepare_split

    s = parse_settings(args.settings)
    report = prepare_split(Path(args.manifest), Path(args.out), Path(args.report), s["sampling_rate"],
                           s["min_duration"], s["max_duration"], s["speed_perturb"], s["on_bad_audio"])
    log.info("%s: %s", args.out, report["counts"])


def cmd_data_language_ids(args: argparse.Namespace) -> None:
    from speechllm.data.prepare import language_ids

    log.info("language ids: %s", language_ids(Path(args.manifest), Path(args.out)))


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="build and prepare manifests", epilog=EXAMPLES["data"], formatter_class=argparse.RawDescriptionHelpFormatter)
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
