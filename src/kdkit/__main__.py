"""`python -m kdkit ...` is the same program as `kdkit ...`."""

from kdkit.cli.main import entry

entry()
