"""`kdkit eval RUN_DIR`: re-evaluate a finished run and rewrite metrics.json."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="re-evaluate a finished run, rewrite metrics.json")
    p.add_argument("run_dir")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from kdkit.errors import UserError
    from kdkit.evaluate import comparison_table, print_table
    from kdkit.experiment import evaluate_run

    if not (Path(args.run_dir) / "student").is_dir():
        raise UserError(f"{args.run_dir}: no student/ directory (not a finished kdkit run)")
    metrics = evaluate_run(args.run_dir)
    print_table(comparison_table(metrics), title=args.run_dir)
    return 0
