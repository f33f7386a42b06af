"""YAML loading, dotted `key=value` overrides, validation with every error reported at once by dotted path."""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

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
            key = str(p) if str(p).strip() and "." not in str(p) else repr(str(p))  # an empty or dotted key, quoted
            parts.append(("." if parts else "") + key)
    return "".join(parts)


def apply_overrides(raw: dict, overrides: list[str]) -> tuple[dict, list[tuple[str, str]]]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict; returns it and the problems."""
    problems: list[tuple[str, str]] = []
    for item in overrides:
        if "=" not in item:
            problems.append((item.strip() or repr(item), "an override must look like dotted.key=value"))
            continue
        key, _, text = item.partition("=")
        parts = key.strip().split(".")
        if not all(parts):
            problems.append((key.strip() or repr(item), "an override must look like dotted.key=value (an empty key)"))
            continue
        try:
            value = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError:
            value = text
        node = raw
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


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The config section (pydantic model) a validation location points into, e.g. ('train',) -> TrainConfig."""
    model: Any = Config
    for part in loc:
        if isinstance(part, int):
            continue  # an item of a list field: the item type was already found
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        candidates = [field.annotation]
        model = None
        while candidates:  # Optional[...], list[...]: look inside for the section type
            t = candidates.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                model = t
                break
            candidates += typing.get_args(t)
        if model is None:
            return None
    return model


def _suggestion(loc: tuple) -> str:
    """'; did you mean 'lr'?' for a misspelt key, when a close known key exists."""
    model, key = _model_at(tuple(loc[:-1])), loc[-1] if loc else None
    if model is None or not isinstance(key, str):
        return ""
    close = difflib.get_close_matches(key, list(model.model_fields), n=1, cutoff=0.7)
    return f"; did you mean {close[0]!r}?" if close else ""


def validate(raw: Any, source: str | None = None) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError([("", f"the config must be a mapping, got {type(raw).__name__}")], source)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        merged: dict[str, list[str]] = {}
        for e in err.errors():
            # a union field reports once per member (`train.eval_every.int`, `...literal['epoch']`): one path
            loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and (p in _UNION_TAGS or p.startswith(("literal[", "function-")))))
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown key" + _suggestion(loc)
            merged.setdefault(_dotted(loc), []).append(msg)
        problems = [(path, "; or ".join(dict.fromkeys(msgs))) for path, msgs in merged.items()]
        raise ConfigError(problems, source) from None


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([("", f"config file not found: {path}")], str(path))
    try:
        data = path.read_bytes()
        raw = yaml.safe_load(data.decode("utf-8"))
    except OSError as err:
        raise ConfigError([("", f"cannot read the config file: {err.strerror or err}")], str(path)) from None
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError([("", f"not valid UTF-8 at line {line} (byte 0x{data[err.start]:02x})")], str(path)) from None
    except yaml.YAMLError as err:
        raise ConfigError([("", f"not valid YAML: {_yaml_problem(err)}")], str(path)) from None
    return raw if raw is not None else {}


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's several-line message as one line: what is wrong, and where."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def _local(path: str, kind: str) -> bool:
    """Whether a local path is an existing file (kind 'file') or directory ('dir'); any odd path is just absent."""
    try:
        p = Path(path).expanduser()
        return p.is_file() if kind == "file" else p.is_dir()
    except (OSError, RuntimeError, ValueError):  # a name too long, an unknown ~user, a NUL byte
        return False


def _missing_local_dir(path: Any) -> bool:
    """A path that cannot be a hub ID (absolute, or starting with . or ~) and names no directory."""
    return isinstance(path, str) and path.startswith(("/", ".", "~")) and not _local(path, "dir")


def file_problems(cfg: Config) -> list[tuple[str, str]]:
    """What a config names on disk and is missing, found before any training starts (hub IDs are not checked)."""
    problems: list[tuple[str, str]] = []
    for role in ("student", "teacher"):
        spec = getattr(cfg, role)
        if spec is None:
            continue
        if _missing_local_dir(spec.pretrained):
            problems.append((f"{role}.pretrained", f"directory not found: {spec.pretrained}"))
        if spec.hf_config is not None and _missing_local_dir(spec.hf_config.get("base")):
            problems.append((f"{role}.hf_config.base", f"directory not found: {spec.hf_config['base']}"))
        if spec.factory_file is not None and not _local(spec.factory_file, "file"):
            problems.append((f"{role}.factory", f"file not found: {spec.factory_file}"))
        if spec.run is not None and not (_local(f"{spec.run}/kdkit.json", "file")
                                         or _local(f"{spec.run}/student/kdkit.json", "file")):
            problems.append((f"{role}.run", f"{spec.run} is not a finished kdkit run (no student/kdkit.json); train it "
                                            "first (a run without a teacher) or point to one"))
    d = cfg.data
    if cfg.task == "lm" and d.text.streaming:
        from kdkit.data.text_stream import streaming_problems  # train.max_steps, data.limit_eval, ...

        problems += streaming_problems(cfg)
    if cfg.task == "lm":
        return problems + _text_problems(d)
    if cfg.task == "vlm":
        from kdkit.data.vlm import vlm_problems  # jsonl or hf, and the files they name

        return problems + vlm_problems(cfg)
    if d.source == "text_files":
        problems.append(("data.source", "text_files is for task: lm"))
    if d.source in ("image_folder", "hf", "jsonl") and not d.path:
        problems.append(("data.path", f"source {d.source} needs a path"))
    if d.source in ("image_folder", "hf", "jsonl") and d.image_size is None:
        problems.append(("data.image_size", f"source {d.source} needs the size [H, W] images are stored at"))
    if d.path and d.source in ("image_folder", "fashion_mnist") and not _local(d.path, "dir"):
        problems.append(("data.path", f"directory not found: {d.path}"))
    if d.path and d.source == "jsonl" and not _local(d.path, "file"):
        problems.append(("data.path", f"file not found: {d.path}"))
    if d.source == "hf" and _missing_local_dir(d.path):
        problems.append(("data.path", f"directory not found: {d.path}"))
    return problems


def _text_problems(d) -> list[tuple[str, str]]:
    """task: lm: text sources only, and the files they name."""
    sources = [(f"data.text.mixture[{i}]", m.source, m.path) for i, m in enumerate(d.text.mixture or [])]
    if not sources:
        if d.source not in ("jsonl", "hf", "text_files"):
            return [("data.source", f"task lm reads text: jsonl, hf or text_files (got {d.source})")]
        if not d.path:
            return [("data.path", f"source {d.source} needs a path")]
        sources = [("data", d.source, d.path)]
    problems = []
    for where, kind, path in sources:
        if kind == "jsonl" and not _local(path, "file"):
            problems.append((f"{where}.path" if where != "data" else "data.path", f"file not found: {path}"))
        if kind == "text_files" and path != "python:stdlib" and not _local(path, "dir"):
            problems.append((f"{where}.path" if where != "data" else "data.path", f"directory not found: {path}"))
        if kind == "hf" and _missing_local_dir(path):
            problems.append((f"{where}.path" if where != "data" else "data.path", f"directory not found: {path}"))
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
