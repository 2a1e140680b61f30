"""Computed traits (``traits/*.yaml``)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field, model_validator

from closedloop.core.definitions.base import NAME_PATTERN, Definition


class Aggregation(StrEnum):
    COUNT = "count"
    SUM = "sum"
    AVG = "avg"
    MIN = "min"
    MAX = "max"
    FIRST = "first"
    LAST = "last"
    DISTINCT_COUNT = "distinct_count"
    MOST_FREQUENT = "most_frequent"


class TraitDef(Definition):
    """A computed trait: an aggregation over a customer's events, within a window."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    event: str | None = Field(None, description="event name; omitted = all track events")
    aggregation: Aggregation
    column: str | None = Field(
        None, description="events column to aggregate (revenue, category, channel, ...)"
    )
    window_days: int | None = Field(None, ge=1, description="last N days; omitted = lifetime")

    @model_validator(mode="after")
    def _check(self) -> TraitDef:
        if self.aggregation is not Aggregation.COUNT and not self.column:
            raise ValueError(f"aggregation {self.aggregation.value!r} needs a `column`")
        return self
