"""`kdkit report RUN_DIR`: rewrite report.md and its plots from the run's files."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="rewrite report.md and plots from a run directory")
    p.add_argument("run_dir")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kdkit.report import write_report

    print(f"report: {write_report(args.run_dir)}")
    return 0
