"""Frequency caps replayed on the holdout as if it had been treated on every occasion.

``activate`` judges a held-out person by the timing rules on their *real* history, so the
holdout's verdicts are symmetric only for messages both groups really received. Messages of
this campaign's earlier occasions went to the treatment group alone: a treated person is
capped now because the campaign messaged them last week, while their held-out twin is not.

Here each held-out person's history is completed with the messages this campaign *would*
have sent them — their ``held_out`` rows of earlier occasions, at the time they would have
gone out — and the caps are checked again with ``activate.policy.cap_blocked``, the very
function the send path uses. Those who would now be capped are the holdout's counterparts of
the treated people the caps stopped; leaving both out gives a symmetric "as sent" comparison:
the effect on the people the policy lets through. Second-order effects are not replayed (a
counterfactual message could have capped another campaign's message, which then would not
have capped this one); intent-to-treat, the headline, needs no such replay at all.
"""

from __future__ import annotations

import ibis
import numpy as np
import pandas as pd

from closedloop.activate.campaign import effective_policy
from closedloop.activate.policy import cap_blocked, local_days
from closedloop.core.definitions import CampaignDef, ContactPolicy
from closedloop.core.engine import Engine


def holdout_capped(
    engine: Engine,
    campaign: CampaignDef,
    occasion: str,
    *,
    policy: ContactPolicy | None = None,
    timezone: str | None = None,
) -> set[str]:
    """Held-out people of this occasion (as logged) whom the caps would stop had they been treated.

    ``policy`` is the project's contact policy (the campaign's ``policy:`` keys override it; a
    project from ``load_project`` has merged them already); ``timezone`` the fallback zone.
    """
    pol = effective_policy(campaign, policy)
    if not pol.caps:
        return set()
    default_tz = timezone or pol.default_timezone or "UTC"
    d = engine.table("deliveries")
    if "send_at" not in d.columns:  # a log from before the contact policy: sent when decided
        d = d.mutate(send_at=d.decided_at)
    mine = d.filter((d.campaign == campaign.name) & (d.occasion == occasion))
    held = mine.filter((mine.group == "holdout") & (mine.status == "held_out"))
    p = engine.table("profiles").select("customer_id", "timezone")
    people = held.left_join(p, held.customer_id == p.customer_id).select(
        held.customer_id, held.send_at, held.decided_at, p.timezone
    )
    now = people.to_pyarrow().to_pandas()
    if now.empty:
        return set()
    decided = now["decided_at"].min()
    span = max(c.days for c in pol.caps) + 2
    send = now["send_at"].fillna(now["decided_at"]).reset_index(drop=True)
    tz = now["timezone"].reset_index(drop=True)
    day = local_days(send, tz, default_tz)

    when = ibis.coalesce(d.send_at, d.decided_at)
    lo = pd.Timestamp(send.min()) - pd.Timedelta(days=span)
    hi = pd.Timestamp(send.max()) + pd.Timedelta(days=span)
    real = d.status == "sent"
    would = (d.campaign == campaign.name) & (d.group == "holdout") & (d.status == "held_out")
    ids = held.select("customer_id")
    hist = d.filter(
        (real | would)
        & (d.decided_at < decided.to_pydatetime())
        & (when >= lo.to_pydatetime())
        & (when < hi.to_pydatetime())
        & d.customer_id.isin(ids.customer_id)
    ).select("customer_id", "channel", when=when)
    h = hist.to_pyarrow().to_pandas()
    if h.empty:
        return set()
    person = pd.Index(now["customer_id"]).get_indexer(h["customer_id"])
    keep = person >= 0
    h, person = h[keep].reset_index(drop=True), person[keep]
    hist_day = local_days(h["when"], tz.iloc[person].reset_index(drop=True), default_tz)
    # A would-be message of an earlier occasion goes on the campaign's channel.
    channel = h["channel"].fillna(campaign.channel.value).tolist()
    blocked = cap_blocked(
        pol,
        campaign.channel,
        day=day,
        history_person=person.astype(np.int64),
        history_day=hist_day,
        history_channel=channel,
    )
    return set(now["customer_id"][blocked].tolist())
