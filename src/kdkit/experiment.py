"""One run, end to end: config -> models -> data -> (baseline) -> distilled student -> evaluation -> metrics.json.

`train_run` is what `kdkit train` and `kdkit demo` call; `evaluate_run` is what `kdkit eval` calls and what ends
every training run, so a re-evaluation computes exactly what training reported.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from kdkit.config import Config, dump_config, load_config
from kdkit.errors import UserError
from kdkit.evaluate import build_metrics
from kdkit.tasks import Task, get_task
from kdkit.train import Trainer

METRICS = "metrics.json"


def make_accelerator(cfg: Config, *, evaluation: bool = False) -> Accelerator:
    """The run's Accelerator; evaluation alone needs no mixed precision (a CPU can re-evaluate an fp16 run)."""
    if cfg.train.precision == "fp16" and not torch.cuda.is_available() and not evaluation:
        raise UserError("train.precision: fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    precision = "no" if evaluation else {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.train.precision]
    # Accelerate keeps one process-wide state; a second run in the same process (the demo's teacher, then its
    # students; a benchmark; tests) may ask for another precision. The process group itself is kept.
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    # Several processes without CUDA: Accelerate only forms the (gloo) process group when told it runs on CPUs.
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    acc = Accelerator(mixed_precision=precision, cpu=cpu)
    if acc.distributed_type == DistributedType.DEEPSPEED:
        from kdkit.cli.launch import DEEPSPEED_REFUSED

        raise UserError(DEEPSPEED_REFUSED)
    return acc


RUN_FILES = ("checkpoints", "baseline", "student", "tensorboard", "plots", "history.jsonl", METRICS, "report.md",
             "auto_batch.json")


def run_started(run_dir: Path) -> bool:
    """Whether a directory already holds (part of) a kdkit run."""
    return any((Path(run_dir) / name).exists() for name in RUN_FILES)


def _refuse_started_run(run_dir: Path, *, resume: bool, overwrite: bool) -> bool:
    """Whether output_dir holds a run that --overwrite will clear; refused without --resume or --overwrite."""
    started = run_dir.exists() and not resume and run_started(run_dir)
    if started and not overwrite:
        raise UserError(f"output_dir {run_dir} already holds a run; pass --resume to continue it, --overwrite to "
                        "replace it, or choose another output_dir")
    return started


def _clear_run(run_dir: Path, acc: Accelerator) -> None:
    """--overwrite: delete kdkit's own files (main process), once every rank has looked at the directory."""
    acc.wait_for_everyone()
    if acc.is_main_process:
        for name in RUN_FILES:
            p = run_dir / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    acc.wait_for_everyone()


def _refuse_changed_resume(task: Task, cfg: Config, run_dir: Path, data, teacher, acc: Accelerator,
                           force: bool) -> None:
    """--resume of a run whose data, models, loss, seed or global batch changed: refused before anything is written
    (the trainer checks again, per student, when it loads the checkpoint)."""
    from kdkit.train import checkpoint as ckpt
    from kdkit.train.loop import resume_hash

    if force or cfg.train.batch_size == "auto":
        return
    fingerprint = task.teacher_fingerprint(teacher)
    for sub, fp in ((run_dir / "baseline", None), (run_dir, fingerprint)):
        found = ckpt.latest_complete(sub / "checkpoints")
        if found and found[1].get("config_hash") != resume_hash(cfg, fp, data.fingerprint, acc.num_processes):
            raise UserError(f"--resume: {found[0]} was written with other data, models, loss, seed or global batch; "
                            "start a new output_dir, or pass --force to resume anyway")


def _absolute_paths(cfg: Config) -> Config:
    """Local paths in the saved config made absolute, so `kdkit eval` works from any directory."""
    def local(p: str | None) -> str | None:
        return str(Path(p).expanduser().resolve()) if p and Path(p).expanduser().exists() else p

    update: dict[str, Any] = {"data": cfg.data.model_copy(update={"path": local(cfg.data.path)})}
    for role in ("student", "teacher"):
        spec = getattr(cfg, role)
        if spec is None:
            continue
        changes: dict[str, Any] = {"run": local(spec.run), "pretrained": local(spec.pretrained),
                                   "cache": local(spec.cache)}
        if spec.factory_file is not None:
            changes["factory"] = f"{local(spec.factory_file)}:{spec.factory.rpartition(':')[2]}"
        update[role] = spec.model_copy(update=changes)
    return cfg.model_copy(update=update)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def _train_student(task: Task, cfg: Config, run_dir: Path, data, teacher, acc: Accelerator, *, label: str,
                   baseline: bool, resume: bool, force: bool) -> None:
    """Train one student into `run_dir` (its history, checkpoints and exported student/)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume and (run_dir / "student" / "kdkit.json").is_file() and (run_dir / "student" / ".complete").is_file():
        acc.print(f"{label}: already finished, kept as is")
        return
    distiller = task.make_distiller(cfg, data, teacher, baseline=baseline)
    if acc.process_index:  # each rank its own dropout masks (rank 0 keeps the single-process stream)
        torch.manual_seed(cfg.seed + 1_000_003 * acc.process_index)
    fingerprint = None if baseline else task.teacher_fingerprint(teacher)
    trainer = Trainer(cfg, run_dir, distiller, data, acc, teacher_fingerprint=fingerprint, label=label)
    result = trainer.fit(resume=resume, force=force)
    if acc.is_main_process:
        out = task.export(cfg, trainer.student, data, run_dir / "student")
        (out / "train.json").write_text(json.dumps({"steps": result.steps, "wall_s": round(result.wall_s, 3),
                                                    "best": result.best, "skipped_steps": result.skipped_steps}) + "\n")
        (out / ".complete").write_text("")
    acc.wait_for_everyone()
    acc.free_memory()


def _resolve_batch_size(task: Task, cfg: Config, run_dir: Path, data, teacher, acc: Accelerator) -> Config:
    if cfg.train.batch_size != "auto":
        return cfg
    from kdkit.train.autobatch import resolve_batch_size, training_trial

    distiller = task.make_distiller(cfg, data, teacher, baseline=teacher is None)
    resolved = resolve_batch_size(cfg, run_dir, acc, training_trial(distiller, data.train, acc))
    del distiller
    return resolved


def train_run(cfg: Config, *, resume: bool = False, force: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train (baseline and) distilled student into cfg.output_dir and evaluate them; returns metrics.json's dict."""
    run_dir = Path(cfg.output_dir).expanduser()
    task = get_task(cfg.task)
    acc = make_accelerator(cfg)
    clear = _refuse_started_run(run_dir, resume=resume, overwrite=overwrite)
    cfg = _absolute_paths(cfg)
    # Data and teacher first: a bad file or model fails here, before anything in output_dir is touched.
    data = task.build_data(cfg)
    acc.print(task.describe_data(data))
    teacher = task.load_teacher(cfg, data, acc.device)
    if resume:
        _refuse_changed_resume(task, cfg, run_dir, data, teacher, acc, force)
    if clear:
        _clear_run(run_dir, acc)
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    acc.wait_for_everyone()
    cfg = _resolve_batch_size(task, cfg, run_dir, data, teacher, acc)
    if cfg.compare_baseline:
        _train_student(task, cfg, run_dir / "baseline", data, teacher, acc, label="baseline", baseline=True,
                       resume=resume, force=force)
    _train_student(task, cfg, run_dir, data, teacher, acc, label="distilled" if teacher else "train",
                   baseline=teacher is None, resume=resume, force=force)
    return evaluate_run(run_dir, cfg=cfg, data=data, teacher=teacher, accelerator=acc, task=task)


def evaluate_run(run_dir: str | Path, *, cfg: Config | None = None, data=None, teacher=None,
                 accelerator: Accelerator | None = None, task: Task | None = None) -> dict[str, Any]:
    """(Re-)evaluate a run's teacher, baseline and student on the test split and write metrics.json."""
    run_dir = Path(run_dir)
    if cfg is None:
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"{run_dir}: not a kdkit run directory (no config.yaml)")
        cfg = load_config(run_dir / "config.yaml")
    task = task or get_task(cfg.task)  # the task that built `data` and `teacher` (it keeps their tokenizers)
    acc = accelerator or make_accelerator(cfg, evaluation=True)
    data = data or task.build_data(cfg)
    if teacher is None and cfg.teacher is not None:
        teacher = task.load_teacher(cfg, data, acc.device)
    metrics: dict[str, Any] = {}
    if acc.is_main_process:
        students = {"student": run_dir}
        if (run_dir / "baseline" / "student" / "kdkit.json").is_file():
            students["baseline"] = run_dir / "baseline"
        parts = task.evaluate(cfg, run_dir, data, teacher, acc.device, students)
        for name, run in students.items():
            parts[name].update(_train_info(run / "student"))
        metrics = build_metrics(cfg.task, parts["student"], teacher=parts.get("teacher"), baseline=parts.get("baseline"),
                                quality_keys=task.quality_keys)
        metrics["test_samples"] = len(data.test)
        _write_json_atomic(run_dir / METRICS, metrics)
        task.finish(run_dir, metrics)
    acc.wait_for_everyone()
    return metrics


def _train_info(student_dir: Path) -> dict[str, Any]:
    f = student_dir / "train.json"
    if not f.is_file():
        return {}
    info = json.loads(f.read_text())
    return {"train_steps": info.get("steps"), "train_time_s": info.get("wall_s")}
