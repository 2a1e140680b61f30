"""``closedloop profile IDENTIFIER``: the profile of a customer, or of a B2B account.

A customer is found by any identifier (``portrait.lookup``: from the lookup's serving store
when it matches the warehouse, from the warehouse otherwise; the output says which), and
its profile lists the accounts it is a contact of, with its role in each. An account is
found by its id (the group calls' ``groupId``) or its website's domain, and shows its
traits, its contacts by role and its account segments (``segments.accounts``).

``profile_document`` builds the answer without printing it, for any other front end (an
HTTP route) to return as it is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from closedloop.cli.common import ProjectDir, fail, project_or_exit
from closedloop.core.definitions import IdentityConfig
from closedloop.core.engine import Engine
from closedloop.core.errors import ClosedloopError, InputError

console = Console(soft_wrap=True)

ACCOUNT = "account"  # --type account: only accounts (by id or website domain)


def profile_document(
    engine: Engine, identity: IdentityConfig, identifier: str, id_type: str | None = None
) -> dict[str, Any] | None:
    """What ``identifier`` names, as one JSON-able document; None when it names nothing.

    ``{"kind": "customer", "customer_id", "matched", "source", "profile", "accounts"}`` or
    ``{"kind": "account", "account_id", "matched", "account", "contacts", "segments"}``.
    Without ``id_type`` both are tried; a value naming a customer and an account (or several
    accounts by one domain) is an error asking for the type or the id.
    """
    from closedloop.portrait.lookup import ProfileLookup
    from closedloop.segments.accounts import account_profile, contact_accounts, find_accounts

    customer: dict[str, Any] | None = None
    if id_type != ACCOUNT:
        with ProfileLookup.open(engine, identity) as lookup:
            match = lookup.find(identifier, id_type)
        if match is not None:
            customer = {
                "kind": "customer",
                "customer_id": match.customer_id,
                "matched": {"type": match.matched[0], "value": match.matched[1]},
                "source": match.source,
                "profile": match.profile,
                "accounts": contact_accounts(engine, match.customer_id),
            }
    accounts = find_accounts(engine, identifier) if id_type in (None, ACCOUNT) else []
    if customer is not None and accounts:
        raise InputError(
            f"{identifier!r} names customer {customer['customer_id']} and account "
            f"{accounts[0][0]}: give --type {ACCOUNT} or the identifier's type"
        )
    if customer is not None:
        return customer
    if len(accounts) > 1:
        ids = ", ".join(a for a, _ in accounts)
        raise InputError(f"{identifier!r} is the website of several accounts ({ids}); give the id")
    if not accounts:
        return None
    account_id, how = accounts[0]
    doc = account_profile(engine, account_id)
    if doc is None:  # gone between the two reads: a build replaced the accounts
        return None
    return {
        "kind": "account",
        "account_id": account_id,
        "matched": {"type": how, "value": identifier.strip()},
        **doc,
    }


def profile(
    identifier: Annotated[
        str,
        typer.Argument(
            help="an e-mail, phone, member id, ... or a customer id; an account's id or domain"
        ),
    ],
    id_type: Annotated[
        str | None,
        typer.Option(
            "--type",
            "-t",
            help=f"identifier type, or `{ACCOUNT}` for accounts (default: try every type)",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    project: ProjectDir = Path("."),
) -> None:
    """Show the profile of the customer an identifier belongs to (aliases followed), or of an
    account by its id or website domain."""
    import closedloop.segments.accounts  # noqa: F401  (declares the account tables)

    p = project_or_exit(project)
    try:
        with Engine(p.engine_url) as engine:
            doc = profile_document(engine, p.identity, identifier, id_type)
    except ClosedloopError as e:
        raise fail(e) from None
    if doc is None:
        if as_json:
            typer.echo(json.dumps(None))
        elif id_type == ACCOUNT:
            msg = f"no account has the id or website domain {identifier!r}"
            console.print(msg, markup=False)
        else:
            what = "customer" if id_type is not None else "customer or account"
            console.print(f"no {what} has the identifier {identifier!r}", markup=False)
        raise typer.Exit(code=1)
    if as_json:
        typer.echo(json.dumps(doc, default=str, ensure_ascii=False, indent=2))
    elif doc["kind"] == "account":
        _print_account(doc)
    else:
        _print_customer(doc)


def _print_customer(doc: dict[str, Any]) -> None:
    m = doc["matched"]
    console.print(
        f"customer {doc['customer_id']} (by {m['type']} {m['value']}, from the {doc['source']})",
        markup=False,
        highlight=False,
    )
    if doc["profile"] is None:
        console.print("no profile yet: run `closedloop build`", markup=False)
    else:
        table = Table("field", "value")
        for k, val in doc["profile"].items():
            if val is not None:
                table.add_row(k, str(val))
        console.print(table)
    if doc["accounts"]:
        t = Table("account", "name", "role", "role as stated", "account segments", title="accounts")
        for a in doc["accounts"]:
            cells = [a["account_id"], a["name"], a["role"], a["role_text"]]
            t.add_row(*("" if v is None else str(v) for v in cells), ", ".join(a["segments"]))
        console.print(t)


def _print_account(doc: dict[str, Any]) -> None:
    m = doc["matched"]
    console.print(f"account {doc['account_id']} (by {m['type']} {m['value']})", markup=False)
    t = Table("field", "value")
    for k, v in doc["account"].items():
        if v is not None:
            t.add_row(k, str(v))
    console.print(t)
    ct = Table(
        "role", "customer_id", "name", "email", "role as stated", "last seen", title="contacts"
    )
    for role, people in doc["contacts"].items():
        if not people:
            ct.add_row(role, "(none)", "", "", "", "")
        for c in people:
            cells = [c.get("contact_name"), c.get("contact_email"), c["role_text"], c["last_seen"]]
            ct.add_row(role, c["customer_id"], *("" if v is None else str(v) for v in cells))
    console.print(ct)
    names = ", ".join(s["segment"] for s in doc["segments"]) or "none"
    console.print(f"account segments: {names}", markup=False)


def register(app: typer.Typer) -> None:
    app.command(name="profile")(profile)
