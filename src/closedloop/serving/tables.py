"""The table written while serving: one row per live refresh (counts and timings only)."""

from __future__ import annotations

from closedloop.core.catalogue import Erasure, TableSpec, declare

TS = "timestamp('UTC', 6)"

LIVE_REFRESHES = declare(
    TableSpec(
        name="live_refreshes",
        stage="segments",
        description="One row per refresh run while serving: why it ran (start, events, clock), "
        "its clock (segment entries it found carry it as entered_at), when it was committed, "
        "and the seconds each stage took. Entry latency = finished_at − the event's arrival.",
        columns={
            "as_of": TS,
            "finished_at": TS,
            "reason": "string",  # 'start' | 'events' | 'clock'
            "loaded": "int64",  # events the loads since the previous run accepted
            "identity_path": "string",  # identity resolution: 'incremental' or 'full'
            # How tags, segments and store found whom to carry forward: 'by key', 'digests'
            # (compared whole), or 'everyone: WHY' (serving.changes.plan_changes).
            "changes": "string",
            "recomputed": "int64",  # customers whose portrait was recomputed
            "entered": "int64",  # segment entries recorded, all segments
            "exited": "int64",
            "identity_s": "float64",
            "portrait_s": "float64",
            "tags_s": "float64",
            "segments_s": "float64",
            "lookup_s": "float64",
            "seconds": "float64",
        },
        key=("finished_at",),
        erasure=Erasure.NONE,
    )
)

LIVE_DIGESTS = declare(
    TableSpec(
        name="live_digests",
        stage="segments",
        description="Per customer, a digest of the profile row (all but computed_at) and of "
        "the identifiers, as the last live refresh left them: the next one compares them to "
        "find whose tags, segments and served profile to recompute (serving.changes).",
        columns={"customer_id": "string", "profile": "int64", "identity": "int64"},
        key=("customer_id",),
        erasure=Erasure.DELETE_BY_CUSTOMER,
        erasure_column="customer_id",
    )
)

LIVE_STATE = declare(
    TableSpec(
        name="live_state",
        stage="segments",
        description="What the digests in live_digests describe: the clock of the refresh "
        "that wrote them, the portrait run it followed, the definitions it used, and the "
        "last identity run it saw (the next finds identity's changes since by its seq).",
        columns={
            "as_of": TS,
            "portrait_run": TS,
            "definitions": "string",
            "identity_seq": "int64",
        },
        key=("as_of",),
        erasure=Erasure.NONE,
    )
)
