"""The README's config reference, rendered from the schema so docs and code cannot drift apart.

`python -m kdkit.config.reference` prints it; a test checks that README.md holds exactly this text.
"""

from __future__ import annotations

import json
import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from kdkit.config.schema import Config

BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"


def _model_type(annotation) -> type[BaseModel] | None:
    """The pydantic section behind an annotation (Optional[X], list[X] and X itself)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_type(arg)
        if found is not None:
            return found
    return None


def _default(field) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        value = [v.model_dump(exclude_defaults=True) for v in value]
    return f"`{json.dumps(value)}`"


def _rows(model: type[BaseModel], prefix: str, outer: tuple[type[BaseModel], ...] = ()) -> list[str]:
    """Rows of `model`'s fields; a section that extends one it sits in (an ensemble member is a model spec) lists only
    the keys it adds."""
    rows: list[str] = []
    parent = next((o for o in outer if o is not model and issubclass(model, o)), None)
    for name, field in model.model_fields.items():
        if parent is not None and name in parent.model_fields:
            continue
        path = f"{prefix}{name}"
        section = _model_type(field.annotation)
        desc = (field.description or (section.__doc__ or "").strip().splitlines()[0] if section else field.description) or ""
        is_list = list in (typing.get_origin(field.annotation), *map(typing.get_origin, typing.get_args(field.annotation)))
        rows.append(f"| `{path}` | {_default(field)} | {desc.replace('|', '/')} |")
        if section is not None:
            rows += _rows(section, f"{path}[]." if is_list else f"{path}.", (*outer, model))
    if parent is not None:
        rows.append(f"| `{prefix}*` | | Every key of the enclosing model spec above. |")
    return rows


def render_reference() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|", *_rows(Config, "")]
    return "\n".join([BEGIN, *lines, END])


if __name__ == "__main__":
    print(render_reference())
