"""Segments (``segments/*.yaml``).

A segment of customers may ask "is my account in account segment X": the leaf
``{account_in_segment: X}``. The condition language (``core.conditions``) knows one
membership leaf, ``SegmentRef``; this one is read into it as ``in_segment: "account:X"`` — a
name no segment can have (names are ``[a-z][a-z0-9_]*``), so the two kinds of membership never
collide, and every consumer of conditions (ordering, tag references, evaluation) sees an
ordinary membership leaf whose target is ``account_target(ref)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field, model_validator

from closedloop.core.conditions import AllOf, AnyOf, Condition, NotOf, SegmentRef
from closedloop.core.definitions.base import NAME_PATTERN, Definition
from closedloop.core.errors import Problem

ACCOUNT_IN_SEGMENT = "account_in_segment"
ACCOUNT_PREFIX = "account:"


def account_target(ref: SegmentRef) -> str | None:
    """The account segment an ``account_in_segment`` leaf names; None for ``in_segment``."""
    if ref.in_segment.startswith(ACCOUNT_PREFIX):
        return ref.in_segment[len(ACCOUNT_PREFIX) :]
    return None


def ref_target(ref: SegmentRef) -> str:
    """The segment a membership leaf names, of either kind."""
    return account_target(ref) or ref.in_segment


def _read_account_refs(node: Any) -> Any:
    """``{account_in_segment: X}`` anywhere under all / any / not → ``{in_segment: account:X}``.

    Anything else is left as written, for the condition models to accept or refuse (a
    malformed leaf keeps its place, so its error still points at its line).
    """
    if isinstance(node, list):
        return [_read_account_refs(x) for x in node]
    if not isinstance(node, dict):
        return node
    if ACCOUNT_IN_SEGMENT in node:
        rest = {k: v for k, v in node.items() if k != ACCOUNT_IN_SEGMENT}
        target = node[ACCOUNT_IN_SEGMENT]
        value = ACCOUNT_PREFIX + target if isinstance(target, str) and target else target
        return {"in_segment": value, **rest}
    out = dict(node)
    for key in ("all", "any"):
        if isinstance(out.get(key), list):
            out[key] = _read_account_refs(out[key])
    if "not" in out:
        out["not"] = _read_account_refs(out["not"])
    return out


class SegmentDef(Definition):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    # Whom the segment selects: customers (profiles), or B2B accounts (segments.accounts).
    of: Literal["customers", "accounts"] = "customers"
    where: Condition

    @model_validator(mode="before")
    @classmethod
    def _account_refs(cls, data: Any) -> Any:
        if isinstance(data, dict) and "where" in data:
            return {**data, "where": _read_account_refs(data["where"])}
        return data


def refs_with_paths(cond: Condition, path: str = "where") -> Iterator[tuple[SegmentRef, str]]:
    """Every membership leaf of a condition with its key path (``where.all.1``)."""
    if isinstance(cond, AllOf):
        for i, c in enumerate(cond.all):
            yield from refs_with_paths(c, f"{path}.all.{i}")
    elif isinstance(cond, AnyOf):
        for i, c in enumerate(cond.any):
            yield from refs_with_paths(c, f"{path}.any.{i}")
    elif isinstance(cond, NotOf):
        yield from refs_with_paths(cond.not_, f"{path}.not")
    elif isinstance(cond, SegmentRef):
        yield cond, path


def kind_problem(
    seg: SegmentDef, ref: SegmentRef, target_of: str | None, path: str
) -> Problem | None:
    """The error for a membership leaf of ``seg`` that names a segment of the wrong kind.

    ``target_of`` is what the named segment selects (``customers`` / ``accounts``; None when
    unknown). Segments of customers read customer segments with ``in_segment`` and account
    segments with ``account_in_segment``; segments of accounts read only account segments,
    with ``in_segment``. Each message says what to write instead.
    """
    where = f"segments/{seg.name}.yaml"
    target = account_target(ref)
    name = ref_target(ref)
    if seg.of == "accounts":
        if target is not None:
            msg = (
                "`account_in_segment` selects customers by their account; this segment "
                f"selects accounts: write `in_segment: {name}`"
            )
            return Problem(where, msg, key=f"{path}.{ACCOUNT_IN_SEGMENT}")
        if target_of == "customers":
            msg = (
                f"{name!r} is a segment of customers, and this segment selects accounts: "
                "select accounts by their contacts with `contacts: {where: [...], did: "
                "{...}}` (the conditions of that segment), or name a segment of accounts"
            )
            return Problem(where, msg, key=f"{path}.in_segment")
        return None
    if target is None and target_of == "accounts":
        msg = (
            f"{name!r} is a segment of accounts (of: accounts), and this segment selects "
            f"customers: write `account_in_segment: {name}` for customers whose account is in it"
        )
        return Problem(where, msg, key=f"{path}.in_segment")
    if target is not None and target_of == "customers":
        msg = (
            f"{name!r} is a segment of customers, not of accounts: write `in_segment: {name}` "
            "for its members"
        )
        return Problem(where, msg, key=f"{path}.{ACCOUNT_IN_SEGMENT}")
    return None
