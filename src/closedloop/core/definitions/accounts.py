"""Accounts (B2B): how a contact's role in an account is read (``accounts.yaml``).

Segment's ``group`` call ties a user to an account (``groupId``) and describes the account
(its traits: name, industry, employees, ...). Neither the spec nor real data agree on where
a contact's *role* is stated: some apps send it with the group call (``context.traits``, the
user as known inside that account), CRMs send a job title on identify. So the role is read
from declared places, in order, and mapped to the four roles the segments know by declared,
case-insensitive keywords — first matching rule wins, else ``default``::

    # accounts.yaml
    role_sources:
      - {from: group, trait: role}        # the group call's context.traits.role
      - {from: identify, trait: title}    # the contact's latest identify trait `title`
    role_rules:
      - {role: decision_maker, match: [ceo, founder, owner, "decision maker"]}
      - {role: finance, match: [cfo, finance, financial, controller, accountant]}
      - {role: it, match: [it, cto, engineer, developer]}
      - {role: decision_maker, match: [director, head, vp]}
    default_role: user

Without the file these defaults apply (``AccountsConfig()``). ``closedloop validate`` checks
the file (file:line [key]); ``portrait.accounts.build_accounts(engine, as_of, config)`` applies
it. The portrait build and refresh call it with the defaults until the pipeline hands them the
project's file (``load_accounts(project.root)``).
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path

from pydantic import Field, field_validator

from closedloop.core.definitions.base import Definition


class Role(StrEnum):
    """The roles segments and the account profile count contacts by."""

    DECISION_MAKER = "decision_maker"
    FINANCE = "finance"
    IT = "it"
    USER = "user"


ROLES = tuple(r.value for r in Role)


class RoleFrom(StrEnum):
    GROUP = "group"  # the group call's context.traits (the user as stated inside the account)
    IDENTIFY = "identify"  # the contact's latest identify trait (any account of theirs)


class RoleSource(Definition):
    from_: RoleFrom = Field(alias="from")
    trait: str = Field(min_length=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


class RoleRule(Definition):
    """Texts holding any of ``match`` as whole words (case-insensitive) get ``role``.

    Whole words, so ``it`` matches "IT Manager" but not "Digital Marketing"; a keyword of
    several words ("head of") matches them in a row. Keywords are kept in the form the
    build compares with: lower case, letters and digits, single spaces.
    """

    role: Role
    match: list[str] = Field(min_length=1)

    @field_validator("match")
    @classmethod
    def _words(cls, words: list[str]) -> list[str]:
        out = [normal_words(w) for w in words]
        for w, n in zip(words, out, strict=True):
            if not n:
                raise ValueError(f"keyword {w!r} has no letters or digits")
        return out


def normal_words(text: str) -> str:
    """``text`` lower-cased with every run of other characters than a-z, 0-9 as one space."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


DEFAULT_SOURCES = (
    RoleSource.model_validate({"from": "group", "trait": "role"}),
    RoleSource.model_validate({"from": "identify", "trait": "title"}),
)
DEFAULT_RULES = (
    RoleRule(
        role=Role.DECISION_MAKER,
        match=["decision maker", "ceo", "founder", "owner", "president", "chief executive"],
    ),
    RoleRule(
        role=Role.FINANCE,
        match=["finance", "financial", "cfo", "controller", "accountant", "procurement"],
    ),
    RoleRule(
        role=Role.IT,
        match=["it", "cto", "cio", "engineer", "administrator", "developer", "technology"],
    ),
    RoleRule(role=Role.DECISION_MAKER, match=["director", "head", "vp", "general manager"]),
)


class AccountsConfig(Definition):
    role_sources: list[RoleSource] = Field(default_factory=lambda: list(DEFAULT_SOURCES))
    role_rules: list[RoleRule] = Field(default_factory=lambda: list(DEFAULT_RULES))
    default_role: Role = Role.USER


ACCOUNTS_FILE = "accounts.yaml"


def load_accounts(root: Path | str) -> AccountsConfig:
    """The project's ``accounts.yaml``, or the defaults when it has none.

    Raises ``DefinitionError`` with file:line [key] for every problem found.
    """
    from closedloop.core.definitions.loading import _load_one

    root = Path(root)
    path = root / ACCOUNTS_FILE
    if not path.is_file():
        return AccountsConfig()
    return _load_one(path, AccountsConfig, root)
