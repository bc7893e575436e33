"""Experiment tracking: W&B (offline unless the user sets WANDB_MODE) plus a CSV the project reads itself."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Any

SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password)", re.IGNORECASE)


def scrub(value: Any) -> Any:
    """Drop secret-looking keys and any string equal to WANDB_API_KEY from a config before it is logged."""
    key = os.environ.get("WANDB_API_KEY")
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items() if not SECRET_KEY.search(str(k))}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    if key and isinstance(value, str) and key in value:
        return "<redacted>"
    return value


class Tracker:
    """Logs scalars to `csv_path` and, on the main process, to a W&B run."""

    def __init__(self, csv_path: Path, wandb_cfg: dict[str, Any], group: str, job_type: str, name: str,
                 config: dict[str, Any], wandb_dir: Path, enabled: bool = True) -> None:
        self.csv_path = Path(csv_path)
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        self.enabled = enabled
        self._fields: list[str] | None = None
        self.rows: list[dict[str, Any]] = []
        self.run = None
        if enabled and wandb_cfg.get("mode", "offline") != "disabled":
            import wandb

            wandb_dir.mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("WANDB_MODE", wandb_cfg.get("mode", "offline"))
            os.environ.setdefault("WANDB_SILENT", "true")
            self.run = wandb.init(project=wandb_cfg["project"], group=group, job_type=job_type, name=name,
                                  config=scrub(config), dir=str(wandb_dir), reinit="finish_previous")

    def log(self, row: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, **row}
        self.rows.append(row)
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if k != "step"}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def close(self) -> None:
        if not self.enabled:
            return
        fields = sorted({k for row in self.rows for k in row}, key=lambda k: (k != "step", k))
        tmp = self.csv_path.with_name(self.csv_path.name + ".tmp")
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(self.rows)
        tmp.replace(self.csv_path)
        if self.run is not None:
            self.run.finish()
