"""Does matching inner layers add to Hinton KD?  Baseline, KD, KD + features and KD + attention transfer side by side.

On Fashion-MNIST with the demo's pair (the shipped CNN teacher -> tiny CNN, recipes/fmnist_cnn_to_tiny_cnn_kd.yaml:
0.1 CE + 0.9 KD at T=2), for each seed the student is trained with the same data, budget and seed:
  baseline      alone (CE)
  kd            the recipe's terms
  kd_features   + a `features` term: layers auto (3 pairs: the stage outputs), 1x1-conv projectors, mse
  kd_attention  + an `attention` term: attention transfer (Zagoruyko & Komodakis 2017) on the same 3 pairs
Then the cost of the hooks: the training step (Trainer._step: augmentation, teacher forward with hooks, student
forward and backward, optimizer) timed on the same batches, variants interleaved in rounds (median), and the memory
a step keeps for the backward pass (every tensor autograd saves, counted once per storage: where the hooks' and
projectors' activations show; on CUDA also the peak allocated memory of a step).

Prints one JSON line of figures. Results are kept in benchmarks/RESULTS.md.

    python benchmarks/feature_kd.py                    # 3 seeds, 8,000 images, 8 epochs: about 15 min on 2 cores
    python benchmarks/feature_kd.py --quick --seeds 1  # a smoke run (numbers are meaningless)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from kdkit.cli.demo import demo_teacher
from kdkit.cli.main import quiet_libraries
from kdkit.config import load_config
from kdkit.recipes import recipe_path

RECIPE = "fmnist_cnn_to_tiny_cnn_kd.yaml"
KD = "{kind: ce, weight: 0.1}, {kind: kd, weight: 0.9}"


def variants(feature_weight: float, attention_weight: float) -> dict[str, list[str]]:
    return {
        "kd": [],  # the recipe's own terms
        "kd_features": [f"distill.terms=[{KD}, {{kind: features, weight: {feature_weight}, distance: mse}}]"],
        "kd_attention": [f"distill.terms=[{KD}, {{kind: attention, weight: {attention_weight}, mode: transfer}}]"],
    }


def summary(values: list[float]) -> dict:
    return {"mean": round(statistics.fmean(values), 3),
            "std": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0, "runs": [round(v, 3) for v in values]}


def run_seed(seed: int, root: str, common: list[str], methods: dict[str, list[str]], threads: int | None) -> dict:
    """Every variant of one seed: test accuracies and training seconds."""
    from kdkit.experiment import train_run

    quiet_libraries()
    if threads:
        torch.set_num_threads(threads)
    out: dict[str, float] = {}
    for i, (name, extra) in enumerate(methods.items()):
        run = Path(root) / f"seed{seed}" / name
        cfg = load_config(recipe_path(RECIPE), [f"output_dir={run}", f"seed={seed}", f"compare_baseline={i == 0}",
                                                *common, *extra])
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the one JSON line
            metrics = train_run(cfg, resume=True)
        out[name] = metrics["student"]["accuracy"]
        out[f"{name}_train_s"] = json.loads((run / "student" / "train.json").read_text())["wall_s"]
        if i == 0:
            out["baseline"] = metrics["baseline"]["accuracy"]
            out["baseline_train_s"] = json.loads((run / "baseline" / "student" / "train.json").read_text())["wall_s"]
            out["teacher"] = metrics["teacher"]["accuracy"]
    print(f"seed {seed}: {json.dumps(out)}", file=sys.stderr, flush=True)
    return out


def saved_for_backward_mb(trainer, batch) -> float:
    """MB of the tensors autograd saves for the backward pass of one training step (each storage counted once)."""
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer._step([batch])
    return round(sum(storages.values()) / 2**20, 2)


def step_costs(cfgs: dict, steps: int, rounds: int) -> dict:
    """Per variant: the median ms of a training step over `rounds` rounds of `steps` timed steps (3 warm-up steps
    each, variants interleaved, the same batches), and the memory a step keeps for its backward."""
    from kdkit.data import make_loader
    from kdkit.experiment import make_accelerator
    from kdkit.tasks import get_task
    from kdkit.train import Trainer

    task = get_task("classification")
    first = next(iter(cfgs.values()))
    acc = make_accelerator(first)
    data = task.build_data(first)
    batch_size = first.train.batch_size
    trainers, projector_params = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in cfgs.items():
            teacher = task.load_teacher(cfg, data, acc.device)
            distiller = task.make_distiller(cfg, data, teacher, baseline=teacher is None)
            trainers[name] = Trainer(cfg, Path(tmp) / name, distiller, data, acc, label=name)
            inner = getattr(distiller, "inner", None)
            projector_params[name] = sum(p.numel() for p in inner.module.projectors.parameters()) if inner else 0
        times: dict[str, list[float]] = {name: [] for name in cfgs}
        memory, cuda_peak = {}, {}
        for r in range(rounds):
            for name, trainer in trainers.items():
                batches = (b for e in range(r * 100, r * 100 + 100) for b in make_loader(
                    data.train, batch_size=batch_size, shuffle=True, seed=first.seed, epoch=e, drop_last=True))
                for _ in range(3):
                    trainer._step([next(batches)])
                if r == 0:
                    memory[name] = saved_for_backward_mb(trainer, next(batches))
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        trainer._step([next(batches)])
                        cuda_peak[name] = round(torch.cuda.max_memory_allocated() / 2**20, 2)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(steps):
                    trainer._step([next(batches)])
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times[name].append(1000 * (time.perf_counter() - start) / steps)
            print(f"round {r}: " + ", ".join(f"{n} {v[-1]:.1f} ms/step" for n, v in times.items()), file=sys.stderr)
    ms = {name: round(statistics.median(v), 2) for name, v in times.items()}
    out = {"batch": batch_size, "step_ms": ms,
           "step_ms_vs_kd": {n: round(v / ms["kd"], 3) for n, v in ms.items()},
           "saved_for_backward_mb": memory,
           "saved_for_backward_vs_kd": {n: round(v / memory["kd"], 3) for n, v in memory.items()},
           "projector_params": projector_params}
    if cuda_peak:
        out["cuda_peak_mb"] = cuda_peak
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--limit-train", type=int, default=8000, help="training images (the rest of the 60,000 unused)")
    parser.add_argument("--epochs", type=float, default=8)
    parser.add_argument("--feature-weight", type=float, default=1.0)
    parser.add_argument("--attention-weight", type=float, default=1.0)
    parser.add_argument("--jobs", type=int, default=2, help="seeds trained at once, one thread each")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the timing phase")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run on 512 images (numbers are meaningless)")
    parser.add_argument("--out", default=None, help="where the runs go (default: a temporary directory)")
    args = parser.parse_args()
    quiet_libraries()
    begin = time.perf_counter()
    if args.quick:
        args.limit_train, args.epochs, args.steps, args.rounds = 512, 1, 2, 1
    root = Path(args.out or tempfile.mkdtemp(prefix="kdkit-feature-bench-"))
    with contextlib.redirect_stdout(sys.stderr):
        teacher = demo_teacher(args.quick, [])
    common = [f"teacher.run={teacher}", f"data.limit_train={args.limit_train}", f"train.epochs={args.epochs}",
              "train.progress=false", "train.tracker=none", "eval.efficiency=false"]
    if args.quick:
        common += ["data.limit_eval=256"]
    methods = variants(args.feature_weight, args.attention_weight)

    # 1. the cost of the hooks, alone on the machine
    torch.set_num_threads(args.threads)
    alone = ["teacher=null", "distill.terms=[{kind: ce, weight: 1.0}]"]
    cfgs = {name: load_config(recipe_path(RECIPE), [f"output_dir={root / 'timing' / name}", "compare_baseline=false",
                                                    *common, *extra])
            for name, extra in {"student_alone": alone, **methods}.items()}
    with contextlib.redirect_stdout(sys.stderr):
        costs = step_costs(cfgs, args.steps, args.rounds)

    # 2. accuracy: every variant for each seed, `jobs` seeds at once
    seeds = list(range(args.seeds))
    if args.jobs > 1 and len(seeds) > 1:
        with ProcessPoolExecutor(min(args.jobs, len(seeds)), mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(run_seed, seeds, *([x] * len(seeds) for x in (str(root), common, methods, 1))))
    else:
        done = [run_seed(s, str(root), common, methods, None) for s in seeds]
    names = ["baseline", *methods]
    accuracy = {n: summary([d[n] for d in done]) for n in ["teacher", *names]}
    print(json.dumps({
        "benchmark": "feature_kd", "quick": args.quick, "seeds": args.seeds,
        "device": f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores; timing on "
                  f"{args.threads} thread(s), training {args.jobs} seed(s) at once on one thread each",
        "torch": torch.__version__,
        "budget": {"train_images": args.limit_train, "epochs": args.epochs, "batch": costs["batch"]},
        "weights": {"features": args.feature_weight, "attention": args.attention_weight},
        "accuracy": accuracy,
        "gain_vs_baseline": {n: round(accuracy[n]["mean"] - accuracy["baseline"]["mean"], 3) for n in methods},
        "gain_vs_kd": {n: round(accuracy[n]["mean"] - accuracy["kd"]["mean"], 3) for n in methods if n != "kd"},
        "train_s_mean": {n: round(statistics.fmean(d[f"{n}_train_s"] for d in done), 1) for n in names},
        **{k: v for k, v in costs.items() if k != "batch"},
        "wall_s": round(time.perf_counter() - begin, 1),
    }))


if __name__ == "__main__":
    main()
