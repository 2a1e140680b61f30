"""Tables written by ``tags``: current values, manual settings with history, runs and uses.

``model_scores`` is the contract between ``predict`` and model tags: the predict stage writes
one row per (customer, model) it scores; a model tag reads its model's rows. It is declared
here, under the ``predict`` stage that owns it, so a model tag can be defined (and report "no
scores yet") before any model exists.
"""

from __future__ import annotations

from closedloop.core.catalogue import Erasure, TableSpec, declare

TS = "timestamp('UTC', 6)"

TAG_VALUES = declare(
    TableSpec(
        name="tag_values",
        stage="tags",
        description="Current tag values: one row per (customer, tag) that has a value.",
        columns={
            "customer_id": "string",
            "tag": "string",
            "value": "string",
            "computed_at": TS,
        },
        key=("customer_id", "tag"),
        erasure=Erasure.DELETE_BY_CUSTOMER,
        erasure_column="customer_id",
    )
)

TAG_MANUAL = declare(
    TableSpec(
        name="tag_manual",
        stage="tags",
        description=(
            "Manual tag settings by staff, append-only: the latest row per (customer, tag) is "
            "the current value (a null value clears it); earlier rows are the history."
        ),
        columns={
            "customer_id": "string",
            "tag": "string",
            "value": "string",
            "set_by": "string",
            "set_at": TS,
            "note": "string",
        },
        key=("customer_id", "tag", "set_at"),
        erasure=Erasure.DELETE_BY_CUSTOMER,
        erasure_column="customer_id",
    )
)

TAG_RUNS = declare(
    TableSpec(
        name="tag_runs",
        stage="tags",
        description=(
            "One row per tag per build: when it was computed, how many customers got a value, "
            "how new its inputs were, and what went wrong (bad import rows, no scores yet)."
        ),
        columns={
            "tag": "string",
            "computed_at": TS,
            "customers": "int64",
            "inputs_at": TS,
            "note": "string",
        },
        key=("tag", "computed_at"),
        erasure=Erasure.NONE,
    )
)

TAG_USES = declare(
    TableSpec(
        name="tag_uses",
        stage="tags",
        description="When a segment or campaign that reads a tag was evaluated or run.",
        columns={
            "tag": "string",
            "used_by": "string",  # segment:NAME or campaign:NAME
            "used_at": TS,
        },
        key=("tag", "used_by", "used_at"),
        erasure=Erasure.NONE,
    )
)

MODEL_SCORES = declare(
    TableSpec(
        name="model_scores",
        stage="predict",
        description=(
            "Scores written by predict, read by model tags: one row per (customer, model); "
            "label is optional (e.g. a grade), score is the model's number."
        ),
        columns={
            "customer_id": "string",
            "model": "string",
            "score": "float64",
            "label": "string",
            "scored_at": TS,
        },
        key=("customer_id", "model"),
        erasure=Erasure.DELETE_BY_CUSTOMER,
        erasure_column="customer_id",
    )
)
