"""`closedloop refresh` leaves accounts and their contacts equal to a full build's."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from closedloop.core.clock import Clock
from closedloop.core.engine import Engine
from closedloop.identity.resolve import resolve
from closedloop.portrait.refresh import full_build, refresh
from tests.conftest import event_rows
from tests.identity.test_resolve import CONFIG
from tests.portrait.test_accounts import MESSAGES, NOW, group, track


def keyed(engine: Engine) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Accounts and contacts, customer ids replaced by member ids (ids may be minted apart)."""
    m = engine.table("identity_map").to_pyarrow().to_pylist()
    member = {r["customer_id"]: r["id_value"] for r in m if r["id_type"] == "member_id"}
    accounts = engine.table("accounts").drop("computed_at").order_by("account_id")
    contacts = engine.table("account_contacts").to_pyarrow().to_pylist()
    for r in contacts:
        r["customer_id"] = member[r["customer_id"]]
    contacts.sort(key=lambda r: (r["account_id"], r["customer_id"]))
    return accounts.to_pyarrow().to_pylist(), contacts


def test_incremental_refresh_equals_full_build() -> None:
    t1 = NOW - timedelta(days=9)
    first = [m for m in MESSAGES if m["timestamp"] <= t1]
    later = [m for m in MESSAGES if m["timestamp"] > t1]
    later += [
        group("g9", "D", "zeta", 0.5, {"industry": "Tea"}, role="IT lead"),
        track("t9", "D", "Demo Requested", 0.2, "zeta"),
    ]
    assert first and later
    with Engine("duckdb://") as a, Engine("duckdb://") as b:
        a.append("events", event_rows(first))
        resolve(a, CONFIG, Clock(t1))
        full_build(a, {}, Clock(t1))
        before = keyed(a)
        a.append("events", event_rows(later).cast(a.table("events").schema().to_pyarrow()))
        resolve(a, CONFIG, Clock(NOW))
        assert refresh(a, {}, Clock(NOW)).mode == "incremental"

        b.append("events", event_rows(first + later))
        resolve(b, CONFIG, Clock(NOW))
        full_build(b, {}, Clock(NOW))
        got, want = keyed(a), keyed(b)
    assert got == want
    assert got != before  # the refresh did change them
    zeta = next(r for r in got[0] if r["account_id"] == "zeta")
    assert zeta["industry"] == "Tea" and zeta["it_contacts"] == 1 and zeta["contacts"] == 2
