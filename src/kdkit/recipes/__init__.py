"""Shipped recipes (YAML configs) and assets (demo teachers), found the same way installed or in a checkout."""

from __future__ import annotations

from pathlib import Path

from kdkit.cache import cache_dir  # noqa: F401  (re-exported: the demo keeps trained teachers there)
from kdkit.errors import UserError

RECIPES = Path(__file__).resolve().parent
ASSETS = RECIPES.parent / "assets"


def recipe_path(name: str) -> Path:
    path = RECIPES / name
    if not path.is_file():
        known = sorted(p.name for p in RECIPES.glob("*.yaml"))
        raise UserError(f"no shipped recipe {name!r}; known: {', '.join(known)}")
    return path


def asset_path(name: str) -> Path:
    return ASSETS / name
