"""Traits (``traits/*.yaml``): computed from events, or merged from identify calls.

A ``computed`` trait (the default kind) aggregates a customer's events within a window. A
``profile`` trait takes one field of the traits that identify calls (CRM imports, web forms,
the app) state, and merges the values a customer's many records give by a declared strategy:

* ``latest`` — the most recently stated value;
* ``first`` — the earliest stated value;
* ``max`` — the largest value (numbers compare as numbers when ``type: number``);
* ``most_frequent`` — the value stated most often;
* ``source_priority`` — the value from the highest-priority source in ``sources`` (first
  listed wins, e.g. ``[crm, pos, web]``: CRM beats a web form); within one source the latest.
  Sources not listed count only when no listed source stated a value.

Ties are broken the same way on every engine: by the next rule above that applies (for
``most_frequent`` and ``source_priority`` the latest, then) the smallest value. Empty values
(null, empty or blank text) are never chosen.
"""

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


class TraitKind(StrEnum):
    COMPUTED = "computed"
    PROFILE = "profile"


class MergeStrategy(StrEnum):
    LATEST = "latest"
    FIRST = "first"
    MAX = "max"
    MOST_FREQUENT = "most_frequent"
    SOURCE_PRIORITY = "source_priority"


class ValueType(StrEnum):
    STRING = "string"
    NUMBER = "number"


class TraitDef(Definition):
    """A trait: an aggregation over a customer's events, or an identify field merged per customer."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    kind: TraitKind = TraitKind.COMPUTED
    # computed traits
    event: str | None = Field(None, description="event name; omitted = all track events")
    aggregation: Aggregation | None = None
    column: str | None = Field(
        None, description="events column to aggregate (revenue, category, channel, ...)"
    )
    window_days: int | None = Field(None, ge=1, description="last N days; omitted = lifetime")
    # profile traits
    field: str | None = Field(None, min_length=1, description="identify trait to merge")
    strategy: MergeStrategy | None = None
    sources: list[str] | None = Field(None, min_length=1, description="source priority, first wins")
    type: ValueType = ValueType.STRING

    @model_validator(mode="after")
    def _check(self) -> TraitDef:
        if self.kind is TraitKind.PROFILE:
            return self._check_profile()
        extra = [k for k in ("field", "strategy", "sources") if getattr(self, k) is not None]
        if extra:
            raise ValueError(f"{', '.join(extra)} only apply to `kind: profile` traits")
        if self.aggregation is None:
            raise ValueError("a computed trait needs an `aggregation`")
        if self.aggregation is not Aggregation.COUNT and not self.column:
            raise ValueError(f"aggregation {self.aggregation.value!r} needs a `column`")
        return self

    def _check_profile(self) -> TraitDef:
        extra = [
            k
            for k in ("event", "aggregation", "column", "window_days")
            if getattr(self, k) is not None
        ]
        if extra:
            raise ValueError(f"{', '.join(extra)} do not apply to `kind: profile` traits")
        if self.field is None or self.strategy is None:
            raise ValueError("a profile trait needs a `field` and a `strategy`")
        if (self.strategy is MergeStrategy.SOURCE_PRIORITY) != (self.sources is not None):
            raise ValueError(
                "`sources` is required by, and only used with, strategy source_priority"
            )
        return self
