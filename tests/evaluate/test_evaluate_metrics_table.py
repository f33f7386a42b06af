"""build_metrics' derived figures and the comparison table's formatting."""

import io

import pytest
from rich.console import Console

from kdkit.evaluate import build_metrics, comparison_table, human_count, print_table, render_markdown_table

STUDENT = {"accuracy": 88.5, "top5": 99.1, "agreement": 91.25, "params": 101_000, "size_mb": 0.41,
           "latency_ms": 0.5, "throughput": 12345.6, "peak_mem_mb": 3.2}
TEACHER = {"accuracy": 91.0, "top5": 99.6, "params": 1_030_200, "size_mb": 4.12, "latency_ms": 2.0,
           "throughput": 2000.0, "peak_mem_mb": 30.0}
BASELINE = {"accuracy": 87.88, "top5": 98.9, "params": 101_000, "size_mb": 0.41, "latency_ms": 0.52,
            "throughput": 12000.0, "peak_mem_mb": 3.1}


def test_build_metrics_full():
    m = build_metrics("classification", STUDENT, teacher=TEACHER, baseline=BASELINE)
    assert m["task"] == "classification"
    assert m["student"] == STUDENT and m["student"] is not STUDENT
    assert m["gain"] == {"accuracy": 0.62, "top5": 0.2}
    assert m["compression"] == pytest.approx(10.2)
    assert m["speedup"] == 4.0


def test_build_metrics_partial():
    m = build_metrics("classification", STUDENT)
    assert set(m) == {"task", "student"}
    m = build_metrics("classification", STUDENT, teacher={"accuracy": 90.0, "params": 300_000})
    assert m["compression"] == pytest.approx(2.9703) and "speedup" not in m and "gain" not in m
    m = build_metrics("causal_lm", {"perplexity": 12.5}, baseline={"perplexity": 14.0}, quality_keys=("perplexity",))
    assert m["gain"] == {"perplexity": -1.5}


def test_comparison_table_rows():
    rows = comparison_table(build_metrics("classification", STUDENT, teacher=TEACHER, baseline=BASELINE))
    assert rows[0] == ["", "Teacher", "Baseline", "Distilled", "Gain"]
    by = {r[0]: r[1:] for r in rows[1:]}
    assert by["Accuracy (%)"] == ["91.00", "87.88", "88.50", "+0.62"]
    assert by["Top-5 (%)"][3] == "+0.20"
    assert by["Agreement (%)"] == ["—", "—", "91.25", "—"]
    assert by["Params"] == ["1.03M", "101K", "101K", "—"]
    assert by["Size (MB)"] == ["4.12", "0.410", "0.410", "—"]
    assert by["Latency (ms)"] == ["2.00", "0.520", "0.500", "—"]
    assert by["Throughput (/s)"][2] == "12,346"
    assert rows[-2] == ["Compression", "—", "—", "10.2x", "—"]
    assert rows[-1] == ["Speed-up", "—", "—", "4x", "—"]
    assert [r[0] for r in rows[1:4]] == ["Accuracy (%)", "Top-5 (%)", "Agreement (%)"]


def test_comparison_table_student_only():
    rows = comparison_table({"task": "classification", "student": {"accuracy": 50.0}})
    assert all(len(r) == 5 for r in rows)
    by = {r[0]: r[1:] for r in rows[1:]}
    assert by["Accuracy (%)"] == ["—", "—", "50.00", "—"]
    assert by["Latency (ms)"] == ["—"] * 4 and by["Compression"] == ["—"] * 4


def test_negative_gain_and_lm_rows():
    rows = comparison_table(build_metrics("causal_lm", {"perplexity": 12.5}, baseline={"perplexity": 14.0},
                                          quality_keys=("perplexity",)))
    labels = [r[0] for r in rows]
    assert "Perplexity" in labels and "Accuracy (%)" not in labels
    assert rows[labels.index("Perplexity")][4] == "-1.50"


@pytest.mark.parametrize("n,text", [(512, "512"), (12_345, "12.3K"), (1_034_567, "1.03M"), (999_999, "1M"),
                                    (7_241_732_096, "7.24B")])
def test_human_count(n, text):
    assert human_count(n) == text


def test_markdown_and_rich():
    rows = [["", "Teacher", "Distilled"], ["Acc|uracy", "91.00", "88.50"]]
    md = render_markdown_table(rows)
    assert md.splitlines() == ["|  | Teacher | Distilled |", "|:---|---:|---:|", "| Acc\\|uracy | 91.00 | 88.50 |"]
    buf = io.StringIO()
    print_table(rows, title="Comparison", console=Console(file=buf, width=80))
    assert "Comparison" in buf.getvalue() and "88.50" in buf.getvalue()
