"""Running a campaign once: audience → eligibility → holdout → policy → content → outbox.

* Fixed eligibility comes first (an address for the channel, no opt-out, marketing consent),
  so the holdout and the treatment group are drawn from the same reachable population and
  lift compares like with like.
* The group is a deterministic hash of (campaign, customer): a person's group survives
  restarts and re-runs, with no stored random state.
* The timing rules of the contact policy (frequency caps across all campaigns, quiet hours,
  do-not-disturb periods; see ``activate.policy``) apply after the split. A held-out person
  is never messaged, but is judged by the same rules: one the policy would have stopped is
  recorded as ``suppressed`` in the holdout group with the rule as reason (and in
  ``policy_verdict``), exactly like a stopped person of the treatment group. Measurement,
  which compares ``sent`` with ``held_out``, thus leaves the same kind of people out of both
  groups, and lift stays unbiased when caps stop people who were recently messaged.
* Every decision is a row in ``deliveries`` keyed by (campaign, occasion, customer); a re-run
  skips people already decided. The outbox file is written whole to a temporary name, fsynced
  and renamed *before* the decisions are logged; a crash between the two is repaired on the
  next run by logging the messages found in the outbox instead of deciding (and sending)
  them again. So a crash at any point sends nobody a message twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import ibis
import numpy as np
import pandas as pd
import pyarrow as pa

from closedloop.activate import tables as _tables  # noqa: F401  (declares `deliveries`)
from closedloop.activate.arbitration import LOST, contest
from closedloop.activate.assignment import (
    campaign_groups,
    message_texts,
    record_variants,
    variant_renderers,
)
from closedloop.activate.policy import (
    OPT_OUT_FIELD,
    Reason,
    Slot,
    cap_blocked,
    fixed_reason,
    local_days,
    personalisation_refused,
    send_slot,
    zone,
)
from closedloop.activate.templates import (
    RECOMMENDED,
    TAGS,
    check_templates,
    depersonalise,
    personalised,
    renderer,
    uses,
)
from closedloop.core.clock import Clock
from closedloop.core.definitions import CampaignDef, Channel, ContactPolicy, GlobalControl
from closedloop.core.engine import Engine
from closedloop.core.errors import DefinitionError
from closedloop.core.ids import stable_hash64, unit_interval
from closedloop.portrait.tables import PROFILES
from closedloop.segments.audience import current_members

ADDRESS_FIELD = {
    Channel.EMAIL: "email",
    Channel.SMS: "phone",
    Channel.OUTBOX: "customer_id",
    # Resolved by the channel at send time (an openid from the identity map, the provider's
    # device registry, the person's shopping guide): the message carries the customer id.
    Channel.WECHAT: "customer_id",
    Channel.PUSH: "customer_id",
    Channel.STAFF_TASK: "customer_id",
}

Checkpoint = Callable[[str], None]
"""A test hook called at named points of a run ("decided", "outbox_written", "logged")."""


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
    postponed: int = 0
    recovered: int = 0
    reasons: dict[str, int] | None = None
    decisions: pa.Table | None = None  # every decision of a dry run (nothing was written)


def assign_group(campaign: str, customer_id: str, holdout: float) -> str:
    """'holdout' for a stable ``holdout`` share of customers, else 'treatment'."""
    return "holdout" if unit_interval("holdout", campaign, customer_id) < holdout else "treatment"


def _delivery_id(campaign: str, occasion: str, customer_id: str) -> str:
    return format(stable_hash64("delivery", campaign, occasion, customer_id), "016x")


def effective_policy(campaign: CampaignDef, policy: ContactPolicy | None = None) -> ContactPolicy:
    """``policy`` (the project's default, or the built-in one) overridden by the campaign's."""
    return (policy or ContactPolicy()).overridden_by(campaign.policy)


def all_texts(campaign: CampaignDef) -> list[str]:
    """Every subject and template of the campaign: variants' and the fallback too."""
    texts = [t for _, subject, template in message_texts(campaign) for t in (subject, template)]
    if campaign.fallback_template is not None:
        texts += [campaign.fallback_subject, campaign.fallback_template]
    return texts


def template_fields(campaign: CampaignDef) -> list[str]:
    """Profile columns the campaign's templates read: the only ones fetched per person."""
    names: set[str] = set()
    for text in all_texts(campaign):
        names |= uses(text).names
    return sorted(names & set(PROFILES.columns))


def uses_recommended(campaign: CampaignDef) -> bool:
    return any(RECOMMENDED in uses(text).names for text in all_texts(campaign))


MANY = 20_000  # above this many people, read a whole table rather than an id list


def used_tags(campaign: CampaignDef) -> list[str]:
    """Tag names the campaign's templates read (``tags.NAME``)."""
    names: set[str] = set()
    for text in all_texts(campaign):
        names |= uses(text).tags
    return sorted(names)


def tag_contexts(
    engine: Engine, campaign: CampaignDef, people: Sequence[str]
) -> dict[str, dict[str, str | None]]:
    """Each person's ``tags`` for the templates: every tag they read, None where the person
    has no value (a template must guard it as it guards any profile field)."""
    names = used_tags(campaign)
    if not people or not names:
        return {}
    tv = engine.table("tag_values")
    tv = tv.filter(tv.tag.isin(names))
    if len(people) <= MANY:
        tv = tv.filter(tv.customer_id.isin(list(people)))
    out = {p: dict.fromkeys(names) for p in people}
    for r in tv.select("customer_id", "tag", "value").to_pyarrow().to_pylist():
        got = out.get(r["customer_id"])
        if got is not None:
            got[r["tag"]] = r["value"]
    return out


def refusing(engine: Engine, campaign: CampaignDef, people: Sequence[str]) -> set[str]:
    """Those of ``people`` who refused personalisation (only asked if the content is personal)."""
    if not people or not personalised(campaign):
        return set()
    refused = personalisation_refused(engine, None if len(people) > MANY else people)
    return refused & set(people)


def recommended_lists(
    engine: Engine, campaign: CampaignDef, people: Sequence[str]
) -> dict[str, list[dict[str, Any]]]:
    """Each person's ``recommended`` products, when the templates read them."""
    if not people or not uses_recommended(campaign):
        return {}
    from closedloop.predict.recommend import recommended_for

    got = recommended_for(engine, None if len(people) > MANY else list(people), campaign.recommend)
    return got


def step_message(campaign: CampaignDef, step: Any) -> CampaignDef:
    """The campaign as a journey's send step sends it (its keys override the campaign's)."""
    spec = step.send
    return campaign.model_copy(
        update={
            "channel": spec.channel or campaign.channel,
            "subject": campaign.subject if spec.subject is None else spec.subject,
            "template": spec.template or campaign.template,
        }
    )


def run_campaign(
    engine: Engine,
    campaign: CampaignDef,
    *,
    outbox_dir: Path,
    occasion: str,
    clock: Clock | None = None,
    policy: ContactPolicy | None = None,
    timezone: str | None = None,
    checkpoint: Checkpoint | None = None,
    dry_run: bool = False,
    customers: Sequence[str] | None = None,
    global_control: GlobalControl | None = None,
    rivals: Sequence[CampaignDef] = (),
) -> CampaignRun:
    """Decide and write this occasion's messages for everyone in the audience not yet decided.

    ``policy`` is the project's contact policy (the campaign's ``policy:`` keys override it;
    a project loaded with ``load_project`` has already merged them); ``timezone`` is the
    fallback for people with no known time zone (default: the policy's, else UTC).

    ``dry_run`` decides and renders exactly as a real run (so a template that fails for some
    person fails here too) but writes no outbox and no log; the decisions come back in
    ``CampaignRun.decisions`` — who would be messaged, held out, or stopped and by which rule.

    ``customers`` limits the run to those audience members (a journey's send step).

    ``global_control`` is the project's: its members are excluded (``held_out`` in group
    ``global_control``); holdout and variants are drawn by ``activate.assignment``.

    ``rivals`` are the project's other campaigns: with ``arbitration`` set, a person who
    qualifies for several arbitrating campaigns belongs to one (``activate.policy.arbitrate``)
    and the others record ``lost_arbitration:WINNER`` — decided before the holdout split,
    like consent, so each campaign's groups are drawn from the people it may message.
    """
    bad_templates = check_templates(campaign)
    if bad_templates:  # a missing field is an error before anyone is decided, not a blank
        raise DefinitionError(bad_templates)
    now = (clock or Clock()).now()
    pol = effective_policy(campaign, policy)
    default_tz = timezone or pol.default_timezone or "UTC"
    hook = checkpoint or (lambda _: None)
    folder = outbox_dir / campaign.name
    upgrade_deliveries(engine)
    recovered = 0 if dry_run else _recover(engine, campaign, occasion, folder)

    address_field = ADDRESS_FIELD[campaign.channel]
    opt_field = OPT_OUT_FIELD.get(campaign.channel)
    members = current_members(engine, campaign.audience)
    profiles = engine.table("profiles")
    audience = members.select("customer_id").distinct().join(profiles, "customer_id")
    if customers is not None:  # a journey step: only the people at that step
        audience = audience.filter(audience.customer_id.isin(list(customers)))
    d = engine.table("deliveries")
    done = d.filter((d.campaign == campaign.name) & (d.occasion == occasion))
    todo = audience.filter(~audience.customer_id.isin(done.customer_id))
    fields = template_fields(campaign)
    wanted = ["customer_id", address_field, "consent_marketing", "timezone", *fields]
    if opt_field:
        wanted.append(opt_field)
    cols = list(dict.fromkeys(wanted))
    data = todo.select(*cols).order_by("customer_id").to_pyarrow()
    already = int(audience.count().execute()) - data.num_rows

    n = data.num_rows
    cid: list[str] = data.column("customer_id").to_pylist()
    address: list[Any] = data.column(address_field).to_pylist()
    consent: list[Any] = data.column("consent_marketing").to_pylist()
    opted: list[Any] = data.column(opt_field).to_pylist() if opt_field else [None] * n
    tz_name: list[Any] = data.column("timezone").to_pylist()

    # 1. Fixed eligibility, then 2. the holdout split among the eligible.
    status: list[str] = ["suppressed"] * n
    group: list[str | None] = [None] * n
    reason: list[str | None] = [None] * n
    variant: list[str | None] = [None] * n
    eligible: list[int] = []
    for i in range(n):
        r = fixed_reason(pol, address=address[i], consent=consent[i], opted_out=opted[i])
        if r is not None:
            reason[i] = r.value
            continue
        eligible.append(i)
    lost = contest(
        engine, campaign, rivals, [cid[i] for i in eligible], now=now, timezone=default_tz
    )
    if lost:
        for i in eligible:
            if cid[i] in lost:
                reason[i] = LOST + lost[cid[i]].winner
        eligible = [i for i in eligible if cid[i] not in lost]
    drawn = campaign_groups(engine, campaign, [cid[i] for i in eligible], global_control)
    for i, g, v in zip(eligible, drawn.group, drawn.variant, strict=True):
        group[i], variant[i] = g, v
        status[i] = "sent" if g == "treatment" else "held_out"
        if g != "treatment":
            reason[i] = g  # holdout, or global_control (never messaged by any campaign)

    # 3. Timing rules for everyone assigned, held out or not (see the module docstring).
    assigned = np.array([g in ("treatment", "holdout") for g in group], dtype=bool)
    slots: dict[str, Slot] = {}
    send_at: list[datetime | None] = [None] * n
    verdict: list[str | None] = [None] * n
    day = np.zeros(n, dtype=np.int64)
    for i in np.flatnonzero(assigned).tolist():
        key = tz_name[i] or ""
        slot = slots.get(key)
        if slot is None:
            slot = slots[key] = send_slot(pol, zone(key or None, default_tz), now)
        day[i] = slot.local_day
        if slot.send_at is None:
            verdict[i] = slot.reason.value if slot.reason else None
        else:
            send_at[i] = slot.send_at
            if slot.reason is not None and status[i] == "sent":
                reason[i] = slot.reason.value  # postponed, and why
    capped = _capped(engine, pol, campaign.channel, cid, tz_name, day, assigned, default_tz)
    for i in np.flatnonzero(assigned & capped).tolist():
        verdict[i] = verdict[i] or Reason.FREQUENCY_CAP.value
    for i in np.flatnonzero(assigned).tolist():
        if verdict[i] is not None:  # stopped (treatment) or would have been (holdout)
            status[i], reason[i], send_at[i] = "suppressed", verdict[i], None
    hook("decided")

    # 4. Content, outbox, log.
    delivery_ids = [_delivery_id(campaign.name, occasion, c) for c in cid]
    message_ids: list[str | None] = [None] * n
    lines: list[str] = []
    render = variant_renderers(campaign)
    fallback = (
        (renderer(campaign.fallback_subject), renderer(campaign.fallback_template))
        if campaign.fallback_template is not None
        else None
    )
    offer = campaign.offer.model_dump() if campaign.offer else None
    offer_code = campaign.offer.code if campaign.offer else None
    columns = {f: data.column(f).to_pylist() for f in fields}
    to_send = [cid[i] for i in range(n) if status[i] == "sent"]
    refused = refusing(engine, campaign, to_send)
    recommended = recommended_lists(engine, campaign, to_send)
    with_recs = uses_recommended(campaign)
    tags = tag_contexts(engine, campaign, to_send)
    decided_iso = now.isoformat()
    for i in range(n):
        if status[i] != "sent":
            continue
        message_ids[i] = "msg_" + delivery_ids[i]
        ctx = {f: columns[f][i] for f in fields}
        ctx.update(offer=offer, campaign=campaign.name)
        if with_recs:
            ctx[RECOMMENDED] = recommended.get(cid[i], [])
        if tags:
            ctx[TAGS] = tags[cid[i]]
        at = send_at[i]
        subject, body = render[variant[i]]
        personal = cid[i] not in refused
        if not personal:  # never content drawn from the profile (activate.templates)
            ctx = depersonalise(ctx)
            if fallback is not None:
                subject, body = fallback
        lines.append(
            json.dumps(
                {
                    "delivery_id": delivery_ids[i],
                    "campaign": campaign.name,
                    "occasion": occasion,
                    "customer_id": cid[i],
                    "channel": campaign.channel.value,
                    "address": address[i],
                    "message_id": message_ids[i],
                    "decided_at": decided_iso,
                    "sent_at": at.isoformat() if at else decided_iso,
                    "postponed_by": reason[i],
                    "subject": subject(ctx),
                    "body": body(ctx),
                    "offer_code": offer_code,
                    "variant": variant[i],
                    "personalised": personal,
                },
                ensure_ascii=False,
                default=str,
            )
        )
    if not dry_run:  # before the outbox: a sent message always has its variant on record
        record_variants(engine, campaign, occasion, delivery_ids, cid, variant)
    outbox = _write_outbox(folder, occasion, lines) if lines and not dry_run else None
    hook("outbox_written")
    decisions: pa.Table | None = None
    if n:
        decisions = pa.table(
            {
                "delivery_id": pa.array(delivery_ids, pa.string()),
                "campaign": pa.array([campaign.name] * n, pa.string()),
                "occasion": pa.array([occasion] * n, pa.string()),
                "customer_id": pa.array(cid, pa.string()),
                "group": pa.array(group, pa.string()),
                "status": pa.array(status, pa.string()),
                "reason": pa.array(reason, pa.string()),
                "channel": pa.array([campaign.channel.value] * n, pa.string()),
                "address": pa.array([None if a is None else str(a) for a in address], pa.string()),
                "message_id": pa.array(message_ids, pa.string()),
                "decided_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
                "send_at": pa.array(send_at, pa.timestamp("us", tz="UTC")),
                "policy_verdict": pa.array(verdict, pa.string()),
                "variant": pa.array(variant, pa.string()),  # not in `deliveries`: see above
            }
        )
    if decisions is not None and not dry_run:
        engine.append("deliveries", decisions)
    if decisions is not None and dry_run:  # a dry run also says why each loser lost
        lost_why = [lost[c].why if c in lost else None for c in cid]
        decisions = decisions.append_column("why", pa.array(lost_why, pa.string()))
    hook("logged")
    count = {s: status.count(s) for s in ("sent", "held_out", "suppressed")}
    reasons: dict[str, int] = {}
    for s, why in zip(status, reason, strict=True):
        if s == "suppressed" and why:
            reasons[why] = reasons.get(why, 0) + 1
    return CampaignRun(
        campaign=campaign.name,
        occasion=occasion,
        audience=n + already,
        sent=count["sent"],
        held_out=count["held_out"],
        suppressed=count["suppressed"],
        already_decided=already,
        outbox=outbox,
        postponed=sum(1 for s, r in zip(status, reason, strict=True) if s == "sent" and r),
        recovered=recovered,
        reasons=reasons,
        decisions=decisions if dry_run else None,
    )


def upgrade_deliveries(engine: Engine) -> None:
    """Bring a delivery log written before the contact policy to the current schema.

    The log is appended to, never rebuilt, and the caps count its history, so old rows must
    survive: a sent row gets ``send_at = decided_at`` (it went out when decided), and the old
    free-text "no email"/"no phone" reasons become the typed ``no_address``.
    """
    if not engine.exists("deliveries"):
        return
    t = engine.table("deliveries")
    if "send_at" in t.columns and "policy_verdict" in t.columns:
        return
    sent_at = ibis.cases((t.status == "sent", t.decided_at), else_=ibis.null("timestamp"))
    reason = ibis.cases((t.reason.startswith("no "), ibis.literal("no_address")), else_=t.reason)
    engine.replace(
        "deliveries",
        t.mutate(send_at=sent_at, policy_verdict=ibis.null("string"), reason=reason),
    )


def _capped(
    engine: Engine,
    policy: ContactPolicy,
    channel: Channel,
    cid: list[str],
    tz_name: list[Any],
    day: np.ndarray[Any, np.dtype[np.int64]],
    assigned: np.ndarray[Any, np.dtype[np.bool_]],
    default_tz: str,
) -> np.ndarray[Any, np.dtype[np.bool_]]:
    """Which people one more message (on their local ``day``) would push over a cap."""
    if not policy.caps or not assigned.any():
        return np.zeros(len(cid), dtype=bool)
    # Messages that can share a window with a new one on day D lie within `days` of D; +2 as
    # a local day is not a UTC day. D itself may lie ahead of now (a postponed message).
    span = max(c.days for c in policy.caps) + 2
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    lo = epoch + timedelta(days=int(day[assigned].min()) - span)
    hi = epoch + timedelta(days=int(day[assigned].max()) + span)
    d = engine.table("deliveries")
    when = ibis.coalesce(d.send_at, d.decided_at)
    recent = d.filter((d.status == "sent") & (when >= lo) & (when < hi))
    hist = recent.select("customer_id", "channel", when=when).to_pyarrow().to_pandas()
    if hist.empty:
        return np.zeros(len(cid), dtype=bool)
    person = pd.Index(cid).get_indexer(hist["customer_id"])
    keep = person >= 0
    hist, person = hist[keep], person[keep]
    tz_of = pd.Series(tz_name, dtype=object).iloc[person].reset_index(drop=True)
    hist_day = local_days(hist["when"].reset_index(drop=True), tz_of, default_tz)
    return cap_blocked(
        policy,
        channel,
        day=day,
        history_person=person.astype(np.int64),
        history_day=hist_day,
        history_channel=hist["channel"].tolist(),
    )


def _recover(engine: Engine, campaign: CampaignDef, occasion: str, folder: Path) -> int:
    """Log messages that reached the outbox but not the delivery log (a crash between them).

    Outbox-before-log means every logged message is in the outbox; when the outbox holds more
    lines than the log has sent rows, the difference was sent by a run that crashed before
    logging, and must be logged as sent — never decided and written again.
    """
    files = _outbox_files(folder, occasion)
    if not files:
        return 0
    d = engine.table("deliveries")
    mine = d.filter((d.campaign == campaign.name) & (d.occasion == occasion))
    logged = int(mine.filter(mine.status == "sent").count().execute())
    lines = sum(f.read_bytes().count(b"\n") for f in files)
    if lines <= logged:
        return 0
    known = set(mine.customer_id.to_pyarrow().to_pylist())
    rows: list[dict[str, Any]] = []
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            m = json.loads(line)
            if m["customer_id"] in known:
                continue
            known.add(m["customer_id"])
            rows.append(
                {
                    "delivery_id": m["delivery_id"],
                    "campaign": campaign.name,
                    "occasion": occasion,
                    "customer_id": m["customer_id"],
                    "group": "treatment",
                    "status": "sent",
                    "reason": m.get("postponed_by"),
                    "channel": m["channel"],
                    "address": None if m["address"] is None else str(m["address"]),
                    "message_id": m["message_id"],
                    "decided_at": datetime.fromisoformat(m["decided_at"]),
                    "send_at": datetime.fromisoformat(m["sent_at"]),
                    "policy_verdict": None,
                }
            )
    if rows:
        engine.append("deliveries", pa.Table.from_pylist(rows, schema=_RECOVERED))
    return len(rows)


_RECOVERED = pa.schema(
    [
        ("delivery_id", pa.string()),
        ("campaign", pa.string()),
        ("occasion", pa.string()),
        ("customer_id", pa.string()),
        ("group", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("channel", pa.string()),
        ("address", pa.string()),
        ("message_id", pa.string()),
        ("decided_at", pa.timestamp("us", tz="UTC")),
        ("send_at", pa.timestamp("us", tz="UTC")),
        ("policy_verdict", pa.string()),
    ]
)


def _write_outbox(folder: Path, occasion: str, lines: list[str]) -> Path:
    """Append this run's messages as a new file, fsynced and renamed into place."""
    folder.mkdir(parents=True, exist_ok=True)
    n = len(_outbox_files(folder, occasion))
    final = folder / (f"{occasion}.jsonl" if n == 0 else f"{occasion}-{n}.jsonl")
    tmp = final.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(final)
    _fsync_dir(folder)
    return final


def _outbox_files(folder: Path, occasion: str) -> list[Path]:
    """This occasion's outbox files: ``OCCASION.jsonl`` and ``OCCASION-N.jsonl`` (N a number)."""
    if not folder.is_dir():
        return []
    out = []
    for f in folder.glob(f"{occasion}*.jsonl"):
        rest = f.name[len(occasion) : -len(".jsonl")]
        if rest == "" or (rest.startswith("-") and rest[1:].isdigit()):
            out.append(f)
    return sorted(out)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (a renamed file is only safe once its folder is synced)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- preview ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PreviewMessage:
    step: str  # the journey's send step ('' for a one-shot campaign)
    channel: str
    address: Any
    subject: str
    body: str


@dataclass(frozen=True)
class Preview:
    """What one person would get from a campaign today, and whether the policy stops it."""

    campaign: str
    customer_id: str
    matched: tuple[str, str]  # the (identifier type, value) that found the person
    in_audience: bool
    group: str | None  # treatment, holdout or global_control (None: not eligible)
    variant: str | None  # the assigned one (or the one asked for)
    personalised: bool  # False: refused personalisation, so the non-personalised version
    messages: list[PreviewMessage]
    offer: dict[str, Any] | None
    stopped_by: list[str]  # every rule that stops the message today, in the order applied
    send_at: datetime | None  # when it would go out (quiet hours may postpone it)
    postponed_by: str | None
    already: str | None  # this occasion's decision, if one is logged

    @property
    def would_send(self) -> bool:
        return not self.stopped_by


def preview_campaign(
    engine: Engine,
    campaign: CampaignDef,
    identifier: str,
    *,
    identity: Any,
    id_type: str | None = None,
    variant: str | None = None,
    step: str | None = None,
    occasion: str | None = None,
    clock: Clock | None = None,
    policy: ContactPolicy | None = None,
    timezone: str | None = None,
    global_control: GlobalControl | None = None,
    rivals: Sequence[CampaignDef] = (),
) -> Preview:
    """Render the exact message(s) ``identifier``'s customer would get, and say why not.

    The person is found by any identifier (``portrait.lookup.ProfileLookup``: e-mail, phone,
    user id, customer id, aliases followed) and need not be in the audience. Content is
    rendered as a run renders it — the variant of the deterministic assignment (or
    ``variant``), recommended products, the offer, the non-personalised version for a person
    who refused personalisation. The verdict applies the run's rules in the same order:
    audience, consent and opt-out, address, global control and holdout, do-not-disturb and
    quiet hours, frequency caps, and the no-response rule; nothing is written.
    """
    from closedloop.core.errors import InputError
    from closedloop.portrait.lookup import ProfileLookup

    bad = check_templates(campaign)
    if bad:
        raise DefinitionError(bad)
    names = [v.name for v in campaign.variants]
    if variant is not None and variant not in names:
        known = ", ".join(names) or "none: the campaign has no variants"
        raise InputError(f"campaign {campaign.name} has no variant {variant!r} ({known})")
    sends = [s for s in campaign.journey if hasattr(s, "send")]
    if step is not None and step not in [s.id for s in sends]:
        known = ", ".join(s.id for s in sends)
        raise InputError(f"campaign {campaign.name} has no send step {step!r} ({known})")
    with ProfileLookup.open(engine, identity) as lookup:
        match = lookup.find(identifier, id_type)
    if match is None:
        raise InputError(f"no customer has the identifier {identifier!r}")
    profile = match.profile
    if profile is None:
        raise InputError(f"customer {match.customer_id} has no profile yet: run a build")
    cid = match.customer_id
    now = (clock or Clock()).now()
    pol = effective_policy(campaign, policy)
    default_tz = timezone or pol.default_timezone or "UTC"
    key = occasion or now.date().isoformat()
    stopped: list[str] = []

    members = current_members(engine, campaign.audience)
    in_audience = bool(members.filter(members.customer_id == cid).count().execute())
    if not in_audience:
        stopped.append(f"not_in_audience ({campaign.audience})")
    upgrade_deliveries(engine)
    d = engine.table("deliveries")
    mine = d.filter((d.campaign == campaign.name) & (d.customer_id == cid))
    logged = mine.filter(mine.occasion == key).select("status", "reason").to_pyarrow().to_pylist()
    already = None
    if logged:
        r = logged[0]
        already = f"{r['status']}" + (f" ({r['reason']})" if r["reason"] else "")
        stopped.append(f"already_decided for occasion {key}: {already}")

    address = profile.get(ADDRESS_FIELD[campaign.channel])
    opt_field = OPT_OUT_FIELD.get(campaign.channel)
    fixed = fixed_reason(
        pol,
        address=address,
        consent=profile.get("consent_marketing"),
        opted_out=profile.get(opt_field) if opt_field else None,
    )
    group: str | None = None
    assigned: str | None = None
    lost = (
        contest(engine, campaign, rivals, [cid], now=now, timezone=default_tz)
        if fixed is None
        else {}
    )
    if fixed is not None:
        stopped.append(fixed.value)
    elif lost:
        stopped.append(LOST + lost[cid].why)  # "WINNER (…): why", read as "lost to WINNER…"
    else:
        drawn = campaign_groups(engine, campaign, [cid], global_control)
        group, assigned = drawn.group[0], drawn.variant[0]
        if group != "treatment":
            stopped.append(group)  # holdout or global_control: measured, never messaged
    tz_name = profile.get("timezone")
    slot = send_slot(pol, zone(tz_name or None, default_tz), now)
    if slot.send_at is None and slot.reason is not None:
        stopped.append(slot.reason.value)
    capped = _capped(
        engine,
        pol,
        campaign.channel,
        [cid],
        [tz_name],
        np.array([slot.local_day], dtype=np.int64),
        np.array([True]),
        default_tz,
    )
    if bool(capped[0]):
        stopped.append(Reason.FREQUENCY_CAP.value)
    silent = _journey_silence(engine, campaign, pol, mine, cid, now)
    if silent is not None:
        stopped.append(silent)

    # The content, as a run renders it.
    refused = cid in refusing(engine, campaign, [cid])
    chosen = variant or assigned
    if chosen is None and campaign.variants:  # not in the treatment group: show the first
        chosen = campaign.variants[0].name
    messages: list[PreviewMessage] = []
    for s in sends:
        if step is not None and s.id != step:
            continue
        message = step_message(campaign, s) if campaign.steps else campaign
        ctx: dict[str, Any] = {f: profile.get(f) for f in template_fields(message)}
        ctx.update(
            offer=message.offer.model_dump() if message.offer else None, campaign=message.name
        )
        if uses_recommended(message):
            ctx[RECOMMENDED] = recommended_lists(engine, message, [cid]).get(cid, [])
        if used_tags(message):
            ctx[TAGS] = tag_contexts(engine, message, [cid])[cid]
        texts = {v: (sub, body) for v, sub, body in message_texts(message)}
        subject, body = texts[(chosen or "") if message.variants else ""]
        if refused:
            ctx = depersonalise(ctx)
            if message.fallback_template is not None:
                subject, body = message.fallback_subject, message.fallback_template
        messages.append(
            PreviewMessage(
                step=s.id if campaign.steps else "",
                channel=message.channel.value,
                address=profile.get(ADDRESS_FIELD[message.channel]),
                subject=renderer(subject)(ctx),
                body=renderer(body)(ctx),
            )
        )
    return Preview(
        campaign=campaign.name,
        customer_id=cid,
        matched=match.matched,
        in_audience=in_audience,
        group=group,
        variant=chosen,
        personalised=not refused,
        messages=messages,
        offer=campaign.offer.model_dump() if campaign.offer else None,
        stopped_by=stopped,
        send_at=slot.send_at,
        postponed_by=slot.reason.value if slot.send_at is not None and slot.reason else None,
        already=already,
    )


def _journey_silence(
    engine: Engine,
    campaign: CampaignDef,
    pol: ContactPolicy,
    mine: Any,
    cid: str,
    now: datetime,
) -> str | None:
    """The no-response rule for the person's current journey instance, if it stops them.

    The rule stops a sequence until the next occasion, so it concerns journeys only: an
    instance already stopped by it, or a live one whose last message is unanswered. As in
    ``activate.journeys``, a response is one of the rule's events carrying the message's id,
    or the campaign's goal event, within ``within_hours`` of the send.
    """
    rule = pol.no_response
    if rule is None or campaign.trigger is None or not engine.exists("journey_state"):
        return None
    s = engine.table("journey_state")
    s = s.filter((s.campaign == campaign.name) & (s.customer_id == cid))
    rows = s.order_by([ibis.desc("updated_at"), ibis.desc("seq")]).limit(1)
    latest = rows.select("occasion", "status", "reason").to_pyarrow().to_pylist()
    if not latest:
        return None
    inst = latest[0]
    if inst["status"] == "stopped" and inst["reason"] == "no_response":
        return (
            f"no_response (journey of occasion {inst['occasion']} stopped; next occasion may enter)"
        )
    if inst["status"] not in ("active", "waiting"):
        return None
    sent = mine.filter((mine.status == "sent") & mine.occasion.startswith(f"{inst['occasion']}+"))
    when = ibis.coalesce(sent.send_at, sent.decided_at)
    last = sent.mutate(at=when).order_by(ibis.desc("at")).limit(1)
    rows = last.select("message_id", "at").to_pyarrow().to_pylist()
    if not rows:
        return None
    message_id, at = rows[0]["message_id"], rows[0]["at"]
    if at > now:
        return None
    deadline = at + timedelta(hours=rule.within_hours)
    ev = engine.table("events")
    ec = engine.table("event_customers").filter(lambda t: t.customer_id == cid)
    names = sorted({*rule.responses, campaign.goal.event})
    got = ev.filter(ev.event.isin(names) & (ev.timestamp >= at) & (ev.timestamp <= now))
    got = got.join(ec, "message_id").select("event", "properties").to_pyarrow().to_pylist()
    for e in got:
        props = json.loads(e["properties"] or "{}")
        mid = props.get("message_id") if isinstance(props, dict) else None
        if e["event"] == campaign.goal.event or mid == message_id:
            return None
    if now < deadline:
        return f"awaiting_response (to {message_id} until {deadline:%Y-%m-%d %H:%M} UTC)"
    return f"no_response (to {message_id} sent {at:%Y-%m-%d %H:%M} UTC)"
