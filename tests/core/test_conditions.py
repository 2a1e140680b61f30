"""The condition language: compiled Ibis expressions agree with the plain-Python reference."""

from __future__ import annotations

from typing import Any

import ibis
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter, ValidationError

from closedloop.core.conditions import Condition, compile_condition, evaluate_python

ADAPTER: TypeAdapter[Any] = TypeAdapter(Condition)
FIELDS = {
    "orders": st.integers(0, 5),
    "city": st.sampled_from(["sh", "bj", "hz"]),
    "score": st.floats(0, 10),
}


def field_conditions() -> st.SearchStrategy[dict[str, Any]]:
    def for_field(name: str) -> st.SearchStrategy[dict[str, Any]]:
        values = FIELDS[name]
        single = st.sampled_from(["eq", "ne", "gt", "gte", "lt", "lte"]).flatmap(
            lambda op: values.map(lambda v: {"trait": name, "op": op, "value": v})
        )
        many = st.sampled_from(["in", "not_in"]).flatmap(
            lambda op: st.lists(values, min_size=1, max_size=3).map(
                lambda v: {"trait": name, "op": op, "value": v}
            )
        )
        nulls = st.sampled_from(["is_null", "not_null"]).map(lambda op: {"trait": name, "op": op})
        between = st.tuples(values, values).map(
            lambda p: {"trait": name, "op": "between", "value": sorted(p)}  # type: ignore[type-var]
        )
        return st.one_of(single, many, nulls, between)

    return st.sampled_from(sorted(FIELDS)).flatmap(for_field)


conditions = st.recursive(
    field_conditions(),
    lambda inner: st.one_of(
        st.lists(inner, min_size=1, max_size=3).map(lambda xs: {"all": xs}),
        st.lists(inner, min_size=1, max_size=3).map(lambda xs: {"any": xs}),
        inner.map(lambda x: {"not": x}),
    ),
    max_leaves=6,
)

rows = st.lists(
    st.fixed_dictionaries({k: st.one_of(st.none(), v) for k, v in FIELDS.items()}),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(conditions, rows)
def test_compiled_condition_matches_python_reference(
    raw: dict[str, Any], data: list[dict[str, Any]]
) -> None:
    cond = ADAPTER.validate_python(raw)
    table = pa.table(
        {
            "i": list(range(len(data))),
            "orders": pa.array([r["orders"] for r in data], pa.int64()),
            "city": pa.array([r["city"] for r in data], pa.string()),
            "score": pa.array([r["score"] for r in data], pa.float64()),
        }
    )
    t = ibis.memtable(table)
    got = t.filter(compile_condition(cond, t)).i.to_pyarrow().to_pylist()
    want = [i for i, r in enumerate(data) if evaluate_python(cond, r)]
    assert sorted(got) == want


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"trait": "orders", "op": "bigger", "value": 1}, "op"),
        ({"trait": "orders", "op": "in", "value": 1}, "non-empty list"),
        ({"trait": "orders", "op": "is_null", "value": 1}, "takes no value"),
        ({"trait": "orders", "op": "between", "value": [1]}, "two values"),
        ({"oops": 1}, "all, any, not, trait, event, sequence or in_segment"),
        ({"all": []}, "at least 1"),
    ],
)
def test_bad_conditions_say_what_is_wrong(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as e:
        ADAPTER.validate_python(raw)
    assert message in str(e.value)


def test_operator_aliases() -> None:
    c = ADAPTER.validate_python({"trait": "orders", "op": ">=", "value": 2})
    assert evaluate_python(c, {"orders": 2}) and not evaluate_python(c, {"orders": 1})


def test_values_are_bound_not_pasted() -> None:
    """A value that looks like SQL stays a value."""
    c = ADAPTER.validate_python({"trait": "city", "op": "eq", "value": "x' OR '1'='1"})
    t = ibis.memtable({"city": ["sh", "x' OR '1'='1"]})
    assert t.filter(compile_condition(c, t)).count().execute() == 1
