"""core.signature: count + XOR of key hashes, as identity and the portrait refresh use it."""

from __future__ import annotations

import ibis
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from closedloop.core.engine import Engine
from closedloop.core.signature import key_hash, signature, values

keys = st.sets(st.text(alphabet="abcxyz01", min_size=1, max_size=4), max_size=30)


def _sig(engine: Engine, rows: list[tuple[str, str]]) -> tuple[int, int]:
    data = pa.table(
        {"m": [r[0] for r in rows], "c": [r[1] for r in rows]},
        schema=pa.schema([("m", pa.string()), ("c", pa.string())]),
    )
    with engine.temporary(data) as t:
        return values(signature(t, "m", "c").to_pyarrow().to_pylist()[0])


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine("duckdb://")


@settings(max_examples=40, deadline=None)
@given(a=keys, b=keys)
def test_equal_sets_equal_signatures_and_they_compose(
    engine: Engine, a: set[str], b: set[str]
) -> None:
    rows_a = [(k, "c" + k) for k in sorted(a)]
    rows_b = [(k, "c" + k) for k in sorted(b)]
    sa, sb = _sig(engine, rows_a), _sig(engine, rows_b)
    assert (sa == sb) == (a == b)
    # Order does not matter.
    assert _sig(engine, list(reversed(rows_a))) == sa
    # The signature of a set less a subset: counts subtract, XORs cancel.
    common = sorted(a & b)
    sc = _sig(engine, [(k, "c" + k) for k in common])
    rest = _sig(engine, [(k, "c" + k) for k in sorted(a - b)])
    assert rest == (sa[0] - sc[0], sa[1] ^ sc[1])


def test_pairs_differ_when_only_the_customer_moves(engine: Engine) -> None:
    assert _sig(engine, [("m1", "c1")]) != _sig(engine, [("m1", "c2")])


def test_empty_relation_is_zero_and_rows_are_unsigned(engine: Engine) -> None:
    assert _sig(engine, []) == (0, 0)
    n, x = _sig(engine, [("m1", "c1"), ("m2", "c2")])
    assert n == 2 and 0 <= x < 2**64
    assert values({"n": 1, "x": -1}) == (1, 2**64 - 1)


def test_two_key_columns_need_duckdb() -> None:
    col = ibis.table({"a": "string", "b": "string"}, name="t")
    with pytest.raises(ValueError, match="needs DuckDB"):
        key_hash("pyspark", col.a, col.b)
