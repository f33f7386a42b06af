"""The base of every config section, shared by kdkit.config.schema and kdkit.config.model_spec."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # inf and nan are never meaningful settings (a rate of inf, a mean of nan): rejected like any bad number
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def positive_size(v):
    if v is not None and (v[0] <= 0 or v[1] <= 0):
        raise ValueError("height and width must be positive")
    return v
