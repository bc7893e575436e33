"""Evaluation in batches that survive a kill, split into shards that run as separate jobs.

A benchmark decodes its records in one plan of length-sorted batches, the same plan whatever the number of
shards: shard k of N decodes the plan's batches k, k + N, k + 2N, ... (counted over all the benchmark's
groups, e.g. SpeechGLUE's tasks), so every utterance is decoded in the same batch as in an unsharded run and
the outputs are identical. Each batch gives one row (a JSON object) per record.

`BatchRunner` runs one shard's batches. With a partial file, every finished batch's rows are appended to it
(fsynced) under a key over the run's fingerprint (model files, decoder, settings, library versions) and the
batch's records; a killed or stopped job's rerun reuses them and decodes only the rest, and a stop signal
(speechllm.stopping) ends the job after the batch. The rows are kept as they read back from JSON, so a resumed
run's rows equal an uninterrupted run's.

A shard job writes its rows to a shard file (`write_shard`); the gather step reads every shard's file
(`read_shards`), checks that they belong together, and builds the per-utterance frame from the rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from speechllm import stopping
from speechllm.io import atomic_write_text, drop_torn_tail, read_json
from speechllm.versions import installed_version

Row = dict[str, Any]
# Settings that choose which shard a job runs, not what it decodes.
UNKEYED_SETTINGS = ("shards",)
# What a mismatch of a shard header's key means (read_shards).
HEADER_HINTS = {
    "inputs": " (a digest of the manifests' records: they changed since this shard was decoded; decode it "
    "again)"
}


def unit(group: str, index: int) -> str:
    """Key of one record's row: its index in its group's record list (groups: e.g. SpeechGLUE tasks)."""
    return f"{group}:{index}"


def take(rows: Mapping[str, Row], group: str, count: int) -> list[Row]:
    """The rows of a group's records 0..count-1, in order; a missing one is an error naming it."""
    missing = [i for i in range(count) if unit(group, i) not in rows]
    if missing:
        where = f"group {group!r}, " if group else ""
        raise ValueError(
            f"no decoded output for {where}record {missing[0]} ({len(missing)} missing): a shard's "
            "rows are missing"
        )
    return [rows[unit(group, i)] for i in range(count)]


def path_signature(path: Path) -> list[Any]:
    """(relative name, size, mtime) of a file or of every file below a directory: changes when it is
    rewritten."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [
        [str(p.relative_to(path)) if path.is_dir() else p.name, p.stat().st_size, p.stat().st_mtime_ns]
        for p in files
    ]


def run_fingerprint(
    benchmark: str, decoder: str, model_dir: Path, spec: Mapping[str, Any], settings: Mapping[str, Any]
) -> str:
    """sha256 over what a decoded row depends on besides its record: the benchmark and decoder, the model
    directory's files and the local model parts it names (hub models: their id and revision in the spec), the
    evaluation settings and the decoding libraries' versions."""
    local_parts = {}
    for part in ("llm", "speech_encoder"):
        source = spec.get(part, {}).get("name_or_path") if isinstance(spec.get(part), Mapping) else None
        if source and Path(source).exists():
            local_parts[part] = path_signature(Path(source))
    evaluate = {k: v for k, v in settings["evaluate"].items() if k not in UNKEYED_SETTINGS}
    from speechllm import __version__

    blob = {
        "benchmark": benchmark,
        "decoder": decoder,
        "model": path_signature(model_dir),
        "spec": spec,
        "local_parts": local_parts,
        "evaluate": evaluate,
        "sampling_rate": settings.get("sampling_rate"),
        "versions": [__version__, installed_version("torch"), installed_version("transformers")],
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _without_locations(node: Any) -> Any:
    """`node` with every mapping's manifest-location keys (`_line`, `_manifest`: leading `_`) left out."""
    if isinstance(node, Mapping):
        return {k: _without_locations(v) for k, v in node.items() if not str(k).startswith("_")}
    if isinstance(node, list | tuple):
        return [_without_locations(v) for v in node]
    return node


def inputs_digest(inputs: Any) -> str:
    """sha256 over a benchmark's records as read from its manifests (SpeechGLUE: task -> records), without
    where they were read from. A shard file records it; the gather step, which pairs rows with records by
    their index, checks that its manifests still hold the same records in the same order."""
    blob = json.dumps(_without_locations(inputs), sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def partial_path(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".partial.jsonl")


def _as_json(rows: list[Row]) -> list[Row]:
    """Rows as they read back from JSON (the form every later step sees)."""
    return json.loads(json.dumps(rows, ensure_ascii=False))


class BatchRunner:
    """Runs the batches of shard `shard` of `num_shards`, reusing and appending to `partial` (None: no file).

    `rows` collects every decoded row by `unit(group, index)`.
    """

    def __init__(
        self, fingerprint: str = "", partial: Path | None = None, shard: int = 0, num_shards: int = 1
    ) -> None:
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} is outside 0..{num_shards - 1}")
        self.fingerprint, self.partial = fingerprint, partial
        self.shard, self.num_shards = shard, num_shards
        self.rows: dict[str, Row] = {}
        self.done = self._read_partial()
        self.planned = 0  # batches of the plan seen so far, over all groups
        self.decoded = self.reused = 0

    def _read_partial(self) -> dict[str, list[Row]]:
        """Finished batches of an interrupted run by key; a torn last line (killed mid-write) is ignored."""
        done: dict[str, list[Row]] = {}
        if self.partial is None or not self.partial.exists():
            return done
        with self.partial.open(encoding="utf-8") as fh:
            for line in fh:
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(item, dict) and "key" in item and isinstance(item.get("rows"), list):
                    done[item["key"]] = item["rows"]
        return done

    def _key(self, group: str, records: Sequence[Mapping[str, Any]], batch: list[int]) -> str:
        blob = {
            "run": self.fingerprint,
            "group": group,
            "batch": batch,
            "records": [records[i] for i in batch],
        }
        return hashlib.sha256(
            json.dumps(blob, sort_keys=True, ensure_ascii=False, default=str).encode()
        ).hexdigest()

    def run(
        self,
        group: str,
        records: Sequence[Mapping[str, Any]],
        batches: Sequence[list[int]],
        decode: Callable[[list[int]], list[Row]],
        desc: str,
    ) -> None:
        """Decode this shard's share of `batches` (indices into `records`) with `decode`, which returns one
        row per index; rows land in `self.rows`."""
        mine = [b for n, b in enumerate(batches, start=self.planned) if n % self.num_shards == self.shard]
        self.planned += len(batches)
        fh = None
        if self.partial is not None:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            drop_torn_tail(self.partial)
            fh = self.partial.open("a", encoding="utf-8")
        try:
            for batch in tqdm(mine, desc=desc, mininterval=10):
                key = self._key(group, records, batch)
                rows = self.done.get(key)
                if rows is None or len(rows) != len(batch):
                    rows = _as_json(decode(batch))
                    if len(rows) != len(batch):
                        raise RuntimeError(f"{desc}: {len(rows)} rows for a batch of {len(batch)}")
                    self.decoded += 1
                    if fh is not None:
                        fh.write(json.dumps({"key": key, "rows": rows}, ensure_ascii=False) + "\n")
                        fh.flush()
                        os.fsync(fh.fileno())
                        stopping.check(f"{self.decoded + self.reused} finished batches in {self.partial}")
                else:
                    self.reused += 1
                self.rows.update({unit(group, i): row for i, row in zip(batch, rows, strict=True)})
        finally:
            if fh is not None:
                fh.close()

    def finish(self) -> None:
        """The outputs are written: the partial file has served."""
        if self.partial is not None:
            self.partial.unlink(missing_ok=True)


def write_shard(out: Path, runner: BatchRunner, header: Mapping[str, Any]) -> None:
    """A shard's rows with what the gather step checks them against (`header`: benchmark, decoder, notes
    ...)."""
    document = {
        **header,
        "shard": runner.shard,
        "num_shards": runner.num_shards,
        "fingerprint": runner.fingerprint,
        "rows": runner.rows,
    }
    atomic_write_text(out, json.dumps(document, ensure_ascii=False) + "\n")


def read_shards(paths: Sequence[Path], header: Mapping[str, Any]) -> tuple[dict[str, Row], dict[str, Any]]:
    """Every shard's rows, merged, and the first shard's document (without rows). The files must be shards
    0..N-1 of one run (same fingerprint) whose header matches `header`; errors name the file."""
    rows: dict[str, Row] = {}
    origin: dict[str, Path] = {}
    first: dict[str, Any] | None = None
    seen = set()
    for path in paths:
        document = read_json(path)
        if not isinstance(document, dict) or not isinstance(document.get("rows"), dict):
            raise ValueError(f"{path}: not an evaluation shard file")
        shard, num_shards = document.get("shard"), document.get("num_shards")
        if not (isinstance(shard, int) and isinstance(num_shards, int) and 0 <= shard < num_shards):
            raise ValueError(f"{path}: shard {shard!r} of {num_shards!r} is not one of shards 0..N-1")
        for key, value in header.items():
            if document.get(key) != value:
                hint = HEADER_HINTS.get(key, "")
                raise ValueError(f"{path}: {key} is {document.get(key)!r}, expected {value!r}{hint}")
        if first is None:
            first = {k: v for k, v in document.items() if k != "rows"}
        for key in ("num_shards", "fingerprint", "notes"):
            if document.get(key) != first.get(key):
                raise ValueError(f"{path}: {key} differs from {paths[0]}'s: shards of different runs")
        if document["shard"] in seen:
            raise ValueError(f"{path}: shard {document['shard']} given twice")
        seen.add(document["shard"])
        twice = [key for key in document["rows"] if key in rows]
        if twice:
            raise ValueError(
                f"{path}: row {twice[0]} ({len(twice)} rows) is also in {origin[twice[0]]}: each record is "
                "decoded by one shard"
            )
        rows.update(document["rows"])
        origin.update(dict.fromkeys(document["rows"], Path(path)))
    if first is None:
        raise ValueError("no shard files given")
    if seen != set(range(first["num_shards"])):
        raise ValueError(
            f"shards {sorted(set(range(first['num_shards'])) - seen)} of {first['num_shards']} "
            f"are missing (given: {', '.join(map(str, paths))})"
        )
    return rows, first
