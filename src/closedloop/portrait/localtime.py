"""UTC offsets of IANA time zones as a small table, so "hour of day" is the person's hour.

Ibis has no portable "convert to time zone" operation, and engines disagree on how they name
and store zones. Instead, Python's ``zoneinfo`` (the IANA database) lists, for each zone in
use, the intervals over which its UTC offset is constant (daylight saving switches twice a
year); the warehouse joins each event to the interval it falls in and adds the offset. The
table has a handful of rows per zone, so the join is cheap and identical on every engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pyarrow as pa

FAR_PAST = datetime(1900, 1, 1, tzinfo=UTC)
FAR_FUTURE = datetime(2200, 1, 1, tzinfo=UTC)
SCHEMA = pa.schema(
    [
        ("tz", pa.string()),
        ("valid_from", pa.timestamp("us", tz="UTC")),
        ("valid_to", pa.timestamp("us", tz="UTC")),
        ("offset_s", pa.int64()),
    ]
)


def zone(name: str | None) -> ZoneInfo | None:
    """The zone called ``name``, or None when it is not an IANA zone name."""
    if not name:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return None


def _offset(z: ZoneInfo, t: datetime) -> int:
    off = t.astimezone(z).utcoffset()
    return int(off.total_seconds()) if off is not None else 0


def _switch(z: ZoneInfo, lo: datetime, hi: datetime) -> datetime:
    """The first instant in (lo, hi] whose offset differs from lo's (bisection to the second)."""
    base = _offset(z, lo)
    a, b = 0, int((hi - lo).total_seconds())
    while b - a > 1:
        mid = (a + b) // 2
        if _offset(z, lo + timedelta(seconds=mid)) == base:
            a = mid
        else:
            b = mid
    return lo + timedelta(seconds=b)


def offset_intervals(
    name: str, start: datetime, end: datetime
) -> list[tuple[datetime, datetime, int]]:
    """``(valid_from, valid_to, offset seconds)`` covering all time; exact within [start, end].

    Outside [start, end] the first and last offsets are extended (no event lies there).
    """
    z = zone(name)
    if z is None:
        return []
    day = timedelta(days=1)
    t = start - day
    out: list[tuple[datetime, datetime, int]] = []
    begin, current = FAR_PAST, _offset(z, t)
    while t < end + day:
        nxt = min(t + day, end + day)
        if _offset(z, nxt) != current:
            at = _switch(z, t, nxt)
            out.append((begin, at, current))
            begin, current = at, _offset(z, at)
        t = nxt
    out.append((begin, FAR_FUTURE, current))
    return out


def offsets_table(zones: Iterable[str], start: datetime, end: datetime) -> pa.Table:
    """The offset intervals of every valid zone in ``zones`` (invalid names are left out)."""
    rows = [
        {"tz": name, "valid_from": a, "valid_to": b, "offset_s": off}
        for name in sorted(set(zones))
        for a, b, off in offset_intervals(name, start, end)
    ]
    return pa.Table.from_pylist(rows, schema=SCHEMA)
