"""Property-based tests of the contact policy: whatever the people, zones, times and crashes.

* no message without consent and opt-in, or without an address;
* caps never exceeded in any window of local days, across campaigns and channels;
* no message in quiet hours or on a do-not-disturb day, in every time zone;
* nobody both held out and messaged;
* a crash at any point, then a restart, sends nothing twice.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, available_timezones

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closedloop.activate.campaign import run_campaign
from closedloop.activate.policy import cap_blocked, in_quiet_hours, send_slot
from closedloop.core.clock import Clock
from closedloop.core.definitions import (
    CampaignDef,
    Channel,
    ContactPolicy,
    DoNotDisturb,
    FrequencyCap,
    QuietHours,
    SegmentDef,
)
from closedloop.core.engine import Engine
from closedloop.portrait.tables import PROFILES
from closedloop.segments.audience import Fields, evaluate_segment

ZONES = sorted(available_timezones() - {"Factory", "localtime"})
DEFAULT_TZ = "Asia/Shanghai"
T0 = datetime(2026, 3, 20, tzinfo=UTC)  # DST changes in Europe and America fall in the range

zones = st.sampled_from(ZONES)
instants = st.integers(0, 60 * 24 * 20).map(lambda m: T0 + timedelta(minutes=m))
clock_times = st.integers(0, 24 * 4 - 1).map(lambda q: time(q // 4, 15 * (q % 4)))
actions = st.sampled_from(["postpone", "drop"])


@st.composite
def quiet_hours(draw: st.DrawFn) -> QuietHours:
    start, end = draw(clock_times), draw(clock_times)
    if start == end:
        end = time((end.hour + 1) % 24, end.minute)
    return QuietHours(start=start, end=end, action=draw(actions))


@st.composite
def holidays(draw: st.DrawFn) -> list[DoNotDisturb]:
    out = []
    for _ in range(draw(st.integers(0, 2))):
        start = T0.date() + timedelta(days=draw(st.integers(-1, 18)))
        out.append(
            DoNotDisturb(
                start=start,
                end=start + timedelta(days=draw(st.integers(0, 3))),
                action=draw(actions),
            )
        )
    return out


@st.composite
def caps(draw: st.DrawFn) -> list[FrequencyCap]:
    return [
        FrequencyCap(
            max=draw(st.integers(1, 3)),
            days=draw(st.integers(1, 7)),
            channel=draw(st.sampled_from([None, Channel.EMAIL, Channel.SMS])),
        )
        for _ in range(draw(st.integers(0, 2)))
    ]


@st.composite
def policies(draw: st.DrawFn) -> ContactPolicy:
    return ContactPolicy(
        require_consent=draw(st.booleans()),
        caps=draw(caps()),
        quiet_hours=draw(st.none() | quiet_hours()),
        do_not_disturb=draw(holidays()),
        default_timezone=DEFAULT_TZ,
    )


def blocked(policy: ContactPolicy, local: datetime) -> bool:
    """Whether the local moment is in quiet hours or on a do-not-disturb day (the oracle)."""
    q = policy.quiet_hours
    if q is not None and in_quiet_hours(q, local.time()):
        return True
    return any(h.start <= local.date() <= h.end for h in policy.do_not_disturb)


# ---- the time rules, alone: many examples, no warehouse ------------------------------------
@settings(max_examples=300, deadline=None)
@given(policy=policies(), tz=zones, now=instants)
def test_send_slot_is_the_first_allowed_moment_in_every_zone(
    policy: ContactPolicy, tz: str, now: datetime
) -> None:
    z = ZoneInfo(tz)
    slot = send_slot(policy, z, now)
    if slot.send_at is None:
        # Dropped: only when a dropping rule covers this very moment.
        assert blocked(policy, now.astimezone(z))
        return
    assert slot.send_at >= now
    assert not blocked(policy, slot.send_at.astimezone(z))
    if slot.send_at == now:
        assert slot.reason is None
    else:
        # Every moment in between was blocked: the message was not postponed needlessly.
        span = slot.send_at - now
        for k in range(12):
            assert blocked(policy, (now + span * k / 12).astimezone(z))
    assert slot.local_day == (slot.send_at.astimezone(z).date() - date(1970, 1, 1)).days


@settings(max_examples=300, deadline=None)
@given(
    policy=policies(),
    channel=st.sampled_from(list(Channel)),
    history=st.lists(
        st.tuples(st.integers(0, 4), st.integers(-8, 8), st.sampled_from(["email", "sms"])),
        max_size=25,
    ),
    days=st.lists(st.integers(0, 3), min_size=5, max_size=5),
)
def test_caps_agree_with_counting_every_window(
    policy: ContactPolicy,
    channel: Channel,
    history: list[tuple[int, int, str]],
    days: list[int],
) -> None:
    day = np.array(days, dtype=np.int64)
    got = cap_blocked(
        policy,
        channel,
        day=day,
        history_person=np.array([h[0] for h in history], dtype=np.int64),
        history_day=np.array([h[1] for h in history], dtype=np.int64),
        history_channel=[h[2] for h in history],
    )
    for p in range(5):
        want = False
        for cap in policy.caps:
            if cap.channel is not None and cap.channel is not channel:
                continue
            mine = [
                d
                for q, d, c in history
                if q == p and (cap.channel is None or c == cap.channel.value)
            ]
            for start in range(days[p] - cap.days + 1, days[p] + 1):
                if sum(start <= d < start + cap.days for d in mine) + 1 > cap.max:
                    want = True
        assert bool(got[p]) == want, (p, policy.caps)


# ---- whole campaigns against the warehouse: fewer, bigger examples -------------------------
EVERYONE = SegmentDef.model_validate(
    {"name": "everyone", "where": {"trait": "customer_id", "op": "not_null"}}
)


@st.composite
def people(draw: st.DrawFn) -> list[dict[str, Any]]:
    n = draw(st.integers(1, 25))
    return [
        {
            "customer_id": f"c{i:02d}",
            "name": f"N{i}",
            "email": draw(st.sampled_from([f"p{i}@x.cn", None])),
            "phone": draw(st.sampled_from([f"+86138000000{i:02d}", None])),
            "consent_marketing": draw(st.sampled_from([True, True, False, None])),
            "email_opt_out": draw(st.sampled_from([False, False, True, None])),
            "sms_opt_out": draw(st.sampled_from([False, False, True, None])),
            "timezone": draw(st.one_of(zones, st.sampled_from([None, "Not/AZone"]))),
        }
        for i in range(n)
    ]


@st.composite
def schedules(draw: st.DrawFn) -> list[tuple[CampaignDef, datetime, ContactPolicy | None]]:
    out = []
    at = T0
    for k in range(draw(st.integers(1, 4))):
        at += timedelta(minutes=draw(st.integers(0, 60 * 40)))
        # A campaign may override keys of the project's policy (here: consent); caps stay
        # shared so that "never exceeded" is a property of the whole log.
        override = draw(st.none() | st.builds(ContactPolicy, require_consent=st.booleans()))
        camp = CampaignDef(
            name=f"camp{k}",
            audience="everyone",
            channel=draw(st.sampled_from(list(Channel))),
            holdout=draw(st.sampled_from([0.1, 0.3, 0.5])),
            subject="Hi {{ name }}",
            template="Hello {{ name }}",
            policy=override,
        )
        out.append((camp, at, override))
    return out


def zone_of(name: object) -> ZoneInfo:
    return ZoneInfo(name) if isinstance(name, str) and name in ZONES else ZoneInfo(DEFAULT_TZ)


def crash_at(point: str) -> Any:
    def hook(at: str) -> None:
        if at == point:
            raise RuntimeError(f"simulated crash at {at}")

    return hook


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    persons=people(),
    policy=policies(),
    schedule=schedules(),
    crash=st.none()
    | st.tuples(st.integers(0, 3), st.sampled_from(["decided", "outbox_written", "logged"])),
)
def test_campaigns_obey_the_policy_and_never_send_twice(
    persons: list[dict[str, Any]],
    policy: ContactPolicy,
    schedule: list[tuple[CampaignDef, datetime, ContactPolicy | None]],
    crash: tuple[int, str] | None,
) -> None:
    with Engine("duckdb://") as engine, tempfile.TemporaryDirectory() as tmp:
        outbox = Path(tmp)
        rows = [{c: p.get(c) for c in PROFILES.columns} for p in persons]
        engine.replace("profiles", pa.Table.from_pylist(rows))
        evaluate_segment(engine, EVERYONE, Fields(), Clock(T0))
        for k, (camp, at, _) in enumerate(schedule):
            kwargs: dict[str, Any] = {
                "outbox_dir": outbox,
                "occasion": "o1",
                "clock": Clock(at),
                "policy": policy,
            }
            if crash is not None and crash[0] == k:
                with pytest.raises(RuntimeError, match="simulated crash"):
                    run_campaign(engine, camp, checkpoint=crash_at(crash[1]), **kwargs)
            run_campaign(engine, camp, **kwargs)
        for camp, at, _ in schedule:
            # Running an occasion again (a retry, a second worker) decides nobody again.
            again = run_campaign(
                engine, camp, outbox_dir=outbox, occasion="o1", clock=Clock(at), policy=policy
            )
            assert again.sent == again.held_out == again.suppressed == 0

        d = engine.table("deliveries").to_pyarrow().to_pylist()
        lines = [
            json.loads(x)
            for f in sorted(outbox.glob("*/*.jsonl"))
            for x in f.read_text().splitlines()
        ]
    by_id = {p["customer_id"]: p for p in persons}
    effective = {c.name: policy.overridden_by(o) for c, _, o in schedule}
    channel = {c.name: c.channel for c, _, _ in schedule}

    # One decision per (campaign, person); one message per sent decision, and no other.
    keys = [(r["campaign"], r["customer_id"]) for r in d]
    assert len(keys) == len(set(keys)) == len(schedule) * len(persons)
    sent = [r for r in d if r["status"] == "sent"]
    messages = [(m["campaign"], m["customer_id"]) for m in lines]
    assert len(messages) == len(set(messages))
    assert set(messages) == {(r["campaign"], r["customer_id"]) for r in sent}

    for r in d:
        p, pol = by_id[r["customer_id"]], effective[r["campaign"]]
        ch = channel[r["campaign"]]
        if r["status"] == "held_out":
            assert r["group"] == "holdout" and r["message_id"] is None
        if r["group"] == "holdout":
            assert r["status"] in ("held_out", "suppressed")  # never messaged
            assert r["message_id"] is None
        if r["status"] != "sent":
            continue
        # Consent, opt-in and an address.
        assert r["group"] == "treatment"
        if pol.require_consent:
            assert p["consent_marketing"] is True
        if ch is Channel.EMAIL:
            assert not p["email_opt_out"] and p["email"]
        if ch is Channel.SMS:
            assert not p["sms_opt_out"] and p["phone"]
        # Quiet hours and holidays, in the person's own zone.
        local = r["send_at"].astimezone(zone_of(p["timezone"]))
        assert not blocked(pol, local), (local, pol)

    # Caps (every campaign shares the project's): in every window of local days, across
    # campaigns and channels, including messages postponed into later days.
    per_person: dict[str, list[tuple[date, str]]] = defaultdict(list)
    for r in sent:
        z = zone_of(by_id[r["customer_id"]]["timezone"])
        per_person[r["customer_id"]].append((r["send_at"].astimezone(z).date(), r["channel"]))
    for cap in policy.caps:
        for msgs in per_person.values():
            for first, _ in msgs:
                # Any window holding a message starts within `days` before one of them.
                for shift in range(cap.days):
                    start = first - timedelta(days=shift)
                    count = sum(
                        start <= day < start + timedelta(days=cap.days)
                        and (cap.channel is None or ch == cap.channel.value)
                        for day, ch in msgs
                    )
                    assert count <= cap.max, (cap, sorted(msgs))
