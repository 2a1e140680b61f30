"""Normalising identifiers so the same phone or email written many ways is one identifier.

Runs once per *distinct* raw value (not per event), so its cost grows with the number of
identifiers, not the number of events. Each result says why a value was refused, which the
data-quality report shows; refused values never link anything.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import phonenumbers

from closedloop.core.definitions import IdentityConfig, Normaliser

EMAIL_PATTERN = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


@dataclass(frozen=True)
class Normalised:
    value: str | None
    reason: str | None = None  # why the raw value was refused (None when accepted)


@lru_cache(maxsize=1 << 18)
def normalise_phone(raw: str, region: str) -> Normalised:
    text = raw.strip()
    if not text:
        return Normalised(None, "empty")
    if text.startswith("00"):
        text = "+" + text[2:]
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException as e:
        return Normalised(None, f"invalid phone: {e}")
    if not phonenumbers.is_valid_number(number):
        return Normalised(None, "invalid phone: not a valid number")
    return Normalised(phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164))


def normalise_email(raw: str) -> Normalised:
    value = raw.strip().lower()
    if not value:
        return Normalised(None, "empty")
    if not EMAIL_PATTERN.match(value):
        return Normalised(None, "invalid email")
    return Normalised(value)


def normalise(raw: str, normaliser: Normaliser, region: str = "CN") -> Normalised:
    """The canonical form of ``raw`` under ``normaliser``, or the reason it has none."""
    if normaliser is Normaliser.PHONE:
        return normalise_phone(raw, region)
    if normaliser is Normaliser.EMAIL:
        return normalise_email(raw)
    value = raw.strip()
    if normaliser is Normaliser.LOWER:
        value = value.lower()
    return Normalised(value) if value else Normalised(None, "empty")


def normalise_many(
    raws: list[str], normaliser: Normaliser, region: str = "CN"
) -> tuple[list[str | None], list[str | None]]:
    """``normalise`` over many raw values of one type: (values, reasons), same results.

    Why: a resolution normalises every distinct raw value (hundreds of thousands); the plain
    types are a string method each, so they skip the per-value call and result object.
    """
    if normaliser is Normaliser.PHONE or normaliser is Normaliser.EMAIL:
        out = [normalise(r, normaliser, region) for r in raws]
        return [n.value for n in out], [n.reason for n in out]
    if normaliser is Normaliser.LOWER:
        values = [r.strip().lower() for r in raws]
    else:
        values = [r.strip() for r in raws]
    return [v or None for v in values], [None if v else "empty" for v in values]


class BlockList:
    """Values that must never link two people: ``null``, ``undefined``, test addresses..."""

    def __init__(self, config: IdentityConfig) -> None:
        self._values = {v.strip().lower() for v in config.blocked_values}
        self._patterns = [re.compile(p, re.IGNORECASE) for p in config.blocked_patterns]

    def blocked_many(self, raws: list[str], values: list[str | None]) -> list[bool]:
        """``blocked`` over many (raw, value) pairs, the patterns run once over each column."""
        hit = [False] * len(raws)
        for column in (raws, values):
            for i, v in enumerate(column):
                if v is not None and v.strip().lower() in self._values:
                    hit[i] = True
            for p in self._patterns:
                search = p.search
                for i, v in enumerate(column):
                    if not hit[i] and v is not None and search(v):
                        hit[i] = True
        return hit

    def blocked(self, raw: str, value: str | None) -> bool:
        for v in (raw, value):
            if v is None:
                continue
            if v.strip().lower() in self._values:
                return True
            if any(p.search(v) for p in self._patterns):
                return True
        return False
