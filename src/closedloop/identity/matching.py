"""Probabilistic matching (Fellegi–Sunter) of profile records that share no identifier.

Why: a member who registers twice gets a new member id, and if the second form has no phone
and a mistyped e-mail, no identifier links the two rows; only the profile (name, birthday,
city, gender, e-mail user name) says they are one person. That evidence is uncertain, so it
is weighed, not matched by rule:

1. records — messages with a name, each standing for its highest-priority identifier (one
   record per identifier);
2. blocking — only pairs agreeing on every field of some blocking rule are compared (the
   generator's duplicates share birthday, city and gender); blocks larger than
   ``max_block_size`` are skipped;
3. comparison levels, in Ibis so every engine computes them: name exact / one transposition
   or close spelling (Levenshtein ≤ 2, same length) / different; e-mail exact / same user
   name at another provider / close user name with the same digits / different; phone, city, gender, birthday
   equal or not; a missing value is neutral;
4. EM without labels over the *distinct comparison patterns* with their counts (a few
   hundred rows whatever the data size), so only that small table enters the process;
5. each pattern's match probability is joined back in the warehouse; pairs at or above
   ``threshold`` become links of kind ``probabilistic``.

The traps the issue names are handled by the model, not by special cases. The same e-mail
user name at two providers is its own level, whose weight EM learns (strangers called Li Wei
share it too). The prior share of matches among compared pairs is re-estimated at every run,
so when a larger customer base puts more strangers with the same name and birthday in each
block, the posterior of that evidence falls and the threshold keeps holding.
"""

from __future__ import annotations

from dataclasses import dataclass

import ibis
import ibis.expr.types as ir
import numpy as np
import pyarrow as pa

from closedloop.core.definitions import IdentityConfig, MatchingConfig
from closedloop.core.engine import Engine
from closedloop.identity.extract import json_string, prepare

MISSING = -1
# Comparisons and their number of levels (level 0 = disagree; MISSING = a value is absent).
LEVELS: dict[str, int] = {
    "name": 3,
    "email": 4,
    "phone": 2,
    "birthday": 2,
    "city": 2,
    "gender": 2,
}


@dataclass(frozen=True)
class MatchModel:
    """The fitted model: prior share of matches, and m/u per comparison level."""

    lam: float
    m: dict[str, list[float]]
    u: dict[str, list[float]]
    pairs: int
    patterns: int

    def weights(self) -> dict[str, list[float]]:
        """log(m/u) per level, made non-decreasing with the level of agreement.

        EM fits what the data shows; if every duplicate in a base happens to carry a typo,
        an exact name gets a *lower* weight than a close one, which no one means. Agreeing
        more is never weaker evidence, so each level's weight is at least the one below.
        """
        out = {}
        for k in self.m:
            w = np.log(np.asarray(self.m[k])) - np.log(np.asarray(self.u[k]))
            out[k] = np.maximum.accumulate(w).tolist()
        return out


RECORD_FIELDS = ("name", "birthday", "city", "gender", "email", "phone")


def record_rows(
    engine: Engine,
    config: IdentityConfig,
    mc: MatchingConfig,
    node_occ: ir.Table,
    events: ir.Table | None = None,
) -> ir.Table:
    """One row per message with a name: (message_id, ts, anchor, anchor_type, fields...).

    Every field of ``RECORD_FIELDS`` is a column (null when not configured), so the rows can
    be kept between runs (``identity_records``): each depends on its own message only, and an
    incremental run parses only the new messages' JSON. ``events``: the rows to read (all
    by default).
    """
    if events is None:
        events = engine.table("events")
    events = events.filter(events.traits.notnull())
    fields = {"name": mc.name, "birthday": mc.birthday, "city": mc.city, "gender": mc.gender}
    sel = {
        k: json_string(engine, events.traits, p.split(".")[1:]).strip().lower()
        for k, p in fields.items()
        if p is not None
    }
    if "gender" in sel:
        # "F", "female", "Female" are one value: compare the first letter.
        sel["gender"] = sel["gender"].left(1)
    rec = events.select("message_id", ts=events.timestamp, **sel)
    rec = rec.filter(rec.name.notnull() & (rec.name != ""))
    for f, id_type in (("email", mc.email), ("phone", mc.phone)):
        if id_type is None:
            continue
        v = node_occ.filter(node_occ.id_type == id_type)
        v = v.group_by("message_id").aggregate(**{f: v.value.min()})
        rec = rec.left_join(v, "message_id").drop("message_id_right")
    prio = ibis.cases(*[(node_occ.id_type == t.name, t.priority) for t in config.types], else_=0)
    occ = node_occ.mutate(priority=prio)
    top = ibis.row_number().over(
        group_by=occ.message_id, order_by=[ibis.desc(occ.priority), occ.node]
    )
    anchors = occ.mutate(r=top).filter(lambda t: t.r == 0)
    anchors = anchors.select("message_id", anchor="node", anchor_type="id_type")
    rec = rec.join(anchors, "message_id")
    missing = {f: ibis.literal(None, type="string") for f in RECORD_FIELDS if f not in rec.columns}
    rec = rec.mutate(**missing)
    out = rec.select("message_id", "ts", "anchor", "anchor_type", *RECORD_FIELDS)
    return prepare(engine, out)


def best_records(rows: ir.Table, present: list[str]) -> ir.Table:
    """One record per anchor identifier, the most complete (a CRM row over a bare sign-up)."""
    rec = rows.select("message_id", "ts", "anchor", "anchor_type", *present)
    if "email" in rec.columns:
        # Computed once per record, not once per compared pair.
        user = rec.email.split("@")[0]
        rec = rec.mutate(email_user=user, email_digits=user.re_replace("[^0-9]", ""))
    filled = sum(
        (ibis.cases((rec[c].isnull(), 0), else_=1) for c in rec.columns if c in LEVELS),
        ibis.literal(0),
    )
    one = ibis.row_number().over(group_by=rec.anchor, order_by=[ibis.desc(filled), rec.message_id])
    return rec.mutate(r=one).filter(lambda t: t.r == 0).drop("r")


def records(
    engine: Engine, config: IdentityConfig, mc: MatchingConfig, node_occ: ir.Table
) -> ir.Table:
    """One record per anchor identifier: (anchor, anchor_type, message_id, ts, fields...)."""
    present = [f for f in LEVELS if getattr(mc, f) is not None]
    return best_records(record_rows(engine, config, mc, node_occ), present)


def _level(name: str, t: ir.Table) -> ir.IntegerValue:
    """Comparison level of field ``name`` in pair table ``t`` (columns ``X_l``/``X_r``).

    MISSING when either value is absent.
    """
    a, b = t[f"{name}_l"], t[f"{name}_r"]
    missing = a.isnull() | b.isnull() | (a == "") | (b == "")
    if name == "name":
        close = (a.length() == b.length()) & (a.levenshtein(b) <= 2)
        lv = ibis.cases((a == b, 2), (close, 1), else_=0)
    elif name == "email":
        ua, ub = t.email_user_l, t.email_user_r
        # User names are built from personal names: li.wei12 and li.wei57 are two people,
        # so a close spelling counts only if the digits (the identifying part) are equal.
        close = (t.email_digits_l == t.email_digits_r) & (ua.levenshtein(ub) <= 2)
        lv = ibis.cases((a == b, 3), (ua == ub, 2), (close, 1), else_=0)
    else:
        lv = ibis.cases((a == b, 1), else_=0)
    return ibis.cases((missing, MISSING), else_=lv)


def _columns(fields: list[str]) -> list[str]:
    """Record columns the comparisons of ``fields`` read."""
    extra = ["email_user", "email_digits"] if "email" in fields else []
    return [*fields, *extra]


def blocked_pairs(rec: ir.Table, mc: MatchingConfig, present: list[str]) -> ir.Table:
    """Record pairs sharing every field of some blocking rule, with their comparison levels."""
    cols = ["anchor", "anchor_type", "message_id", "ts", *_columns(present)]
    parts = []
    for rule in mc.blocking:
        base = rec.filter(ibis.and_(*[rec[f].notnull() & (rec[f] != "") for f in rule]))
        sizes = base.group_by(rule).aggregate(n=base.count())
        base = base.semi_join(sizes.filter(sizes.n <= mc.max_block_size), rule)
        lt = base.select(*cols)
        rt = base.select(*cols)
        lt = lt.rename({f"{c}_l": c for c in cols})
        rt = rt.rename({f"{c}_r": c for c in cols})
        j = lt.join(
            rt,
            [lt[f"{f}_l"] == rt[f"{f}_r"] for f in rule] + [lt.anchor_l < rt.anchor_r],
        )
        parts.append(j)
    pairs = parts[0]
    for p in parts[1:]:
        pairs = pairs.union(p)
    pairs = pairs.distinct()
    lv = {f"g_{f}": _level(f, pairs) for f in present}
    return pairs.mutate(**lv)


def fit(
    patterns: np.ndarray,
    counts: np.ndarray,
    names: list[str],
    iterations: int,
    u_fixed: dict[str, list[float]] | None = None,
) -> MatchModel:
    """EM for a two-class mixture over comparison patterns (conditional independence).

    ``patterns`` is (P, K) of levels (MISSING = neutral), ``counts`` how many pairs show each.
    Starts from "matches agree at the top level, non-matches look like the average pair";
    levels never seen get a small floor so no weight is infinite.

    ``u_fixed`` pins the non-match level frequencies (measured on random record pairs,
    which are almost all non-matches). Without it EM is free to call any tight cluster a
    "match" — e.g. the many strangers sharing a common name — which is the classic way
    unsupervised record linkage goes wrong on customer data.
    """
    k = len(names)
    c = counts.astype(np.float64)
    total = c.sum()
    floor = 1e-6
    m: list[np.ndarray] = []
    u: list[np.ndarray] = []
    for j, n in enumerate(names):
        levels = LEVELS[n]
        col = patterns[:, j]
        seen = col != MISSING
        if u_fixed is not None and n in u_fixed:
            u.append(np.asarray(u_fixed[n], dtype=np.float64))
        else:
            freq = np.array([c[seen & (col == lv)].sum() for lv in range(levels)]) + 1.0
            u.append(freq / freq.sum())
        mj = np.full(levels, 0.05 / max(1, levels - 1))
        mj[-1] = 0.95
        m.append(mj / mj.sum())
    lam = 0.01
    for _ in range(iterations):
        pm = np.full(len(c), lam)
        pu = np.full(len(c), 1.0 - lam)
        for j in range(k):
            col = patterns[:, j]
            seen = col != MISSING
            idx = np.where(seen, col, 0)
            pm = pm * np.where(seen, m[j][idx], 1.0)
            pu = pu * np.where(seen, u[j][idx], 1.0)
        g = pm / (pm + pu)
        lam = float(np.clip((c * g).sum() / total, 1e-9, 1 - 1e-9))
        for j in range(k):
            col = patterns[:, j]
            levels = len(m[j])
            wm = np.array([(c * g)[col == lv].sum() for lv in range(levels)]) + floor
            wu = np.array([(c * (1 - g))[col == lv].sum() for lv in range(levels)]) + floor
            m[j] = wm / wm.sum()
            if u_fixed is None or names[j] not in u_fixed:
                u[j] = wu / wu.sum()
    return MatchModel(
        lam=lam,
        m={n: m[j].tolist() for j, n in enumerate(names)},
        u={n: u[j].tolist() for j, n in enumerate(names)},
        pairs=int(total),
        patterns=len(c),
    )


def probability(model: MatchModel, patterns: np.ndarray, names: list[str]) -> np.ndarray:
    """Posterior match probability of each pattern under ``model``."""
    logit = np.full(len(patterns), np.log(model.lam) - np.log1p(-model.lam))
    weights = model.weights()
    for j, n in enumerate(names):
        col = patterns[:, j]
        seen = col != MISSING
        idx = np.where(seen, col, 0)
        logit += np.where(seen, np.asarray(weights[n])[idx], 0.0)
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(logit, -700, 700))))


def random_pair_u(
    engine: Engine, rec: ir.Table, fields: list[str], sample: int
) -> dict[str, list[float]]:
    """Level frequencies among random record pairs: the u probabilities (non-matches).

    Records are numbered; record i is paired with i + offset (mod n) for a few offsets,
    which gives ``sample`` pseudo-random pairs with one join on every engine.
    """
    n = int(rec.count().execute())
    if n < 2:
        return {}
    k = max(1, min(n - 1, -(-sample // n)))
    offsets = [1 + (i * (n - 1)) // k for i in range(k)]
    numbered = rec.mutate(rn=ibis.row_number().over(order_by=rec.anchor))
    cols = [*_columns(fields), "rn"]
    left = numbered.select(*cols).rename({f"{c}_l": c for c in cols})
    right = numbered.select(*cols).rename({f"{c}_r": c for c in cols})
    with engine.temporary(pa.table({"off": pa.array(offsets, pa.int64())})) as off:
        lo = left.cross_join(off)
        # The partner's number as a column, so engines hash-join on it (an expression in
        # the join condition can fall back to a nested-loop join).
        lo = lo.mutate(partner=(lo.rn_l + lo.off) % n)
        j = lo.join(right, lo.partner == right.rn_r)
        lv = engine.scratch("pm_random", j.select(**{f: _level(f, j) for f in fields}))
        out: dict[str, list[float]] = {}
        for f in fields:
            seen = lv.filter(lv[f] != MISSING)
            cnt = seen.group_by(f).aggregate(c=seen.count()).to_pyarrow()
            freq = np.ones(LEVELS[f])  # add-one: a level never seen is rare, not impossible
            for level, c in zip(cnt[f].to_pylist(), cnt["c"].to_pylist(), strict=True):
                freq[int(level)] += c
            out[f] = (freq / freq.sum()).tolist()
    return out


def probabilistic_pairs(
    engine: Engine, config: IdentityConfig, node_occ: ir.Table, rows: ir.Table | None = None
) -> tuple[ir.Table | None, MatchModel | None]:
    """Links from scored record pairs, shaped like the message pairs of ``resolve``.

    ``rows``: the per-message records (``record_rows``) when the caller has them already.
    """
    mc = config.matching
    if mc is None:
        return None, None
    if engine.backend == "postgres":
        # Levenshtein lives in PostgreSQL's contrib extension (a constant statement).
        engine.con.raw_sql("CREATE EXTENSION IF NOT EXISTS fuzzystrmatch")
    present = [f for f in LEVELS if getattr(mc, f) is not None]
    if rows is None:
        rows = record_rows(engine, config, mc, node_occ)
    rec = engine.scratch("pm_records", best_records(rows, present))
    pairs = engine.scratch("pm_pairs", blocked_pairs(rec, mc, present))
    # Fields every blocking rule fixes are equal in every compared pair: no evidence there.
    always = set.intersection(*[set(r) for r in mc.blocking])
    model_fields = [f for f in present if f not in always]
    gcols = [f"g_{f}" for f in model_fields]
    if not gcols:
        return None, None
    pat = pairs.group_by(gcols).aggregate(n=pairs.count()).to_pyarrow()
    if pat.num_rows == 0:
        return None, None
    patterns = np.column_stack([pat[g].to_numpy() for g in gcols]).astype(np.int64)
    u = random_pair_u(engine, rec, model_fields, mc.u_sample)
    model = fit(patterns, pat["n"].to_numpy(), model_fields, mc.iterations, u)
    p = probability(model, patterns, model_fields)
    scored = pa.table({**{g: pat[g] for g in gcols}, "score": pa.array(p, pa.float64())})
    scored = scored.filter(pa.compute.greater_equal(scored["score"], mc.threshold))
    if scored.num_rows == 0:
        return None, model
    with engine.temporary(scored) as s:
        s_t = engine.scratch("pm_scores", s)
    hit = pairs.join(s_t, gcols)
    a_first = hit.anchor_l < hit.anchor_r
    out = hit.select(
        a=ibis.ifelse(a_first, hit.anchor_l, hit.anchor_r),
        a_type=ibis.ifelse(a_first, hit.anchor_type_l, hit.anchor_type_r),
        b=ibis.ifelse(a_first, hit.anchor_r, hit.anchor_l),
        b_type=ibis.ifelse(a_first, hit.anchor_type_r, hit.anchor_type_l),
        messages=ibis.literal(2, type="int64"),
        message_id=ibis.least(hit.message_id_l, hit.message_id_r),
        last_ts=ibis.greatest(hit.ts_l, hit.ts_r),
        kind=ibis.literal("probabilistic"),
        score=hit.score,
        other_message_id=ibis.greatest(hit.message_id_l, hit.message_id_r),
    )
    return engine.scratch("pm_links", out), model


__all__ = [
    "RECORD_FIELDS",
    "MatchModel",
    "best_records",
    "fit",
    "probabilistic_pairs",
    "probability",
    "record_rows",
    "records",
]
