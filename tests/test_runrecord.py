"""Run records: a job's settings and command line next to its log, and `speechllm rerun` from them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from speechllm import cli, runrecord
from speechllm.data.manifest import read_manifest, write_manifest

SR = 16000


def prepare_settings(max_duration: float) -> dict:
    return {
        "sampling_rate": SR,
        "min_duration": 0.1,
        "max_duration": max_duration,
        "speed_perturb": [1.0],
        "on_bad_audio": "error",
        "filter_durations": True,
    }


@pytest.fixture
def raw_manifest(tmp_path: Path) -> Path:
    """Two clips, 1 s and 3 s, in a raw manifest."""
    rows = []
    for uid, seconds in (("short", 1.0), ("long", 3.0)):
        path = tmp_path / f"{uid}.wav"
        sf.write(str(path), 0.1 * np.ones(int(seconds * SR), dtype=np.float32), SR)
        rows.append(
            {
                "id": uid,
                "language": "en_us",
                "audio": str(path),
                "num_samples": int(seconds * SR),
                "sampling_rate": SR,
                "raw_transcription": "Hello there.",
            }
        )
    manifest = tmp_path / "raw.jsonl"
    write_manifest(manifest, rows)
    return manifest


def test_record_path_sits_next_to_the_log() -> None:
    assert runrecord.record_path("logs/eval/fleurs_asr/ctc.shard0.log") == Path(
        "logs/eval/fleurs_asr/ctc.shard0.run.json"
    )
    assert runrecord.record_path("logs/x") == Path("logs/x.run.json")


def test_a_job_records_its_settings_and_rerun_repeats_it(
    raw_manifest: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RANK", raising=False)
    argv = [
        "data",
        "prepare",
        "--settings",
        json.dumps(prepare_settings(30.0)),
        "--manifest",
        str(raw_manifest),
        "--out",
        "out/train.jsonl",
        "--report",
        "out/report.json",
        "--record",
        "logs/prepare.log",
    ]
    cli.main(argv)
    record = json.loads((tmp_path / "logs/prepare.run.json").read_text())
    assert record["settings"] == prepare_settings(30.0)
    assert "--record" not in record["argv"] and record["cwd"] == str(tmp_path)
    assert record["command"].startswith("speechllm data prepare --settings ")
    first = (tmp_path / "out/train.jsonl").read_bytes()
    assert [r["id"] for r in read_manifest(tmp_path / "out/train.jsonl")] == ["short", "long"]

    # By hand, from anywhere: the same step in the recorded directory gives the same output.
    (tmp_path / "out/train.jsonl").unlink()
    monkeypatch.chdir("/")
    cli.main(["rerun", str(tmp_path / "logs/prepare.run.json")])
    assert (tmp_path / "out/train.jsonl").read_bytes() == first

    # A setting edited in the record is the setting the rerun uses: max_duration 2 s drops the 3 s clip.
    record["settings"]["max_duration"] = 2.0
    (tmp_path / "logs/prepare.run.json").write_text(json.dumps(record))
    cli.main(["rerun", str(tmp_path / "logs/prepare.run.json")])
    assert [r["id"] for r in read_manifest(tmp_path / "out/train.jsonl")] == ["short"]
    assert not (tmp_path / "logs").joinpath("prepare.log").exists()  # the rerun writes no record of its own


def test_rerun_print_shows_the_command_with_its_directory(tmp_path: Path, capsys) -> None:
    path = tmp_path / "job.run.json"
    path.write_text(
        json.dumps(
            {
                "argv": ["data", "language-ids", "--manifests", "a b.jsonl", "--out", "l.json"],
                "cwd": "/work/run",
                "settings": None,
            }
        )
    )
    cli.main(["rerun", "--print", str(path)])
    assert capsys.readouterr().out.strip() == (
        "cd /work/run && speechllm data language-ids --manifests 'a b.jsonl' --out l.json"
    )


def test_only_rank_zero_writes_a_record(raw_manifest: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "1")
    cli.main(
        [
            "data",
            "language-ids",
            "--manifests",
            str(raw_manifest),
            "--out",
            "lid.json",
            "--record",
            "logs/lid.log",
        ]
    )
    assert (tmp_path / "lid.json").exists() and not (tmp_path / "logs/lid.run.json").exists()


def test_a_file_that_is_not_a_record_is_named(tmp_path: Path) -> None:
    path = tmp_path / "x.run.json"
    path.write_text("[1, 2]")
    with pytest.raises(SystemExit, match=r"x\.run\.json: not a run record"):
        cli.main(["rerun", str(path)])


def test_a_record_that_cannot_be_written_ends_in_one_line_naming_the_step(tmp_path: Path) -> None:
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the log directory should be")
    with pytest.raises(SystemExit, match=r"^speechllm plan: failed: FileExistsError: .*logs"):
        cli.main(["plan", "--config", "config/config.yaml", "--record", str(blocker / "plan.log")])


def test_every_rule_records_its_job() -> None:
    """Each rule that runs `speechllm` passes its log to `--record` (so every job can be rerun by hand)."""
    rules = Path(__file__).resolve().parents[1] / "rules"
    for smk in sorted(rules.glob("*.smk")):
        text = smk.read_text()
        assert text.count("> {log} 2>&1") == text.count("--record {log} > {log} 2>&1"), smk.name
