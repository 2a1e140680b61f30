"""Tables written by the journey worker: journey state and trigger watermarks.

Both are append-only logs: the current state of a journey instance is its row with the highest
``seq``, the current watermark of a campaign its latest row. Appending one Arrow table is one
atomic insert, so a crash leaves either the old state or the new one — never half — and a
re-run of the same tick recomputes the same transitions (sends are idempotent through the
delivery log), so nothing is sent twice.
"""

from __future__ import annotations

from closedloop.core.catalogue import Erasure, TableSpec, declare

TS = "timestamp('UTC', 6)"

JOURNEY_STATE = declare(
    TableSpec(
        name="journey_state",
        stage="activate",
        description=(
            "Where each person is in each journey instance (campaign, occasion): one row per "
            "transition, the highest seq is current. status: active, waiting, done, exited, "
            "stopped (reason: no_response, not_in_audience ...)."
        ),
        columns={
            "campaign": "string",
            "occasion": "string",
            "customer_id": "string",
            "seq": "int64",
            "step": "string",
            "status": "string",
            "reason": "string",
            "entered_at": TS,
            "step_started_at": TS,
            "wake_at": TS,
            "trigger_id": "string",
            "last_message_id": "string",
            "last_sent_at": TS,
            "updated_at": TS,
        },
        key=("campaign", "occasion", "customer_id", "seq"),
        erasure=Erasure.DELETE_BY_CUSTOMER,
        erasure_column="customer_id",
    )
)

JOURNEY_WATERMARKS = declare(
    TableSpec(
        name="journey_watermarks",
        stage="activate",
        description=(
            "How far each journey's trigger has been read: events received up to `watermark`, "
            "and time triggers fired up to it. The latest row per campaign is current."
        ),
        columns={"campaign": "string", "watermark": TS, "updated_at": TS},
        key=("campaign", "updated_at"),
        erasure=Erasure.NONE,
    )
)
