"""Tables written by ``collect``: the event log, external ids, failed events and load progress."""

from __future__ import annotations

from closedloop.core.catalogue import Erasure, TableSpec, declare

TS = "timestamp('UTC', 6)"

EVENTS = declare(
    TableSpec(
        name="events",
        stage="collect",
        description="The append-only event log: one row per accepted Segment message.",
        columns={
            "message_id": "string",
            "type": "string",
            "event": "string",
            "user_id": "string",
            "anonymous_id": "string",
            "timestamp": TS,
            "original_timestamp": TS,
            "sent_at": TS,
            "received_at": TS,
            "source": "string",
            "channel": "string",
            "data_class": "string",
            "properties": "string",  # JSON text
            "traits": "string",  # JSON text (identify traits, or context.traits)
            "context": "string",  # JSON text
            # Promoted from properties for the e-commerce spec (Order Completed & co.):
            "order_id": "string",
            "revenue": "float64",
            "category": "string",
            "coupon": "string",
            "load_id": "string",
        },
        key=("message_id",),
        erasure=Erasure.DELETE_BY_MESSAGE,
        erasure_column="message_id",
    )
)

EVENT_EXTERNAL_IDS = declare(
    TableSpec(
        name="event_external_ids",
        stage="collect",
        description="context.externalIds of each message, one row per id.",
        columns={"message_id": "string", "type": "string", "id": "string", "collection": "string"},
        key=("message_id", "type", "id"),
        erasure=Erasure.DELETE_BY_MESSAGE,
        erasure_column="message_id",
    )
)

FAILED_EVENTS = declare(
    TableSpec(
        name="failed_events",
        stage="collect",
        description="Every rejected message or row, with a typed reason, kept for repair and replay.",
        columns={
            "failure_id": "string",
            "source": "string",
            "reason_code": "string",
            "reason": "string",
            "location": "string",
            "message_id": "string",
            "payload": "string",
            "failed_at": TS,
            "load_id": "string",
        },
        key=("failure_id",),
        erasure=Erasure.DELETE_BY_MESSAGE,
        erasure_column="message_id",
    )
)

LOADS = declare(
    TableSpec(
        name="loads",
        stage="collect",
        description="One row per file or table loaded: counts that must add up.",
        columns={
            "load_id": "string",
            "import_name": "string",
            "source": "string",
            "location": "string",
            "received": "int64",
            "accepted": "int64",
            "failed": "int64",
            "duplicate": "int64",
            "started_at": TS,
            "finished_at": TS,
        },
        key=("load_id",),
        erasure=Erasure.NONE,
    )
)

INTAKE_KEYS = declare(
    TableSpec(
        name="intake_keys",
        stage="collect",
        description=(
            "The loader's exactly-once index: a 96-bit hash of every messageId and failure id "
            "written to events / failed_events, with when, and the write (seq) that added it."
        ),
        columns={"key_hi": "int64", "key_lo": "int32", "received_at": TS, "seq": "int64"},
        key=("key_hi", "key_lo", "seq"),
        # Only hashes: no message can be read back from them. Kept through an erasure, so a
        # replay of an erased person's messages is still recognised and not loaded again.
        erasure=Erasure.NONE,
    )
)
