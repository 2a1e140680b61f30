"""Segments evaluated through the narrowed view (``tags.incremental.narrowed``) only when
their scope stays inside it.

``colleagues`` (customers whose account is in ``buying_accounts``) is evaluated for
everyone: its moves may be customers nobody changed — colleagues of an account that just
became a buying one. A segment naming it (``busy_colleagues``) must then read those
customers' rows too, not the view narrowed to the changed ones; read through the view it
would miss them (it did, when the check was left out). Incremental equals full.
"""

from __future__ import annotations

import random
from datetime import timedelta

import pyarrow as pa
import pytest

from closedloop.core.clock import Clock
from closedloop.core.engine import Engine, table_differences
from closedloop.segments import incremental as seg_incremental
from closedloop.segments.accounts import evaluate_in_batches
from closedloop.segments.audience import Fields
from closedloop.segments.incremental import evaluate_changed
from closedloop.segments.tables import SEGMENT_MEMBERSHIP
from tests.segments.test_account_contact_segments import CHAIN, NOW, _defs, _open, _world

SEGS = [
    *CHAIN[:3],
    *_defs(
        [
            {
                "name": "busy_colleagues",
                "where": {
                    "all": [
                        {"in_segment": "colleagues"},
                        {"trait": "orders", "op": "gte", "value": 1},
                    ]
                },
            }
        ]
    ),
]
FIELDS = Fields(
    segments=tuple(s.name for s in SEGS),
    account_segments=("buying_accounts",),
)


@pytest.mark.parametrize("seed", range(2))
def test_a_segment_naming_one_evaluated_whole_reads_everyone_it_may_move(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(seg_incremental, "WIDE", 1.0)  # narrowed however few the customers
    rng = random.Random(seed)
    ids = [f"c{i:02d}" for i in range(16)]
    # Few buyers first (no account has two), then two more in one account: it becomes a
    # buying account and its other contacts — unchanged — become colleagues.
    first = {c: (1 if rng.random() < 0.5 else 0) for c in ids}
    first[ids[0]] = 3  # one buyer in account a0 (contacts c00, c04, c08, c12)
    second = dict(first) | {ids[4]: 3}
    moved = {ids[4]}
    t1 = NOW + timedelta(hours=1)
    stays = []
    for incremental in (True, False):
        with Engine("duckdb://") as engine:
            _world(engine, first)
            evaluate_in_batches(engine, SEGS, FIELDS, Clock(NOW))
            _world(engine, second)
            if incremental:
                ch = pa.table({"customer_id": pa.array(sorted(moved), pa.string())})
                with engine.temporary(ch) as changed:
                    evaluate_changed(engine, SEGS, FIELDS, Clock(t1), changed=changed, since=NOW)
            else:
                evaluate_in_batches(engine, SEGS, FIELDS, Clock(t1))
            people = _open(engine, SEGMENT_MEMBERSHIP.name, "customer_id")
            colleagues = {ids[i] for i in (0, 4, 8, 12)}
            assert people.get("colleagues", set()) == colleagues
            busy = {c for c in colleagues if second[c] >= 1}
            assert people.get("busy_colleagues", set()) == busy, incremental
            m = engine.table(SEGMENT_MEMBERSHIP.name)
            stays.append(m.order_by(["segment", "customer_id", "entered_at"]).to_pyarrow())
    assert table_differences(stays[0], stays[1]) == []
