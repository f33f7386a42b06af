"""`kdkit demo [--task image] [--output DIR] [--quick]`: the embedded end-to-end demo.

Image: on Fashion-MNIST, a small CNN student is trained twice with the same budget and seed — alone (the baseline)
and distilled from a CNN teacher that kdkit trained with its own shipped recipe (`recipes/fmnist_teacher.yaml`,
weights shipped in the package). A full run directory is written and the comparison table printed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kdkit.recipes import asset_path, cache_dir, recipe_path

# A tiny budget for tests: a few steps on a few hundred images, same code path as the real demo.
QUICK = ["data.limit_train=512", "data.limit_eval=256", "train.max_steps=6", "train.batch_size=64",
         "train.eval_every=3", "train.save_every=3", "train.log_every=2", "eval.latency_repeats=3",
         "train.progress=false"]


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the embedded end-to-end demo")
    p.add_argument("--task", choices=["image"], default="image",
                   help="image (Fashion-MNIST); lm and vlm arrive with their issues")
    p.add_argument("--output", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a tiny budget, for tests (numbers are meaningless)")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="overrides of the demo recipe")
    p.set_defaults(run=run)


def demo_teacher(quick: bool, overrides: list[str]) -> Path:
    """The shipped teacher; where it is missing, train it once with the shipped recipe into the user's cache."""
    shipped = asset_path("fmnist_teacher")
    if (shipped / "kdkit.json").is_file():
        return shipped
    from kdkit.config import load_config
    from kdkit.experiment import train_run

    target = cache_dir() / ("fmnist_teacher_quick" if quick else "fmnist_teacher")
    if (target / "student" / ".complete").is_file():
        return target
    print(f"no shipped teacher{' (quick mode)' if quick else ''}: training one with recipes/fmnist_teacher.yaml into {target}")
    data_overrides = [o for o in overrides if o.startswith("data.path=")]
    cfg = load_config(recipe_path("fmnist_teacher.yaml"), [f"output_dir={target}", *(QUICK if quick else []), *data_overrides])
    train_run(cfg, resume=True)
    return target


def run(args: argparse.Namespace) -> int:
    from kdkit.config import load_config
    from kdkit.evaluate import comparison_table, print_table
    from kdkit.experiment import run_started, train_run
    from kdkit.report import write_report

    start = time.perf_counter()
    teacher = demo_teacher(args.quick, args.overrides)
    overrides = [f"output_dir={args.output}", f"teacher.run={teacher}", *(QUICK if args.quick else []), *args.overrides]
    cfg = load_config(recipe_path("fmnist_cnn_to_tiny_cnn_kd.yaml"), overrides)
    out = Path(cfg.output_dir)
    finished = (out / "metrics.json").exists()
    if finished:  # the demo's own directory: a second `make demo` runs it afresh
        print(f"replacing the finished demo run in {out}")
    labelled = f"{cfg.data.limit_train:,} labelled training images" if cfg.data.limit_train else "all training images"
    print(f"kdkit demo: Fashion-MNIST. Teacher: {teacher} (trained by kdkit on all training images). Student: "
          f"{cfg.student.factory} {cfg.student.kwargs}, trained twice on {labelled} with the same steps and seed: "
          f"alone (baseline), then distilled ({', '.join(f'{t.weight} {t.label}' for t in cfg.distill.terms)}, "
          f"T={cfg.distill.temperature:g}).")
    metrics = train_run(cfg, resume=run_started(out) and not finished, overwrite=finished)
    if not metrics:  # not the main process
        return 0
    report = write_report(out)
    print_table(comparison_table(metrics), title="Fashion-MNIST: what distillation bought")
    gain = metrics.get("gain", {}).get("accuracy")
    if gain is not None:
        print(f"distilled - baseline test accuracy: {gain:+.2f} points (same student, data, steps and seed; the student "
              f"has {metrics.get('compression', 0):.1f}x fewer parameters than the teacher)")
    print(f"run directory: {out}   report: {report}   wall time: {time.perf_counter() - start:.0f} s")
    return 0
