"""Tags (``tags/*.yaml``)."""

from __future__ import annotations

from pydantic import Field

from closedloop.core.conditions import Condition
from closedloop.core.definitions.base import NAME_PATTERN, Definition


class TagRule(Definition):
    value: str
    when: Condition


class TagDef(Definition):
    """A rule tag: the first rule whose condition holds gives the value."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    owner: str = ""
    parent: str | None = None
    rules: list[TagRule] = Field(min_length=1)
    default: str | None = None
