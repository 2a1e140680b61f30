"""Exporting a segment's members to a webhook, in signed batches.

Members go out in batches of ``batch_size`` as JSON::

    {"segment": "lapsed_buyers", "as_of": "2026-11-20T00:00:00+00:00", "export_id": "...",
     "batch": 1, "batches": 4, "total": 1873, "members": [{"customer_id": "...", ...}, ...]}

Each batch is signed (``core.signed_post``) and carries the idempotency key
``EXPORT_ID:BATCH``; the export id is derived from the segment, the evaluation time and the
member list, so re-running a failed export for the same ``as_of`` repeats the same keys and
a receiver can skip batches it already has. Batches are sent in order and the export stops
at the first batch that cannot be delivered, saying how many went through.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import pyarrow as pa

from closedloop.core.signed_post import (
    DEFAULT_POLICY,
    DeliveryError,
    RetryPolicy,
    check_url,
    post_signed,
)


@dataclass(frozen=True)
class ExportResult:
    members: int
    batches: int
    attempts: int  # HTTP requests made, retries included
    export_id: str


class ExportError(Exception):
    """A batch could not be delivered; ``delivered`` batches before it were."""

    def __init__(self, message: str, delivered: int, batches: int) -> None:
        super().__init__(message)
        self.delivered = delivered
        self.batches = batches


def _json_value(v: Any) -> Any:
    if isinstance(v, datetime | date):
        return v.isoformat()
    if isinstance(v, Decimal):
        return float(v)
    if isinstance(v, list):
        return [_json_value(x) for x in v]
    return v


def batches(rows: pa.Table, size: int) -> Iterator[list[dict[str, Any]]]:
    """Rows as JSON-ready dicts, ``size`` at a time (timestamps as ISO 8601 text)."""
    for batch in rows.to_batches(max_chunksize=size):
        yield [{k: _json_value(v) for k, v in r.items()} for r in batch.to_pylist()]


def export_id(segment: str, as_of: datetime, rows: pa.Table) -> str:
    """Stable for the same segment, time and members; different when any of them changes."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{segment}\0{as_of.isoformat()}\0".encode())
    for cid in rows.column("customer_id").to_pylist():
        h.update(f"{cid}\0".encode())
    return f"{segment}-{h.hexdigest()}"


def export_to_webhook(
    segment: str,
    as_of: datetime,
    rows: pa.Table,
    url: str,
    secret: bytes,
    batch_size: int = 500,
    policy: RetryPolicy = DEFAULT_POLICY,
    sleep: Callable[[float], None] = time.sleep,
) -> ExportResult:
    """POST ``rows`` (one per member, with ``customer_id``) to ``url`` in signed batches."""
    check_url(url)
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    if not secret:
        raise ValueError("a webhook export needs a non-empty signing secret")
    rows = rows.sort_by("customer_id")
    total = rows.num_rows
    n = max(1, -(-total // batch_size))  # an empty segment still sends one (empty) batch
    eid = export_id(segment, as_of, rows)
    chunks = list(batches(rows, batch_size)) or [[]]
    attempts = 0
    for i, members in enumerate(chunks, start=1):
        body = json.dumps(
            {
                "segment": segment,
                "as_of": as_of.isoformat(),
                "export_id": eid,
                "batch": i,
                "batches": n,
                "total": total,
                "members": members,
            },
            separators=(",", ":"),
        ).encode()
        try:
            d = post_signed(url, body, secret, f"{eid}:{i}", policy, sleep)
        except DeliveryError as e:
            raise ExportError(
                f"batch {i} of {n} not delivered: {e}; {i - 1} batches were delivered "
                f"(export id {eid}: re-running with the same --as-of repeats the same keys)",
                i - 1,
                n,
            ) from None
        attempts += d.attempts
    return ExportResult(total, n, attempts, eid)
