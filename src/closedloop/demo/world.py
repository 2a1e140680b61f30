"""The world: how the synthetic brand's customers answer a campaign.

Why it exists: a lift the pipeline measures can only be checked against an effect that is
known. The generator gave every person a baseline purchase rate and a true uplift if messaged
(``truth/persons.parquet``). ``respond`` maps each outbox address back to a person through the
truth (the pipeline's customer ids mean nothing to the world), then simulates the goal window
for *every* person — the world cannot tell who was held out — and writes what would come back:
orders from the e-commerce service, and opens and clicks recorded by the brand's web tracking
(tracking pixel and landing pages; ``web`` is a source every project has). These are ordinary
Segment messages that collect loads like any others, so the loop closes through the front door.

Each person draws one uniform number ``u``; they convert when ``u < p0 + effect`` if messaged
and when ``u < p0`` if not. Outcomes are therefore coupled potential outcomes: a message never
stops a purchase, and the true average effect on the treated is the mean of their effects.

A compliant sender messages nobody without marketing consent or who opted out of the channel
(the truth's final ``consent_marketing``, ``email_opt_out``, ``sms_opt_out``; every generated
event is older than any send). A person the outbox nevertheless reaches that way is a
*violation*: the message has no effect on them (``u < p0`` still decides), and some of them
ring the call centre to complain (``Complaint Filed`` with reason ``unwanted_marketing``).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import pandas as pd
import phonenumbers
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj
import pyarrow.parquet as pq

from closedloop.core.ids import stable_hash64
from closedloop.demo import names
from closedloop.demo.generator import (
    CALL,
    CATEGORY_NAMES,
    DAY_MS,
    ECOM,
    F64,
    I64,
    IDENTIFY,
    TRACK,
    TZ_NAMES,
    TZ_OFFSET_H,
    WEB,
    Bool,
    Frame,
    PartWriter,
    as_call,
    cat,
    clock_ms,
    column_strings,
    const,
    either,
    json_text,
    keep,
    make_baskets,
    message_lines,
    num,
    order_id_text,
    phone_pair,
    random_text,
    sort_frame,
    uuid4s,
    with_contacts,
)

RESPONSE_SOURCES: Final = {"orders": "ecommerce", "engagement": "web", "complaints": "callcenter"}
COMPLAINT_RATE: Final = 0.3  # violated persons who complain within the window (if it is long)
_PERSON_COLUMNS: Final = (
    "person_id",
    "is_member",
    "member_id",
    "phone",
    "timezone",
    "category_pref",
    "coupon_affinity",
    "daily_purchase_rate",
    "winback_effect",
    "checkout_anonymous_id",
    "home_ip",
)
_CONTACT_COLUMNS: Final = ("consent_marketing", "email_opt_out", "sms_opt_out")
_OUTBOX_SCHEMA: Final = pa.schema(
    [
        ("campaign", pa.string()),
        ("customer_id", pa.string()),
        ("channel", pa.string()),
        ("address", pa.string()),
        ("message_id", pa.string()),
        ("sent_at", pa.string()),
        ("offer_code", pa.string()),
    ]
)
_MOBILE_AGENT: Final = names.WECHAT_USER_AGENTS[0]
_MAIL_AGENT: Final = names.WEB_USER_AGENTS[0]


@dataclass(frozen=True)
class ResponseSummary:
    """What happened in the goal window.

    ``messaged_persons`` counts the pipeline's customers in the outbox, ``reached`` the true
    persons those addresses belong to, ``true_effect`` the mean uplift over reached persons,
    ``conversions`` the persons (messaged or not) who bought, ``messages`` the Segment messages
    written, ``violations`` the reached persons a compliant sender would not have messaged
    (no marketing consent, or opted out of a channel they were reached on). Violations count
    towards ``true_effect`` with an effect of zero.
    """

    messaged_persons: int
    reached: int
    true_effect: float
    conversions: int
    messages: int
    out: Path
    violations: int = 0


@dataclass
class _World:
    """The truth about persons the world needs, as columns."""

    persons: pa.Table
    member: Bool
    tz_hours: I64
    category: I64
    coupon: F64
    rate: F64
    effect: F64
    consent: Bool  # stated marketing consent (never stated counts as none)
    opted_out: dict[str, Bool]  # per channel: email, sms

    @property
    def n(self) -> int:
        return int(self.persons.num_rows)

    def strings(self, column: str) -> Any:
        return column_strings(self.persons, column)


def _load_world(dataset: Path) -> _World:
    path = dataset / "truth" / "persons.parquet"
    available = set(pq.read_schema(path).names)
    contact = [c for c in _CONTACT_COLUMNS if c in available]  # older brands lack them
    persons = pq.read_table(path, columns=[*_PERSON_COLUMNS, *contact])
    n = persons.num_rows

    def flag(column: str, default: bool) -> Bool:
        if column not in available:
            return np.full(n, default, dtype=np.bool_)
        values = persons.column(column).combine_chunks().fill_null(False)
        return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.bool_)

    tz = pd.Index(TZ_NAMES).get_indexer(persons.column("timezone").to_pandas())
    category = pd.Index(CATEGORY_NAMES).get_indexer(persons.column("category_pref").to_pandas())
    return _World(
        persons=persons,
        member=persons.column("is_member").to_numpy(),
        tz_hours=TZ_OFFSET_H[tz],
        category=np.asarray(category, dtype=np.int64),
        coupon=persons.column("coupon_affinity").to_numpy(),
        rate=persons.column("daily_purchase_rate").to_numpy(),
        effect=persons.column("winback_effect").to_numpy(),
        consent=flag("consent_marketing", True),
        opted_out={c: flag(f"{c}_opt_out", False) for c in ("email", "sms")},
    )


def read_outbox(outbox: Path, campaign: str) -> pd.DataFrame:
    """The campaign's messages in the outbox; a missing or empty outbox means none were sent."""
    columns = [f.name for f in _OUTBOX_SCHEMA]
    if not outbox.is_file() or outbox.stat().st_size == 0:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in columns}).assign(sent_ms=0)
    options = pj.ParseOptions(explicit_schema=_OUTBOX_SCHEMA, unexpected_field_behavior="ignore")
    frame: pd.DataFrame = pj.read_json(outbox, parse_options=options).to_pandas()
    frame = frame[frame["campaign"].isna() | (frame["campaign"] == campaign)].reset_index(drop=True)
    sent = pd.to_datetime(frame["sent_at"], utc=True, format="ISO8601")
    frame["sent_ms"] = (sent - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)
    return frame


def _e164(address: str) -> str:
    try:
        number = phonenumbers.parse(address, "CN")
    except phonenumbers.NumberParseException:
        return address
    return str(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def _canonical_addresses(sends: pd.DataFrame) -> pd.MultiIndex:
    """The (id_type, value) each outbox address should match in the truth.

    The pipeline already wrote normalised addresses; anything else is normalised the same way
    (a phone not in E.164 goes through ``phonenumbers``, which is rare and so not vectorised).
    """
    address = sends["address"].fillna("").astype(str).str.strip()
    sms = sends["channel"].eq("sms").to_numpy()
    value = address.where(sms, address.str.lower())
    odd = sms & ~address.str.startswith("+").to_numpy()
    value[odd] = np.array([_e164(a) for a in address[odd]], dtype=object)
    id_type = np.where(sms, "phone", "email")
    return pd.MultiIndex.from_arrays([id_type, value.to_numpy()], names=["id_type", "value"])


def map_addresses(dataset: Path, sends: pd.DataFrame, persons: pa.Table) -> I64:
    """Row index of the person each send reached, or -1.

    Junk values and values shared by several persons (a clerk's phone, a family email) reach no
    one in particular, so they count as unmapped.
    """
    if sends.empty:
        return np.zeros(0, dtype=np.int64)
    ids = pd.read_parquet(
        dataset / "truth" / "identifiers.parquet", columns=["person_id", "id_type", "value", "junk"]
    )
    ids = ids[ids["id_type"].isin(["email", "phone"]) & ~ids["junk"]]
    owners = ids.groupby(["id_type", "value"])["person_id"].agg(["nunique", "first"])
    single_owner = owners.loc[owners["nunique"] == 1, "first"]
    person = single_owner.reindex(_canonical_addresses(sends))
    index = pd.Index(persons.column("person_id").to_pandas()).get_indexer(person.to_numpy())
    return np.asarray(index, dtype=np.int64)


def _rng(seed: int, campaign: str, stream: int = 0) -> np.random.Generator:
    h = stable_hash64("world", campaign)
    key = [seed, h >> 32, h & 0xFFFFFFFF]
    return np.random.default_rng([*key, stream] if stream else key)


def _violating_sends(w: _World, sends: pd.DataFrame, person: I64) -> Bool:
    """Sends that reached someone a compliant sender would have left alone."""
    reached = person >= 0
    who = np.where(reached, person, 0)
    sms = sends["channel"].eq("sms").to_numpy(dtype=np.bool_)
    opted = np.where(sms, w.opted_out["sms"][who], w.opted_out["email"][who])
    return np.asarray(reached & (~w.consent[who] | opted), dtype=np.bool_)


def _complaint_frames(
    rng: np.random.Generator,
    w: _World,
    sends: pd.DataFrame,
    person: I64,
    bad: Bool,
    start_ms: int,
    end_ms: int,
) -> list[Frame]:
    """Some persons messaged against their wishes ring the call centre after the first message.

    As in the generator's call centre, members are looked up by member id; other callers get a
    call id and leave their number (identify with the phone).
    """
    sent = sends["sent_ms"].to_numpy(dtype=np.int64)
    bad_sends = np.flatnonzero(bad)
    bad_sends = bad_sends[np.lexsort((sent[bad_sends], person[bad_sends]))]
    who, first = np.unique(person[bad_sends], return_index=True)
    send = bad_sends[first]
    calls = rng.random(len(who)) < COMPLAINT_RATE
    delay = (10 * 60_000 + rng.exponential(DAY_MS, len(who))).astype(np.int64)
    ms = np.maximum(sent[send], start_ms) + delay
    keep_rows = np.flatnonzero(calls & (ms < end_ms - 60_000))
    who, send, ms = who[keep_rows], send[keep_rows], ms[keep_rows]
    k = len(who)
    idx = pa.array(who)
    member = w.member[who]
    digits = pc.utf8_slice_codeunits(w.strings("phone").take(idx), 3)
    raw, value = phone_pair(rng, digits)
    base = Frame.make(
        k,
        source=np.full(k, CALL),
        ms=ms,
        person=who,
        mtype=np.full(k, TRACK),
        user_id=keep(w.strings("member_id").take(idx), member),
        anon_id=keep(cat("call-", random_text(rng, k, 12)), ~member),
        ip=const(names.CALLCENTER_IP, k),
        ua=const(names.CALLCENTER_USER_AGENT, k),
    )
    channel = json_text(pa.array(sends["channel"].to_numpy(dtype=object)[send], pa.string()))
    campaign = json_text(pa.array(sends["campaign"].to_numpy(dtype=object)[send], pa.string()))
    props = cat(
        '{"reason":"', names.MARKETING_COMPLAINT_REASON,
        '","ticket_id":"T', num(rng.integers(10**8, 10**9, k)),
        '","channel":"', channel.fill_null("email"),
        '","campaign":"', campaign.fill_null(""), '"}',
    )  # fmt: skip
    caller_id = ~member | (rng.random(k) < 0.5)
    complaint = with_contacts(
        as_call(base, ms + 60_000, TRACK, "Complaint Filed", props),
        (keep(raw, caller_id), keep(value, caller_id)),
    )
    anon = pa.array(np.flatnonzero(~member))
    identify = with_contacts(
        as_call(base.take(anon), ms[~member], IDENTIFY, None, None),
        (raw.take(anon), value.take(anon)),
    )
    return [complaint, identify]


def _order_times(
    rng: np.random.Generator, w: _World, buyer: I64, first_sent: I64, start_ms: int, days: int
) -> I64:
    """Purchase moments in the window; someone who was messaged buys after the message."""
    day = rng.uniform(0, days, len(buyer))
    ms = clock_ms(rng, start_ms, day, w.tz_hours[buyer])
    after = first_sent[buyer] + rng.integers(10 * 60_000, 6 * 3_600_000, len(buyer))
    ms = np.where(first_sent[buyer] >= 0, np.maximum(ms, after), ms)
    return np.clip(ms, start_ms, start_ms + days * DAY_MS - 1)


def _order_frame(
    rng: np.random.Generator,
    w: _World,
    buyer: I64,
    ms: I64,
    campaign_coupon: tuple[Bool, str] | None,
) -> Frame:
    """Order Completed from the e-commerce service: members by member id, guests by cookie+phone."""
    k = len(buyer)
    idx = pa.array(buyer)
    member = w.member[buyer]
    baskets = make_baskets(
        rng, w.category[buyer], w.coupon[buyer], ms, campaign_coupon=campaign_coupon
    )
    base = Frame.make(
        k,
        source=np.full(k, ECOM),
        ms=ms,
        person=buyer,
        mtype=np.full(k, TRACK),
        user_id=keep(w.strings("member_id").take(idx), member),
        anon_id=keep(w.strings("checkout_anonymous_id").take(idx), ~member),
        ip=w.strings("home_ip").take(idx),
        ua=const(names.ECOMMERCE_USER_AGENT, k),
    )
    call = as_call(
        base, ms, TRACK, "Order Completed", baskets.order_completed(order_id_text(rng, k))
    )
    digits = pc.utf8_slice_codeunits(w.strings("phone").take(idx), 3)
    return with_contacts(call, phone_pair(rng, digits, ~member))


def _engagement_frames(
    rng: np.random.Generator,
    w: _World,
    sends: pd.DataFrame,
    person: I64,
    converted: Bool,
    end_ms: int,
) -> list[Frame]:
    """Opens and clicks per reached message; buyers open and click far more often."""
    reached = np.flatnonzero(person >= 0)
    if not len(reached):
        return []
    who = person[reached]
    sent = sends["sent_ms"].to_numpy(dtype=np.int64)[reached]
    channel = sends["channel"].to_numpy(dtype=object)[reached]
    sms = channel == "sms"
    bought = converted[who]
    k = len(who)
    opened = ~sms & (rng.random(k) < 0.22 + 0.45 * bought)
    clicked = (opened & (rng.random(k) < 0.25 + 0.5 * bought)) | (
        sms & (rng.random(k) < 0.05 + 0.4 * bought)
    )
    open_ms = sent + rng.exponential(5 * 3_600_000, k).astype(np.int64)
    click_ms = np.where(sms, sent, open_ms) + rng.exponential(600_000, k).astype(np.int64)
    text = {
        c: json_text(pa.array(sends[c].to_numpy(dtype=object)[reached], pa.string()))
        for c in ("campaign", "customer_id", "message_id", "address", "channel")
    }
    props = cat(
        '{"campaign":"', text["campaign"],
        '","message_id":"', text["message_id"],
        '","customer_id":"', text["customer_id"],
        '","channel":"', text["channel"], '"}',
    )  # fmt: skip
    base = Frame.make(
        k,
        source=np.full(k, WEB),
        ms=sent,
        person=who,
        mtype=np.full(k, TRACK),
        anon_id=text["message_id"],
        ip=w.strings("home_ip").take(pa.array(who)),
        ua=either(sms, _MOBILE_AGENT, _MAIL_AGENT),
    )
    raw = text["address"]
    value = pc.utf8_lower(pc.utf8_trim_whitespace(raw))
    contact = with_contacts(
        base,
        phone=(keep(raw, sms), keep(pc.utf8_trim_whitespace(raw), sms)),
        email=(keep(raw, ~sms), keep(value, ~sms)),
    )
    frames = []
    for mask, when, event in (
        (opened, open_ms, "Email Opened"),
        (clicked & ~sms, click_ms, "Email Link Clicked"),
        (clicked & sms, click_ms, "SMS Clicked"),
    ):
        sel = np.flatnonzero(mask & (when < end_ms))
        frames.append(
            as_call(contact.take(sel), when[sel], TRACK, event, props.take(pa.array(sel)))
        )
    return frames


def _check_campaign(campaign: str) -> None:
    if (
        not campaign
        or any(bad in campaign for bad in ("/", "\\", ".."))
        or campaign.startswith(".")
    ):
        raise ValueError(f"campaign name {campaign!r} cannot be used as a folder name")


def respond(
    dataset: Path,
    outbox: Path,
    *,
    campaign: str,
    start: datetime,
    window_days: int,
    seed: int = 7,
) -> ResponseSummary:
    """Simulate ``window_days`` from ``start`` for every person and write what comes back.

    Writes ``data/responses/<campaign>/<source>/part-*.jsonl`` and, apart from it,
    ``truth/responses_<campaign>.parquet`` and ``truth/response_messages_<campaign>.parquet``.
    Deterministic in (seed, campaign) for a given dataset and outbox.
    """
    _check_campaign(campaign)
    if window_days < 1:
        raise ValueError("window_days must be at least 1")
    dataset = Path(dataset)
    start = start.replace(tzinfo=UTC) if start.tzinfo is None else start.astimezone(UTC)
    start_ms = int(start.timestamp() * 1000)
    end_ms = start_ms + window_days * DAY_MS
    w = _load_world(dataset)
    sends = read_outbox(Path(outbox), campaign)
    person = map_addresses(dataset, sends, w.persons)
    reached = person >= 0
    messaged = np.zeros(w.n, dtype=np.bool_)
    messaged[person[reached]] = True
    bad = _violating_sends(w, sends, person)
    violated = np.zeros(w.n, dtype=np.bool_)
    violated[person[bad]] = True
    effect = np.where(messaged & ~violated, w.effect, 0.0)
    first_sent = np.full(w.n, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first_sent, person[reached], sends["sent_ms"].to_numpy(dtype=np.int64)[reached])
    first_sent = np.where(messaged, first_sent, -1)

    rng = _rng(seed, campaign)
    p0 = 1.0 - np.exp(-w.rate * window_days)
    converted = rng.random(w.n) < np.clip(p0 + effect, 0.0, 1.0)
    buyer = np.repeat(np.arange(w.n), np.where(converted, 1 + (rng.random(w.n) < 0.12), 0))
    ms = _order_times(rng, w, buyer, first_sent, start_ms, window_days)
    code = _offer_code(sends, campaign)
    coupon = (messaged[buyer] & (rng.random(len(buyer)) < 0.3 + 0.6 * w.coupon[buyer]), code)
    frames = [_order_frame(rng, w, buyer, ms, coupon)]
    frames += _engagement_frames(rng, w, sends, person, converted, end_ms)
    complaints = _rng(
        seed, campaign, stream=1
    )  # its own stream: compliant answers stay as they were
    frames += _complaint_frames(complaints, w, sends, person, bad, start_ms, end_ms)

    out = dataset / "data" / "responses" / campaign
    written = _write(rng, out, dataset, campaign, w, Frame.concat(frames))
    truth = pa.table(
        {
            "person_id": w.persons.column("person_id"),
            "messaged": pa.array(messaged),
            "p0": pa.array(p0),
            "effect": pa.array(w.effect),  # if messaged compliantly
            "violated": pa.array(violated),
            "converted": pa.array(converted),
        }
    )
    pq.write_table(truth, dataset / "truth" / f"responses_{campaign}.parquet")
    return ResponseSummary(
        messaged_persons=int(sends["customer_id"].nunique()),
        reached=int(messaged.sum()),
        true_effect=float(effect[messaged].mean()) if messaged.any() else 0.0,
        conversions=int(converted.sum()),
        messages=written,
        out=out,
        violations=int(violated.sum()),
    )


def _offer_code(sends: pd.DataFrame, campaign: str) -> str:
    """The coupon code the campaign offered, or one derived from its name."""
    codes = sends["offer_code"].dropna()
    if len(codes):
        return str(codes.iloc[0]).replace("\\", "\\\\").replace('"', '\\"')
    return f"CL{stable_hash64('coupon', campaign) % 10**6:06d}"


def _write(
    rng: np.random.Generator, out: Path, dataset: Path, campaign: str, w: _World, frame: Frame
) -> int:
    """Response events per source, and which person each message came from."""
    shutil.rmtree(out, ignore_errors=True)
    frame = sort_frame(frame)
    message_ids = uuid4s(rng, len(frame))
    lines = message_lines(frame, message_ids)
    for source in RESPONSE_SOURCES.values():
        code = {"ecommerce": ECOM, "web": WEB, "callcenter": CALL}[source]
        rows = frame.source == code
        if source == "callcenter" and not rows.any():
            continue  # no complaints, no file
        writer = PartWriter(out / source)
        writer.write(lines.filter(pa.array(rows)))
        writer.close()
    owners = w.persons.column("person_id").combine_chunks().take(pa.array(frame.person))
    messages = pa.table({"message_id": message_ids, "person_id": owners})
    pq.write_table(messages, dataset / "truth" / f"response_messages_{campaign}.parquet")
    return len(frame)
