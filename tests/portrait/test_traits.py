from __future__ import annotations

from datetime import timedelta

import pytest

from closedloop.core.clock import Clock
from closedloop.core.definitions import TraitDef
from closedloop.core.engine import Engine
from closedloop.identity.resolve import resolve
from closedloop.portrait.build import build_profiles
from closedloop.portrait.traits import build_traits, check_trait
from closedloop.segments.audience import Fields, audience_table
from tests.conftest import add_events
from tests.identity.test_resolve import CONFIG
from tests.portrait.test_build import NOW, order


def trait(**kw: object) -> TraitDef:
    return TraitDef.model_validate(kw)


TRAITS = {
    "orders_30d": trait(
        name="orders_30d", event="Order Completed", aggregation="count", window_days=30
    ),
    "spend": trait(name="spend", event="Order Completed", aggregation="sum", column="revenue"),
    "max_order": trait(
        name="max_order", event="Order Completed", aggregation="max", column="revenue"
    ),
    "first_cat": trait(
        name="first_cat", event="Order Completed", aggregation="first", column="order_id"
    ),
    "fav_cat": trait(name="fav_cat", aggregation="most_frequent", column="category"),
}


def test_windowed_and_lifetime_traits(engine: Engine) -> None:
    add_events(
        engine,
        [
            order("A", 29.9, 10.0, "1"),
            order("A", 30.1, 20.0, "2"),  # just outside a 30-day window
            order("A", 100, 70.0, "3"),
            order("A", -2, 500.0, "4"),  # after now: never counted
        ],
    )
    resolve(engine, CONFIG)
    build_profiles(engine, Clock(NOW))
    assert build_traits(engine, TRAITS, Clock(NOW)) == len(TRAITS)
    fields = Fields(
        traits=tuple((n, "string" if n in ("first_cat", "fav_cat") else "float64") for n in TRAITS)
    )
    row = audience_table(engine, fields).to_pyarrow().to_pylist()[0]
    assert row["orders_30d"] == 1
    assert row["spend"] == pytest.approx(100.0)
    assert row["max_order"] == pytest.approx(70.0)
    assert row["first_cat"] == "3"
    assert row["fav_cat"] == "milk_tea"
    # Time moves on: the window rolls forward without new events.
    build_traits(engine, TRAITS, Clock(NOW + timedelta(days=1)))
    row = audience_table(engine, fields).to_pyarrow().to_pylist()[0]
    assert row["orders_30d"] == 0


def test_trait_checks() -> None:
    assert check_trait(trait(name="orders", aggregation="count"))[0].key == "name"
    assert check_trait(trait(name="x", aggregation="sum", column="nope"))[0].key == "column"
    assert (
        "numeric" in check_trait(trait(name="x", aggregation="avg", column="category"))[0].message
    )
    assert check_trait(trait(name="x", aggregation="avg", column="revenue")) == []
