"""Tables written by ``portrait``: one profile row per customer."""

from __future__ import annotations

from closedloop.core.catalogue import Erasure, TableSpec, declare

TS = "timestamp('UTC', 6)"

# What the portrait reads from one event (``build.event_facts``): columns of the log, and
# fields of its JSON parsed once (time zone, consent, subscription channel, style, the
# member a relation event names).
FACT_COLUMNS = {
    "timestamp": TS,
    "type": "string",
    "event": "string",
    "channel": "string",
    "source": "string",
    "category": "string",
    "order_id": "string",
    "revenue": "float64",
    "coupon": "string",
    "traits": "string",
    "tz": "string",
    "consent": "boolean",
    "sub_channel": "string",
    "style": "string",
    "member": "string",
}

PROFILES = declare(
    TableSpec(
        name="profiles",
        stage="portrait",
        description="The 360° portrait: demographics, behaviour, transactions, RFM, lifecycle.",
        columns={
            "customer_id": "string",
            # demographics (latest identify traits) and contact points (identity map)
            "name": "string",
            "gender": "string",
            "birthday": "date",
            "age": "int32",
            "age_band": "string",
            "city": "string",
            "region": "string",
            # membership (identify traits)
            "tier": "string",
            "points": "int64",
            "member_id": "string",
            "email": "string",
            "phone": "string",
            # contact preferences: where and whether we may reach the person
            "timezone": "string",
            "consent_marketing": "boolean",
            "email_opt_out": "boolean",
            "sms_opt_out": "boolean",
            # behaviour
            "first_seen": TS,
            "last_seen": TS,
            "events": "int64",
            "product_views": "int64",
            "cart_adds": "int64",
            "favourites": "int64",
            "searches": "int64",
            "preferred_channel": "string",
            "preferred_touchpoint": "string",  # the source (web, app, pos, …) used most
            "top_category": "string",  # most frequent category among orders
            "top_categories": "string",  # top 3 categories of all events, comma-separated
            "top_styles": "string",  # top 3 properties.style values, comma-separated
            # when, in the person's time zone (the project's when events state none)
            "active_hours": "string",  # 24 comma-separated event counts, local hour 0 first
            "active_hour": "int32",
            "active_weekday": "string",
            # transactions
            "orders": "int64",
            "revenue": "float64",
            "avg_order_value": "float64",
            "coupon_share": "float64",
            "order_interval_days": "float64",  # mean days between orders (2+ orders)
            "first_order_at": TS,
            "last_order_at": TS,
            "recency_days": "int32",
            "days_since_first": "int32",
            # relationships: referrals and shares naming a member, as an undirected network
            "referrals_made": "int64",
            "shares": "int64",
            "network_first": "int64",
            "network_second": "int64",
            # RFM and lifecycle
            "r_score": "int32",
            "f_score": "int32",
            "m_score": "int32",
            "rfm_group": "string",
            "lifecycle_stage": "string",
            "ladder_stage": "string",
            "computed_at": TS,
        },
        key=("customer_id",),
        erasure=Erasure.DELETE_BY_CUSTOMER,
        erasure_column="customer_id",
    )
)

COMPUTED_TRAITS = declare(
    TableSpec(
        name="computed_traits",
        stage="portrait",
        description="Values of the project's computed traits, one row per (customer, trait).",
        columns={
            "customer_id": "string",
            "trait": "string",
            "number_value": "float64",
            "text_value": "string",
            "computed_at": TS,
        },
        key=("customer_id", "trait"),
        erasure=Erasure.DELETE_BY_CUSTOMER,
        erasure_column="customer_id",
    )
)

PORTRAIT_SEEN = declare(
    TableSpec(
        name="portrait_seen",
        stage="portrait",
        description="The events the last portrait build read: their attribution to a customer, "
        "which a refresh compares with event_customers to find the customers whose events "
        "changed, and the facts the portrait reads from each (its JSON parsed once), so a "
        "refresh parses only new events.",
        columns={"message_id": "string", "customer_id": "string", **FACT_COLUMNS},
        key=("message_id",),
        erasure=Erasure.DELETE_BY_CUSTOMER,
        erasure_column="customer_id",
    )
)

PORTRAIT_RUNS = declare(
    TableSpec(
        name="portrait_runs",
        stage="portrait",
        description="One row per portrait build or refresh: its clock (the watermark of the "
        "next refresh), mode, how many customers it recomputed, and the traits it used.",
        columns={
            "finished_at": TS,
            "as_of": TS,
            "mode": "string",  # 'full' or 'incremental'
            "customers": "int64",
            "recomputed": "int64",
            "traits_digest": "string",
            "seconds": "float64",
        },
        key=("finished_at",),
        erasure=Erasure.NONE,
    )
)

PORTRAIT_MARKS = declare(
    TableSpec(
        name="portrait_marks",
        stage="portrait",
        description="Beside a portrait run (same finished_at): what its next refresh needs to "
        "find changed attributions without comparing the whole snapshot — the identity run "
        "and watermark it had read up to, and the count and XOR of 64-bit hashes of the "
        "snapshot's (message, customer) pairs, the check the shortcut must pass.",
        columns={
            "finished_at": TS,  # the run's (portrait_runs.finished_at)
            "identity_seq": "int64",  # identity_runs.seq read before event_customers
            "received": TS,  # identity_runs.watermark then (null: unknown)
            "pairs": "int64",
            "pairs_xor": "int64",  # the unsigned XOR, stored as the same 64 bits signed
            "diff": "string",  # how this run found its diff: 'shortcut', or why not
        },
        key=("finished_at",),
        erasure=Erasure.NONE,
    )
)
