"""Segments (``segments/*.yaml``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from closedloop.core.conditions import Condition
from closedloop.core.definitions.base import NAME_PATTERN, Definition


class SegmentDef(Definition):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    # Whom the segment selects: customers (profiles), or B2B accounts (segments.accounts).
    of: Literal["customers", "accounts"] = "customers"
    where: Condition
