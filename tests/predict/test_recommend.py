"""Recommended products: bought together, popular in the preferred category, popular; never
what the customer bought recently; the same lists on DuckDB and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closedloop.collect.tables import EVENTS
from closedloop.core.clock import Clock
from closedloop.core.engine import Engine
from closedloop.predict.recommend import build_recommendations, popular, recommend
from tests.conftest import event_rows
from tests.test_backends import postgres_url as postgres_url  # the fixture

NOW = datetime(2026, 11, 20, tzinfo=UTC)
CATEGORY = {"t1": "tea", "t2": "tea", "t3": "tea", "t4": "tea", "b1": "beauty", "b2": "beauty"}


def order(n: int, customer: str, products: list[str], days_ago: float) -> dict[str, Any]:
    items = [
        {"product_id": p, "category": CATEGORY[p], "price": 10.0 + i, "name": p.upper()}
        for i, p in enumerate(products)
    ]
    return {
        "message_id": f"o{n}",
        "event": "Order Completed",
        "user_id": customer,
        "order_id": f"o{n}",
        "timestamp": NOW - timedelta(days=days_ago),
        "properties": {"order_id": f"o{n}", "products": items},
    }


def load(engine: Engine, orders: list[dict[str, Any]]) -> None:
    schema = EVENTS.schema.to_pyarrow()  # typed columns: PostgreSQL refuses null-typed ones
    engine.append("events", event_rows(orders).select(schema.names).cast(schema))
    ec = [{"message_id": o["message_id"], "customer_id": o["user_id"]} for o in orders]
    engine.append("event_customers", pa.Table.from_pylist(ec))


def lists(engine: Engine) -> dict[str, list[tuple[str, str]]]:
    t = engine.table("recommendations").order_by(["customer_id", "rank"])
    out: dict[str, list[tuple[str, str]]] = {}
    for r in t.to_pyarrow().to_pylist():
        out.setdefault(r["customer_id"], []).append((r["product_id"], r["reason"]))
    return out


HISTORY = [
    order(1, "a", ["t1", "t2"], 200),
    order(2, "b", ["t1", "t2", "t3"], 200),
    order(3, "c", ["t1"], 10),  # bought t1 recently: never recommended t1
    order(4, "d", ["b1"], 300),
    order(5, "e", ["b1", "b2"], 300),
    order(6, "f", ["t4"], 400),  # nobody else bought t4: category popularity fills in
]


def test_bought_together_then_category_then_overall(engine: Engine) -> None:
    load(engine, HISTORY)
    run = build_recommendations(engine, clock=Clock(NOW), k=3)
    got = lists(engine)
    # c bought t1, which a and b bought with t2 (both) and t3 (b): t2 ranks above t3.
    assert got["c"] == [
        ("t2", "bought_together"),
        ("t3", "bought_together"),
        ("t4", "popular_in_category"),  # the rest of tea, c's category
    ]
    # f's t4 has no co-buyers: the best sellers of f's category, then overall.
    assert got["f"][:2] == [("t1", "popular_in_category"), ("t2", "popular_in_category")]
    # d bought b1 long ago: b2 together, b1 itself may come back (not recent), then tea.
    assert got["d"][0] == ("b2", "bought_together")
    assert all(p != "t1" for p, _ in got["c"])
    assert run.customers == 6 and run.rows == 18
    row = engine.table("recommendations").filter(lambda t: t.product_id == "t2").limit(1)
    (r,) = row.to_pyarrow().to_pylist()
    assert (r["name"], r["category"], r["price"]) == ("T2", "tea", 11.0)
    assert popular(engine_items(engine), 2) == ["t1", "b1"]  # b1 and t2 tie: by id


def engine_items(engine: Engine) -> Any:
    from closedloop.predict.recommend import order_items

    return order_items(engine)


purchases = st.lists(
    st.tuples(
        st.sampled_from("abcdefg"),
        st.lists(st.sampled_from(sorted(CATEGORY)), min_size=1, max_size=3, unique=True),
        st.integers(0, 400),
    ),
    min_size=1,
    max_size=25,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=purchases, k=st.integers(1, 5), exclude=st.integers(0, 200))
def test_lists_are_ranked_unique_and_never_hold_a_recent_purchase(
    history: list[tuple[str, list[str], int]], k: int, exclude: int
) -> None:
    with Engine("duckdb://") as engine:
        load(engine, [order(i, c, ps, d) for i, (c, ps, d) in enumerate(history)])
        recs = recommend(engine_items(engine), as_of=NOW, k=k, exclude_days=exclude)
        rows = recs.to_pyarrow().to_pylist()
    recent = {(c, p) for c, ps, d in history for p in ps if d <= exclude}
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["customer_id"], []).append(r)
        assert (r["customer_id"], r["product_id"]) not in recent
        assert r["reason"] in ("bought_together", "popular_in_category", "popular")
    assert set(by) <= {c for c, _, _ in history}
    for mine in by.values():
        ranks = sorted(r["rank"] for r in mine)
        assert ranks == list(range(1, len(mine) + 1)) and len(mine) <= k
        assert len({r["product_id"] for r in mine}) == len(mine)
        # Co-purchases first, then category, then overall best sellers.
        tiers = [
            ("bought_together", "popular_in_category", "popular").index(r["reason"])
            for r in sorted(mine, key=lambda r: r["rank"])
        ]
        assert tiers == sorted(tiers)
    # Everyone with something left to recommend (of the products anyone bought) gets a full list.
    sold = {p for _, ps, _ in history for p in ps}
    for c in {c for c, _, _ in history}:
        left = len(sold - {p for cc, p in recent if cc == c})
        assert len(by.get(c, [])) == min(k, left)


@pytest.mark.postgres
def test_same_lists_on_postgres(postgres_url: str) -> None:
    got = []
    for url in ("duckdb://", postgres_url):
        with Engine(url) as engine:
            for name in ("events", "event_customers", "recommendations"):
                engine.drop(name)
            load(engine, HISTORY)
            build_recommendations(engine, clock=Clock(NOW), k=4)
            t = engine.table("recommendations").drop("computed_at")
            got.append(t.order_by(["customer_id", "rank"]).to_pyarrow().to_pylist())
    assert got[0] == got[1] and got[0]
