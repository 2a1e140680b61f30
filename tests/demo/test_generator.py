"""The synthetic brand: layout, determinism, truth separation and coverage, and the noise."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import phonenumbers
import pyarrow.parquet as pq
import pytest

from closedloop.demo.generator import (
    BLOCK,
    HISTORY_START,
    REFERENCE_TIME,
    SOURCES,
    WECHAT_MINIPROGRAM_APPID,
    WECHAT_OFFICIAL_APPID,
    GenerationSummary,
    generate,
)

PERSONS = 2500
TRUTH_FILES = ("persons", "identifiers", "messages", "rows")
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TRUTH_ONLY_COLUMNS = {"person_id", "winback_effect", "lifecycle", "household_id", "junk"}


@pytest.fixture(scope="module")
def brand(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, GenerationSummary, list[int]]:
    out = tmp_path_factory.mktemp("brand")
    calls: list[int] = []
    summary = generate(out, PERSONS, seed=7, chunk_size=1000, progress=calls.append)
    return out, summary, calls


@pytest.fixture(scope="module")
def messages(brand: tuple[Path, GenerationSummary, list[int]]) -> list[tuple[str, dict[str, Any]]]:
    """(source, message) for every line under data/events."""
    out = brand[0]
    found = []
    for source in SOURCES:
        for part in sorted((out / "data" / "events" / source).glob("part-*.jsonl")):
            with part.open(encoding="utf-8") as f:
                found += [(source, json.loads(line)) for line in f]
    return found


@pytest.fixture(scope="module")
def truth(brand: tuple[Path, GenerationSummary, list[int]]) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(brand[0] / "truth" / f"{name}.parquet") for name in TRUTH_FILES}


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def e164(raw: str) -> str:
    """The pipeline's phone normalisation; unparseable junk keeps its stripped text."""
    try:
        number = phonenumbers.parse(raw, "CN")
    except phonenumbers.NumberParseException:
        return raw.strip()
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def traits_of(message: dict[str, Any]) -> dict[str, Any]:
    if message["type"] == "identify":
        return dict(message.get("traits", {}))
    return dict(message["context"].get("traits", {}))


def files_table(out: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(out / "data" / f"{name}.csv", dtype=str, keep_default_na=False)


def owners(truth: dict[str, pd.DataFrame], file: str) -> list[str]:
    rows = truth["rows"]
    return list(rows[rows["file"] == file].sort_values("row_number")["person_id"])


# --- layout -------------------------------------------------------------------------------------


def test_layout_manifest_and_summary_agree(
    brand: tuple[Path, GenerationSummary, list[int]], messages: list[tuple[str, dict[str, Any]]]
) -> None:
    out, summary, _ = brand
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 7 and manifest["persons"] == PERSONS
    assert manifest["reference_time"] == "2026-11-20T00:00:00Z"
    assert manifest["history_start"] == "2025-05-20T00:00:00Z"
    assert manifest["sources"] == list(SOURCES)
    by_source = Counter(source for source, _ in messages)
    assert manifest["counts"]["messages_by_source"] == {s: by_source[s] for s in SOURCES}
    assert summary.messages == manifest["counts"]["messages"] == len(messages)
    assert summary.order_rows == len(files_table(out, "orders"))
    assert summary.crm_rows == len(files_table(out, "crm_members"))
    assert summary.reference_time == REFERENCE_TIME and summary.persons == PERSONS
    for source in SOURCES:
        assert (out / "data" / "events" / source / "part-00000.jsonl").is_file()
    for table in ("orders", "crm_members"):
        assert (out / "data" / f"{table}.parquet").is_file()
    assert 15 <= len(messages) / PERSONS <= 25  # about 20 messages a person


def test_messages_follow_the_segment_spec(messages: list[tuple[str, dict[str, Any]]]) -> None:
    ids = [m["messageId"] for _, m in messages]
    assert len(set(ids)) == len(ids)
    seen_types: Counter[str] = Counter()
    for source, m in messages:
        seen_types[m["type"]] += 1
        assert "sentAt" not in m and ISO_MS.match(m["timestamp"]), m
        assert m.get("userId") or m.get("anonymousId"), m
        if "userId" in m:
            assert re.fullmatch(r"M\d{8}", m["userId"]), m
        assert {"ip", "userAgent"} <= set(m["context"]), m
        if m["type"] == "track":
            assert m["event"] and isinstance(m["properties"], dict)
        elif m["type"] in ("page", "screen"):
            assert m["name"] and "event" not in m
        else:
            assert m["traits"] and "properties" not in m
        if source in ("miniprogram", "official_account"):
            appid = WECHAT_MINIPROGRAM_APPID if source == "miniprogram" else WECHAT_OFFICIAL_APPID
            external = {e["type"]: e for e in m["context"]["externalIds"]}
            assert external["wechat_openid"]["collection"] == appid
            assert external["wechat_openid"]["encoding"] == "none"
            if "wechat_unionid" in external:
                assert external["wechat_unionid"]["collection"] == "wechat"
        else:
            assert "externalIds" not in m["context"]
        assert ("device" in m["context"]) == (source == "app"), m
    assert set(seen_types) == {"identify", "track", "page", "screen"}


def test_events_cover_the_catalogue_of_behaviours(
    messages: list[tuple[str, dict[str, Any]]],
) -> None:
    events = Counter(m.get("event") for _, m in messages if m["type"] == "track")
    for name in (
        "Product Viewed",
        "Products Searched",
        "Product Added to Wishlist",
        "Product Added",
        "Order Completed",
        "Signed Up",
        "Referral Sent",
        "Product Shared",
        "Store Visited",
        "Complaint Filed",
    ):
        assert events[name] > 0, name
    orders = [m for s, m in messages if m.get("event") == "Order Completed"]
    assert all(s == "ecommerce" for s, m in messages if m.get("event") == "Order Completed")
    for order in orders:
        p = order["properties"]
        assert p["currency"] == "CNY" and p["total"] == p["revenue"] > 0
        assert p["products"] and all(
            set(item) == {"product_id", "category", "price", "quantity"} for item in p["products"]
        )
        assert "coupon" in p
    assert any(o["properties"]["coupon"] for o in orders)
    assert any(o["properties"]["coupon"] is None for o in orders)
    referrals = [m for _, m in messages if m.get("event") == "Referral Sent"]
    assert all(re.fullmatch(r"M\d{8}", m["properties"]["referred_member_id"]) for m in referrals)
    shares = [m for _, m in messages if m.get("event") == "Product Shared"]
    assert all(m["properties"]["shared_to"] for m in shares)


def test_members_sign_up_with_a_full_profile(messages: list[tuple[str, dict[str, Any]]]) -> None:
    signed_up = {m["userId"] for _, m in messages if m.get("event") == "Signed Up"}
    profiles = {
        m["userId"]: m["traits"]
        for _, m in messages
        if m["type"] == "identify" and "name" in m.get("traits", {})
    }
    assert signed_up and signed_up == set(profiles)
    for member_id, traits in profiles.items():
        assert traits["member_id"] == member_id and traits["gender"] in ("female", "male")
        assert re.fullmatch(r"\d{4}-\d\d-\d\d", traits["birthday"]) and traits["city"]
        assert "phone" in traits


# --- determinism and chunking ---------------------------------------------------------------------


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path: Path) -> None:
    generate(tmp_path / "a", 1000, seed=11)
    generate(tmp_path / "b", 1000, seed=11)
    generate(tmp_path / "c", 1000, seed=12)
    a, b, c = (digests(tmp_path / x) for x in "abc")
    assert a == b
    assert set(a) == set(c)
    differing = [name for name in a if a[name] != c[name]]
    assert "data/events/web/part-00000.jsonl" in differing
    assert "truth/persons.parquet" in differing


def test_chunk_size_changes_neither_data_nor_truth(
    brand: tuple[Path, GenerationSummary, list[int]], tmp_path: Path
) -> None:
    out, _, calls = brand
    one_calls: list[int] = []
    generate(tmp_path, PERSONS, seed=7, chunk_size=PERSONS, progress=one_calls.append)
    # Chunks are whole blocks and never exceed chunk_size (memory is bounded by the chunk).
    assert calls == [1000, 1000, 500] and one_calls == [2000, 500]
    assert pq.ParquetFile(out / "truth" / "persons.parquet").num_row_groups == 3
    text = [p for p in digests(out) if p.endswith((".jsonl", ".csv", ".json"))]
    assert {p: digests(out)[p] for p in text} == {p: digests(tmp_path)[p] for p in text}
    for name in TRUTH_FILES:
        assert pq.read_table(out / "truth" / f"{name}.parquet").equals(
            pq.read_table(tmp_path / "truth" / f"{name}.parquet")
        ), name


def test_blocks_not_chunks_seed_the_randomness(tmp_path: Path) -> None:
    """The first block of a bigger brand is the same persons as a brand of one block."""
    generate(tmp_path / "small", BLOCK)
    generate(tmp_path / "big", 2 * BLOCK)
    small = pd.read_parquet(tmp_path / "small" / "truth" / "persons.parquet")
    big = pd.read_parquet(tmp_path / "big" / "truth" / "persons.parquet")
    pd.testing.assert_frame_equal(small, big.iloc[:BLOCK])


def test_rejects_impossible_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate(tmp_path, 0)


# --- truth ------------------------------------------------------------------------------------------


def data_files(out: Path) -> Iterator[Path]:
    return (p for p in sorted((out / "data").rglob("*")) if p.is_file())


def test_nothing_under_data_names_a_person(
    brand: tuple[Path, GenerationSummary, list[int]],
) -> None:
    out = brand[0]
    person_id = re.compile(rb"\bP\d{8}\b")
    for path in data_files(out):
        if path.suffix == ".parquet":
            assert not set(pq.read_schema(path).names) & TRUTH_ONLY_COLUMNS, path
            continue
        content = path.read_bytes()
        assert not person_id.search(content), path
        for column in TRUTH_ONLY_COLUMNS:
            assert column.encode() not in content, (path, column)


def test_truth_covers_every_message_and_row(
    brand: tuple[Path, GenerationSummary, list[int]],
    messages: list[tuple[str, dict[str, Any]]],
    truth: dict[str, pd.DataFrame],
) -> None:
    out = brand[0]
    assert set(truth["messages"]["message_id"]) == {m["messageId"] for _, m in messages}
    assert truth["messages"]["message_id"].is_unique
    persons = set(truth["persons"]["person_id"])
    assert len(persons) == PERSONS and set(truth["messages"]["person_id"]) <= persons
    for file in ("orders", "crm_members"):
        rows = truth["rows"][truth["rows"]["file"] == file]
        assert list(rows["row_number"]) == list(range(1, len(files_table(out, file)) + 1))
        assert set(rows["person_id"]) <= persons


def test_csv_and_parquet_hold_the_same_rows(
    brand: tuple[Path, GenerationSummary, list[int]],
) -> None:
    out = brand[0]
    for name, times in (("orders", ["ordered_at"]), ("crm_members", ["registered_at"])):
        csv = pd.read_csv(out / "data" / f"{name}.csv", parse_dates=times)
        parquet = pd.read_parquet(out / "data" / f"{name}.parquet")
        for column in times:
            csv[column] = pd.to_datetime(csv[column], utc=True).dt.as_unit("ms")
        if "phone" in csv:
            csv["phone"] = csv["phone"].astype(object)
        pd.testing.assert_frame_equal(csv, parquet, check_dtype=False)


def test_identifiers_in_the_data_normalise_to_the_truth(
    brand: tuple[Path, GenerationSummary, list[int]],
    messages: list[tuple[str, dict[str, Any]]],
    truth: dict[str, pd.DataFrame],
) -> None:
    """Every phone and email anywhere under data/ normalises to a truth value of its person."""
    ids = truth["identifiers"]
    assert not ids.duplicated(["person_id", "id_type", "value"]).any()
    known = set(zip(ids["person_id"], ids["id_type"], ids["value"], strict=True))
    owner = dict(zip(truth["messages"]["message_id"], truth["messages"]["person_id"], strict=True))
    seen: Counter[str] = Counter()
    for _, m in messages:
        person = owner[m["messageId"]]
        traits = traits_of(m)
        if "phone" in traits:
            assert (person, "phone", e164(traits["phone"])) in known, traits
            seen["phone"] += 1
        if "email" in traits:
            assert (person, "email", traits["email"].strip().lower()) in known, traits
            seen["email"] += 1
        for key, id_type in (("userId", "member_id"), ("anonymousId", "anonymous_id")):
            if key in m:
                assert (person, id_type, m[key]) in known
        for ext in m["context"].get("externalIds", []):
            value = (
                f"{ext['collection']}:{ext['id']}" if ext["type"] == "wechat_openid" else ext["id"]
            )
            assert (person, ext["type"], value) in known
    out = brand[0]
    for file in ("orders", "crm_members"):
        table = files_table(out, file)
        for person, phone in zip(owners(truth, file), table["phone"], strict=True):
            if phone:
                assert (person, "phone", e164(phone)) in known
                seen[f"{file} phone"] += 1
        if file == "crm_members":
            for person, email in zip(owners(truth, file), table["email"], strict=True):
                if email:
                    assert (person, "email", email.strip().lower()) in known
    assert min(seen.values()) > 10 and len(seen) == 4
    formats = {re.sub(r"\d", "9", raw) for raw in ids.loc[ids["id_type"] == "phone", "raw_value"]}
    assert len(formats) >= 5  # 13812345678, +86 138 1234 5678, 138-1234-5678, 0086 …


def test_truth_values_are_the_pipeline_normal_forms(truth: dict[str, pd.DataFrame]) -> None:
    ids = truth["identifiers"]
    phones = ids[ids["id_type"] == "phone"]
    assert all(
        e164(raw) == value for raw, value in zip(phones["raw_value"], phones["value"], strict=True)
    )
    for value in phones.loc[~phones["junk"], "value"]:
        assert phonenumbers.is_valid_number(phonenumbers.parse(value))
    emails = ids[ids["id_type"] == "email"]
    assert (emails["raw_value"].str.strip().str.lower() == emails["value"]).all()
    assert (emails["raw_value"] != emails["value"]).any()  # raw forms vary in case and spaces
    openids = ids[ids["id_type"] == "wechat_openid"]["value"]
    assert openids.str.match(f"^({WECHAT_MINIPROGRAM_APPID}|{WECHAT_OFFICIAL_APPID}):o").all()
    persons = truth["persons"]
    assert persons["phone"].str.fullmatch(r"\+861\d{10}").all() and persons["phone"].is_unique


# --- the noise the pipeline must survive -------------------------------------------------------------


def persons_per_value(ids: pd.DataFrame, id_type: str) -> pd.Series:
    return ids[ids["id_type"] == id_type].groupby("value")["person_id"].nunique()


def test_junk_identifiers_are_present_and_marked(truth: dict[str, pd.DataFrame]) -> None:
    ids = truth["identifiers"]
    junk = ids[ids["junk"]]
    junk_anon = set(junk.loc[junk["id_type"] == "anonymous_id", "value"])
    assert junk_anon and junk_anon <= {"undefined", "null", "0"}
    assert "test@test.com" in set(junk.loc[junk["id_type"] == "email", "value"])
    assert set(junk.loc[junk["id_type"] == "phone", "value"]) & {"0", "+8613800000000"}
    for value in ("undefined", "null", "0", "test@test.com", "+8613800000000"):
        assert not ids.loc[ids["value"] == value, "junk"].eq(False).any(), value


def test_a_family_tablet_is_shared(truth: dict[str, pd.DataFrame]) -> None:
    ids = truth["identifiers"]
    shared_devices = persons_per_value(ids, "device_id")
    assert (shared_devices >= 2).sum() >= 3
    households = truth["persons"].dropna(subset=["household_id"])
    assert 0.005 <= len(households) / PERSONS <= 0.02
    assert (households.groupby("household_id")["city"].nunique() == 1).all()


def test_a_lazy_clerk_types_one_phone_for_many_customers(
    brand: tuple[Path, GenerationSummary, list[int]], truth: dict[str, pd.DataFrame]
) -> None:
    out = brand[0]
    ids = truth["identifiers"]
    phones = ids[(ids["id_type"] == "phone") & ids["junk"]]
    clerk = phones.groupby("value")["person_id"].nunique()
    clerk = clerk[(clerk >= 3) & ~clerk.index.isin(["0", "+8613800000000"])]
    assert len(clerk)
    in_orders = {e164(p) for p in files_table(out, "orders")["phone"] if p}
    in_crm = {e164(p) for p in files_table(out, "crm_members")["phone"] if p}
    assert set(clerk.index) & in_orders and set(clerk.index) & in_crm


def test_some_crm_members_registered_twice(
    brand: tuple[Path, GenerationSummary, list[int]], truth: dict[str, pd.DataFrame]
) -> None:
    crm = files_table(brand[0], "crm_members").assign(person_id=owners(truth, "crm_members"))
    member_ids = crm.groupby("person_id")["member_id"].nunique()
    twice = member_ids[member_ids == 2].index
    members = truth["persons"]["is_member"].sum()
    assert 0.015 <= len(twice) / members <= 0.05
    pairs = crm[crm["person_id"].isin(twice)].groupby("person_id")
    assert (pairs["name"].nunique() == 2).mean() > 0.5  # a typo in the second name
    assert pairs["email"].nunique().gt(1).any()


def test_names_and_birthdays_collide_among_strangers(truth: dict[str, pd.DataFrame]) -> None:
    persons = truth["persons"]
    assert persons["name"].duplicated(keep=False).mean() > 0.9
    assert persons["name"].value_counts().iloc[0] >= 20
    assert persons.duplicated(["name", "birthday"]).sum() >= 1
    assert (persons["birthday"].str.endswith("-01-01")).mean() > 0.08


def test_one_user_name_at_two_providers_is_usually_two_people(
    truth: dict[str, pd.DataFrame],
) -> None:
    emails = truth["persons"][["person_id", "email"]]
    split = emails["email"].str.split("@", expand=True)
    user = emails.assign(user=split[0], provider=split[1])
    spread = user.groupby("user").agg(
        providers=("provider", "nunique"), people=("person_id", "nunique")
    )
    assert (spread["providers"] >= 2).sum() >= 3
    assert (spread.loc[spread["providers"] >= 2, "people"] >= 2).all()
    providers = set(user["provider"])
    assert providers >= {"qq.com", "163.com", "126.com", "gmail.com", "outlook.com", "sina.com"}


# --- behaviour -----------------------------------------------------------------------------------------


def test_lifecycle_shapes_purchases(truth: dict[str, pd.DataFrame]) -> None:
    persons = truth["persons"]
    ref = pd.Timestamp(REFERENCE_TIME)
    last = persons.set_index("lifecycle")["last_order_at"].dropna()
    assert (last.loc["lapsed"] <= ref - timedelta(days=60)).all()
    assert (last.loc["churned"] <= ref - timedelta(days=180)).all()
    assert (last.loc["active"] > ref - timedelta(days=60)).mean() > 0.3
    assert 0.6 <= persons["is_member"].mean() <= 0.8
    rate = persons.groupby("lifecycle")["daily_purchase_rate"].mean()
    assert rate["active"] > rate["lapsed"] > rate["churned"]


def test_traffic_follows_the_calendar_and_the_clock(
    messages: list[tuple[str, dict[str, Any]]],
) -> None:
    orders = pd.to_datetime(
        pd.Series([m["timestamp"] for _, m in messages if m.get("event") == "Order Completed"])
    )

    def per_day(first: str, end: str) -> float:
        a, b = pd.Timestamp(first, tz="UTC"), pd.Timestamp(end, tz="UTC")
        return float(((orders >= a) & (orders < b)).sum()) / (b - a).days

    assert per_day("2025-11-01", "2025-11-12") > 1.8 * per_day("2025-09-01", "2025-10-01")
    assert per_day("2026-06-01", "2026-06-19") > 1.5 * per_day("2026-04-01", "2026-05-01")
    stamps = pd.to_datetime(pd.Series([m["timestamp"] for _, m in messages]))
    shanghai_hour = (stamps.dt.hour + 8) % 24
    assert shanghai_hour.between(19, 22).sum() > 4 * shanghai_hour.between(2, 5).sum()
    assert stamps.min() >= pd.Timestamp(HISTORY_START) - timedelta(minutes=1)
    assert stamps.max() < pd.Timestamp(REFERENCE_TIME)


def test_winback_effects_are_heterogeneous(truth: dict[str, pd.DataFrame]) -> None:
    persons = truth["persons"]
    effect = persons["winback_effect"]
    assert effect.between(0, 0.15).all() and (effect == 0).any()
    responsive = persons[effect > 0]
    assert responsive["winback_effect"].min() >= 0.04
    by_stage = responsive.groupby("lifecycle")["winback_effect"].mean()
    assert by_stage["lapsed"] > by_stage["active"]
    assert responsive["winback_effect"].corr(responsive["coupon_affinity"]) > 0.5
