"""identity.yaml: identifier types, priorities, blocked values, never-link pairs, matching."""

from __future__ import annotations

import re
from enum import StrEnum

from pydantic import Field, field_validator, model_validator

from closedloop.core.definitions.base import NAME_PATTERN, Definition


class Normaliser(StrEnum):
    PHONE = "phone"  # E.164 with the project's default region
    EMAIL = "email"  # trimmed, lower-cased, must look like an address
    TRIM = "trim"  # surrounding spaces removed
    LOWER = "lower"  # trimmed and lower-cased


class IdentifierType(Definition):
    """A kind of identifier, where it is found in messages, and how much it is trusted."""

    name: str = Field(pattern=NAME_PATTERN)
    normaliser: Normaliser = Normaliser.TRIM
    priority: int = Field(ge=0, le=1000, description="higher wins when links conflict")
    strong: bool = Field(description="identifies a person on its own (phone, member id)")
    paths: list[str] = Field(min_length=1)
    scoped: bool = Field(False, description="value is only unique within its collection (openid)")
    max_strong_neighbours: int | None = Field(
        None,
        ge=1,
        description="a value seen with more strong identifiers of one type than this is "
        "quarantined (a shared device, a clerk's phone) instead of linking them",
    )
    max_names: int | None = Field(
        None,
        ge=1,
        description="a value seen in records under more different names than this (a "
        "clerk's phone typed for walk-ins) is quarantined and listed as a suspect",
    )
    max_per_customer: int | None = Field(
        None,
        ge=1,
        description="at most this many identifiers of this type in one customer; a link that "
        "would exceed it is dropped (lowest priority first) and recorded",
    )
    window_days: int | None = Field(
        None,
        ge=1,
        description="count max_per_customer per window of this many days instead of in all: at "
        "most max_per_customer identifiers of this type first seen within any such window "
        "(3 phones per 30 days allows changing phones, not collecting them)",
    )

    @model_validator(mode="after")
    def _window(self) -> IdentifierType:
        if self.window_days is not None and self.max_per_customer is None:
            raise ValueError("window_days needs max_per_customer (the limit per window)")
        return self

    @field_validator("paths")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        for p in v:
            if not re.fullmatch(
                r"(user_id|anonymous_id|(traits|context)(\.[A-Za-z0-9_]+)+|external_ids\.[A-Za-z0-9_]+)",
                p,
            ):
                raise ValueError(
                    f"path {p!r}: expected user_id, anonymous_id, traits.KEY, context.KEY.KEY "
                    "or external_ids.TYPE"
                )
        return v


MATCH_FIELDS = ("name", "birthday", "city", "gender", "email", "phone")


class MatchingConfig(Definition):
    """Probabilistic (Fellegi–Sunter) matching of profile records that share no identifier.

    A record is a message carrying ``name`` (a CRM row, a registration); it stands for the
    message's highest-priority identifier. Records are compared only within blocks (pairs
    agreeing on every field of one blocking rule); m/u probabilities are estimated without
    labels by EM, and pairs whose match probability reaches ``threshold`` become links.
    """

    name: str = Field("traits.name", description="path of the person's name")
    birthday: str | None = "traits.birthday"
    city: str | None = "traits.city"
    gender: str | None = "traits.gender"
    email: str | None = Field("email", description="identifier type holding the e-mail")
    phone: str | None = Field("phone", description="identifier type holding the phone")
    blocking: list[list[str]] = Field(
        default_factory=lambda: [["birthday", "city", "gender"]], min_length=1
    )
    threshold: float = Field(0.99, gt=0.0, lt=1.0, description="match probability for a link")
    priority: int = Field(5, ge=0, le=1000, description="rank of these links when rules conflict")
    max_block_size: int = Field(
        2000, ge=2, description="blocks with more records are skipped (too common to compare)"
    )
    iterations: int = Field(60, ge=1, le=1000)
    u_sample: int = Field(
        200_000, ge=100, description="random record pairs used to measure non-match rates"
    )

    @field_validator("name", "birthday", "city", "gender")
    @classmethod
    def _trait_path(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"traits(\.[A-Za-z0-9_]+)+", v):
            raise ValueError(f"path {v!r}: expected traits.KEY")
        return v

    @model_validator(mode="after")
    def _check(self) -> MatchingConfig:
        present = {f for f in MATCH_FIELDS if getattr(self, f) is not None}
        for rule in self.blocking:
            if not rule:
                raise ValueError("a blocking rule needs at least one field")
            for f in rule:
                if f not in present:
                    raise ValueError(
                        f"blocking field {f!r} is not a configured matching field "
                        f"(configured: {sorted(present)})"
                    )
        return self


class IdentityConfig(Definition):
    default_region: str = Field("CN", min_length=2, max_length=2)
    types: list[IdentifierType] = Field(min_length=1)
    blocked_values: list[str] = Field(default_factory=list)
    blocked_patterns: list[str] = Field(default_factory=list)
    never_link: list[tuple[str, str]] = Field(default_factory=list)
    matching: MatchingConfig | None = None

    @field_validator("blocked_patterns")
    @classmethod
    def _regex(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"blocked pattern {p!r} is not a valid regex: {e}") from None
        return v

    @model_validator(mode="after")
    def _check(self) -> IdentityConfig:
        names = [t.name for t in self.types]
        if len(set(names)) != len(names):
            raise ValueError("identifier type names must be unique")
        for a, b in self.never_link:
            for n in (a, b):
                if n not in names:
                    raise ValueError(f"never_link names unknown identifier type {n!r}")
        if self.matching is not None:
            for f in ("email", "phone"):
                n = getattr(self.matching, f)
                if n is not None and n not in names:
                    raise ValueError(f"matching.{f} names unknown identifier type {n!r}")
        return self

    def type(self, name: str) -> IdentifierType:
        for t in self.types:
            if t.name == name:
                return t
        raise KeyError(name)
