"""What differs between model kinds, behind one small interface; `kdkit.experiment` runs any of them.

A task knows how to build its data, its teacher and its distiller (student + losses), how to export a trained
student and load it back, and how to describe a model on the test split (quality and efficiency). Everything
else (run directory, baseline, training, resume, metrics.json, report) is shared.
"""

from __future__ import annotations

from typing import Any, Protocol


class Task(Protocol):
    quality_keys: tuple[str, ...]  # metrics.json keys the gain over the baseline is given for

    def build_data(self, cfg) -> Any: ...
    def describe_data(self, data) -> str: ...
    def load_teacher(self, cfg, data, device) -> Any: ...
    def teacher_fingerprint(self, teacher) -> str | None: ...
    def make_distiller(self, cfg, data, teacher, *, baseline: bool) -> Any: ...
    def export(self, cfg, distiller, data, out_dir) -> None: ...
    def evaluate(self, cfg, run_dir, data, teacher, device, students: dict[str, Any]) -> dict[str, dict]: ...
    def finish(self, run_dir, metrics: dict) -> None: ...


def get_task(name: str) -> Task:
    if name == "classification":
        from kdkit.tasks.classification import ClassificationTask
        return ClassificationTask()
    if name == "lm":
        from kdkit.tasks.lm import LMTask
        return LMTask()
    if name == "vlm":
        from kdkit.tasks.vlm import VLMTask
        return VLMTask()
    raise ValueError(f"unknown task {name!r}")
