"""Event tags that share their events (one table, first/last in one grouped pass, top-N by
arg_min) against a plain-Python reading of the same events: ties, nulls, empty text, windows."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closedloop.core.clock import Clock
from closedloop.core.definitions.tags import TagDef
from closedloop.core.engine import Engine
from closedloop.tags.build import build_tags
from tests.tags.helpers import NOW, message, set_events, set_profiles, tag, values

CUSTOMERS = ["a", "b", "c"]
ORDER = "Order Completed"


def _ev(cust: str, cat: str | None, hours_ago: int, mid: str, event: str) -> dict[str, Any]:
    return message(cust, mid, NOW - timedelta(hours=hours_ago), event, cat)


def _tags() -> dict[str, TagDef]:
    return {
        "first_cat": tag(name="first_cat", type="first", event=ORDER, column="category"),
        "first_dflt": tag(
            name="first_dflt", type="first", event=ORDER, column="category", default="none"
        ),
        "last_cat": tag(name="last_cat", type="last", event=ORDER, column="category"),
        "last_week": tag(
            name="last_week", type="last", event=ORDER, column="category", window_days=7
        ),
        "top2": tag(name="top2", type="top_n", event=ORDER, column="category", n=2),
        "top2_week": tag(
            name="top2_week", type="top_n", event=ORDER, column="category", n=2, window_days=7
        ),
    }


def _expected(events: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """The tags' values as their definitions say, read from the events in Python."""
    out: dict[str, dict[str, str]] = {n: {} for n in _tags()}
    for c in CUSTOMERS:
        mine = [
            e
            for e in events
            if e["user_id"] == c
            and e["event"] == ORDER
            and e["timestamp"] <= NOW
            and e["category"] not in (None, "")
        ]
        keyed = sorted(mine, key=lambda e: (e["timestamp"], e["message_id"]))
        week = [e for e in keyed if e["timestamp"] > NOW - timedelta(days=7)]
        if keyed:
            out["first_cat"][c] = str(keyed[0]["category"])
            out["first_dflt"][c] = str(keyed[0]["category"])
            out["last_cat"][c] = str(keyed[-1]["category"])
            counts = Counter(str(e["category"]) for e in keyed)
            top = sorted(counts, key=lambda v: (-counts[v], v))[:2]
            out["top2"][c] = ",".join(top)
        else:
            out["first_dflt"][c] = "none"
        if week:
            out["last_week"][c] = str(week[-1]["category"])
            counts = Counter(str(e["category"]) for e in week)
            out["top2_week"][c] = ",".join(sorted(counts, key=lambda v: (-counts[v], v))[:2])
    return out


def test_shared_first_last_ties_nulls_window_and_default(engine: Engine) -> None:
    set_profiles(engine, [{"customer_id": c} for c in CUSTOMERS])
    events = [
        _ev("a", "tea", 300, "m1", ORDER),
        _ev("a", "beauty", 200, "m2", ORDER),
        _ev("a", None, 1, "m3", ORDER),  # a null value is no value
        _ev("a", "", 2, "m3b", ORDER),  # nor is empty text
        _ev("b", "zz", 30, "m5", ORDER),  # same time: the message id decides
        _ev("b", "aa", 30, "m4", ORDER),
        _ev("c", "tea", 10, "m6", "Product Viewed"),  # another event: c has none
        _ev("a", "future", -5, "m7", ORDER),  # after the clock: not seen yet
    ]
    set_events(engine, events)
    build_tags(engine, _tags(), Clock(NOW))
    assert values(engine, "first_cat") == {"a": "tea", "b": "aa"}
    assert values(engine, "first_dflt") == {"a": "tea", "b": "aa", "c": "none"}
    assert values(engine, "last_cat") == {"a": "beauty", "b": "zz"}
    assert values(engine, "last_week") == {"b": "zz"}
    assert values(engine, "top2") == {"a": "beauty,tea", "b": "aa,zz"}
    assert values(engine, "top2_week") == {"b": "aa,zz"}
    assert _expected(events) == {n: values(engine, n) for n in _tags()}


event = st.tuples(
    st.sampled_from(CUSTOMERS),
    st.sampled_from(["tea", "soap", "cup", "", None]),
    st.integers(min_value=-3, max_value=400),  # hours ago; few values: many ties
    st.sampled_from([ORDER, ORDER, "Product Viewed"]),
)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(event, max_size=25))
def test_shared_event_tags_agree_with_python(
    engine: Engine, rows: list[tuple[str, str | None, int, str]]
) -> None:
    set_profiles(engine, [{"customer_id": c} for c in CUSTOMERS])
    # Message ids in an order unrelated to time, so ties at one time are decided by them.
    events = [
        _ev(c, cat, h % 7 * 24 + h // 60, f"m{(i * 7919) % 1000:03d}_{i}", ev)
        for i, (c, cat, h, ev) in enumerate(rows)
    ]
    set_events(engine, events)
    build_tags(engine, _tags(), Clock(NOW))
    assert {n: values(engine, n) for n in _tags()} == _expected(events)
