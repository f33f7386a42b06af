"""Errors a user can fix: the CLI prints them without a traceback and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad usage, config or data. The message names the file, dotted config path or sample index."""

    exit_code = 2


class ConfigError(UserError):
    """One or more config problems, each as (dotted path, message); all are reported at once."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(problems)} config error(s){where}:"]
        lines += [f"  {path or '<root>'}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))


class DataError(UserError):
    """A data problem: names the file or sample."""
