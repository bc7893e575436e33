"""Checks for result tables and atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from speechllm.io import (
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    drop_torn_tail,
    read_json,
)
from speechllm.report.tables import build_table, order_models, table_footer, write_table

ORDER = ["init", "ctc", "t", "mi", "tmi"]
VERSIONS = {
    "normalizer": "transformers==5.23.0 BasicTextNormalizer",
    "sacrebleu": "2.6.0",
    "speechllm": "0.1.0",
}
BLEU_SIG = "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0"


def _score_file(tmp_path: Path, benchmark: str, model: str, metrics: dict[str, Any]) -> Path:
    """Write a synthetic score file and return its path."""
    path = tmp_path / "scores" / benchmark / f"{model}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "benchmark": benchmark,
        "model": model,
        "decoder": model,
        "checkpoint": f"results/models/{model}",
        "experiment": "demo",
        "metrics": metrics,
        "versions": VERSIONS,
    }
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _asr_metrics(offset: float) -> dict[str, Any]:
    """ASR metrics for three languages, one of them scored by CER."""
    return {
        "all": {"cer": 0.30 + offset, "wer": 0.60 + offset},
        "per_language": {
            "de_de": {"cer": 0.10 + offset, "wer": 0.25 + offset, "num_utts": 10},
            "cmn_hans_cn": {"cer": 0.41 + offset, "wer": 0.99, "num_utts": 10},
            "af_za": {"cer": 0.20 + offset, "wer": 0.50 + offset, "num_utts": 10},
        },
    }


@pytest.fixture
def asr_files(tmp_path: Path) -> list[Path]:
    return [
        _score_file(tmp_path, "fleurs_asr", "tmi", _asr_metrics(0.0)),
        _score_file(tmp_path, "fleurs_asr", "ctc", _asr_metrics(0.1)),
        _score_file(tmp_path, "fleurs_asr", "init", _asr_metrics(0.2)),
    ]


def test_fleurs_asr_table(asr_files: list[Path]) -> None:
    table = build_table("fleurs_asr", asr_files, ORDER)
    assert list(table.columns) == ["init", "ctc", "tmi"]
    assert list(table.index) == [
        ("af_za", "wer"),
        ("cmn_hans_cn", "cer"),
        ("de_de", "wer"),
        ("all", "cer"),
        ("all", "wer"),
    ]
    assert table.index.names == ["language", "metric"]
    assert table.loc[("cmn_hans_cn", "cer"), "tmi"] == pytest.approx(41.0)
    assert table.loc[("de_de", "wer"), "ctc"] == pytest.approx(35.0)
    assert table.loc[("all", "wer"), "init"] == pytest.approx(80.0)


def test_models_outside_order_are_appended(tmp_path: Path, asr_files: list[Path]) -> None:
    extra = _score_file(tmp_path, "fleurs_asr", "baseline", _asr_metrics(0.0))
    table = build_table("fleurs_asr", [*asr_files, extra], ORDER)
    assert list(table.columns) == ["init", "ctc", "tmi", "baseline"]
    assert order_models(["b", "a"], None) == ["a", "b"]


def test_bad_inputs_raise(tmp_path: Path, asr_files: list[Path]) -> None:
    with pytest.raises(ValueError, match="unknown table"):
        build_table("librispeech", asr_files)
    with pytest.raises(ValueError, match="benchmark 'fleurs_asr'"):
        build_table("fleurs_st", asr_files)
    duplicate = _score_file(tmp_path / "other", "fleurs_asr", "ctc", _asr_metrics(0.0))
    with pytest.raises(ValueError, match="model 'ctc'"):
        build_table("fleurs_asr", [*asr_files, duplicate])


def test_fleurs_st_table_and_signature_footer(tmp_path: Path) -> None:
    def metrics(bleu: float) -> dict[str, Any]:
        entry = {"bleu": bleu, "chrf": bleu + 20, "bleu_signature": BLEU_SIG, "normalized": "both"}
        return {"all": entry, "per_language": {"de_de": entry, "fr_fr": {**entry, "bleu": bleu + 1}}}

    files = [_score_file(tmp_path, "fleurs_st", m, metrics(b)) for m, b in [("t", 10.0), ("mi", 12.5)]]
    table = build_table("fleurs_st", files, ORDER)
    assert table.shape == (6, 2)
    assert list(table.columns) == ["t", "mi"]
    assert table.loc[("fr_fr", "bleu"), "mi"] == pytest.approx(13.5)  # BLEU is not rescaled
    assert table.loc[("all", "chrf"), "t"] == pytest.approx(30.0)
    footer = table_footer("fleurs_st", files, ORDER)
    assert footer.count(BLEU_SIG) == 2  # once per model, deduplicated across languages
    # which sides were normalised (evaluate.st_normalize) changes BLEU: each model's line says it
    assert footer.count("normalized: both") == 2


def test_speechglue_table_rows_and_averages(tmp_path: Path) -> None:
    per_task = {
        "wnli": {"accuracy": 0.1},
        "sst2": {"accuracy": 0.8},
        "cola": {"matthews_correlation": 0.2},
        "mrpc": {"accuracy": 0.6, "f1": 0.7},
    }
    recorded = _score_file(
        tmp_path, "speechglue", "tmi", {"per_task": per_task, "average": 0.5, "average_without_wnli": 0.9}
    )
    computed = _score_file(tmp_path, "speechglue", "t", {"per_task": per_task})
    table = build_table("speechglue", [recorded, computed], ORDER)
    assert [row for row, _ in table.index] == [
        "cola",
        "sst2",
        "mrpc",
        "wnli",
        "average",
        "average_without_wnli",
    ]
    assert table.index.names == ["task", "metric"]
    assert table.loc[("cola", "matthews_correlation"), "t"] == pytest.approx(20.0)
    assert table.loc[("average", "primary"), "tmi"] == pytest.approx(50.0)
    assert table.loc[("average", "primary"), "t"] == pytest.approx(100 * (0.1 + 0.8 + 0.2 + 0.6) / 4)
    assert table.loc[("average_without_wnli", "primary"), "t"] == pytest.approx(100 * (0.8 + 0.2 + 0.6) / 3)


def test_asr_footer_names_the_edit_alignment(tmp_path: Path) -> None:
    """Score files record evaluate.asr_alignment as `alignment`; the footer says which one a model's CER/WER
    counted."""
    metrics = _asr_metrics(0.0)
    metrics["all"]["alignment"] = "sclite"
    for scores in metrics["per_language"].values():
        scores["alignment"] = "sclite"
    files = [_score_file(tmp_path, "fleurs_asr", "tmi", metrics)]
    footer = table_footer("fleurs_asr", files, ORDER)
    assert footer.count("alignment: sclite") == 1


def test_speechxnli_table(tmp_path: Path) -> None:
    metrics = {"per_language": {"sw": {"accuracy": 0.4}, "ar": {"accuracy": 0.5}}, "all": {"accuracy": 0.45}}
    partial = {"per_language": {"ar": {"accuracy": 0.3}}}
    files = [
        _score_file(tmp_path, "speechxnli", "ctc", metrics),
        _score_file(tmp_path, "speechxnli", "mi", partial),
    ]
    table = build_table("speechxnli", files, ORDER)
    assert list(table.index) == [("ar", "accuracy"), ("sw", "accuracy"), ("mean", "accuracy")]
    assert table.loc[("mean", "accuracy"), "ctc"] == pytest.approx(45.0)
    assert pd.isna(table.loc[("sw", "accuracy"), "mi"])


def test_write_table_files_and_footer(tmp_path: Path, asr_files: list[Path]) -> None:
    table = build_table("fleurs_asr", asr_files, ORDER)
    footer = table_footer("fleurs_asr", asr_files, ORDER)
    paths = write_table(table, tmp_path / "tables" / "fleurs_asr.v1", footer)
    assert [p.name for p in paths] == ["fleurs_asr.v1.md", "fleurs_asr.v1.csv", "fleurs_asr.v1.tex"]
    markdown = paths[0].read_text(encoding="utf-8")
    assert "| language" in markdown and "cmn_hans_cn" in markdown and "41.00" in markdown
    for needle in (
        "experiment=demo",
        "checkpoint=results/models/ctc",
        VERSIONS["normalizer"],
        "sacrebleu=2.6.0",
    ):
        assert needle in markdown
    assert markdown.index("- init:") < markdown.index("- ctc:") < markdown.index("- tmi:")
    csv = pd.read_csv(paths[1])
    assert list(csv.columns) == ["language", "metric", "init", "ctc", "tmi"]
    assert csv.shape == (5, 5)
    latex = paths[2].read_text(encoding="utf-8")
    assert r"cmn\_hans\_cn" in latex and r"\begin{tabular}" in latex
    assert "% - ctc: experiment=demo" in latex
    assert sorted(p.name for p in paths[0].parent.iterdir()) == sorted(p.name for p in paths)


def test_write_table_nan_and_escaping(tmp_path: Path) -> None:
    index = pd.MultiIndex.from_tuples([("de_de", "wer"), ("all", "wer")], names=["language", "metric"])
    table = pd.DataFrame({"t_mi": [12.345, float("nan")], "a&b": [1.0, 2.0]}, index=index)
    md, _, tex = write_table(table, tmp_path / "x", "footer line")
    all_row = next(line for line in md.read_text(encoding="utf-8").splitlines() if line.startswith("| all"))
    assert [cell.strip() for cell in all_row.strip("|").split("|")] == ["all", "wer", "--", "2.00"]
    latex = tex.read_text(encoding="utf-8")
    assert r"t\_mi" in latex and r"a\&b" in latex and "--" in latex and "12.35" in latex


def test_failed_render_writes_nothing(
    tmp_path: Path, asr_files: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    table = build_table("fleurs_asr", asr_files, ORDER)

    def boom(*args: Any, **kwargs: Any) -> str:
        raise RuntimeError("latex failed")

    monkeypatch.setattr(pd.DataFrame, "to_latex", boom)
    out = tmp_path / "tables"
    out.mkdir()
    with pytest.raises(RuntimeError, match="latex failed"):
        write_table(table, out / "fleurs_asr", "footer")
    assert list(out.iterdir()) == []


def test_atomic_path_failure_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "out" / "scores.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".json") and tmp != target
        tmp.write_text("partial")
        raise RuntimeError("writer crashed")
    assert list(target.parent.iterdir()) == []


def test_atomic_failure_keeps_previous_content(tmp_path: Path) -> None:
    target = tmp_path / "table.md"
    atomic_write_text(target, "old\n")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("new")
        raise RuntimeError
    assert target.read_text() == "old\n"
    assert list(tmp_path.iterdir()) == [target]


def test_no_space_left_names_the_file_and_directory_being_written(tmp_path: Path, monkeypatch) -> None:
    import errno

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "results" / "scores.json"
    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(
        OSError, match=f"No space left on device while writing {target}; free space there"
    ) as err:
        atomic_write_text(target, "{}")
    assert err.value.errno == errno.ENOSPC and list(target.parent.iterdir()) == []
    monkeypatch.undo()
    with pytest.raises(OSError, match=f"while writing {tmp_path / 'model'}"), atomic_dir(tmp_path / "model"):
        raise OSError(errno.ENOSPC, "No space left on device")
    with (
        pytest.raises(FileNotFoundError, match="missing.txt"),
        atomic_path(target),
    ):  # errors that name a file
        (tmp_path / "missing.txt").read_text()


SAFETENSORS_PAST_LIMIT = """
import resource, signal, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from speechllm.io import atomic_dir

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
try:
    with atomic_dir(Path(sys.argv[1])) as tmp:  # as models.export.save_model_dir writes a model
        save_file({"w": torch.zeros(64 * 1024)}, str(tmp / "model.safetensors"))
except OSError as err:
    print(type(err).__name__, err.errno, err)
"""


def test_a_real_failed_safetensors_write_names_the_directory(tmp_path: Path) -> None:
    """safetensors reports a refused write as its own error type with "(os error N)" in the message; the
    atomic directory restates it as that OSError naming the directory, and leaves nothing behind."""
    import errno
    import subprocess
    import sys

    target = tmp_path / "model"
    done = subprocess.run(
        [sys.executable, "-c", SAFETENSORS_PAST_LIMIT, str(target)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        done.stdout.strip()
        == f"OSError {errno.EFBIG} [Errno {errno.EFBIG}] File too large while writing {target}"
    )
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_replace_and_set_mode(tmp_path: Path) -> None:
    target = tmp_path / "data.bin"
    atomic_write_bytes(target, b"\x00\x01")
    atomic_write_bytes(target, b"\x02")
    assert target.read_bytes() == b"\x02"
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    atomic_write_text(tmp_path / "t.txt", "ü\r\n")
    assert (tmp_path / "t.txt").read_bytes() == "ü\r\n".encode()


def test_atomic_dir_replaces_a_directory_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and not target.exists()
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "weights").write_text("half of v2")
        raise RuntimeError("killed while saving")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (target / "weights").read_text() == "v1"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v2")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and [p.name for p in target.iterdir()] == [
        "weights"
    ]
    assert (target / "weights").read_text() == "v2"


def test_atomic_dir_flushes_every_file_before_it_appears(tmp_path: Path, monkeypatch) -> None:
    """A crash right after the rename must not leave a model directory whose files lost their data: every
    file and folder inside is fsynced before the rename (links are not followed), the parent after it."""
    import speechllm.io

    flushed: list[str] = []
    monkeypatch.setattr(speechllm.io, "fsync_path", lambda path: flushed.append(str(path)))
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "encoder").mkdir()
        (tmp / "encoder" / "weights").write_text("w")
        (tmp / "spec.json").write_text("{}")
        (tmp / "link").symlink_to(tmp_path)
    inside = [str(Path(p).relative_to(tmp)) for p in flushed[:-1]]
    assert sorted(inside) == [".", "encoder", "encoder/weights", "spec.json"]
    assert flushed[-1] == str(tmp_path)


def test_summarization_table_reads_summary_and_perplexity_files(tmp_path: Path) -> None:
    """The evaluation writes ROUGE/METEOR/BERTScore (`summarization`) and perplexity (`response_ppl`) to two
    score files."""
    files = []
    for model, rouge, meteor in (("text", 0.40, 0.30), ("cascade", 0.30, None)):
        skipped = {"meteor_skipped": "nltk WordNet data not found"} if meteor is None else {}
        bert = (
            {
                "bertscore_precision": 0.8,
                "bertscore_recall": 0.7,
                "bertscore_f1": 0.75,
                "bertscore_signature": "roberta-large_L17_no-idf",
            }
            if meteor
            else {"bertscore_f1": None, "bertscore_skipped": "no scoring model"}
        )
        files.append(
            _score_file(
                tmp_path,
                "summarization",
                model,
                {
                    "all": {
                        "rouge1": rouge,
                        "rouge2": rouge / 2,
                        "rougeL": rouge - 0.1,
                        "rougeLsum": rouge,
                        "meteor": meteor,
                        "num_docs": 3,
                        **skipped,
                        **bert,
                    }
                },
            )
        )
        files.append(
            _score_file(
                tmp_path / "ppl",
                "response_ppl",
                model,
                {
                    "per_subset": {
                        "test.clean": {"ppl": 3.5, "num_utts": 4},
                        "test.other": {"ppl": 5.0, "num_utts": 4},
                    },
                    "all": {"ppl": 4.2, "ppl_token": 4.0},
                },
            )
        )
    table = build_table("summarization", files, ["text", "cascade"])
    assert list(table.columns) == ["text", "cascade"]
    assert list(table.index) == [
        ("articles", "ROUGE-1"),
        ("articles", "ROUGE-2"),
        ("articles", "ROUGE-L"),
        ("articles", "METEOR"),
        ("articles", "BERTScore-P"),
        ("articles", "BERTScore-R"),
        ("articles", "BERTScore-F1"),
        ("test.clean", "perplexity"),
        ("test.other", "perplexity"),
        ("all", "perplexity"),
    ]
    assert table.loc[("articles", "BERTScore-F1"), "text"] == pytest.approx(75.0)
    assert pd.isna(table.loc[("articles", "BERTScore-F1"), "cascade"])
    assert table.loc[("articles", "ROUGE-1"), "text"] == pytest.approx(40.0)
    assert table.loc[("articles", "ROUGE-L"), "cascade"] == pytest.approx(20.0)
    assert pd.isna(table.loc[("articles", "METEOR"), "cascade"])
    assert table.loc[("all", "perplexity"), "cascade"] == pytest.approx(4.2)  # the paper's ppl, not ppl_token
    footer = table_footer("summarization", files, ["text", "cascade"])
    assert (
        footer.index("- text (summarization):")
        < footer.index("- text (response_ppl):")
        < footer.index("- cascade (summarization):")
    )
    assert "meteor_skipped: nltk WordNet data not found" in footer
    assert "bertscore_signature: roberta-large_L17_no-idf" in footer and "bertscore_skipped" in footer
    md, _, _ = write_table(table, tmp_path / "tables" / "summarization", footer)
    assert "| articles | METEOR" in md.read_text(encoding="utf-8").replace("  ", " ").replace("  ", " ")
    with pytest.raises(ValueError, match="model 'text' in both"):
        build_table("summarization", [*files, _score_file(tmp_path / "again", "summarization", "text", {})])


def test_summarization_table_in_the_agreed_single_file_format(tmp_path: Path) -> None:
    path = _score_file(
        tmp_path,
        "summarization",
        "kang_roy",
        {
            "rouge1": 0.5,
            "rouge2": 0.2,
            "rougeL": 0.4,
            "meteor": 0.3,
            "perplexity": {"test.clean": 3.0, "all": 3.2},
        },
    )
    table = build_table("summarization", [path])
    assert table["kang_roy"].round(6).to_dict() == {
        ("articles", "ROUGE-1"): 50.0,
        ("articles", "ROUGE-2"): 20.0,
        ("articles", "ROUGE-L"): 40.0,
        ("articles", "METEOR"): 30.0,
        ("test.clean", "perplexity"): 3.0,
        ("all", "perplexity"): 3.2,
    }
    assert build_table(
        "summarization", [_score_file(tmp_path / "b", "summarization", "t", {"perplexity": 2.5})]
    ).loc[("all", "perplexity"), "t"] == pytest.approx(2.5)


def test_covost2_table_and_malformed_metrics_name_the_file(tmp_path: Path) -> None:
    entry = {"bleu": 20.0, "chrf": 45.0}
    path = _score_file(
        tmp_path, "covost2_st", "tmi", {"all": entry, "per_language": {"de": entry, "fr": entry}}
    )
    table = build_table("covost2_st", [path])
    assert list(table.index) == [
        ("de", "bleu"),
        ("de", "chrf"),
        ("fr", "bleu"),
        ("fr", "chrf"),
        ("all", "bleu"),
        ("all", "chrf"),
    ]
    bad = _score_file(tmp_path / "bad", "speechxnli", "t", {"per_language": {"en": {"accuracy": "n/a"}}})
    with pytest.raises(ValueError, match=f"{bad}: malformed speechxnli metrics"):
        build_table("speechxnli", [bad])
    # A GLUE task without its primary metric (the averages need it), and a file that is no JSON object.
    no_primary = _score_file(tmp_path / "glue", "speechglue", "t", {"per_task": {"cola": {"accuracy": 0.5}}})
    with pytest.raises(ValueError, match=f"{no_primary}: malformed speechglue metrics: no 'matthews_corr"):
        build_table("speechglue", [no_primary])
    number = tmp_path / "number.json"
    number.write_text("5", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{number}: not a score file"):
        build_table("speechglue", [number])


def test_read_json_errors_name_the_file(tmp_path):
    good = tmp_path / "scores.json"
    good.write_text('{"a": 1}')
    assert read_json(good) == {"a": 1}
    (tmp_path / "torn.json").write_text('{"benchmark": "fleurs_asr", "metr')
    with pytest.raises(ValueError, match=r"torn\.json: not valid JSON"):
        read_json(tmp_path / "torn.json")
    with pytest.raises(FileNotFoundError, match=r"absent\.json: no such file"):
        read_json(tmp_path / "absent.json")


@pytest.mark.parametrize(
    ("content", "kept"),
    [
        (b"", b""),
        (b"torn", b""),
        (b"a\n", b"a\n"),
        (b"a\nbcdefghijk", b"a\n"),
        (b"aaaaaaaaaa\nbb\ncccccccccccc", b"aaaaaaaaaa\nbb\n"),
    ],
)
def test_drop_torn_tail_keeps_complete_lines_only(tmp_path, monkeypatch, content, kept):
    """Scanning back in blocks smaller than the torn line still finds the last complete line."""
    monkeypatch.setattr("speechllm.io.CHUNK", 4)
    path = tmp_path / "x.partial.jsonl"
    path.write_bytes(content)
    drop_torn_tail(path)
    assert path.read_bytes() == kept
    drop_torn_tail(tmp_path / "absent.jsonl")  # nothing to cut
