"""The report's resource view: every rule writes a Snakemake benchmark file, and `speechllm report resources`
sets each rule's measured wall time, memory and CPU against its request (report/resources.py, rule
resource_usage)."""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from speechllm.cli import main
from speechllm.report.resources import BenchmarkError, read_benchmark

REPO = Path(__file__).resolve().parents[1]
HEADER = "s\th:m:s\tmax_rss\tmax_vms\tmax_uss\tmax_pss\tio_in\tio_out\tmean_load\tcpu_time\n"


def bench(path: Path, seconds: float, rss: float, cpu: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEADER + f"{seconds:.2f}\t0:00:00\t{rss:.2f}\t0\t0\t0\t0\t0\t0\t{cpu:.2f}\n")


def test_usage_per_rule_against_its_request(tmp_path):
    root = tmp_path / "logs/benchmark"
    bench(root / "evaluate/fleurs_asr/t.tsv", 1800, 6000, 1700)
    bench(root / "evaluate/speechglue/t.tsv", 600, 7000, 500)
    bench(root / "train_ctc.tsv", 3000, 9000, 5900)
    bench(root / "language_ids.tsv", 0.1, 0, 0.05)  # done before Snakemake's first sample: no memory figure
    requests = {
        "evaluate": {"mem_mb": 8000, "runtime": 60, "threads": 1},
        "train_ctc": {"mem_mb": 8000, "runtime": 60, "threads": 2},
    }
    stem = tmp_path / "results/resources/usage"
    main(
        [
            "report",
            "resources",
            "--root",
            str(root),
            "--requests",
            json.dumps(requests),
            "--out-stem",
            str(stem),
            "--plot",
            str(tmp_path / "usage.png"),
        ]
    )
    summary = pd.read_csv(f"{stem}.csv").set_index("rule")
    assert list(summary.index) == ["evaluate", "language_ids", "train_ctc"]
    evaluate, train = summary.loc["evaluate"], summary.loc["train_ctc"]
    assert (evaluate.jobs, evaluate.wall_max, evaluate.wall_total) == (2, "0:30:00", "0:40:00")
    assert evaluate.time_used_pct == 50.0 and evaluate.max_rss_mb == 7000 and evaluate.mem_used_pct == 87.5
    assert evaluate.busy_cores == pytest.approx(2200 / 2400, abs=0.01)
    # Over its request: the job was retried with more (or is about to be killed on a larger input).
    assert train.mem_used_pct == 112.5 and train.time_used_pct > 83 and train.busy_cores > 1.9
    unmeasured = summary.loc["language_ids"]
    assert math.isnan(unmeasured.max_rss_mb) and math.isnan(unmeasured.mem_mb)  # no figure, no request given
    jobs = pd.read_csv(f"{stem}.jobs.csv")
    assert list(jobs.job) == ["evaluate/fleurs_asr/t", "evaluate/speechglue/t", "language_ids", "train_ctc"]
    markdown = Path(f"{stem}.md").read_text()
    assert (
        markdown.splitlines()[0].startswith("| rule | jobs | wall_max |")
        and "| evaluate | 2 | 0:30:00 |" in markdown
    )
    assert (tmp_path / "usage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_broken_benchmark_file_is_named(tmp_path):
    broken = tmp_path / "table" / "x.tsv"
    broken.parent.mkdir()
    broken.write_text("not\ta benchmark\n")
    with pytest.raises(BenchmarkError, match=f"{broken}: not a Snakemake benchmark file"):
        read_benchmark(broken)


@pytest.mark.parametrize(
    "configs", [(), ("config/experiments/bloomzmms.yaml",), ("config/experiments/speech_summarization.yaml",)]
)
def test_every_job_writes_a_benchmark_and_the_view_knows_each_request(tmp_path, configs):
    """Every rule of each DAG (demo, paper scale, summarization) has `logs/benchmark/<rule>/...`, and the view
    is told each rule's first-attempt request (here: as the config and the rule files state it)."""
    files = [str(REPO / "config/config.yaml"), *(str(REPO / c) for c in configs)]
    res = subprocess.run(
        [
            str(Path(sys.executable).parent / "snakemake"),
            "-s",
            str(REPO / "Snakefile"),
            "-n",
            "-p",
            "-c",
            "64",
            "-d",
            str(tmp_path),
            "--configfile",
            *files,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    blocks = [
        b for b in re.split(r"\n(?=(?:local)?rule \w+:\n)", res.stdout) if re.match(r"(?:local)?rule \w+:", b)
    ]
    for block in blocks:
        rule = re.match(r"(?:local)?rule (\w+):", block).group(1)
        if rule == "all":
            continue
        assert re.search(rf"^ +benchmark: logs/benchmark/{rule}[/.]", block, re.M), block[:600]
    command = re.search(r"^Shell command: (speechllm report resources .*)$", res.stdout, re.M).group(1)
    words = shlex.split(command)
    requests = json.loads(words[words.index("--requests") + 1])
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())["resources"]
    for extra in configs:
        config.update(
            {k: v for k, v in yaml.safe_load((REPO / extra).read_text())["resources"].items() if k != "rules"}
        )
    trained = "train_kd" if "summarization" in "".join(configs) else "train_ctc"
    assert (
        requests[trained]["mem_mb"] >= config["mem_mb"] and requests[trained]["runtime"] == config["runtime"]
    )
    assert requests["table"] == {"mem_mb": 1000, "runtime": 10, "threads": 1}
