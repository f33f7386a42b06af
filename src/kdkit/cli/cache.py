"""`kdkit cache CONFIG.yaml [dotted.key=value ...] --output DIR`: run the teacher once over the training split and
store its outputs; train from them with `teacher.cache=DIR`."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("cache", help="store the teacher's outputs on the training data once (train with teacher.cache=DIR)")
    p.add_argument("config", help="YAML config file (its teacher, data and cache section)")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="config overrides, e.g. cache.top_k=32")
    p.add_argument("--output", default=None, metavar="DIR",
                   help="the cache directory (default: <output_dir>.teacher_cache); an interrupted cache there is "
                        "completed, keeping its finished shards")
    p.add_argument("--overwrite", action="store_true", help="replace a cache made from something else")
    p.add_argument("--num-processes", type=int, default=None, metavar="N", help="run N processes through Accelerate")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kdkit.teacher_cache.build import build_cache
    from kdkit.cli import launch
    from kdkit.config import load_config

    cfg = load_config(args.config, args.overrides)
    output = args.output or f"{cfg.output_dir.rstrip('/')}.teacher_cache"
    if (args.num_processes or 1) > 1 and not launch.under_launcher():
        argv = ["cache", args.config, *args.overrides, "--output", output] + (["--overwrite"] if args.overwrite else [])
        return launch.relaunch(launch.launch_command(argv, args.num_processes, None))
    build_cache(cfg, output, overwrite=args.overwrite)
    print(f"train from it with: kdkit train {args.config} teacher.cache={output}")
    return 0
