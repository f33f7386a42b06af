"""The report's PNG plots. Headless (Agg); every plot is drawn even when its data is missing, with a note."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # reports are written on servers without a display

from matplotlib.figure import Figure  # noqa: E402  (after the backend is chosen)

from kdkit.report.history import is_number, series  # noqa: E402

DISTILLED = dict(color="tab:blue", linestyle="-", label="distilled")
BASELINE = dict(color="tab:orange", linestyle="--", label="baseline")


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_losses(path: Path, parts: list[str], train: list[dict], baseline_train: list[dict] | None) -> Path:
    """One subplot per loss part (the total first) vs step; the baseline's curves dashed."""
    n = max(1, len(parts))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    if not parts:
        _empty(axes[0], "no training loss logged")
    for ax, part in zip(axes, parts):
        drawn = False
        for records, style in ((train, DISTILLED), (baseline_train, BASELINE)):
            x, y = series(records or [], part)
            if x:
                ax.plot(x, y, linewidth=1.2, **style)
                drawn = True
        if not drawn:
            _empty(ax, f"no {part} values")
            continue
        ax.set_title("total loss" if part == "loss" else part)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(parts) or 1:]:
        ax.set_visible(False)
    return _save(fig, path)


def plot_validation(path: Path, key: str, evals: list[dict], baseline_evals: list[dict] | None) -> Path:
    """Validation `key` (accuracy) vs step, distilled and baseline."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    drawn = False
    for records, style in ((evals, DISTILLED), (baseline_evals, BASELINE)):
        x, y = series(records or [], key)
        if x:
            ax.plot(x, y, marker="o", markersize=3, linewidth=1.2, **style)
            drawn = True
    if drawn:
        ax.set_xlabel("step")
        ax.set_ylabel(f"validation {key}" + (" (%)" if key != "perplexity" else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    else:
        _empty(ax, f"no validation {key} logged")
    return _save(fig, path)


def plot_quality_vs_params(path: Path, key: str, metrics: dict) -> Path:
    """Teacher, baseline and distilled student as labelled points: `key` vs parameters on a log axis."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    # Baseline and distilled share an architecture, hence an x: their labels go on opposite sides.
    models = [("teacher", "teacher", "tab:green", (6, 6)), ("baseline", "baseline", "tab:orange", (6, -12)),
              ("student", "distilled", "tab:blue", (6, 6))]
    drawn = False
    for name, label, color, offset in models:
        m = metrics.get(name) or {}
        if is_number(m.get("params")) and m["params"] > 0 and is_number(m.get(key)):
            ax.scatter([m["params"]], [m[key]], color=color, s=40, zorder=3)
            ax.annotate(f"{label} ({m[key]:.2f})", (m["params"], m[key]), textcoords="offset points",
                        xytext=offset, fontsize="small")
            drawn = True
    if drawn:
        ax.set_xscale("log")
        from matplotlib.ticker import NullFormatter

        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels (2x10^4, 3x10^4, ...) overlap
        ax.set_xlabel("parameters")
        ax.set_ylabel(f"test {key}" + (" (%)" if key != "perplexity" else ""))
        ax.margins(x=0.3, y=0.2)
        ax.grid(alpha=0.3, which="both")
    else:
        _empty(ax, f"no {key} with parameter counts in metrics.json")
    return _save(fig, path)
