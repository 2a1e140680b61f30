"""Tables written by ``identity``: the identity map, customers, aliases, edges, ledger, issues."""

from __future__ import annotations

from closedloop.core.catalogue import Erasure, TableSpec, declare

TS = "timestamp('UTC', 6)"

IDENTITY_MAP = declare(
    TableSpec(
        name="identity_map",
        stage="identity",
        description="Every normalised identifier and the customer it resolves to.",
        columns={
            "id_type": "string",
            "id_value": "string",
            "customer_id": "string",
            "quarantined": "boolean",
            "first_seen": TS,
            "last_seen": TS,
            "messages": "int64",
        },
        key=("id_type", "id_value"),
        erasure=Erasure.DELETE_BY_CUSTOMER,
        erasure_column="customer_id",
    )
)

CUSTOMERS = declare(
    TableSpec(
        name="customers",
        stage="identity",
        description="One row per resolved customer, with a stable id.",
        columns={
            "customer_id": "string",
            "created_at": TS,
            "identifiers": "int64",
            "updated_at": TS,
        },
        key=("customer_id",),
        erasure=Erasure.DELETE_BY_CUSTOMER,
        erasure_column="customer_id",
    )
)

CUSTOMER_ALIASES = declare(
    TableSpec(
        name="customer_aliases",
        stage="identity",
        description="Customer ids retired by a merge; each still resolves to its survivor.",
        columns={"alias_id": "string", "customer_id": "string", "merged_at": TS},
        key=("alias_id",),
        erasure=Erasure.DELETE_BY_CUSTOMER,
        erasure_column="customer_id",
    )
)

IDENTITY_EDGES = declare(
    TableSpec(
        name="identity_edges",
        stage="identity",
        description="Evidence: two identifiers seen together, with one message that showed it.",
        columns={
            "a_type": "string",
            "a_value": "string",
            "b_type": "string",
            "b_value": "string",
            "message_id": "string",
            "messages": "int64",
            "used": "boolean",
            # 'message' (seen in one message) or 'probabilistic' (a scored record pair)
            "kind": "string",
            "score": "float64",  # match probability of a probabilistic pair; null otherwise
            "other_message_id": "string",  # the second record of a probabilistic pair
            "last_ts": TS,  # newest evidence of the pair ('past' blocks compare with it)
            # why an unused edge is unused: quarantined, blocked, dropped by a rule
            "status": "string",
        },
        key=("a_type", "a_value", "b_type", "b_value"),
        erasure=Erasure.DELETE_BY_MESSAGE,
        erasure_column="message_id",
    )
)

MERGE_LEDGER = declare(
    TableSpec(
        name="merge_ledger",
        stage="identity",
        description="Every merge or split of existing customers, with the evidence or reason.",
        columns={
            "merge_id": "string",
            "survivor_id": "string",
            "merged_id": "string",
            "evidence": "string",
            "merged_at": TS,
            # 'merge' (merged_id became an alias of survivor_id) or 'split' (identifiers of
            # survivor_id now form customer merged_id)
            "action": "string",
        },
        key=("merge_id",),
        erasure=Erasure.DELETE_BY_CUSTOMER,
        erasure_column="survivor_id",
    )
)

IDENTIFIER_ISSUES = declare(
    TableSpec(
        name="identifier_issues",
        stage="identity",
        description="Identifiers not used for linking, and why (invalid, blocked, quarantined).",
        columns={
            "id_type": "string",
            "raw_value": "string",
            "reason": "string",
            "messages": "int64",
        },
        key=("id_type", "raw_value", "reason"),
        erasure=Erasure.DELETE_BY_IDENTIFIER,
        erasure_column="raw_value",
    )
)

EVENT_CUSTOMERS = declare(
    TableSpec(
        name="event_customers",
        stage="identity",
        description="The customer each event belongs to.",
        columns={"message_id": "string", "customer_id": "string"},
        key=("message_id",),
        erasure=Erasure.DELETE_BY_CUSTOMER,
        erasure_column="customer_id",
    )
)

IDENTITY_BLOCKS = declare(
    TableSpec(
        name="identity_blocks",
        stage="identity",
        description="Identifiers and links a person removed with `identity split`; every later "
        "resolve honours them. scope 'always' blocks for good, 'past' only the evidence seen "
        "up to blocked_at (newer messages may link again).",
        columns={
            "block_id": "string",
            "a_type": "string",
            "a_value": "string",
            "b_type": "string",  # null when a whole identifier is blocked
            "b_value": "string",
            "scope": "string",
            "reason": "string",
            "blocked_at": TS,
        },
        key=("block_id",),
        erasure=Erasure.DELETE_BY_IDENTIFIER,
        erasure_column="a_value",
    )
)

IDENTITY_DROPPED_LINKS = declare(
    TableSpec(
        name="identity_dropped_links",
        stage="identity",
        description="Links not made because they would break a rule (max_per_customer, "
        "never_link): the lowest-priority offending link is dropped and recorded here.",
        columns={
            "a_type": "string",
            "a_value": "string",
            "b_type": "string",
            "b_value": "string",
            "kind": "string",
            "message_id": "string",
            "rule": "string",
        },
        key=("a_type", "a_value", "b_type", "b_value"),
        erasure=Erasure.DELETE_BY_MESSAGE,
        erasure_column="message_id",
    )
)

IDENTITY_SUSPECTS = declare(
    TableSpec(
        name="identity_suspects",
        stage="identity",
        description="Strong identifiers seen under many different names (a clerk's phone, a "
        "default value): surfaced for the data-quality report rather than trusted.",
        columns={
            "id_type": "string",
            "id_value": "string",
            "names": "int64",
            "messages": "int64",
            "reason": "string",
        },
        key=("id_type", "id_value"),
        erasure=Erasure.DELETE_BY_IDENTIFIER,
        erasure_column="id_value",
    )
)

IDENTITY_CHANGES = declare(
    TableSpec(
        name="identity_changes",
        stage="identity",
        description="Customers whose identifiers changed in a resolution run, so later stages "
        "can recompute only those: 'new', 'grown', 'shrunk', 'changed' (identifiers came and "
        "went), 'merged' (the id is now an alias of another) or 'gone'. Appended per run.",
        columns={
            "customer_id": "string",
            "run_id": "string",
            "change": "string",
            "changed_at": TS,
        },
        key=("run_id", "customer_id"),
        erasure=Erasure.DELETE_BY_CUSTOMER,
        erasure_column="customer_id",
    )
)

# ---- State kept for incremental resolution (resolve.py, incremental.py) -----------------

IDENTITY_OCCURRENCES = declare(
    TableSpec(
        name="identity_occurrences",
        stage="identity",
        description="Every accepted identifier found in each resolved message, normalised: "
        "an incremental run reads the evidence of the customers it touches from here instead "
        "of parsing the whole event log again.",
        columns={"message_id": "string", "id_type": "string", "id_value": "string", "ts": TS},
        key=("message_id", "id_type", "id_value"),
        erasure=Erasure.DELETE_BY_MESSAGE,
        erasure_column="message_id",
    )
)

IDENTITY_MESSAGES = declare(
    TableSpec(
        name="identity_messages",
        stage="identity",
        description="Messages of the event log already read (with or without identifiers): "
        "the next run's new events are those not listed here.",
        columns={"message_id": "string"},
        key=("message_id",),
        erasure=Erasure.DELETE_BY_MESSAGE,
        erasure_column="message_id",
    )
)

IDENTITY_CLUSTERS = declare(
    TableSpec(
        name="identity_clusters",
        stage="identity",
        description="Each identifier's cluster before the merge rules: the connected component "
        "of usable links (not blocked, no quarantined end), named by its smallest identifier. "
        "New evidence can only change the clusters it touches.",
        columns={"id_type": "string", "id_value": "string", "cluster": "string"},
        key=("id_type", "id_value"),
        erasure=Erasure.DELETE_BY_IDENTIFIER,
        erasure_column="id_value",
    )
)

IDENTITY_RUNS = declare(
    TableSpec(
        name="identity_runs",
        stage="identity",
        description="One row per resolution run: the path taken ('full' or 'incremental') and "
        "why, with what the next run compares to choose its own path (the config's and the "
        "blocks' digests, the messages resolved).",
        columns={
            "seq": "int64",  # 1, 2, ...: the latest run has the largest
            "run_id": "string",
            "path": "string",
            "why": "string",
            "config_digest": "string",
            "blocks_digest": "string",
            "messages": "int64",
            "new_messages": "int64",
            "region_identifiers": "int64",  # identifiers recomputed (all of them when full)
            "ran_at": TS,
            # The latest ``received_at`` read so far: the next run's new events are looked
            # for from there (checked, see incremental.py); null when unknown.
            "watermark": TS,
        },
        key=("run_id",),
        erasure=Erasure.NONE,
    )
)

IDENTITY_RECORDS = declare(
    TableSpec(
        name="identity_records",
        stage="identity",
        description="Profile records (messages with a name) as probabilistic matching reads "
        "them, one per message, kept so an incremental run refits the model without parsing "
        "the whole event log.",
        columns={
            "message_id": "string",
            "ts": TS,
            "anchor": "string",  # the message's highest-priority identifier (type, value)
            "anchor_type": "string",
            "name": "string",
            "birthday": "string",
            "city": "string",
            "gender": "string",
            "email": "string",
            "phone": "string",
        },
        key=("message_id",),
        erasure=Erasure.DELETE_BY_MESSAGE,
        erasure_column="message_id",
    )
)
