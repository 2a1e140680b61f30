"""Errors that tell a user what went wrong and where.

Every error a user can cause (a bad definition, a bad input file) carries the place —
file, line, key or row — so the message can be acted on without reading a stack trace.
"""

from __future__ import annotations

from dataclasses import dataclass


class ClosedloopError(Exception):
    """Base class for errors closedloop reports to users."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a definition or input: where it is and what was expected."""

    file: str
    message: str
    line: int | None = None
    key: str | None = None

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        key = f" [{self.key}]" if self.key else ""
        return f"{where}{key}: {self.message}"


class DefinitionError(ClosedloopError):
    """A project definition (YAML) is invalid; holds every problem found, not just the first."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class InputError(ClosedloopError):
    """An input file or table cannot be read as a whole (missing, wrong format, wrong columns)."""
