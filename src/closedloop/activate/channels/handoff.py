"""The file channel: messages handed to another system through an append-only JSONL file.

For a channel with ``transport: outbox`` nothing leaves closedloop by itself; a delivery run
appends each due message to ``HANDOFF/CHANNEL.jsonl`` (flushed and fsynced before it counts
as delivered) for the system that sends it — a CRM's SMS gateway, a print shop. The folder
is not inside the outbox, whose files are the campaigns' decisions.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from closedloop.activate.channels.base import Attempt, SendResult
from closedloop.core.clock import Clock


class HandoffChannel:
    def __init__(self, name: str, handoff_dir: Path, clock: Clock | None = None) -> None:
        self.name = name
        self.path = handoff_dir / f"{name}.jsonl"
        self.clock = clock or Clock()
        self._file: IO[str] | None = None

    def send(
        self, message: dict[str, Any], *, attempts_left: int, pace: Callable[[], None]
    ) -> SendResult:
        pace()
        try:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.path.open("a", encoding="utf-8")
            self._file.write(json.dumps(message, ensure_ascii=False, default=str) + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as e:
            return SendResult([Attempt("failed", f"{type(e).__name__}: {e}", self.clock.now())])
        return SendResult([Attempt("delivered", None, self.clock.now())])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
