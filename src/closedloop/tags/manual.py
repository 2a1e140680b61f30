"""Manual tags: values set by staff through the API or CLI, with who, when and the history.

Every setting is appended to ``tag_manual`` (never updated), so the history of a customer's
tag — who set what, when, and who cleared it — is kept; the latest row is the current value.
Setting a tag also refreshes that tag's rows of ``tag_values`` at once, so a segment sees it
without waiting for the next build.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import ibis
import pyarrow as pa

from closedloop.core.clock import Clock
from closedloop.core.definitions import Project
from closedloop.core.definitions.tags import TagDef, TagType
from closedloop.core.engine import Engine
from closedloop.core.errors import ClosedloopError
from closedloop.tags import tables as _tables
from closedloop.tags.values import manual_values

TS = "timestamp('UTC', 6)"


@dataclass(frozen=True)
class ManualSetting:
    customer_id: str
    tag: str
    value: str | None
    set_by: str
    set_at: datetime
    note: str | None


def _manual_tag(project: Project, name: str) -> TagDef:
    tag = project.tags.get(name)
    if tag is None:
        raise ClosedloopError(f"no tag {name!r}; known: {', '.join(sorted(project.tags))}")
    if tag.type is not TagType.MANUAL:
        raise ClosedloopError(
            f"tag {name!r} is a {tag.type.value} tag, computed by the build; only manual tags "
            "are set by hand"
        )
    return tag


def set_tag(
    engine: Engine,
    project: Project,
    customer_id: str,
    name: str,
    value: str | None,
    *,
    by: str,
    note: str | None = None,
    clock: Clock | None = None,
) -> ManualSetting:
    """Set (or, with ``value=None``, clear) a manual tag on one customer, recording who and when."""
    tag = _manual_tag(project, name)
    if not by.strip():
        raise ClosedloopError("say who sets the tag (--by NAME)")
    if value is not None:
        value = value.strip()
        if not value:
            raise ClosedloopError("the value is empty (to remove a tag, clear it)")
        if tag.values and value not in tag.values:
            raise ClosedloopError(
                f"{value!r} is not a value of tag {name!r}; allowed: {', '.join(tag.values)}"
            )
    customers = engine.table("customers")
    if int(customers.filter(customers.customer_id == customer_id).count().execute()) == 0:
        raise ClosedloopError(f"no customer {customer_id!r}")
    now = (clock or Clock()).now()
    setting = ManualSetting(customer_id, name, value, by.strip(), now, note)
    engine.append(
        _tables.TAG_MANUAL.name,
        pa.table(
            {
                "customer_id": [customer_id],
                "tag": [name],
                "value": pa.array([value], pa.string()),
                "set_by": [setting.set_by],
                "set_at": pa.array([now], pa.timestamp("us", tz="UTC")),
                "note": pa.array([note], pa.string()),
            }
        ),
    )
    _refresh(engine, tag, now)
    return setting


def _refresh(engine: Engine, tag: TagDef, now: datetime) -> None:
    """Rewrite this tag's rows of ``tag_values`` from the manual settings (others unchanged)."""
    tv = engine.table("tag_values")
    m = manual_values(engine, tag)
    m = m.filter(m.value.notnull())
    fresh = m.select(
        "customer_id",
        tag=ibis.literal(tag.name),
        value=m.value,
        computed_at=ibis.literal(now).cast(TS),
    )
    keep = tv.filter(tv.tag != tag.name)
    engine.replace("tag_values", keep.union(fresh, distinct=False))


def tag_history(
    engine: Engine, customer_id: str | None = None, name: str | None = None
) -> list[ManualSetting]:
    """Manual settings, oldest first, for a customer and/or a tag."""
    m = engine.table("tag_manual")
    if customer_id is not None:
        m = m.filter(m.customer_id == customer_id)
    if name is not None:
        m = m.filter(m.tag == name)
    rows = m.order_by(["set_at", "customer_id", "tag"]).to_pyarrow().to_pylist()
    return [
        ManualSetting(
            str(r["customer_id"]),
            str(r["tag"]),
            r["value"],
            str(r["set_by"]),
            r["set_at"],
            r["note"],
        )
        for r in rows
    ]
