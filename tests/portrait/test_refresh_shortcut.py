"""The refresh's shortcuts, and every case where they must not be trusted.

The attribution diff is found from candidate messages (new, or of customers identity
changed) when a check of the whole of ``event_customers`` against the snapshot's kept
signature holds; otherwise the whole snapshot is compared (``RefreshResult.diff`` says
which, and why). The profile write keeps everybody's derived values when nothing they
depend on can have moved. Each case ends equal to a full build on the same data and clock.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest

from closedloop.core.clock import Clock
from closedloop.core.engine import Engine
from closedloop.identity.resolve import resolve
from closedloop.portrait import refresh as refresh_mod
from closedloop.portrait.lookup import profiles_clock
from closedloop.portrait.refresh import RefreshResult, full_build, refresh
from tests.identity.test_resolve import CONFIG
from tests.portrait.test_build import NOW
from tests.portrait.test_refresh import TRAITS, keyed
from tests.portrait.test_refresh_rows import BUYERS, order, rows, view

SEC = timedelta(seconds=1)
VIEWERS = [view(f"v{i}", -2, user_id=f"W{i}") for i in range(20)]


def equals_full(e: Engine, at: datetime) -> None:
    """The refreshed warehouse ``e`` holds what a full build at ``at`` writes (the full
    build's own marks then serve the next refresh)."""
    after = keyed(e, snapshot=True)
    full_build(e, TRAITS, Clock(at))
    assert keyed(e, snapshot=True) == after


def step(e: Engine, events: pa.Table | None, at: datetime) -> RefreshResult:
    if events is not None:
        e.append("events", events)
    resolve(e, CONFIG, Clock(at))
    return refresh(e, TRAITS, Clock(at))


def built(events: pa.Table) -> Engine:
    e = Engine("duckdb://")
    e.append("events", events)
    resolve(e, CONFIG, Clock(NOW))
    full_build(e, TRAITS, Clock(NOW))
    return e


def stamped(spec: list[dict[str, Any]], received: datetime) -> pa.Table:
    t = rows(spec)
    at = pa.array([received] * t.num_rows, t.schema.field("received_at").type)
    return t.set_column(t.schema.get_field_index("received_at"), "received_at", at)


def test_new_events_take_the_shortcut_and_two_refreshes_in_one_second_agree() -> None:
    with built(rows([*BUYERS, *VIEWERS])) as e:
        r = step(e, stamped([view("n1", 0, user_id="W1")], NOW + SEC), NOW + 2 * SEC)
        assert (r.mode, r.diff, r.recomputed) == ("incremental", "shortcut", 1)
        # Another event, refreshed at the very same clock: still found, nothing rolls.
        r = step(e, stamped([order("n2", 0, 5.0, user_id="W2")], NOW + 2 * SEC), NOW + 2 * SEC)
        assert (r.diff, r.recomputed) == ("shortcut", 1)
        assert profiles_clock(e) == NOW + 2 * SEC
        equals_full(e, NOW + 2 * SEC)


def test_a_late_event_with_an_old_stamp_fails_the_check() -> None:
    # Received (and stamped) 40 days back: not among the candidates, so the signature of
    # event_customers differs from the snapshot's — the whole snapshot is compared.
    with built(rows([*BUYERS, *VIEWERS])) as e:
        r = step(e, rows([order("late", -40, 500.0, user_id="U3")]), NOW + SEC)
        assert r.diff.startswith("the check failed"), r.diff
        assert r.recomputed == 1
        equals_full(e, NOW + SEC)
        # The full comparison left the marks right: the next new event takes the shortcut.
        r = step(e, rows([view("n3", 0, user_id="W4")]), NOW + 2 * SEC)
        assert r.diff == "shortcut"
        equals_full(e, NOW + 2 * SEC)


def test_a_load_stamped_at_one_instant() -> None:
    # Everything received at one instant, a later event too: candidates are received after
    # the watermark, so it is not one; the check sees it.
    t0 = NOW - 3 * timedelta(days=1)
    with built(stamped([*BUYERS, *VIEWERS], t0)) as e:
        r = step(e, stamped([order("x1", -1, 8.0, user_id="W5")], t0), NOW + SEC)
        assert r.diff.startswith("the check failed") and r.recomputed == 1
        equals_full(e, NOW + SEC)
        # A bulk load received at one later instant, a third of the log: so many
        # candidates that comparing the whole snapshot is the cheaper way.
        bulk = [view(f"y{i}", -1, user_id=f"W{i % 7}") for i in range(12)]
        r = step(e, stamped(bulk, NOW), NOW + 2 * SEC)
        assert "candidate messages" in r.diff, r.diff
        equals_full(e, NOW + 2 * SEC)
    # An event received at the watermark's very instant, stamped long ago: not a candidate
    # (those are received after it), so only the check sees it; one a moment later is.
    first = rows([*BUYERS, *VIEWERS])
    top = max(first.column("received_at").to_pylist())
    with built(first) as e:
        r = step(e, stamped([order("x2", -30, 8.0, user_id="W6")], top), NOW + SEC)
        assert r.diff.startswith("the check failed") and r.recomputed == 1
        equals_full(e, NOW + SEC)
        r = step(e, stamped([order("x3", -30, 9.0, user_id="W7")], top + SEC), NOW + 2 * SEC)
        assert r.diff == "shortcut" and r.recomputed == 1
        equals_full(e, NOW + 2 * SEC)


def test_an_erased_message_fails_the_check() -> None:
    with built(rows([*BUYERS, *VIEWERS, order("gone", -0.5, 1000.0, user_id="U4")])) as e:
        ev = e.table("events")
        e.replace("events", ev.filter(ev.message_id != "gone"))
        r = step(e, None, NOW + SEC)
        assert r.recomputed == 1  # by the check, or by identity's record of the customer
        equals_full(e, NOW + SEC)


def test_an_attribution_changed_behind_identitys_back_fails_the_check() -> None:
    # An old event moved to another customer without identity recording a change: no
    # candidate holds it, and only the check can see it.
    with built(rows([*BUYERS, *VIEWERS])) as e:
        ec = e.table("event_customers").to_pyarrow().to_pylist()
        owner = {r["message_id"]: r["customer_id"] for r in ec}
        for r in ec:
            if r["message_id"] == "b2":
                r["customer_id"] = owner["b4"]
        e.replace("event_customers", pa.Table.from_pylist(ec))
        r = refresh(e, TRAITS, Clock(NOW + SEC))
        assert r.diff.startswith("the check failed") and r.recomputed == 2
        revenue = {p["customer_id"]: p["revenue"] for p in keyed(e)[0]}
        assert sorted(revenue.values())[-1] == 30.0 + 50.0  # b2's order now counts for b4's


@pytest.mark.slow  # a merge and a split: five resolutions and refreshes (~20 s)
def test_merges_and_splits_move_old_events_through_the_shortcut() -> None:
    with built(
        rows(
            [
                *BUYERS,
                *VIEWERS,
                view("a1", -5, anonymous_id="x"),
                order("a2", -4, 99.0, anonymous_id="x"),
                view("s1", -3, anonymous_id="y", user_id="U1"),
                order("s2", -2, 50.0, anonymous_id="y"),
            ]
        )
    ) as e:
        # A login ties anonymous x to U0: x's old events (not candidates by their stamps)
        # move, found from identity's record of the customers it changed.
        login = [view("a3", -0.01, anonymous_id="x", user_id="U0")]
        r = step(e, stamped(login, NOW + SEC), NOW + SEC)
        assert r.diff == "shortcut" and r.recomputed >= 2
        equals_full(e, NOW + SEC)
        # y seen with U2 too: y is quarantined and its anonymous-only events leave U1.
        seen = [view("s3", -0.01, anonymous_id="y", user_id="U2")]
        r = step(e, stamped(seen, NOW + 2 * SEC), NOW + 2 * SEC)
        assert r.diff == "shortcut" and r.recomputed >= 1
        equals_full(e, NOW + 2 * SEC)


def test_a_crash_in_a_full_build_drops_the_marks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The snapshot replaced, then the run record fails: the older run's marks would
    describe another snapshot, so there are none and the next refresh compares whole."""
    with built(rows([*BUYERS, *VIEWERS])) as e:
        e.append("events", rows([order("c1", 0, 9.0, user_id="W7")]))
        resolve(e, CONFIG, Clock(NOW + SEC))
        append = e.append

        def no_run(name: str, *a: Any, **k: Any) -> Any:
            if name == "portrait_runs":
                raise RuntimeError("disk full")
            return append(name, *a, **k)

        monkeypatch.setattr(e, "append", no_run)
        with pytest.raises(RuntimeError):
            full_build(e, TRAITS, Clock(NOW + SEC))
        monkeypatch.undo()
        e.forget()
        r = refresh(e, TRAITS, Clock(NOW + SEC))
        assert r.mode == "incremental" and r.diff == "the last run left no marks"
        equals_full(e, NOW + SEC)


def test_a_crash_after_the_profiles_is_redone_by_the_shortcut(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with built(rows([*BUYERS, *VIEWERS])) as e:
        e.append("events", rows([order("d1", 0, 3.0, user_id="W8")]))
        resolve(e, CONFIG, Clock(NOW + SEC))

        def boom(*a: Any, **k: Any) -> Any:
            raise RuntimeError("disk full")

        monkeypatch.setattr(refresh_mod, "marks_now", boom)  # after profiles and traits
        with pytest.raises(RuntimeError):
            refresh(e, TRAITS, Clock(NOW + SEC))
        monkeypatch.undo()
        e.forget()
        r = refresh(e, TRAITS, Clock(NOW + SEC))
        assert r.diff == "shortcut" and r.recomputed == 1
        equals_full(e, NOW + SEC)


def test_derived_values_kept_only_while_nothing_they_read_moved() -> None:
    with built(rows([*BUYERS, *VIEWERS])) as e:
        # A view the same day: no rank input moved, only the viewer's row is rewritten.
        r = step(e, rows([view("k1", 0, user_id="W9")]), NOW + SEC)
        assert r.changed is not None and int(r.changed.count().execute()) == 1
        equals_full(e, NOW + SEC)
        # A buyer erased behind the refresh's back (rows deleted, as an erasure does):
        # everyone's monetary and frequency ranks move, though no affected input did.
        u5 = e.table("event_customers").filter(lambda t: t.message_id == "b5")
        cid = u5.to_pyarrow().column("customer_id")[0].as_py()
        for name in ("profiles", "portrait_seen", "event_customers", "computed_traits"):
            t = e.table(name)
            e.replace(name, t.filter(t.customer_id != cid))
        ev = e.table("events")
        e.replace("events", ev.filter(ev.message_id != "b5"))
        r = step(e, rows([view("k2", 0, user_id="W9")]), NOW + 2 * SEC)
        assert r.changed is not None and int(r.changed.count().execute()) > 1
        equals_full(e, NOW + 2 * SEC)
        # A new day: recency moves for every buyer though no event came.
        r = step(e, None, NOW + timedelta(days=1))
        assert r.changed is not None and int(r.changed.count().execute()) >= len(BUYERS) - 1
        equals_full(e, NOW + timedelta(days=1))


def test_identity_that_never_recorded_a_change_still_allows_the_shortcut() -> None:
    # A warehouse whose identity runs have recorded no change at all (the table was never
    # written): identity's next run leaves an empty record, so the refresh can tell "no
    # change since" from "no record" and still takes the shortcut for a new event.
    with built(rows([*BUYERS, *VIEWERS])) as e:
        e.con.drop_table("identity_changes")
        e.forget()
        r = step(e, stamped([view("n1", 0, user_id="W1")], NOW + SEC), NOW + 2 * SEC)
        assert e.exists("identity_changes")
        assert (r.mode, r.diff, r.recomputed) == ("incremental", "shortcut", 1), r.diff
        equals_full(e, NOW + 2 * SEC)
