"""collect stage: Segment messages in, validated, deduplicated, into the event log.

``validate_message`` is the one gate every message passes (files now, the HTTP collector
later); ``load_jsonl`` and ``import_table`` bring files and tables through it into
``events``, keeping refused input in ``failed_events`` and one ``loads`` row per run.
"""

from closedloop.collect.importer import NUMERIC_PROPERTIES, import_table
from closedloop.collect.loader import LoadResult, list_failed, load_jsonl
from closedloop.collect.messages import (
    AcceptedMessage,
    Reason,
    RejectedMessage,
    validate_message,
)

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
