"""Each tag type on a real DuckDB warehouse, edges included: ties, nulls, empty populations."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from closedloop.core.clock import Clock
from closedloop.core.engine import Engine
from closedloop.core.errors import InputError
from closedloop.tags.build import build_tags
from tests.tags.helpers import NOW, message, set_events, set_profiles, tag, values

CLOCK = Clock(NOW)


def test_rule_tag_first_matching_rule_and_default(engine: Engine) -> None:
    set_profiles(
        engine,
        [
            {"customer_id": "a", "revenue": 3000.0},
            {"customer_id": "b", "revenue": 600.0},
            {"customer_id": "c", "revenue": None},
        ],
    )
    t = tag(
        rules=[
            {"value": "high", "when": {"trait": "revenue", "op": "gte", "value": 2000}},
            {"value": "medium", "when": {"trait": "revenue", "op": "gte", "value": 500}},
        ],
        default="low",
    )
    assert build_tags(engine, {"t": t}, CLOCK) == {"t": 3}
    assert values(engine) == {"a": "high", "b": "medium", "c": "low"}


def test_bucket_ranges_min_inclusive_max_exclusive_nulls_left_out(engine: Engine) -> None:
    set_profiles(
        engine,
        [
            {"customer_id": "a", "revenue": 0.0},
            {"customer_id": "b", "revenue": 100.0},
            {"customer_id": "c", "revenue": 99.99},
            {"customer_id": "d", "revenue": None},
            {"customer_id": "e", "revenue": -5.0},
        ],
    )
    t = tag(
        type="bucket",
        field="revenue",
        ranges=[{"value": "small", "min": 0, "max": 100}, {"value": "big", "min": 100}],
    )
    build_tags(engine, {"t": t}, CLOCK)
    assert values(engine) == {"a": "small", "b": "big", "c": "small"}


def test_bucket_quartiles_of_the_population(engine: Engine) -> None:
    set_profiles(engine, [{"customer_id": f"c{i}", "revenue": float(i)} for i in range(1, 9)])
    t = tag(type="bucket", field="revenue", percentiles=[0.25, 0.5, 0.75])
    build_tags(engine, {"t": t}, CLOCK)
    got = values(engine)
    # Continuous quartiles of 1..8 are 2.75, 4.5, 6.25: two customers per bucket.
    assert got == {
        "c1": "p0_25",
        "c2": "p0_25",
        "c3": "p25_50",
        "c4": "p25_50",
        "c5": "p50_75",
        "c6": "p50_75",
        "c7": "p75_100",
        "c8": "p75_100",
    }


def test_percentiles_on_constant_values_put_everyone_in_the_first_bucket(engine: Engine) -> None:
    set_profiles(engine, [{"customer_id": f"c{i}", "orders": 3} for i in range(5)])
    t = tag(type="bucket", field="orders", percentiles=[0.5], labels=["low", "high"])
    build_tags(engine, {"t": t}, CLOCK)
    assert set(values(engine).values()) == {"low"}


def test_percentiles_on_an_empty_population(engine: Engine) -> None:
    set_profiles(engine, [])
    t = tag(type="bucket", field="revenue", percentiles=[0.5])
    assert build_tags(engine, {"t": t}, CLOCK) == {"t": 0}


def test_bucket_on_a_computed_trait(engine: Engine) -> None:
    set_profiles(engine, [{"customer_id": "a"}, {"customer_id": "b"}])
    engine.replace(
        "computed_traits",
        pa.table(
            {
                "customer_id": ["a", "b"],
                "trait": ["orders_90d", "orders_90d"],
                "number_value": [5.0, 1.0],
                "text_value": pa.array([None, None], pa.string()),
                "computed_at": pa.array([NOW, NOW], pa.timestamp("us", tz="UTC")),
            }
        ),
    )
    t = tag(type="bucket", field="orders_90d", ranges=[{"value": "frequent", "min": 3}])
    build_tags(engine, {"t": t}, CLOCK)
    assert values(engine) == {"a": "frequent"}


def _ev(
    cust: str, cat: str | None, days_ago: float, mid: str, event: str = "Order Completed"
) -> dict[str, object]:
    style = {"style": f"s_{cat}"} if cat else {}
    return message(cust, mid, NOW - timedelta(days=days_ago), event, cat, style)


def test_first_and_last_with_ties_and_nulls(engine: Engine) -> None:
    set_profiles(engine, [{"customer_id": "a"}, {"customer_id": "b"}, {"customer_id": "c"}])
    set_events(
        engine,
        [
            _ev("a", "tea", 10, "m1"),
            _ev("a", "beauty", 5, "m2"),
            _ev("a", None, 1, "m3"),  # a null value is not a "last" value
            _ev("b", "zz", 3, "m5"),  # same time: the message id decides, on every engine
            _ev("b", "aa", 3, "m4"),
            _ev("c", "tea", 100, "m6", event="Product Viewed"),
            _ev("a", "future", -1, "m7"),  # after the clock: not seen yet
        ],
    )
    first = tag(type="first", event="Order Completed", column="category", default="none")
    last = tag(type="last", event="Order Completed", column="category")
    last_style = tag(type="last", event="Order Completed", property="style", window_days=7)
    build_tags(engine, {"first": first, "last": last, "style": last_style}, CLOCK)
    assert values(engine, "first") == {"a": "tea", "b": "aa", "c": "none"}
    assert values(engine, "last") == {"a": "beauty", "b": "zz"}
    assert values(engine, "style") == {"a": "s_beauty", "b": "s_zz"}


def test_top_n_most_frequent_first_ties_by_value(engine: Engine) -> None:
    set_profiles(engine, [{"customer_id": "a"}, {"customer_id": "b"}])
    evs = []
    for i, cat in enumerate(["tea", "tea", "tea", "soap", "soap", "cup", "ink", "ink"]):
        evs.append(_ev("a", cat, i, f"a{i}"))
    evs.append(_ev("b", "tea", 1, "b1"))
    set_events(engine, evs)
    build_tags(engine, {"t": tag(type="top_n", column="category", n=3)}, CLOCK)
    # tea 3, then soap and ink tie at 2 (alphabetical), cup 1 is fourth.
    assert values(engine) == {"a": "tea,ink,soap", "b": "tea"}


def test_rfm_group_and_scores(engine: Engine) -> None:
    set_profiles(
        engine,
        [
            {"customer_id": "a", "r_score": 5, "f_score": 3, "m_score": 2, "rfm_group": "loyal"},
            {"customer_id": "b"},
        ],
    )
    tags = {"g": tag(type="rfm"), "s": tag(type="rfm", rfm="scores")}
    build_tags(engine, tags, CLOCK)
    assert values(engine, "g") == {"a": "loyal"}
    assert values(engine, "s") == {"a": "R5F3M2"}


def test_sql_tag_runs_a_checked_select(engine: Engine) -> None:
    set_profiles(
        engine,
        [{"customer_id": "a", "city": "Shanghai"}, {"customer_id": "b", "city": "Beijing"}],
    )
    t = tag(
        type="sql",
        sql="SELECT customer_id, upper(city) AS value FROM profiles WHERE city LIKE 'S%'",
    )
    build_tags(engine, {"t": t}, CLOCK)
    assert values(engine) == {"a": "SHANGHAI"}


def test_import_tag_reports_bad_rows_by_number(engine: Engine, tmp_path: Path) -> None:
    set_profiles(engine, [{"customer_id": c} for c in ("a", "b", "c")])
    (tmp_path / "vip.csv").write_text(
        "customer_id,value\na,gold\n,silver\nb,\na,bronze\nzz,gold\nc,silver\n", encoding="utf-8"
    )
    t = tag(type="import", path="vip.csv")
    build_tags(engine, {"t": t}, CLOCK, root=tmp_path)
    assert values(engine) == {"a": "gold", "c": "silver"}
    note = engine.table("tag_runs").note.to_pyarrow().to_pylist()[0]
    assert note.startswith("4 bad row(s)")
    for part in (
        "row 2: empty customer_id",
        "row 3: empty value",
        "row 4: a is also on row 1",
        "row 5: no customer zz",
    ):
        assert part in note


def test_import_tag_from_parquet_with_other_column_names(engine: Engine, tmp_path: Path) -> None:
    set_profiles(engine, [{"customer_id": "a"}])
    pq.write_table(pa.table({"cid": ["a"], "grade": [7]}), tmp_path / "g.parquet")
    t = tag(type="import", path="g.parquet", id_column="cid", value_column="grade")
    build_tags(engine, {"t": t}, CLOCK, root=tmp_path)
    assert values(engine) == {"a": "7"}
    bad = tag(type="import", path="g.parquet")
    with pytest.raises(InputError, match="missing column"):
        build_tags(engine, {"t": bad}, CLOCK, root=tmp_path)


def test_model_tag_without_scores_says_so_then_reads_them(engine: Engine) -> None:
    set_profiles(engine, [{"customer_id": "a"}, {"customer_id": "b"}])
    t = tag(
        type="model",
        model="churn",
        ranges=[{"value": "high", "min": 0.7}, {"value": "low", "max": 0.7}],
    )
    assert build_tags(engine, {"t": t}, CLOCK) == {"t": 0}
    assert "no scores yet" in engine.table("tag_runs").note.to_pyarrow().to_pylist()[0]
    engine.append(
        "model_scores",
        pa.table(
            {
                "customer_id": ["a", "b", "a"],
                "model": ["churn", "churn", "clv"],
                "score": [0.9, 0.2, 100.0],
                "label": pa.array([None, None, None], pa.string()),
                "scored_at": pa.array([NOW] * 3, pa.timestamp("us", tz="UTC")),
            }
        ),
    )
    assert build_tags(engine, {"t": t}, CLOCK) == {"t": 2}
    assert values(engine) == {"a": "high", "b": "low"}


def test_failing_tag_leaves_the_previous_values(engine: Engine, tmp_path: Path) -> None:
    set_profiles(engine, [{"customer_id": "a", "rfm_group": "loyal"}])
    build_tags(engine, {"g": tag(type="rfm")}, CLOCK)
    with pytest.raises(InputError):
        build_tags(
            engine,
            {"g": tag(type="rfm"), "i": tag(type="import", path="missing.csv")},
            CLOCK,
            root=tmp_path,
        )
    assert values(engine, "g") == {"a": "loyal"}
