"""Freshness cases the incremental refresh must not miss, and its row-by-row writes.

Each case builds on a first batch of events, loads a second one, refreshes, and compares
with a full build on all events (``incremental_equals_full``): an identity merge moving old
events, a split (an anonymous id seen with a second member is quarantined and its events
leave), a late event stamped long ago, an erased message, a crash between the writes.
A live-like refresh seconds after the last one rewrites only the rows that change.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pyarrow as pa
import pytest

from closedloop.core.clock import Clock
from closedloop.core.engine import Engine
from closedloop.identity.resolve import resolve
from closedloop.portrait import refresh_write
from closedloop.portrait.lookup import profiles_clock
from closedloop.portrait.refresh import full_build, refresh
from tests.conftest import event_rows
from tests.identity.test_resolve import CONFIG
from tests.portrait.test_build import NOW
from tests.portrait.test_profile_traits import typed
from tests.portrait.test_refresh import TRAITS, incremental_equals_full, keyed

DAY = timedelta(days=1)


def rows(spec: list[dict[str, Any]]) -> pa.Table:
    return typed(event_rows(spec))


def order(mid: str, days: float, amount: float, **who: Any) -> dict[str, Any]:
    return {
        "message_id": mid,
        "event": "Order Completed",
        "order_id": f"o-{mid}",
        "revenue": amount,
        "category": "tea",
        "timestamp": NOW + days * DAY,
        **who,
    }


def view(mid: str, days: float, **who: Any) -> dict[str, Any]:
    at = NOW + days * DAY
    return {"message_id": mid, "event": "Product Viewed", "timestamp": at, **who}


BUYERS = [order(f"b{i}", -i - 1, 10.0 * (i + 1), user_id=f"U{i}") for i in range(6)]


@pytest.mark.slow  # three resolutions and two builds on a busy machine (~30 s)
def test_a_merge_moves_old_events_to_the_surviving_customer() -> None:
    # Anonymous browsing and an order, then a login ties the anonymous id to member U0: the
    # anonymous customer's old events move to U0's customer, whose portrait must count them.
    first = rows(
        [
            *BUYERS,
            view("a1", -5, anonymous_id="x"),
            order("a2", -4, 99.0, anonymous_id="x"),
        ]
    )
    second = rows([view("a3", -0.5, anonymous_id="x", user_id="U0")])
    assert incremental_equals_full(CONFIG, first, second, NOW - DAY, NOW) >= 2


@pytest.mark.slow  # three resolutions and two builds on a busy machine (~25 s)
def test_a_split_moves_events_out() -> None:
    # Anonymous id y is first seen with U1 only (its events are U1's); then with U2 as well:
    # it may link to one strong identifier only, so its anonymous-only events leave U1.
    first = rows(
        [
            *BUYERS,
            view("s1", -3, anonymous_id="y", user_id="U1"),
            order("s2", -2, 50.0, anonymous_id="y"),
        ]
    )
    second = rows([view("s3", -0.5, anonymous_id="y", user_id="U2")])
    assert incremental_equals_full(CONFIG, first, second, NOW - DAY, NOW) >= 1


def test_a_late_event_with_an_old_timestamp() -> None:
    # Loaded after the build but stamped 40 days back: before the last clock, so no clock
    # window finds it; only its being new to the snapshot does.
    first = rows(BUYERS)
    second = rows([order("late", -40, 500.0, user_id="U3"), view("late2", -60, user_id="U9")])
    assert incremental_equals_full(CONFIG, first, second, NOW - DAY, NOW) == 2


def build(engine: Engine, events: pa.Table) -> None:
    engine.append("events", events)
    resolve(engine, CONFIG, Clock(NOW))
    full_build(engine, TRAITS, Clock(NOW))


def test_an_erased_message_is_taken_out() -> None:
    with Engine("duckdb://") as e:
        build(e, rows([*BUYERS, order("gone", -0.5, 1000.0, user_id="U4")]))
        ev = e.table("events")
        e.replace("events", ev.filter(ev.message_id != "gone"))
        resolve(e, CONFIG, Clock(NOW))
        r = refresh(e, TRAITS, Clock(NOW))
        assert (r.mode, r.recomputed) == ("incremental", 1)
        after = keyed(e)
        u4 = [p for p in after[0] if p["email"] is None and p["revenue"] == 50.0]
        assert len(u4) == 1  # the 1000 is gone from U4's revenue
        full_build(e, TRAITS, Clock(NOW))
        assert keyed(e) == after


def test_a_live_refresh_rewrites_only_the_rows_that_change() -> None:
    with Engine("duckdb://") as e:
        build(e, rows([*BUYERS, *[view(f"v{i}", -2, user_id=f"W{i}") for i in range(20)]]))
        # Seconds later one viewer views again: same day, so no recency moves; no rank moves.
        e.append("events", rows([view("new", 0, user_id="W3")]))
        resolve(e, CONFIG, Clock(NOW + timedelta(seconds=5)))
        r = refresh(e, TRAITS, Clock(NOW + timedelta(seconds=5)))
        assert r.mode == "incremental" and r.changed is not None and r.affected is not None
        assert r.recomputed == 1
        changed = r.changed.to_pyarrow().column("customer_id").to_pylist()
        assert changed == r.affected.to_pyarrow().column("customer_id").to_pylist()
        assert r.diff == "shortcut"  # found from the new event, checked; not the whole snapshot
        # Only the rewritten row carries the new clock; the run record says all are current.
        p = e.table("profiles").select("customer_id", "computed_at").to_pyarrow().to_pylist()
        stamps = {x["customer_id"]: x["computed_at"] for x in p}
        assert {stamps[c] for c in changed} == {NOW + timedelta(seconds=5)}
        assert {v for c, v in stamps.items() if c not in changed} == {NOW}
        assert profiles_clock(e) == NOW + timedelta(seconds=5)
        after = keyed(e)
        full_build(e, TRAITS, Clock(NOW + timedelta(seconds=5)))
        assert keyed(e) == after


def test_a_new_buyer_moves_ranks_and_those_rows_are_rewritten() -> None:
    with Engine("duckdb://") as e:
        build(e, rows(BUYERS))
        # A big order from a new member: every buyer's monetary quintile may move.
        e.append("events", rows([order("big", 0, 10_000.0, user_id="U99")]))
        resolve(e, CONFIG, Clock(NOW))
        r = refresh(e, TRAITS, Clock(NOW))
        assert r.changed is not None
        assert r.changed.count().execute() > r.recomputed == 1
        after = keyed(e)
        full_build(e, TRAITS, Clock(NOW))
        assert keyed(e) == after


@pytest.mark.parametrize("fail", ["traits", "snapshot"])
def test_a_crash_between_writes_is_redone(fail: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Profiles written, then the traits (or the snapshot) fail: the next refresh finds the
    same changes again and ends where a full build does."""
    with Engine("duckdb://") as e:
        build(e, rows(BUYERS))
        e.append("events", rows([order("n1", 0, 7.0, user_id="U2"), view("n2", 0, user_id="Z")]))
        resolve(e, CONFIG, Clock(NOW))

        def boom(*a: Any, **k: Any) -> Any:
            raise RuntimeError("disk full")

        if fail == "snapshot":
            append, delete = e.append, e.delete_keys

            def no_snapshot(write: Any) -> Any:
                def w(name: str, *a: Any, **k: Any) -> Any:
                    if name == "portrait_seen":
                        raise RuntimeError("disk full")
                    return write(name, *a, **k)

                return w

            monkeypatch.setattr(e, "append", no_snapshot(append))
            monkeypatch.setattr(e, "delete_keys", no_snapshot(delete))
            monkeypatch.setattr(e.con, "insert", no_snapshot(e.con.insert))
        else:
            monkeypatch.setattr(refresh_write, "trait_values", boom)
        with pytest.raises(RuntimeError):
            refresh(e, TRAITS, Clock(NOW))
        monkeypatch.undo()
        e.forget()
        r = refresh(e, TRAITS, Clock(NOW))
        assert r.mode == "incremental" and r.recomputed >= 2
        after = keyed(e, snapshot=True)
        full_build(e, TRAITS, Clock(NOW))
        assert keyed(e, snapshot=True) == after
