"""The condition language: nested all / any / not over profile fields, as typed models.

Shared by tags (rule tags) and segments (audiences), so it lives in core. A condition is a
tree of pydantic models; ``compile_condition`` turns it into an Ibis boolean expression with
the user's values bound as literals — never pasted into SQL text. ``evaluate_python`` gives
the same answer on a plain dict, which the property tests use as the reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

import ibis
import ibis.expr.types as ir
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

Scalar = str | int | float | bool | date | datetime


class Op(StrEnum):
    EQ = "eq"
    NE = "ne"
    GT = "gt"
    GTE = "gte"
    LT = "lt"
    LTE = "lte"
    IN = "in"
    NOT_IN = "not_in"
    IS_NULL = "is_null"
    NOT_NULL = "not_null"
    CONTAINS = "contains"
    BETWEEN = "between"


# Friendly spellings accepted in YAML.
OP_ALIASES = {
    "=": "eq",
    "==": "eq",
    "!=": "ne",
    ">": "gt",
    ">=": "gte",
    "<": "lt",
    "<=": "lte",
}

_NO_VALUE = {Op.IS_NULL, Op.NOT_NULL}
_LIST_VALUE = {Op.IN, Op.NOT_IN}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldCondition(_Strict):
    """``{trait: NAME, op: OP, value: V}`` — compare one profile field (a trait or a tag)."""

    trait: str = Field(min_length=1)
    op: Op
    value: Scalar | list[Scalar] | None = None

    @model_validator(mode="before")
    @classmethod
    def _alias_op(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("op"), str):
            data = {**data, "op": OP_ALIASES.get(data["op"], data["op"])}
        return data

    @model_validator(mode="after")
    def _check_value(self) -> FieldCondition:
        if self.op in _NO_VALUE:
            if self.value is not None:
                raise ValueError(f"op {self.op.value!r} takes no value")
        elif self.op in _LIST_VALUE:
            if not isinstance(self.value, list) or not self.value:
                raise ValueError(f"op {self.op.value!r} needs a non-empty list as value")
        elif self.op is Op.BETWEEN:
            if not isinstance(self.value, list) or len(self.value) != 2:
                raise ValueError("op 'between' needs a list of two values [low, high]")
        elif self.value is None or isinstance(self.value, list):
            raise ValueError(f"op {self.op.value!r} needs a single value")
        return self


class AllOf(_Strict):
    all: list[Condition] = Field(min_length=1)


class AnyOf(_Strict):
    any: list[Condition] = Field(min_length=1)


class NotOf(_Strict):
    not_: Condition = Field(alias="not")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# Union tags are deliberately not key names, so an error location such as
# ('where', 'all', 'all_of', 1, 'field', 'op') can be mapped back to keys in the file.
_TAGS = {"all": "all_of", "any": "any_of", "not": "not_of", "trait": "field"}
_TAG_OF_TYPE: dict[type, str] = {
    AllOf: "all_of",
    AnyOf: "any_of",
    NotOf: "not_of",
    FieldCondition: "field",
}


def _kind(data: Any) -> str | None:
    if isinstance(data, dict):
        for key, tag in _TAGS.items():
            if key in data:
                return tag
        return None
    return _TAG_OF_TYPE.get(type(data))


Condition = Annotated[
    Annotated[AllOf, Tag("all_of")]
    | Annotated[AnyOf, Tag("any_of")]
    | Annotated[NotOf, Tag("not_of")]
    | Annotated[FieldCondition, Tag("field")],
    Discriminator(
        _kind,
        custom_error_type="condition",
        custom_error_message="a condition needs one of the keys all, any, not or trait",
    ),
]

AllOf.model_rebuild()
AnyOf.model_rebuild()
NotOf.model_rebuild()


def fields_used(cond: Condition) -> set[str]:
    """Every profile field a condition reads (for validation against the profile schema)."""
    if isinstance(cond, FieldCondition):
        return {cond.trait}
    if isinstance(cond, AllOf):
        return set().union(*(fields_used(c) for c in cond.all))
    if isinstance(cond, AnyOf):
        return set().union(*(fields_used(c) for c in cond.any))
    return fields_used(cond.not_)


def compile_condition(cond: Condition, table: ir.Table) -> ir.BooleanValue:
    """An Ibis boolean over ``table``'s rows; null comparisons count as false (SQL-style)."""
    if isinstance(cond, AllOf):
        parts = [compile_condition(c, table) for c in cond.all]
        out = parts[0]
        for p in parts[1:]:
            out = out & p
        return out
    if isinstance(cond, AnyOf):
        parts = [compile_condition(c, table) for c in cond.any]
        out = parts[0]
        for p in parts[1:]:
            out = out | p
        return out
    if isinstance(cond, NotOf):
        return ~compile_condition(cond.not_, table)
    return _compile_field(cond, table)


def _compile_field(cond: FieldCondition, table: ir.Table) -> ir.BooleanValue:
    col = table[cond.trait]
    v = cond.value
    op = cond.op
    if op is Op.IS_NULL:
        return col.isnull()
    if op is Op.NOT_NULL:
        return col.notnull()
    expr: ir.BooleanValue
    if op is Op.EQ:
        expr = col == ibis.literal(v)
    elif op is Op.NE:
        expr = col != ibis.literal(v)
    elif op is Op.GT:
        expr = col > ibis.literal(v)
    elif op is Op.GTE:
        expr = col >= ibis.literal(v)
    elif op is Op.LT:
        expr = col < ibis.literal(v)
    elif op is Op.LTE:
        expr = col <= ibis.literal(v)
    elif op is Op.IN:
        assert isinstance(v, list)  # noqa: S101 - guaranteed by the model validator
        expr = col.isin([ibis.literal(x) for x in v])
    elif op is Op.NOT_IN:
        assert isinstance(v, list)  # noqa: S101
        expr = ~col.isin([ibis.literal(x) for x in v])
    elif op is Op.BETWEEN:
        assert isinstance(v, list)  # noqa: S101
        expr = (col >= ibis.literal(v[0])) & (col <= ibis.literal(v[1]))
    else:  # CONTAINS
        expr = col.cast("string").contains(ibis.literal(str(v)))
    # Comparisons with null are unknown; unknown is not a match, and NOT(unknown) is not either.
    return expr.fill_null(False)


def evaluate_python(cond: Condition, row: Mapping[str, Any]) -> bool:
    """The same semantics as ``compile_condition`` on one dict; the reference for tests."""
    if isinstance(cond, AllOf):
        return all(evaluate_python(c, row) for c in cond.all)
    if isinstance(cond, AnyOf):
        return any(evaluate_python(c, row) for c in cond.any)
    if isinstance(cond, NotOf):
        return not evaluate_python(cond.not_, row)
    x = row.get(cond.trait)
    v = cond.value
    op = cond.op
    if op is Op.IS_NULL:
        return x is None
    if op is Op.NOT_NULL:
        return x is not None
    if x is None:
        return False
    if op is Op.EQ:
        return bool(x == v)
    if op is Op.NE:
        return bool(x != v)
    if op is Op.GT:
        return bool(x > v)
    if op is Op.GTE:
        return bool(x >= v)
    if op is Op.LT:
        return bool(x < v)
    if op is Op.LTE:
        return bool(x <= v)
    if op is Op.IN:
        assert isinstance(v, list)  # noqa: S101
        return x in v
    if op is Op.NOT_IN:
        assert isinstance(v, list)  # noqa: S101
        return x not in v
    if op is Op.BETWEEN:
        assert isinstance(v, list)  # noqa: S101
        return bool(v[0] <= x <= v[1])
    return str(v) in str(x)


ConditionKind = Literal["all", "any", "not", "trait"]
