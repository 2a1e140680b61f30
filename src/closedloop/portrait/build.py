"""Building the customer portrait, written once in Ibis so every engine computes it the same way.

One pass over the customer's events (joined to ``event_customers``) gives behaviour and
transactions; the latest identify traits give demographics; the identity map gives contact
points. Everything is O(events) with a group-by per customer. The events' JSON (time zone,
consent, style, relations) is parsed once into a scratch table (``event_facts``) that every
part reads: parsing it again per part made the build three times slower.
"""

from __future__ import annotations

from datetime import UTC, datetime

import ibis
import ibis.expr.datatypes as dt
import ibis.expr.types as ir

from closedloop.core.clock import Clock
from closedloop.core.definitions.accounts import AccountsConfig
from closedloop.core.engine import Engine
from closedloop.portrait import (
    localtime,
    tables,  # noqa: F401  (declares `profiles`)
)
from closedloop.portrait.accounts import build_accounts
from closedloop.portrait.extras import (
    RELATION_EVENTS,
    RELATIONSHIP_COLUMNS,
    active_times,
    age_band,
    named_member,
    network,
    region,
    top_counted_one,
    top_list,
)
from closedloop.portrait.lifecycle import ladder_stage, lifecycle_stage, rfm_group, score

ORDER_EVENT = "Order Completed"
SUBSCRIPTION_EVENTS = ("Unsubscribed", "Subscribed")
DEMOGRAPHIC_TRAITS = ("name", "gender", "birthday", "city", "region", "tier", "member_id", "points")


def customer_events(engine: Engine) -> ir.Table:
    """Events with the customer each belongs to (events without a customer are left out)."""
    ev = engine.table("events")
    ec = engine.table("event_customers")
    return ev.join(ec, "message_id")


def json_text(v: ir.JSONValue) -> ir.StringValue:
    """A JSON string, integer or number as trimmed text (null for empty, objects, arrays)."""
    text = v.unwrap_as("string").strip().nullif("")
    return text.fill_null(v.unwrap_as("int64").cast("string")).fill_null(
        v.unwrap_as("float64").cast("string")
    )


def exact_sum(v: ir.NumericValue, where: ir.BooleanValue | None = None) -> ir.FloatingValue:
    """A sum that does not depend on row order: each value to 6 decimals, added exactly.

    Binary floating point gives 0.1 + 0.2 + 0.3 != 0.3 + 0.2 + 0.1, and engines add rows in
    whatever order their threads (or an incremental refresh) read them: equal spends then
    differ in the last digit and RFM ranks split a tie differently from run to run.
    """
    return v.cast("decimal(38, 6)").sum(where=where).cast("float64")


def _latest_traits(events: ir.Table, duckdb: bool = False) -> ir.Table:
    """Per customer, the most recent non-empty value of each demographic trait.

    On DuckDB the traits are read from one parse of each document (``_json_extract_paths``)
    instead of one per trait and type tried.
    """
    ident = events.filter(events.traits.notnull())
    if duckdb:
        paths = ibis.literal(['$."' + n + '"' for n in DEMOGRAPHIC_TRAITS])
        ident = ident.mutate(_tr=_json_extract_paths(ident.traits, paths))
        cols = {n: json_text(ident._tr[i]) for i, n in enumerate(DEMOGRAPHIC_TRAITS)}
    else:
        j = ident.traits.cast("json")
        cols = {name: json_text(j[name]) for name in DEMOGRAPHIC_TRAITS}
    t = ident.select("customer_id", "timestamp", **cols)
    return t.group_by("customer_id").aggregate(
        **{n: t[n].argmax(t.timestamp, where=t[n].notnull()) for n in DEMOGRAPHIC_TRAITS}
    )


# The fields of ``context`` the portrait reads, as DuckDB JSON paths (``context_fields``).
CTX_PATHS = ['$."timezone"', '$."consent"."categoryPreferences"."marketing"']


@ibis.udf.scalar.builtin(name="json_extract")
def _json_extract_paths(doc: str, paths: dt.Array(dt.string)) -> dt.Array(dt.JSON):  # type: ignore[valid-type]
    """DuckDB's values at several ``paths`` of JSON text, from one parse (null where absent)."""


def context_fields(events: ir.Table, duckdb: bool = False) -> ir.Table:
    """``events`` with ``tz`` (``context.timezone``) and ``consent`` (the Segment consent
    spec's ``context.consent.categoryPreferences.marketing``): null unless a string and a
    boolean.

    On DuckDB one parse of ``context`` gives both (a list of the values at their paths):
    Ibis compiles each lookup to a cast of the whole document and a typed extraction, each
    parsing it again, and the substring test that spared most events the consent parse
    cost as much as a parse. Elsewhere the portable lookups, consent only where it may be.
    """
    if duckdb:
        t = events.mutate(_ctx=_json_extract_paths(events.context, ibis.literal(CTX_PATHS)))
        return t.mutate(
            tz=t._ctx[0].unwrap_as("string"), consent=t._ctx[1].unwrap_as("boolean")
        ).drop("_ctx")
    ctx = events.context.cast("json")
    return events.mutate(
        tz=ctx["timezone"].unwrap_as("string"),
        consent=ibis.ifelse(
            may_hold(events.context, "marketing"),
            ctx["consent"]["categoryPreferences"]["marketing"].unwrap_as("boolean"),
            ibis.null("boolean"),
        ),
    )


def event_facts(events: ir.Table, duckdb: bool = False) -> ir.Table:
    """Each event's columns that the portrait reads, with its JSON fields parsed once.

    Every part of the portrait reads this one relation, so the compiled query holds it once
    (a common table expression the engine evaluates once) instead of parsing ``context`` and
    ``properties`` again in every part: JSON parsing was most of the build's time. Fields
    that only some events use are parsed only for those events. ``duckdb``: the engine is
    DuckDB (see ``context_fields``).
    """
    events = context_fields(events, duckdb)
    props = events.properties.cast("json")
    subs = events.event.isin(list(SUBSCRIPTION_EVENTS))
    return events.select(
        "message_id",
        "customer_id",
        "timestamp",
        "type",
        "event",
        "channel",
        "source",
        "category",
        "order_id",
        "revenue",
        "coupon",
        "traits",
        "tz",
        "consent",
        sub_channel=ibis.ifelse(subs, props["channel"].unwrap_as("string"), ibis.null("string")),
        style=ibis.ifelse(
            may_hold(events.properties, "style"),
            props["style"].unwrap_as("string"),
            ibis.null("string"),
        ),
        member=ibis.ifelse(
            events.event.isin(list(RELATION_EVENTS)), named_member(props), ibis.null("string")
        ),
    )


def may_hold(text: ir.StringValue, key: str) -> ir.BooleanValue:
    """False only when the JSON ``text`` cannot hold an object key ``key`` (at any depth).

    A cheap substring test that spares parsing documents that lack a rare field (consent,
    style): a key is written ``"key"`` verbatim unless a ``\\u`` escape spells one of its
    characters, so no document holding the key is ever skipped. (Fields most events carry,
    like the time zone, are parsed unguarded: inside a condition the engines parse twice.)
    """
    return text.contains(f'"{key}"') | text.contains("\\u")


def _contacts(engine: Engine, customers: ir.Table | None = None) -> ir.Table:
    """Per customer, the most recently seen email and phone (quarantined ones excluded).

    ``customers`` limits it to those customers (their identifiers only are grouped).
    """
    m = engine.table("identity_map")
    m = m.filter(~m.quarantined)
    if customers is not None:
        m = m.semi_join(customers, "customer_id")
    return m.group_by("customer_id").aggregate(
        email=m.id_value.argmax(m.last_seen, where=m.id_type == "email"),
        phone=m.id_value.argmax(m.last_seen, where=m.id_type == "phone"),
        member_id_seen=m.id_value.argmax(m.last_seen, where=m.id_type == "member_id"),
    )


def _behaviour(facts: ir.Table) -> ir.Table:
    """One pass over the events: behaviour, transactions, consent and channel opt-outs.

    Consent is the Segment consent spec's ``context.consent.categoryPreferences.marketing``
    (latest stated value wins; never stated = null, which the contact policy treats as no
    consent). A channel is opted out when the latest ``Unsubscribed``/``Subscribed`` event for
    that channel is an ``Unsubscribed``.
    """
    e = facts
    is_order = e.event == ORDER_EVENT
    subs = e.event.isin(list(SUBSCRIPTION_EVENTS))
    unsubscribed = e.event == "Unsubscribed"
    return e.group_by("customer_id").aggregate(
        first_seen=e.timestamp.min(),
        last_seen=e.timestamp.max(),
        events=e.count(),
        # Counts with a condition, not sums of booleans: DuckDB adds those up in 128 bits.
        product_views=e.count(where=e.event == "Product Viewed"),
        cart_adds=e.count(where=e.event == "Product Added"),
        favourites=e.count(where=e.event == "Product Added to Wishlist"),
        searches=e.count(where=e.event == "Products Searched"),
        orders=e.order_id.nunique(where=is_order),
        revenue=exact_sum(e.revenue, where=is_order).fill_null(0.0),
        coupon_orders=e.order_id.nunique(where=is_order & e.coupon.notnull() & (e.coupon != "")),
        first_order_at=e.timestamp.min(where=is_order),
        last_order_at=e.timestamp.max(where=is_order),
        consent_marketing=e.consent.argmax(e.timestamp, where=e.consent.notnull()),
        email_opt_out=unsubscribed.argmax(e.timestamp, where=subs & (e.sub_channel == "email")),
        sms_opt_out=unsubscribed.argmax(e.timestamp, where=subs & (e.sub_channel == "sms")),
    )


def most_frequent(
    events: ir.Table,
    column: str,
    name: str,
    where: ir.BooleanValue | None = None,
    duckdb: bool = False,
) -> ir.Table:
    """Per customer, the most frequent non-null value of ``column``; ties go to the smallest.

    SQL's ``mode()`` breaks ties as each engine likes, so the same data would give another
    "preferred channel" on PostgreSQL than on DuckDB; counting and ranking explicitly does not.
    ``duckdb``: the engine is DuckDB (a grouped pass instead of a window: ``top_counted``).
    """
    e = events if where is None else events.filter(where)
    e = e.filter(e[column].notnull())
    counts = e.group_by("customer_id", column).aggregate(n=e.count())
    return top_counted_one(counts, column, "n", name, duckdb)


def _age(birthday: ir.DateValue, as_of: datetime) -> ir.IntegerValue:
    """Completed years (a calendar year-difference would count a birthday not yet reached)."""
    before_birthday = (as_of.month * 100 + as_of.day) < (birthday.month() * 100 + birthday.day())
    return (as_of.year - birthday.year() - ibis.ifelse(before_birthday, 1, 0)).cast("int32")


def zones_in_use(engine: Engine, events: ir.Table, default_tz: str) -> tuple[list[str], datetime]:
    """The valid time zones the events state (plus the default) and the earliest event time."""
    tz = events.context.cast("json")["timezone"].unwrap_as("string")
    return _zones(events.select("timestamp", tz=tz), default_tz)


def _zones(facts: ir.Table, default_tz: str) -> tuple[list[str], datetime]:
    """``zones_in_use`` from events whose zone is parsed already (column ``tz``).

    One grouped pass (zone → earliest event) instead of a distinct and a separate minimum:
    the zone names must reach Python (``zoneinfo`` gives their offsets), nothing else.
    """
    t = facts.group_by("tz").aggregate(lo=facts.timestamp.min()).to_pyarrow()
    names = {str(z) for z in t.column("tz").to_pylist() if z}
    names.add(default_tz)
    starts = [x for x in t.column("lo").to_pylist() if x is not None]
    lo = min(starts) if starts else None
    return sorted(z for z in names if localtime.zone(z) is not None), lo or datetime.now(UTC)


def base_expr(
    engine: Engine,
    as_of: datetime,
    offsets: ir.Table,
    zones: list[str],
    default_tz: str = "UTC",
    customers: ir.Table | None = None,
    with_relationships: bool = True,
    events: ir.Table | None = None,
    facts: ir.Table | None = None,
) -> ir.Table:
    """Per customer, everything the events and identify calls say (nothing that ages).

    ``customers`` (a table with a ``customer_id`` column) limits the work to those customers:
    an incremental refresh passes the customers whose events changed. Relationships depend on
    other customers' events too, so a refresh leaves them out here and recomputes them for all.
    ``events`` may give those customers' events already selected (a refresh materialises them
    once instead of joining the whole log in every part of this expression). ``facts`` may
    give ``event_facts`` of the events already materialised (then ``events`` is not read).
    """
    ev = customer_events(engine) if events is None else events
    ev = ev.filter(ev.timestamp <= as_of)
    cust = engine.table("customers").select("customer_id")
    contacts = _contacts(engine, customers)
    if customers is not None:
        cust = cust.semi_join(customers, "customer_id")
        ev = ev.semi_join(customers, "customer_id")
    if facts is not None:
        f = facts.filter(facts.timestamp <= as_of)
        f = f if customers is None else f.semi_join(customers, "customer_id")
    else:
        # Materialised once: every part below reads it, and the engines would otherwise
        # evaluate it (and parse the JSON) once per part.
        f = engine.scratch("portrait_facts", event_facts(ev, engine.backend == "duckdb"))
    b = _behaviour(f)
    t = cust.left_join(b, "customer_id").drop("customer_id_right")
    duckdb = engine.backend == "duckdb"
    zone = most_frequent(f, "tz", "timezone", duckdb=duckdb)
    # Everyone with events has a zone for active times: the stated one if valid, else default.
    tz = b.select("customer_id").left_join(zone, "customer_id")
    tz = tz.select(
        "customer_id",
        tz=ibis.ifelse(tz.timezone.isin(zones), tz.timezone, ibis.literal(default_tz)),
    )
    parts = [
        most_frequent(f, "channel", "preferred_channel", duckdb=duckdb),
        most_frequent(f, "source", "preferred_touchpoint", duckdb=duckdb),
        most_frequent(f, "category", "top_category", f.event == ORDER_EVENT, duckdb),
        top_list(f, f.category, "top_categories", duckdb=duckdb),
        top_list(f, f.style, "top_styles", duckdb=duckdb),
        _latest_traits(f, duckdb),
        contacts,
        zone,
        active_times(f, tz, offsets, duckdb),
    ]
    if with_relationships:
        parts.append(network(f, engine.table("identity_map")))
    for part in parts:
        t = t.left_join(part, "customer_id").drop("customer_id_right")
    orders = t.orders.fill_null(0)
    span_days = (t.last_order_at.epoch_seconds() - t.first_order_at.epoch_seconds()) / 86400.0
    t = t.mutate(
        orders=orders,
        events=t.events.fill_null(0),
        product_views=t.product_views.fill_null(0),
        cart_adds=t.cart_adds.fill_null(0),
        favourites=t.favourites.fill_null(0),
        searches=t.searches.fill_null(0),
        revenue=t.revenue.fill_null(0.0),
        member_id=t.member_id.fill_null(t.member_id_seen),
        email_opt_out=t.email_opt_out.fill_null(False),
        sms_opt_out=t.sms_opt_out.fill_null(False),
        birthday=t.birthday.cast("date"),
        region=region(t.region, t.city),
        points=t.points.cast("float64").round().cast("int64"),
        avg_order_value=ibis.ifelse(orders > 0, t.revenue / orders, ibis.null("float64")),
        coupon_share=ibis.ifelse(orders > 0, t.coupon_orders / orders, ibis.null("float64")),
        order_interval_days=ibis.ifelse(orders > 1, span_days / (orders - 1), ibis.null("float64")),
    )
    return fill_relationships(t) if with_relationships else t


def fill_relationships(t: ir.Table) -> ir.Table:
    """No referral or share is a count of 0, not unknown."""
    return t.mutate(**{c: t[c].fill_null(0) for c in RELATIONSHIP_COLUMNS})


def finish(base: ir.Table, as_of: datetime) -> ir.Table:
    """What depends on the clock or on all customers: age, recency, RFM, lifecycle.

    Computed from the stored per-customer columns alone (no events), so a refresh can redo it
    for everyone cheaply: windows roll forward and RFM ranks stay relative to all customers.
    ``base`` is read twice (the ranks are joined back to it): give a materialised table, or
    an engine may compute the whole expression twice.
    """
    t = base
    as_of_date = ibis.literal(as_of.date())
    recency = as_of_date.delta(t.last_order_at.date(), unit="day").cast("int32")
    since_first = as_of_date.delta(t.first_order_at.date(), unit="day").cast("int32")
    age = _age(t.birthday, as_of)
    t = t.mutate(
        age=age, age_band=age_band(age), recency_days=recency, days_since_first=since_first
    )
    # Ranked on the four columns they need, then joined back: a window over the whole
    # profile row made the engine sort every column three times (a tenth of the build).
    scores = rfm_scores(t.select("customer_id", "recency_days", "orders", "revenue"))
    scores = scores.select("customer_id", "r_score", "f_score", "m_score")
    t = t.left_join(scores, "customer_id").drop("customer_id_right")
    return t.mutate(
        rfm_group=rfm_group(t.r_score, t.f_score),
        lifecycle_stage=lifecycle_stage(t.orders, t.recency_days, t.days_since_first),
        ladder_stage=ladder_stage(t.orders, t.member_id),
        computed_at=ibis.literal(as_of).cast("timestamp('UTC', 6)"),
    )


def rfm_scores(t: ir.Table) -> ir.Table:
    """``t`` (with recency_days, orders, revenue) plus 1–5 R, F and M scores among buyers."""
    has_orders = t.orders > 0  # read from `t` as given: windows must see this relation
    return t.mutate(
        r_score=score(t.recency_days, has_orders, descending=True),
        f_score=score(t.orders, has_orders),
        m_score=score(t.revenue, has_orders),
    )


def rfm_expr(engine: Engine, as_of: datetime) -> ir.Table:
    """RFM alone, for customers with orders: recency_days, orders, revenue and the scores.

    The same numbers as the profile's (``finish`` uses ``rfm_scores`` too) without the rest of
    the portrait, for tags, exports and the benchmark against hand-written SQL.
    """
    ev = customer_events(engine)
    o = ev.filter((ev.event == ORDER_EVENT) & (ev.timestamp <= as_of))
    t = o.group_by("customer_id").aggregate(
        last_order_at=o.timestamp.max(),
        orders=o.order_id.nunique(),
        revenue=exact_sum(o.revenue).fill_null(0.0),
    )
    t = t.filter(t.orders > 0)
    recency = ibis.literal(as_of.date()).delta(t.last_order_at.date(), unit="day").cast("int32")
    return rfm_scores(t.mutate(recency_days=recency))


def parse_facts(engine: Engine) -> ir.Table:
    """Every attributed event with its JSON parsed (``event_facts``), materialised once.

    All events, also those after the clock: a full build stores this relation as the
    snapshot a refresh starts from (``portrait_seen``), and ``base_expr`` reads only the
    events up to its clock.
    """
    facts = event_facts(customer_events(engine), engine.backend == "duckdb")
    return engine.scratch("portrait_facts", facts)


def _facts_as_of(engine: Engine, as_of: datetime) -> ir.Table:
    """The customers' events up to ``as_of`` with their JSON parsed, materialised once."""
    facts = parse_facts(engine)
    return facts.filter(facts.timestamp <= as_of)


def profile_expr(engine: Engine, as_of: datetime, default_tz: str = "UTC") -> ir.Table:
    """The ``profiles`` table as one Ibis expression, evaluated as of ``as_of``.

    Time-zone offsets are a small in-memory table; use ``build_profiles`` to write the
    result (it releases that table afterwards). The parsed events are a scratch table.
    """
    facts = _facts_as_of(engine, as_of)
    zones, lo = _zones(facts, default_tz)
    offsets = ibis.memtable(localtime.offsets_table(zones, lo, as_of))
    return finish(base_expr(engine, as_of, offsets, zones, default_tz, facts=facts), as_of)


def build_profiles(
    engine: Engine,
    clock: Clock | None = None,
    default_tz: str = "UTC",
    accounts: AccountsConfig | None = None,
    facts: ir.Table | None = None,
) -> int:
    """Rebuild ``profiles`` as of the clock's now; returns the number of customers.

    ``default_tz`` is the time zone of people whose events state none (the project's);
    ``accounts`` says where B2B contacts' roles are read (the project's accounts.yaml);
    ``facts`` may give ``parse_facts`` already materialised (a full build keeps them as
    the refresh snapshot).
    """
    as_of = (clock or Clock()).now()
    facts = parse_facts(engine) if facts is None else facts
    facts = facts.filter(facts.timestamp <= as_of)
    zones, lo = _zones(facts, default_tz)
    with engine.temporary(localtime.offsets_table(zones, lo, as_of)) as offsets:
        # Materialised: ``finish`` reads it twice.
        base = engine.scratch(
            "portrait_base", base_expr(engine, as_of, offsets, zones, default_tz, facts=facts)
        )
        with engine.zstd_writes():  # half the write's CPU on DuckDB (see there)
            engine.replace("profiles", finish(base, as_of))
    build_accounts(engine, as_of, accounts)  # B2B accounts and contacts (portrait.accounts)
    return engine.count("profiles")
