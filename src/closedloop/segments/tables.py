"""Tables written by ``segments``: audience membership with entry and exit times."""

from __future__ import annotations

from closedloop.core.catalogue import Erasure, TableSpec, declare

SEGMENT_MEMBERSHIP = declare(
    TableSpec(
        name="segment_membership",
        stage="segments",
        description="Who is (and was) in each segment: a row per stay, exited_at null while inside.",
        columns={
            "segment": "string",
            "customer_id": "string",
            "entered_at": "timestamp('UTC', 6)",
            "exited_at": "timestamp('UTC', 6)",
        },
        key=("segment", "customer_id", "entered_at"),
        erasure=Erasure.DELETE_BY_CUSTOMER,
        erasure_column="customer_id",
    )
)
