"""The `speechllm` command: every Snakemake rule calls one of its subcommands.

Settings come as JSON (`--settings`), the part of the validated config a step needs, so a rule's
`params` hold every knob and a changed knob reruns exactly the steps it affects.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from speechllm import infer, publish
from speechllm.cliutils import RAW
from speechllm.data import commands as data_commands
from speechllm.evaluate import commands as evaluate_commands
from speechllm.plan import commands as models_commands
from speechllm.report import commands as report_commands
from speechllm.targets import commands as targets_commands
from speechllm.train import commands as train_commands

log = logging.getLogger("speechllm")
STAGES = (data_commands, models_commands, targets_commands, train_commands, evaluate_commands, report_commands,
          infer, publish)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="speechllm", description=__doc__, formatter_class=RAW)
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        stage.register(sub)
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
        raise SystemExit(f"{step_name(args)}: error: {err}") from err
    except Exception as err:
        # A crash: the traceback for whoever debugs it, then a last line that says which step failed and why
        # (rules send stderr to the job's log, and Snakemake shows the end of a failed job's log).
        log.exception("unexpected failure")
        raise SystemExit(f"{step_name(args)}: failed: {type(err).__name__}: {err} (traceback above)") from err


def step_name(args: argparse.Namespace) -> str:
    """`speechllm <command> [<subcommand> ...]` as the user typed it, for error lines."""
    words = [getattr(args, key, None) for key in ("command", "action", "plot", "stage", "benchmark")]
    return " ".join(["speechllm", *(w for w in words if isinstance(w, str))])


if __name__ == "__main__":
    main()
