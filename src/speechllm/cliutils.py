"""Helpers shared by the `speechllm` subcommand modules."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

RAW = argparse.RawDescriptionHelpFormatter


def add_command(
    sub: argparse._SubParsersAction,
    name: str,
    help: str,
    func: Callable[[argparse.Namespace], None] | None = None,
    *,
    description: str | None = None,
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """Subcommand `name` of `sub`, run by `func` (None for a group of subcommands).

    Every subcommand uses the raw formatter, so the examples in descriptions and epilogs keep their lines.
    """
    parser = sub.add_parser(name, help=help, description=description, epilog=epilog, formatter_class=RAW)
    if func is not None:
        parser.set_defaults(func=func)
    return parser


def example(*commands: str) -> str:
    """An `example:` epilog, one command per line (as the rules run them)."""
    return "example:\n" + "\n".join(f"  {c}" for c in commands)


EXAMPLES = {
    "transcribe": "example:\n"
    "  speechllm transcribe --model results/models/ctc clip1.wav clip2.flac > hyps.tsv",
    "data": "example:\n  speechllm data prepare --manifest raw.jsonl --out train.jsonl --report report.json "
    "--settings '{\"sampling_rate\": 16000, ...}'",
    "train": 'example:\n  speechllm train ctc --settings "$(cat settings.json)" --train train.jsonl '
    "--dev dev.jsonl --language-ids lid.json --out-dir results/models/ctc",
}


def positive_int(text: str) -> int:
    """argparse type of counts and sizes: a whole number >= 1 (a batch size below 1 made the CLI print
    nothing at all)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a whole number >= 1")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def add_download_timeout(parser: argparse.ArgumentParser) -> None:
    """`--timeout`: the download steps' stall limit, from config resources.download_timeout_seconds."""
    parser.add_argument(
        "--timeout",
        type=positive_float,
        required=True,
        help="seconds a silent server is waited for before the download fails "
        "(config resources.download_timeout_seconds)",
    )


def parse_settings(raw: str) -> dict[str, Any]:
    """The JSON object a rule passes as `--settings` (a ValueError otherwise, which `speechllm` reports in
    one line naming the command)."""
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"--settings is not valid JSON: {err.msg} (line {err.lineno} column {err.colno})"
        ) from err
    if not isinstance(value, dict):
        raise ValueError(f"--settings must be a JSON object, not {type(value).__name__}")
    return value


def pick_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))
