"""Evaluation in shards and batches that survive a stop: shards gathered equal the unsharded outputs; a
stopped or killed shard resumes without redoing its finished batches and ends with identical outputs
(evaluate/shards.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from test_evaluate_benchmarks import SETTINGS, SR
from test_evaluate_benchmarks import world as world  # noqa: PLC0414 (the fixture)

from speechllm import stopping
from speechllm.cli import main
from speechllm.evaluate.shards import BatchRunner, partial_path
from speechllm.stopping import PREEMPTED_EXIT, Preempted

EVAL = {**SETTINGS, "batch_size": 2, "shards": 1}  # 6 utterances: 3 ASR batches; GLUE: 2 + 2 + 2 batches
CASES = {"fleurs_asr": ("ctc", "llm"), "speechglue": ("t", "llm")}


def write_manifests(world: dict[str, Any], root: Path, benchmark: str) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    groups = {"test": world["utterances"]} if benchmark == "fleurs_asr" else world["glue"]
    paths = []
    for name, records in groups.items():
        path = root / f"{name}.jsonl"
        path.write_text(
            "".join(json.dumps({k: v for k, v in r.items() if k != "_line"}) + "\n" for r in records)
        )
        paths.append(str(path))
    return paths


def job_args(world: dict[str, Any], tmp_path: Path, benchmark: str) -> list[str]:
    """The arguments every `speechllm evaluate` call of a benchmark's system shares (as
    rules/evaluate.smk)."""
    stage, decoder = CASES[benchmark]
    settings = json.dumps({"evaluate": EVAL, "sampling_rate": SR, "experiment": "t"})
    manifests = write_manifests(world, tmp_path / "manifests", benchmark)
    return ["--settings", settings, "--model", world["dirs"][stage], "--name", stage, "--decoder", decoder,
            "--manifests", *manifests]  # fmt: skip


def evaluate(world: dict[str, Any], tmp_path: Path, benchmark: str, *extra: str) -> None:
    main(["evaluate", benchmark, *job_args(world, tmp_path, benchmark), *extra])


def gather(world: dict[str, Any], tmp_path: Path, benchmark: str, rows: list[Path], out: Path) -> None:
    outputs = ["--hyps", str(out / "hyps.parquet"), "--scores", str(out / "scores.json")]
    main(
        [
            "evaluate",
            "gather",
            benchmark,
            *job_args(world, tmp_path, benchmark),
            "--rows",
            *map(str, rows),
            *outputs,
        ]
    )


def outputs(out: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    scores = json.loads((out / "scores.json").read_text())
    return pd.read_parquet(out / "hyps.parquet"), {k: scores[k] for k in ("metrics", "notes", "checkpoint")}


def whole(world: dict[str, Any], tmp_path: Path, benchmark: str) -> Path:
    out = tmp_path / "whole"
    evaluate(
        world, tmp_path, benchmark, "--hyps", str(out / "hyps.parquet"), "--scores", str(out / "scores.json")
    )
    return out


@pytest.mark.parametrize("benchmark", CASES)
def test_shards_gathered_equal_the_unsharded_outputs(world, tmp_path, benchmark):
    """Every utterance is decoded in the batch it has without shards: 2 or 3 shards give the same Parquet and
    scores as one job, whatever shard holds which batch (SpeechGLUE's tasks share one batch count)."""
    expected = whole(world, tmp_path, benchmark)
    for num_shards in (2, 3):
        rows = [tmp_path / f"n{num_shards}" / f"shard{k}.json" for k in range(num_shards)]
        for k, path in enumerate(rows):
            evaluate(
                world,
                tmp_path,
                benchmark,
                "--shard",
                str(k),
                "--num-shards",
                str(num_shards),
                "--rows",
                str(path),
            )
        units = [set(json.loads(path.read_text())["rows"]) for path in rows]
        assert all(units) and not set.intersection(*units), units  # the shards split the work
        out = tmp_path / f"gathered{num_shards}"
        gather(world, tmp_path, benchmark, rows, out)
        (df, scores), (want_df, want_scores) = outputs(out), outputs(expected)
        pd.testing.assert_frame_equal(df, want_df, check_exact=True)
        assert scores == want_scores
        assert not any(partial_path(path).exists() for path in rows)


def test_gather_refuses_missing_or_foreign_shards(world, tmp_path):
    rows = [tmp_path / f"shard{k}.json" for k in range(2)]
    for k, path in enumerate(rows):
        evaluate(world, tmp_path, "fleurs_asr", "--shard", str(k), "--num-shards", "2", "--rows", str(path))
    with pytest.raises(SystemExit, match=r"shards \[1\] of 2 are missing"):
        gather(world, tmp_path, "fleurs_asr", rows[:1], tmp_path / "out")
    foreign = json.loads(rows[1].read_text())
    foreign["fingerprint"] = "other settings"
    rows[1].write_text(json.dumps(foreign))
    with pytest.raises(SystemExit, match=f"{rows[1]}: fingerprint differs"):
        gather(world, tmp_path, "fleurs_asr", rows, tmp_path / "out")


def test_gather_refuses_shards_decoded_from_other_manifest_records(world, tmp_path):
    """The gather pairs each row with the record of the same index in the manifests it reads: manifests
    rewritten since the shards ran (here the same utterances in another order, which the shard count and
    the rows' keys cannot tell) stop it with an error naming the shard file, instead of scoring every
    hypothesis against another utterance's reference."""
    rows = [tmp_path / f"shard{k}.json" for k in range(2)]
    for k, path in enumerate(rows):
        evaluate(world, tmp_path, "fleurs_asr", "--shard", str(k), "--num-shards", "2", "--rows", str(path))
    reordered = {**world, "utterances": world["utterances"][::-1]}
    with pytest.raises(SystemExit, match=rf"{re.escape(str(rows[0]))}: inputs is .*changed since this shard"):
        gather(reordered, tmp_path, "fleurs_asr", rows, tmp_path / "out")
    gather(world, tmp_path, "fleurs_asr", rows, tmp_path / "out")  # the manifests as decoded
    assert (tmp_path / "out" / "scores.json").is_file()


def test_a_stopped_shard_resumes_without_redoing_batches_and_ends_identical(
    world, tmp_path, monkeypatch, stop_signals
):
    """SIGTERM in the second batch (Slurm's warning before the time limit): the batch is finished and kept,
    the job exits 75; a kill while a batch was being appended leaves a torn line. The rerun decodes only the
    batches not kept and writes what an uninterrupted job writes."""
    from speechllm.evaluate import system as system_module

    expected = whole(world, tmp_path, "fleurs_asr")
    calls = []
    original = system_module.EvalSystem.generate

    def counted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            stop_signals()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(system_module.EvalSystem, "generate", counted)
    out = tmp_path / "stopped"
    args = ("--hyps", str(out / "hyps.parquet"), "--scores", str(out / "scores.json"))
    with pytest.raises(Preempted) as stopped:
        evaluate(world, tmp_path, "fleurs_asr", *args)
    assert stopped.value.code == PREEMPTED_EXIT and not (out / "hyps.parquet").exists()
    partial = partial_path(out / "hyps.parquet")
    assert len(partial.read_text().splitlines()) == 2  # the batch under way when the signal came is kept
    with partial.open("a") as fh:
        fh.write('{"key": "torn by a ki')
    stopping.reset()  # the retry is a new process
    calls.clear()
    evaluate(world, tmp_path, "fleurs_asr", *args)
    assert len(calls) == 1  # 3 batches, 2 kept
    (df, scores), (want_df, want_scores) = outputs(out), outputs(expected)
    pd.testing.assert_frame_equal(df, want_df, check_exact=True)
    assert scores == want_scores and not partial.exists()


def test_kept_batches_of_other_settings_are_not_reused(tmp_path):
    """The partial file's keys cover the run's fingerprint (model files, decoder, settings) and each batch's
    records: another model or a changed record decodes again."""
    records = [{"id": str(i), "text": f"t{i}"} for i in range(4)]
    current, decoded = records, []

    def decode(batch: list[int]) -> list[dict[str, Any]]:
        decoded.append(batch)
        return [{"out": current[i]["text"].upper()} for i in batch]

    partial = tmp_path / "x.partial.jsonl"
    BatchRunner("model A", partial).run("", records, [[0, 1], [2, 3]], decode, "test")
    runner = BatchRunner("model A", partial)
    runner.run("", records, [[0, 1], [2, 3]], decode, "test")
    assert len(decoded) == 2 and runner.reused == 2 and runner.rows[":3"] == {"out": "T3"}
    BatchRunner("model B", partial).run("", records, [[0, 1], [2, 3]], decode, "test")
    assert len(decoded) == 4
    current = [*records[:3], {"id": "3", "text": "other"}]
    runner = BatchRunner("model A", partial)
    runner.run("", current, [[0, 1], [2, 3]], decode, "test")
    assert len(decoded) == 5 and runner.reused == 1 and runner.rows[":3"] == {"out": "OTHER"}


def test_a_torn_line_does_not_swallow_the_next_kept_batch(tmp_path):
    """A kill mid-write leaves a torn last line in the partial file; the batch appended after it on resume
    stays readable, so a second resume decodes nothing."""
    records = [{"id": str(i), "text": f"t{i}"} for i in range(4)]
    decoded = []

    def decode(batch: list[int]) -> list[dict[str, Any]]:
        decoded.append(batch)
        return [{"out": records[i]["text"].upper()} for i in batch]

    partial = tmp_path / "x.partial.jsonl"
    BatchRunner("model A", partial).run("", records, [[0, 1]], decode, "test")
    with partial.open("a") as fh:
        fh.write('{"key": "to')
    BatchRunner("model A", partial).run("", records, [[0, 1], [2, 3]], decode, "test")
    runner = BatchRunner("model A", partial)
    runner.run("", records, [[0, 1], [2, 3]], decode, "test")
    assert decoded == [[0, 1], [2, 3]] and runner.reused == 2


def test_gather_refuses_a_row_in_two_shards_or_a_shard_outside_the_run(tmp_path):
    """Each record's row comes from exactly one shard: a row that two shard files hold (one copied over
    another, or decoded with another shard count) and a shard number outside 0..N-1 stop the gather with an
    error naming the file, instead of one row silently replacing the other."""
    from speechllm.evaluate.shards import read_shards

    def shard_file(name: str, shard: Any, rows: dict[str, Any]) -> Path:
        path = tmp_path / name
        document = {"benchmark": "b", "shard": shard, "num_shards": 2, "fingerprint": "f", "notes": {}}
        path.write_text(json.dumps({**document, "rows": rows}))
        return path

    first = shard_file("shard0.json", 0, {":0": {"hypothesis": "a"}, ":2": {"hypothesis": "c"}})
    second = shard_file("shard1.json", 1, {":1": {"hypothesis": "b"}})
    rows, _ = read_shards([first, second], {"benchmark": "b"})
    assert sorted(rows) == [":0", ":1", ":2"]
    overlapping = shard_file("overlap.json", 1, {":1": {"hypothesis": "b"}, ":2": {"hypothesis": "other"}})
    with pytest.raises(
        ValueError,
        match=rf"{re.escape(str(overlapping))}: row :2 \(1 rows\) is also in {re.escape(str(first))}",
    ):
        read_shards([first, overlapping], {"benchmark": "b"})
    for shard in (2, -1, None, "1"):
        outside = shard_file("outside.json", shard, {":1": {"hypothesis": "b"}})
        with pytest.raises(
            ValueError, match=rf"{re.escape(str(outside))}: shard .* of 2 is not one of shards 0..N-1"
        ):
            read_shards([first, outside], {"benchmark": "b"})
