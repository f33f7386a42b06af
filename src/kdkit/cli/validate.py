"""`kdkit validate CONFIG.yaml [overrides]`: check a config without training; exit 0, or 2 listing every error."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("validate", help="check a config without training")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value")
    p.add_argument("--print", action="store_true", help="print the resolved config (defaults filled in)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kdkit.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    if args.print:
        print(dump_config(cfg), end="")
    print(f"{args.config}: ok")
    return 0
