"""Staff tasks: a "next best action" for the person's shopping guide or sales owner.

Some customers are best reached by a person — the shopping guide who knows them, a sales
owner for a B2B account. For them a campaign's message becomes a row in ``staff_tasks``:
who to contact, what to do (the rendered subject), what to say (the body), the offer and
by when; the guide's app or a CSV export (``export_staff_tasks``) takes it from there.

The owner comes from a computed trait (``owner_trait`` in the channel's definition, e.g. a
``shopping_guide`` trait holding the guide's id); a person without one gets an
``unassigned`` task, so nobody silently drops out of the campaign.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv

from closedloop.activate.channels.base import Attempt, SendResult
from closedloop.core.catalogue import Erasure, TableSpec, declare
from closedloop.core.clock import Clock
from closedloop.core.engine import Engine

UNASSIGNED = "unassigned"
DUE_AFTER = timedelta(days=2)

STAFF_TASKS = declare(
    TableSpec(
        name="staff_tasks",
        stage="activate",
        description=(
            "Next best actions for staff: one row per campaign message sent through the "
            "staff_task channel — the customer, the owner (shopping guide / sales owner, or "
            "'unassigned'), the action and what to say, the offer, and when it is due."
        ),
        columns={
            "task_id": "string",
            "message_id": "string",
            "campaign": "string",
            "variant": "string",
            "customer_id": "string",
            "owner": "string",
            "action": "string",
            "detail": "string",
            "offer_code": "string",
            "created_at": "timestamp('UTC', 6)",
            "due_at": "timestamp('UTC', 6)",
            "status": "string",
        },
        key=("task_id",),
        erasure=Erasure.DELETE_BY_CUSTOMER,
        erasure_column="customer_id",
    )
)


def owners(engine: Engine, trait: str | None, customers: Sequence[str]) -> dict[str, str]:
    """Each customer's owner from the computed trait ``trait`` (text value)."""
    if trait is None or not customers:
        return {}
    t = engine.table("computed_traits")
    rows = (
        t.filter((t.trait == trait) & t.customer_id.isin(list(customers)) & t.text_value.notnull())
        .select("customer_id", "text_value")
        .to_pyarrow()
        .to_pylist()
    )
    return {r["customer_id"]: r["text_value"] for r in rows}


class StaffTaskChannel:
    """Writes each message as an open task in ``staff_tasks`` (idempotent by message id)."""

    name = "staff_task"

    def __init__(
        self, engine: Engine, owner_trait: str | None = None, clock: Clock | None = None
    ) -> None:
        self.engine = engine
        self.owner_trait = owner_trait
        self.clock = clock or Clock()
        self._owners: dict[str, str] = {}

    def prepare(self, messages: Sequence[dict[str, Any]]) -> None:
        """Look up the owners of a run's customers in one query."""
        ids = sorted({str(m["customer_id"]) for m in messages})
        self._owners = owners(self.engine, self.owner_trait, ids)

    def send(
        self, message: dict[str, Any], *, attempts_left: int, pace: Callable[[], None]
    ) -> SendResult:
        pace()
        now = self.clock.now()
        task_id = "task_" + str(message["message_id"])
        sent_at = datetime.fromisoformat(message["sent_at"]) if message.get("sent_at") else now
        row = {
            "task_id": task_id,
            "message_id": str(message["message_id"]),
            "campaign": message.get("campaign"),
            "variant": message.get("variant"),
            "customer_id": message.get("customer_id"),
            "owner": self._owners.get(str(message.get("customer_id")), UNASSIGNED),
            "action": message.get("subject") or f"Contact for {message.get('campaign')}",
            "detail": message.get("body") or "",
            "offer_code": message.get("offer_code"),
            "created_at": now,
            "due_at": sent_at + DUE_AFTER,
            "status": "open",
        }
        data = pa.Table.from_pylist([row], schema=STAFF_TASKS.schema.to_pyarrow())
        with self.engine.temporary(data) as new:
            stored = self.engine.table("staff_tasks")
            self.engine.append("staff_tasks", new.anti_join(stored, "task_id"))
        return SendResult([Attempt("delivered", None, now)], provider_id=task_id)

    def close(self) -> None:
        return None


def export_staff_tasks(
    engine: Engine, path: Path, *, owner: str | None = None, status: str | None = "open"
) -> int:
    """Write tasks (of one owner, of one status) as CSV, soonest due first; return the count."""
    t = engine.table("staff_tasks")
    if owner is not None:
        t = t.filter(t.owner == owner)
    if status is not None:
        t = t.filter(t.status == status)
    data = t.order_by(["owner", "due_at", "task_id"]).to_pyarrow()
    path.parent.mkdir(parents=True, exist_ok=True)
    pacsv.write_csv(data, path)
    return int(data.num_rows)
