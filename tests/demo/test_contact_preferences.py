"""What a contact policy needs from the synthetic brand: time zones, consent and opt-outs.

The portrait reads ``context.timezone``, the Segment consent spec's
``context.consent.categoryPreferences.marketing`` (latest stated value wins) and
``Unsubscribed``/``Subscribed`` per channel (latest wins). These tests recompute the final state
from the generated events exactly that way and hold the truth to it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from closedloop.demo.generator import SOURCES, generate

PERSONS = 4000
CONSENT_EVENT = "Segment Consent Preference Updated"


@pytest.fixture(scope="module")
def brand(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("contact")
    generate(out, PERSONS, seed=3)
    return out


@pytest.fixture(scope="module")
def persons(brand: Path) -> pd.DataFrame:
    return pd.read_parquet(brand / "truth" / "persons.parquet").set_index("person_id")


@pytest.fixture(scope="module")
def events(brand: Path) -> pd.DataFrame:
    """One row per message: where it came from, what it says about preferences, whose it is."""
    rows = []
    for source in SOURCES:
        for part in sorted((brand / "data" / "events" / source).glob("part-*.jsonl")):
            with part.open(encoding="utf-8") as f:
                for line in f:
                    m = json.loads(line)
                    context = m["context"]
                    consent = context.get("consent", {}).get("categoryPreferences")
                    rows.append(
                        {
                            "source": source,
                            "message_id": m["messageId"],
                            "type": m["type"],
                            "event": m.get("event"),
                            "user_id": m.get("userId"),
                            "timestamp": pd.Timestamp(m["timestamp"]),
                            "timezone": context.get("timezone"),
                            "consent": consent,
                            "channel": (m.get("properties") or {}).get("channel"),
                            "traits": m.get("traits"),
                        }
                    )
    frame = pd.DataFrame(rows)
    owners = pd.read_parquet(brand / "truth" / "messages.parquet")
    return frame.merge(owners, on="message_id", validate="one_to_one")


def members(persons: pd.DataFrame) -> pd.DataFrame:
    return persons[persons["is_member"]]


# --- time zone --------------------------------------------------------------------------------


def test_clients_send_the_persons_time_zone(events: pd.DataFrame, persons: pd.DataFrame) -> None:
    has = events["timezone"].notna().groupby(events["source"]).mean()
    assert has["app"] == has["miniprogram"] == has["official_account"] == 1.0
    assert 0.7 <= has["web"] <= 0.9  # some browsers send none
    assert has["ecommerce"] == has["callcenter"] == 0.0  # servers have no device
    stated = events.dropna(subset=["timezone"])
    truth = persons.loc[stated["person_id"], "timezone"].to_numpy()
    assert (stated["timezone"].to_numpy() == truth).all()
    zones = persons["timezone"].value_counts(normalize=True)
    assert zones["Asia/Shanghai"] > 0.9
    assert {"Asia/Hong_Kong", "Europe/London", "America/Los_Angeles"} <= set(zones.index)
    # Nearly everyone shows a time zone somewhere, so the portrait can fill it in.
    assert stated["person_id"].nunique() / len(persons) > 0.95


# --- consent ----------------------------------------------------------------------------------------


def latest_consent(events: pd.DataFrame) -> pd.Series:
    """What the portrait computes: per person, the latest stated marketing consent."""
    stated = events.dropna(subset=["consent"])
    stated = stated.assign(marketing=[c["marketing"] for c in stated["consent"]])
    return stated.sort_values("timestamp", kind="stable").groupby("person_id")["marketing"].last()


def test_consent_follows_the_segment_spec(events: pd.DataFrame) -> None:
    stated = events.dropna(subset=["consent"])
    for consent in stated["consent"]:
        assert set(consent) == {"marketing", "personalisation"}
        assert all(isinstance(v, bool) for v in consent.values())
    kinds = set(zip(stated["type"], stated["event"].fillna(""), strict=True))
    assert kinds == {("track", "Signed Up"), ("identify", ""), ("track", CONSENT_EVENT)}
    # Identify calls that state consent still carry traits (a member id at least).
    assert all(t for t in stated.loc[stated["type"] == "identify", "traits"])


def test_members_state_consent_when_they_sign_up(events: pd.DataFrame) -> None:
    signed_up = events[events["event"] == "Signed Up"]
    assert signed_up["consent"].notna().all()
    with_name = pd.Series([bool(t) and "name" in t for t in events["traits"]], index=events.index)
    profiles = events[(events["type"] == "identify") & with_name]
    assert profiles["consent"].notna().all()
    both = signed_up.merge(profiles, on="person_id", suffixes=("_signup", "_profile"))
    assert len(both) == len(signed_up)
    assert (both["consent_signup"] == both["consent_profile"]).all()
    grant = pd.Series([c["marketing"] for c in signed_up["consent"]]).mean()
    assert 0.8 <= grant <= 0.9  # about 85%


def test_some_members_withdraw_consent_later(events: pd.DataFrame) -> None:
    stated = events.dropna(subset=["consent"]).sort_values("timestamp", kind="stable")
    stated = stated.assign(marketing=[c["marketing"] for c in stated["consent"]])
    first = stated.groupby("person_id")["marketing"].first()
    last = stated.groupby("person_id")["marketing"].last()
    granters = first[first]
    withdrew = (~last[granters.index]).mean()
    assert 0.025 <= withdrew <= 0.08  # about 5%
    withdrawals = stated[stated["person_id"].isin(granters.index[~last[granters.index]])]
    assert (withdrawals.groupby("person_id")["type"].last() == "identify").all()


def test_consent_shares(persons: pd.DataFrame) -> None:
    member = members(persons)["consent_marketing"]
    assert 0.75 <= (member == True).mean() <= 0.85  # noqa: E712 (nullable booleans)
    assert member.isna().mean() < 0.05  # members who never came back after the policy refresh
    others = persons.loc[~persons["is_member"], "consent_marketing"]
    assert 0.25 <= others.notna().mean() <= 0.6  # some answer the mini-program's pop-up
    assert 0.1 <= (others == True).mean() <= 0.4  # noqa: E712


def test_truth_consent_is_what_the_events_say(events: pd.DataFrame, persons: pd.DataFrame) -> None:
    latest = latest_consent(events).reindex(persons.index)
    truth = persons["consent_marketing"]
    assert (truth.isna() == latest.isna()).all()
    stated = truth.notna()
    assert (truth[stated].astype(bool) == latest[stated].astype(bool)).all()


# --- opt-outs ---------------------------------------------------------------------------------------


def latest_opt_out(events: pd.DataFrame, channel: str) -> pd.Series:
    subs = events[events["event"].isin(["Unsubscribed", "Subscribed"])]
    subs = subs[subs["channel"] == channel].sort_values("timestamp", kind="stable")
    return subs.groupby("person_id")["event"].last() == "Unsubscribed"


def test_truth_opt_outs_are_what_the_events_say(
    events: pd.DataFrame, persons: pd.DataFrame
) -> None:
    for channel in ("email", "sms"):
        latest = latest_opt_out(events, channel).reindex(persons.index, fill_value=False)
        assert (persons[f"{channel}_opt_out"] == latest).all(), channel


def test_opt_out_shares(events: pd.DataFrame, persons: pd.DataFrame) -> None:
    subs = events[events["event"].isin(["Unsubscribed", "Subscribed"])]
    assert set(subs["channel"]) == {"email", "sms"}
    assert subs["person_id"].isin(members(persons).index).all()
    n = len(members(persons))
    for channel, low, high in (("email", 0.018, 0.042), ("sms", 0.01, 0.032)):
        mine = subs[subs["channel"] == channel]
        unsubscribed = mine.loc[mine["event"] == "Unsubscribed", "person_id"].nunique() / n
        assert low <= unsubscribed <= high, (channel, unsubscribed)
        back = mine.loc[mine["event"] == "Subscribed", "person_id"]
        assert len(back) > 0  # some come back …
        first_unsub = mine[mine["event"] == "Unsubscribed"].groupby("person_id")["timestamp"].min()
        resub = mine[mine["event"] == "Subscribed"].set_index("person_id")["timestamp"]
        assert (resub > first_unsub[resub.index]).all()  # … always after leaving
        assert persons[f"{channel}_opt_out"].mean() < unsubscribed * n / len(persons)


def test_members_change_preferences_logged_in(events: pd.DataFrame, persons: pd.DataFrame) -> None:
    """Settings pages need a login; the mini-program's pop-up also meets guests."""
    settings = events[
        events["event"].isin(["Unsubscribed", "Subscribed"])
        | ((events["type"] == "identify") & events["consent"].notna())
    ]
    assert settings["user_id"].notna().all()
    popups = events[events["event"] == CONSENT_EVENT]
    guests = popups[~persons.loc[popups["person_id"], "is_member"].to_numpy()]
    assert len(guests) and (guests["source"] == "miniprogram").all()
    assert guests["user_id"].isna().all()
    assert events["timestamp"].max() < pd.Timestamp("2026-11-20", tz="UTC")


def test_truth_columns_have_the_right_types(brand: Path) -> None:
    import pyarrow.parquet as pq

    schema = pq.read_schema(brand / "truth" / "persons.parquet")
    for column in ("consent_marketing", "email_opt_out", "sms_opt_out"):
        assert str(schema.field(column).type) == "bool", column
    assert str(schema.field("timezone").type) == "string"


def raw_messages(brand: Path, source: str) -> list[dict[str, Any]]:
    part = brand / "data" / "events" / source / "part-00000.jsonl"
    return [json.loads(line) for line in part.read_text(encoding="utf-8").splitlines()]


def test_consent_sits_in_the_context_as_the_spec_says(brand: Path) -> None:
    found = [m for m in raw_messages(brand, "miniprogram") if "consent" in m["context"]]
    assert found
    for m in found:
        assert set(m["context"]["consent"]) == {"categoryPreferences"}
        assert isinstance(m["context"]["consent"]["categoryPreferences"]["marketing"], bool)


# --- the portrait reads what the generator meant -------------------------------------------------


@pytest.mark.slow
def test_the_portrait_recovers_the_truth(tmp_path: Path) -> None:
    """Through collect, identity and the portrait: each member's profile holds their truth."""
    from closedloop.core.clock import Clock
    from closedloop.core.definitions import load_project
    from closedloop.core.engine import Engine
    from closedloop.demo.project import init_project, relative_data_dir
    from closedloop.pipeline import build

    generation = generate(tmp_path / "brand", 1000, seed=5)
    project_dir = tmp_path / "project"
    init_project(project_dir, data_dir=relative_data_dir(project_dir, tmp_path / "brand" / "data"))
    project = load_project(project_dir)
    with Engine(project.engine_url) as engine:
        build(engine, project, clock=Clock(generation.reference_time))
        profiles = engine.table("profiles").to_pandas()
        imap = engine.table("identity_map").to_pandas()
    truth = pd.read_parquet(tmp_path / "brand" / "truth" / "persons.parquet")
    members = imap[imap["id_type"] == "member_id"][["customer_id", "id_value"]]
    one = members.groupby("customer_id")["id_value"].nunique() == 1  # not merged with another
    members = members[members["customer_id"].isin(one[one].index)]
    joined = members.merge(truth, left_on="id_value", right_on="member_id").merge(
        profiles, on="customer_id", suffixes=("_truth", "")
    )
    assert len(joined) > 0.8 * truth["is_member"].sum()
    consent = joined["consent_marketing"].astype("boolean")
    expected = joined["consent_marketing_truth"].astype("boolean")
    agree = (consent == expected).fillna(False) | (consent.isna() & expected.isna())
    assert agree.mean() > 0.98, joined.loc[~agree, ["id_value", "consent_marketing"]]
    for column in ("email_opt_out", "sms_opt_out"):
        assert (joined[column] == joined[f"{column}_truth"]).mean() > 0.99, column
    assert (joined["timezone"] == joined["timezone_truth"]).mean() > 0.95  # a few only browse
