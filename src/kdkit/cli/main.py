"""The `kdkit` command: one module per subcommand, each with `add_parser(subparsers)` and `run(args) -> int`.

Exit codes: 0 success, 2 bad usage / config / data (a message naming the file, dotted path or sample; no
traceback), 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from kdkit import __version__
from kdkit.errors import UserError


def quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def build_parser() -> argparse.ArgumentParser:
    from kdkit.cli import cache, demo, eval as eval_cmd, report, train, validate

    parser = argparse.ArgumentParser(prog="kdkit", description="Knowledge distillation: train a small student to imitate a frozen teacher.")
    parser.add_argument("--version", action="version", version=f"kdkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (train, validate, eval_cmd, report, demo, cache):
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may come after options too (`kdkit train c.yaml --resume train.epochs=3`): argparse leaves such
    # trailing key=value words over, and they join the overrides; anything else is still an error.
    args, extra = parser.parse_known_args(argv)
    stray = [w for w in extra if w.startswith("-") or "=" not in w or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    quiet_libraries()
    try:
        return int(args.run(args) or 0)
    except UserError as err:
        print(f"kdkit {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"kdkit {args.command}: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())
