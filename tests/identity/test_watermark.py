"""The watermark finds an incremental run's new events without reading the whole log.

Each case the watermark could miss — an event logged late with an older stamp, a message
id logged again, an erasure (even one that a late event hides from the counts), a message
without identifiers, a run that dies after reading — is played here beside a twin warehouse
resolved in full every time: the tables must be the full run's, and the run must say which
way it found its new events.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import ibis
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closedloop.core.clock import Clock
from closedloop.core.engine import Engine
from closedloop.identity.incremental import WATERMARK_LAG
from closedloop.identity.resolve import resolve
from tests.conftest import event_rows
from tests.identity.test_incremental import CONFIG, START, TABLES, _rows
from tests.identity.test_resolve import customer_of

STATE = (*TABLES, "identity_occurrences", "identity_messages")
FIRST = [
    {"message_id": "a", "user_id": "M1", "anonymous_id": "ck1"},
    {"message_id": "b", "user_id": "M2", "anonymous_id": "ck2", "traits": {"phone": "13800138001"}},
    {"message_id": "c", "anonymous_id": "ck3", "traits": {"email": "li@x.com"}},
]


def _add(engine: Engine, msgs: list[dict[str, Any]], received: datetime) -> None:
    """Append ``msgs`` stamped as received at ``received`` (their event time is START)."""
    rows = event_rows([{**m, "timestamp": m.get("timestamp", START)} for m in msgs])
    at = pa.array([received] * rows.num_rows, rows.schema.field("received_at").type)
    engine.append(
        "events", rows.set_column(rows.schema.get_field_index("received_at"), "received_at", at)
    )


def _why(engine: Engine) -> str:
    runs = engine.table("identity_runs")
    return str(runs.order_by(ibis.desc(runs.seq)).limit(1).to_pyarrow()["why"][0])


class Twins:
    """A warehouse resolved incrementally and one resolved in full, fed the same rows."""

    def __init__(self) -> None:
        self.inc, self.full = Engine("duckdb://"), Engine("duckdb://")
        self.n = 0

    def add(self, msgs: list[dict[str, Any]], received: datetime) -> None:
        for e in (self.inc, self.full):
            _add(e, msgs, received)

    def erase(self, message_id: str) -> None:
        for e in (self.inc, self.full):
            ev = e.table("events")
            e.replace("events", ev.filter(ev.message_id != message_id))

    def resolve(self) -> tuple[str, str]:
        """(path, why) of the incremental side; both sides' tables must then agree."""
        self.n += 1
        clock = Clock(START + timedelta(days=30, hours=self.n))
        r = resolve(self.inc, CONFIG, clock)
        resolve(self.full, CONFIG, clock, incremental=False)
        for name in STATE:
            assert _rows(self.inc, name) == _rows(self.full, name), name
        return r.path, _why(self.inc)

    def close(self) -> None:
        self.inc.close()
        self.full.close()


@pytest.fixture
def twins() -> Any:
    t = Twins()
    yield t
    t.close()


T0 = START + timedelta(days=10)
WITHIN_LAG = "since the watermark less the lag (some stamped at or before it)"


def test_new_events_are_found_by_the_watermark(twins: Twins) -> None:
    twins.add(FIRST, T0)
    assert twins.resolve()[0] == "full"
    d = {"message_id": "d", "user_id": "M1", "traits": {"email": "li@x.com"}}
    twins.add([d], T0 + timedelta(minutes=1))
    assert twins.resolve() == ("incremental", "1 new message(s) since the watermark")
    assert customer_of(twins.inc, "member_id", "M1") == customer_of(twins.inc, "email", "li@x.com")
    # The watermark moves on with the events read.
    twins.add([{"message_id": "e", "user_id": "M9"}], T0 + timedelta(hours=2))
    assert twins.resolve() == ("incremental", "1 new message(s) since the watermark")
    runs = twins.inc.table("identity_runs").order_by("seq").to_pyarrow().to_pylist()
    assert [r["watermark"] for r in runs] == [
        T0,
        T0 + timedelta(minutes=1),
        T0 + timedelta(hours=2),
    ]
    # Stamped exactly at the watermark: not after it, so found within the lag.
    twins.add(
        [{"message_id": "f", "user_id": "M9", "anonymous_id": "ck2"}], T0 + timedelta(hours=2)
    )
    assert twins.resolve() == ("incremental", f"1 new message(s) {WITHIN_LAG}")


def test_after_a_bulk_load_minutes_ago_only_the_events_after_it_are_read(twins: Twins) -> None:
    """A history loaded in bulk just before (an import, a freshly built warehouse) lies
    within the lag: the next runs still take only the events stamped after the watermark as
    candidates, and the check holds without reading the bulk again."""
    bulk = [
        {"message_id": f"h{i}", "user_id": f"M{i}", "anonymous_id": f"ck{i}"} for i in range(40)
    ]
    twins.add(bulk, T0)
    twins.resolve()
    for k in range(1, 4):
        at = T0 + timedelta(minutes=k)
        twins.add(
            [{"message_id": f"n{k}", "user_id": f"M{k}", "traits": {"email": f"{k}@x.com"}}], at
        )
        assert twins.resolve() == ("incremental", "1 new message(s) since the watermark")
        new = twins.inc.con.table("_scratch_id_new_events")
        assert new.to_pyarrow()["message_id"].to_pylist() == [f"n{k}"]


def test_a_late_event_with_an_older_stamp_is_found_by_the_whole_log(twins: Twins) -> None:
    twins.add(FIRST, T0)
    twins.resolve()
    # Committed now, stamped long before the watermark (a spool loaded late, a slow import).
    late = T0 - WATERMARK_LAG - timedelta(minutes=1)
    twins.add([{"message_id": "z", "user_id": "M2", "anonymous_id": "ck3"}], late)
    path, why = twins.resolve()
    assert path == "incremental"
    assert why.startswith("1 new message(s) (the watermark check failed")
    assert customer_of(twins.inc, "member_id", "M2") == customer_of(twins.inc, "email", "li@x.com")
    # Within the lag it is found by the watermark less the lag, not by the whole log.
    twins.add([{"message_id": "y", "user_id": "M4"}], T0 - WATERMARK_LAG + timedelta(minutes=1))
    assert twins.resolve() == ("incremental", f"1 new message(s) {WITHIN_LAG}")
    # A late one and a new one together: both found within the lag.
    twins.add([{"message_id": "x", "user_id": "M5"}], T0 + timedelta(1))
    twins.add(
        [{"message_id": "w", "user_id": "M6", "anonymous_id": "ck5"}], T0 - timedelta(minutes=1)
    )
    assert twins.resolve() == ("incremental", f"2 new message(s) {WITHIN_LAG}")
    assert customer_of(twins.inc, "member_id", "M6") == customer_of(
        twins.inc, "anonymous_id", "ck5"
    )


def test_a_message_id_logged_again_makes_the_run_full(twins: Twins) -> None:
    twins.add(FIRST, T0)
    twins.resolve()
    twins.add([{"message_id": "a", "user_id": "M7", "anonymous_id": "ck1"}], T0 + timedelta(1))
    assert twins.resolve() == ("full", "the event log holds a message id more than once")
    assert customer_of(twins.inc, "member_id", "M7")


def test_an_erasure_is_seen_even_when_a_late_event_hides_it_from_the_counts(
    twins: Twins,
) -> None:
    twins.add(FIRST, T0)
    twins.resolve()
    # One resolved message gone, one late message come: the log has as many rows as
    # messages listed plus candidates (none), but not the same ids.
    twins.erase("b")
    twins.add([{"message_id": "z", "user_id": "M5"}], T0 - timedelta(days=1))
    assert twins.resolve() == ("full", "1 resolved message(s) were erased since")
    assert customer_of(twins.inc, "member_id", "M5")
    m = twins.inc.table("identity_map")
    assert int(m.filter(m.id_value == "M2").count().execute()) == 0  # erased: gone


def test_a_message_without_identifiers_is_listed_and_not_read_again(twins: Twins) -> None:
    twins.add(FIRST, T0)
    twins.resolve()
    twins.add([{"message_id": "x", "anonymous_id": None, "user_id": None}], T0 + timedelta(1))
    twins.add([{"message_id": "w", "user_id": "M8"}], T0 + timedelta(1))
    r = resolve(twins.inc, CONFIG, Clock(START + timedelta(days=40)))
    assert (r.path, r.new_messages) == ("incremental", 1)  # one message held identifiers
    listed = twins.inc.table("identity_messages")
    assert int(listed.filter(listed.message_id == "x").count().execute()) == 1
    # Long after, the message is older than the watermark, and the check still holds.
    twins.add([{"message_id": "v", "user_id": "M9"}], T0 + timedelta(days=5))
    assert resolve(twins.inc, CONFIG).path == "incremental"
    assert _why(twins.inc) == "1 new message(s) since the watermark"


def test_a_run_that_fails_after_reading_leaves_the_watermark_where_it_was(
    twins: Twins,
) -> None:
    twins.add(FIRST, T0)
    twins.resolve()
    twins.add([{"message_id": "d", "user_id": "M1", "anonymous_id": "ck9"}], T0 + timedelta(1))
    real = twins.inc.append

    def failing(name: str, data: Any) -> None:
        real(name, data)
        if name == "identity_runs":  # the run's last write, then the crash
            raise RuntimeError("power cut")

    twins.inc.append = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="power cut"):
        resolve(twins.inc, CONFIG, Clock(START + timedelta(days=40)))
    twins.inc.append = real  # type: ignore[method-assign]
    runs = twins.inc.table("identity_runs").to_pyarrow()
    assert runs.num_rows == 1 and runs["watermark"][0].as_py() == T0
    assert twins.resolve() == ("incremental", "1 new message(s) since the watermark")


def test_events_without_a_received_time_are_always_candidates(twins: Twins) -> None:
    """A log written without ``received_at`` (hand-made, an old import): no watermark is
    known, and such events are read by the check's candidates, never missed."""
    twins.add(FIRST, None)  # type: ignore[arg-type]
    assert twins.resolve()[0] == "full"
    assert twins.inc.table("identity_runs").to_pyarrow()["watermark"][0].as_py() is None
    twins.add([{"message_id": "d", "user_id": "M1", "anonymous_id": "ck3"}], None)  # type: ignore[arg-type]
    assert twins.resolve() == ("incremental", "1 new message(s) (no watermark recorded)")
    twins.add([{"message_id": "e", "user_id": "M2", "anonymous_id": "ck3"}], T0)
    assert twins.resolve() == ("incremental", "1 new message(s) (no watermark recorded)")
    # From the first stamped event on, a watermark; unstamped events are still candidates.
    twins.add([{"message_id": "f", "user_id": "M5", "anonymous_id": "ck1"}], None)  # type: ignore[arg-type]
    assert twins.resolve() == ("incremental", "1 new message(s) since the watermark")


def test_runs_recorded_before_the_watermark_are_upgraded(twins: Twins) -> None:
    twins.add(FIRST, T0)
    twins.resolve()
    runs = twins.inc.table("identity_runs")
    # identity_runs as an earlier version wrote it: no watermark column.
    twins.inc.con.create_table("identity_runs", runs.drop("watermark"), overwrite=True)
    twins.inc.forget("identity_runs")
    twins.add([{"message_id": "d", "user_id": "M4"}], T0 + timedelta(1))
    assert twins.resolve() == ("incremental", "1 new message(s) (no watermark recorded)")
    twins.add([{"message_id": "e", "user_id": "M5"}], T0 + timedelta(2))
    assert twins.resolve() == ("incremental", "1 new message(s) since the watermark")


# Ten minutes apart over four hours: stamps after the watermark, at it, within the lag
# before it and beyond the lag all occur.
stamp = st.integers(-12, 12).map(lambda k: T0 + k * timedelta(minutes=10))


# Eight examples: each costs ~1.8 CPU-s (two resolutions per batch), and every case the
# watermark could miss is pinned by a deterministic test above (late stamp, stamp at the
# watermark, within the lag, an id logged again, an erasure hidden by a late event, no
# identifiers, no received time, a failed run); the random ones look for mixtures of them.
@pytest.mark.slow  # ~15 CPU-s
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(
        st.lists(
            st.tuples(
                st.sampled_from(["M1", "M2", "M3", None]),
                st.sampled_from(["ck1", "ck2", "ck3", None]),
                stamp,
            ),
            min_size=1,
            max_size=4,
        ),
        min_size=1,
        max_size=4,
    ),
    erase=st.lists(st.integers(0, 30), max_size=2),
)
def test_whatever_the_stamps_and_erasures_incremental_equals_full(
    batches: list[list[tuple[str | None, str | None, datetime]]], erase: list[int]
) -> None:
    """Events stamped hours apart in any order (late ones included), erasures between runs:
    every run ends with the tables of a full run, and the last run sees every message."""
    twins = Twins()
    try:
        n = 0
        for i, batch in enumerate(batches):
            for user, cookie, at in batch:
                twins.add([{"message_id": f"m{n}", "user_id": user, "anonymous_id": cookie}], at)
                n += 1
            if i and erase and erase[0] < n:
                twins.erase(f"m{erase.pop(0)}")
            twins.resolve()
        listed = twins.inc.table("identity_messages").order_by("message_id").to_pyarrow()
        logged = twins.inc.table("events").order_by("message_id").to_pyarrow()
        assert listed["message_id"].to_pylist() == logged["message_id"].to_pylist()
    finally:
        twins.close()
