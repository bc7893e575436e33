"""`speechllm report` subcommands: result tables"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger("speechllm")


def cmd_report_table(args: argparse.Namespace) -> None:
    from speechllm.report.tables import build_table, table_footer, write_table

    files = [Path(p) for p in args.scores]
    df = build_table(args.name, files, model_order=args.models)
    write_table(df, Path(args.out_stem), table_footer(args.name, files, model_order=args.models))


def register(sub: argparse._SubParsersAction) -> None:
    rep = sub.add_parser("report", help="result tables")
    rsub = rep.add_subparsers(dest="action", required=True)
    r = rsub.add_parser("table", help="one table as .md, .csv and .tex")
    r.add_argument("--name", required=True)
    r.add_argument("--scores", nargs="+", required=True)
    r.add_argument("--models", nargs="+", required=True)
    r.add_argument("--out-stem", required=True)
    r.set_defaults(func=cmd_report_table)
