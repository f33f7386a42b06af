"""`kdkit demo [--task image|lm] [--output DIR] [--quick]`: the embedded end-to-end demos.

A small student is trained twice with the same budget and seed, alone (the baseline) and distilled from a teacher
that kdkit trained with its own shipped recipe (weights shipped in the package; trained into the user's cache where
they are missing). A full run directory is written and the comparison table printed.

image: Fashion-MNIST, CNN teacher (recipes/fmnist_teacher.yaml) -> tiny CNN.
lm:    CPython's standard library, 6x384 teacher (recipes/stdlib_lm_teacher.yaml) -> 2x192 student, perplexity on
       held-out files.
vlm:   procedural images of shapes with questions (kdkit.data.shapes), a Qwen2-VL-style teacher
       (recipes/shapes_vlm_teacher.yaml) -> a smaller one; exact match of greedy answers on held-out images.
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
QUICK_LM = ["data.limit_train=64", "data.limit_eval=16", "train.max_steps=4", "train.batch_size=8",
            "train.eval_every=2", "train.save_every=2", "train.log_every=2", "eval.generate_samples=2",
            "eval.max_new_tokens=4", "eval.latency_repeats=2", "train.progress=false",
            "data.text.glob=email/*.py"]  # 30 files: the quick run tokenizes one package, not the whole library
QUICK_VLM = ["data.path=shapes:200", "data.limit_train=64", "data.limit_eval=16", "train.max_steps=4",
             "train.batch_size=8", "train.eval_every=2", "train.save_every=2", "train.log_every=2",
             "eval.generate_samples=4", "eval.max_new_tokens=3", "train.progress=false"]


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the embedded end-to-end demo")
    p.add_argument("--task", choices=["image", "lm", "vlm"], default="image",
                   help="image (Fashion-MNIST), lm (CPython's standard library) or vlm (images of shapes with questions)")
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


def lm_assets() -> tuple[Path, Path]:
    return asset_path("stdlib_lm") / "tokenizer", asset_path("stdlib_lm") / "teacher"


def lm_demo_teacher(quick: bool) -> Path:
    """The shipped language-model teacher; where it is missing, train it once with the shipped recipe."""
    tokenizer, shipped = lm_assets()
    return _shipped_or_trained(shipped, "stdlib_lm_teacher", tokenizer, QUICK_LM if quick else None, "45")


def vlm_assets() -> tuple[Path, Path]:
    return asset_path("shapes_vlm") / "processor", asset_path("shapes_vlm") / "teacher"


def vlm_demo_teacher(quick: bool) -> Path:
    """The shipped vision-language teacher; where it is missing, train it once with the shipped recipe."""
    processor, shipped = vlm_assets()
    return _shipped_or_trained(shipped, "shapes_vlm_teacher", processor, QUICK_VLM if quick else None, "15")


def _shipped_or_trained(shipped: Path, name: str, tokenizer: Path, quick: list[str] | None, minutes: str) -> Path:
    """`shipped` when the package has it, else a teacher trained once by recipes/<name>.yaml into the user's cache
    (`quick`: the quick-mode overrides, None for the full recipe)."""
    if (shipped / "kdkit.json").is_file():
        return shipped
    from kdkit.config import load_config
    from kdkit.experiment import train_run

    target = cache_dir() / (f"{name}_quick" if quick is not None else name)
    if (target / "student" / ".complete").is_file():
        return target
    print(f"no shipped teacher{' (quick mode)' if quick is not None else ''}: training one with recipes/{name}.yaml "
          f"into {target}{'' if quick is not None else f' (about {minutes} minutes on 2 CPU cores)'}")
    cfg = load_config(recipe_path(f"{name}.yaml"),
                      [f"output_dir={target}", f"student.tokenizer={tokenizer}", *(quick or [])])
    train_run(cfg, resume=True)
    return target


def run(args: argparse.Namespace) -> int:
    from kdkit.config import load_config
    from kdkit.evaluate import comparison_table, print_table
    from kdkit.experiment import run_started, train_run
    from kdkit.report import write_report

    start = time.perf_counter()
    if args.task == "vlm":
        processor, _ = vlm_assets()
        given = [o.partition("=")[2] for o in args.overrides if o.startswith("teacher.run=")]
        teacher = given[-1] if given else vlm_demo_teacher(args.quick)
        recipe, title = "shapes_vlm_teacher_to_small_kd.yaml", "Shapes VQA: what distillation bought"
        overrides = [f"student.tokenizer={processor}", *(QUICK_VLM if args.quick else [])]
    elif args.task == "lm":
        tokenizer, _ = lm_assets()
        teacher = lm_demo_teacher(args.quick)
        recipe, title = "stdlib_lm_6x384_to_2x192_kd.yaml", "CPython standard library: what distillation bought"
        overrides = [f"student.tokenizer={tokenizer}", *(QUICK_LM if args.quick else [])]
    else:
        teacher = demo_teacher(args.quick, args.overrides)
        recipe, title = "fmnist_cnn_to_tiny_cnn_kd.yaml", "Fashion-MNIST: what distillation bought"
        overrides = list(QUICK if args.quick else [])
    cfg = load_config(recipe_path(recipe), [f"output_dir={args.output}", f"teacher.run={teacher}", *overrides,
                                            *args.overrides])
    out = Path(cfg.output_dir)
    finished = (out / "metrics.json").exists()
    if finished:  # the demo's own directory: a second `make demo` runs it afresh
        print(f"replacing the finished demo run in {out}")
    terms = f"{', '.join(f'{t.weight} {t.label}' for t in cfg.distill.terms)}, T={cfg.distill.temperature:g}"
    if args.task == "vlm":
        print(f"kdkit demo: vision-language model on procedural images of shapes with questions about counts, colours, "
              f"kinds and positions (exact match of greedy answers on held-out images). Teacher: {teacher} (trained by "
              f"kdkit). Student: a smaller Qwen2-VL-style model trained twice on {cfg.data.limit_train} samples with the "
              f"same {cfg.train.max_steps} steps and seed: alone (baseline), then distilled ({terms}).")
    elif args.task == "lm":
        print(f"kdkit demo: language model on CPython's standard library (.py files, tests left out; held-out files "
              f"measure perplexity). Teacher: {teacher} (trained by kdkit). Student: {cfg.student.hf_config}, trained "
              f"twice with the same {cfg.train.max_steps} steps and seed: alone (baseline), then distilled ({terms}).")
    else:
        labelled = f"{cfg.data.limit_train:,} labelled training images" if cfg.data.limit_train else "all training images"
        print(f"kdkit demo: Fashion-MNIST. Teacher: {teacher} (trained by kdkit on all training images). Student: "
              f"{cfg.student.factory} {cfg.student.kwargs}, trained twice on {labelled} with the same steps and seed: "
              f"alone (baseline), then distilled ({terms}).")
    if args.task == "image":
        cfg = cached_teacher(cfg, args.quick)
    metrics = train_run(cfg, resume=run_started(out) and not finished, overwrite=finished)
    if not metrics:  # not the main process
        return 0
    report = write_report(out)
    print_table(comparison_table(metrics), title=title)
    if args.task == "vlm":
        from kdkit.evaluate.table import teacher_student_table

        print_table(teacher_student_table(metrics), title="Teacher vs distilled student")
    _print_gain(metrics)
    wall = {k: metrics[k].get("train_time_s") for k in ("baseline", "student") if k in metrics}
    print(f"run directory: {out}   report: {report}   wall time: {time.perf_counter() - start:.0f} s "
          f"(training: baseline {wall.get('baseline')} s, distilled {wall.get('student')} s)")
    return 0


def cached_teacher(cfg, quick: bool):
    """The image demo trains from the teacher's stored outputs (`kdkit cache`): its logits on 4 augmented views of
    every training image, made once into the user's cache and reused by later demos. The distilled student then
    trains at the speed of the student alone, on exactly the views the teacher scored."""
    from kdkit.errors import UserError
    from kdkit.teacher_cache.build import build_cache

    where = cache_dir() / f"fmnist_demo_teacher_cache{'_quick' if quick else ''}"
    print(f"teacher outputs: cached in {where} ({cfg.cache.views} augmented views per image, made once and reused): "
          "the distilled student trains at the student's own speed, on exactly the views the teacher scored")
    try:
        build_cache(cfg, where)
    except UserError:  # made for other data or another teacher: made again
        build_cache(cfg, where, overwrite=True)
    return cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"cache": str(where)})})


def _print_gain(metrics: dict) -> None:
    gain = metrics.get("gain", {})
    ratio = metrics.get("compression", 0)
    if "exact_match" in gain:
        print(f"distilled - baseline exact match: {gain['exact_match']:+.2f} points ({metrics['student']['exact_match']:.2f} "
              f"against {metrics['baseline']['exact_match']:.2f}; same student, data, steps and seed; teacher "
              f"{metrics.get('teacher', {}).get('exact_match', float('nan')):.2f}; {ratio:.1f}x fewer parameters)")
    elif "accuracy" in gain:
        print(f"distilled - baseline test accuracy: {gain['accuracy']:+.2f} points (same student, data, steps and seed; "
              f"the student has {ratio:.1f}x fewer parameters than the teacher)")
    elif "perplexity" in gain:
        ppl = metrics["student"]["perplexity"] / metrics["baseline"]["perplexity"]
        print(f"distilled / baseline test perplexity: {ppl:.3f}x ({metrics['student']['perplexity']:.2f} against "
              f"{metrics['baseline']['perplexity']:.2f}; same student, data, steps and seed; {ratio:.1f}x fewer "
              "parameters than the teacher)")
