"""`kdkit train CONFIG.yaml [dotted.key=value ...]`: train (with or without a teacher) into a run directory."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a student (with or without a teacher); writes a run directory")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="config overrides, e.g. train.epochs=3")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its newest complete checkpoint")
    p.add_argument("--force", action="store_true", help="resume even though data, models or the global batch changed")
    p.add_argument("--overwrite", action="store_true", help="replace a finished or started run in output_dir")
    p.add_argument("--no-report", action="store_true", help="skip writing report.md")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kdkit.config import load_config
    from kdkit.evaluate import comparison_table, print_table
    from kdkit.experiment import train_run

    cfg = load_config(args.config, args.overrides)
    metrics = train_run(cfg, resume=args.resume, force=args.force, overwrite=args.overwrite)
    if metrics:
        print_table(comparison_table(metrics), title=f"{cfg.output_dir}")
        if not args.no_report:
            from kdkit.report import write_report

            print(f"report: {write_report(cfg.output_dir)}")
    return 0
