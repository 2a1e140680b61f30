"""collect stage: Segment messages in, validated, deduplicated, into the event log.

``validate_message`` is the one gate every message passes (files, tables and the HTTP
collector); ``load_jsonl`` and ``import_table`` bring files and tables through it into
``events``, keeping refused input in ``failed_events`` and one ``loads`` row per run.

Names are imported on first use: the HTTP collector's worker processes import this package
but need neither Ibis nor pandas, and not loading them halves a worker's start-up.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from closedloop.collect.importer import NUMERIC_PROPERTIES, import_table
    from closedloop.collect.loader import LoadResult, list_failed, load_jsonl
    from closedloop.collect.messages import (
        AcceptedMessage,
        Reason,
        RejectedMessage,
        validate_message,
    )

_WHERE = {
    "NUMERIC_PROPERTIES": "closedloop.collect.importer",
    "import_table": "closedloop.collect.importer",
    "LoadResult": "closedloop.collect.loader",
    "list_failed": "closedloop.collect.loader",
    "load_jsonl": "closedloop.collect.loader",
    "AcceptedMessage": "closedloop.collect.messages",
    "Reason": "closedloop.collect.messages",
    "RejectedMessage": "closedloop.collect.messages",
    "validate_message": "closedloop.collect.messages",
}

__all__ = [
    "NUMERIC_PROPERTIES",
    "AcceptedMessage",
    "LoadResult",
    "Reason",
    "RejectedMessage",
    "import_table",
    "list_failed",
    "load_jsonl",
    "validate_message",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
