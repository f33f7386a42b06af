"""YAML loading, dotted `key=value` overrides, validation with every error reported at once by dotted path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kdkit.config.schema import Config
from kdkit.errors import ConfigError


_UNION_TAGS = {"int", "float", "str", "bool", "none", "list[str]", "tuple[int, int]", "tuple[float, float]",
               "constrained-int", "dict[str,any]"}


def _dotted(loc: tuple) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)


def apply_overrides(raw: dict, overrides: list[str]) -> tuple[dict, list[tuple[str, str]]]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict; returns it and the problems."""
    problems: list[tuple[str, str]] = []
    for item in overrides:
        if "=" not in item:
            problems.append((item, "an override must look like dotted.key=value"))
            continue
        key, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append((".".join(parts[: i + 1]), f"is {type(child).__name__}, cannot set {key}"))
                break
            node = child
        else:
            node[parts[-1]] = value
    return raw, problems


def validate(raw: Any, source: str | None = None) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError([("", f"the config must be a mapping, got {type(raw).__name__}")], source)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        merged: dict[str, list[str]] = {}
        for e in err.errors():
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown key"
            # a union field reports once per member (`train.eval_every.int`, `...literal['epoch']`): one path
            loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and (p in _UNION_TAGS or p.startswith(("literal[", "function-")))))
            merged.setdefault(_dotted(loc), []).append(msg)
        problems = [(path, "; or ".join(dict.fromkeys(msgs))) for path, msgs in merged.items()]
        raise ConfigError(problems, source) from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([("", f"config file not found: {path}")], str(path))
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError([("", f"not valid YAML: {err}")], str(path)) from None
    return raw if raw is not None else {}


def file_problems(cfg: Config) -> list[tuple[str, str]]:
    """What a config names on disk and is missing, found before any training starts (hub IDs are not checked)."""
    problems: list[tuple[str, str]] = []
    for role in ("student", "teacher"):
        spec = getattr(cfg, role)
        if spec is None:
            continue
        if spec.factory_file is not None:
            f = Path(spec.factory_file).expanduser()
            if not f.is_file():
                problems.append((f"{role}.factory", f"file not found: {f}"))
        if spec.run is not None:
            d = Path(spec.run).expanduser()
            if not ((d / "kdkit.json").is_file() or (d / "student" / "kdkit.json").is_file()):
                problems.append((f"{role}.run", f"{d} is not a finished kdkit run (no student/kdkit.json); train it first "
                                                "(a run without a teacher) or point to one"))
    d = cfg.data
    if d.source in ("image_folder", "hf") and not d.path:
        problems.append(("data.path", f"source {d.source} needs a path"))
    if d.source in ("image_folder", "hf") and d.image_size is None:
        problems.append(("data.image_size", f"source {d.source} needs the size [H, W] images are stored at"))
    if d.path and d.source in ("image_folder", "fashion_mnist") and not Path(d.path).expanduser().is_dir():
        problems.append(("data.path", f"directory not found: {d.path}"))
    return problems


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a config file; raises ConfigError listing every problem."""
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError([("", f"the config must be a mapping, got {type(raw).__name__}")], str(path))
    raw, problems = apply_overrides(raw, list(overrides or []))
    try:
        cfg = validate(raw, str(path))
    except ConfigError as err:
        raise ConfigError(problems + err.problems, str(path)) from None
    problems += file_problems(cfg)
    if problems:
        raise ConfigError(problems, str(path))
    return cfg


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML: defaults filled in, overrides applied."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
