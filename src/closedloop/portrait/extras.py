"""The rest of the built-in portrait: when people are active, what they prefer, whom they reach.

Each function returns one row per customer (only customers with matching events) for
``build.profile_expr`` to left-join. Lists are stored as comma-separated text, most frequent
first (ties by value), so they export to CSV, compare equal on every engine and can be
matched with ``contains`` in segment conditions.
"""

from __future__ import annotations

import functools

import ibis
import ibis.expr.datatypes as dt
import ibis.expr.types as ir

TOP_N = 3
RELATIONSHIP_COLUMNS = ("referrals_made", "shares", "network_first", "network_second")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
RELATION_EVENTS = ("Referral Sent", "Product Shared")
# Properties of a relation event that name the other person (a member id); the generator's
# referrals carry ``referred_member_id``; a share to a known person may carry the second.
RELATION_PROPERTIES = ("referred_member_id", "shared_with_member_id")

# Age bands (lower bound inclusive); the last band is open-ended.
AGE_BANDS = (
    (0, "under_18"),
    (18, "18-24"),
    (25, "25-34"),
    (35, "35-44"),
    (45, "45-54"),
    (55, "55+"),
)

# City → region of China (the National Bureau of Statistics' seven geographic regions), used
# when identify calls give no ``region`` of their own.
REGIONS: dict[str, tuple[str, ...]] = {
    "east": (
        "Shanghai",
        "Hangzhou",
        "Nanjing",
        "Suzhou",
        "Ningbo",
        "Hefei",
        "Fuzhou",
        "Xiamen",
        "Jinan",
        "Qingdao",
        "Wuxi",
        "Nanchang",
    ),
    "north": ("Beijing", "Tianjin", "Shijiazhuang", "Taiyuan", "Hohhot"),
    "south": ("Guangzhou", "Shenzhen", "Dongguan", "Foshan", "Nanning", "Haikou"),
    "central": ("Wuhan", "Changsha", "Zhengzhou"),
    "southwest": ("Chengdu", "Chongqing", "Kunming", "Guiyang", "Lhasa"),
    "northwest": ("Xian", "Xi'an", "Lanzhou", "Urumqi", "Yinchuan", "Xining"),
    "northeast": ("Shenyang", "Dalian", "Harbin", "Changchun"),
}


def age_band(age: ir.IntegerValue) -> ir.StringValue:
    cases = [(age >= lo, name) for lo, name in reversed(AGE_BANDS)]
    return ibis.cases(*cases, else_=ibis.null("string"))


def region(stated: ir.StringValue, city: ir.StringValue) -> ir.StringValue:
    """The stated region, else the region of the city (null for a city not in the table)."""
    by_city = ibis.cases(
        *[(city.isin(list(cities)), name) for name, cities in REGIONS.items()],
        else_=ibis.null("string"),
    )
    return stated.fill_null(by_city)


def top_list(
    e: ir.Table, value: ir.StringValue, name: str, n: int = TOP_N, duckdb: bool = False
) -> ir.Table:
    """Per customer, the ``n`` most frequent non-empty values of ``value``, comma-separated.

    ``duckdb``: the engine is DuckDB (see ``top_counted``).
    """
    # Counted as stated first, then trimmed: a customer states few distinct values, so the
    # text is trimmed once per (customer, value) instead of twice per event (the filter and
    # the value each trimmed it, which cost more than the counting).
    t = e.filter(value.notnull()).select("customer_id", raw=value)
    raw = t.group_by("customer_id", "raw").aggregate(k=t.count())
    raw = raw.select("customer_id", "k", v=raw.raw.strip().nullif(""))
    # "Has a value" written as one condition that reads the count too (always at least 1):
    # a test of ``v`` alone was pushed by DuckDB below the grouping into the scan, which
    # trimmed every event's text again (a sixth of the portrait's scan of its facts).
    raw = raw.filter(ibis.ifelse(raw.v.isnull(), False, raw.k > 0))
    # The sum of counts as a 64-bit integer (DuckDB adds integers up in 128 bits).
    counts = raw.group_by("customer_id", "v").aggregate(k=raw.k.sum().cast("int64"))
    return top_counted(counts, "v", "k", n, name, duckdb)


# The ranking key of a counted value: the count negated (most frequent first), then the value.
RANK_KEY = dt.Struct({"k": dt.int64, "v": dt.string})


@ibis.udf.agg.builtin(name="arg_min")
def _smallest_n(arg: dt.string, key: RANK_KEY, n: dt.int64) -> dt.Array(dt.string):  # type: ignore[valid-type]
    """DuckDB's ``arg_min(arg, key, n)``: ``arg`` of the ``n`` smallest keys, smallest first."""


@ibis.udf.agg.builtin(name="arg_min")
def _smallest(arg: dt.string, key: RANK_KEY) -> dt.string:  # type: ignore[valid-type]
    """DuckDB's ``arg_min(arg, key)``: ``arg`` of the smallest key."""


def rank_key(count: ir.IntegerValue, value: ir.StringValue) -> ir.StructValue:
    """A key whose minimum is the largest ``count``, ties to the smallest ``value``."""
    return ibis.struct({"k": -count.cast("int64"), "v": value})


def top_counted(
    counts: ir.Table, value: str, count: str, n: int, name: str, duckdb: bool = False
) -> ir.Table:
    """Per customer, the ``n`` values of ``counts`` with the largest ``count`` (ties: the
    smaller value first), comma-separated in that order; ``counts`` has one row per customer
    and (non-null) value.

    On DuckDB, for text values, one grouped pass (``arg_min`` of the ``n`` smallest
    ``rank_key``) instead of a row number over every customer's values, which sorted them
    all and cost as much as the counting. Elsewhere the portable window and ``join_ranked``.
    """
    c = counts
    if duckdb and c[value].type().is_string():
        g = c.group_by("customer_id").aggregate(
            _top=_smallest_n(c[value], rank_key(c[count], c[value]), n)
        )
        return g.select("customer_id", **{name: g._top.join(",")})
    rank = ibis.row_number().over(group_by=c.customer_id, order_by=[ibis.desc(c[count]), c[value]])
    top = c.mutate(rank=rank).filter(lambda x: x.rank < n)
    return join_ranked(top, top[value], top.rank, n, name)


def top_counted_one(
    counts: ir.Table, value: str, count: str, name: str, duckdb: bool = False
) -> ir.Table:
    """``top_counted`` with ``n`` = 1: the value itself, not text (it may be of any type)."""
    c = counts
    if duckdb and c[value].type().is_string():
        g = c.group_by("customer_id").aggregate(
            _top=_smallest(c[value], rank_key(c[count], c[value]))
        )
        return g.select("customer_id", **{name: g._top})
    rank = ibis.row_number().over(group_by=c.customer_id, order_by=[ibis.desc(c[count]), c[value]])
    top = c.mutate(rank=rank).filter(lambda t: t.rank == 0)
    return top.select("customer_id", **{name: top[value]})


def join_ranked(
    top: ir.Table, value: ir.StringValue, rank: ir.IntegerValue, n: int, name: str
) -> ir.Table:
    """Per customer, ``value`` of ranks 0, 1, … n-1 (consecutive, from 0) joined by commas.

    One plain grouped pass (a column per rank, then concatenated) instead of an aggregate
    ordered by rank: engines sort every customer's group for an ordered aggregate, which
    cost more than all the counting before it.
    """
    g = top.group_by("customer_id").aggregate(
        **{f"_r{i}": value.max(where=rank == i) for i in range(n)}
    )
    text = g._r0
    for i in range(1, n):
        r = g[f"_r{i}"]
        text = text + ibis.ifelse(r.notnull(), ibis.literal(",") + r, ibis.literal(""))
    return g.select("customer_id", **{name: text})


@ibis.udf.scalar.builtin(name="epoch_us")
def _epoch_us(ts: dt.Timestamp(timezone="UTC", scale=6)) -> dt.int64:  # type: ignore[valid-type]
    """DuckDB's microseconds since 1970 of a timestamp (a plain integer read, no calendar)."""


def _pmod(a: ir.IntegerValue, m: int) -> ir.IntegerValue:
    return ((a % m) + m) % m


def local_hour_weekday(
    ts: ir.TimestampValue, offset_s: ir.IntegerValue, duckdb: bool = False
) -> tuple[ir.IntegerValue, ir.IntegerValue]:
    """The hour (0–23) and weekday (Monday = 0) of ``ts`` shifted by ``offset_s`` seconds.

    On DuckDB, hour and weekday of a time-zone-aware timestamp go through its ICU calendar
    (about ten times the cost of the arithmetic): there they are computed from the epoch
    microseconds instead (1970-01-01 was a Thursday), the same numbers. Elsewhere the
    portable calendar functions.
    """
    if not duckdb:
        local = ts + offset_s.as_interval("s")
        return local.hour().cast("int32"), local.day_of_week.index().cast("int16")
    secs = _epoch_us(ts) // 1_000_000 + offset_s
    of_day = _pmod(secs, 86_400)
    days = (secs - of_day) // 86_400
    return (of_day // 3_600).cast("int32"), _pmod(days + 3, 7).cast("int16")


def active_times(e: ir.Table, tz: ir.Table, offsets: ir.Table, duckdb: bool = False) -> ir.Table:
    """Active hours (24 counts, local hour 0 first), the top hour and the top weekday.

    ``e`` holds the customer's events; ``tz`` the time zone of each customer (column ``tz``);
    ``offsets`` the UTC offsets of those zones (``localtime.offsets_table``). Identify calls
    are left out: they are records arriving, not the person acting. Ties go to the earlier
    hour or weekday. ``duckdb``: the engine is DuckDB (see ``local_hour_weekday``).
    """
    e = e.filter(e.type != "identify").select("customer_id", "timestamp")
    # Each customer's offset periods first (customers × a zone's few transitions), then the
    # events by customer and time: joined the other way round, DuckDB matched every event
    # with every zone's periods by time alone (five times the events) before the customer.
    zo = offsets.join(tz, "tz")
    zo = zo.select("customer_id", "valid_from", "valid_to", "offset_s")
    j = e.join(
        zo,
        [
            e.customer_id == zo.customer_id,
            e.timestamp >= zo.valid_from,
            e.timestamp < zo.valid_to,
        ],
    )
    hour, dow = local_hour_weekday(j.timestamp, j.offset_s, duckdb)
    t = j.select("customer_id", hour=hour, dow=dow)
    # One pass over the events into (hour, weekday) cells; hours and weekdays add those up.
    cells = t.group_by("customer_id", "hour", "dow").aggregate(k=t.count())
    if duckdb:
        return _active_from_cells(cells)
    hours = cells.group_by("customer_id", "hour").aggregate(k=cells.k.sum().cast("int64"))
    # The top hour and weekday are plain maxima of one number per row that orders by count,
    # then by the earlier hour or day (``_top_key``), not a ranking window per customer:
    # the two windows cost as much as the rest of this function. Each histogram cell is the
    # maximum of ``k`` or 0 over the customer's hours (one row per hour): a maximum stays a
    # 64-bit integer where DuckDB adds integers up in 128 bits, and 24 filtered aggregates
    # cost more than plain ones.
    hist = hours.group_by("customer_id").aggregate(
        _top=_top_key(hours.k, hours.hour, 24).max(),
        **{f"h{h}": ibis.ifelse(hours.hour == h, hours.k, 0).max() for h in range(24)},
    )
    text = ibis.literal(",").join([hist[f"h{h}"].cast("string") for h in range(24)])
    hist = hist.select("customer_id", active_hours=text, active_hour=_top_slot(hist._top, 24))
    days = cells.group_by("customer_id", "dow").aggregate(k=cells.k.sum().cast("int64"))
    days = days.group_by("customer_id").aggregate(_top=_top_key(days.k, days.dow, 7).max())
    dow_top = _top_slot(days._top, 7)
    weekday = ibis.cases(*[(dow_top == i, d) for i, d in enumerate(WEEKDAYS)])
    top_day = days.select("customer_id", active_weekday=weekday)
    out = hist.join(top_day, "customer_id")
    return out.select("customer_id", "active_hours", "active_hour", "active_weekday")


def _active_from_cells(cells: ir.Table) -> ir.Table:
    """``active_times``' columns from the (customer, hour, weekday) counts in one grouped pass.

    On DuckDB: the 24 hour and 7 weekday counts as sums of the cells (added as doubles,
    exact below 2**53, where integers would be added in 128 bits), the top hour and weekday
    the greatest ``_top_key`` of those columns (a slot with no events has key below any
    counted one, and everyone here has an event). Adding up hours and weekdays separately,
    then a grouped pass for each, cost twice as much: this was a third of the portrait's
    per-customer work.
    """
    c = cells
    k = c.k.cast("float64")
    g = c.group_by("customer_id").aggregate(
        **{f"h{h}": ibis.ifelse(c.hour == h, k, 0.0).sum() for h in range(24)},
        **{f"d{d}": ibis.ifelse(c.dow == d, k, 0.0).sum() for d in range(7)},
    )
    hours = [g[f"h{h}"].cast("int64") for h in range(24)]
    days = [g[f"d{d}"].cast("int64") for d in range(7)]
    top_hour = ibis.greatest(*[_top_key(n, ibis.literal(h), 24) for h, n in enumerate(hours)])
    top_day = _top_slot(
        ibis.greatest(*[_top_key(n, ibis.literal(d), 7) for d, n in enumerate(days)]), 7
    )
    return g.select(
        "customer_id",
        active_hours=ibis.literal(",").join([n.cast("string") for n in hours]),
        active_hour=_top_slot(top_hour, 24),
        active_weekday=ibis.cases(*[(top_day == i, d) for i, d in enumerate(WEEKDAYS)]),
    )


def _top_key(k: ir.IntegerValue, slot: ir.IntegerValue, slots: int) -> ir.IntegerValue:
    """A number whose maximum picks the largest count ``k``, ties to the smallest ``slot``.

    ``slot`` is in 0..slots-1: ``k * slots + (slots - 1 - slot)`` orders by ``k`` first
    (the slot part is below ``slots``), then by the earlier slot; ``_top_slot`` decodes it.
    """
    return k.cast("int64") * slots + (slots - 1 - slot.cast("int64"))


def _top_slot(key: ir.IntegerValue, slots: int) -> ir.IntegerValue:
    """The slot of a ``_top_key`` (keys are never negative: counts are at least 1)."""
    return (slots - 1 - key % slots).cast("int32")


def named_member(props: ir.JSONValue) -> ir.StringValue:
    """The member a relation event names (the first non-empty of ``RELATION_PROPERTIES``)."""
    return functools.reduce(
        lambda a, b: a.fill_null(b),
        [props[p].unwrap_as("string").strip().nullif("") for p in RELATION_PROPERTIES],
    )


def relationships(e: ir.Table, identity_map: ir.Table) -> ir.Table:
    """Referrals made, and first- and second-degree network size (see ``network``).

    ``e`` holds raw events (with ``properties``); the named member is parsed here.
    """
    rel = e.filter(e.event.isin(list(RELATION_EVENTS)))
    rel = rel.select("customer_id", "event", member=named_member(rel.properties.cast("json")))
    return network(rel, identity_map)


def network(e: ir.Table, identity_map: ir.Table) -> ir.Table:
    """Referrals made, and first- and second-degree network size.

    ``e`` holds events with ``customer_id``, ``event`` and ``member`` (the member a relation
    event names, ``named_member``). The network is undirected: a referral (or a share naming
    a person) links the sender and the member it names, resolved to a customer through the
    identity map. First degree = distinct customers linked to the person; second degree =
    distinct customers two links away that are neither the person nor first degree. Members
    not (yet) resolved to a customer are not counted in the network (referrals_made still
    counts the event).
    """
    rel = e.filter(e.event.isin(list(RELATION_EVENTS)))
    made = rel.group_by("customer_id").aggregate(
        referrals_made=(rel.event == "Referral Sent").sum().cast("int64"),
        shares=(rel.event == "Product Shared").sum().cast("int64"),
    )
    out = rel.select(a="customer_id", member="member").filter(lambda x: x.member.notnull())
    m = identity_map.filter((identity_map.id_type == "member_id") & ~identity_map.quarantined)
    m = m.select(member=m.id_value, b=m.customer_id)
    directed = out.join(m, "member").select("a", "b")
    reverse = directed.select(a=directed.b, b=directed.a)
    edges = directed.union(reverse, distinct=True)
    edges = edges.filter(edges.a != edges.b)
    first = edges.group_by("a").aggregate(network_first=edges.count())
    e2 = edges.view()
    two = edges.join(e2, edges.b == e2.a).select(a=edges.a, c=e2.b)
    two = two.filter(two.a != two.c).distinct()
    two = two.anti_join(edges, [two.a == edges.a, two.c == edges.b])
    second = two.group_by("a").aggregate(network_second=two.count())
    net = first.left_join(second, "a").select(
        customer_id=first.a, network_first=first.network_first, network_second=second.network_second
    )
    res = made.outer_join(net, "customer_id")
    return res.select(
        customer_id=res.customer_id.fill_null(res.customer_id_right),
        referrals_made=res.referrals_made,
        shares=res.shares,
        network_first=res.network_first,
        network_second=res.network_second,
    )
