"""`kdkit cache`: the teacher over the training split, shard by shard, on every process; resumable."""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from kdkit.teacher_cache.store import CacheWriter, shard_file
from kdkit.errors import UserError


@dataclass
class Plan:
    """What a task caches: `write(start, end, advance)` -> (shard tensors, units) for training samples [start, end)."""

    kind: str
    key: dict
    num_samples: int
    unit: str  # what bytes are counted per: "token" or "image"
    write: Callable
    extra: Callable[[], dict] | None = None  # more manifest entries, computed once after the shards


def teacher_spec_hash(spec) -> str:
    """The teacher's config (where it comes from and how it is loaded), without the cache-only keys; settings left at
    their defaults are left out, so a kdkit that adds a setting still recognises its caches."""
    payload = spec.model_dump(mode="json", exclude={"cache", "fidelity_batches"}, exclude_defaults=True)
    for key in ("run", "pretrained", "tokenizer"):  # a directory however it is written (runs save absolute paths)
        if payload.get(key) and Path(payload[key]).expanduser().exists():
            payload[key] = str(Path(payload[key]).expanduser().resolve())
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def make_plan(cfg, task, data, teacher, device) -> Plan:
    if cfg.task in ("lm", "vlm"):
        from kdkit.teacher_cache.lm import make_token_plan

        return make_token_plan(cfg, task, data, teacher, device)
    if cfg.task == "classification":
        from kdkit.teacher_cache.classification import make_classification_plan

        return make_classification_plan(cfg, task, data, teacher, device)
    raise UserError(f"task: {cfg.task}: `kdkit cache` supports lm, vlm and classification")


@contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    columns = [TextColumn("caching the teacher"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]} samples/s"), TimeElapsedColumn(), TextColumn("ETA"),
               TimeRemainingColumn()]
    with Progress(*columns) as bar:
        task = bar.add_task("cache", total=total, rate="-")
        start, done = time.perf_counter(), 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            bar.update(task, advance=n, rate=f"{done / max(time.perf_counter() - start, 1e-9):,.0f}")

        yield advance


def build_cache(cfg, output: str | Path, *, overwrite: bool = False, progress: bool = True) -> dict:
    """Run the teacher of `cfg` over its training split into `output`; returns the manifest."""
    import torch

    from kdkit.experiment import make_accelerator
    from kdkit.tasks import get_task

    if cfg.teacher is None or cfg.teacher.cache is not None and not any(
            getattr(cfg.teacher, k) is not None for k in ("pretrained", "hf_config", "factory", "run")):
        raise UserError("teacher: `kdkit cache` needs the teacher itself (pretrained, hf_config, factory or run)")
    cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update={"cache": None})})  # the teacher itself
    acc = make_accelerator(cfg, evaluation=True)
    task = get_task(cfg.task)
    data = task.build_data(cfg)
    acc.print(task.describe_data(data))
    teacher = task.load_teacher(cfg, data, acc.device)
    plan = make_plan(cfg, task, data, teacher, acc.device)
    writer = CacheWriter(output, plan.kind, plan.key, plan.num_samples, cfg.cache.shard_samples, overwrite=overwrite)
    acc.wait_for_everyone()  # every process has checked the directory before one of them writes to it
    if acc.is_main_process:
        writer.start()
    acc.wait_for_everyone()
    mine = [i for i in range(writer.num_shards) if i % acc.num_processes == acc.process_index]
    todo = [i for i in mine if not writer.finished(i)]
    kept = len(mine) - len(todo)
    if kept:
        print(f"rank {acc.process_index}: {kept} finished shard(s) kept", flush=True)
    total = sum(writer.bounds(i)[1] - writer.bounds(i)[0] for i in todo)
    with torch.inference_mode(), _progress(total, progress and acc.is_main_process and total > 0) as advance:
        for i in todo:
            start, end = writer.bounds(i)
            tensors, units = plan.write(start, end, advance)
            writer.write(i, tensors, units)
    acc.wait_for_everyone()
    manifest = None
    if acc.is_main_process:
        teacher_metrics = task.evaluate(cfg, None, data, teacher, acc.device, {}).get("teacher", {})
        manifest = writer.finish(plan.unit)
        manifest["teacher_metrics"] = teacher_metrics
        manifest.update(plan.extra() if plan.extra is not None else {})
        (Path(output) / "manifest.json").write_text(json.dumps(manifest, indent=1))
        mb = sum(s["bytes"] for s in manifest["shards"]) / 1e6
        print(f"cache: {output}: {manifest['num_samples']} samples, {manifest['units']:,} {plan.unit}s, {mb:,.1f} MB "
              f"in {writer.num_shards} shard(s) ({shard_file(0)} ...), {manifest['bytes_per_unit']} bytes per "
              f"{plan.unit}", flush=True)
    acc.wait_for_everyone()
    return manifest or {}
