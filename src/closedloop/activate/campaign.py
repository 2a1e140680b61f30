"""Running a campaign once: audience → eligibility → holdout → content → outbox, idempotently.

* Eligibility comes first (a reachable address for the channel), so the holdout and the
  treatment group are drawn from the same reachable population and lift compares like with
  like.
* The group is a deterministic hash of (campaign, customer): a person's group survives
  restarts and re-runs, with no stored random state.
* Every decision is a row in ``deliveries`` keyed by (campaign, occasion, customer); a re-run
  after a crash skips people already decided, so nobody is messaged twice. The outbox file is
  written whole to a temporary name and renamed before the decisions are recorded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from closedloop.activate import tables as _tables  # noqa: F401  (declares `deliveries`)
from closedloop.activate.templates import render
from closedloop.core.clock import Clock
from closedloop.core.definitions import CampaignDef, Channel
from closedloop.core.engine import Engine
from closedloop.core.ids import stable_hash64, unit_interval
from closedloop.segments.audience import current_members

ADDRESS_FIELD = {Channel.EMAIL: "email", Channel.SMS: "phone", Channel.OUTBOX: "customer_id"}


@dataclass(frozen=True)
class CampaignRun:
    campaign: str
    occasion: str
    audience: int
    sent: int
    held_out: int
    suppressed: int
    already_decided: int
    outbox: Path | None


def assign_group(campaign: str, customer_id: str, holdout: float) -> str:
    """'holdout' for a stable ``holdout`` share of customers, else 'treatment'."""
    return "holdout" if unit_interval("holdout", campaign, customer_id) < holdout else "treatment"


def _delivery_id(campaign: str, occasion: str, customer_id: str) -> str:
    return format(stable_hash64("delivery", campaign, occasion, customer_id), "016x")


def run_campaign(
    engine: Engine,
    campaign: CampaignDef,
    *,
    outbox_dir: Path,
    occasion: str,
    clock: Clock | None = None,
) -> CampaignRun:
    now = (clock or Clock()).now()
    members = current_members(engine, campaign.audience)
    profiles = engine.table("profiles")
    audience = members.join(profiles, "customer_id")
    d = engine.table("deliveries")
    done = d.filter((d.campaign == campaign.name) & (d.occasion == occasion))
    todo = audience.filter(~audience.customer_id.isin(done.customer_id))
    rows = todo.order_by("customer_id").to_pyarrow().to_pylist()
    already = int(audience.count().execute()) - len(rows)

    address_field = ADDRESS_FIELD[campaign.channel]
    decisions: list[dict[str, object]] = []
    outbox_lines: list[str] = []
    for p in rows:
        cid = str(p["customer_id"])
        address = p.get(address_field)
        base = {
            "delivery_id": _delivery_id(campaign.name, occasion, cid),
            "campaign": campaign.name,
            "occasion": occasion,
            "customer_id": cid,
            "channel": campaign.channel.value,
            "address": address,
            "decided_at": now,
            "message_id": None,
            "reason": None,
        }
        if not address:
            decisions.append(
                {**base, "group": None, "status": "suppressed", "reason": f"no {address_field}"}
            )
            continue
        group = assign_group(campaign.name, cid, campaign.holdout)
        if group == "holdout":
            decisions.append({**base, "group": group, "status": "held_out", "reason": "holdout"})
            continue
        message_id = "msg_" + str(base["delivery_id"])
        decisions.append({**base, "group": group, "status": "sent", "message_id": message_id})
        outbox_lines.append(
            json.dumps(
                {
                    "campaign": campaign.name,
                    "occasion": occasion,
                    "customer_id": cid,
                    "channel": campaign.channel.value,
                    "address": address,
                    "message_id": message_id,
                    "sent_at": now.isoformat(),
                    "subject": render(campaign.subject, p, campaign),
                    "body": render(campaign.template, p, campaign),
                    "offer_code": campaign.offer.code if campaign.offer else None,
                },
                ensure_ascii=False,
                default=str,
            )
        )

    outbox = (
        _write_outbox(outbox_dir / campaign.name, occasion, outbox_lines) if outbox_lines else None
    )
    if decisions:
        table = pa.Table.from_pylist(decisions)
        engine.append("deliveries", table)
    count = {
        s: sum(1 for x in decisions if x["status"] == s) for s in ("sent", "held_out", "suppressed")
    }
    return CampaignRun(
        campaign=campaign.name,
        occasion=occasion,
        audience=len(rows) + already,
        sent=count["sent"],
        held_out=count["held_out"],
        suppressed=count["suppressed"],
        already_decided=already,
        outbox=outbox,
    )


def _write_outbox(folder: Path, occasion: str, lines: list[str]) -> Path:
    """Append this run's messages as a new file, fsynced and renamed into place."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(list(folder.glob(f"{occasion}*.jsonl")))
    final = folder / (f"{occasion}.jsonl" if n == 0 else f"{occasion}-{n}.jsonl")
    tmp = final.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(final)
    return final
