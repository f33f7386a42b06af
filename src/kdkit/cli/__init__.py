"""Command-line interface: `kdkit train|validate|eval|report|demo`."""
