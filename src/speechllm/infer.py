"""`speechllm transcribe` subcommands: inference on audio files"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from speechllm.cliutils import EXAMPLES, pick_device

log = logging.getLogger("speechllm")


def cmd_transcribe(args: argparse.Namespace) -> None:
    from speechllm.audio import AudioError
    from speechllm.evaluate.decode import ctc_transcribe, encode_speech, llm_generate
    from speechllm.models.export import load_model_dir, read_spec

    device = pick_device()
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


def register(sub: argparse._SubParsersAction) -> None:
    tx = sub.add_parser("transcribe", help="transcribe audio files (TSV: path<TAB>text)",
                        epilog=EXAMPLES["transcribe"], formatter_class=argparse.RawDescriptionHelpFormatter)
    tx.add_argument("--model", required=True, help="an exported model directory (speechllm.json + safetensors)")
    tx.add_argument("audio", nargs="+")
    tx.add_argument("--decoder", choices=["auto", "ctc", "llm"], default="auto")
    tx.add_argument("--sampling-rate", type=int, default=16000)
    tx.add_argument("--num-beams", type=int, default=5)
    tx.add_argument("--max-new-tokens", type=int, default=192)
    tx.set_defaults(func=cmd_transcribe)
