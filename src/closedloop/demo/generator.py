"""The synthetic brand: eighteen months of a tea-and-cosmetics retailer's data, with ground truth.

Why this exists: every stage of closedloop (identity, portrait, predict, measure) needs data
where the right answer is known. ``generate`` writes what the brand's touchpoints would send
(``data/``: Segment-spec JSON lines, a POS ticket file, a CRM export) and, apart from it, who
each record really belongs to (``truth/``). Nothing under ``data/`` names a person.

A contact policy finds what it needs in the events, as the portrait reads them: the device's
``context.timezone``, marketing consent in ``context.consent.categoryPreferences`` (Segment
consent spec; stated at sign-up, at a privacy-policy refresh or in the mini-program's privacy
pop-up, sometimes withdrawn later) and ``Unsubscribed``/``Subscribed`` per channel. The final
state is in ``truth/persons.parquet`` (``consent_marketing``, ``email_opt_out``,
``sms_opt_out``, ``timezone``).

How it stays fast and memory-bounded at a million persons: persons are generated in fixed
blocks of ``BLOCK`` persons, each from its own random stream seeded with ``(seed, block)``.
Within a block everything is numpy/Arrow column arithmetic — no Python loop per event — and
JSON lines are spliced from string columns with Arrow's element-wise join. Blocks are grouped
into chunks of about ``chunk_size`` persons that are appended to the output files, so memory
holds one chunk at a time. Because random streams belong to blocks, not chunks, the data and
truth are the same whatever ``chunk_size`` is (Parquet row groups follow the chunks).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import Any, Final, TypeAlias

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from closedloop.demo import names

REFERENCE_TIME: Final = datetime(2026, 11, 20, tzinfo=UTC)
HISTORY_START: Final = datetime(2025, 5, 20, tzinfo=UTC)
WECHAT_MINIPROGRAM_APPID: Final = "wx_mini_7f3a"
WECHAT_OFFICIAL_APPID: Final = "wx_oa_91c2"

SOURCES: Final = ("web", "app", "miniprogram", "official_account", "ecommerce", "callcenter")
WEB, APP, MINI, OA, ECOM, CALL = range(6)
ID_TYPES: Final = (
    "phone",
    "email",
    "member_id",
    "anonymous_id",
    "device_id",
    "wechat_openid",
    "wechat_unionid",
)
PHONE, EMAIL, MEMBER, ANON, DEVICE, OPENID, UNIONID = range(7)
IDENTIFY, TRACK, PAGE, SCREEN = range(4)

BLOCK: Final = 1_000  # persons per random stream; a chunk is a whole number of blocks
LINES_PER_PART: Final = 1_000_000
MAX_PERSONS: Final = 10_000_000  # member-id and phone bijections stay collision-free below this

DAY_MS: Final = 86_400_000
HOUR_MS: Final = 3_600_000
H0_MS: Final = int(HISTORY_START.timestamp() * 1000)
REF_MS: Final = int(REFERENCE_TIME.timestamp() * 1000)
HISTORY_DAYS: Final = (REF_MS - H0_MS) // DAY_MS

I64: TypeAlias = npt.NDArray[np.int64]
F64: TypeAlias = npt.NDArray[np.float64]
Bool: TypeAlias = npt.NDArray[np.bool_]
STR: Final = pa.string()
TS: Final = pa.timestamp("ms", tz="UTC")


@dataclass(frozen=True)
class GenerationSummary:
    persons: int
    messages: int
    order_rows: int
    crm_rows: int
    reference_time: datetime
    out: Path


# ---------------------------------------------------------------------------------------------
# String columns: the few Arrow idioms every builder uses.
# ---------------------------------------------------------------------------------------------


def cat(*parts: Any) -> Any:
    """Join string columns and literals row by row; a null in any part makes the row null.

    Null propagation is the point: ``opt`` turns it into "leave this JSON member out".
    """
    return pc.binary_join_element_wise(*parts, "")


def opt(*parts: Any) -> Any:
    """Like ``cat``, but rows with a null part become "" — an optional JSON member."""
    return cat(*parts).fill_null("")


def pick(pool: Any, index: npt.ArrayLike) -> Any:
    """``pool[index]`` as an Arrow string column (``pool`` may be a sequence with ``None``)."""
    arr = pool if isinstance(pool, pa.Array) else pa.array(list(pool), STR)
    return arr.take(pa.array(np.asarray(index, dtype=np.int64)))


def const(value: str, n: int) -> Any:
    """A string column repeating ``value``."""
    return pick([value], np.zeros(n, dtype=np.int64))


def num(values: npt.ArrayLike) -> Any:
    """Integers as decimal text."""
    return pc.cast(pa.array(np.asarray(values)), STR)


def keep(column: Any, mask: npt.ArrayLike) -> Any:
    """``column`` where ``mask`` holds, null elsewhere."""
    return pc.if_else(pa.array(np.asarray(mask, dtype=np.bool_)), column, pa.scalar(None, STR))


def either(mask: npt.ArrayLike, yes: Any, no: Any) -> Any:
    """Row-wise ``yes if mask else no`` over string columns."""
    return pc.if_else(pa.array(np.asarray(mask, dtype=np.bool_)), yes, no)


def nulls(n: int) -> Any:
    return pa.nulls(n, STR)


def present(column: Any) -> Bool:
    """Which rows of a string column are not null."""
    return np.asarray(pc.is_valid(column).to_numpy(zero_copy_only=False), dtype=np.bool_)


def money(cents: npt.ArrayLike) -> Any:
    """Cents as a decimal amount with two places ("27.90"), exact in JSON and CSV."""
    c = np.asarray(cents, dtype=np.int64)
    return cat(num(c // 100), ".", pc.utf8_lpad(num(c % 100), 2, "0"))


def json_text(column: Any) -> Any:
    """Escape text that comes from outside the generator for use inside a JSON string."""
    return pc.replace_substring(pc.replace_substring(column, "\\", "\\\\"), '"', '\\"')


_HEX: Final = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_B64: Final = np.frombuffer(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", dtype=np.uint8
)
_UUID_POS: Final = np.array([i for i in range(36) if i not in (8, 13, 18, 23)])


def _text_rows(chars: npt.NDArray[np.uint8]) -> Any:
    """Rows of an (n, width) byte matrix as a string column, without a Python loop."""
    n, width = chars.shape
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    data = np.ascontiguousarray(chars).tobytes()
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))


def random_text(rng: np.random.Generator, n: int, width: int, alphabet: Any = _HEX) -> Any:
    """``n`` random strings of ``width`` characters from ``alphabet``."""
    return _text_rows(alphabet[rng.integers(0, len(alphabet), (n, width))])


def uuid4s(rng: np.random.Generator, n: int) -> Any:
    """``n`` version-4 UUID strings drawn from ``rng`` (so they are reproducible)."""
    nibbles = rng.integers(0, 16, (n, 32))
    nibbles[:, 12] = 4
    nibbles[:, 16] = 8 + (nibbles[:, 16] & 3)
    chars = np.full((n, 36), ord("-"), dtype=np.uint8)
    chars[:, _UUID_POS] = _HEX[nibbles]
    return _text_rows(chars)


_EPOCH_DAY_1900: Final = int(np.datetime64("1900-01-01", "D").astype(np.int64))


@cache
def _calendar() -> tuple[Any, Any, Any]:
    """Lookup columns for fast ISO formatting: dates since 1900, two- and three-digit numbers."""
    days = np.arange(np.datetime64("1900-01-01"), np.datetime64("2101-01-01"))
    dates = pa.array(np.datetime_as_string(days, unit="D").tolist(), STR)
    two = pa.array([f"{i:02d}" for i in range(60)], STR)
    three = pa.array([f"{i:03d}" for i in range(1000)], STR)
    return dates, two, three


def date_text(epoch_days: npt.ArrayLike) -> Any:
    """Epoch days as ``YYYY-MM-DD``."""
    return pick(_calendar()[0], np.asarray(epoch_days, dtype=np.int64) - _EPOCH_DAY_1900)


def iso(ms: npt.ArrayLike, *, millis: bool = True) -> Any:
    """Epoch milliseconds as ISO 8601 UTC ending in ``Z``, by table lookups (fast)."""
    _, two, three = _calendar()
    day, rest = np.divmod(np.asarray(ms, dtype=np.int64), DAY_MS)
    clock = [pick(two, rest // HOUR_MS), ":", pick(two, rest // 60_000 % 60), ":"]
    clock.append(pick(two, rest // 1000 % 60))
    if millis:
        clock += [".", pick(three, rest % 1000)]
    return cat(date_text(day), "T", *clock, "Z")


def iso_text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def column_strings(table: pa.Table, name: str) -> Any:
    return table.column(name).combine_chunks().cast(STR)


# ---------------------------------------------------------------------------------------------
# Phones and emails: canonical values and the messy ways people type them.
# ---------------------------------------------------------------------------------------------

_PHONE_FORMAT_P: Final = np.array([0.35, 0.12, 0.13, 0.08, 0.08, 0.12, 0.05, 0.07])
_EMAIL_FORMAT_P: Final = np.array([0.65, 0.12, 0.10, 0.05, 0.08])


def phone_raw(rng: np.random.Generator, digits: Any) -> Any:
    """11-digit national numbers as a person or clerk types them (``+86 138 1234 5678`` …)."""
    a = pc.utf8_slice_codeunits(digits, 0, 3)
    b = pc.utf8_slice_codeunits(digits, 3, 7)
    c = pc.utf8_slice_codeunits(digits, 7, 11)
    variants = [
        digits,
        cat("+86 ", a, " ", b, " ", c),
        cat(a, "-", b, "-", c),
        cat("0086 ", digits),
        cat("+86-", a, "-", b, "-", c),
        cat("+86", digits),
        cat(" ", digits, " "),
        cat(a, " ", b, " ", c),
    ]
    choice = rng.choice(len(variants), len(digits), p=_PHONE_FORMAT_P).astype(np.int8)
    return pc.choose(pa.array(choice), *variants)


def phone_e164(digits: Any) -> Any:
    """What ``phonenumbers`` makes of a Chinese mobile number in E.164."""
    return cat("+86", digits)


def email_raw(rng: np.random.Generator, canonical: Any) -> Any:
    """Lower-case addresses as typed: capitalised, shouted, title-cased, padded with spaces."""
    variants = [
        canonical,
        pc.utf8_capitalize(canonical),
        cat("  ", canonical, " "),
        pc.utf8_upper(canonical),
        pc.utf8_title(canonical),
    ]
    choice = rng.choice(len(variants), len(canonical), p=_EMAIL_FORMAT_P).astype(np.int8)
    return pc.choose(pa.array(choice), *variants)


def junk_phones(rng: np.random.Generator, k: int) -> tuple[Any, Any]:
    """Raw junk phones ("0", "13800000000") and the values the pipeline computes for them.

    "0" does not parse as a phone number; its value is the stripped raw text.
    """
    which = rng.integers(0, len(names.JUNK_PHONES), k)
    values = [v if len(v) < 11 else "+86" + v for v in names.JUNK_PHONES]
    return pick(names.JUNK_PHONES, which), pick(values, which)


# ---------------------------------------------------------------------------------------------
# Catalogue, stores and the brand's calendar.
# ---------------------------------------------------------------------------------------------

CATEGORY_NAMES: Final = tuple(c for c, _ in names.CATEGORIES)
PRODUCT_CATEGORY: Final = np.repeat(np.arange(len(CATEGORY_NAMES)), names.PRODUCTS_PER_CATEGORY)
PRODUCT_IDS: Final = tuple(
    f"{names.PRODUCT_PREFIX[c]}{j + 1:03d}"
    for c in range(len(CATEGORY_NAMES))
    for j in range(names.PRODUCTS_PER_CATEGORY)
)


def _price_cents() -> I64:
    """Prices spread over each category's range, ending in .90 as shop prices do."""
    step = np.arange(names.PRODUCTS_PER_CATEGORY) / (names.PRODUCTS_PER_CATEGORY - 1)
    prices = [np.round(lo + (hi - lo) * step) * 100 - 10 for lo, hi in names.PRICE_RANGES]
    return np.concatenate(prices).astype(np.int64)


PRICE_CENTS: Final = _price_cents()
PRODUCT_JSON: Final = tuple(
    f'"product_id":"{pid}","category":"{CATEGORY_NAMES[PRODUCT_CATEGORY[i]]}",'
    f'"price":{PRICE_CENTS[i] // 100}.{PRICE_CENTS[i] % 100:02d}'
    for i, pid in enumerate(PRODUCT_IDS)
)

CITY_NAMES: Final = tuple(c for c, _, _, _ in names.CITIES)
_STORES_PER_CITY: Final = np.array([k for _, _, _, k in names.CITIES])
_FIRST_STORE: Final = np.concatenate([[0], np.cumsum(_STORES_PER_CITY)[:-1]])
STORE_IDS: Final = tuple(f"{code}-{j + 1:03d}" for _, _, code, k in names.CITIES for j in range(k))
LAZY_CLERK_STORE: Final = np.arange(len(STORE_IDS)) % 6 == 2
CLERK_DIGITS: Final = tuple(
    str(names.CLERK_PHONE_PREFIX * 10**8 + (s * 7_340_033 + 1_234_567) % 10**8)
    for s in range(len(STORE_IDS))
)
TZ_NAMES: Final = tuple(z for z, _, _ in names.TIMEZONES)
TZ_OFFSET_H: Final = np.array([h for _, _, h in names.TIMEZONES], dtype=np.int64)
APPIDS: Final = (None, None, WECHAT_MINIPROGRAM_APPID, WECHAT_OFFICIAL_APPID, None, None)
USER_AGENTS: Final = (names.WEB_USER_AGENTS, names.APP_USER_AGENTS, names.WECHAT_USER_AGENTS)

# Local hour of day when people browse: lunch break and evenings, little at night.
_HOUR_W: Final = np.array(
    [3, 1.5, 0.8, 0.5, 0.5, 1, 3, 8, 12, 13, 14, 16, 22, 20, 15, 14, 15, 16, 18, 23, 28, 30, 24, 12]
)
_HOUR_CDF: Final = np.cumsum(_HOUR_W) / _HOUR_W.sum()
BROWSE_BOOST: Final = 1.0  # how much promotions lift traffic …
ORDER_BOOST: Final = 2.5  # … and orders


def probabilities(pairs: Sequence[tuple[Any, ...]], column: int = 1) -> F64:
    w = np.array([row[column] for row in pairs], dtype=np.float64)
    return np.asarray(w / w.sum(), dtype=np.float64)


def month_day(ms: npt.ArrayLike) -> tuple[I64, I64]:
    """Calendar month (1–12) and day of month of epoch milliseconds (UTC)."""
    days = (np.asarray(ms, dtype=np.int64) // DAY_MS).astype("datetime64[D]")
    months = days.astype("datetime64[M]")
    month = months.astype(np.int64) % 12 + 1
    dom = (days - months.astype("datetime64[D]")).astype(np.int64) + 1
    return month, dom


def promo_season(ms: npt.ArrayLike) -> I64:
    """0 on ordinary days, 1 during 618 (June 1–18), 2 around Double 11 (Oct 24 – Nov 11)."""
    month, dom = month_day(ms)
    in618 = (month == 6) & (dom <= 18)
    in11 = ((month == 10) & (dom >= 24)) | ((month == 11) & (dom <= 11))
    return np.asarray(np.where(in618, 1, np.where(in11, 2, 0)), dtype=np.int64)


def _day_weights(boost: float) -> F64:
    """Relative activity per history day: growth, weekends, 618, Double 11, Spring Festival."""
    days = np.arange(HISTORY_DAYS, dtype=np.int64)
    ms = H0_MS + days * DAY_MS
    month, dom = month_day(ms)
    season = promo_season(ms)
    weekend = (ms // DAY_MS + 3) % 7 >= 5  # 1970-01-01 was a Thursday
    ramp618 = 0.4 + 0.6 * dom / 18
    ramp11 = 0.5 + np.where(month == 10, (dom - 23) / 19, (dom + 8) / 19)
    peak = ((month == 6) & (dom == 18)) | ((month == 11) & (dom == 11))
    spring = np.abs(ms - int(np.datetime64("2026-02-17", "ms").astype(np.int64))) <= 5 * DAY_MS
    w = (0.85 + 0.3 * days / HISTORY_DAYS) * np.where(weekend, 1.2, 1.0)
    w = w * np.select([season == 1, season == 2], [1 + boost * ramp618, 1 + boost * ramp11], 1.0)
    return np.asarray(w * np.where(peak, 1.8, 1.0) * np.where(spring, 0.6, 1.0), dtype=np.float64)


@cache
def _day_cdf(boost: float) -> F64:
    return np.concatenate([[0.0], np.cumsum(_day_weights(boost))])


def draw_days(rng: np.random.Generator, lo: F64, hi: F64, boost: float) -> F64:
    """Days since HISTORY_START in ``[lo, hi)`` per row, following the seasonal weights."""
    cdf = _day_cdf(boost)
    grid = np.arange(len(cdf), dtype=np.float64)
    c_lo, c_hi = np.interp(lo, grid, cdf), np.interp(hi, grid, cdf)
    u = c_lo + rng.random(len(lo)) * (c_hi - c_lo)
    return np.asarray(np.interp(u, cdf, grid), dtype=np.float64)


def clock_ms(
    rng: np.random.Generator, base_ms: int, day: F64, tz_hours: I64, *, store_hours: bool = False
) -> I64:
    """A moment on day ``day`` after ``base_ms`` at a plausible local hour, in epoch ms."""
    n = len(day)
    if store_hours:
        local = 10 * HOUR_MS + rng.integers(0, 23 * HOUR_MS // 2, n)
    else:
        local = np.searchsorted(_HOUR_CDF, rng.random(n), side="right") * HOUR_MS
        local = local + rng.integers(0, HOUR_MS, n)
    ms = base_ms + np.floor(day).astype(np.int64) * DAY_MS + local - tz_hours * HOUR_MS
    return np.asarray(ms, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Messages as columns, and how they become JSON lines and truth rows.
# ---------------------------------------------------------------------------------------------


@dataclass
class Frame:
    """A batch of Segment messages as columns, one row per message, before serialisation.

    Identifiers are kept as structured columns (raw and canonical) so one function turns any
    frame into JSON lines and another into ground-truth identifier rows; the event builders
    never repeat that knowledge.
    """

    source: I64
    ms: I64
    person: I64  # index of the person within its block (or within the world)
    mtype: I64
    label: Any  # event name (track) or page/screen name; null for identify
    props: Any  # JSON object text, or null
    user_id: Any
    anon_id: Any
    anon_junk: Bool
    device_id: Any
    openid: Any
    unionid: Any
    phone_raw: Any  # identify traits, or context.traits on other calls
    phone_value: Any
    phone_junk: Bool
    email_raw: Any
    email_value: Any
    email_junk: Bool
    profile: Any  # further identify traits: a JSON fragment without braces
    ip: Any
    ua: Any
    timezone: Any  # context.timezone (IANA name), or null
    consent: Any  # context.consent.categoryPreferences as JSON object text, or null

    @classmethod
    def make(cls, n: int, **columns: Any) -> Frame:
        """A frame of ``n`` rows; string columns not given are null, flags false."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in columns:
                values[f.name] = columns[f.name]
            elif f.name.endswith("_junk"):
                values[f.name] = np.zeros(n, dtype=np.bool_)
            else:
                values[f.name] = nulls(n)
        return cls(**values)

    def __len__(self) -> int:
        return len(self.ms)

    def take(self, index: npt.ArrayLike) -> Frame:
        idx = np.asarray(index, dtype=np.int64)
        arrow_idx = pa.array(idx)
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v[idx] if isinstance(v, np.ndarray) else v.take(arrow_idx)
        return Frame(**out)

    @staticmethod
    def concat(frames: Sequence[Frame]) -> Frame:
        out: dict[str, Any] = {}
        for f in fields(Frame):
            cols = [getattr(fr, f.name) for fr in frames]
            if isinstance(cols[0], np.ndarray):
                out[f.name] = np.concatenate(cols)
            else:
                out[f.name] = pa.concat_arrays([c.cast(STR) for c in cols])
        return Frame(**out)


def as_call(base: Frame, ms: I64, mtype: int, label: str | None, props: Any) -> Frame:
    """The rows of ``base`` (identity and context) as a new call of type ``mtype``."""
    n = len(ms)
    return replace(
        base,
        ms=ms,
        mtype=np.full(n, mtype),
        label=nulls(n) if label is None else const(label, n),
        props=nulls(n) if props is None else props,
    )


_TYPE_NAMES: Final = ("identify", "track", "page", "screen")
_LABEL_KEYS: Final = (',"event":"', ',"event":"', ',"name":"', ',"name":"')
_OPENID_TAIL: Final = '","type":"wechat_openid","collection":"'
_UNIONID_TAIL: Final = '","type":"wechat_unionid","collection":"wechat","encoding":"none"}'


def _traits_json(f: Frame) -> tuple[Any, Any]:
    """The ``traits`` member for identify calls and the ``context.traits`` member for others."""
    body = cat(
        opt(',"phone":"', f.phone_raw, '"'),
        opt(',"email":"', f.email_raw, '"'),
        opt(",", f.profile),
    )
    nonempty = pc.utf8_length(body).to_numpy() > 0
    member = either(nonempty, cat(',"traits":{', pc.utf8_slice_codeunits(body, 1), "}"), "")
    identify = f.mtype == IDENTIFY
    return either(identify, member, ""), either(identify, "", member)


def _context_json(f: Frame, context_traits: Any) -> Any:
    openid = cat('{"id":"', f.openid, _OPENID_TAIL, pick(APPIDS, f.source), '","encoding":"none"}')
    external = opt(',"externalIds":[', openid, opt(',{"id":"', f.unionid, _UNIONID_TAIL), "]")
    device = opt(',"device":{"id":"', f.device_id, '"}')
    return cat(
        ',"context":{"ip":"',
        f.ip,
        '","userAgent":"',
        f.ua,
        '"',
        opt(',"timezone":"', f.timezone, '"'),
        device,
        external,
        opt(',"consent":{"categoryPreferences":', f.consent, "}"),
        context_traits,
        "}",
    )


def message_lines(f: Frame, message_ids: Any) -> Any:
    """Serialise a frame into Segment JSON lines, each ending in a newline."""
    traits, context_traits = _traits_json(f)
    return cat(
        '{"messageId":"',
        message_ids,
        '","type":"',
        pick(_TYPE_NAMES, f.mtype),
        '"',
        opt(',"userId":"', f.user_id, '"'),
        opt(',"anonymousId":"', f.anon_id, '"'),
        ',"timestamp":"',
        iso(f.ms),
        '"',
        opt(pick(_LABEL_KEYS, f.mtype), f.label, '"'),
        opt(',"properties":', f.props),
        traits,
        _context_json(f, context_traits),
        "}\n",
    )


def id_rows(person: I64, id_type: int, raw: Any, value: Any, junk: Bool | None = None) -> pa.Table:
    """Ground-truth identifier rows where ``raw`` is present."""
    n = len(person)
    table = pa.table(
        {
            "person": pa.array(np.asarray(person, dtype=np.int64)),
            "id_type": pa.array(np.full(n, id_type, dtype=np.int8)),
            "raw_value": raw,
            "value": value,
            "junk": pa.array(np.zeros(n, np.bool_) if junk is None else junk),
        }
    )
    return table.filter(pc.is_valid(raw))


def frame_id_rows(f: Frame) -> list[pa.Table]:
    """Every identifier a frame shows, with the canonical value the pipeline will compute."""
    return [
        id_rows(f.person, MEMBER, f.user_id, f.user_id),
        id_rows(f.person, ANON, f.anon_id, f.anon_id, f.anon_junk),
        id_rows(f.person, DEVICE, f.device_id, f.device_id),
        id_rows(f.person, OPENID, f.openid, cat(pick(APPIDS, f.source), ":", f.openid)),
        id_rows(f.person, UNIONID, f.unionid, f.unionid),
        id_rows(f.person, PHONE, f.phone_raw, f.phone_value, f.phone_junk),
        id_rows(f.person, EMAIL, f.email_raw, f.email_value, f.email_junk),
    ]


def sort_frame(f: Frame) -> Frame:
    """Source-major, then time order; ties keep construction order (so output is stable)."""
    return f.take(np.lexsort((np.arange(len(f)), f.ms, f.source)))


def person_ids(index: npt.ArrayLike) -> Any:
    """Truth person ids ``P00000001`` … from global person indices."""
    return cat("P", pc.utf8_lpad(num(np.asarray(index, dtype=np.int64) + 1), 8, "0"))


# ---------------------------------------------------------------------------------------------
# Persons: the behaviour model.
# ---------------------------------------------------------------------------------------------

ACTIVE, LAPSED, CHURNED = range(3)
LIFECYCLES: Final = ("active", "lapsed", "churned")
_SURNAMES: Final = tuple(s for s, _ in names.SURNAMES)
_GIVEN: Final = tuple(g for g, _ in names.GIVEN_FEMALE) + tuple(g for g, _ in names.GIVEN_MALE)
_TIER_CUTS: Final = np.array([0.135, 1.028, 1.886])  # 55% / 28% / 13% / 4% of N(0, 1.077)


@dataclass
class Persons:
    """One block of persons: latent behaviour and the true identity attributes."""

    g: I64  # global person index
    female: Bool
    surname: I64
    given: I64  # index into _GIVEN
    email_style: I64
    birthday: I64  # epoch days
    city: I64
    tz: I64
    member: Bool
    lifecycle: I64
    first: F64  # activity window, days since HISTORY_START
    last: F64
    category: I64
    activity: F64  # expected browsing events over the window
    order_rate: F64  # orders per day while active (0 for never-buyers)
    buyer: Bool
    tier: I64  # -1 for non-members
    store_shopper: Bool
    home_store: I64
    coupon: F64  # coupon affinity in [0, 1]
    touch_cdf: F64  # (n, 4) cumulative preference: web, app, miniprogram, official account
    reg_ms: I64  # registration time of members, -1 otherwise
    in_store_reg: Bool
    household: I64  # family-tablet household id, -1 for none
    junk_email: Bool  # registers with test@test.com
    alt_email: Bool  # has a second address
    effect: F64  # true win-back uplift on purchase probability
    current_rate: F64  # purchase rate per day at REFERENCE_TIME

    @property
    def n(self) -> int:
        return len(self.g)

    @property
    def tz_hours(self) -> I64:
        return np.asarray(TZ_OFFSET_H[self.tz], dtype=np.int64)


def _draw_names(rng: np.random.Generator, g: I64) -> tuple[Bool, I64, I64, I64]:
    """Gender, surname, given name and email style; some neighbours are namesakes on purpose.

    Persons 6k and 6k+1 share the number in their email user name, so a namesake pair has the
    same user name at two providers while being two different people.
    """
    n = len(g)
    female = rng.random(n) < 0.66
    surname = rng.choice(len(_SURNAMES), n, p=probabilities(names.SURNAMES))
    given_f = rng.choice(len(names.GIVEN_FEMALE), n, p=probabilities(names.GIVEN_FEMALE))
    given_m = rng.choice(len(names.GIVEN_MALE), n, p=probabilities(names.GIVEN_MALE))
    given = np.where(female, given_f, len(names.GIVEN_FEMALE) + given_m)
    style = rng.choice(5, n, p=[0.2, 0.3, 0.25, 0.15, 0.1])
    copy = np.flatnonzero((g % 6 == 1) & (np.arange(n) >= 1) & (rng.random(n) < 0.08))
    for arr in (female, surname, given, style):
        arr[copy] = arr[copy - 1]
    return female, surname, given, style


def _draw_window(rng: np.random.Generator, n: int) -> tuple[I64, F64, F64]:
    """Lifecycle and activity window: active until now, lapsed 60–150 days, churned 180+ days."""
    lifecycle = rng.choice(3, n, p=[0.45, 0.30, 0.25])
    d = float(HISTORY_DAYS)
    last = np.select(
        [lifecycle == ACTIVE, lifecycle == LAPSED],
        [d - rng.uniform(0, 7, n), d - rng.uniform(60, 150, n)],
        d - rng.uniform(180, 480, n),
    )
    first = np.where(rng.random(n) < 0.5, 0.0, rng.uniform(0, d - 20, n))
    short = last - first < 14
    first = np.where(short, np.maximum(0.0, last - rng.uniform(20, 200, n)), first)
    return lifecycle, first, last


def _draw_value(
    rng: np.random.Generator, member: Bool, category: I64
) -> tuple[F64, F64, Bool, I64]:
    """Activity, purchase rate, buyer flag and tier, driven by one latent customer value."""
    n = len(member)
    z = rng.standard_normal(n)
    mix = 0.9 * (0.7 * z + 0.71 * rng.standard_normal(n))
    activity = np.clip(np.exp(np.log(14.0) - 0.4 + mix), 1, 600)
    tea = category < names.TEA_CATEGORIES
    rate = 0.0045 * np.exp(0.6 * (0.8 * z + 0.6 * rng.standard_normal(n)))
    rate = rate * np.where(tea, 1.4, 0.6)
    buyer = rng.random(n) < np.where(member, 0.93, 0.75)
    tier = np.searchsorted(_TIER_CUTS, z + 0.4 * rng.standard_normal(n))
    return activity, np.where(buyer, rate, 0.0), buyer, np.where(member, tier, -1)


def _draw_registration(
    rng: np.random.Generator, member: Bool, first: F64, last: F64
) -> tuple[I64, Bool]:
    """Members joined before history (no Signed Up event) or early in their window."""
    n = len(member)
    before = (first == 0) & (rng.random(n) < 0.7)
    before_ms = H0_MS - rng.integers(1, 1800, n) * DAY_MS - rng.integers(0, DAY_MS, n)
    offset = rng.random(n) * np.minimum(14.0, last - first)
    during_ms = H0_MS + 60_000 + ((first + offset) * DAY_MS).astype(np.int64)
    reg = np.where(member, np.where(before, before_ms, during_ms), -1)
    return reg.astype(np.int64), member & (rng.random(n) < 0.25)


def _draw_effect(rng: np.random.Generator, lifecycle: I64, coupon: F64) -> F64:
    """True additive uplift if messaged: 0.04–0.15, larger for lapsed bargain-hunters, 0 for some."""
    n = len(lifecycle)
    by_stage = np.select([lifecycle == LAPSED, lifecycle == CHURNED], [0.03, 0.01], 0.0)
    effect = np.clip(0.04 + 0.06 * coupon + by_stage + rng.uniform(0, 0.02, n), 0.0, 0.15)
    return np.asarray(np.where(rng.random(n) < 0.05, 0.0, effect), dtype=np.float64)


def _draw_households(rng: np.random.Generator, n: int, block: int) -> I64:
    """About 1% of persons share a family tablet with one to three others of their block."""
    household = np.full(n, -1, dtype=np.int64)
    sizes = rng.integers(2, 5, max(1, round(n * 0.01 / 3)))
    sizes = sizes[np.cumsum(sizes) <= n]
    chosen = rng.choice(n, int(sizes.sum()), replace=False)
    household[chosen] = block * BLOCK + np.repeat(np.arange(len(sizes)), sizes)
    return household


def household_head(household: I64) -> I64:
    """For each person, the index of the first member of their household (or themselves)."""
    head = np.arange(len(household))
    members = np.flatnonzero(household >= 0)
    if len(members):
        _, first, inverse = np.unique(household[members], return_index=True, return_inverse=True)
        head[members] = members[first][inverse]
    return head


def draw_persons(rng: np.random.Generator, block: int, n: int) -> Persons:
    """Draw one block of persons (global indices ``block * BLOCK`` onwards)."""
    g = block * BLOCK + np.arange(n, dtype=np.int64)
    female, surname, given, style = _draw_names(rng, g)
    year = np.clip(np.round(rng.normal(1994, 7, n)), 1965, 2007).astype(np.int64) - 1970
    jan1 = rng.random(n) < 0.12  # forms default to January 1st, so birthdays cluster
    birthday = year.astype("datetime64[Y]").astype("datetime64[D]").astype(np.int64)
    birthday = birthday + np.where(jan1, 0, rng.integers(0, 365, n))
    city = rng.choice(len(CITY_NAMES), n, p=probabilities(names.CITIES))
    tz = rng.choice(len(TZ_NAMES), n, p=probabilities(names.TIMEZONES))
    member = rng.random(n) < 0.70
    lifecycle, first, last = _draw_window(rng, n)
    category = rng.choice(len(CATEGORY_NAMES), n, p=probabilities(names.CATEGORIES))
    activity, rate, buyer, tier = _draw_value(rng, member, category)
    store_shopper = rng.random(n) < np.where(category < names.TEA_CATEGORIES, 0.5, 0.3)
    store = _FIRST_STORE[city] + (rng.random(n) * _STORES_PER_CITY[city]).astype(np.int64)
    coupon = rng.beta(2.0, 4.0, n)
    touch = rng.dirichlet([0.9, 1.0, 1.4, 0.5], n)
    reg_ms, in_store = _draw_registration(rng, member, first, last)
    household = _draw_households(rng, n, block)
    head = household_head(household)  # a household shares a city, time zone and store
    decay = np.select([lifecycle == LAPSED, lifecycle == CHURNED], [0.15, 0.03], 1.0)
    return Persons(
        g=g,
        female=female,
        surname=surname,
        given=given,
        email_style=style,
        birthday=birthday,
        city=city[head],
        tz=tz[head],
        member=member,
        lifecycle=lifecycle,
        first=first,
        last=last,
        category=category,
        activity=activity,
        order_rate=rate,
        buyer=buyer,
        tier=tier,
        store_shopper=store_shopper,
        home_store=store[head],
        coupon=coupon,
        touch_cdf=np.cumsum(touch, axis=1),
        reg_ms=reg_ms,
        in_store_reg=in_store,
        household=household,
        junk_email=member & (rng.random(n) < 0.01),
        alt_email=(style > 0) & (rng.random(n) < 0.04),
        effect=_draw_effect(rng, lifecycle, coupon),
        current_rate=np.where(buyer, rate * decay, 0.0003),
    )


# ---------------------------------------------------------------------------------------------
# Identities: each person's accounts, devices and contacts.
# ---------------------------------------------------------------------------------------------


def member_ids(g: I64, *, duplicate: bool = False) -> Any:
    """Member numbers as a bijection of the person index: scattered-looking, never colliding.

    Second CRM registrations get numbers from a disjoint range.
    """
    if duplicate:
        number = (g * 27_644_437 + 7) % 40_000_000 + 60_000_000
    else:
        number = (g * 27_644_437 + 1_234_567) % 50_000_000 + 10_000_000
    return cat("M", num(number))


def _phone_digits(g: I64) -> Any:
    """Unique valid mobiles: a prefix from ``g mod P`` and a suffix from a bijection of ``g``.

    The suffix alone is unique below 10**8 persons, and it is 0 (which would mint the junk
    number 13800000000) only for g = 85,748,503, far above MAX_PERSONS.
    """
    prefixes = np.array(names.MOBILE_PREFIXES, dtype=np.int64)
    suffix = (g * 61_728_393 + 7_654_321) % 10**8
    return num(prefixes[g % len(prefixes)] * 10**8 + suffix)


def provider_index(p: Persons) -> I64:
    """Each person's email provider; QQ-number addresses are always at qq.com."""
    return np.asarray(np.where(p.email_style == 0, 0, p.g % 6), dtype=np.int64)


def _emails(p: Persons, surname: Any, given: Any) -> tuple[Any, Any]:
    """Canonical email and an optional second address, user names built from the name."""
    s, gv = pc.utf8_lower(surname), pc.utf8_lower(given)
    number = num(p.g // 6 + 1)
    users = [
        num((p.g * 198_491_329 + 12_345) % 900_000_000 + 100_000_000),  # a QQ number
        cat(s, ".", gv, number),
        cat(s, gv, number),
        cat(pc.utf8_slice_codeunits(gv, 0, 1), s, number),
        cat(gv, "_", s, number),
    ]
    user = pc.choose(pa.array(p.email_style.astype(np.int8)), *users)
    email = cat(user, "@", pick(names.PROVIDERS, provider_index(p)))
    alt = keep(cat(user, "@", pick(names.PROVIDERS, (p.g % 6 + 3) % 6)), p.alt_email)
    return email, alt


def ipv4(rng: np.random.Generator, first_octets: Sequence[int], n: int) -> Any:
    first = pick([str(o) for o in first_octets], rng.integers(0, len(first_octets), n))
    rest = [
        num(rng.integers(0, 256, n)),
        num(rng.integers(0, 256, n)),
        num(rng.integers(1, 255, n)),
    ]
    return cat(first, ".", rest[0], ".", rest[1], ".", rest[2])


def wechat_ids(rng: np.random.Generator, n: int) -> Any:
    """Openid/unionid-like strings: ``o`` and 27 URL-safe base64 characters."""
    return cat("o", random_text(rng, n, 27, _B64))


@dataclass
class Identities:
    """Identifier columns for one block, and pools that sessions index into."""

    name: Any
    member_id: Any  # n + 1 entries, the last null
    phone_digits: Any
    email: Any  # canonical
    alt_email: Any  # nullable
    home_ip: Any
    anon_pool: Any  # cookies 3n, installs 2n, mini installs n, OA openids n, tablets, junk 3, null
    device_pool: Any  # devices n, tablet devices, null
    openid_mini: Any
    unionid: Any  # nullable
    cookies: I64  # how many cookies each person goes through (1–3)
    installs: I64  # how many app installs (1–2)
    ua: I64  # (n, 3) user agent per platform: web, app, WeChat

    @property
    def n(self) -> int:
        return len(self.phone_digits)

    def anon_base(self, kind: str) -> int:
        n = self.n
        return {"cookie": 0, "install": 3 * n, "mini": 5 * n, "oa": 6 * n, "tablet": 7 * n}[kind]

    @property
    def openid_oa(self) -> Any:
        return self.anon_pool.slice(6 * self.n, self.n)


def draw_identities(rng: np.random.Generator, p: Persons) -> Identities:
    n = p.n
    surname, given = pick(_SURNAMES, p.surname), pick(_GIVEN, p.given)
    email, alt = _emails(p, surname, given)
    tablets = len(np.unique(p.household[p.household >= 0]))
    anon_pool = pa.concat_arrays(
        [
            uuid4s(rng, 3 * n),  # web cookies
            uuid4s(rng, 2 * n),  # app installs
            uuid4s(rng, n),  # mini-program installs
            wechat_ids(rng, n),  # the official account sends its openid as anonymousId
            uuid4s(rng, tablets),
            pa.array(list(names.JUNK_ANONYMOUS_IDS), STR),
            nulls(1),
        ]
    )
    home_ip = ipv4(rng, names.HOME_IP_OCTETS, n).take(pa.array(household_head(p.household)))
    devices = pa.concat_arrays([random_text(rng, n, 16), random_text(rng, tablets, 16), nulls(1)])
    return Identities(
        name=cat(surname, " ", given),
        member_id=pa.concat_arrays([keep(member_ids(p.g), p.member), nulls(1)]),
        phone_digits=_phone_digits(p.g),
        email=email,
        alt_email=alt,
        home_ip=home_ip,
        anon_pool=anon_pool,
        device_pool=devices,
        openid_mini=wechat_ids(rng, n),
        unionid=keep(wechat_ids(rng, n), rng.random(n) < 0.85),
        cookies=rng.integers(1, 4, n),
        installs=rng.integers(1, 3, n),
        ua=np.stack([rng.integers(0, len(pool), n) for pool in USER_AGENTS], axis=1),
    )


def tablet_index(p: Persons, person: I64) -> I64:
    """Index of each person's household tablet among the block's tablets."""
    homes = np.unique(p.household[p.household >= 0])
    return np.asarray(np.searchsorted(homes, p.household[person]), dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Sessions: a visit on one touchpoint, with the identifiers that touchpoint sees.
# ---------------------------------------------------------------------------------------------

_LOGIN_P: Final = np.array([0.6, 0.9, 0.85, 0.6])  # web, app, miniprogram, official account
_JUNK_ANON_RATE: Final = 0.004  # an SDK bug sends "undefined" and friends as anonymousId


@dataclass
class Sessions:
    person: I64
    source: I64
    ms: I64
    logged_in: Bool
    frame: Frame  # one row per session: the session's identity and context columns

    def __len__(self) -> int:
        return len(self.person)


def _anon_index(
    rng: np.random.Generator,
    p: Persons,
    ids: Identities,
    person: I64,
    source: I64,
    ms: I64,
    tablet: Bool,
) -> tuple[I64, Bool]:
    """Which anonymous id a session carries: later visits use later cookies and installs."""
    span = np.maximum(p.last[person] - p.first[person], 1e-9)
    frac = np.clip(((ms - H0_MS) / DAY_MS - p.first[person]) / span, 0.0, 0.999)
    cookie = np.minimum(ids.cookies[person] - 1, (frac * ids.cookies[person]).astype(np.int64))
    install = np.minimum(ids.installs[person] - 1, (frac * ids.installs[person]).astype(np.int64))
    null_slot = len(ids.anon_pool) - 1
    index = np.select(
        [source == WEB, source == APP, source == MINI, source == OA],
        [
            ids.anon_base("cookie") + person * 3 + cookie,
            ids.anon_base("install") + person * 2 + install,
            ids.anon_base("mini") + person,
            ids.anon_base("oa") + person,
        ],
        null_slot,
    )
    index[tablet] = ids.anon_base("tablet") + tablet_index(p, person[tablet])
    junk = ((source == WEB) | (source == APP)) & (rng.random(len(source)) < _JUNK_ANON_RATE)
    kinds = len(names.JUNK_ANONYMOUS_IDS)
    junk_slot = null_slot - kinds + rng.integers(0, kinds, len(source))
    return np.where(junk, junk_slot, index), junk


def _session_context(
    rng: np.random.Generator, ids: Identities, person: I64, source: I64
) -> tuple[Any, Any]:
    """IP and user agent: home broadband on the web, often a carrier address on phones."""
    k = len(person)
    mobile = (source != WEB) & (rng.random(k) < 0.45)
    ip = either(mobile, ipv4(rng, names.MOBILE_IP_OCTETS, k), ids.home_ip.take(pa.array(person)))
    platform = np.select([source == WEB, source == APP], [0, 1], 2)
    offsets = np.cumsum([0] + [len(pool) for pool in USER_AGENTS])
    agents = [ua for pool in USER_AGENTS for ua in pool]
    return ip, pick(agents, offsets[platform] + ids.ua[person, platform])


def make_sessions(
    rng: np.random.Generator,
    p: Persons,
    ids: Identities,
    person: I64,
    source: I64,
    ms: I64,
    *,
    tablet: Bool | None = None,
    login_p: float | None = None,
) -> Sessions:
    """Sessions with identity columns: who is logged in, which cookie, device and openid."""
    k, n = len(person), p.n
    tablet = np.zeros(k, np.bool_) if tablet is None else tablet
    registered = p.member[person] & (ms >= p.reg_ms[person])
    logged_in = registered & (rng.random(k) < (_LOGIN_P[source] if login_p is None else login_p))
    anon, junk = _anon_index(rng, p, ids, person, source, ms, tablet)
    ip, ua = _session_context(rng, ids, person, source)
    device = np.where(source == APP, person, len(ids.device_pool) - 1)
    device[tablet] = n + tablet_index(p, person[tablet])
    idx = pa.array(person)
    openid = either(source == MINI, ids.openid_mini.take(idx), ids.openid_oa.take(idx))
    wechat = (source == MINI) | (source == OA)
    frame = Frame.make(
        k,
        source=source,
        ms=ms,
        person=person,
        mtype=np.full(k, TRACK),
        user_id=pick(ids.member_id, np.where(logged_in, person, n)),
        anon_id=pick(ids.anon_pool, anon),
        anon_junk=junk,
        device_id=pick(ids.device_pool, device),
        openid=keep(openid, wechat),
        unionid=keep(ids.unionid.take(idx), wechat),
        ip=ip,
        ua=ua,
    )
    return Sessions(person, source, ms, logged_in, frame)


def choose_source(rng: np.random.Generator, cdf: F64) -> I64:
    """One touchpoint per row from per-row cumulative preferences."""
    u = rng.random(len(cdf)) * cdf[:, -1]
    return np.asarray((u[:, None] > cdf).sum(axis=1), dtype=np.int64)


def _events_in_sessions(rng: np.random.Generator, s: Sessions, counts: I64) -> tuple[I64, I64, I64]:
    """Expand sessions into events: session row, position in the session, time (ms)."""
    row = np.repeat(np.arange(len(counts)), counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    pos = np.arange(len(row)) - starts[row]
    gap = np.where(pos == 0, 0, rng.exponential(45_000, len(row)).astype(np.int64))
    cum = np.cumsum(gap)
    ms = s.ms[row] + cum - cum[starts[row]]
    return row, pos, np.minimum(ms, REF_MS - 1)


# ---------------------------------------------------------------------------------------------
# Event builders.
# ---------------------------------------------------------------------------------------------

K_PAGE, K_VIEW, K_SEARCH, K_WISH, K_ADD, K_SHARE, K_REFER, K_STORE = range(8)
_KIND_CDF: Final = np.cumsum(
    [
        [0.44, 0.26, 0.12, 0.05, 0.09, 0.02, 0.02, 0.0],  # web
        [0.40, 0.26, 0.10, 0.06, 0.09, 0.03, 0.02, 0.04],  # app
        [0.40, 0.26, 0.08, 0.05, 0.10, 0.07, 0.04, 0.0],  # miniprogram
        [0.80, 0.14, 0.0, 0.0, 0.0, 0.06, 0.0, 0.0],  # official account
    ],
    axis=1,
)
_EVENT_NAMES: Final = {
    K_VIEW: "Product Viewed",
    K_SEARCH: "Products Searched",
    K_WISH: "Product Added to Wishlist",
    K_ADD: "Product Added",
    K_SHARE: "Product Shared",
    K_REFER: "Referral Sent",
    K_STORE: "Store Visited",
}


def pick_products(rng: np.random.Generator, category: I64) -> I64:
    """Products, three in four from the person's favourite category."""
    k = len(category)
    chosen = np.where(rng.random(k) < 0.75, category, rng.integers(0, len(CATEGORY_NAMES), k))
    slot = rng.integers(0, names.PRODUCTS_PER_CATEGORY, k)
    return np.asarray(chosen * names.PRODUCTS_PER_CATEGORY + slot, dtype=np.int64)


def page_call(rng: np.random.Generator, base: Frame, ms: I64) -> Frame:
    """Page views (screens in the app; articles in the official account)."""
    k = len(base)
    page = rng.integers(0, len(names.PAGES), k)
    article = base.source == OA
    label = either(article, "Article", pick([nm for nm, _ in names.PAGES], page))
    path = pick([path for _, path in names.PAGES], page)
    path = either(article, cat("/articles/", num(rng.integers(1, 400, k))), path)
    call = as_call(base, ms, PAGE, None, cat('{"path":"', path, '"}'))
    call.mtype = np.where(base.source == APP, SCREEN, PAGE)
    call.label = label
    return call


def _kind_props(
    rng: np.random.Generator, kind: int, p: Persons, ids: Identities, person: I64
) -> Any:
    """Properties JSON of a browsing track event."""
    k = len(person)
    if kind == K_SEARCH:
        query = pick(names.SEARCH_QUERIES, rng.integers(0, len(names.SEARCH_QUERIES), k))
        return cat('{"query":"', query, '"}')
    if kind == K_STORE:
        return cat('{"store_id":"', pick(STORE_IDS, p.home_store[person]), '"}')
    if kind == K_REFER:
        members = np.flatnonzero(p.member)
        friend = members[rng.integers(0, len(members), k)]
        referred = ids.member_id.take(pa.array(friend))
        return cat('{"referred_member_id":"', referred, '","channel":"wechat"}')
    product = pick(PRODUCT_JSON, pick_products(rng, p.category[person]))
    if kind == K_ADD:
        return cat("{", product, ',"quantity":', num(rng.integers(1, 3, k)), "}")
    if kind == K_SHARE:
        target = pick(names.SHARE_TARGETS, rng.integers(0, len(names.SHARE_TARGETS), k))
        return cat("{", product, ',"shared_to":"', target, '"}')
    return cat("{", product, "}")


def _browse_kinds(rng: np.random.Generator, p: Persons, s: Sessions, row: I64, pos: I64) -> I64:
    """What each event is; a session opens with a page view, only members refer friends."""
    kind = (rng.random(len(row))[:, None] > _KIND_CDF[s.source[row]]).sum(axis=1)
    kind = np.minimum(kind, K_STORE)
    invalid = (
        (pos == 0)
        | ((kind == K_REFER) & ~s.logged_in[row])
        | ((kind == K_STORE) & ~p.store_shopper[s.person[row]])
    )
    return np.asarray(np.where(invalid, K_PAGE, kind), dtype=np.int64)


def browse_frames(
    rng: np.random.Generator, p: Persons, ids: Identities, s: Sessions, mean_extra: float
) -> list[Frame]:
    """Page/screen views and product interactions within sessions."""
    row, pos, ms = _events_in_sessions(rng, s, 1 + rng.poisson(mean_extra, len(s)))
    kinds = _browse_kinds(rng, p, s, row, pos)
    frames = []
    for kind in range(K_STORE + 1):
        sel = np.flatnonzero(kinds == kind)
        if not len(sel):
            continue
        base = s.frame.take(row[sel])
        if kind == K_PAGE:
            frames.append(page_call(rng, base, ms[sel]))
        else:
            props = _kind_props(rng, kind, p, ids, base.person)
            frames.append(as_call(base, ms[sel], TRACK, _EVENT_NAMES[kind], props))
    return frames


def with_contacts(
    f: Frame,
    phone: tuple[Any, Any] | None = None,
    email: tuple[Any, Any] | None = None,
    *,
    phone_junk: Bool | None = None,
    email_junk: Bool | None = None,
) -> Frame:
    """``f`` carrying (raw, value) phone and email columns, as traits or context.traits."""
    n = len(f)
    if phone is not None:
        f = replace(f, phone_raw=phone[0], phone_value=phone[1])
        f.phone_junk = np.zeros(n, np.bool_) if phone_junk is None else phone_junk
    if email is not None:
        f = replace(f, email_raw=email[0], email_value=email[1])
        f.email_junk = np.zeros(n, np.bool_) if email_junk is None else email_junk
    return f


def phone_pair(
    rng: np.random.Generator, digits: Any, mask: npt.ArrayLike = True
) -> tuple[Any, Any]:
    """A typed phone and its E.164 value, present where ``mask`` holds."""
    keep_mask = np.broadcast_to(np.asarray(mask, dtype=np.bool_), (len(digits),))
    return keep(phone_raw(rng, digits), keep_mask), keep(phone_e164(digits), keep_mask)


def email_pair(rng: np.random.Generator, value: Any, mask: npt.ArrayLike = True) -> tuple[Any, Any]:
    """A typed email and its canonical value, present where ``mask`` holds."""
    keep_mask = np.broadcast_to(np.asarray(mask, dtype=np.bool_), (len(value),))
    return keep(email_raw(rng, value), keep_mask), keep(value, keep_mask)


def _profile(p: Persons, ids: Identities, person: I64) -> Any:
    idx = pa.array(person)
    return cat(
        '"name":"', ids.name.take(idx),
        '","gender":"', pick(["male", "female"], p.female[person].astype(np.int64)),
        '","birthday":"', date_text(p.birthday[person]),
        '","city":"', pick(CITY_NAMES, p.city[person]),
        '","member_id":"', ids.member_id.take(idx), '"',
    )  # fmt: skip


def registration_frames(
    rng: np.random.Generator, p: Persons, ids: Identities, prefs: Preferences
) -> list[Frame]:
    """Members joining during history: a page, Signed Up, then identify with their profile.

    The sign-up form asks for marketing and personalisation consent; Signed Up and the identify
    carry the answer as ``context.consent.categoryPreferences`` (Segment consent spec).
    """
    person = np.flatnonzero(p.member & (p.reg_ms >= H0_MS))
    k = len(person)
    if not k:
        return []
    source = np.minimum(choose_source(rng, p.touch_cdf[person][:, :3]), MINI)
    ms = np.minimum(p.reg_ms[person], REF_MS - 10_000)
    s = make_sessions(rng, p, ids, person, source, ms, login_p=1.0)
    page = replace(page_call(rng, s.frame, ms - 30_000), user_id=nulls(k))
    method = np.where(source == MINI, 1, rng.choice([0, 2], k, p=[0.7, 0.3]))
    method_json = cat('{"method":"', pick(names.SIGNUP_METHODS, method), '"}')
    signed_up = as_call(s.frame, ms, TRACK, "Signed Up", method_json)
    idx = pa.array(person)
    junk = p.junk_email[person]
    email = either(junk, names.JUNK_EMAIL, ids.email.take(idx))
    identify = with_contacts(
        as_call(s.frame, ms + 1000, IDENTIFY, None, None),
        phone_pair(rng, ids.phone_digits.take(idx)),
        email_pair(rng, email, junk | (rng.random(k) < 0.85)),
        email_junk=junk,
    )
    identify.profile = _profile(p, ids, person)
    consent = consent_json(prefs.grant[person], prefs.personalisation[person])
    signed_up.consent = identify.consent = consent
    return [page, signed_up, identify]


def login_identify_frames(
    rng: np.random.Generator, p: Persons, ids: Identities, s: Sessions
) -> list[Frame]:
    """Some logged-in sessions start with identify(member_id and sometimes email or phone)."""
    sel = np.flatnonzero(s.logged_in & (rng.random(len(s)) < 0.12))
    k = len(sel)
    if not k:
        return []
    person = s.person[sel]
    idx = pa.array(person)
    alt = ids.alt_email.take(idx)
    email = either(present(alt) & (rng.random(k) < 0.5), alt, ids.email.take(idx))
    gives_email = (rng.random(k) < 0.4) & ~p.junk_email[person]
    f = with_contacts(
        as_call(s.frame.take(sel), s.ms[sel] - 1000, IDENTIFY, None, None),
        phone_pair(rng, ids.phone_digits.take(idx), rng.random(k) < 0.3),
        email_pair(rng, email, gives_email),
    )
    f.profile = cat('"member_id":"', ids.member_id.take(idx), '"')
    return [f]


def mini_phone_frames(
    rng: np.random.Generator, p: Persons, ids: Identities, s: Sessions
) -> list[Frame]:
    """Non-members leave a phone in the mini-program (delivery, coupons): identify(phone)."""
    mini = np.flatnonzero((s.source == MINI) & ~p.member[s.person])
    if not len(mini):
        return []
    _, first = np.unique(s.person[mini], return_index=True)
    sel = mini[first]
    sel = sel[rng.random(len(sel)) < 0.3]
    base = as_call(s.frame.take(sel), s.ms[sel] + 5000, IDENTIFY, None, None)
    return [with_contacts(base, phone_pair(rng, ids.phone_digits.take(pa.array(s.person[sel]))))]


def callcenter_frames(rng: np.random.Generator, p: Persons, ids: Identities) -> list[Frame]:
    """Complaints by phone: members are looked up; other callers get a call id and their number."""
    person = np.repeat(np.arange(p.n), np.where(rng.random(p.n) < 0.06, rng.integers(1, 3, p.n), 0))
    k = len(person)
    if not k:
        return []
    day = rng.uniform(p.first[person], p.last[person] + 1)
    ms = clock_ms(rng, H0_MS, day, p.tz_hours[person], store_hours=True)
    ms = np.clip(ms, H0_MS, REF_MS - 120_000)
    member = p.member[person] & (ms >= p.reg_ms[person])
    raw, value = phone_pair(rng, ids.phone_digits.take(pa.array(person)))
    junk = rng.random(k) < 0.03
    junk_raw, junk_value = junk_phones(rng, k)
    raw, value = either(junk, junk_raw, raw), either(junk, junk_value, value)
    base = Frame.make(
        k,
        source=np.full(k, CALL),
        ms=ms,
        person=person,
        mtype=np.full(k, TRACK),
        user_id=keep(ids.member_id.take(pa.array(person)), member),
        anon_id=keep(cat("call-", random_text(rng, k, 12)), ~member),
        ip=const(names.CALLCENTER_IP, k),
        ua=const(names.CALLCENTER_USER_AGENT, k),
    )
    reason = pick(names.COMPLAINT_REASONS, rng.integers(0, len(names.COMPLAINT_REASONS), k))
    ticket = num(rng.integers(10**8, 10**9, k))
    props = cat('{"reason":"', reason, '","ticket_id":"T', ticket, '"}')
    caller_id = ~member | (rng.random(k) < 0.5)
    complaint = with_contacts(
        as_call(base, ms + 60_000, TRACK, "Complaint Filed", props),
        (keep(raw, caller_id), keep(value, caller_id)),
        phone_junk=junk & caller_id,
    )
    anon = np.flatnonzero(~member)
    identify = with_contacts(
        as_call(base.take(anon), ms[anon], IDENTIFY, None, None),
        (raw.take(pa.array(anon)), value.take(pa.array(anon))),
        phone_junk=junk[anon],
    )
    return [complaint, identify]


# ---------------------------------------------------------------------------------------------
# Orders: baskets shared by e-commerce, POS tills and the world's responses.
# ---------------------------------------------------------------------------------------------

_DISCOUNT: Final = np.array([0.10, 0.15, 0.20])  # ordinary day, 618, Double 11


@dataclass
class Baskets:
    """Orders as columns: per-order totals in cents, per-item products."""

    offsets: npt.NDArray[np.int32]
    product: I64
    quantity: I64
    total: I64
    coupon: Any  # nullable code
    category: Any  # the main item's category

    def items_json(self) -> Any:
        """Per item: ``{"product_id", "category", "price", "quantity"}``."""
        return cat("{", pick(PRODUCT_JSON, self.product), ',"quantity":', num(self.quantity), "}")

    def order_completed(self, order_ids: Any) -> Any:
        """Properties of ``Order Completed`` in the Segment e-commerce spec."""
        items = pa.ListArray.from_arrays(pa.array(self.offsets), self.items_json())
        amount = money(self.total)
        coupon = cat('"', self.coupon, '"').fill_null("null")
        return cat(
            '{"order_id":"', order_ids, '","total":', amount, ',"revenue":', amount,
            ',"currency":"CNY","coupon":', coupon, ',"category":"', self.category,
            '","products":[', pc.binary_join(items, ","), "]}",
        )  # fmt: skip


def make_baskets(
    rng: np.random.Generator,
    category: I64,
    coupon_affinity: F64,
    ms: I64,
    *,
    campaign_coupon: tuple[Bool, str] | None = None,
) -> Baskets:
    """One to three products an order; coupons likelier in promotions and for bargain-hunters."""
    k = len(category)
    items = rng.choice([1, 2, 3], k, p=[0.6, 0.3, 0.1])
    offsets = np.concatenate([[0], np.cumsum(items)]).astype(np.int32)
    order = np.repeat(np.arange(k), items)
    product = pick_products(rng, category[order])
    tea = PRODUCT_CATEGORY[product] < names.TEA_CATEGORIES
    quantity = np.where(tea, rng.choice([1, 2, 3], len(order), p=[0.6, 0.3, 0.1]), 1)
    subtotal = np.bincount(order, PRICE_CENTS[product] * quantity, minlength=k).astype(np.int64)
    season = promo_season(ms)
    uses = rng.random(k) < coupon_affinity * (0.35 + 0.45 * (season > 0))
    codes = [*names.COUPON_EVERYDAY, names.COUPON_618, names.COUPON_DOUBLE11]
    everyday = rng.integers(0, len(names.COUPON_EVERYDAY), k)
    coupon = keep(pick(codes, np.where(season == 0, everyday, len(codes) - 3 + season)), uses)
    discount = np.where(uses, np.round(subtotal * _DISCOUNT[season]), 0).astype(np.int64)
    if campaign_coupon is not None:
        mask, code = campaign_coupon
        coupon = either(mask, code, coupon)
        discount = np.where(mask, np.round(subtotal * 0.2), discount).astype(np.int64)
    return Baskets(
        offsets=offsets,
        product=product,
        quantity=quantity,
        total=subtotal - discount,
        coupon=coupon,
        category=pick(CATEGORY_NAMES, PRODUCT_CATEGORY[product[offsets[:-1]]]),
    )


def order_id_text(rng: np.random.Generator, k: int) -> Any:
    """18-digit numeric order numbers, as Chinese marketplaces use."""
    return num(rng.integers(10**17, 10**18, k))


def order_frames(
    rng: np.random.Generator, p: Persons, ids: Identities, person: I64, ms: I64
) -> list[Frame]:
    """Online checkouts: Product Added on the client, then Order Completed from the order service.

    Guests (non-members, or members before they joined) are known by their cookie or install id
    and the phone they leave for delivery.
    """
    k = len(person)
    source = np.minimum(choose_source(rng, p.touch_cdf[person][:, :3]), MINI)
    s = make_sessions(rng, p, ids, person, source, ms, login_p=0.97)
    baskets = make_baskets(rng, p.category[person], p.coupon[person], ms)
    item_order = np.repeat(np.arange(k), np.diff(baskets.offsets))
    position = np.arange(len(item_order)) - baskets.offsets[item_order]
    added_ms = ms[item_order] - 120_000 + position * 20_000
    added = as_call(
        s.frame.take(item_order), added_ms, TRACK, "Product Added", baskets.items_json()
    )
    props = baskets.order_completed(order_id_text(rng, k))
    guest = ~s.logged_in
    completed = replace(
        as_call(s.frame, ms + 30_000, TRACK, "Order Completed", props),
        source=np.full(k, ECOM),
        anon_id=keep(s.frame.anon_id, guest),
        anon_junk=s.frame.anon_junk & guest,
        device_id=nulls(k),
        openid=nulls(k),
        unionid=nulls(k),
        ua=const(names.ECOMMERCE_USER_AGENT, k),
    )
    completed = with_contacts(
        completed, phone_pair(rng, ids.phone_digits.take(pa.array(person)), guest)
    )
    return [added, completed]


def draw_orders(rng: np.random.Generator, p: Persons) -> tuple[I64, I64, Bool]:
    """All purchases of the block: person, time, and whether it was at a POS till."""
    counts = rng.poisson(p.order_rate * (p.last - p.first))
    person = np.repeat(np.arange(p.n), counts)
    at_pos = rng.random(len(person)) < np.where(p.store_shopper, 0.6, 0.0)[person]
    day = draw_days(rng, p.first[person], p.last[person] + 1, ORDER_BOOST)
    online = clock_ms(rng, H0_MS, day, p.tz_hours[person])
    store = clock_ms(rng, H0_MS, day, p.tz_hours[person], store_hours=True)
    ms = np.clip(np.where(at_pos, store, online), H0_MS + 300_000, REF_MS - 60_000)
    return person, ms, at_pos


# ---------------------------------------------------------------------------------------------
# Files: POS tickets and the CRM export.
# ---------------------------------------------------------------------------------------------


def pos_tickets(
    rng: np.random.Generator, p: Persons, ids: Identities, person: I64, ms: I64
) -> tuple[pa.Table, list[pa.Table]]:
    """Tickets: members give their member id, some customers a phone; lazy clerks type their own."""
    order = np.lexsort((np.arange(len(ms)), ms))
    person, ms = person[order], ms[order]
    k = len(person)
    city = p.city[person]
    elsewhere = _FIRST_STORE[city] + (rng.random(k) * _STORES_PER_CITY[city]).astype(np.int64)
    store = np.where(rng.random(k) < 0.85, p.home_store[person], elsewhere)
    baskets = make_baskets(rng, p.category[person], p.coupon[person], ms)
    member = p.member[person] & (ms >= p.reg_ms[person])
    gives_id = member & (rng.random(k) < 0.85)
    gives_phone = np.where(member, ~gives_id & (rng.random(k) < 0.5), rng.random(k) < 0.35)
    gives_phone |= gives_id & (rng.random(k) < 0.1)
    clerk = LAZY_CLERK_STORE[store] & ~gives_id & (rng.random(k) < 0.6)
    junk = gives_phone & ~clerk & (rng.random(k) < 0.01)
    own = ids.phone_digits.take(pa.array(person))
    raw, value = phone_pair(rng, either(clerk, pick(CLERK_DIGITS, store), own), gives_phone | clerk)
    junk_raw, junk_value = junk_phones(rng, k)
    raw, value = either(junk, junk_raw, raw), either(junk, junk_value, value)
    member_id = keep(ids.member_id.take(pa.array(person)), gives_id)
    store_code = pick(STORE_IDS, store)
    table = pa.table(
        {
            "order_id": cat(store_code, "-", num(rng.integers(10**9, 10**10, k))),
            "member_id": member_id,
            "phone": raw,
            "store_id": store_code,
            "ordered_at": pa.array(ms // 1000 * 1000, TS),
            "amount": pa.array(baskets.total / 100.0),
            "coupon_code": baskets.coupon,
            "category": baskets.category,
            "person": pa.array(person),
        }
    )
    truth = [
        id_rows(person, MEMBER, member_id, member_id),
        id_rows(person, PHONE, raw, value, junk | clerk),
    ]
    return table, truth


_TYPO_WIDTH: Final = 48


def typo(rng: np.random.Generator, text: Any, start: I64) -> Any:
    """Swap two adjacent letters at or just after ``start`` (per row), as a hurried clerk does."""
    fixed = np.asarray(text.to_numpy(zero_copy_only=False).astype(f"S{_TYPO_WIDTH}"))
    chars = fixed.view(np.uint8).reshape(len(fixed), _TYPO_WIDTH).copy()
    length = (chars != 0).sum(axis=1)
    at = np.clip(start + rng.integers(0, 3, len(fixed)), 0, np.maximum(length - 2, 0))
    rows = np.arange(len(fixed))
    a, b = chars[rows, at].copy(), chars[rows, at + 1].copy()
    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", np.uint8)
    ok = np.isin(a, letters) & np.isin(b, letters)
    chars[rows[ok], at[ok]], chars[rows[ok], at[ok] + 1] = b[ok], a[ok]
    swapped = chars.view(f"S{_TYPO_WIDTH}").ravel()
    return pc.cast(pa.array(swapped, pa.binary()), STR)


def _duplicate_email(rng: np.random.Generator, p: Persons, ids: Identities, dup: I64) -> Any:
    """The address given the second time: a typo in the user name, another provider, a bad domain."""
    k = len(dup)
    parts = pc.split_pattern(ids.email.take(pa.array(dup)), "@")
    user, domain = pc.list_element(parts, 0), pc.list_element(parts, 1)
    other = (provider_index(p)[dup] + rng.integers(1, 6, k)) % 6
    variants = [
        cat(typo(rng, user, np.zeros(k, np.int64)), "@", domain),
        cat(user, "@", pick(names.PROVIDERS, other)),
        cat(user, "@", pick(names.PROVIDER_TYPOS, provider_index(p)[dup])),
    ]
    value = pc.choose(pa.array(rng.integers(0, 3, k).astype(np.int8)), *variants)
    return keep(value, rng.random(k) < 0.85)


def _crm_duplicates(
    rng: np.random.Generator, p: Persons, ids: Identities, members: I64
) -> tuple[dict[str, Any], list[pa.Table]]:
    """About 3% of members registered twice: new member id, a name typo, another email."""
    dup = members[rng.random(len(members)) < 0.03]
    k = len(dup)
    surname_length = pc.utf8_length(pick(_SURNAMES, p.surname[dup])).to_numpy()
    name = typo(rng, ids.name.take(pa.array(dup)), surname_length + 1)
    email = email_pair(rng, _duplicate_email(rng, p, ids, dup))
    digits = ids.phone_digits.take(pa.array(dup))
    phone = phone_pair(rng, digits, rng.random(k) < 0.7)
    member_id = member_ids(p.g[dup], duplicate=True)
    later = np.maximum(p.reg_ms[dup], H0_MS - 400 * DAY_MS) + rng.integers(30, 400, k) * DAY_MS
    columns = {
        "person": dup,
        "member_id": member_id,
        "name": name,
        "phone": phone[0],
        "email": email[0],
        "registered_at": np.minimum(later, REF_MS - DAY_MS),
    }
    truth = [
        id_rows(dup, MEMBER, member_id, member_id),
        id_rows(dup, PHONE, *phone),
        id_rows(dup, EMAIL, *email),
    ]
    return columns, truth


def crm_rows(
    rng: np.random.Generator, p: Persons, ids: Identities
) -> tuple[pa.Table, list[pa.Table]]:
    """The CRM export: one row a member (some with a clerk's phone), plus second registrations."""
    members = np.flatnonzero(p.member)
    k = len(members)
    idx = pa.array(members)
    store = p.home_store[members]
    clerk = p.in_store_reg[members] & LAZY_CLERK_STORE[store] & (rng.random(k) < 0.3)
    digits = either(clerk, pick(CLERK_DIGITS, store), ids.phone_digits.take(idx))
    phone = phone_pair(rng, digits, rng.random(k) < 0.97)
    junk = p.junk_email[members]
    email_value = either(junk, names.JUNK_EMAIL, ids.email.take(idx))
    email = email_pair(rng, email_value, junk | (rng.random(k) < 0.85))
    main = {
        "person": members,
        "member_id": ids.member_id.take(idx),
        "name": ids.name.take(idx),
        "phone": phone[0],
        "email": email[0],
        "registered_at": p.reg_ms[members],
    }
    dup, dup_truth = _crm_duplicates(rng, p, ids, members)
    truth = [
        id_rows(members, MEMBER, main["member_id"], main["member_id"]),
        id_rows(members, PHONE, *phone, clerk),
        id_rows(members, EMAIL, *email, junk),
        *dup_truth,
    ]
    return _crm_table(rng, p, [main, dup]), truth


_POINTS_BY_TIER: Final = np.log(np.array([600.0, 3000.0, 9000.0, 25000.0]))


def _crm_table(rng: np.random.Generator, p: Persons, parts: list[dict[str, Any]]) -> pa.Table:
    """CRM rows in registration order."""
    person = np.concatenate([np.asarray(x["person"], dtype=np.int64) for x in parts])
    reg = np.concatenate([np.asarray(x["registered_at"], dtype=np.int64) for x in parts])
    order = np.lexsort((np.arange(len(reg)), reg))
    take = pa.array(order)
    text = {
        c: pa.concat_arrays([x[c].cast(STR) for x in parts]).take(take)
        for c in ("member_id", "name", "phone", "email")
    }
    person, reg = person[order], reg[order]
    tier = p.tier[person]
    points = np.exp(_POINTS_BY_TIER[tier] + 0.6 * rng.standard_normal(len(person)))
    return pa.table(
        {
            **text,
            "gender": pick(["M", "F"], p.female[person].astype(np.int64)),
            "birthday": date_text(p.birthday[person]),
            "city": pick(CITY_NAMES, p.city[person]),
            "tier": pick(names.TIERS, tier),
            "points": pa.array(points.astype(np.int64)),
            "registered_at": pa.array(reg // 1000 * 1000, TS),
            "person": pa.array(person),
        }
    )


# ---------------------------------------------------------------------------------------------
# Contact preferences: time zone, marketing consent and per-channel opt-outs.
# ---------------------------------------------------------------------------------------------

CONSENT_EVENT: Final = "Segment Consent Preference Updated"  # Segment's consent-change event
_MARKETING_GRANT: Final = 0.85  # members who tick "send me offers" when they register
_PERSONALISATION_GRANT: Final = 0.6  # … personalisation, among those who refuse marketing
_WITHDRAW: Final = 0.05  # granters who later withdraw marketing consent
_MINI_ANSWER: Final = 0.6  # non-members in the mini-program who answer its privacy pop-up …
_MINI_GRANT: Final = 0.55  # … and grant marketing there
_OPT_OUT: Final = (0.03, 0.02)  # members who unsubscribe: email, sms
_RESUBSCRIBE: Final = 0.25  # of those, subscribe again later
_WEB_TZ_OMITTED: Final = 0.2  # persons whose browser sends no time zone
_CLIENT_SOURCES: Final = np.isin(np.arange(len(SOURCES)), [WEB, APP, MINI, OA])
_CONSENT_JSON: Final = tuple(
    f'{{"marketing":{m},"personalisation":{q}}}'
    for m in ("false", "true")
    for q in ("false", "true")
)


@dataclass
class Preferences:
    """Each person's latent answers to consent questions and unsubscribe links."""

    grant: Bool  # marketing, when asked as a member
    personalisation: Bool
    withdraw: Bool
    mini_answer: Bool  # a non-member answers the mini-program's privacy pop-up …
    mini_grant: Bool  # … granting marketing
    unsubscribe: Bool  # (n, 2): email, sms
    resubscribe: Bool  # (n, 2)
    web_tz_omitted: Bool


@dataclass
class ContactTruth:
    """Final state per person, as the events state it."""

    consent: npt.NDArray[np.int8]  # marketing: 1 granted, 0 refused or withdrawn, -1 never stated
    email_opt_out: Bool
    sms_opt_out: Bool


def draw_preferences(rng: np.random.Generator, n: int) -> Preferences:
    u = rng.random((n, 9))
    grant = u[:, 0] < _MARKETING_GRANT
    return Preferences(
        grant=grant,
        personalisation=grant | (u[:, 1] < _PERSONALISATION_GRANT),
        withdraw=grant & (u[:, 2] < _WITHDRAW),
        mini_answer=u[:, 3] < _MINI_ANSWER,
        mini_grant=u[:, 4] < _MINI_GRANT,
        unsubscribe=u[:, 5:7] < np.array(_OPT_OUT),
        resubscribe=u[:, 7:9] < _RESUBSCRIBE,
        web_tz_omitted=rng.random(n) < _WEB_TZ_OMITTED,
    )


def consent_json(marketing: npt.ArrayLike, personalisation: npt.ArrayLike) -> Any:
    """``{"marketing": bool, "personalisation": bool}`` per row."""
    m = np.asarray(marketing, dtype=np.int64)
    return pick(_CONSENT_JSON, 2 * m + np.asarray(personalisation, dtype=np.int64))


def client_timezones(p: Persons, prefs: Preferences, f: Frame) -> Any:
    """``context.timezone``: the SDKs of the app, the mini-program and WeChat pages send the
    device's zone; some browsers do not; servers (order service, call centre) never do."""
    sends = _CLIENT_SOURCES[f.source] & ~((f.source == WEB) & prefs.web_tz_omitted[f.person])
    return keep(pick(TZ_NAMES, p.tz[f.person]), sends)


def _first_session(s: Sessions, mask: Bool) -> I64:
    """Per person with a session where ``mask`` holds, the earliest such session."""
    sel = np.flatnonzero(mask)
    sel = sel[np.lexsort((s.ms[sel], s.person[sel]))]
    _, first = np.unique(s.person[sel], return_index=True)
    return np.asarray(sel[first], dtype=np.int64)


def _moments_after(rng: np.random.Generator, p: Persons, person: I64, after: I64) -> I64:
    """A moment strictly after ``after`` per row, within the person's activity window if it can.

    It stays before now (at most halfway from ``after`` to now), so moments can be chained."""
    end = np.minimum(H0_MS + ((p.last[person] + 1) * DAY_MS).astype(np.int64), REF_MS - HOUR_MS)
    span = np.maximum(end - after, 2_000)
    ms = after + 1_000 + (rng.random(len(person)) * (span - 1_000)).astype(np.int64)
    return np.asarray(np.minimum(ms, (after + REF_MS) // 2 + 1), dtype=np.int64)


def _settings_sessions(
    rng: np.random.Generator, p: Persons, ids: Identities, person: I64, ms: I64
) -> Sessions:
    """Logged-in visits to the account settings on the web, in the app or the mini-program."""
    source = np.minimum(choose_source(rng, p.touch_cdf[person][:, :3]), MINI)
    return make_sessions(rng, p, ids, person, source, ms, login_p=1.0)


def preference_frames(
    rng: np.random.Generator, p: Persons, ids: Identities, s: Sessions, prefs: Preferences
) -> tuple[list[Frame], ContactTruth]:
    """Consent statements, withdrawals, unsubscribes and re-subscribes, and the final state.

    Members who joined during history stated consent when they signed up. Members who joined
    before meet the privacy-policy refresh at their first logged-in visit, and non-members the
    mini-program's privacy pop-up at their first visit there; both answer with Segment's
    consent-change event. Withdrawal is a later identify with marketing false.
    """
    n = p.n
    consent = np.full(n, -1, dtype=np.int8)
    stated_ms = np.full(n, -1, dtype=np.int64)
    joined = p.member & (p.reg_ms >= H0_MS)
    consent[joined] = prefs.grant[joined]
    stated_ms[joined] = np.minimum(p.reg_ms[joined], REF_MS - 10_000) + 1_000
    frames = []

    old = p.member & (p.reg_ms < H0_MS)
    first_login = _first_session(s, s.logged_in & old[s.person])
    mini = _first_session(s, (s.source == MINI) & ~p.member[s.person])
    mini = mini[prefs.mini_answer[s.person[mini]]]
    for sel, grant in ((first_login, prefs.grant), (mini, prefs.mini_grant)):
        who = s.person[sel]
        ms = s.ms[sel] + 2_000
        props = const("{}", len(sel))
        call = as_call(s.frame.take(pa.array(sel)), ms, TRACK, CONSENT_EVENT, props)
        call.consent = consent_json(grant[who], grant[who] | prefs.personalisation[who])
        frames.append(call)
        consent[who] = grant[who]
        stated_ms[who] = ms

    # Visits to the account settings: withdrawals, then per channel unsubscribes and re-subscribes.
    withdraw = np.flatnonzero((consent == 1) & prefs.withdraw & p.member)
    visits: list[tuple[I64, I64, str | None, str]] = [
        (withdraw, _moments_after(rng, p, withdraw, stated_ms[withdraw]), None, "")
    ]
    opted_out = []
    for c, channel in enumerate(("email", "sms")):
        props = f'{{"channel":"{channel}"}}'
        who = np.flatnonzero(p.member & prefs.unsubscribe[:, c])
        joined_ms = np.maximum(p.reg_ms[who], H0_MS + (p.first[who] * DAY_MS).astype(np.int64))
        ms = _moments_after(rng, p, who, np.minimum(joined_ms, REF_MS - 60_000))
        back = prefs.resubscribe[who, c]
        visits.append((who, ms, "Unsubscribed", props))
        visits.append((who[back], _moments_after(rng, p, who[back], ms[back]), "Subscribed", props))
        out = np.zeros(n, np.bool_)
        out[who[~back]] = True
        opted_out.append(out)
    person = np.concatenate([v[0] for v in visits])
    s = _settings_sessions(rng, p, ids, person, np.concatenate([v[1] for v in visits]))
    bounds = np.cumsum([0] + [len(v[0]) for v in visits])
    for (who, ms, event, props), lo, hi in zip(visits, bounds[:-1], bounds[1:], strict=True):
        base = s.frame.take(np.arange(lo, hi))
        if event is None:
            call = as_call(base, ms, IDENTIFY, None, None)
            call.profile = cat('"member_id":"', ids.member_id.take(pa.array(who)), '"')
            call.consent = consent_json(np.zeros(len(who), np.bool_), prefs.personalisation[who])
        else:
            call = as_call(base, ms, TRACK, event, const(props, len(who)))
        frames.append(call)
    consent[withdraw] = 0
    return frames, ContactTruth(consent, opted_out[0], opted_out[1])


# ---------------------------------------------------------------------------------------------
# One block, end to end.
# ---------------------------------------------------------------------------------------------


@dataclass
class BlockOutput:
    lines: list[Any]  # JSON lines per source
    messages: pa.Table  # message_id, person_id — in line order
    identifiers: pa.Table
    persons: pa.Table
    orders: pa.Table  # with person_id, split off when written
    crm: pa.Table  # with person_id, split off when written


def _session_times(rng: np.random.Generator, p: Persons, person: I64) -> I64:
    day = draw_days(rng, p.first[person], p.last[person] + 1, BROWSE_BOOST)
    ms = clock_ms(rng, H0_MS, day, p.tz_hours[person])
    return np.clip(ms, H0_MS + 60_000, REF_MS - HOUR_MS)


def _browse_sessions(rng: np.random.Generator, p: Persons, ids: Identities) -> Sessions:
    person = np.repeat(np.arange(p.n), 1 + rng.poisson(np.maximum(p.activity - 1, 0) / 2.9))
    source = choose_source(rng, p.touch_cdf[person])
    return make_sessions(rng, p, ids, person, source, _session_times(rng, p, person))


def _tablet_frames(rng: np.random.Generator, p: Persons, ids: Identities) -> list[Frame]:
    """Each household member uses the shared tablet a few times, as themselves when members."""
    users = np.flatnonzero(p.household >= 0)
    if not len(users):
        return []
    person = np.repeat(users, rng.integers(1, 5, len(users)))
    k = len(person)
    s = make_sessions(
        rng,
        p,
        ids,
        person,
        np.full(k, APP),
        _session_times(rng, p, person),
        tablet=np.ones(k, np.bool_),
    )
    return browse_frames(rng, p, ids, s, 1.5)


def _event_frames(
    rng: np.random.Generator, p: Persons, ids: Identities, prefs: Preferences
) -> tuple[list[Frame], I64, I64, Sessions]:
    """All messages of a block, the POS purchases (person, time) for the ticket file, and the
    browsing sessions (later contact-preference events happen in some of them)."""
    sessions = _browse_sessions(rng, p, ids)
    frames = browse_frames(rng, p, ids, sessions, 1.8)
    frames += _tablet_frames(rng, p, ids)
    frames += registration_frames(rng, p, ids, prefs)
    frames += login_identify_frames(rng, p, ids, sessions)
    frames += mini_phone_frames(rng, p, ids, sessions)
    frames += callcenter_frames(rng, p, ids)
    person, ms, at_pos = draw_orders(rng, p)
    if (~at_pos).any():
        frames += order_frames(rng, p, ids, person[~at_pos], ms[~at_pos])
    return frames, person[at_pos], ms[at_pos], sessions


def _persons_table(
    p: Persons, ids: Identities, last_order: I64, orders: I64, contact: ContactTruth
) -> pa.Table:
    """Truth about each person: identity, latent behaviour, and the true campaign effect."""
    preferred = np.argmax(np.diff(p.touch_cdf, axis=1, prepend=0.0), axis=1)
    return pa.table(
        {
            "person_id": person_ids(p.g),
            "name": ids.name,
            "gender": pick(["male", "female"], p.female.astype(np.int64)),
            "birthday": date_text(p.birthday),
            "city": pick(CITY_NAMES, p.city),
            "timezone": pick(TZ_NAMES, p.tz),
            "tier": keep(pick(names.TIERS, np.maximum(p.tier, 0)), p.member),
            "is_member": pa.array(p.member),
            "member_id": ids.member_id.slice(0, p.n),
            "phone": phone_e164(ids.phone_digits),
            "email": ids.email,
            "alt_email": ids.alt_email,
            "registered_at": pa.array(p.reg_ms, TS, mask=~p.member),
            "lifecycle": pick(LIFECYCLES, p.lifecycle),
            "churned": pa.array(p.lifecycle == CHURNED),
            "activity": pa.array(p.activity),
            "buyer": pa.array(p.buyer),
            "category_pref": pick(CATEGORY_NAMES, p.category),
            "preferred_source": pick(SOURCES, preferred),
            "store_shopper": pa.array(p.store_shopper),
            "home_store": pick(STORE_IDS, p.home_store),
            "coupon_affinity": pa.array(p.coupon),
            "household_id": pa.array(p.household, mask=p.household < 0),
            "first_seen_at": pa.array(H0_MS + (p.first * DAY_MS).astype(np.int64), TS),
            "last_seen_at": pa.array(H0_MS + (p.last * DAY_MS).astype(np.int64), TS),
            "orders": pa.array(orders),
            "last_order_at": pa.array(last_order, TS, mask=last_order < 0),
            "daily_purchase_rate": pa.array(p.current_rate),
            "winback_effect": pa.array(p.effect),
            "checkout_anonymous_id": pick(ids.anon_pool, np.arange(p.n) * 3),
            "home_ip": ids.home_ip,
            "consent_marketing": pa.array(contact.consent == 1, mask=contact.consent < 0),
            "email_opt_out": pa.array(contact.email_opt_out),
            "sms_opt_out": pa.array(contact.sms_opt_out),
        }
    )


def _dedupe_ids(tables: list[pa.Table], g0: int) -> pa.Table:
    """One row per (person, id_type, value), keeping the first raw form seen."""
    table = pa.concat_tables([t.cast(tables[0].schema) for t in tables])
    grouped = table.group_by(["person", "id_type", "value"], use_threads=False).aggregate(
        [("raw_value", "first"), ("junk", "any")]
    )
    grouped = grouped.sort_by([(c, "ascending") for c in ("person", "id_type", "value")])
    return pa.table(
        {
            "person_id": person_ids(g0 + grouped.column("person").to_numpy()),
            "id_type": pick(ID_TYPES, grouped.column("id_type").to_numpy()),
            "raw_value": grouped.column("raw_value_first").combine_chunks(),
            "value": grouped.column("value").combine_chunks(),
            "junk": grouped.column("junk_any").combine_chunks(),
        }
    )


def _order_stats(n: int, frame: Frame, pos: pa.Table) -> tuple[I64, I64]:
    """Last order time and order count per person, over online and POS orders."""
    online = np.flatnonzero(frame.source == ECOM)
    person = np.concatenate([frame.person[online], pos.column("person").to_numpy()])
    ms = pos.column("ordered_at").combine_chunks().cast(pa.int64()).to_numpy()
    ms = np.concatenate([frame.ms[online], ms])
    last = np.full(n, -1, dtype=np.int64)
    np.maximum.at(last, person, ms)
    return last, np.bincount(person, minlength=n).astype(np.int64)


def _with_person_id(table: pa.Table, g0: int) -> pa.Table:
    person = table.column("person").to_numpy()
    return table.drop_columns(["person"]).append_column("person_id", person_ids(g0 + person))


_EVIDENCE_COLUMNS: Final = (
    "user_id",
    "anon_id",
    "device_id",
    "openid",
    "unionid",
    "phone_raw",
    "email_raw",
    "profile",
)


def evidence_rows(f: Frame) -> I64:
    """Rows of a sorted frame that show identity evidence no earlier row of its touchpoint
    showed: every identify call, and the first message of each combination of identifiers
    (touchpoint, user id, anonymous id, device, openid, unionid, typed phone and e-mail,
    profile traits) — the others repeat a session's identifiers on later page views.

    Why: identity resolution needs only this (a graph's nodes and edges, each identifier's
    first sighting, every name and raw spelling); at 1,000,000 persons the other three
    quarters of the messages make the accuracy run hours of JSON loading for nothing.
    """
    n = len(f)
    columns: dict[str, Any] = {c: getattr(f, c) for c in _EVIDENCE_COLUMNS}
    columns["source"] = pa.array(f.source)
    columns["row"] = pa.array(np.arange(n, dtype=np.int64))
    table = pa.table(columns)
    keys = [c for c in table.column_names if c != "row"]
    first = table.group_by(keys, use_threads=False).aggregate([("row", "min")])
    keep_rows = np.zeros(n, dtype=np.bool_)
    keep_rows[first.column("row_min").to_numpy()] = True
    keep_rows |= f.mtype == IDENTIFY
    return np.flatnonzero(keep_rows)


def make_block(seed: int, block: int, persons: int, identity_only: bool = False) -> BlockOutput:
    """Everything about the persons of one block, from its own random stream.

    ``identity_only`` writes only the messages ``evidence_rows`` keeps (same persons,
    identifiers, files and truth otherwise; the random streams are drawn as in full).
    """
    rng = np.random.default_rng([seed, block])
    # Contact preferences draw from a stream of their own, so adding them left the rest of the
    # brand as it was.
    pref_rng = np.random.default_rng([seed, block, 1])
    p = draw_persons(rng, block, min(BLOCK, persons - block * BLOCK))
    prefs = draw_preferences(pref_rng, p.n)
    ids = draw_identities(rng, p)
    frames, pos_person, pos_ms, sessions = _event_frames(rng, p, ids, prefs)
    orders, order_truth = pos_tickets(rng, p, ids, pos_person, pos_ms)
    crm, crm_truth = crm_rows(rng, p, ids)
    more, contact = preference_frames(pref_rng, p, ids, sessions, prefs)
    frame = Frame.concat(frames + more)
    frame.timezone = client_timezones(p, prefs, frame)
    frame = sort_frame(frame)
    message_ids = uuid4s(rng, len(frame))
    sent, sent_ids = frame, message_ids
    if identity_only:
        rows = evidence_rows(frame)
        sent, sent_ids = frame.take(rows), message_ids.take(pa.array(rows))
    lines = message_lines(sent, sent_ids)
    bounds = np.searchsorted(sent.source, np.arange(len(SOURCES) + 1))
    g0 = block * BLOCK
    last_order, order_counts = _order_stats(p.n, frame, orders)
    return BlockOutput(
        lines=[lines.slice(bounds[i], bounds[i + 1] - bounds[i]) for i in range(len(SOURCES))],
        messages=pa.table({"message_id": sent_ids, "person_id": person_ids(g0 + sent.person)}),
        identifiers=_dedupe_ids([*frame_id_rows(frame), *order_truth, *crm_truth], g0),
        persons=_persons_table(p, ids, last_order, order_counts, contact),
        orders=_with_person_id(orders, g0),
        crm=_with_person_id(crm, g0),
    )


# ---------------------------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------------------------


def write_lines(handle: Any, lines: Any) -> None:
    """Write a string column's bytes straight from its Arrow buffer (rows end in newlines)."""
    if len(lines) == 0:
        return
    lines = lines.cast(STR)
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)
    offsets = offsets[lines.offset : lines.offset + len(lines) + 1]
    handle.write(memoryview(lines.buffers()[2])[int(offsets[0]) : int(offsets[-1])])


class PartWriter:
    """JSON-lines files ``part-00000.jsonl``, ``part-00001.jsonl`` … of at most N lines each."""

    def __init__(self, directory: Path, lines_per_part: int = LINES_PER_PART) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.lines_per_part = lines_per_part
        self.count = 0
        self.parts: list[Path] = []
        self._handle: Any = None
        self._next_part()

    def _next_part(self) -> None:
        if self._handle is not None:
            self._handle.close()
        self.parts.append(self.directory / f"part-{len(self.parts):05d}.jsonl")
        self._handle = self.parts[-1].open("wb")

    def write(self, lines: Any) -> None:
        start = 0
        while start < len(lines):
            room = self.lines_per_part * len(self.parts) - self.count
            if room == 0:
                self._next_part()
                continue
            piece = lines.slice(start, min(room, len(lines) - start))
            write_lines(self._handle, piece)
            self.count += len(piece)
            start += len(piece)

    def close(self) -> None:
        self._handle.close()


def csv_lines(table: pa.Table) -> Any:
    """CSV rows; generated values never hold commas, quotes or newlines. Nulls are empty."""
    texts = []
    for col in table.columns:
        col = col.combine_chunks()
        if pa.types.is_timestamp(col.type):
            ms = col.cast(pa.int64()).fill_null(0).to_numpy()
            texts.append(keep(iso(ms, millis=False), present(col.cast(STR))))
        elif pa.types.is_floating(col.type):
            texts.append(money(np.round(col.to_numpy() * 100).astype(np.int64)))
        else:
            texts.append(col.cast(STR))
    joined = pc.binary_join_element_wise(*texts, ",", null_handling="replace", null_replacement="")
    return cat(joined, "\n")


ORDER_COLUMNS: Final = (
    "order_id",
    "member_id",
    "phone",
    "store_id",
    "ordered_at",
    "amount",
    "coupon_code",
    "category",
)
CRM_COLUMNS: Final = (
    "member_id",
    "name",
    "phone",
    "email",
    "gender",
    "birthday",
    "city",
    "tier",
    "points",
    "registered_at",
)


class TableFile:
    """A CSV and a Parquet file with the same rows, appended chunk by chunk."""

    def __init__(self, stem: Path, columns: Sequence[str]) -> None:
        self.stem = stem
        self.columns = list(columns)
        self.csv = stem.with_suffix(".csv").open("wb")
        self.csv.write((",".join(columns) + "\n").encode())
        self.parquet: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        data = table.select(self.columns)
        if self.parquet is None:
            self.parquet = pq.ParquetWriter(self.stem.with_suffix(".parquet"), data.schema)
        write_lines(self.csv, csv_lines(data))
        self.parquet.write_table(data.cast(self.parquet.schema))
        self.rows += data.num_rows

    def close(self) -> None:
        self.csv.close()
        if self.parquet is not None:
            self.parquet.close()


class ParquetAppender:
    """A Parquet file appended chunk by chunk (one row group per chunk)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writer: pq.ParquetWriter | None = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.path, table.schema)
        self.writer.write_table(table.cast(self.writer.schema))
        self.rows += table.num_rows

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class _Sink:
    """Every output file of a generation, written chunk by chunk."""

    def __init__(self, out: Path) -> None:
        data, truth = out / "data", out / "truth"
        truth.mkdir(parents=True, exist_ok=True)
        self.events = [PartWriter(data / "events" / s) for s in SOURCES]
        self.orders = TableFile(data / "orders", ORDER_COLUMNS)
        self.crm = TableFile(data / "crm_members", CRM_COLUMNS)
        self.truth = {
            name: ParquetAppender(truth / f"{name}.parquet")
            for name in ("persons", "identifiers", "messages", "rows")
        }
        # CRM rows' owners wait in a side file and follow all order rows at the end, so the
        # order of rows.parquet does not depend on the chunking.
        self.crm_owners = ParquetAppender(truth / ".rows-crm_members.parquet")
        self.members = 0

    def write(self, blocks: Sequence[BlockOutput]) -> None:
        for block in blocks:
            for writer, lines in zip(self.events, block.lines, strict=True):
                writer.write(lines)
        orders = pa.concat_tables([b.orders for b in blocks])
        self.truth["rows"].write(self._write_file(self.orders, "orders", orders))
        crm = pa.concat_tables([b.crm for b in blocks])
        self.crm_owners.write(self._write_file(self.crm, "crm_members", crm))
        persons = pa.concat_tables([b.persons for b in blocks])
        self.members += pc.sum(persons.column("is_member")).as_py() or 0
        self.truth["persons"].write(persons)
        self.truth["identifiers"].write(pa.concat_tables([b.identifiers for b in blocks]))
        self.truth["messages"].write(pa.concat_tables([b.messages for b in blocks]))

    @staticmethod
    def _write_file(target: TableFile, name: str, table: pa.Table) -> pa.Table:
        """Append rows to a data file; return their owners for ``truth/rows.parquet``."""
        first = target.rows + 1
        rows = pa.table(
            {
                "file": const(name, table.num_rows),
                "row_number": pa.array(np.arange(first, first + table.num_rows, dtype=np.int64)),
                "person_id": table.column("person_id").combine_chunks(),
            }
        )
        target.write(table)
        return rows

    def close(self) -> None:
        for writer in self.events:
            writer.close()
        self.orders.close()
        self.crm.close()
        self.crm_owners.close()
        if self.crm_owners.writer is not None:
            for batch in pq.ParquetFile(self.crm_owners.path).iter_batches():
                self.truth["rows"].write(pa.Table.from_batches([batch]))
        self.crm_owners.path.unlink(missing_ok=True)
        for appender in self.truth.values():
            appender.close()

    def manifest(self, seed: int, persons: int, out: Path) -> dict[str, Any]:
        by_source = {s: w.count for s, w in zip(SOURCES, self.events, strict=True)}
        return {
            "seed": seed,
            "persons": persons,
            "reference_time": iso_text(REFERENCE_TIME),
            "history_start": iso_text(HISTORY_START),
            "counts": {
                "persons": persons,
                "members": self.members,
                "messages": sum(by_source.values()),
                "messages_by_source": by_source,
                "order_rows": self.orders.rows,
                "crm_rows": self.crm.rows,
                "identifiers": self.truth["identifiers"].rows,
            },
            "sources": list(SOURCES),
            "parts": {
                s: [str(p.relative_to(out)) for p in w.parts]
                for s, w in zip(SOURCES, self.events, strict=True)
            },
            "files": {"orders": "data/orders.csv", "crm_members": "data/crm_members.csv"},
            "wechat": {
                "miniprogram_appid": WECHAT_MINIPROGRAM_APPID,
                "official_account_appid": WECHAT_OFFICIAL_APPID,
            },
        }


def generate(
    out: Path,
    persons: int,
    *,
    seed: int = 7,
    chunk_size: int = 20_000,
    progress: Callable[[int], None] | None = None,
    accounts: int = 0,
    identity_only: bool = False,
) -> GenerationSummary:
    """Write the synthetic brand for ``persons`` persons into ``out`` (``data/`` and ``truth/``).

    The same ``seed`` and ``persons`` give byte-identical files; ``chunk_size`` (rounded to
    whole blocks of ``BLOCK`` persons) only bounds memory. ``progress(n)`` is called with the
    number of persons finished since the last call. ``accounts`` adds that many B2B accounts
    whose contacts are members (``write_b2b``); 0, the default, leaves the brand as it was.
    ``identity_only`` writes only the messages that show identity evidence not shown before
    (``evidence_rows``): the same world for identity resolution at about a quarter of the
    messages, for accuracy runs at a million persons; everything else is unchanged.
    """
    if not 1 <= persons <= MAX_PERSONS:
        raise ValueError(f"persons must be between 1 and {MAX_PERSONS:,}, got {persons:,}")
    out = Path(out)
    for stale in (out / "data", out / "truth"):
        shutil.rmtree(stale, ignore_errors=True)
    blocks = -(-persons // BLOCK)
    per_chunk = max(1, chunk_size // BLOCK)
    sink = _Sink(out)
    try:
        for first in range(0, blocks, per_chunk):
            chunk = [
                make_block(seed, b, persons, identity_only)
                for b in range(first, min(blocks, first + per_chunk))
            ]
            sink.write(chunk)
            if progress is not None:
                progress(sum(b.persons.num_rows for b in chunk))
    finally:
        sink.close()
    manifest = sink.manifest(seed, persons, out)
    if identity_only:
        manifest["identity_only"] = True
    if accounts:  # the optional B2B slice (`write_b2b`); without it nothing changes
        manifest["b2b"] = write_b2b(out, seed, accounts)
        manifest["counts"]["messages"] += manifest["b2b"]["messages"]
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return GenerationSummary(
        persons=persons,
        messages=manifest["counts"]["messages"],
        order_rows=sink.orders.rows,
        crm_rows=sink.crm.rows,
        reference_time=REFERENCE_TIME,
        out=out,
    )


# ---------------------------------------------------------------------------------------------
# The B2B slice (optional): companies that buy for their offices, and their staff as contacts.
# ---------------------------------------------------------------------------------------------

B2B_INDUSTRIES: Final = ("Hospitality", "Retail", "Technology", "Finance", "Education", "Health")
B2B_REGIONS: Final = ("East China", "North China", "South China", "Central China", "West China")
B2B_SIZES: Final = (
    ("1-10", 1, 10),
    ("11-50", 11, 50),
    ("51-200", 51, 200),
    ("201-1000", 201, 1000),
)
B2B_SOFTWARE: Final = ("Kingdee", "Yonyou", "Excel", "SAP Business One", "DingTalk", "none")
B2B_NAME_PARTS: Final = (
    ("Jade", "Golden", "Blue Sky", "Harmony", "Lotus", "Pearl", "Summit", "Evergreen"),
    ("Trading", "Hotels", "Tech", "Consulting", "Foods", "Clinics", "Learning", "Studios"),
)
# Per role: what the group call's context.traits.role says, and a job title for identify.
B2B_ROLE_TEXTS: Final = {
    "decision_maker": (("Decision Maker", "Owner"), ("Chief Executive Officer", "General Manager")),
    "finance": (("Finance",), ("Chief Financial Officer", "Procurement Manager", "Accountant")),
    "it": (("IT",), ("IT Administrator", "Software Engineer")),
    "user": (("User",), ("Office Assistant", "Sales Associate", "Marketing Specialist")),
}
B2B_EVENTS: Final = ("Demo Requested", "Quote Requested", "Product Viewed", "Order Completed")


def _b2b_roles(rng: np.random.Generator, k: int) -> list[str]:
    """Roles of an account's ``k`` contacts: one decision maker, then finance and IT often."""
    roles = ["decision_maker"]
    for role, p in (("finance", 0.6), ("it", 0.5)):
        if len(roles) < k and rng.random() < p:
            roles.append(role)
    return roles + ["user"] * (k - len(roles))


def write_b2b(out: Path, seed: int, accounts: int) -> dict[str, int]:
    """Add ``accounts`` companies to a generated brand: group calls and B2B events by members.

    Each account has 2–6 contacts, distinct members of the brand, who send ``group`` calls
    (``groupId`` and the company's traits; a later call may update only the head count or the
    software) from the web or the app, and events carrying ``context.groupId``. A contact's
    role is stated either with the group call (``context.traits.role``) or as a job title on
    identify. The truth — each account's final traits, and who is a contact of which account
    with which role — goes to ``truth/accounts.parquet`` and ``truth/account_contacts.parquet``.
    A slice of thousands of messages, so it is written row by row from its own random stream:
    the rest of the brand is the same with or without it.
    """
    rng = np.random.default_rng([seed, 1_000_000_007])
    persons = pq.read_table(out / "truth" / "persons.parquet", columns=["person_id", "member_id"])
    members = [
        (p, m)
        for p, m in zip(
            persons.column("person_id").to_pylist(),
            persons.column("member_id").to_pylist(),
            strict=True,
        )
        if m is not None
    ]
    pool = rng.permutation(len(members))
    sizes = rng.integers(2, 7, accounts)
    if sizes.sum() > len(members):
        raise ValueError(f"{accounts:,} accounts need more members than the {len(members):,} here")
    lines: dict[str, list[str]] = {"web": [], "app": []}
    truth_accounts: list[dict[str, Any]] = []
    truth_contacts: list[dict[str, Any]] = []
    truth_messages: list[dict[str, str]] = []
    span = REF_MS - DAY_MS - H0_MS
    used = 0
    for a in range(accounts):
        gid = f"acct_{rng.integers(0, 16**10):010x}"
        band, lo, hi = B2B_SIZES[int(rng.integers(len(B2B_SIZES)))]
        traits: dict[str, Any] = {
            "name": f"{rng.choice(B2B_NAME_PARTS[0])} {rng.choice(B2B_NAME_PARTS[1])} Co. {a + 1}",
            "industry": str(rng.choice(B2B_INDUSTRIES)),
            "region": str(rng.choice(B2B_REGIONS)),
            "size": band,
            "employees": int(rng.integers(lo, hi + 1)),
            "current_software": str(rng.choice(B2B_SOFTWARE)),
        }
        first = traits.copy()
        k = int(sizes[a])
        roles = _b2b_roles(rng, k)
        start = H0_MS + int(rng.integers(0, span // 2))
        latest = start  # the account's latest message so far
        for c in range(k):
            person, member = members[int(pool[used])]
            used += 1
            role = roles[c]
            source = "web" if rng.random() < 0.6 else "app"
            # distinct milliseconds per account and contact: "latest" never ties
            t0 = start + c * 7 * DAY_MS + int(rng.integers(0, DAY_MS // 1000)) * 1000 + c
            by_group = rng.random() < 0.5
            said, titles = B2B_ROLE_TEXTS[role]
            msgs: list[dict[str, Any]] = []
            call: dict[str, Any] = {"type": "group", "groupId": gid, "traits": dict(first)}
            if by_group:
                call["context"] = {"traits": {"role": str(rng.choice(said))}}
            msgs.append(call)
            if not by_group:
                title = str(rng.choice(titles))
                msgs.append({"type": "identify", "traits": {"title": title}})
            for _ in range(int(rng.integers(1, 6))):
                event = str(rng.choice(B2B_EVENTS, p=[0.2, 0.2, 0.4, 0.2]))
                m: dict[str, Any] = {"type": "track", "event": event}
                if event == "Order Completed":
                    m["properties"] = {
                        "order_id": f"B{rng.integers(0, 16**12):012x}",
                        "revenue": round(float(rng.uniform(200, 5000)), 2),
                        "category": "office_tea",
                    }
                msgs.append(m)
            ms = t0
            if c == k - 1:  # the last contact tells, last of all, what changed since
                traits["employees"] = int(rng.integers(lo, hi + 1))
                if rng.random() < 0.5:
                    traits["current_software"] = str(rng.choice(B2B_SOFTWARE))
                update = {"employees": traits["employees"]}
                update["current_software"] = traits["current_software"]
                msgs.append({"type": "group", "groupId": gid, "traits": update})
            for i, m in enumerate(msgs):
                # at most 8 messages 20 days apart from a start in the first 310 days of 549:
                # every call is inside the history, and no two of a contact share a time
                ms += 1000 + int(rng.integers(0, DAY_MS * 20))
                if c == k - 1 and i == len(msgs) - 1:
                    ms = max(ms, latest + 1000)
                latest = max(latest, ms)
                mid = str(uuid4s(rng, 1)[0].as_py())
                ctx = m.pop("context", {})
                if m["type"] == "track":
                    ctx["groupId"] = gid
                line = {"messageId": mid, "userId": member, "timestamp": iso_text_ms(ms), **m}
                if ctx:
                    line["context"] = ctx
                lines[source].append(json.dumps(line, separators=(",", ":")) + "\n")
                truth_messages.append({"message_id": mid, "person_id": person})
            truth_contacts.append({"account_id": gid, "person_id": person, "role": role})
        truth_accounts.append({"account_id": gid, **traits})
    for source, rows in lines.items():
        if rows:
            (out / "data" / "events" / source / "b2b-00000.jsonl").write_text("".join(rows))
    truth = out / "truth"
    pq.write_table(pa.Table.from_pylist(truth_accounts), truth / "accounts.parquet")
    pq.write_table(pa.Table.from_pylist(truth_contacts), truth / "account_contacts.parquet")
    pq.write_table(pa.Table.from_pylist(truth_messages), truth / "b2b_messages.parquet")
    return {
        "accounts": accounts,
        "contacts": len(truth_contacts),
        "messages": len(truth_messages),
    }


def iso_text_ms(ms: int) -> str:
    """A UTC time in milliseconds since the epoch as ISO 8601 text with milliseconds."""
    moment = datetime.fromtimestamp(ms / 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"
