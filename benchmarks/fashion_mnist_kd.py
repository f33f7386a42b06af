"""Does distillation beat training alone on Fashion-MNIST?  Baseline, Hinton KD and DKD side by side.

For each pair (the demo's CNN teacher -> tiny CNN, and the same teacher -> a small ViT: cross-architecture) and
each seed, the student is trained three times with the same data, budget and seed: alone (baseline), with Hinton KD
(the demo recipe's terms) and with DKD. Prints one JSON line: per pair and method the mean and std of test
accuracy over the seeds, and the gain over the baseline.

    python benchmarks/fashion_mnist_kd.py --seeds 3 --jobs 2   # the demo recipe's budget, 2 runs at a time
    python benchmarks/fashion_mnist_kd.py --seeds 1 --quick    # a smoke run

With --jobs N, N (pair, seed) units train at once, each in its own process on one thread (small CNNs use a
core better that way); the figures are accuracies, not timings, so running them side by side is fair.

Results are kept in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdkit.cli.demo import QUICK, demo_teacher
from kdkit.cli.main import quiet_libraries
from kdkit.config import load_config
from kdkit.experiment import train_run
from kdkit.recipes import recipe_path

PAIRS = {
    "cnn_to_tiny_cnn": [],  # the demo pair as the recipe has it
    "cnn_to_small_vit": [
        "student.factory=null", "student.kwargs={}",
        "student.hf_config={model_type: vit, hidden_size: 48, num_hidden_layers: 3, num_attention_heads: 4, "
        "intermediate_size: 96, image_size: 28, patch_size: 4}",
    ],
}
METHODS = {
    "kd": [],  # the recipe's own terms (CE + Hinton KD)
    "dkd": ["distill.terms=[{kind: ce, weight: 1.0}, {kind: dkd, weight: 1.0, dkd_alpha: 1.0, dkd_beta: 8.0}]"],
}


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 3), "std": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
            "runs": [round(v, 3) for v in values]}


def run_unit(pair: str, seed: int, root: str, common: list[str], threads: int | None) -> dict[str, float]:
    """Baseline, KD and DKD of one (pair, seed): test accuracies."""
    quiet_libraries()
    if threads:
        torch.set_num_threads(threads)
    acc: dict[str, float] = {}
    for i, (method, extra) in enumerate(METHODS.items()):
        out = Path(root) / pair / f"seed{seed}" / method
        cfg = load_config(recipe_path("fmnist_cnn_to_tiny_cnn_kd.yaml"),
                          [f"output_dir={out}", f"seed={seed}", f"compare_baseline={i == 0}", *common, *PAIRS[pair], *extra])
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the one JSON line
            metrics = train_run(cfg, resume=True)
        acc[method] = metrics["student"]["accuracy"]
        if i == 0:  # the baseline and the teacher are the same for every method of this seed
            acc["baseline"] = metrics["baseline"]["accuracy"]
            acc["teacher"] = metrics["teacher"]["accuracy"]
            acc["train_steps"] = metrics["student"].get("train_steps")
    print(f"{pair} seed {seed}: {json.dumps(acc)}", file=sys.stderr, flush=True)
    return acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pairs", nargs="*", default=list(PAIRS))
    parser.add_argument("--jobs", type=int, default=1, help="(pair, seed) units trained at once, one thread each")
    parser.add_argument("--quick", action="store_true", help="the demo's --quick budget (numbers meaningless)")
    parser.add_argument("--out", default=None, help="where the runs go (default: a temporary directory)")
    parser.add_argument("overrides", nargs="*", help="extra dotted overrides for every run, e.g. train.epochs=10")
    args = parser.parse_args()
    quiet_libraries()

    start = time.perf_counter()
    root = Path(args.out or tempfile.mkdtemp(prefix="kdkit-bench-"))
    with contextlib.redirect_stdout(sys.stderr):
        teacher = demo_teacher(args.quick, [])
    common = [f"teacher.run={teacher}", "train.progress=false", "eval.efficiency=false", *(QUICK if args.quick else []),
              *args.overrides]
    units = [(pair, seed) for pair in args.pairs for seed in range(args.seeds)]
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(run_unit, *zip(*units), *([x] * len(units) for x in (str(root), common, 1))))
    else:
        done = [run_unit(pair, seed, str(root), common, None) for pair, seed in units]
    results: dict[str, dict] = {}
    for pair in args.pairs:
        runs = [acc for (p, _), acc in zip(units, done) if p == pair]
        acc = {k: [r[k] for r in runs] for k in ("teacher", "baseline", *METHODS)}
        base = statistics.fmean(acc["baseline"])
        results[pair] = {k: summary(v) for k, v in acc.items()}
        results[pair]["gain"] = {m: round(statistics.fmean(acc[m]) - base, 3) for m in METHODS}
        results[pair]["train_steps"] = runs[0]["train_steps"]
    print(json.dumps({"benchmark": "fashion_mnist_kd", "seeds": args.seeds, "quick": args.quick, "jobs": args.jobs,
                      "device": f"CPU, {os.cpu_count()} cores", "overrides": args.overrides, "results": results,
                      "wall_s": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
