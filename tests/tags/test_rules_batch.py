"""Tags built together (shared event scans, one-scan buckets) equal each tag built alone.

``build_tags`` materialises the events that tags on the same event share and gives profile
buckets their default without a join back to ``profiles``; a tag built alone takes the
plain path (its own query, ``with_default``). Random events and profiles must give the same
values both ways, ties and empty values included.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from closedloop.core.clock import Clock
from closedloop.core.engine import Engine
from closedloop.tags.build import build_tags
from closedloop.tags.values import bucket_values, profile_bucket_values, with_default
from tests.tags.helpers import NOW, set_events, set_profiles, tag

CLOCK = Clock(NOW)
CUSTOMERS = ["a", "b", "c", "d"]
EVENT_TAGS: dict[str, dict[str, Any]] = {
    "first_cat": {"type": "first", "column": "category", "default": "none"},
    "last_cat": {"type": "last", "column": "category"},
    "last_style_7d": {"type": "last", "property": "style", "window_days": 7},
    "top_cat": {"type": "top_n", "column": "category", "n": 2},
    "top_style": {"type": "top_n", "property": "style", "n": 3, "window_days": 30},
    "first_order": {"type": "first", "event": "Order Completed", "column": "category"},
    "top_order": {"type": "top_n", "event": "Order Completed", "column": "channel"},
}
BUCKETS: dict[str, dict[str, Any]] = {
    "rev_q": {"type": "bucket", "field": "revenue", "percentiles": [0.25, 0.5, 0.75]},
    "rev_half": {
        "type": "bucket",
        "field": "revenue",
        "percentiles": [0.5],
        "labels": ["low", "high"],
        "default": "unknown",
    },
    "orders_r": {
        "type": "bucket",
        "field": "orders",
        "ranges": [{"value": "few", "max": 2}, {"value": "some", "min": 2, "max": 5}],
        "default": "other",
    },
}

events = st.lists(
    st.tuples(
        st.sampled_from(CUSTOMERS),
        st.sampled_from(["Order Completed", "Product Viewed"]),
        st.sampled_from([None, "", "tea", "cup", "ink"]),  # category (also the style)
        st.sampled_from([None, "app", "web"]),  # channel
        st.integers(-2, 40),  # days ago (negative: after the clock)
    ),
    max_size=25,
)
profiles = st.lists(
    st.tuples(
        st.one_of(st.none(), st.floats(0, 500, allow_nan=False)),
        st.one_of(st.none(), st.integers(0, 7)),
    ),
    min_size=len(CUSTOMERS),
    max_size=len(CUSTOMERS),
)


def _values(engine: Engine) -> dict[tuple[str, str], str]:
    rows = engine.table("tag_values").to_pyarrow().to_pylist()
    return {(str(r["tag"]), str(r["customer_id"])): str(r["value"]) for r in rows}


@pytest.mark.slow
@settings(max_examples=10, deadline=None)
@given(evs=events, profs=profiles)
def test_tags_built_together_equal_each_built_alone(
    evs: list[tuple[str, str, str | None, str | None, int]],
    profs: list[tuple[float | None, int | None]],
) -> None:
    tags = {n: tag(name=n, **kw) for n, kw in (EVENT_TAGS | BUCKETS).items()}
    messages = [
        {
            "message_id": f"m{i:03d}",
            "user_id": c,
            "event": e,
            "category": cat,
            "channel": ch,
            "timestamp": NOW - timedelta(days=d, hours=i % 3),  # some same-time ties
            "properties": {"style": cat} if cat is not None else {},
        }
        for i, (c, e, cat, ch, d) in enumerate(evs)
    ]
    with Engine("duckdb://") as engine:
        set_profiles(
            engine,
            [
                {"customer_id": c, "revenue": rev, "orders": n}
                for c, (rev, n) in zip(CUSTOMERS, profs, strict=True)
            ],
        )
        set_events(engine, messages)
        build_tags(engine, tags, CLOCK)
        together = _values(engine)
        alone: dict[tuple[str, str], str] = {}
        for name, t in tags.items():
            build_tags(engine, {name: t}, CLOCK)
            alone |= _values(engine)
        assert together == alone
        for name in BUCKETS:
            t = tags[name]
            direct = profile_bucket_values(engine, t)
            assert direct is not None
            joined = with_default(engine, bucket_values(engine, t), t.default)
            got = direct.filter(direct.value.notnull()).to_pyarrow().to_pylist()
            want = joined.filter(joined.value.notnull()).to_pyarrow().to_pylist()
            key = lambda r: str(r["customer_id"])  # noqa: E731
            assert sorted(got, key=key) == sorted(want, key=key)
