"""Experiment tracking: W&B (offline unless the user sets WANDB_MODE) plus files the project reads itself.

A job opens one W&B run: project from the config, group = experiment, job_type = the Snakemake rule, name from
the rule's wildcards (a stable id from these three); its config is the job's resolved settings. Scalars also
go to `<log_dir>/metrics.jsonl` as they are logged (so a resumed job keeps the rows written before its
checkpoint) and to a CSV at the end; the resolved settings are dumped to `<log_dir>/config.json`.

Secrets never reach a file: keys that look like credentials are dropped and any string containing the value of
WANDB_API_KEY is redacted before a config is logged or dumped; W&B reads the key from the environment itself.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from speechllm import stopping
from speechllm.io import atomic_path, atomic_write_text

log = logging.getLogger("speechllm")

# Credential-like keys ("api_key", "hf_token", "password", ...), not "max_new_tokens" or "tokenizer_...".
SECRET_KEY = re.compile(r"(api[_-]?key|secret|passw(or)?d|credential|(^|[_-])token$)", re.IGNORECASE)
REDACTED = "<redacted>"


def _secret_values() -> list[str]:
    return [v for k, v in os.environ.items() if k == "WANDB_API_KEY" and v]


def scrub(value: Any) -> Any:
    """Drop secret-looking keys and redact strings containing WANDB_API_KEY, recursively."""
    secrets = _secret_values()
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if not SECRET_KEY.search(str(k))}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    if isinstance(value, str) and any(s in value for s in secrets):
        return REDACTED
    return value


def run_id(group: str, job_type: str, name: str) -> str:
    """A stable W&B run id per job: a resumed job continues its run (online) instead of starting another."""
    return hashlib.sha256(f"{group}/{job_type}/{name}".encode()).hexdigest()[:16]


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def logged_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl a killed job appended to: a last line cut off mid-write is dropped (its
    step is logged again after the resume); any other unreadable line is an error that names the file and
    line."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or "step" not in row:
                raise ValueError("not an object with a step")
        except ValueError as err:
            if lineno == len(lines):  # no newline after it: the write was interrupted
                log.warning("%s:%d: dropping a partly written last line", path, lineno)
                continue
            raise ValueError(f"{path}:{lineno}: not a metrics row ({err})") from err
        rows.append(row)
    return rows


class Tracker:
    """Logs scalars to `<log_dir>/metrics.jsonl` (and a CSV at `close`) and to a W&B run.

    Args:
        log_dir: the job's run directory (W&B writes under `<log_dir>/wandb`).
        wandb_cfg: `{"project": ..., "mode": offline|online|disabled}`; WANDB_MODE in the environment wins.
        group, job_type, name: W&B run grouping (experiment, rule, wildcards).
        config: the resolved settings (scrubbed before logging or dumping).
        enabled: False on non-main processes (nothing is written).
        resume_step: keep earlier rows up to this step (a resumed job); None starts afresh.
    """

    def __init__(
        self,
        log_dir: Path,
        wandb_cfg: dict[str, Any],
        group: str,
        job_type: str,
        name: str,
        config: dict[str, Any],
        enabled: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.enabled = enabled
        self.rows: list[dict[str, Any]] = []
        self.run = None
        self.wandb_id: str | None = None
        if not enabled:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.log_dir / "metrics.jsonl"
        if resume_step is not None and self.jsonl.is_file():
            self.rows = [row for row in logged_rows(self.jsonl) if row["step"] <= resume_step]
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        clean = scrub(config)
        atomic_write_text(self.log_dir / "config.json", json.dumps(clean, indent=2, sort_keys=True) + "\n")
        mode = os.environ.get("WANDB_MODE") or wandb_cfg.get("mode", "offline")
        self.wandb_id = run_id(group, job_type, name) if mode != "disabled" else None
        if mode == "disabled":
            return
        import wandb

        if mode == "offline":
            # An offline run cannot be continued: the resumed job's run directory replaces the killed one's
            # and gets the earlier rows again: the one directory `wandb sync` uploads holds the whole curve.
            for old in (self.log_dir / "wandb").glob(f"offline-run-*-{self.wandb_id}*"):
                shutil.rmtree(old, ignore_errors=True)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=wandb_cfg["project"],
            group=group,
            job_type=job_type,
            name=name,
            config=clean,
            # Absolute: a W&B service inherited from a parent process (WANDB_SERVICE) resolves a relative
            # directory in its own working directory, not this job's.
            dir=str(self.log_dir.resolve()),
            mode=mode,
            id=self.wandb_id,
            resume="allow",
        )
        if mode == "offline":
            for row in self.rows:
                self._to_wandb(row)

    def log(self, row: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _finite(v) for k, v in row.items()}}
        self.rows.append(row)
        with self.jsonl.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        self._to_wandb(row)

    def _to_wandb(self, row: dict[str, Any]) -> None:
        if self.run is not None:
            values = {k: v for k, v in row.items() if k != "step" and v is not None}
            self._wandb(lambda run: run.log(values, step=row["step"]))

    def _wandb(self, call: Callable[[Any], Any]) -> None:
        """`call(run)`; after a stop signal (speechllm.stopping) a failure ends W&B logging instead of the
        job: Slurm signals every process of the job step, W&B's service process too, and the job is about to
        save and exit for a retry, which logs to the run again."""
        try:
            call(self.run)
        except Exception as err:
            if stopping.requested() is None:
                raise
            import wandb

            log.warning(
                "W&B service gone after %s (%s: %s); metrics.jsonl goes on, the resumed job logs to "
                "W&B again",
                stopping.requested(),
                type(err).__name__,
                err,
            )
            self.run = None
            with contextlib.suppress(Exception):  # the connection is known to be broken
                wandb.teardown()  # marks it closed: no second failure when the process exits

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self._wandb(lambda run: run.summary.update(scrub(values)))

    def write_csv(self, path: Path) -> None:
        """All rows as one CSV (columns: step first, then sorted names), written atomically."""
        fields = sorted({k for row in self.rows for k in row}, key=lambda k: (k != "step", k))
        with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)

    def close(self) -> None:
        """Write `<log_dir>/metrics.csv` and finish the W&B run."""
        if not self.enabled:
            return
        self.write_csv(self.log_dir / "metrics.csv")
        if self.run is not None:
            self._wandb(lambda run: run.finish())
            self.run = None
