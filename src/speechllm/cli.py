"""The `speechllm` command: every Snakemake rule calls one of its subcommands.

Settings come as JSON (`--settings`), the part of the validated config a step needs, so a rule's
`params` hold every knob and a changed knob reruns exactly the steps it affects. Rules pass `--record {log}`:
the settings and command line of each job land next to its log, and `speechllm rerun` runs one step again.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from speechllm import infer, publish, runrecord
from speechllm.cliutils import RAW, add_command, example
from speechllm.data import commands as data_commands
from speechllm.evaluate import commands as evaluate_commands
from speechllm.plan import commands as models_commands
from speechllm.report import commands as report_commands
from speechllm.targets import commands as targets_commands
from speechllm.train import commands as train_commands

log = logging.getLogger("speechllm")
STAGES = (
    data_commands,
    models_commands,
    targets_commands,
    train_commands,
    evaluate_commands,
    report_commands,
    infer,
    publish,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="speechllm", description=__doc__, formatter_class=RAW)
    p.add_argument("--log-level", default="INFO")
    sub = p.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        stage.register(sub)
    add_record_option(p)
    rerun = add_command(
        sub,
        "rerun",
        "run one pipeline step again from the record its job wrote next to its log",
        cmd_rerun,
        description="Run a step again, by hand, from `<log stem>.run.json` (written by every rule's job): "
        "the same command line in the same working directory, with the record's `settings` (edit them "
        "there to try another value). Multi-GPU steps: prefix the printed command with your launcher.",
        epilog=example(
            "speechllm rerun logs/train/ctc_bloomzmms.run.json",
            "speechllm rerun --print logs/eval/fleurs_asr/ctc.run.json",
        ),
    )
    rerun.add_argument("record", type=Path, help="a `.run.json` next to a job's log")
    rerun.add_argument(
        "--print", action="store_true", help="print the command (with `cd`) instead of running it"
    )
    return p


def add_record_option(parser: argparse.ArgumentParser) -> None:
    """`--record LOG` on every leaf command (after its name, so process names stay
    `speechllm <stage> ...`)."""
    children = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not children:
        parser.add_argument(
            "--record",
            metavar="LOG",
            help="write the settings and command line of this run to "
            "LOG's stem + .run.json (the rules pass their log; `speechllm rerun` reads it)",
        )
    for action in children:
        for child in action.choices.values():
            add_record_option(child)


def cmd_rerun(args: argparse.Namespace) -> None:
    argv, cwd = runrecord.read_record(args.record)
    if args.print:
        print(f"cd {shlex.quote(str(cwd))} && {shlex.join(['speechllm', *argv])}")
        return
    if not cwd.is_dir():
        raise FileNotFoundError(f"{args.record}: its working directory {cwd} does not exist")
    os.chdir(cwd)
    main(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if getattr(args, "record", None) and runrecord.is_main_process():
            runrecord.write_record(args.record, argv)
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
