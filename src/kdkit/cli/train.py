"""`kdkit train CONFIG.yaml [dotted.key=value ...]`: train (with or without a teacher) into a run directory."""

from __future__ import annotations

import argparse
import os
import shlex

from kdkit.errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a student (with or without a teacher); writes a run directory")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="config overrides, e.g. train.epochs=3")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its newest complete checkpoint")
    p.add_argument("--force", action="store_true", help="resume even though data, models or the global batch changed")
    p.add_argument("--overwrite", action="store_true", help="replace a finished or started run in output_dir")
    p.add_argument("--no-report", action="store_true", help="skip writing report.md")
    p.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="run N processes (data parallel) through Accelerate's launcher; same as "
                        "`accelerate launch --num_processes N -m kdkit train ...`")
    p.add_argument("--accelerate-config", default=None, metavar="NAME|FILE",
                   help="an Accelerate config for the launch: ddp, fsdp (shipped with kdkit) or a file from "
                        "`accelerate config`")
    p.set_defaults(run=run)


def _argv(args: argparse.Namespace) -> list[str]:
    """This command line again, without the launch options."""
    flags = [f"--{name.replace('_', '-')}" for name in ("resume", "force", "overwrite", "no_report")
             if getattr(args, name)]
    return ["train", args.config, *args.overrides, *flags]


def run(args: argparse.Namespace) -> int:
    import sys

    from kdkit.cli import launch
    from kdkit.config import load_config
    from kdkit.evaluate import comparison_table, print_table
    from kdkit.experiment import train_run
    from kdkit.train.signals import Interrupted

    cfg = load_config(args.config, args.overrides)  # bad configs fail here, before any process is launched
    if args.num_processes is not None and args.num_processes < 1:
        raise UserError(f"--num-processes must be at least 1, got {args.num_processes}")
    if (args.num_processes or args.accelerate_config) and not launch.under_launcher():
        config = launch.resolve_accelerate_config(args.accelerate_config) if args.accelerate_config else None
        if (args.num_processes or 1) > 1 or config is not None:
            return launch.relaunch(launch.launch_command(_argv(args), args.num_processes or 1, config))
    try:
        metrics = train_run(cfg, resume=args.resume, force=args.force, overwrite=args.overwrite)
    except Interrupted as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            words = ["kdkit", *_argv(args)]
            if not args.resume:
                words.append("--resume")
            processes = int(os.environ.get("WORLD_SIZE", "1"))
            if processes > 1:
                words += ["--num-processes", str(processes)]
            print(f"kdkit train: {stop}\nresume with: {' '.join(map(shlex.quote, words))}", file=sys.stderr, flush=True)
        # under `kdkit train --num-processes`, the parent process reports the signal's exit code
        return 0 if os.environ.get(launch.RELAUNCHED) else stop.exit_code
    if metrics:
        print_table(comparison_table(metrics), title=f"{cfg.output_dir}")
        if not args.no_report:
            from kdkit.report import write_report

            print(f"report: {write_report(cfg.output_dir)}")
    return 0
