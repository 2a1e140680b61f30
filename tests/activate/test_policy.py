"""The contact policy at send time: consent, opt-outs, caps, quiet hours, holidays, crashes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pandas as pd
import pyarrow as pa
import pytest

from closedloop.activate.campaign import assign_group, run_campaign
from closedloop.activate.policy import Reason, in_quiet_hours, send_slot
from closedloop.core.clock import Clock
from closedloop.core.definitions import (
    CampaignDef,
    ContactPolicy,
    QuietHours,
    SegmentDef,
    load_project,
)
from closedloop.core.engine import Engine
from closedloop.core.errors import DefinitionError
from closedloop.demo.project import init_project
from closedloop.segments.audience import Fields, evaluate_segment
from tests.segments.test_audience import set_profiles

# 14:00 UTC = 22:00 in Shanghai (quiet), 14:00 in London, 09:00 in New York (winter).
NOW = datetime(2026, 11, 20, 14, 0, tzinfo=UTC)
EVERYONE = SegmentDef.model_validate(
    {"name": "everyone", "where": {"trait": "customer_id", "op": "not_null"}}
)


def campaign(name: str = "promo", channel: str = "email", **extra: Any) -> CampaignDef:
    return CampaignDef.model_validate(
        {
            "name": name,
            "audience": "everyone",
            "channel": channel,
            "holdout": 0.2,
            "subject": "Hi {{ name }}",
            "template": "Hello {{ name }}",
            **extra,
        }
    )


def people(engine: Engine, rows: list[dict[str, Any]], at: datetime = NOW) -> None:
    base = {"consent_marketing": True, "email_opt_out": False, "sms_opt_out": False}
    full = [
        {
            **base,
            "name": f"N{r['customer_id']}",
            "email": f"{r['customer_id']}@x.cn",
            "phone": "+8613800000000",
            **r,
        }
        for r in rows
    ]
    set_profiles(engine, full)
    evaluate_segment(engine, EVERYONE, Fields(), Clock(at))


def deliveries(engine: Engine) -> pd.DataFrame:
    return engine.table("deliveries").to_pandas().set_index("customer_id")


def treated(campaign_name: str, n: int, prefix: str = "c") -> list[str]:
    ids = [f"{prefix}{i:03d}" for i in range(n)]
    return [c for c in ids if assign_group(campaign_name, c, 0.2) == "treatment"]


def test_consent_and_opt_out_are_decided_before_the_holdout(engine: Engine, tmp_path: Path) -> None:
    people(
        engine,
        [
            {"customer_id": "yes"},
            {"customer_id": "never", "consent_marketing": None},
            {"customer_id": "no", "consent_marketing": False},
            {"customer_id": "out", "email_opt_out": True},
            {"customer_id": "sms_out", "sms_opt_out": True},
            {"customer_id": "noaddr", "email": None},
            {"customer_id": "out_noaddr", "email": None, "email_opt_out": True},
        ],
    )
    run = run_campaign(
        engine, campaign(holdout=0.01), outbox_dir=tmp_path, occasion="o", clock=Clock(NOW)
    )
    d = deliveries(engine)
    assert d.loc["never", "reason"] == "no_consent" and d.loc["no", "reason"] == "no_consent"
    assert d.loc["out", "reason"] == "opted_out" and d.loc["out_noaddr", "reason"] == "opted_out"
    assert d.loc["noaddr", "reason"] == "no_address"
    # Fixed eligibility comes before the split: suppressed people belong to no group.
    assert d[d.status == "suppressed"]["group"].isna().all()
    # An SMS opt-out does not stop an e-mail.
    assert set(d[d.status != "suppressed"].index) == {"yes", "sms_out"}
    assert run.reasons == {"no_consent": 2, "opted_out": 2, "no_address": 1}


def test_consent_can_be_waived_but_opt_out_still_wins(engine: Engine, tmp_path: Path) -> None:
    people(
        engine,
        [
            {"customer_id": "never", "consent_marketing": None},
            {"customer_id": "sms_out", "sms_opt_out": True},
        ],
    )
    sms = campaign(channel="sms", holdout=0.01, policy={"require_consent": False})
    run_campaign(engine, sms, outbox_dir=tmp_path, occasion="o", clock=Clock(NOW))
    d = deliveries(engine)
    assert d.loc["never", "status"] in ("sent", "held_out")
    assert d.loc["sms_out", "reason"] == "opted_out"


def test_quiet_hours_postpone_in_each_persons_time_zone(engine: Engine, tmp_path: Path) -> None:
    people(
        engine,
        [
            {"customer_id": f"s{i:02d}", "timezone": "Asia/Shanghai"} for i in range(20)
        ]  # 22:00: quiet
        + [{"customer_id": f"l{i:02d}", "timezone": "Europe/London"} for i in range(20)]
        + [{"customer_id": f"u{i:02d}", "timezone": None} for i in range(20)],
    )
    policy = ContactPolicy.model_validate(
        {"quiet_hours": {"start": "21:00", "end": "09:00"}, "default_timezone": "Asia/Tokyo"}
    )
    run_campaign(
        engine, campaign(), outbox_dir=tmp_path, occasion="o", clock=Clock(NOW), policy=policy
    )
    d = deliveries(engine)
    sent = d[d.status == "sent"]
    shanghai_9 = datetime(2026, 11, 21, 1, 0, tzinfo=UTC)  # 09:00 the next morning, local
    tokyo_9 = datetime(2026, 11, 21, 0, 0, tzinfo=UTC)
    for cid, row in sent.iterrows():
        expect = {"s": shanghai_9, "l": NOW, "u": tokyo_9}[str(cid)[0]]
        assert row.send_at == expect, cid
        assert (row.reason if isinstance(row.reason, str) else None) == (
            None if str(cid)[0] == "l" else "quiet_hours"
        )
    lines = [json.loads(x) for x in (tmp_path / "promo" / "o.jsonl").read_text().splitlines()]
    assert {x["customer_id"]: x["sent_at"] for x in lines}[sent.index[0]] == sent.iloc[
        0
    ].send_at.isoformat()


def test_quiet_hours_drop_and_holidays(engine: Engine, tmp_path: Path) -> None:
    people(engine, [{"customer_id": f"c{i:03d}", "timezone": "Asia/Shanghai"} for i in range(30)])
    drop = ContactPolicy.model_validate(
        {"quiet_hours": {"start": "21:00", "end": "09:00", "action": "drop"}}
    )
    run_campaign(
        engine, campaign("a"), outbox_dir=tmp_path, occasion="o", clock=Clock(NOW), policy=drop
    )
    d = deliveries(engine)
    assert set(d[d.group == "treatment"].reason) == {"quiet_hours"}
    assert set(d[d.group == "treatment"].status) == {"suppressed"}
    # The held out are never messaged; those the rule would have stopped are suppressed in
    # the holdout group, so the compared groups (sent, held_out) are both empty here.
    held = d[d.group == "holdout"]
    assert len(held) > 0 and set(held.status) == {"suppressed"}
    assert set(held.reason) == set(held.policy_verdict) == {"quiet_hours"}
    assert held.message_id.isna().all()

    # A holiday (local dates) postpones to the day after, then quiet hours to 09:00.
    holiday = ContactPolicy.model_validate(
        {
            "quiet_hours": {"start": "21:00", "end": "09:00"},
            "do_not_disturb": [{"name": "golden week", "start": "2026-11-20", "end": "2026-11-22"}],
        }
    )
    morning = datetime(2026, 11, 20, 3, 0, tzinfo=UTC)  # 11:00 in Shanghai, inside the holiday
    slot = send_slot(holiday, ZoneInfo("Asia/Shanghai"), morning)
    assert slot.send_at == datetime(2026, 11, 23, 1, 0, tzinfo=UTC)
    assert slot.reason is Reason.DO_NOT_DISTURB
    dnd_drop = holiday.model_copy(
        update={"do_not_disturb": [holiday.do_not_disturb[0].model_copy(update={"action": "drop"})]}
    )
    assert send_slot(dnd_drop, ZoneInfo("Asia/Shanghai"), morning).send_at is None
    # Outside the holiday in Los Angeles (19 Nov local evening 19:00): sent at once.
    la = send_slot(holiday, ZoneInfo("America/Los_Angeles"), morning)
    assert la.send_at == morning and la.reason is None


def test_quiet_hours_window_without_wrap() -> None:
    lunch = QuietHours(start=time(12), end=time(14))
    assert in_quiet_hours(lunch, time(12)) and in_quiet_hours(lunch, time(13, 59))
    assert not in_quiet_hours(lunch, time(14)) and not in_quiet_hours(lunch, time(11, 59))
    slot = send_slot(
        ContactPolicy(quiet_hours=lunch), ZoneInfo("UTC"), datetime(2026, 1, 1, 12, 30, tzinfo=UTC)
    )
    assert slot.send_at == datetime(2026, 1, 1, 14, tzinfo=UTC)


def test_caps_count_across_campaigns_and_channels_in_local_days(
    engine: Engine, tmp_path: Path
) -> None:
    people(engine, [{"customer_id": f"c{i:03d}", "timezone": "Asia/Shanghai"} for i in range(60)])
    policy = ContactPolicy.model_validate(
        {"caps": [{"max": 1, "days": 1}, {"max": 2, "days": 7, "channel": "sms"}]}
    )
    morning = datetime(2026, 11, 20, 1, 0, tzinfo=UTC)  # 09:00 Shanghai, 20 Nov

    def run(name: str, at: datetime, channel: str = "email") -> pd.DataFrame:
        run_campaign(
            engine,
            campaign(name, channel),
            outbox_dir=tmp_path,
            occasion="o",
            clock=Clock(at),
            policy=policy,
        )
        d = engine.table("deliveries").to_pandas()
        return d[d.campaign == name].set_index("customer_id")

    a = run("a", morning)
    a_sent = set(a[a.status == "sent"].index)
    # 15:30 UTC is 23:30 the same local day: a second campaign is capped for a's recipients.
    b = run("b", morning + timedelta(hours=14, minutes=30))
    assert set(b[b.reason == "frequency_cap"].index) == a_sent  # in both groups
    # 16:30 UTC is 00:30 the next local day (still 20 Nov in UTC): the daily cap has reset.
    c = run("c", morning + timedelta(hours=15, minutes=30), "sms")
    assert (c.reason == "frequency_cap").sum() == 0
    # Per-channel cap (2 SMS per 7 days) across campaigns; e-mail does not count towards it.
    e = run("e", morning + timedelta(days=2), "sms")
    f = run("f", morning + timedelta(days=3), "sms")
    sms_sent = pd.concat([c, e, f])
    per_person = sms_sent[sms_sent.status == "sent"].groupby(level=0).size()
    assert per_person.max() == 2
    both = set(c[c.status == "sent"].index) & set(e[e.status == "sent"].index)
    assert set(f[f.reason == "frequency_cap"].index) == both
    # In the holdout group the same rule applies (never messaged; suppressed if capped), so
    # measurement compares like with like.
    fh = f[f.group == "holdout"]
    assert set(fh.status) <= {"held_out", "suppressed"} and fh.message_id.isna().all()
    assert set(fh[fh.status == "suppressed"].index) == both & set(fh.index)
    assert (fh[fh.status == "suppressed"].reason == "frequency_cap").all()


def test_a_postponed_message_counts_on_its_send_day(engine: Engine, tmp_path: Path) -> None:
    """A message postponed to tomorrow uses tomorrow's cap, also for later decisions today."""
    people(engine, [{"customer_id": f"c{i:03d}", "timezone": "Asia/Shanghai"} for i in range(40)])
    night = ContactPolicy.model_validate(
        {"caps": [{"max": 1, "days": 1}], "quiet_hours": {"start": "21:00", "end": "09:00"}}
    )
    run_campaign(
        engine, campaign("a"), outbox_dir=tmp_path, occasion="o", clock=Clock(NOW), policy=night
    )
    # The next local morning at 10:00, another campaign: the people a reached this morning
    # (postponed to 09:00) are capped.
    run_campaign(
        engine,
        campaign("b"),
        outbox_dir=tmp_path,
        occasion="o",
        clock=Clock(NOW + timedelta(hours=12)),
        policy=night,
    )
    d = engine.table("deliveries").to_pandas()
    sent = d[d.status == "sent"]
    local = sent.send_at.dt.tz_convert("Asia/Shanghai").dt.date
    assert sent.groupby([sent.customer_id, local]).size().max() == 1
    assert (d[(d.campaign == "b")].reason == "frequency_cap").sum() > 0


@pytest.mark.parametrize("point", ["decided", "outbox_written", "logged"])
def test_a_crash_at_any_point_sends_nothing_twice(
    engine: Engine, tmp_path: Path, point: str
) -> None:
    people(engine, [{"customer_id": f"c{i:03d}"} for i in range(50)])

    def crash(at: str) -> None:
        if at == point:
            raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        run_campaign(
            engine,
            campaign(),
            outbox_dir=tmp_path,
            occasion="o",
            clock=Clock(NOW),
            checkpoint=crash,
        )
    again = run_campaign(engine, campaign(), outbox_dir=tmp_path, occasion="o", clock=Clock(NOW))
    lines = [
        json.loads(x)
        for f in sorted((tmp_path / "promo").glob("*.jsonl"))
        for x in f.read_text().splitlines()
    ]
    ids = [x["customer_id"] for x in lines]
    assert len(ids) == len(set(ids)) == len(treated("promo", 50))
    d = engine.table("deliveries").to_pandas()
    assert len(d) == d.customer_id.nunique() == 50
    assert set(d[d.status == "sent"].customer_id) == set(ids)
    assert again.recovered == (len(ids) if point == "outbox_written" else 0)


def test_project_policy_and_campaign_override(tmp_path: Path) -> None:
    init_project(tmp_path / "p", key_suffix="test1234")
    cfg = tmp_path / "p" / "closedloop.yaml"
    cfg.write_text(
        cfg.read_text()
        + "\ncontact_policy:\n  require_consent: true\n  caps: [{max: 1, days: 1}]\n"
        + '  quiet_hours: {start: "21:00", end: "09:00"}\n'
    )
    camp = tmp_path / "p" / "campaigns" / "winback.yaml"
    camp.write_text(camp.read_text() + "policy:\n  caps: [{max: 3, days: 7}]\n")
    p = load_project(tmp_path / "p")
    pol = p.campaigns["winback"].policy
    assert pol is not None
    assert [(c.max, c.days) for c in pol.caps] == [(3, 7)]  # the campaign's key wins
    assert pol.quiet_hours == QuietHours(start=time(21), end=time(9))  # the project's stays
    assert pol.default_timezone == p.config.timezone


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ("  quiet_hours: {start: 21:00, end: '09:00'}\n", "write times of day in quotes"),
        ("  quiet_hours: {start: '09:00', end: '09:00'}\n", "start different from their end"),
        ("  caps: [{max: 0, days: 1}]\n", "greater than or equal to 1"),
        ("  do_not_disturb: [{start: 2026-10-07, end: 2026-10-01}]\n", "before it starts"),
        ("  default_timezone: Mars/Olympus\n", "unknown time zone"),
        (
            "  caps: [{max: 1, days: 1, channel: fax}]\n",
            "expected 'email', 'sms', 'wechat', 'push', 'staff_task' or 'outbox'",
        ),
    ],
)
def test_bad_policies_fail_at_validation(tmp_path: Path, policy: str, message: str) -> None:
    init_project(tmp_path / "p", key_suffix="test1234")
    cfg = tmp_path / "p" / "closedloop.yaml"
    cfg.write_text(cfg.read_text() + "\ncontact_policy:\n" + policy)
    with pytest.raises(DefinitionError) as e:
        load_project(tmp_path / "p")
    text = " | ".join(str(p) for p in e.value.problems)
    assert message in text and "closedloop.yaml" in text


def test_unknown_profile_time_zone_falls_back(engine: Engine, tmp_path: Path) -> None:
    people(engine, [{"customer_id": f"c{i:02d}", "timezone": "Nowhere/Land"} for i in range(20)])
    policy = ContactPolicy.model_validate({"quiet_hours": {"start": "21:00", "end": "09:00"}})
    run_campaign(
        engine,
        campaign(),
        outbox_dir=tmp_path,
        occasion="o",
        clock=Clock(NOW),
        policy=policy,
        timezone="Asia/Shanghai",
    )
    d = deliveries(engine)
    assert set(d[d.status == "sent"].send_at) == {datetime(2026, 11, 21, 1, tzinfo=UTC)}


def test_a_delivery_log_from_before_the_policy_is_upgraded(engine: Engine, tmp_path: Path) -> None:
    first = treated("promo", 30)[0]
    at = datetime(2026, 11, 20, 13, tzinfo=UTC)
    old_log = pa.table(
        {
            "delivery_id": ["d1", "d2"],
            "campaign": ["old", "old"],
            "occasion": ["o", "o"],
            "customer_id": [first, "c001"],
            "group": ["treatment", None],
            "status": ["sent", "suppressed"],
            "reason": [None, "no email"],
            "channel": ["email", "email"],
            "address": ["a@x.cn", None],
            "message_id": ["m1", None],
            "decided_at": pa.array([at, at], pa.timestamp("us", tz="UTC")),
        }
    )
    engine.con.create_table("deliveries", old_log)  # the schema before the contact policy
    people(engine, [{"customer_id": f"c{i:03d}", "timezone": "UTC"} for i in range(30)])
    capped = ContactPolicy.model_validate({"caps": [{"max": 1, "days": 1}]})
    run_campaign(
        engine, campaign(), outbox_dir=tmp_path, occasion="o", clock=Clock(NOW), policy=capped
    )
    d = engine.table("deliveries").to_pandas()
    old = d[d.campaign == "old"].set_index("delivery_id")
    assert old.loc["d1", "send_at"] == old.loc["d1", "decided_at"]
    assert old.loc["d2", "reason"] == "no_address"
    # The old message still counts towards today's cap.
    new = d[d.campaign == "promo"].set_index("customer_id")
    assert new.loc[first, "reason"] == "frequency_cap"
    assert (new.drop(index=first).reason != "frequency_cap").all()


def test_a_dry_run_shows_every_decision_and_writes_nothing(engine: Engine, tmp_path: Path) -> None:
    people(
        engine,
        [{"customer_id": f"c{i:03d}", "timezone": "Asia/Shanghai"} for i in range(30)]
        + [{"customer_id": "never", "consent_marketing": None}],
    )
    night = ContactPolicy.model_validate({"quiet_hours": {"start": "21:00", "end": "09:00"}})
    args: dict[str, Any] = {
        "outbox_dir": tmp_path,
        "occasion": "o",
        "clock": Clock(NOW),
        "policy": night,
    }
    dry = run_campaign(engine, campaign(), dry_run=True, **args)
    assert dry.decisions is not None and dry.outbox is None
    assert engine.count("deliveries") == 0 and not (tmp_path / "promo").exists()
    real = run_campaign(engine, campaign(), **args)
    cols = ["customer_id", "group", "status", "reason", "send_at"]
    got = dry.decisions.to_pandas()[cols].sort_values("customer_id").reset_index(drop=True)
    want = engine.table("deliveries").to_pandas()[cols].sort_values("customer_id")
    pd.testing.assert_frame_equal(got, want.reset_index(drop=True), check_dtype=False)
    assert (dry.sent, dry.held_out, dry.suppressed) == (real.sent, real.held_out, real.suppressed)
