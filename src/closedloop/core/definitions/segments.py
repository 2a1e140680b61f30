"""Segments (``segments/*.yaml``).

A segment of customers may ask "is my account in account segment X": the leaf
``{account_in_segment: X}``. The condition language (``core.conditions``) knows one
membership leaf, ``SegmentRef``; this one is read into it as ``in_segment: "account:X"`` — a
name no segment can have (names are ``[a-z][a-z0-9_]*``), so the two kinds of membership never
collide, and every consumer of conditions (ordering, tag references, evaluation) sees an
ordinary membership leaf whose target is ``account_target(ref)``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from closedloop.core.conditions import Condition, SegmentRef
from closedloop.core.definitions.base import NAME_PATTERN, Definition

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
