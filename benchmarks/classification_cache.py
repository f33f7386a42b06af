"""What a teacher cache buys an image classifier: speed side by side, then accuracy at equal training time.

On Fashion-MNIST with the demo's pair (the shipped CNN teacher -> tiny CNN, recipes/fmnist_cnn_to_tiny_cnn_kd.yaml):

1. `kdkit cache` of the teacher's logits on K augmented views of every training image (timed: a one-off cost that
   every later run from the cache shares).
2. Images/s of the training step, side by side in rounds (student alone, online KD, KD from the cache; the same
   trainer step, data and batch), the median of each. Goal: cached >= 0.9x student alone.
3. Accuracy at equal training time: online KD for N epochs; KD from the cache for as many epochs as fit in the same
   time at the measured speeds; the student alone for N epochs and for that many epochs (so the gain of the extra
   epochs and the gain of the teacher can be told apart).

Prints one JSON line of figures. Results are kept in benchmarks/RESULTS.md.

    python benchmarks/classification_cache.py                  # 4 online epochs, 4 views, one thread
    python benchmarks/classification_cache.py --quick          # a smoke run (numbers are meaningless)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from kdkit.cli.demo import demo_teacher
from kdkit.cli.main import quiet_libraries
from kdkit.config import load_config
from kdkit.recipes import recipe_path

RECIPE = "fmnist_cnn_to_tiny_cnn_kd.yaml"
ALONE = ["teacher=null", "distill.terms=[{kind: ce, weight: 1.0}]"]


def images_per_s(cfgs: dict, steps: int, rounds: int) -> dict[str, list[float]]:
    """Each mode's training step (Trainer._step: augmentation, teacher or cache, student forward and backward,
    optimizer) on the same shuffled batches, `steps` timed after 3 warm-up steps, modes interleaved per round."""
    from kdkit.data import make_loader
    from kdkit.experiment import make_accelerator
    from kdkit.tasks import get_task
    from kdkit.train import Trainer

    task = get_task("classification")
    first = next(iter(cfgs.values()))
    acc = make_accelerator(first)
    data = task.build_data(first)
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, cfg in cfgs.items():
            teacher = task.load_teacher(cfg, data, acc.device)
            distiller = task.make_distiller(cfg, data, teacher, baseline=teacher is None)
            trainers[mode] = Trainer(cfg, Path(tmp) / mode, distiller, data, acc,
                                     teacher_fingerprint=task.teacher_fingerprint(teacher), label=mode)
        out: dict[str, list[float]] = {mode: [] for mode in cfgs}
        batch = first.train.batch_size
        for r in range(rounds):
            for mode, trainer in trainers.items():
                batches = (b for e in range(r * 1000, r * 1000 + 1000) for b in make_loader(
                    data.train, batch_size=batch, shuffle=True, seed=first.seed, epoch=e, drop_last=True))
                for _ in range(3):
                    trainer._step([next(batches)])
                start = time.perf_counter()
                for _ in range(steps):
                    trainer._step([next(batches)])
                out[mode].append(steps * batch / (time.perf_counter() - start))
            print(f"round {r}: " + ", ".join(f"{m} {v[-1]:,.0f} images/s" for m, v in out.items()), file=sys.stderr)
    return out


def train(cfg) -> dict:
    from kdkit.experiment import train_run

    metrics = train_run(cfg)
    info = json.loads((Path(cfg.output_dir) / "student" / "train.json").read_text())
    return {"epochs": cfg.train.epochs, "steps": info["steps"], "train_s": round(info["wall_s"], 1),
            "accuracy": metrics["student"]["accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4, help="epochs of online KD (the time budget)")
    parser.add_argument("--views", type=int, default=4, help="augmented views per image in the cache")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one: the machine is shared)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", default=None, help="keep the runs and the cache here (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="a smoke run on 1,000 images")
    args = parser.parse_args()
    quiet_libraries()
    torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    root = Path(args.output or tempfile.mkdtemp(prefix="kdkit-cache-bench-"))
    common = [f"teacher.run={demo_teacher(args.quick, [])}", "compare_baseline=false", "train.progress=false",
              "train.tracker=none", "eval.efficiency=false", f"cache.views={args.views}"]
    if args.quick:
        common += ["data.limit_train=1000", "data.limit_eval=500"]

    def cfg(name: str, *extra: str):
        return load_config(recipe_path(RECIPE), [f"output_dir={root / name}", *common, *extra])

    from kdkit.teacher_cache.build import build_cache

    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the one JSON line
        manifest = build_cache(cfg("run"), root / "cache", progress=False)
    cache = {"views": args.views, "build_s": round(time.perf_counter() - start, 1),
             "mb": round(sum(s["bytes"] for s in manifest["shards"]) / 1e6, 2),
             "bytes_per_image": manifest["bytes_per_unit"]}
    cached = [f"teacher.cache={root / 'cache'}"]

    with contextlib.redirect_stdout(sys.stderr):
        speeds = images_per_s({"student_only": cfg("s", *ALONE), "online_kd": cfg("o"), "cached_kd": cfg("c", *cached)},
                              args.steps, args.rounds)
    ips = {m: round(statistics.median(v)) for m, v in speeds.items()}
    ratio = round(statistics.median(c / s for c, s in zip(speeds["cached_kd"], speeds["student_only"])), 3)
    n = args.epochs
    more = max(n, int(n * ips["cached_kd"] / ips["online_kd"]))  # epochs from the cache in online KD's time

    quality = {}
    with contextlib.redirect_stdout(sys.stderr):
        for name, extra, epochs in (("online_kd", [], n), ("cached_kd", cached, more),
                                    ("alone_same_epochs_as_online", ALONE, n),
                                    ("alone_same_epochs_as_cached", ALONE, more)):
            quality[name] = train(cfg(name, f"train.epochs={epochs}", *extra))
            print(f"{name}: {quality[name]}", file=sys.stderr, flush=True)
    result = {
        "device": f"CPU ({platform.processor() or platform.machine()}), {args.threads} thread(s)",
        "torch": torch.__version__, "train_images": manifest["num_samples"], "batch": cfg("run").train.batch_size,
        "images_per_s": ips, "cached_vs_student_only": ratio,
        "cached_vs_online": round(ips["cached_kd"] / ips["online_kd"], 2), "goal_met": ratio >= 0.9,
        "cache": cache, "teacher_accuracy": manifest["teacher_metrics"].get("accuracy"), "quality": quality,
        "wall_s": round(time.perf_counter() - begin, 1),
    }
    if args.output is None:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
