"""Tables written by ``activate``: the delivery log, one row per decision about one person."""

from __future__ import annotations

from closedloop.core.catalogue import Erasure, TableSpec, declare

DELIVERIES = declare(
    TableSpec(
        name="deliveries",
        stage="activate",
        description=(
            "Every campaign decision: sent, held out (control) or suppressed, and why "
            "(reason: holdout, no_address, opted_out, no_consent, frequency_cap, quiet_hours, "
            "do_not_disturb; on a sent row, the rule that postponed it)."
        ),
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
            # When the message goes out (UTC): later than decided_at when the contact policy
            # postponed it (quiet hours, a holiday); null when nothing is sent.
            "send_at": "timestamp('UTC', 6)",
            # The timing rule (frequency_cap, quiet_hours, do_not_disturb) that stopped the
            # message after the holdout split — or, in the holdout group, would have stopped
            # it: such rows are `suppressed` in both groups, so measurement (sent vs held_out)
            # leaves the same kind of people out of both.
            "policy_verdict": "string",
        },
        key=("delivery_id",),
        erasure=Erasure.DELETE_BY_CUSTOMER,
        erasure_column="customer_id",
    )
)

MESSAGE_ATTEMPTS = declare(
    TableSpec(
        name="message_attempts",
        stage="activate",
        description=(
            "Every hand-over of a message to a channel (SMTP): delivered, bounced (permanent, "
            "never retried) or failed (retried); a message is sent again only after a failure."
        ),
        columns={
            "message_id": "string",
            "attempt": "int32",
            "delivery_id": "string",
            "campaign": "string",
            "customer_id": "string",
            "channel": "string",
            "address": "string",
            "status": "string",
            "error": "string",
            "attempted_at": "timestamp('UTC', 6)",
        },
        key=("message_id", "attempt"),
        erasure=Erasure.DELETE_BY_CUSTOMER,
        erasure_column="customer_id",
    )
)
