"""Both ways an incremental run writes its region give the tables of a full run.

Engines with transactions delete and insert only the region's rows; engines without (Spark)
rewrite each table whole as its rows outside the region plus the region's. The second path
is run here on DuckDB with its ``transactions`` capability withdrawn, beside the first and
beside forced full runs, over loads that merge, split by rule, refuse and quarantine.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from closedloop.core.clock import Clock
from closedloop.core.engine import Engine
from closedloop.core.ids import customer_id_for
from closedloop.identity.resolve import resolve
from tests.identity.test_incremental import CONFIG, START
from tests.identity.test_incremental_backends import _add
from tests.identity.test_incremental_crash import FIRST, SECOND, STATE, _state
from tests.identity.test_matching import MATCHING, _population

THIRD = [
    # a shared device: seen with more strong identifiers than it may be (quarantined)
    {"message_id": "i", "user_id": "M1", "context": {"device": {"id": "d1"}}},
    {"message_id": "j", "user_id": "M2", "context": {"device": {"id": "d1"}}},
    {"message_id": "k", "user_id": "M5", "anonymous_id": "ck2"},  # member ↔ member: never
    {"message_id": "l", "user_id": "null", "traits": {"phone": "0"}},
]


def test_row_level_and_whole_table_writes_equal_full_runs() -> None:
    rows, whole, full = Engine("duckdb://"), Engine("duckdb://"), Engine("duckdb://")
    whole.capabilities = whole.capabilities - {"transactions"}
    try:
        for n, part in enumerate([FIRST, SECOND, THIRD]):
            clock = Clock(START + timedelta(days=n + 1))
            for e in (rows, whole, full):
                _add(e, part)
            paths = [resolve(e, CONFIG, clock).path for e in (rows, whole)]
            assert resolve(full, CONFIG, clock, incremental=False).path == "full"
            assert paths == (["incremental"] * 2 if n else ["full"] * 2)
            want = _state(full)
            for e in (rows, whole):
                got = _state(e)
                for name in STATE:
                    if name != "identity_runs":  # the path taken differs, by design
                        assert got[name] == want[name], name
        quarantined = rows.table("identity_map").filter(lambda t: t.quarantined).count()
        assert int(quarantined.execute()) >= 1
        assert int(rows.table("identity_dropped_links").count().execute()) >= 1
    finally:
        for e in (rows, whole, full):
            e.close()


def test_a_split_off_part_whose_anchor_names_a_taken_id_gets_a_fresh_one() -> None:
    """ck0 anchored customer X with ck9 and a phone; a second phone splits ck0 away (one phone
    per customer), X stays with the majority, and the part holding ck0 — whose own id would
    be X's — gets the next free id, on both paths alike."""
    first = [
        {"message_id": "a", "anonymous_id": "ck0", "traits": {"phone": "13800138001"}},
        {"message_id": "b", "anonymous_id": "ck9", "traits": {"phone": "13800138001"}},
    ]
    later = START + timedelta(days=1)
    second = [
        {
            "message_id": "c",
            "anonymous_id": "ck0",
            "user_id": "M1",
            "traits": {"phone": "13900139003"},
            "timestamp": later,
        }
    ]
    owners = []
    for incremental in (True, False):
        with Engine("duckdb://") as e:
            _add(e, [{**m, "timestamp": START} for m in first])
            resolve(e, CONFIG, Clock(later))
            x = customer_id_for("anonymous_id\x1fck0")
            _add(e, second)
            r = resolve(e, CONFIG, Clock(later + timedelta(days=1)), incremental=incremental)
            assert r.path == ("incremental" if incremental else "full")
            rows = e.table("identity_map").to_pyarrow().to_pylist()
            owner = {(m["id_type"], m["id_value"]): m["customer_id"] for m in rows}
            assert owner[("anonymous_id", "ck9")] == x
            assert owner[("anonymous_id", "ck0")] == customer_id_for("anonymous_id\x1fck0#1")
            owners.append(owner)
    assert owners[0] == owners[1]


@pytest.mark.slow
def test_events_without_profile_records_reuse_the_scores_and_equal_a_full_run(
    tmp_path: Path,
) -> None:
    """With matching on, new events that carry no record (orders, page views) leave the
    records, hence the model and its scored pairs, as they were: the incremental run reads
    the kept pairs back instead of refitting (no matching scratch is made on a fresh
    connection) and still writes what a full run writes."""
    msgs, twins = _population(3)
    orders = [
        {"message_id": f"o{i}", "user_id": m["user_id"], "type": "track", "event": "Order"}
        for i, m in enumerate(msgs[:30])
    ]
    urls = [f"duckdb:///{tmp_path}/inc.duckdb", f"duckdb:///{tmp_path}/full.duckdb"]
    for url in urls:
        with Engine(url) as e:
            _add(e, msgs)
            resolve(e, MATCHING, Clock(START))
            _add(e, orders)
    clock = Clock(START + timedelta(hours=1))
    # Fresh connections: a scratch table seen afterwards was made by this run.
    with Engine(urls[0]) as inc, Engine(urls[1]) as full:
        r = resolve(inc, MATCHING, clock)
        assert (r.path, r.new_messages) == ("incremental", len(orders))
        assert not any("pm_" in t for t in inc.con.list_tables())  # no refit
        assert resolve(full, MATCHING, clock, incremental=False).probabilistic >= len(twins) // 2
        assert any("pm_" in t for t in full.con.list_tables())
        got, want = _state(inc), _state(full)
        for name in STATE:
            if name != "identity_runs":  # the path taken differs, by design
                assert got[name] == want[name], name
