"""The clock: one place to ask for "now", so runs on history and tests can pin it."""

from __future__ import annotations

from datetime import UTC, datetime


class Clock:
    """Returns the current UTC time, or a fixed time when pinned (demo runs on generated history)."""

    def __init__(self, fixed: datetime | None = None) -> None:
        if fixed is not None and fixed.tzinfo is None:
            fixed = fixed.replace(tzinfo=UTC)
        self._fixed = fixed

    def now(self) -> datetime:
        return self._fixed if self._fixed is not None else datetime.now(UTC)

    @property
    def pinned(self) -> bool:
        return self._fixed is not None
