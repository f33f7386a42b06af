"""report.md and its plots from a run directory: `write_report(run_dir) -> Path`.

Training code never imports this package, so matplotlib stays out of training processes; the CLI does.
"""

from kdkit.report.history import HistoryWarning, read_history
from kdkit.report.write import describe_model, write_report

__all__ = ["HistoryWarning", "describe_model", "read_history", "write_report"]
