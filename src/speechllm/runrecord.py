"""Run records: each job writes, next to its log, the settings and command line it ran with, so one step can
be read and rerun by hand (`speechllm rerun logs/<stage>/<job>.run.json`; docs/development.md).

A record is `<log stem>.run.json`:
`{"command", "argv", "settings", "cwd", "started", "host", "speechllm", "world_size"}`. Its `settings` are
what `--settings` carried; `speechllm rerun` passes them back in place of `--settings`, so a setting edited in
the record is the setting the rerun uses.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import socket
from pathlib import Path
from typing import Any

from speechllm import __version__
from speechllm.io import atomic_write_text, read_json

RECORD_SUFFIX = ".run.json"


def record_path(log: str | os.PathLike[str]) -> Path:
    """`logs/train/ctc.log` → `logs/train/ctc.run.json` (a name without `.log` gets the suffix appended)."""
    log = Path(log)
    return log.with_suffix(RECORD_SUFFIX) if log.suffix == ".log" else log.with_name(log.name + RECORD_SUFFIX)


def without_option(argv: list[str], option: str) -> list[str]:
    """`argv` without `option VALUE` / `option=VALUE` (every occurrence)."""
    out: list[str] = []
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word == option:
            skip = True
        elif not word.startswith(option + "="):
            out.append(word)
    return out


def option_value(argv: list[str], option: str) -> str | None:
    """The value of the last `option VALUE` / `option=VALUE` in `argv`, or None."""
    value = None
    for i, word in enumerate(argv):
        if word == option and i + 1 < len(argv):
            value = argv[i + 1]
        elif word.startswith(option + "="):
            value = word.split("=", 1)[1]
    return value


def is_main_process() -> bool:
    """Rank 0 under `accelerate launch` / torchrun (one record per job, not one per process)."""
    return os.environ.get("RANK", "0") == "0"


def write_record(log: str | os.PathLike[str], argv: list[str]) -> Path:
    """Write the record of this run (argv without `--record`) next to `log`; returns its path."""
    argv = without_option(argv, "--record")
    raw = option_value(argv, "--settings")
    settings: Any = None
    if raw is not None:
        try:
            settings = json.loads(raw)
        except json.JSONDecodeError:
            settings = raw  # the command itself reports bad JSON; the record keeps what it was given
    record = {
        "command": shlex.join(["speechllm", *argv]),
        "argv": argv,
        "settings": settings,
        "cwd": os.getcwd(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "speechllm": __version__,
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
    }
    path = record_path(log)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return path


def read_record(path: str | os.PathLike[str]) -> tuple[list[str], Path]:
    """(argv to rerun with, working directory) from a record; its `settings` replace the argv's
    `--settings`."""
    path = Path(path)
    record = read_json(path)
    if not isinstance(record, dict) or not isinstance(record.get("argv"), list) or "cwd" not in record:
        raise ValueError(f"{path}: not a run record (expected a JSON object with 'argv' and 'cwd')")
    argv = [str(word) for word in record["argv"]]
    settings = record.get("settings")
    if settings is not None and option_value(argv, "--settings") is not None:
        value = settings if isinstance(settings, str) else json.dumps(settings, ensure_ascii=False)
        argv = [*without_option(argv, "--settings"), "--settings", value]
    return argv, Path(record["cwd"])
