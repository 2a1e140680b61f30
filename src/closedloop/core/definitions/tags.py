"""Tags (``tags/*.yaml``): the governed tag catalogue.

Every tag has a name, a place in the tree (``parent``), an owner and a description, and a
``type`` saying where its value comes from. ``rule`` is the default, so a tag written before
types existed still reads the same. Fields that belong to one type only are optional here;
``tags.check.check_tag`` says, with the key, when a type misses what it needs or carries what
it does not use (so ``validate`` reports ``tags/x.yaml:4 [percentiles]: ...``).
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field, ValidationInfo, field_validator

from closedloop.core.conditions import Condition
from closedloop.core.definitions.base import NAME_PATTERN, Definition


class TagType(StrEnum):
    RULE = "rule"  # the first rule whose condition holds gives the value
    BUCKET = "bucket"  # a numeric field cut by explicit ranges or population percentiles
    FIRST = "first"  # a column of the customer's first matching event
    LAST = "last"  # a column of the customer's last matching event
    TOP_N = "top_n"  # the N most frequent values of an event column, comma-separated
    RFM = "rfm"  # the portrait's RFM group, or its scores as R5F3M2
    SQL = "sql"  # a read-only SELECT returning customer_id and value
    IMPORT = "import"  # a CSV/Parquet file of customer id -> value
    MANUAL = "manual"  # set by staff through the API or CLI, with who and when
    MODEL = "model"  # a predict-stage score, as is or cut by ranges


class TagRule(Definition):
    value: str
    when: Condition


class BucketRange(Definition):
    """``min`` inclusive, ``max`` exclusive; an open end is omitted. The first match wins."""

    value: str
    min: float | None = None
    max: float | None = None


class RfmPart(StrEnum):
    GROUP = "group"  # the named RFM group (champions, at_risk, ...)
    SCORES = "scores"  # R, F and M scores, e.g. R5F3M2


class TagDef(Definition):
    """A tag in the catalogue: where it sits, who owns it, and how its value is computed."""

    name: str = Field(pattern=NAME_PATTERN)
    type: TagType = TagType.RULE
    description: str = ""
    owner: str = ""
    parent: str | None = None
    stale_after_days: int = Field(
        7, ge=1, description="flag the tag stale when last computed longer ago than this"
    )
    default: str | None = None
    # rule
    rules: list[TagRule] = Field(default_factory=list, validate_default=True)
    # bucket (and model, over the score)
    field: str | None = Field(None, description="profile field or numeric computed trait")
    ranges: list[BucketRange] = Field(default_factory=list)
    percentiles: list[float] = Field(
        default_factory=list, description="cut points in (0, 1), e.g. [0.25, 0.5, 0.75]"
    )
    labels: list[str] = Field(
        default_factory=list, description="one label per percentile bucket (cuts + 1)"
    )
    # first / last / top_n
    event: str | None = Field(None, description="event name; omitted = every track event")
    column: str | None = Field(None, description="events column (category, channel, ...)")
    property: str | None = Field(None, description="a key of the event's properties")
    n: int = Field(3, ge=1, le=20, description="top_n: how many values")
    window_days: int | None = Field(None, ge=1, description="last N days; omitted = lifetime")
    # rfm
    rfm: RfmPart = RfmPart.GROUP
    # sql
    sql: str | None = None
    dialect: str = "duckdb"
    # import
    path: str | None = Field(None, description="CSV or Parquet file, relative to the project")
    id_column: str = "customer_id"
    value_column: str = "value"
    # manual
    values: list[str] = Field(default_factory=list, description="allowed values; empty = any")
    # model
    model: str | None = Field(None, description="model name in the `model_scores` table")

    @field_validator("rules")
    @classmethod
    def _rules(cls, v: list[TagRule], info: ValidationInfo) -> list[TagRule]:
        # ``type`` is declared before ``rules``, so it is known here (when it was valid).
        if info.data.get("type", TagType.RULE) is TagType.RULE and not v:
            raise ValueError("a rule tag needs at least one rule")
        return v

    @field_validator("percentiles")
    @classmethod
    def _cuts(cls, v: list[float]) -> list[float]:
        if any(not 0.0 < p < 1.0 for p in v):
            raise ValueError("percentiles are cut points strictly between 0 and 1")
        if sorted(set(v)) != v:
            raise ValueError("percentiles must be increasing and distinct")
        return v
