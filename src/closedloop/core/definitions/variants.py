"""A/B/n variants of a campaign and the project's global control group.

A variant is a version of a campaign's message (its own subject and template) given to a
stable share of the treatment group; the share is its ``weight`` (weights need not sum to
one: they are normalised, but each must be positive, and a weight list that sums to zero or
to an obviously mistyped total is refused so a typo does not silently starve a variant).

The global control group is a small project-level share of people excluded from every
campaign, so the lift of the programme as a whole can be measured against them.
"""

from __future__ import annotations

import math

from pydantic import Field, model_validator

from closedloop.core.definitions.base import NAME_PATTERN, Definition


class Variant(Definition):
    """One version of a campaign's message, sent to ``weight`` of the treatment group."""

    name: str = Field(pattern=NAME_PATTERN)
    weight: float = Field(gt=0.0, description="share of the treatment group (normalised)")
    subject: str = ""
    template: str = Field(min_length=1, description="Jinja2 (sandboxed) message body")


def check_weights(variants: list[Variant]) -> None:
    """Refuse repeated names and weights that do not sum to 1 (or to 100, as percentages).

    Either form is accepted exactly (within rounding), so ``[50, 30, 20]`` and
    ``[0.5, 0.3, 0.2]`` are both fine; ``[0.5, 0.3]`` is a mistake and says so.
    """
    names = [v.name for v in variants]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"variant names must be unique; repeated: {dupes}")
    total = math.fsum(v.weight for v in variants)
    if not (math.isclose(total, 1.0, abs_tol=1e-6) or math.isclose(total, 100.0, abs_tol=1e-4)):
        weights = ", ".join(f"{v.name}={v.weight:g}" for v in variants)
        raise ValueError(
            f"variant weights must sum to 1 (or 100 as percentages); got {total:g} ({weights})"
        )


class GlobalControl(Definition):
    """A persistent share of the whole customer base that no campaign ever messages.

    Membership is a hash of the person's id salted by the project's current global-control
    salt (kept, with its history, in ``assignment_salts``); it changes only when someone
    reshuffles the global control on purpose.
    """

    share: float = Field(ge=0.0, le=0.2, description="e.g. 0.05 for 5% of everyone")

    @model_validator(mode="after")
    def _check(self) -> GlobalControl:
        if math.isnan(self.share):
            raise ValueError("share must be a number")
        return self
