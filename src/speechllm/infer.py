"""`speechllm transcribe` and `speechllm ask`: inference with an exported model directory.

`ask` prompts the model's LLM with text and speech mixed: every `{audio:PATH}` in the prompt is replaced by
the speech vectors of that file, the text around them by its token embeddings, in the order written. A
BLOOMZMMS model gets exactly that sequence (as its training prompts `[E(prefix); speech; E(postfix)]`); a Kang
& Roy model gets it as the user turn of its chat template (`<s>[|User|]` ... `</s>[|Assistant|]`,
speech-summarization.md §1.4).

Both commands load the model once (a directory or hub id) and decode their inputs in padded batches through
`speechllm.api.SpeechModel`; the prompt parsing and checks here run before anything is loaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speechllm.cliutils import EXAMPLES, add_command, positive_int, set_threads

log = logging.getLogger("speechllm")

AUDIO_PART = re.compile(r"\{audio:([^{}]*)\}")
# Decoding defaults per model kind, as each reference decodes: BLOOMZMMS beam 5, Kang & Roy greedy.
DEFAULT_BEAMS = {"bloomzmms": 5, "kang_roy": 1}
# Transcription as the BLOOMZMMS reference decodes (beam 5, 192 new tokens); prompts get Kang & Roy's 256.
TRANSCRIBE_BEAMS = 5
TRANSCRIBE_MAX_NEW_TOKENS = 192
ASK_MAX_NEW_TOKENS = 256
SAMPLING_RATE = 16_000  # what MMS and HuBERT (the speech encoders of both systems) expect
DEFAULT_BATCH_SIZE = 8
PRINT_BATCHES = 16  # the CLI prints every this many batches (inputs are length-sorted within them)
ASK_EXAMPLE = (
    "examples:\n"
    '  speechllm ask --model results/models/tmi --prompt "Repeat the sentence: {audio:clip.wav}. "\n'
    "  speechllm ask --model results/models/tmi \\\n"
    "      --prompt $'Translate the following text from German to English\\n{audio:de.wav}\\n'\n"
    "  speechllm ask --model path/to/kang_roy_model \\\n"
    '      --prompt "Summarize the following article in 3 sentences or less: {audio:article.flac}"\n'
    '  speechllm ask --model path/to/kang_roy_model --prompt "{audio:q1.wav} Compare it with this: '
    '{audio:q2.wav}"\n'
    "\n"
    "Each {audio:PATH} is replaced by the speech vectors of that file (any format/rate soundfile reads), "
    "the text\n"
    "around it by its token embeddings, in the order written. A CTC-stage model cannot be asked (use "
    "transcribe)."
)
ASK_DESCRIPTION = (
    "Prompt a model's LLM with text and speech mixed and print its answer. A BLOOMZMMS model gets the\n"
    "prompt as it is (its training prompts are [text; speech; text]); a Kang & Roy model gets it as the "
    "user turn of its\n"
    "chat template (<s>[|User|] ... </s>[|Assistant|])."
)


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
        parts.append(prompt[position : match.start()])
        path = match.group(1).strip()
        if not path:
            raise PromptError(f"empty {{audio:}} part at character {match.start()} of the prompt")
        parts.append(AudioPart(path))
        position = match.end()
    parts.append(prompt[position:])
    for piece in parts:
        if isinstance(piece, str) and "{audio:" in piece:
            near = piece[piece.index("{audio:") :][:40]
            raise PromptError(f"unclosed or nested {{audio:...}} part in the prompt near {near!r}")
    if not any(isinstance(p, AudioPart) for p in parts):
        raise PromptError(
            'the prompt has no {audio:PATH} part; write e.g. --prompt "Repeat the sentence: '
            '{audio:clip.wav}. "'
        )
    return [p for p in parts if not (isinstance(p, str) and p == "")]


def check_audio_files(parts: Sequence[PromptPart]) -> None:
    """Every `{audio:PATH}` must name an existing file (checked before any model is loaded)."""
    for part in parts:
        if isinstance(part, AudioPart) and not Path(part.path).is_file():
            raise FileNotFoundError(
                f"{{audio:{part.path}}}: no such audio file ({Path(part.path).resolve()})"
            )


def check_askable(spec: dict[str, Any], model_dir: Path) -> str:
    """The model kind, if its LLM can be prompted; a CTC-stage BLOOMZMMS model cannot be asked."""
    kind = spec.get("kind", "bloomzmms")
    if kind == "bloomzmms" and spec.get("stage") == "ctc":
        raise ValueError(
            f"{model_dir} is a CTC-stage model (speechllm.json stage 'ctc'): its adaptor was trained to be "
            "decoded by CTC, not to prompt the LLM. Transcribe with `speechllm transcribe --model "
            f"{model_dir} AUDIO`, or ask a CE-trained model (results/models/t, mi or tmi)"
        )
    return kind


def text_token_ids(tokenizer: Any, kind: str, text: str) -> list[int]:
    """Token ids of a text piece: without special tokens (BLOOM), without the leading BOS (LLaMA chat
    models)."""
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


def prompt_segments(
    model: Any, tokenizer: Any, kind: str, parts: Sequence[PromptPart], sampling_rate: int, device: Any
) -> list[Any]:
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


def answer(
    model: Any,
    tokenizer: Any,
    kind: str,
    parts: Sequence[PromptPart],
    sampling_rate: int,
    device: Any,
    num_beams: int,
    max_new_tokens: int,
) -> str:
    """Decode the LLM's answer to a mixed text/speech prompt (the chat template around it for Kang & Roy).

    One prompt, one file at a time: the unbatched path. The CLI and `speechllm.api.SpeechModel.ask` batch
    prompts; tests hold their answers equal to this function's."""
    segments = prompt_segments(model, tokenizer, kind, parts, sampling_rate, device)
    log.info(
        "prompt: %s",
        " | ".join(
            f"speech {tuple(s.shape)}" if hasattr(s, "shape") else f"text {len(s)} tokens" for s in segments
        ),
    )
    tokens = model.generate([segments], max_new_tokens, num_beams=num_beams)[0]
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def read_prompts(source: str) -> list[tuple[str, str]]:
    """(where, prompt) per non-blank line of a file, or of standard input for "-", spaces kept. A line written
    as a JSON string ("...\\n...") is decoded, so a prompt can hold newlines."""
    if source == "-":
        lines, name = sys.stdin.read().splitlines(), "<stdin>"
    else:
        if not Path(source).is_file():
            raise FileNotFoundError(f"--prompts {source}: no such file")
        try:
            lines, name = Path(source).read_text(encoding="utf-8").splitlines(), source
        except UnicodeDecodeError as err:
            raise PromptError(
                f"--prompts {source}: not UTF-8 text ({err.reason} at byte {err.start})"
            ) from err
    prompts = []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        quoted = text.strip()  # the prompt itself keeps its spaces: they are part of what the LLM reads
        if len(quoted) >= 2 and quoted[0] == quoted[-1] == '"':
            try:
                text = json.loads(quoted)
            except json.JSONDecodeError as err:
                raise PromptError(f"{name}:{number}: not a valid JSON string: {err.msg}") from err
        prompts.append((f"{name}:{number}", text))
    return prompts


def gather_prompts(args: argparse.Namespace) -> list[tuple[str, list[PromptPart], str]]:
    """Every prompt of `--prompt` and `--prompts`, parsed and with its audio files checked: (where, parts,
    text). Errors name the prompt (`--prompt #i` or file:line)."""
    given = [(f"--prompt #{i}", p) for i, p in enumerate(args.prompt or [], start=1)]
    if args.prompts:
        given += read_prompts(args.prompts)
    if not given:
        raise PromptError(
            "no prompt: give --prompt TEXT (repeatable) or --prompts FILE (one per line, - = standard input)"
        )
    parsed = []
    for where, text in given:
        try:
            parts = parse_prompt(text)
            check_audio_files(parts)
        except (PromptError, FileNotFoundError) as err:
            raise type(err)(f"{where}: {err}") from err
        parsed.append((where, parts, text))
    return parsed


def windows(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of `size` items: the CLI decodes one window at a time and prints it."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def load_for_cli(
    args: argparse.Namespace, decoder: str, check: Callable[[dict[str, Any], Path], object]
) -> Any:
    """The `SpeechModel` of `--model` (a directory or hub id); `check` sees its spec before anything loads."""
    from speechllm.api import SpeechModel, resolve_model_dir
    from speechllm.models.export import read_spec

    model_dir = resolve_model_dir(args.model)
    check(read_spec(model_dir), model_dir)
    set_threads(args.threads)
    device = None if args.device == "auto" else args.device
    return SpeechModel.from_pretrained(
        model_dir, device=device, dtype=args.dtype, decoder=decoder, sampling_rate=args.sampling_rate
    )


def cmd_ask(args: argparse.Namespace) -> None:
    prompts = gather_prompts(args)  # before the (slow) imports and model loading
    model = load_for_cli(args, "llm", check_askable)
    for window in windows(prompts, args.batch_size * PRINT_BATCHES):
        answers = model.ask(
            [parts for _, parts, _ in window],
            args.batch_size,
            num_beams=args.num_beams,
            max_new_tokens=args.max_new_tokens,
        )
        for (_, _, text), answer_text in zip(window, answers, strict=True):
            if args.json:
                print(json.dumps({"prompt": text, "answer": answer_text}, ensure_ascii=False), flush=True)
            else:  # one line per prompt when there are several (--json keeps an answer's newlines)
                print(answer_text if len(prompts) == 1 else " ".join(answer_text.splitlines()), flush=True)


def check_transcribable(spec: dict[str, Any], model_dir: Path) -> None:
    if spec.get("kind") == "kang_roy":
        raise ValueError(
            f"{model_dir} is a Kang & Roy model: it answers prompts rather than transcribing; "
            f'use `speechllm ask --model {model_dir} --prompt "... {{audio:clip.wav}}"`'
        )


def cmd_transcribe(args: argparse.Namespace) -> None:
    missing = [path for path in args.audio if not Path(path).is_file()]
    if missing:  # before the (slow) model loading, as `ask` checks its prompts' files
        raise FileNotFoundError(
            f"{missing[0]}: no such audio file ({len(missing)} of {len(args.audio)} missing)"
        )
    model = load_for_cli(args, args.decoder, check_transcribable)
    for window in windows(args.audio, args.batch_size * PRINT_BATCHES):
        texts = model.transcribe(
            list(window), args.batch_size, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens
        )
        for path, text in zip(window, texts, strict=True):
            row = json.dumps({"audio": path, "text": text}, ensure_ascii=False)
            print(row if args.json else f"{path}\t{text}", flush=True)


def add_runtime_options(parser: argparse.ArgumentParser) -> None:
    """Options of `transcribe` and `ask`: where and how the model runs, how inputs are batched and printed."""
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=DEFAULT_BATCH_SIZE,
        help="inputs per padded batch (1 = one at a time; the text is the same)",
    )
    parser.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda, cuda:1")
    parser.add_argument(
        "--dtype",
        help="float32, bfloat16 or float16 for the whole model (default: the "
        "LLM's own from speechllm.json, float32 elsewhere)",
    )
    parser.add_argument(
        "--sampling-rate", type=positive_int, default=SAMPLING_RATE, help="rate the speech encoder expects"
    )
    parser.add_argument("--threads", type=positive_int, default=2, help="CPU threads (when no GPU is used)")
    parser.add_argument("--json", action="store_true", help="print JSON Lines instead of plain text")


def register(sub: argparse._SubParsersAction) -> None:
    tx = add_command(
        sub,
        "transcribe",
        "transcribe audio files (TSV: path<TAB>text, or --json)",
        cmd_transcribe,
        epilog=EXAMPLES["transcribe"],
    )
    tx.add_argument("--model", required=True, help="a model directory (speechllm.json + weights) or hub id")
    tx.add_argument("audio", nargs="+")
    tx.add_argument(
        "--decoder",
        choices=["auto", "ctc", "llm"],
        default="auto",
        help="auto: CTC for a CTC-stage model, else the LLM with the model's transcription prompt",
    )
    tx.add_argument("--num-beams", type=positive_int, default=TRANSCRIBE_BEAMS)
    tx.add_argument("--max-new-tokens", type=positive_int, default=TRANSCRIBE_MAX_NEW_TOKENS)
    add_runtime_options(tx)

    ask = add_command(
        sub,
        "ask",
        "prompt a model's LLM with text and {audio:PATH} parts mixed; prints the answer",
        cmd_ask,
        description=ASK_DESCRIPTION,
        epilog=ASK_EXAMPLE,
    )
    ask.add_argument("--model", required=True, help="a model directory (speechllm.json + weights) or hub id")
    ask.add_argument("--prompt", action="append", help="text with {audio:PATH} parts (repeatable)")
    ask.add_argument(
        "--prompts",
        metavar="FILE",
        help="prompts, one per line (- = standard input; a line in quotes is a JSON string)",
    )
    ask.add_argument(
        "--num-beams",
        type=positive_int,
        help="beam size (default: 5 for BLOOMZMMS, 1 = greedy for Kang & Roy)",
    )
    ask.add_argument("--max-new-tokens", type=positive_int, default=ASK_MAX_NEW_TOKENS)
    add_runtime_options(ask)
