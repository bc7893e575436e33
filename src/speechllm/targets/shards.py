"""Shards of a generation step: which rows each shard job takes, and the shards' rows back in manifest order.
Torch-free, so that the gather job starts in a fraction of a second."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def shard_indices(n: int, shard: int, num_shards: int) -> list[int]:
    """Every `num_shards`-th item from `shard`: shards partition the items and balance lengths."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is outside 0..{num_shards - 1}")
    return list(range(shard, n, num_shards))


def gather_shards(paths: list[Path]) -> list[dict[str, Any]]:
    """Shard rows back in manifest order, without `index`; every index 0..n-1 exactly once."""
    rows: dict[int, dict[str, Any]] = {}
    for path in paths:
        with Path(path).open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from err
                index = row.pop("index", None) if isinstance(row, dict) else None
                if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                    # 1.5, "1" or true would be taken for another row's place
                    raise ValueError(f"{path}:{lineno}: not a shard row with a whole-number index >= 0")
                if index in rows:
                    raise ValueError(f"{path}:{lineno}: index {index} appears in more than one shard row")
                rows[index] = row
    missing = sorted(set(range(len(rows))) - set(rows))
    if missing:
        raise ValueError(f"shards {', '.join(map(str, paths))} miss indices, e.g. {missing[:5]}")
    return [rows[i] for i in range(len(rows))]
