"""Funnels: ordered steps within a window, by group; checked against a plain-Python reference."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closedloop.core.engine import Engine
from closedloop.measure.funnels import funnel, funnel_expr
from tests.conftest import add_events

T0 = datetime(2026, 10, 1, tzinfo=UTC)
END = T0 + timedelta(days=60)
STEPS = ["Product Viewed", "Product Added", "Order Completed"]
V, A, ORDER = STEPS


def put(engine: Engine, events: Sequence[tuple[str, str, float]]) -> None:
    """Events as (customer, event, days after T0), each its own message."""
    msgs = [
        {"message_id": f"m{i}", "user_id": c, "event": e, "timestamp": T0 + timedelta(days=d)}
        for i, (c, e, d) in enumerate(events)
    ]
    if msgs:
        add_events(engine, msgs)
    engine.append(
        "event_customers",
        pa.table(
            {
                "message_id": [m["message_id"] for m in msgs],
                "customer_id": [m["user_id"] for m in msgs],
            },
            schema=pa.schema([("message_id", pa.string()), ("customer_id", pa.string())]),
        ),
    )


def reference(
    events: Sequence[tuple[str, str, float]],
    steps: Sequence[str],
    within: int,
    groups: dict[str, str] | None = None,
) -> dict[str, list[int]]:
    """The funnel definition, written out plainly per customer."""
    out: dict[str, list[int]] = {}
    people = sorted({c for c, _, _ in events} | set(groups or {}))
    for c in people:
        g = (groups or {}).get(c, "all") if groups is not None else "all"
        if groups is not None and c not in groups:
            continue
        out.setdefault(g, [0] * len(steps))
        mine = sorted((d, e) for cc, e, d in events if cc == c and 0 <= d < 60)
        starts = [d for d, e in mine if e == steps[0]]
        if not starts:
            continue
        t0 = at = starts[0]
        out[g][0] += 1
        for k in range(1, len(steps)):
            strict = steps[k] == steps[k - 1]
            nxt = [
                d
                for d, e in mine
                if e == steps[k] and (d > at if strict else d >= at) and d < t0 + within
            ]
            if not nxt:
                break
            at = nxt[0]
            out[g][k] += 1
    return out


def test_order_window_and_groups(engine: Engine) -> None:
    events = [
        ("a", V, 0), ("a", A, 1), ("a", ORDER, 2),  # all three
        ("b", V, 0), ("b", ORDER, 1),  # skipped the cart
        ("c", A, 0), ("c", V, 1), ("c", ORDER, 2),  # cart before the view: no step 2
        ("d", V, 0), ("d", A, 1), ("d", ORDER, 8),  # order after the 7-day window
        ("e", V, -1), ("e", A, 1), ("e", ORDER, 2),  # entered before the period
        ("f", V, 3), ("f", V, 5), ("f", A, 9), ("f", ORDER, 9),  # window from the first view: 9 < 10
    ]  # fmt: skip
    put(engine, events)
    f = funnel(engine, STEPS, 7, T0, END)
    assert f.group("all").reached == [5, 3, 2]
    assert f.group("all").reached == reference(events, STEPS, 7)["all"]
    assert f.group("all").step_rate(1) == pytest.approx(3 / 5)
    assert f.group("all").overall(2) == pytest.approx(2 / 5)
    groups = pa.table({"customer_id": ["a", "b", "d", "z"], "group": ["t", "t", "h", "h"]})
    with engine.temporary(groups) as g:
        by = funnel(engine, STEPS, 7, T0, END, g)
    assert by.group("t").reached == [2, 1, 1] and by.group("t").size == 2
    assert by.group("h").reached == [1, 1, 0] and by.group("h").size == 2
    rate, low, high = by.group("h").of_group(0)
    assert rate == 0.5 and low < 0.5 < high


def test_start_at_per_customer(engine: Engine) -> None:
    put(engine, [("a", V, 0), ("a", A, 1), ("b", V, 2), ("b", A, 3)])
    groups = pa.table(
        {
            "customer_id": ["a", "b"],
            "group": ["x", "x"],
            "start_at": [T0 + timedelta(days=1), T0 + timedelta(days=1)],
        }
    )
    with engine.temporary(groups) as g:
        assert funnel(engine, [V, A], 7, T0, END, g).group("x").reached == [1, 1]


def test_bad_funnels_are_rejected(engine: Engine) -> None:
    with pytest.raises(ValueError, match="at least one step"):
        funnel_expr(engine, [], 7, T0, END)
    with pytest.raises(ValueError, match="at least one day"):
        funnel_expr(engine, STEPS, 0, T0, END)


EVENT = st.tuples(
    st.sampled_from(["p", "q", "r", "s"]),
    st.sampled_from([V, A, ORDER, "Other"]),
    st.integers(-2, 62).map(float) | st.floats(0, 59, allow_nan=False).map(lambda x: round(x, 2)),
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    events=st.lists(EVENT, max_size=25),
    steps=st.lists(st.sampled_from([V, A, ORDER]), min_size=1, max_size=4),
    within=st.integers(1, 30),
)
def test_funnel_matches_reference_and_never_increases(
    engine: Engine, events: list[tuple[str, str, float]], steps: list[str], within: int
) -> None:
    for t in ("events", "event_customers"):
        if engine.exists(t):
            engine.drop(t)
    put(engine, events)
    f = funnel(engine, steps, within, T0, END)
    got: dict[str, Any] = {g.group: g.reached for g in f.groups}
    want = {g: r for g, r in reference(events, steps, within).items() if r[0] > 0}
    assert got == want
    for g in f.groups:
        assert all(a >= b for a, b in zip(g.reached, g.reached[1:], strict=False))


def test_groups_from_a_campaign_and_from_segments(engine: Engine) -> None:
    from closedloop.activate.tables import DELIVERIES
    from closedloop.measure.funnels import campaign_groups, segment_groups

    put(engine, [("a", V, 1), ("a", A, 2), ("b2", V, 1), ("c", V, 0.5), ("c", V, 3), ("d", V, 3)])
    decided = T0 + timedelta(days=1)
    rows = [
        {**dict.fromkeys(DELIVERIES.columns), "delivery_id": c, "campaign": "w", "occasion": "o1",
         "customer_id": c, "group": g, "status": s, "decided_at": decided}
        for c, g, s in [
            ("a", "treatment", "sent"),
            ("b", "holdout", "held_out"),  # merged into b2 since: followed
            ("c", "treatment", "suppressed"),  # stopped by a cap: still in the treatment group
            ("d", "global_control", "held_out"),  # not part of this campaign's comparison
            ("e", None, "suppressed"),  # no consent: never assigned
        ]
    ]  # fmt: skip
    engine.append("deliveries", pa.Table.from_pylist(rows))
    engine.append(
        "customer_aliases",
        pa.table({"alias_id": ["b"], "customer_id": ["b2"], "merged_at": [decided]}),
    )
    f = funnel(engine, [V, A], 7, T0, END, campaign_groups(engine, "w", "o1"))
    # c's view before the decision does not count, the later one does.
    assert f.group("treatment").reached == [2, 1] and f.group("treatment").size == 2
    assert f.group("holdout").reached == [1, 0] and f.group("holdout").size == 1
    assert [g.group for g in f.groups] == ["holdout", "treatment"]
    engine.append(
        "segment_membership",
        pa.table(
            {
                "segment": ["s1", "s1", "s2", "s2"],
                "customer_id": ["a", "d", "a", "c"],
                "entered_at": [T0] * 4,
                "exited_at": [None, None, None, T0],  # c has left s2
            },
            schema=pa.schema(
                [
                    ("segment", pa.string()),
                    ("customer_id", pa.string()),
                    ("entered_at", pa.timestamp("us", tz="UTC")),
                    ("exited_at", pa.timestamp("us", tz="UTC")),
                ]
            ),
        ),
    )
    s = funnel(engine, [V, A], 7, T0, END, segment_groups(engine, ["s1", "s2"]))
    assert s.group("s1").reached == [2, 1] and s.group("s2").reached == [1, 1]
    assert s.group("s2").size == 1
