"""The world answers a campaign: conversions with a known true effect, opens, clicks, truth."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from closedloop.demo.generator import REFERENCE_TIME, generate
from closedloop.demo.world import ResponseSummary, respond

PERSONS = 3000
CAMPAIGN = "winback"
WINDOW = 14


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate(out, PERSONS, seed=5)
    return out


def single_owner(dataset: Path, id_type: str) -> pd.DataFrame:
    ids = pd.read_parquet(dataset / "truth" / "identifiers.parquet")
    ids = ids[(ids["id_type"] == id_type) & ~ids["junk"]]
    owners = ids.groupby("value")["person_id"].transform("nunique")
    return ids[owners == 1].drop_duplicates("person_id")


def contactable(dataset: Path, channel: str) -> pd.Series:
    """Whether a compliant sender may message each person on ``channel``."""
    persons = pd.read_parquet(dataset / "truth" / "persons.parquet").set_index("person_id")
    consent = persons["consent_marketing"].fillna(False).astype(bool)
    return consent & ~persons[f"{channel}_opt_out"]


def write_outbox(
    dataset: Path, path: Path, *, campaign: str = CAMPAIGN, compliant_only: bool = False
) -> dict[str, Any]:
    """Email half the contactable persons with an address of their own, text a few, plus
    unusable addresses and (unless ``compliant_only``) some persons a compliant sender would
    have left alone: no marketing consent, or opted out of the channel."""
    rng = np.random.default_rng(3)
    may_email, may_text = contactable(dataset, "email"), contactable(dataset, "sms")
    all_emails = single_owner(dataset, "email")
    all_phones = single_owner(dataset, "phone")
    allowed = may_email[all_emails["person_id"]].to_numpy()
    emails = all_emails[allowed & (rng.random(len(all_emails)) < 0.5)]
    violators: set[str] = set()
    if not compliant_only:
        bad_emails = all_emails[~allowed].head(60)
        emails = pd.concat([emails, bad_emails])
        violators = set(bad_emails["person_id"])
    texted = all_phones[~all_phones["person_id"].isin(emails["person_id"])]
    phones = texted[may_text[texted["person_id"]].to_numpy()].head(150)
    if not compliant_only:
        bad_phones = texted[~may_text[texted["person_id"]].to_numpy()].head(20)
        phones = pd.concat([phones, bad_phones])
        violators |= set(bad_phones["person_id"])
    ids = pd.read_parquet(dataset / "truth" / "identifiers.parquet")
    shared = ids[ids["id_type"] == "phone"].groupby("value")["person_id"].nunique()
    unusable = [
        ("email", "nobody@nowhere.example"),
        ("email", "test@test.com"),
        ("sms", str(shared[shared > 1].index[0])),
    ]
    sent_at = REFERENCE_TIME.isoformat()
    rows = [("email", v, p) for v, p in zip(emails["value"], emails["person_id"], strict=True)]
    rows += [("sms", v, p) for v, p in zip(phones["value"], phones["person_id"], strict=True)]
    rows += [(c, a, f"x{i}") for i, (c, a) in enumerate(unusable)]
    with path.open("w", encoding="utf-8") as f:
        for i, (channel, address, who) in enumerate(rows):
            line = {
                "campaign": campaign,
                "occasion": "2026-11-20",
                "customer_id": f"c_{who}",
                "channel": channel,
                # The pipeline writes what it normalised; an upper-case address must still map.
                "address": address.upper() if channel == "email" and i % 7 == 0 else address,
                "message_id": f"msg_{i:05d}",
                "sent_at": sent_at,
                "subject": 'Wang Fang, "we" miss you',
                "body": "Hi,\nit has been a while. 20% off\\today",
                "offer_code": "BACK20",
            }
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return {
        "targets": set(emails["person_id"]) | set(phones["person_id"]),
        "violators": violators,
        "customers": len(rows),
    }


@pytest.fixture(scope="module")
def answered(
    dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[ResponseSummary, dict[str, Any]]:
    outbox = tmp_path_factory.mktemp("outbox") / "winback.jsonl"
    sent = write_outbox(dataset, outbox)
    summary = respond(
        dataset, outbox, campaign=CAMPAIGN, start=REFERENCE_TIME, window_days=WINDOW, seed=7
    )
    return summary, sent | {"outbox": outbox}


def response_truth(dataset: Path) -> pd.DataFrame:
    return pd.read_parquet(dataset / "truth" / f"responses_{CAMPAIGN}.parquet")


def response_lines(dataset: Path) -> list[tuple[str, dict[str, Any]]]:
    folder = dataset / "data" / "responses" / CAMPAIGN
    return [
        (part.parent.name, json.loads(line))
        for part in sorted(folder.glob("*/part-*.jsonl"))
        for line in part.read_text(encoding="utf-8").splitlines()
    ]


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_summary_counts_the_treated(
    dataset: Path, answered: tuple[ResponseSummary, dict[str, Any]]
) -> None:
    summary, sent = answered
    truth = response_truth(dataset)
    assert len(truth) == PERSONS
    assert summary.messaged_persons == sent["customers"]
    # Unknown, junk and shared addresses reach nobody in particular.
    assert set(truth.loc[truth["messaged"], "person_id"]) == sent["targets"]
    assert summary.reached == len(sent["targets"]) == truth["messaged"].sum()
    assert summary.conversions == truth["converted"].sum()
    assert summary.out == dataset / "data" / "responses" / CAMPAIGN


def test_true_effect_is_the_mean_effect_of_the_treated(
    dataset: Path, answered: tuple[ResponseSummary, dict[str, Any]]
) -> None:
    summary = answered[0]
    truth = response_truth(dataset)
    persons = pd.read_parquet(dataset / "truth" / "persons.parquet")
    # A message sent against someone's wishes has no effect on them.
    applied = truth["effect"].where(~truth["violated"], 0.0)
    assert summary.true_effect == pytest.approx(applied[truth["messaged"]].mean())
    merged = truth.merge(persons[["person_id", "winback_effect"]], on="person_id")
    assert (merged["effect"] == merged["winback_effect"]).all()
    assert 0.04 < summary.true_effect < 0.15


def test_messaged_persons_convert_more_at_similar_baselines(
    dataset: Path, answered: tuple[ResponseSummary, dict[str, Any]]
) -> None:
    summary = answered[0]
    truth = response_truth(dataset)
    truth["band"] = pd.qcut(truth["p0"], 4, labels=False, duplicates="drop")
    rates = truth.groupby(["band", "messaged"])["converted"].mean().unstack()
    assert (rates[True] > rates[False]).all(), rates
    # The observed uplift estimates the true effect: within four standard errors.
    treated, control = truth[truth["messaged"]], truth[~truth["messaged"]]
    observed = treated["converted"].mean() - control["converted"].mean()
    baseline_gap = treated["p0"].mean() - control["p0"].mean()
    se = np.sqrt(
        treated["converted"].var() / len(treated) + control["converted"].var() / len(control)
    )
    assert abs(observed - baseline_gap - summary.true_effect) < 4 * se
    assert 0 < truth.loc[~truth["messaged"], "converted"].mean() < truth["p0"].max()


def test_orders_identify_the_buyer_and_land_in_the_window(
    dataset: Path, answered: tuple[ResponseSummary, dict[str, Any]]
) -> None:
    lines = response_lines(dataset)
    owners = pd.read_parquet(dataset / "truth" / f"response_messages_{CAMPAIGN}.parquet")
    owner = dict(zip(owners["message_id"], owners["person_id"], strict=True))
    assert set(owner) == {m["messageId"] for _, m in lines} and len(owner) == len(lines)
    persons = pd.read_parquet(dataset / "truth" / "persons.parquet").set_index("person_id")
    start, end = pd.Timestamp(REFERENCE_TIME), pd.Timestamp(REFERENCE_TIME + timedelta(WINDOW))
    buyers = set()
    for source, m in lines:
        when = pd.Timestamp(m["timestamp"])
        assert start <= when < end
        if m.get("event") != "Order Completed":
            continue
        assert source == "ecommerce"
        person = persons.loc[owner[m["messageId"]]]
        buyers.add(owner[m["messageId"]])
        if person["is_member"]:
            assert m["userId"] == person["member_id"] and "anonymousId" not in m
        else:
            assert m["anonymousId"] == person["checkout_anonymous_id"]
            assert (
                m["context"]["traits"]["phone"].replace(" ", "").replace("-", "")[-11:]
                == (person["phone"][3:])
            )
    truth = response_truth(dataset)
    assert buyers == set(truth.loc[truth["converted"], "person_id"])
    coupons = [m["properties"]["coupon"] for _, m in lines if m.get("event") == "Order Completed"]
    assert "BACK20" in coupons


def test_opens_and_clicks_come_back_with_the_campaign(
    dataset: Path, answered: tuple[ResponseSummary, dict[str, Any]]
) -> None:
    lines = response_lines(dataset)
    engagement = [m for source, m in lines if source == "web"]
    events = {m["event"] for m in engagement}
    assert {"Email Opened", "Email Link Clicked", "SMS Clicked"} <= events
    for m in engagement:
        assert m["properties"]["campaign"] == CAMPAIGN
        assert m["anonymousId"] == m["properties"]["message_id"]
        traits = m["context"]["traits"]
        assert ("phone" in traits) == (m["event"] == "SMS Clicked")
    assert all(source in ("ecommerce", "web", "callcenter") for source, _ in lines)


def test_same_seed_and_campaign_give_the_same_answer(
    dataset: Path, answered: tuple[ResponseSummary, dict[str, Any]]
) -> None:
    first_summary, sent = answered
    first = digest(dataset / "data" / "responses" / CAMPAIGN)
    first_truth = response_truth(dataset)
    again = respond(
        dataset,
        sent["outbox"],
        campaign=CAMPAIGN,
        start=REFERENCE_TIME,
        window_days=WINDOW,
        seed=7,
    )
    assert again == first_summary
    assert digest(dataset / "data" / "responses" / CAMPAIGN) == first
    pd.testing.assert_frame_equal(response_truth(dataset), first_truth)
    other = respond(
        dataset, sent["outbox"], campaign=CAMPAIGN, start=REFERENCE_TIME, window_days=WINDOW, seed=8
    )
    assert other.conversions != first_summary.conversions or digest(other.out) != first
    assert digest(dataset / "data" / "responses" / CAMPAIGN) != first
    respond(  # leave the module's answer in place for the other tests
        dataset, sent["outbox"], campaign=CAMPAIGN, start=REFERENCE_TIME, window_days=WINDOW, seed=7
    )


def test_a_missing_outbox_means_nobody_was_messaged(dataset: Path, tmp_path: Path) -> None:
    summary = respond(
        dataset,
        tmp_path / "absent.jsonl",
        campaign="nothing_sent",
        start=REFERENCE_TIME,
        window_days=WINDOW,
    )
    assert (summary.messaged_persons, summary.reached, summary.true_effect) == (0, 0, 0.0)
    assert summary.violations == 0
    assert summary.conversions > 0  # people buy anyway


def test_campaign_names_cannot_escape_the_dataset(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        respond(dataset, tmp_path / "x", campaign="../evil", start=REFERENCE_TIME, window_days=7)


# --- a sender that ignores consent and opt-outs ------------------------------------------------------


def test_violations_are_counted(
    dataset: Path, answered: tuple[ResponseSummary, dict[str, Any]]
) -> None:
    summary, sent = answered
    truth = response_truth(dataset)
    violators = sent["violators"]
    assert len(violators) >= 50
    assert summary.violations == len(violators) == truth["violated"].sum()
    assert set(truth.loc[truth["violated"], "person_id"]) == violators
    assert not (truth["violated"] & ~truth["messaged"]).any()
    persons = pd.read_parquet(dataset / "truth" / "persons.parquet").set_index("person_id")
    reasons = persons.loc[sorted(violators)]
    no_consent = reasons["consent_marketing"].fillna(False) == False  # noqa: E712
    assert no_consent.any() and (~no_consent).any()  # both kinds are in the outbox
    assert (no_consent | reasons["email_opt_out"] | reasons["sms_opt_out"]).all()


def test_violated_persons_complain_and_are_not_won_back(
    dataset: Path, answered: tuple[ResponseSummary, dict[str, Any]]
) -> None:
    truth = response_truth(dataset).set_index("person_id")
    lines = response_lines(dataset)
    owners = pd.read_parquet(dataset / "truth" / f"response_messages_{CAMPAIGN}.parquet")
    owner = dict(zip(owners["message_id"], owners["person_id"], strict=True))
    complaints = [m for source, m in lines if source == "callcenter" and m["type"] == "track"]
    assert complaints and all(m["event"] == "Complaint Filed" for m in complaints)
    complainers = {owner[m["messageId"]] for m in complaints}
    assert complainers <= set(truth.index[truth["violated"]])
    assert 0.1 <= len(complainers) / truth["violated"].sum() <= 0.5
    for m in complaints:
        props = m["properties"]
        assert props["reason"] == "unwanted_marketing" and props["campaign"] == CAMPAIGN
        assert props["channel"] in ("email", "sms") and props["ticket_id"].startswith("T")
        assert m.get("userId") or m["context"]["traits"]["phone"]
    # Violated persons convert at their baseline: across them, close to the mean of p0.
    violated = truth[truth["violated"]]
    se = np.sqrt(violated["p0"].mean() / len(violated))
    assert violated["converted"].mean() <= violated["p0"].mean() + 4 * se + 0.02


def test_a_compliant_outbox_has_no_violations(dataset: Path, tmp_path: Path) -> None:
    outbox = tmp_path / "compliant.jsonl"
    sent = write_outbox(dataset, outbox, campaign="compliant", compliant_only=True)
    summary = respond(
        dataset, outbox, campaign="compliant", start=REFERENCE_TIME, window_days=WINDOW
    )
    assert summary.violations == 0 and summary.reached == len(sent["targets"])
    assert not (dataset / "data" / "responses" / "compliant" / "callcenter").exists()
    truth = pd.read_parquet(dataset / "truth" / "responses_compliant.parquet")
    assert summary.true_effect == pytest.approx(truth.loc[truth["messaged"], "effect"].mean())
