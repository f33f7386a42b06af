"""write_report on synthetic run directories."""

import json

import pytest
import yaml

from kdkit.errors import UserError
from kdkit.report import HistoryWarning, read_history, write_report

PNG = b"\x89PNG\r\n\x1a\n"
PLOTS = ("loss.png", "val_accuracy.png", "accuracy_vs_params.png")

CONFIG = {
    "task": "classification", "output_dir": "runs/x", "compare_baseline": True,
    "data": {"source": "fashion_mnist", "path": None},
    "teacher": {"factory": "kdkit.models.zoo:fmnist_cnn", "kwargs": {"width": 64, "depth": 3}},
    "student": {"hf_config": {"model_type": "vit", "hidden_size": 64}, "image_size": [28, 28]},
    "distill": {"temperature": 4.0, "terms": [{"kind": "ce", "weight": 0.1, "name": None},
                                              {"kind": "kd", "weight": 0.9, "divergence": "forward_kl",
                                               "temperature": None}]},
    "eval": {"batch_size": 256},
}
METRICS = {
    "task": "classification",
    "student": {"accuracy": 88.5, "top5": 99.1, "params": 101_000, "size_mb": 0.41, "latency_ms": 0.5,
                "throughput": 12345.6, "peak_mem_mb": 3.2},
    "teacher": {"accuracy": 91.0, "top5": 99.6, "params": 1_030_200, "size_mb": 4.12, "latency_ms": 2.0,
                "throughput": 2000.0, "peak_mem_mb": 30.0},
    "baseline": {"accuracy": 87.88, "top5": 98.9, "params": 101_000, "size_mb": 0.41, "latency_ms": 0.52,
                 "throughput": 12000.0, "peak_mem_mb": 3.1},
    "gain": {"accuracy": 0.62, "top5": 0.2}, "compression": 10.2, "speedup": 4.0,
}


def history(parts=("ce", "kd"), steps=40):
    lines = []
    for s in range(10, steps + 1, 10):
        line = {"kind": "train", "step": s, "epoch": s / 20, "lr": 1e-3, "time_s": 3.5 * s, "grad_norm": 1.0}
        line.update({p: 1.0 / s + i for i, p in enumerate(parts)})
        line["loss"] = sum(line[p] for p in parts)
        lines.append(line)
        if s % 20 == 0:
            lines.append({"kind": "eval", "step": s, "epoch": s / 20, "accuracy": 80 + s / 10, "top5": 99.0,
                          "loss": 0.5, "new_key": "tolerated"})
    lines.append({"kind": "skip", "step": steps, "reason": "nan loss"})
    return "\n".join(json.dumps(x) for x in lines) + "\n"


def make_run(root, *, metrics=METRICS, config=CONFIG, baseline=True):
    root.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (root / "config.yaml").write_text(yaml.safe_dump(config))
    (root / "history.jsonl").write_text(history())
    if metrics is not None:
        (root / "metrics.json").write_text(json.dumps(metrics))
    if baseline:
        (root / "baseline").mkdir()
        (root / "baseline" / "history.jsonl").write_text(history(parts=("ce",)))
    return root


def assert_plots(run):
    for name in PLOTS:
        data = (run / "plots" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, name


def test_full_report(tmp_path):
    run = make_run(tmp_path / "fmnist-kd")
    out = write_report(run)
    assert out == run / "report.md"
    md = out.read_text()
    assert md.startswith("# kdkit report: fmnist-kd")
    for text in ("classification", "`kdkit.models.zoo:fmnist_cnn`(depth=3, width=64)", "hf_config `vit`",
                 "0.1 × ce + 0.9 × kd (forward_kl, T=4)", "| Teacher | Baseline | Distilled | Gain |",
                 "| Accuracy (%) | 91.00 | 87.88 | 88.50 | +0.62 |", "| Params | 1.03M | 101K | 101K | — |",
                 "| Compression | — | — | 10.2x | — |", "| Speed-up | — | — | 4x | — |",
                 "| Steps | 40 | 40 |", "2m 20s", "84.00 (step 40)", "batch size 256",
                 "plots/loss.png", "plots/val_accuracy.png", "plots/accuracy_vs_params.png"):
        assert text in md, text
    assert_plots(run)


def test_student_only_run(tmp_path):
    metrics = {"task": "classification", "student": {"accuracy": 80.0, "params": 1000}}
    config = dict(CONFIG, teacher=None, compare_baseline=False)
    run = make_run(tmp_path / "plain", metrics=metrics, config=config, baseline=False)
    md = write_report(run).read_text()
    assert "**Teacher:** none" in md and "| Compression | — | — | — | — |" in md and "Baseline |" not in md.split("## Training")[1]
    assert_plots(run)


def test_no_config_and_empty_history(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "history.jsonl").write_text("")
    (run / "metrics.json").write_text(json.dumps({"task": "classification", "student": {}}))
    md = write_report(run).read_text()
    assert "| Steps | — |" in md
    assert_plots(run)


@pytest.mark.parametrize("missing", ["metrics.json", "history.jsonl"])
def test_missing_file_is_a_user_error(tmp_path, missing):
    run = make_run(tmp_path / "r")
    (run / missing).unlink()
    with pytest.raises(UserError, match=missing):
        write_report(run)


def test_truncated_last_line_is_ignored(tmp_path):
    run = make_run(tmp_path / "killed")
    with open(run / "history.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 50, "lo')
    with pytest.warns(HistoryWarning, match="history.jsonl"):
        md = write_report(run).read_text()
    assert "| Steps | 40 |" in md
    assert_plots(run)


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text('{"kind": "train", "step": 1}\nnot json\n{"kind": "train", "step": 2}\n')
    with pytest.raises(UserError, match=r"history.jsonl:2"):
        read_history(path)


def test_invalid_metrics_json(tmp_path):
    run = make_run(tmp_path / "r")
    (run / "metrics.json").write_text("{oops")
    with pytest.raises(UserError, match="metrics.json"):
        write_report(run)
