"""Accounts (B2B): one profile per ``groupId``, and who its contacts are, with their roles.

Segment's ``group`` call says "this user belongs to account G" and describes G with traits
(collect keeps them in ``properties``: ``{"groupId": G, "traits": {...}}``); later events may
name the account they happened in with ``context.groupId``. From that:

* ``account_contacts`` — one row per (account, customer) that sent a group call for the
  account: the contact's role (read where ``accounts.yaml`` says, mapped to decision_maker,
  finance, it or user) and when the contact was first and last seen in that account (group
  calls and events naming it);
* ``accounts`` — per account, the latest non-empty value of each trait (merged per field, as
  profile traits are: a later call stating only ``employees`` keeps the known industry), the
  number of contacts by role, and the behaviour of all its contacts: events, orders, revenue
  and last activity. An event of a contact counts for the account it names in
  ``context.groupId``; an event naming no account counts for every account of the contact
  (a person in two companies' accounts places orders for one of them, and we cannot tell
  which).

Both are rebuilt whole from the events on every portrait build and refresh: only the events
of contacts are read, and a project without group calls costs one filtered count. So a
refresh equals a full build by construction.
"""

from __future__ import annotations

import functools
from datetime import datetime

import ibis
import ibis.expr.types as ir

from closedloop.core.catalogue import Erasure, TableSpec, declare
from closedloop.core.definitions.accounts import AccountsConfig, RoleFrom, normal_words
from closedloop.core.engine import Engine

TS = "timestamp('UTC', 6)"
ORDER_EVENT = "Order Completed"
# Group traits kept as account columns: Segment's reserved ones and the B2B firmographics.
TEXT_TRAITS = ("name", "industry", "region", "size", "current_software", "plan", "website")
ROLE_COUNTS = {
    "decision_maker": "decision_makers",
    "finance": "finance_contacts",
    "it": "it_contacts",
    "user": "user_contacts",
}

ACCOUNTS = declare(
    TableSpec(
        name="accounts",
        stage="portrait",
        description="One row per account (groupId): latest group traits merged per field, "
        "contacts by role, and the behaviour of all its contacts.",
        columns={
            "account_id": "string",
            **{t: "string" for t in TEXT_TRAITS},
            "employees": "int64",
            "first_seen": TS,
            "last_seen": TS,
            "contacts": "int64",
            **{c: "int64" for c in ROLE_COUNTS.values()},
            "events": "int64",
            "orders": "int64",
            "revenue": "float64",
            "last_active": TS,
            "computed_at": TS,
        },
        key=("account_id",),
        erasure=Erasure.RECOMPUTE,
    )
)

ACCOUNT_CONTACTS = declare(
    TableSpec(
        name="account_contacts",
        stage="portrait",
        description="Which customers are contacts of which account, with their role "
        "(decision_maker, finance, it, user) and the text it was read from.",
        columns={
            "account_id": "string",
            "customer_id": "string",
            "role": "string",
            "role_text": "string",
            "first_seen": TS,
            "last_seen": TS,
        },
        key=("account_id", "customer_id"),
        erasure=Erasure.DELETE_BY_CUSTOMER,
        erasure_column="customer_id",
    )
)


def _text(v: ir.JSONValue) -> ir.StringValue:
    """A JSON string or number as trimmed text; null for empty, objects and arrays."""
    from closedloop.portrait.build import json_text

    return json_text(v)


def role_of(text: ir.StringValue, config: AccountsConfig) -> ir.StringValue:
    """The role the first matching rule gives ``text`` (whole words), else the default."""
    words = ibis.literal(" ") + text.lower().re_replace(r"[^a-z0-9]+", " ") + ibis.literal(" ")
    cases = []
    for rule in config.role_rules:
        hit = functools.reduce(
            lambda a, b: a | b,
            [words.contains(ibis.literal(f" {kw} ")) for kw in rule.match],
        )
        cases.append((hit.fill_null(False), ibis.literal(rule.role.value)))
    default = ibis.literal(config.default_role.value)
    return ibis.cases(*cases, else_=default) if cases else default


def role_python(text: str | None, config: AccountsConfig) -> str:
    """``role_of`` in plain Python: the reference the tests compare the build with."""
    if text is not None:
        words = f" {normal_words(text)} "
        for rule in config.role_rules:
            if any(f" {kw} " in words for kw in rule.match):
                return rule.role.value
    return config.default_role.value


def _empty(engine: Engine) -> None:
    """Both tables empty (swapped whole, like a build), left alone when they are already."""
    for spec in (ACCOUNTS, ACCOUNT_CONTACTS):
        if not engine.exists(spec.name) or engine.count(spec.name):
            engine.replace(spec.name, spec.schema.to_pyarrow().empty_table())


def accounts_expr(
    engine: Engine, as_of: datetime, config: AccountsConfig | None = None
) -> tuple[ir.Table, ir.Table] | None:
    """(accounts, account_contacts) as of ``as_of``; None when no group call exists yet."""
    from closedloop.portrait.build import exact_sum, may_hold

    config = config or AccountsConfig()
    raw = engine.table("events")
    raw = raw.filter(raw.timestamp <= ibis.literal(as_of).cast(TS))
    ec = engine.table("event_customers").select("message_id", "customer_id")
    # Group calls first, then their customers: the whole log is never joined to customers.
    groups = raw.filter(raw.type == "group")
    if int(groups.count().execute()) == 0:  # a consumer brand: one cheap filtered count
        return None
    groups = groups.join(ec, "message_id")
    props = groups.properties.cast("json")
    # The group's traits, parsed once (a JSON column would not survive a PostgreSQL scratch).
    gt = props["traits"]
    values = {t: _text(gt[t]) for t in TEXT_TRAITS}
    values["employees"] = _text(gt["employees"]).try_cast("float64").round().cast("int64")
    groups = engine.scratch(
        "accounts_groups",
        groups.select(
            "customer_id",
            "timestamp",
            "traits",
            account_id=_text(props["groupId"]),
            **values,
        ).filter(lambda t: t.account_id.notnull()),
    )
    if int(groups.count().execute()) == 0:
        return None
    known = groups.select("account_id").distinct()
    # The contacts' events, with the account each names (a group call's own, or context's).
    contacts_of = groups.select("customer_id").distinct()
    mine = raw.join(ec.semi_join(contacts_of, "customer_id"), "message_id")
    ctx = mine.context.cast("json")
    named = ibis.ifelse(
        may_hold(mine.context, "groupId"), _text(ctx["groupId"]), ibis.null("string")
    )
    gid = ibis.ifelse(mine.type == "group", _text(mine.properties.cast("json")["groupId"]), named)
    cev = engine.scratch(
        "accounts_events",
        mine.select(
            "customer_id",
            "timestamp",
            "type",
            "event",
            "order_id",
            "revenue",
            "traits",
            gid=gid,
        ),
    )
    # Contacts: who sent a group call for the account; seen over calls and events naming it.
    pairs = groups.select("account_id", "customer_id").distinct()
    links = cev.filter(cev.gid.notnull())
    links = links.join(
        pairs, (links.gid == pairs.account_id) & (links.customer_id == pairs.customer_id)
    )
    seen = links.group_by("account_id", "customer_id").aggregate(
        first_seen=links.timestamp.min(), last_seen=links.timestamp.max()
    )
    contacts = seen
    texts: list[ir.StringValue] = []
    ident = cev.filter((cev.type == "identify") & cev.traits.notnull())
    for i, src in enumerate(config.role_sources):
        col = f"role_{i}"
        if src.from_ is RoleFrom.GROUP:
            v = _text(groups.traits.cast("json")[src.trait])
            part = groups.group_by("account_id", "customer_id").aggregate(
                **{col: v.argmax(groups.timestamp, where=v.notnull())}
            )
            contacts = contacts.left_join(part, ["account_id", "customer_id"]).drop(
                "account_id_right", "customer_id_right"
            )
        else:
            v = _text(ident.traits.cast("json")[src.trait])
            part = ident.group_by("customer_id").aggregate(
                **{col: v.argmax(ident.timestamp, where=v.notnull())}
            )
            contacts = contacts.left_join(part, "customer_id").drop("customer_id_right")
        texts.append(contacts[col])
    role_text = (
        functools.reduce(lambda a, b: a.fill_null(b), texts) if texts else ibis.null("string")
    )
    contacts = contacts.mutate(role_text=role_text)
    contacts = engine.scratch(
        "accounts_contacts",
        contacts.select(
            "account_id",
            "customer_id",
            "role_text",
            "first_seen",
            "last_seen",
            role=role_of(contacts.role_text, config),
        ),
    )

    # The account's traits: per field, the latest non-empty value any group call stated.
    g = groups
    traits = g.group_by("account_id").aggregate(
        first_seen=g.timestamp.min(),
        last_seen=g.timestamp.max(),
        **{c: g[c].argmax(g.timestamp, where=g[c].notnull()) for c in values},
    )
    c = contacts
    roles = c.group_by("account_id").aggregate(
        contacts=c.count(),
        **{col: (c.role == role).sum().cast("int64") for role, col in ROLE_COUNTS.items()},
    )
    # Behaviour: each contact event for the account it names, or for all when it names none.
    j = cev.join(c.select("account_id", "customer_id"), "customer_id")
    j = j.filter(j.gid.isnull() | (j.gid == j.account_id))
    is_order = j.event == ORDER_EVENT
    behaviour = j.group_by("account_id").aggregate(
        events=j.count(),
        orders=j.order_id.nunique(where=is_order),
        revenue=exact_sum(j.revenue, where=is_order),
        last_active=j.timestamp.max(),
    )
    t = known
    for part in (traits, roles, behaviour):
        t = t.left_join(part, "account_id").drop("account_id_right")
    t = t.mutate(
        events=t.events.fill_null(0),
        orders=t.orders.fill_null(0),
        revenue=t.revenue.fill_null(0.0),
        computed_at=ibis.literal(as_of).cast(TS),
    )
    return t, contacts


def build_accounts(engine: Engine, as_of: datetime, config: AccountsConfig | None = None) -> int:
    """Rebuild ``accounts`` and ``account_contacts`` as of ``as_of``; returns the accounts.

    Each table is swapped whole (``Engine.replace``): a crash leaves it as it was or as new.
    """
    built = accounts_expr(engine, as_of, config)
    if built is None:
        _empty(engine)
        return 0
    accounts, contacts = built
    engine.replace(ACCOUNT_CONTACTS.name, contacts)
    engine.replace(ACCOUNTS.name, accounts)
    return engine.count(ACCOUNTS.name)
