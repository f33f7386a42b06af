"""report.md for a person, built only from the files of a run directory (so `kdkit report` can redo it anytime)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from kdkit.errors import UserError
from kdkit.evaluate.table import comparison_table, render_markdown_table, teacher_student_table
from kdkit.report import plots
from kdkit.report.history import is_number, loss_parts, of_kind, read_history, series

QUALITY_BY_TASK = {"classification": "accuracy", "lm": "perplexity", "causal_lm": "perplexity",
                   "vision_language": "exact_match", "vlm": "exact_match"}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _read_config(path: Path) -> dict:
    """The resolved config, or {} when absent: the report then just says less about the models."""
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e})") from None
    return data if isinstance(data, dict) else {}


def describe_model(spec: dict | None) -> str:
    """One line for a teacher/student config: where it comes from (factory + kwargs, pretrained, hf_config, run)."""
    if not spec:
        return "none"
    if spec.get("factory"):
        kwargs = spec.get("kwargs") or {}
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        text = f"`{spec['factory']}`" + (f"({args})" if args else "")
    elif spec.get("pretrained"):
        text = f"pretrained `{spec['pretrained']}`"
    elif spec.get("hf_config"):
        cfg = dict(spec["hf_config"])
        head = cfg.pop("base", None) or cfg.pop("model_type", None) or "model"
        rest = ", ".join(f"{k}={v!r}" for k, v in cfg.items())
        text = f"hf_config `{head}`" + (f" ({rest})" if rest else "")
    elif spec.get("run"):
        text = f"student of run `{spec['run']}`"
    else:
        text = "unspecified"
    if spec.get("image_size"):
        text += f", input {'x'.join(map(str, spec['image_size']))}"
    return text


def describe_loss(config: dict) -> str | None:
    distill = config.get("distill") or {}
    terms = distill.get("terms") or []
    if not isinstance(terms, list) or not terms:
        return None
    out = []
    for t in terms:
        if not isinstance(t, dict):
            continue
        label = t.get("name") or t.get("kind", "?")
        extra = []
        if t.get("kind") in ("kd", "dkd"):
            if t.get("kind") == "kd" and t.get("divergence"):
                extra.append(str(t["divergence"]))
            temp = t.get("temperature") or distill.get("temperature")
            if temp is not None:
                extra.append(f"T={temp:g}" if is_number(temp) else f"T={temp}")
        out.append(f"{t.get('weight', 1.0):g} × {label}" + (f" ({', '.join(extra)})" if extra else ""))
    return " + ".join(out) if out else None


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def _training_summary(key: str, runs: dict[str, list[dict]]) -> str:
    """Steps, epochs, wall time, final loss and best validation figure per run (distilled, baseline)."""
    higher_better = key != "perplexity"
    rows = [["", *runs], ["Steps"], ["Epochs"], ["Wall time"], ["Final training loss"], [f"Best validation {key}"]]
    for records in runs.values():
        train, evals = of_kind(records, "train"), of_kind(records, "eval")
        last = train[-1] if train else {}
        rows[1].append(f"{int(last['step']):,}" if is_number(last.get("step")) else "—")
        rows[2].append(f"{last['epoch']:.2f}" if is_number(last.get("epoch")) else "—")
        rows[3].append(format_duration(last["time_s"]) if is_number(last.get("time_s")) else "—")
        rows[4].append(f"{last['loss']:.4f}" if is_number(last.get("loss")) else "—")
        steps, values = series(evals, key)
        if values:
            best = (max if higher_better else min)(range(len(values)), key=values.__getitem__)
            rows[5].append(f"{values[best]:.2f} (step {int(steps[best]):,})")
        else:
            rows[5].append("—")
    return render_markdown_table(rows)


def _headline(key: str, metrics: dict) -> str:
    """One sentence with the figures a reader looks for first."""
    student, teacher = metrics.get("student") or {}, metrics.get("teacher") or {}
    parts = []
    if is_number(student.get(key)):
        unit = "" if key == "perplexity" else "%"
        text = f"The distilled student reaches {key} {student[key]:.2f}{unit}"
        gain = (metrics.get("gain") or {}).get(key)
        if is_number(gain):
            text += f", {gain:+.2f} vs the same student trained without a teacher"
        if is_number(teacher.get(key)):
            text += f" (teacher: {teacher[key]:.2f}{unit})"
        parts.append(text)
    if is_number(metrics.get("compression")):
        parts.append(f"it has {metrics['compression']:.3g}x fewer parameters than the teacher")
    if is_number(metrics.get("speedup")):
        parts.append(f"it answers {metrics['speedup']:.3g}x as fast as the teacher" if key == "perplexity" else
                     f"it runs a single sample {metrics['speedup']:.3g}x as fast as the teacher")
    if not parts:
        return ""
    sentence = "; ".join(parts)
    return sentence[0].upper() + sentence[1:] + ".\n\n"


def _write_atomic(path: Path, text: str) -> None:
    # A reader (or a crash) never sees half a report.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(run_dir: str | Path) -> Path:
    """Write <run_dir>/report.md and <run_dir>/plots/*.png from config.yaml, history.jsonl, metrics.json and,
    when present, baseline/history.jsonl. Returns report.md's path.

    Raises UserError naming metrics.json or history.jsonl when either is missing or unreadable.
    """
    run_dir = Path(run_dir)
    missing = [p for p in (run_dir / "metrics.json", run_dir / "history.jsonl") if not p.is_file()]
    if missing:
        raise UserError(f"cannot write the report of {run_dir}: missing {', '.join(str(p) for p in missing)}")
    metrics = _read_json(run_dir / "metrics.json")
    history = read_history(run_dir / "history.jsonl")
    config = _read_config(run_dir / "config.yaml")
    baseline_path = run_dir / "baseline" / "history.jsonl"
    baseline = read_history(baseline_path) if baseline_path.is_file() else None

    task = str(metrics.get("task") or config.get("task") or "classification")
    key = QUALITY_BY_TASK.get(task, "accuracy")
    val_key = "perplexity" if task == "vlm" else key  # validation runs no generation: answer perplexity
    train, evals = of_kind(history, "train"), of_kind(history, "eval")
    base_train = of_kind(baseline, "train") if baseline is not None else None
    base_evals = of_kind(baseline, "eval") if baseline is not None else None

    plot_dir = run_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    terms = [t.get("name") or t.get("kind") for t in (config.get("distill") or {}).get("terms") or []
             if isinstance(t, dict)]
    parts = loss_parts(train + (base_train or []), preferred=terms)
    plots.plot_losses(plot_dir / "loss.png", parts, train, base_train)
    plots.plot_validation(plot_dir / "val_accuracy.png", val_key, evals, base_evals)
    plots.plot_quality_vs_params(plot_dir / "accuracy_vs_params.png", key, metrics)

    lines = [f"# kdkit report: {run_dir.resolve().name}", "", f"- **Task:** {task}"]
    if config.get("teacher") or not metrics.get("teacher"):
        lines.append(f"- **Teacher:** {describe_model(config.get('teacher'))}")
    else:
        lines.append("- **Teacher:** used (not described: config.yaml is missing)")
    lines.append(f"- **Student:** {describe_model(config.get('student'))}")
    loss = describe_loss(config)
    if loss:
        lines.append(f"- **Loss:** {loss}")
    data = config.get("data") or {}
    if isinstance(data, dict) and data.get("source"):
        lines.append(f"- **Data:** {data['source']}" + (f" (`{data['path']}`)" if data.get("path") else ""))
    lines += ["", "## Results", "", _headline(key, metrics) + render_markdown_table(comparison_table(metrics))]
    batch = (config.get("eval") or {}).get("batch_size")
    at = f"batch size {int(batch):,}" if is_number(batch) else "the evaluation batch size"
    if task == "vlm":
        lines += ["Answer quality (exact match, F1) is measured on greedy answers to the test questions, perplexity on the "
                  "answer tokens.", "", "### Teacher vs student", "", render_markdown_table(teacher_student_table(metrics)),
                  "Latency is the median time to answer one test question greedily (batch 1); throughput is generated "
                  f"tokens per second at {at}; peak memory is the device's peak allocation (CUDA) or the process's "
                  "approximate resident growth (CPU) meanwhile.", ""]
    elif task == "lm":
        new = (config.get("eval") or {}).get("max_new_tokens", "eval.max_new_tokens")
        lines += [f"Quality is measured on the test split (perplexity of the next token; KL from the teacher). "
                  f"Latency is the median time to answer one test prompt greedily (up to {new} new tokens); "
                  "throughput is generated tokens per second; peak memory is the device's peak allocation (CUDA).", ""]
    else:
        lines += [f"Quality is measured on the test split. Latency is the median single-sample forward pass; "
                  f"throughput is samples per second at {at}; "
                  "peak memory is the device's peak allocation (CUDA) or the process's approximate resident growth "
                  "(CPU) during the throughput run.", ""]
    runs = {"Distilled": history} if baseline is None else {"Distilled": history, "Baseline": baseline}
    lines += ["## Training", "", _training_summary(val_key, runs)]
    lines += ["## Plots", "", "![Training loss per part](plots/loss.png)", "",
              f"![Validation {val_key}](plots/val_accuracy.png)", "",
              f"![Test {key} vs parameters](plots/accuracy_vs_params.png)", ""]
    out = run_dir / "report.md"
    _write_atomic(out, "\n".join(lines))
    return out
