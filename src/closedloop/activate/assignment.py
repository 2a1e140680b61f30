"""Who gets what: global control, per-campaign holdout and A/B/n variant, by salted hashing.

Every group is a pure function of (salt, person): ``unit_interval(kind, salt, person)`` is a
BLAKE2b hash mapped to [0, 1), so a person's group survives restarts, re-runs and other
processes with no stored random state, and three *kinds* of hash (``global_control``,
``holdout``, ``variant``) are independent of one another.

* **Global control** — a project-level share (``global_control.share``) no campaign ever
  messages; the salt is the project's (scope ``global_control``). ``measure`` uses
  ``in_global_control`` to compute programme lift over everyone, messaged or not.
* **Holdout** — a per-campaign share held out to measure the campaign; salted by the
  campaign (scope ``campaign:NAME``). The default salt is the campaign's name, which keeps
  the split every campaign had before salts existed.
* **Variant** — among the treatment group, variant *k* for the share of people whose
  ``variant`` hash falls in the k-th slice of the cumulative normalised weights.

A salt changes only by an explicit ``reshuffle`` (``closedloop campaign reshuffle NAME`` or
``--global-control``), which appends a row to ``assignment_salts``: the full history of salts,
so a past campaign can still be measured with the split it actually ran with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

from closedloop.core.catalogue import Erasure, TableSpec, declare
from closedloop.core.clock import Clock
from closedloop.core.definitions import CampaignDef, GlobalControl, Variant
from closedloop.core.engine import Engine

GLOBAL_SCOPE = "global_control"
DEFAULT_GLOBAL_SALT = "global"

ASSIGNMENT_SALTS = declare(
    TableSpec(
        name="assignment_salts",
        stage="activate",
        description=(
            "History of assignment salts: one row each time a campaign's holdout/variant split "
            "(scope campaign:NAME) or the global control group (scope global_control) was "
            "reshuffled on purpose. The latest row of a scope is its current salt; without a "
            "row the default salt applies (the campaign's name, or 'global')."
        ),
        columns={
            "scope": "string",
            "generation": "int32",
            "salt": "string",
            "previous_salt": "string",
            "reason": "string",
            "changed_at": "timestamp('UTC', 6)",
        },
        key=("scope", "generation"),
        erasure=Erasure.NONE,
    )
)

Floats = np.ndarray[Any, np.dtype[np.float64]]
Bools = np.ndarray[Any, np.dtype[np.bool_]]

_SCALE = 2.0**64


def unit_hashes(kind: str, salt: str, person_ids: Sequence[str]) -> Floats:
    """``unit_interval(kind, salt, id)`` for every id: uniform on [0, 1), fixed per input.

    Bit-for-bit ``core.ids.stable_hash64`` (length-prefixed parts into an 8-byte BLAKE2b),
    but the hash state after the shared prefix (kind, salt) is computed once and copied per
    person, and the digests are read as one big-endian array: ~3x faster on a million.
    """
    prefix = hashlib.blake2b(digest_size=8)
    for part in (kind, salt):
        b = part.encode("utf-8")
        prefix.update(len(b).to_bytes(4, "big"))
        prefix.update(b)
    out = bytearray()
    for p in person_ids:
        h = prefix.copy()
        b = p.encode("utf-8")
        h.update(len(b).to_bytes(4, "big") + b)
        out += h.digest()
    return np.frombuffer(bytes(out), dtype=">u8").astype(np.float64) / _SCALE


def in_global_control(person_ids: Sequence[str], salt: str, share: float) -> Bools:
    """True for the people in the global control group (never messaged by any campaign).

    ``salt`` is the project's current global-control salt (``global_control_salt(engine)``;
    ``DEFAULT_GLOBAL_SALT`` until someone reshuffles). With ``share`` 0 nobody is in it.
    """
    if share <= 0:
        return np.zeros(len(person_ids), dtype=bool)
    return unit_hashes("global_control", salt, person_ids) < share


def in_holdout(person_ids: Sequence[str], salt: str, share: float) -> Bools:
    """True for the people a campaign holds out (salt: the campaign's current salt)."""
    return unit_hashes("holdout", salt, person_ids) < share


def pick_variants(person_ids: Sequence[str], salt: str, variants: Sequence[Variant]) -> list[str]:
    """The variant name of each person, drawn with probability proportional to its weight."""
    if not variants:
        return []
    w = np.array([v.weight for v in variants], dtype=np.float64)
    edges = np.cumsum(w / w.sum())
    edges[-1] = 1.0  # rounding must never leave a sliver past the last variant
    u = unit_hashes("variant", salt, person_ids)
    index = np.searchsorted(edges, u, side="right")
    names = [v.name for v in variants]
    return [names[i] for i in index.tolist()]


@dataclass(frozen=True)
class Groups:
    """Each person's group (``global_control``, ``holdout`` or ``treatment``) and variant."""

    group: list[str]
    variant: list[str | None]


def assign(
    person_ids: Sequence[str],
    *,
    campaign_salt: str,
    holdout: float,
    variants: Sequence[Variant] = (),
    global_salt: str = DEFAULT_GLOBAL_SALT,
    global_share: float = 0.0,
) -> Groups:
    """Global control first (excluded everywhere), then the holdout, then a variant each."""
    gc = in_global_control(person_ids, global_salt, global_share)
    ho = in_holdout(person_ids, campaign_salt, holdout) & ~gc
    treated = ~(gc | ho)
    group = np.where(gc, "global_control", np.where(ho, "holdout", "treatment")).tolist()
    variant: list[str | None] = [None] * len(person_ids)
    if variants:
        names = pick_variants(person_ids, campaign_salt, variants)
        for i in np.flatnonzero(treated).tolist():
            variant[i] = names[i]
    return Groups(group, variant)


# ---- salts ---------------------------------------------------------------------------------
def campaign_scope(campaign: str) -> str:
    return f"campaign:{campaign}"


def _default_salt(scope: str) -> str:
    if scope == GLOBAL_SCOPE:
        return DEFAULT_GLOBAL_SALT
    if scope.startswith("campaign:"):
        return scope[len("campaign:") :]
    raise ValueError(f"unknown assignment scope {scope!r}")


def salt_history(engine: Engine, scope: str) -> list[dict[str, Any]]:
    """Every salt a scope has had, oldest first (generation 0: the default, never stored)."""
    t = engine.table("assignment_salts")
    rows: list[dict[str, Any]] = (
        t.filter(t.scope == scope).order_by("generation").to_pyarrow().to_pylist()
    )
    return rows


def current_salt(engine: Engine, scope: str) -> str:
    """The salt in force for ``scope``: the latest reshuffle's, else the default."""
    rows = salt_history(engine, scope)
    return str(rows[-1]["salt"]) if rows else _default_salt(scope)


def campaign_salt(engine: Engine, campaign: str) -> str:
    return current_salt(engine, campaign_scope(campaign))


def global_control_salt(engine: Engine) -> str:
    return current_salt(engine, GLOBAL_SCOPE)


def reshuffle(engine: Engine, scope: str, *, reason: str = "", clock: Clock | None = None) -> str:
    """Draw a new split for ``scope`` on purpose; the old salt stays in the history.

    The new salt is ``DEFAULT#GENERATION`` — readable, and unique per scope; a hash of it is
    independent of the previous one, so the new groups are a fresh random split.
    """
    rows = salt_history(engine, scope)
    previous = str(rows[-1]["salt"]) if rows else _default_salt(scope)
    generation = (int(rows[-1]["generation"]) if rows else 0) + 1
    salt = f"{_default_salt(scope)}#{generation}"
    now: datetime = (clock or Clock()).now()
    engine.append(
        "assignment_salts",
        pa.Table.from_pylist(
            [
                {
                    "scope": scope,
                    "generation": generation,
                    "salt": salt,
                    "previous_salt": previous,
                    "reason": reason or None,
                    "changed_at": now,
                }
            ],
            schema=ASSIGNMENT_SALTS.schema.to_pyarrow(),
        ),
    )
    return salt


# ---- variant content -----------------------------------------------------------------------
def message_texts(campaign: CampaignDef) -> list[tuple[str, str, str]]:
    """(variant, subject, template) for each version of the message ('' without variants)."""
    if campaign.variants:
        return [(v.name, v.subject, v.template) for v in campaign.variants]
    return [("", campaign.subject, campaign.template)]


# ---- used by a campaign run ----------------------------------------------------------------
DELIVERY_VARIANTS = declare(
    TableSpec(
        name="delivery_variants",
        stage="activate",
        description=(
            "The A/B/n variant of each treatment-group delivery of a campaign with variants "
            "(join to deliveries on delivery_id); written before the outbox, so a crash "
            "never leaves a sent message without its variant."
        ),
        columns={
            "delivery_id": "string",
            "campaign": "string",
            "occasion": "string",
            "customer_id": "string",
            "variant": "string",
            "salt": "string",
        },
        key=("delivery_id",),
        erasure=Erasure.DELETE_BY_CUSTOMER,
        erasure_column="customer_id",
    )
)


def campaign_groups(
    engine: Engine,
    campaign: CampaignDef,
    person_ids: Sequence[str],
    global_control: GlobalControl | None = None,
) -> Groups:
    """The groups of a campaign's eligible people under the salts currently in force."""
    share = global_control.share if global_control is not None else 0.0
    return assign(
        person_ids,
        campaign_salt=campaign_salt(engine, campaign.name),
        holdout=campaign.holdout,
        variants=campaign.variants,
        global_salt=global_control_salt(engine) if share > 0 else DEFAULT_GLOBAL_SALT,
        global_share=share,
    )


Render = Callable[[dict[str, Any]], str]


def variant_renderers(campaign: CampaignDef) -> dict[str | None, tuple[Render, Render]]:
    """(subject, body) render functions per variant (key None: the campaign's own message)."""
    from closedloop.activate.templates import renderer

    if not campaign.variants:
        return {None: (renderer(campaign.subject), renderer(campaign.template))}
    return {v.name: (renderer(v.subject), renderer(v.template)) for v in campaign.variants}


def record_variants(
    engine: Engine,
    campaign: CampaignDef,
    occasion: str,
    delivery_ids: Sequence[str],
    person_ids: Sequence[str],
    variants: Sequence[str | None],
) -> None:
    """Append the variant of each delivery that has one and is not yet recorded."""
    keep = [i for i, v in enumerate(variants) if v is not None]
    if not keep:
        return
    salt = campaign_salt(engine, campaign.name)
    data = pa.table(
        {
            "delivery_id": pa.array([delivery_ids[i] for i in keep], pa.string()),
            "campaign": pa.array([campaign.name] * len(keep), pa.string()),
            "occasion": pa.array([occasion] * len(keep), pa.string()),
            "customer_id": pa.array([person_ids[i] for i in keep], pa.string()),
            "variant": pa.array([variants[i] for i in keep], pa.string()),
            "salt": pa.array([salt] * len(keep), pa.string()),
        }
    )
    with engine.temporary(data) as new:
        stored = engine.table("delivery_variants")
        engine.append("delivery_variants", new.anti_join(stored, "delivery_id"))
