"""Tables written by ``activate``: the delivery log, one row per decision about one person."""

from __future__ import annotations

from closedloop.core.catalogue import Erasure, TableSpec, declare

DELIVERIES = declare(
    TableSpec(
        name="deliveries",
        stage="activate",
        description="Every campaign decision: sent, held out (control) or suppressed, and why.",
        columns={
            "delivery_id": "string",
            "campaign": "string",
            "occasion": "string",
            "customer_id": "string",
            "group": "string",
            "status": "string",
            "reason": "string",
            "channel": "string",
            "address": "string",
            "message_id": "string",
            "decided_at": "timestamp('UTC', 6)",
        },
        key=("delivery_id",),
        erasure=Erasure.DELETE_BY_CUSTOMER,
        erasure_column="customer_id",
    )
)
