"""`speechllm report` subcommands: result tables, report figures, the jobs' resource use, W&B results runs and
`wandb sync`"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from speechllm.cliutils import add_command, parse_settings

log = logging.getLogger("speechllm")

TABLE_EPILOG = """example:
  speechllm report table --name fleurs_asr --scores results/eval/fleurs_asr/*.scores.json \\
      --models ctc_init ctc ce_init t mi tmi --out-stem results/tables/fleurs_asr"""
PLOTS_EPILOG = """examples:
  speechllm report plots curves --metrics results/train/ctc/metrics.csv --title ctc --out curves_ctc.png
  speechllm report plots bars --name speechglue --scores results/eval/speechglue/*.scores.json \\
      --models ce_init t mi tmi --out speechglue.png"""
WANDB_EPILOG = (
    "example:\n"
    '  speechllm report wandb --settings \'{"experiment": "demo", "wandb": {"project": '
    '"speechllm", "mode": "offline"},\n'
    '      "model_run": {"name": "demo-ce-t", "job_type": "train_ce"}}\' --system t \\\n'
    "      --scores results/eval/*/t.scores.json --log-dir results/wandb/t --out results/wandb/t.json"
)
RESOURCES_EPILOG = """example:
  speechllm report resources --root logs/benchmark --requests '{"train_ctc": {"mem_mb": 8000, "runtime": 60,
      "threads": 2}}' --out-stem results/resources/usage --plot results/plots/resources.png"""
SYNC_EPILOG = """example (on a node with internet access and WANDB_API_KEY set):
  speechllm report wandb-sync --roots results --out results/wandb/sync.json"""


def cmd_report_table(args: argparse.Namespace) -> None:
    from speechllm.report.tables import build_table, table_footer, write_table

    files = [Path(p) for p in args.scores]
    df = build_table(args.name, files, model_order=args.models)
    paths = write_table(df, Path(args.out_stem), table_footer(args.name, files, model_order=args.models))
    log.info("table %s: %d rows x %d systems -> %s", args.name, *df.shape, ", ".join(map(str, paths)))


def cmd_plot_curves(args: argparse.Namespace) -> None:
    from speechllm.report.plots import plot_learning_curves, read_curves

    path = Path(args.metrics)
    if not path.is_file():
        raise FileNotFoundError(f"training metrics not found: {path}")
    out = plot_learning_curves(read_curves(path), args.title or path.parent.name, Path(args.out), source=path)
    log.info("learning curves of %s -> %s", path, out)


def cmd_plot_bars(args: argparse.Namespace) -> None:
    from speechllm.report.plots import plot_benchmark

    out = plot_benchmark(args.name, [Path(p) for p in args.scores], Path(args.out), model_order=args.models)
    log.info("%s bars -> %s", args.name, out)


def cmd_report_resources(args: argparse.Namespace) -> None:
    from speechllm.report.resources import write_usage

    root = Path(args.root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no benchmark directory (the rules' `benchmark:` files)")
    summary = write_usage(root, parse_settings(args.requests), Path(args.out_stem), Path(args.plot))
    log.info(
        "resource use of %d rules (%d jobs) -> %s.{csv,md,jobs.csv}, %s",
        len(summary),
        int(summary.jobs.sum()),
        args.out_stem,
        args.plot,
    )


def cmd_report_wandb(args: argparse.Namespace) -> None:
    from speechllm.io import atomic_write_text
    from speechllm.report.settings import WandbResultsSettings
    from speechllm.report.wandb_runs import log_system_results

    settings = WandbResultsSettings.from_settings(parse_settings(args.settings))
    record = log_system_results(
        settings,
        args.system,
        [Path(p) for p in args.scores],
        Path(args.log_dir),
        Path(args.train_summary) if args.train_summary else None,
    )
    atomic_write_text(Path(args.out), json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    log.info(
        "W&B results run %s (%s): %d summary metrics, tables %s",
        record["run"]["name"],
        record["run"]["mode"],
        len(record["summary"]),
        sorted(record["tables"]),
    )


def cmd_wandb_sync(args: argparse.Namespace) -> None:
    from speechllm.io import atomic_write_text
    from speechllm.report.wandb_runs import SyncError, sync_offline_runs

    try:
        synced = sync_offline_runs([Path(r) for r in args.roots], args.wandb_bin, args.resync)
    except SyncError as err:
        raise SystemExit(f"speechllm report wandb-sync: error: {err}") from err
    atomic_write_text(Path(args.out), json.dumps(synced, indent=2) + "\n")
    log.info(
        "wandb sync: %d run directories (%d newly synced)",
        len(synced),
        sum(r["status"] == "synced" for r in synced),
    )


def register(sub: argparse._SubParsersAction) -> None:
    rep = add_command(sub, "report", "result tables, report figures, W&B results runs")
    rsub = rep.add_subparsers(dest="action", required=True)

    r = add_command(rsub, "table", "one table as .md, .csv and .tex", cmd_report_table, epilog=TABLE_EPILOG)
    r.add_argument(
        "--name",
        required=True,
        help="fleurs_asr | fleurs_st | covost2_st | speechglue | speechxnli | summarization",
    )
    r.add_argument("--scores", nargs="+", required=True, help="score files (JSON), one per system")
    r.add_argument("--models", nargs="+", required=True, help="column order (systems)")
    r.add_argument("--out-stem", required=True, help="writes <stem>.md, <stem>.csv and <stem>.tex")

    plots = add_command(rsub, "plots", "report figures (PNG)", epilog=PLOTS_EPILOG)
    psub = plots.add_subparsers(dest="plot", required=True)
    p = add_command(
        psub,
        "curves",
        "learning curves (loss, lr, dev metrics) from a training metrics.csv",
        cmd_plot_curves,
        epilog=PLOTS_EPILOG,
    )
    p.add_argument("--metrics", required=True, help="results/train/<model>/metrics.csv")
    p.add_argument("--title", help="model name shown in the title (default: the metrics file's directory)")
    p.add_argument("--out", required=True)
    p = add_command(
        psub,
        "bars",
        "per-language / per-task bars of one benchmark, one bar per system",
        cmd_plot_bars,
        epilog=PLOTS_EPILOG,
    )
    p.add_argument("--name", required=True, help="benchmark (as for `report table`)")
    p.add_argument("--scores", nargs="+", required=True)
    p.add_argument("--models", nargs="+", help="bar order (systems)")
    p.add_argument("--out", required=True)

    u = add_command(
        rsub,
        "resources",
        "wall time, memory and CPU of every rule's jobs against their request",
        cmd_report_resources,
        epilog=RESOURCES_EPILOG,
    )
    u.add_argument("--root", required=True, help="the benchmark files: <root>/<rule>/<job>.tsv")
    u.add_argument("--requests", required=True, help="JSON: rule -> {mem_mb, runtime (minutes), threads}")
    u.add_argument(
        "--out-stem", required=True, help="writes <stem>.csv, <stem>.md (per rule), <stem>.jobs.csv"
    )
    u.add_argument("--plot", required=True, help="the figure (PNG)")

    w = add_command(
        rsub,
        "wandb",
        "log a system's tables and summary metrics to its W&B results run",
        cmd_report_wandb,
        epilog=WANDB_EPILOG,
    )
    w.add_argument("--settings", required=True, help="JSON: experiment, wandb, model_run, model_dir, decoder")
    w.add_argument("--system", required=True)
    w.add_argument("--scores", nargs="+", required=True, help="the system's score files, one per benchmark")
    w.add_argument("--train-summary", help="summary.json of the scored model's training run, if trained")
    w.add_argument("--log-dir", required=True, help="the run's files (W&B writes under <log-dir>/wandb)")
    w.add_argument("--out", required=True, help="JSON record of what was logged")

    s = add_command(
        rsub, "wandb-sync", "upload offline W&B runs (`wandb sync`)", cmd_wandb_sync, epilog=SYNC_EPILOG
    )
    s.add_argument("--roots", nargs="+", required=True, help="directories searched for wandb/offline-run-*")
    s.add_argument("--out", required=True, help="JSON list of the run directories and their status")
    s.add_argument("--wandb-bin", default="wandb", help="the wandb command")
    s.add_argument("--resync", action="store_true", help="also sync directories synced before")
