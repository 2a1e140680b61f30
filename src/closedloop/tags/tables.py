"""Tables written by ``tags``: the current value of each tag per customer."""

from __future__ import annotations

from closedloop.core.catalogue import Erasure, TableSpec, declare

TAG_VALUES = declare(
    TableSpec(
        name="tag_values",
        stage="tags",
        description="Current tag values: one row per (customer, tag) that has a value.",
        columns={
            "customer_id": "string",
            "tag": "string",
            "value": "string",
            "computed_at": "timestamp('UTC', 6)",
        },
        key=("customer_id", "tag"),
        erasure=Erasure.DELETE_BY_CUSTOMER,
        erasure_column="customer_id",
    )
)
