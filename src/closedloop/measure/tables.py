"""Tables written by ``measure``: per-group campaign outcomes."""

from __future__ import annotations

from closedloop.core.catalogue import Erasure, TableSpec, declare

CAMPAIGN_RESULTS = declare(
    TableSpec(
        name="campaign_results",
        stage="measure",
        description=(
            "Per campaign, occasion and group (intent-to-treat: everyone assigned, messaged or "
            "stopped by the contact policy): customers, conversions and revenue in the goal window."
        ),
        columns={
            "campaign": "string",
            "occasion": "string",
            "group": "string",
            "customers": "int64",
            "conversions": "int64",
            "revenue": "float64",
            "computed_at": "timestamp('UTC', 6)",
        },
        key=("campaign", "occasion", "group"),
        erasure=Erasure.RECOMPUTE,
    )
)
