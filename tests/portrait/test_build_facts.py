"""The profile build parses each event's JSON once, and the zones it finds are the right ones."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import ibis
from hypothesis import given, settings
from hypothesis import strategies as st

from closedloop.core.engine import Engine
from closedloop.identity.resolve import resolve
from closedloop.portrait import localtime
from closedloop.portrait.build import (
    _facts_as_of,
    _zones,
    base_expr,
    customer_events,
    may_hold,
    zones_in_use,
)
from tests.conftest import add_events
from tests.identity.test_resolve import CONFIG
from tests.portrait.test_build import NOW
from tests.portrait.test_extras import build, ev

AT = datetime(2026, 11, 19, 17, 30, tzinfo=UTC)  # Thursday 17:30 UTC


def test_profile_query_reads_the_parsed_events_not_the_json(engine: Engine) -> None:
    # Parsing `context`/`properties` once per part of the portrait made the build 3x slower:
    # the per-customer query must read the materialised facts, never the raw JSON columns.
    add_events(
        engine,
        [ev("A", "Product Viewed", AT, message_id="m1", context={"timezone": "Asia/Shanghai"})],
    )
    resolve(engine, CONFIG)
    facts = _facts_as_of(engine, NOW)
    zones, lo = _zones(facts, "UTC")
    offsets = ibis.memtable(localtime.offsets_table(zones, lo, NOW))
    sql = ibis.to_sql(base_expr(engine, NOW, offsets, zones, facts=facts), dialect="duckdb")
    assert '"context"' not in sql and '"properties"' not in sql
    assert '"events" AS "t' not in sql  # nor joins the event log again
    assert facts.select("tz").to_pyarrow().column("tz").to_pylist() == ["Asia/Shanghai"]


def test_zones_in_use_and_the_earliest_event(engine: Engine) -> None:
    add_events(
        engine,
        [
            ev("A", "Product Viewed", AT, message_id="m1", context={"timezone": "Europe/London"}),
            ev("B", "Product Viewed", AT - timedelta(days=3), message_id="m2"),
            ev("C", "Product Viewed", AT, message_id="m3", context={"timezone": "Mars/Base"}),
            ev("D", "Product Viewed", AT, message_id="m4", context={"timezone": 8}),
        ],
    )
    resolve(engine, CONFIG)
    ev_all = customer_events(engine)
    zones, lo = zones_in_use(engine, ev_all, "Asia/Shanghai")
    assert zones == ["Asia/Shanghai", "Europe/London"]  # invalid and numeric zones left out
    assert lo == AT - timedelta(days=3)
    assert _zones(_facts_as_of(engine, NOW), "Asia/Shanghai") == (zones, lo)


def test_invalid_or_numeric_zone_falls_back_to_the_default(engine: Engine) -> None:
    # C states only an unknown zone, D only a number: both get the project's zone
    # (Shanghai, UTC+8), so 17:30 UTC on Thursday is Friday 01:30 for them.
    mars = {"timezone": "Mars/Base"}
    p = build(
        engine,
        [
            ev("C", "Product Viewed", AT, context=mars),
            ev("C", "Product Viewed", AT + timedelta(minutes=5), context=mars),
            ev("D", "Product Viewed", AT, context={"timezone": 8}),
            ev("L", "Product Viewed", AT, context={"timezone": "Europe/London"}),
        ],
        tz="Asia/Shanghai",
    )
    assert (p["C"]["active_hour"], p["C"]["active_weekday"]) == (1, "Friday")
    assert p["C"]["timezone"] == "Mars/Base"  # stated as given; the default is used for hours
    assert (p["D"]["active_hour"], p["D"]["timezone"]) == (1, None)
    assert (p["L"]["active_hour"], p["L"]["active_weekday"]) == (17, "Thursday")


KEYS = st.sampled_from(["style", "marketing", "styles", "mark", "x"])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(KEYS, inner, max_size=3),
    max_leaves=8,
)


def _holds(value: object, key: str) -> bool:
    if isinstance(value, dict):
        return key in value or any(_holds(v, key) for v in value.values())
    if isinstance(value, list):
        return any(_holds(v, key) for v in value)
    return False


def _escape_keys(text: str, key: str) -> str:
    """Spell the key's first letter as a \\u escape (still the same JSON document)."""
    return text.replace(f'"{key}"', f'"\\u{ord(key[0]):04x}{key[1:]}"')


@settings(max_examples=40, deadline=None)
@given(
    docs=st.lists(st.dictionaries(KEYS, JSON_VALUES, max_size=4), min_size=1, max_size=20),
    key=st.sampled_from(["style", "marketing"]),
    ascii_only=st.booleans(),
    escape=st.booleans(),
)
def test_may_hold_never_skips_a_document_holding_the_key(
    docs: list[dict[str, object]], key: str, ascii_only: bool, escape: bool
) -> None:
    texts = [json.dumps(d, ensure_ascii=ascii_only) for d in docs]
    if escape:
        texts = [_escape_keys(t, key) for t in texts]
    assert [json.loads(t) for t in texts] == docs
    t = ibis.memtable({"doc": texts})
    got = t.select(m=may_hold(t.doc, key)).to_pyarrow().column("m").to_pylist()
    for doc, m in zip(docs, got, strict=True):
        if _holds(doc, key):
            assert m, (doc, key)
