"""New events that only repeat what is known move counters, and nothing else, as a full run.

A live server mostly loads known customers doing things: an order with a member id and a
cookie seen together before. Such a run takes the counts-only path (no region read back
from ``identity_occurrences``) and says so in ``identity_runs``; each thing that could make
it differ from a full run — a new identifier, a new pair, an older timestamp, a name, a
quarantined identifier, a link a rule dropped — sends the run down the region path instead.
Every case is played beside a twin warehouse resolved in full every time: the tables and
the figures must be the full run's.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from closedloop.core.clock import Clock
from closedloop.core.definitions import IdentityConfig
from closedloop.identity.resolve import COUNTS_ONLY, resolve
from tests.identity.test_incremental import CONFIG, CONFIG_MATCHING, START, _figures, _rows
from tests.identity.test_watermark import STATE, T0, Twins

HISTORY = [
    {
        "message_id": "h1",
        "user_id": "M1",
        "anonymous_id": "ck1",
        "traits": {"phone": "13800138001"},
    },
    {"message_id": "h2", "user_id": "M2", "anonymous_id": "ck2", "traits": {"email": "li@x.com"}},
    {"message_id": "h3", "anonymous_id": "ck3", "context": {"device": {"id": "d1"}}},
]


class CountTwins(Twins):
    """Twins that also compare the figures of both runs."""

    def __init__(self, config: IdentityConfig = CONFIG) -> None:
        super().__init__()
        self.config = config

    def resolve(self) -> tuple[str, str]:
        self.n += 1
        clock = Clock(START + timedelta(days=30, hours=self.n))
        r = resolve(self.inc, self.config, clock)
        f = resolve(self.full, self.config, clock, incremental=False)
        for name in STATE:
            assert _rows(self.inc, name) == _rows(self.full, name), name
        assert _figures(r) == _figures(f)
        runs = self.inc.table("identity_runs").to_pyarrow().to_pylist()
        return r.path, str(max(runs, key=lambda x: x["seq"])["why"])


@pytest.fixture
def twins() -> Any:
    t = CountTwins()
    t.add(HISTORY, T0)
    assert t.resolve()[0] == "full"
    yield t
    t.close()


def _counted(why: str) -> bool:
    return why.endswith(COUNTS_ONLY)


def test_known_identifiers_seen_together_again_move_only_counters(twins: CountTwins) -> None:
    at = T0 + timedelta(minutes=1)
    order = {"type": "track", "event": "Order Completed", "timestamp": START + timedelta(days=3)}
    twins.add([{**order, "message_id": "o1", "user_id": "M1", "anonymous_id": "ck1"}], at)
    twins.add([{**order, "message_id": "o2", "user_id": "M1", "anonymous_id": "ck1"}], at)
    twins.add([{**order, "message_id": "o3", "user_id": "M2"}], at)  # one identifier
    path, why = twins.resolve()
    assert (path, why) == ("incremental", "3 new message(s) since the watermark" + COUNTS_ONLY)
    m = twins.inc.table("identity_map")
    row = m.filter(m.id_value == "M1").to_pyarrow().to_pylist()[0]
    assert (row["messages"], row["last_seen"]) == (3, START + timedelta(days=3))
    e = twins.inc.table("identity_edges")
    ends = e.a_value.isin(["ck1", "M1"]) & e.b_value.isin(["ck1", "M1"])
    edge = e.filter(ends).to_pyarrow().to_pylist()[0]
    assert (edge["messages"], edge["message_id"], edge["last_ts"]) == (
        3,
        "h1",
        START + timedelta(days=3),
    )
    assert twins.inc.table("event_customers").count().execute() == 6
    # A refused value among known ones: counted in identifier_issues, still counts only.
    twins.add([{"message_id": "o4", "user_id": "M1", "traits": {"phone": "12345"}}], at)
    assert _counted(twins.resolve()[1])


@pytest.mark.parametrize(
    "event",
    [
        pytest.param({"user_id": "M1", "anonymous_id": "ck9"}, id="new identifier"),
        pytest.param({"user_id": "M2", "anonymous_id": "ck1"}, id="known identifiers newly paired"),
        pytest.param(
            {"user_id": "M1", "anonymous_id": "ck1", "timestamp": START - timedelta(days=1)},
            id="older than first seen",
        ),
        pytest.param(
            {"user_id": "M2", "traits": {"email": "li@x.com", "name": "li wei"}}, id="a name"
        ),
        pytest.param(
            {"anonymous_id": "ck3", "context": {"device": {"id": "d1"}}}, id="known pair, no M"
        ),
    ],
)
def test_anything_else_takes_the_region_path(twins: CountTwins, event: dict[str, Any]) -> None:
    twins.add([{"message_id": "x1", **event}], T0 + timedelta(minutes=1))
    path, why = twins.resolve()
    assert path == "incremental"
    if event.get("context"):  # the control: a pair seen before, nothing new
        assert _counted(why)
    else:
        assert not _counted(why), why


def test_a_quarantined_identifier_takes_the_region_path(twins: CountTwins) -> None:
    # d1 may hold one strong identifier: seen with M1 and M2 it is quarantined.
    dev = {"context": {"device": {"id": "d1"}}}
    twins.add([{"message_id": "q1", "user_id": "M1", **dev}], T0 + timedelta(minutes=1))
    twins.add([{"message_id": "q2", "user_id": "M2", **dev}], T0 + timedelta(minutes=1))
    assert not _counted(twins.resolve()[1])
    m = twins.inc.table("identity_map")
    assert m.filter((m.id_value == "d1") & m.quarantined).count().execute() == 1
    twins.add([{"message_id": "q3", "user_id": "M1", **dev}], T0 + timedelta(minutes=2))
    assert not _counted(twins.resolve()[1])


def test_a_link_dropped_by_a_rule_in_the_cluster_takes_the_region_path(twins: CountTwins) -> None:
    # Two phones on one member within the window: one phone link is dropped (a limit of 1).
    ph = {"user_id": "M1", "traits": {"phone": "13900139003"}}
    twins.add([{"message_id": "p1", **ph}], T0 + timedelta(minutes=1))
    assert not _counted(twins.resolve()[1])
    assert twins.inc.table("identity_dropped_links").count().execute() == 1
    # Seen again: the dropped link is not a used one.
    twins.add([{"message_id": "p2", **ph}], T0 + timedelta(minutes=2))
    assert not _counted(twins.resolve()[1])
    # A used link of that cluster seen again: more messages could change which link the
    # rule keeps (strongest first), so the rule is run again.
    twins.add([{"message_id": "p4", "user_id": "M1", "anonymous_id": "ck1"}], T0 + timedelta(3))
    assert not _counted(twins.resolve()[1])
    # Elsewhere, counts only as before.
    twins.add([{"message_id": "p3", "user_id": "M2"}], T0 + timedelta(minutes=3))
    assert _counted(twins.resolve()[1])


RUNS: list[str] = []

# Plain repeats (the live server's usual events) weighted up, beside each disqualifier.
PLAIN = [
    {"user_id": "M1", "anonymous_id": "ck1"},
    {"user_id": "M2", "anonymous_id": "ck2"},
    {"anonymous_id": "ck3", "context": {"device": {"id": "d1"}}},
]
known = st.sampled_from(
    [
        *PLAIN,
        *PLAIN,
        {"user_id": "M1", "anonymous_id": "ck1"},
        {"user_id": "M1", "anonymous_id": "ck1", "traits": {"phone": "13800138001"}},
        {"user_id": "M2", "anonymous_id": "ck2"},
        {"user_id": "M2", "traits": {"email": "li@x.com"}},
        {"anonymous_id": "ck3", "context": {"device": {"id": "d1"}}},
        {"user_id": "M1", "context": {"device": {"id": "d1"}}},
        {"user_id": "M3", "traits": {"phone": "13800138001"}},
        {"user_id": "M2", "traits": {"email": "li@x.com", "name": "li wei"}},
        {"user_id": "M1", "traits": {"phone": "13900139003"}},
        {"anonymous_id": "ck2"},
    ]
)


# Both paths, for certain: the first run is full, then pairs seen before (counts only, three
# times) and a name with a new e-mail (the region path). Random examples alone took the
# counts-only path fewer than three times now and then, and the test failed at random.
BOTH_PATHS = [
    [(PLAIN[0], 1), (PLAIN[1], 1)],
    [(PLAIN[0], 2)],
    [(PLAIN[1], 3)],
    [(PLAIN[0], 4), (PLAIN[1], 4)],
    [({"user_id": "M2", "traits": {"email": "li@x.com", "name": "li wei"}}, 5)],
]


@pytest.mark.slow  # ~25 CPU-s: two resolutions per increment, per example
def test_counts_only_equals_full_on_random_repeats() -> None:
    RUNS.clear()
    _repeats()
    assert sum(_counted(w) for w in RUNS) >= 3, "the counts-only path was never taken"
    assert not all(_counted(w) for w in RUNS), "the region path was never taken"


# Seven random examples (and BOTH_PATHS): each costs ~3.5 CPU-s (two resolutions per
# increment), and every single thing that must leave the counts-only path is pinned by the
# deterministic tests above (new identifier, new pair, older stamp, name, quarantine,
# dropped link); the random ones look for combinations of them.
@settings(max_examples=7, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(batches=BOTH_PATHS, config=CONFIG)
@given(
    batches=st.lists(
        st.lists(st.tuples(known, st.integers(0, 40)), min_size=1, max_size=2),
        min_size=2,
        max_size=5,
    ),
    config=st.sampled_from([CONFIG, CONFIG_MATCHING]),
)
def _repeats(batches: list[list[tuple[dict[str, Any], int]]], config: IdentityConfig) -> None:
    """A few identifier combinations repeated at random times, with names, a shared device
    and a second phone now and then: every run is the full run's."""
    twins = CountTwins(config)
    try:
        n = 0
        for i, batch in enumerate(batches):
            for msg, day in batch:
                ts = START + timedelta(days=day)
                twins.add([{**msg, "message_id": f"m{n}", "timestamp": ts}], T0 + timedelta(i))
                n += 1
            path, why = twins.resolve()
            if i:
                assert path == "incremental"
                RUNS.append(why)
    finally:
        twins.close()
