"""The teacher / baseline / distilled comparison, as rows of strings for a terminal or a Markdown report."""

from __future__ import annotations

from numbers import Real

DASH = "—"
HEADER = ["", "Teacher", "Baseline", "Distilled", "Gain"]
COLUMNS = ("teacher", "baseline", "student")

# (metrics key, row label); percentages are shown with 2 decimals, perplexity too.
QUALITY_ROWS = [("accuracy", "Accuracy (%)"), ("top5", "Top-5 (%)"), ("agreement", "Agreement (%)"),
                ("perplexity", "Perplexity"), ("exact_match", "Exact match (%)"), ("f1", "F1 (%)")]
# Rows a classification table always shows (as "—" when absent) so tables of different runs line up.
CLASSIFICATION_ROWS = {"accuracy", "top5", "agreement"}
EFFICIENCY_ROWS = [("params", "Params"), ("size_mb", "Size (MB)"), ("latency_ms", "Latency (ms)"),
                   ("throughput", "Throughput (/s)"), ("peak_mem_mb", "Peak memory (MB)")]


def _value(d: dict | None, key: str) -> float | None:
    v = (d or {}).get(key)
    return None if isinstance(v, bool) or not isinstance(v, Real) else float(v)


def human_count(n: float) -> str:
    """12345 -> '12.3K', 1034567 -> '1.03M' (3 significant digits), small counts as they are."""
    if abs(n) < 1000:
        return str(int(n))
    for scale, suffix in ((1e3, "K"), (1e6, "M"), (1e9, "B"), (1e12, "T")):
        short = float(f"{n / scale:.3g}")
        if abs(short) < 1000 or suffix == "T":  # 999_999 rounds to 1000K: carry it to the next suffix
            return f"{short:g}{suffix}"
    raise AssertionError("unreachable")


def format_number(x: float) -> str:
    """Readable at any scale: 12,346 / 123.5 / 4.12 / 0.0123."""
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:#.3g}"  # keeps trailing zeros: 0.500 lines up with 2.00


def _cell(key: str, v: float | None) -> str:
    if v is None:
        return DASH
    if key == "params":
        return human_count(v)
    if key in {"accuracy", "top5", "agreement", "exact_match", "f1", "perplexity"}:
        return f"{v:.2f}"
    return format_number(v)


def _ratio(v: float | None) -> str:
    return DASH if v is None else f"{v:.3g}x"


def comparison_table(metrics: dict) -> list[list[str]]:
    """Rows (header first) comparing teacher, baseline and distilled student, ending with compression and speed-up.

    Gain is student - baseline, taken from metrics["gain"] or, for a quality row it lacks, computed when both
    figures exist; it is shown signed ("+0.62"). Anything missing is shown as "—".
    """
    models = {c: metrics.get(c) or {} for c in COLUMNS}
    classification = metrics.get("task", "classification") == "classification"
    gains = metrics.get("gain") or {}
    rows = [list(HEADER)]
    for key, label in QUALITY_ROWS:
        present = any(_value(models[c], key) is not None for c in COLUMNS)
        if not present and not (classification and key in CLASSIFICATION_ROWS):
            continue
        gain = _value(gains, key)
        if gain is None:
            s, b = _value(models["student"], key), _value(models["baseline"], key)
            gain = None if s is None or b is None else s - b
        rows.append([label, *(_cell(key, _value(models[c], key)) for c in COLUMNS),
                     DASH if gain is None else f"{gain:+.2f}"])
    for key, label in EFFICIENCY_ROWS:
        rows.append([label, *(_cell(key, _value(models[c], key)) for c in COLUMNS), DASH])
    rows.append(["Compression", DASH, DASH, _ratio(_value(metrics, "compression")), DASH])
    rows.append(["Speed-up", DASH, DASH, _ratio(_value(metrics, "speedup")), DASH])
    if not metrics.get("teacher") and not metrics.get("baseline"):
        rows[0][3] = "Student"  # plain supervised training (a teacher or a baseline being made): nothing was distilled
    return rows


# (metrics key, row label, how the student's figure improves on the teacher's)
TEACHER_STUDENT_ROWS = [("params", "Parameters", "fewer"), ("size_mb", "Size (MB)", "reduction"),
                        ("latency_ms", "Latency, batch 1 (ms)", "faster"), ("throughput", "Throughput (tokens/s)", "more"),
                        ("peak_mem_mb", "Peak memory (MB)", "reduction"), ("avg_new_tokens", "Avg generated tokens", "diff")]


def _improvement(kind: str, teacher: float | None, student: float | None) -> str:
    if teacher is None or student is None:
        return DASH
    if kind == "diff":
        return f"{student - teacher:+.2f}"
    if kind == "reduction":
        return DASH if teacher <= 0 else f"{100 * (1 - student / teacher):.1f}% smaller"
    if kind in ("fewer", "faster"):
        return DASH if student <= 0 else f"{teacher / student:.3g}x {kind}"
    return DASH if teacher <= 0 else f"{student / teacher:.3g}x"


def teacher_student_table(metrics: dict) -> list[list[str]]:
    """Rows (header first) Metric | Teacher | Student | Improvement: is the distilled student worth deploying?
    Parameters, size, generation latency at batch 1, throughput, peak memory and answer length."""
    teacher, student = metrics.get("teacher") or {}, metrics.get("student") or {}
    rows = [["Metric", "Teacher", "Student", "Improvement"]]
    for key, label, kind in TEACHER_STUDENT_ROWS:
        t, s = _value(teacher, key), _value(student, key)
        if t is None and s is None:
            continue
        rows.append([label, _cell(key, t), _cell(key, s), _improvement(kind, t, s)])
    return rows


def render_markdown_table(rows: list[list[str]]) -> str:
    """A GitHub Markdown table: the first row is the header, the first column left-aligned, the rest right."""
    if not rows:
        return ""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    width = len(rows[0])
    align = "|" + "|".join([":---"] + ["---:"] * (width - 1)) + "|"
    return "\n".join([line(rows[0]), align, *(line(r) for r in rows[1:])]) + "\n"


def print_table(rows: list[list[str]], title: str | None = None, console=None) -> None:
    """Print the rows with rich (header first); `console` defaults to a new rich Console on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, name in enumerate(rows[0] if rows else []):
        table.add_column(name, justify="left" if i == 0 else "right", style="bold" if i == 0 else None)
    for r in rows[1:]:
        table.add_row(*map(str, r))
    (console or Console()).print(table)
