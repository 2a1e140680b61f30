"""Segments (``segments/*.yaml``)."""

from __future__ import annotations

from pydantic import Field

from closedloop.core.conditions import Condition
from closedloop.core.definitions.base import NAME_PATTERN, Definition


class SegmentDef(Definition):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    where: Condition
