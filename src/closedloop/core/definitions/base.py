"""The base of every definition model, and small parsers definitions share."""

from __future__ import annotations

from datetime import date
from typing import Any

from pydantic import BaseModel, ConfigDict

NAME_PATTERN = r"^[a-z][a-z0-9_]*$"


class Definition(BaseModel):
    """Base for every definition: unknown keys are errors (a typo must not pass silently)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def birthday_of(value: Any) -> date | None:
    """Parse a birthday trait (``YYYY-MM-DD``); anything else is treated as unknown."""
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            return None
    return None
