"""Evaluation: quality metrics, efficiency measurement and the teacher/baseline/student comparison.

- `classification_quality(model, loader, device, reference=None, gather=None)` -> accuracy, top5, loss, agreement
- `measure_efficiency(model, example, batch_size=...)` -> params, size_mb, latency_ms, throughput, peak_mem_mb
- `build_metrics(task, student, teacher=, baseline=)` -> the metrics.json dict (gain, compression, speedup)
- `comparison_table(metrics)` -> rows for `render_markdown_table` / `print_table`
"""

from kdkit.evaluate.efficiency import count_params, measure_efficiency, safetensors_size
from kdkit.evaluate.metrics import build_metrics
from kdkit.evaluate.quality import classification_quality
from kdkit.evaluate.table import comparison_table, human_count, print_table, render_markdown_table

__all__ = ["build_metrics", "classification_quality", "comparison_table", "count_params", "human_count",
           "measure_efficiency", "print_table", "render_markdown_table", "safetensors_size"]
