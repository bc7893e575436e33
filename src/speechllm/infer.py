"""`speechllm transcribe` and `speechllm ask`: inference with an exported model directory.

`ask` prompts the model's LLM with text and speech mixed: every `{audio:PATH}` in the prompt is replaced by the
speech vectors of that file, the text around them by its token embeddings, in the order written. A BLOOMZMMS model
gets exactly that sequence (as its training prompts `[E(prefix); speech; E(postfix)]`); a Kang & Roy model gets it
as the user turn of its chat template (`<s>[|User|]` ... `</s>[|Assistant|]`, speech-summarization.md §1.4).
"""

from __future__ import annotations

import argparse
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speechllm.cliutils import EXAMPLES, pick_device, set_threads

log = logging.getLogger("speechllm")

AUDIO_PART = re.compile(r"\{audio:([^{}]*)\}")
# Decoding defaults per model kind, as each reference decodes: BLOOMZMMS beam 5, Kang & Roy greedy.
DEFAULT_BEAMS = {"bloomzmms": 5, "kang_roy": 1}
ASK_EXAMPLE = """examples:
  speechllm ask --model results/models/tmi --prompt "Repeat the sentence: {audio:clip.wav}. "
  speechllm ask --model results/models/tmi \\
      --prompt $'Translate the following text from German to English\\n{audio:de.wav}\\n'
  speechllm ask --model path/to/kang_roy_model \\
      --prompt "Summarize the following article in 3 sentences or less: {audio:article.flac}"
  speechllm ask --model path/to/kang_roy_model --prompt "{audio:q1.wav} Compare it with this: {audio:q2.wav}"

Each {audio:PATH} is replaced by the speech vectors of that file (any format/rate soundfile reads), the text
around it by its token embeddings, in the order written. A CTC-stage model cannot be asked (use transcribe)."""
ASK_DESCRIPTION = """Prompt a model's LLM with text and speech mixed and print its answer. A BLOOMZMMS model gets the
prompt as it is (its training prompts are [text; speech; text]); a Kang & Roy model gets it as the user turn of its
chat template (<s>[|User|] ... </s>[|Assistant|])."""


class PromptError(ValueError):
    """A malformed `ask` prompt; the message says what is wrong with it."""


@dataclass(frozen=True)
class AudioPart:
    """A `{audio:PATH}` part of a prompt."""

    path: str


PromptPart = str | AudioPart


def parse_prompt(prompt: str) -> list[PromptPart]:
    """Split a prompt into text pieces and `{audio:PATH}` parts, in order (empty text pieces dropped)."""
    parts: list[PromptPart] = []
    position = 0
    for match in AUDIO_PART.finditer(prompt):
        parts.append(prompt[position: match.start()])
        path = match.group(1).strip()
        if not path:
            raise PromptError(f"empty {{audio:}} part at character {match.start()} of the prompt")
        parts.append(AudioPart(path))
        position = match.end()
    parts.append(prompt[position:])
    for piece in parts:
        if isinstance(piece, str) and "{audio:" in piece:
            near = piece[piece.index("{audio:"):][:40]
            raise PromptError(f"unclosed or nested {{audio:...}} part in the prompt near {near!r}")
    if not any(isinstance(p, AudioPart) for p in parts):
        raise PromptError("the prompt has no {audio:PATH} part; write e.g. --prompt \"Repeat the sentence: "
                          "{audio:clip.wav}. \"")
    return [p for p in parts if not (isinstance(p, str) and p == "")]


def check_audio_files(parts: Sequence[PromptPart]) -> None:
    """Every `{audio:PATH}` must name an existing file (checked before any model is loaded)."""
    for part in parts:
        if isinstance(part, AudioPart) and not Path(part.path).is_file():
            raise FileNotFoundError(f"{{audio:{part.path}}}: no such audio file ({Path(part.path).resolve()})")


def check_askable(spec: dict[str, Any], model_dir: Path) -> str:
    """The model kind, if its LLM can be prompted; a CTC-stage BLOOMZMMS model cannot be asked."""
    kind = spec.get("kind", "bloomzmms")
    if kind == "bloomzmms" and spec.get("stage") == "ctc":
        raise ValueError(
            f"{model_dir} is a CTC-stage model (speechllm.json stage 'ctc'): its adaptor was trained to be decoded "
            f"by CTC, not to prompt the LLM. Transcribe with `speechllm transcribe --model {model_dir} AUDIO`, or "
            "ask a CE-trained model (results/models/t, mi or tmi)")
    return kind


def text_token_ids(tokenizer: Any, kind: str, text: str) -> list[int]:
    """Token ids of a text piece: without special tokens (BLOOM), without the leading BOS (LLaMA chat models)."""
    if kind == "kang_roy":
        from speechllm.models.kang_roy import text_ids

        return text_ids(tokenizer, text)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def encode_clip(model: Any, kind: str, path: str, sampling_rate: int, device: Any) -> Any:
    """Speech vectors (T, H_llm) of one audio file."""
    from speechllm.evaluate.decode import encode_speech, load_wavs

    if kind == "kang_roy":
        wav, lengths = load_wavs([path], sampling_rate, [None], device, model.min_input_samples())
        return model.encode(wav, lengths)[0]
    return encode_speech(model, [path], sampling_rate, [None], device)[0][0]


def prompt_segments(model: Any, tokenizer: Any, kind: str, parts: Sequence[PromptPart], sampling_rate: int,
                    device: Any) -> list[Any]:
    """The prompt as LLM segments: token-id lists for text, (T_i, H) speech tensors for audio, in order."""
    import torch

    segments = []
    with torch.no_grad():
        for part in parts:
            if isinstance(part, AudioPart):
                segments.append(encode_clip(model, kind, part.path, sampling_rate, device))
            else:
                ids = text_token_ids(tokenizer, kind, part)
                if ids:
                    segments.append(ids)
    return segments


def answer(model: Any, tokenizer: Any, kind: str, parts: Sequence[PromptPart], sampling_rate: int, device: Any,
           num_beams: int, max_new_tokens: int) -> str:
    """Decode the LLM's answer to a mixed text/speech prompt (the chat template around it for Kang & Roy)."""
    segments = prompt_segments(model, tokenizer, kind, parts, sampling_rate, device)
    log.info("prompt: %s", " | ".join(f"speech {tuple(s.shape)}" if hasattr(s, "shape") else f"text {len(s)} tokens"
                                      for s in segments))
    if kind == "kang_roy":
        tokens = model.generate([segments], max_new_tokens, num_beams=num_beams)[0]
    else:
        if model.llm is None:
            raise ValueError("this model was loaded without its LLM")
        tokens = model.llm.generate([segments], max_new_tokens=max_new_tokens, num_beams=num_beams)[0]
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def cmd_ask(args: argparse.Namespace) -> None:
    parts = parse_prompt(args.prompt)
    check_audio_files(parts)  # before the (slow) imports and model loading
    from speechllm.models.export import load_model_dir, read_spec

    model_dir = Path(args.model)
    kind = check_askable(read_spec(model_dir), model_dir)
    set_threads(args.threads)
    device = pick_device()
    model, tokenizer, _ = load_model_dir(model_dir, with_ctc=False, with_llm=True, device=device)
    model.eval()
    beams = args.num_beams or DEFAULT_BEAMS[kind]
    print(answer(model, tokenizer, kind, parts, args.sampling_rate, device, beams, args.max_new_tokens), flush=True)


def cmd_transcribe(args: argparse.Namespace) -> None:
    from speechllm.audio import AudioError
    from speechllm.evaluate.decode import ctc_transcribe, encode_speech, llm_generate
    from speechllm.models.export import load_model_dir, read_spec

    device = pick_device()
    spec = read_spec(Path(args.model))
    if spec.get("kind") == "kang_roy":
        raise ValueError(f"{args.model} is a Kang & Roy model: it answers prompts rather than transcribing; use "
                         f"`speechllm ask --model {args.model} --prompt \"... {{audio:clip.wav}}\"`")
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
    raw = argparse.RawDescriptionHelpFormatter
    tx = sub.add_parser("transcribe", help="transcribe audio files (TSV: path<TAB>text)",
                        epilog=EXAMPLES["transcribe"], formatter_class=raw)
    tx.add_argument("--model", required=True, help="an exported model directory (speechllm.json + safetensors)")
    tx.add_argument("audio", nargs="+")
    tx.add_argument("--decoder", choices=["auto", "ctc", "llm"], default="auto",
                    help="auto: CTC for a CTC-stage model, else the LLM with the model's transcription prompt")
    tx.add_argument("--sampling-rate", type=int, default=16000)
    tx.add_argument("--num-beams", type=int, default=5)
    tx.add_argument("--max-new-tokens", type=int, default=192)
    tx.set_defaults(func=cmd_transcribe)

    ask = sub.add_parser("ask", help="prompt a model's LLM with text and {audio:PATH} parts mixed; prints the answer",
                         description=ASK_DESCRIPTION, epilog=ASK_EXAMPLE, formatter_class=raw)
    ask.add_argument("--model", required=True, help="an exported model directory (speechllm.json + safetensors)")
    ask.add_argument("--prompt", required=True, help="text with one or more {audio:PATH} parts")
    ask.add_argument("--sampling-rate", type=int, default=16000, help="rate the speech encoder expects")
    ask.add_argument("--num-beams", type=int, help="beam size (default: 5 for BLOOMZMMS, 1 = greedy for Kang & Roy)")
    ask.add_argument("--max-new-tokens", type=int, default=256)
    ask.add_argument("--threads", type=int, default=2, help="CPU threads (when no GPU is used)")
    ask.set_defaults(func=cmd_ask)
