"""Benchmark: campaign throughput and the honesty of the lift test.

Run as ``python bench/activate.py [--audience N] [--campaigns K]``:

* throughput — an audience of N customers (default 1,000,000) through ``run_campaign`` and
  the contact policy engine (consent and opt-outs, holdout by hashing, frequency caps across
  campaigns counted in each person's local days against a delivery log already holding
  N/2 messages of the past week, quiet hours in 6 time zones, a holiday period; sandboxed
  templates, delivery log, fsynced outbox), beside a baseline measured in the same run: one
  ``json.dumps`` and write per person, with no decisions, templates or delivery log — the
  floor for a Python outbox writer;
* false-positive rate — K simulated A/A campaigns (no true effect; 10,000 people, 20% held
  out, 5% base rate): the share declared significant at 5% must be 5% within its sampling
  error, and the 95% interval must cover 0 about 95% of the time;
* power — the same with a true +2-point effect;
* A/B winner — K simulated A/A and A/A/A campaigns (same sizes, the treatment split evenly
  between the variants): how often ``measure.variants.choose_winner`` names a winner when
  every variant is the same (target: at most 5% within its sampling error), beside a naive
  rule measured in the same run (each variant tested against the holdout alone at unadjusted
  p < 0.05, the best significant one named, variants never compared with each other); and
  its power to name the right variant when one has +2 points.

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

import closedloop.activate.tables
import closedloop.measure.tables  # noqa: F401
from closedloop.activate.campaign import run_campaign
from closedloop.core.clock import Clock
from closedloop.core.definitions import CampaignDef, ContactPolicy
from closedloop.core.engine import Engine
from closedloop.measure.stats import lift
from closedloop.measure.variants import choose_winner
from closedloop.portrait.tables import PROFILES

NOW = datetime(2026, 11, 20, tzinfo=UTC)
CAMPAIGN = CampaignDef.model_validate(
    {
        "name": "bench",
        "audience": "everyone",
        "holdout": 0.2,
        "subject": "{{ name or 'Hello' }}, a treat for you",
        "template": "Hi {{ name or 'there' }}, {{ offer.description }} — code {{ offer.code }}: {{ offer.conditions }}.",
        "offer": {
            "code": "B20",
            "description": "20% off",
            "conditions": "14 days, orders over 100 CNY",
        },
    }
)


POLICY = ContactPolicy.model_validate(
    {
        "require_consent": True,
        "caps": [
            {"max": 1, "days": 1},
            {"max": 3, "days": 7},
            {"max": 2, "days": 7, "channel": "sms"},
        ],
        "quiet_hours": {"start": "21:00", "end": "09:00", "action": "postpone"},
        "do_not_disturb": [{"name": "Golden Week", "start": "2026-10-01", "end": "2026-10-07"}],
        "default_timezone": "Asia/Shanghai",
    }
)
# 06:00 UTC: 14:00 in Shanghai, 15:00 in Tokyo, 07:00 in London, 01:00 in New York and
# 22:00 in Los Angeles (quiet: postponed), 11:30 in Kolkata.
ZONES = [
    "Asia/Shanghai",
    "Asia/Tokyo",
    "Europe/London",
    "America/New_York",
    "America/Los_Angeles",
    "Asia/Kolkata",
]
SEND_AT = datetime(2026, 11, 20, 6, tzinfo=UTC)


def throughput(n: int, root: Path) -> dict[str, object]:
    with Engine(f"duckdb:///{root / 'w.duckdb'}") as engine:
        rng = np.random.default_rng(7)
        ids = [f"c{i:08d}" for i in range(n)]
        cols = {c: pa.nulls(n, type=PROFILES.schema[c].to_pyarrow()) for c in PROFILES.columns}
        cols["customer_id"] = pa.array(ids)
        cols["name"] = pa.array([f"Name {i % 977}" for i in range(n)])
        cols["email"] = pa.array([f"p{i}@example.cn" for i in range(n)])
        # 90% consent, 5% refused, 5% never stated; 2% opted out of e-mail.
        u = rng.random(n)
        consent = np.where(u < 0.9, True, np.where(u < 0.95, False, None))
        cols["consent_marketing"] = pa.array(consent.tolist(), pa.bool_())
        cols["email_opt_out"] = pa.array(rng.random(n) < 0.02)
        zones = np.array([*ZONES, None], dtype=object)
        cols["timezone"] = pa.array(zones[rng.integers(0, len(zones), n)].tolist(), pa.string())
        engine.replace("profiles", pa.table(cols))
        # The past week of other campaigns: n/2 messages on random days and channels.
        k = n // 2
        who = rng.integers(0, n, k)
        when = SEND_AT - pd.to_timedelta(rng.integers(0, 7 * 24 * 60, k), unit="m")
        engine.append(
            "deliveries",
            pa.table(
                {
                    "delivery_id": pa.array([f"h{i}" for i in range(k)]),
                    "campaign": pa.array(["earlier"] * k),
                    "occasion": pa.array(["w47"] * k),
                    "customer_id": pa.array([ids[i] for i in who]),
                    "group": pa.array(["treatment"] * k),
                    "status": pa.array(["sent"] * k),
                    "reason": pa.nulls(k, pa.string()),
                    "channel": pa.array(np.where(rng.random(k) < 0.7, "email", "sms").tolist()),
                    "address": pa.nulls(k, pa.string()),
                    "message_id": pa.array([f"mh{i}" for i in range(k)]),
                    "decided_at": pa.array(when, pa.timestamp("us", tz="UTC")),
                    "send_at": pa.array(when, pa.timestamp("us", tz="UTC")),
                    "policy_verdict": pa.nulls(k, pa.string()),
                }
            ),
        )
        engine.replace(
            "segment_membership",
            pa.table(
                {
                    "segment": pa.array(["everyone"] * n),
                    "customer_id": pa.array(ids),
                    "entered_at": pa.array([NOW] * n, pa.timestamp("us", tz="UTC")),
                    "exited_at": pa.nulls(n, pa.timestamp("us", tz="UTC")),
                }
            ),
        )
        marks: dict[str, float] = {}
        t = time.perf_counter()
        run = run_campaign(
            engine,
            CAMPAIGN,
            outbox_dir=root / "outbox",
            occasion="o1",
            clock=Clock(SEND_AT),
            policy=POLICY,
            checkpoint=lambda point: marks.setdefault(point, time.perf_counter() - t),
        )
        campaign_s = time.perf_counter() - t
    t = time.perf_counter()
    with (root / "bare.jsonl").open("w") as f:
        for i in range(n):
            row = {"campaign": "bench", "customer_id": f"c{i:08d}", "body": f"Hi Name {i % 977}"}
            f.write(json.dumps(row) + "\n")
    bare_s = time.perf_counter() - t
    return {
        "audience": n,
        "sent": run.sent,
        "held_out": run.held_out,
        "suppressed": run.suppressed,
        "postponed": run.postponed,
        "suppressed_by": dict(sorted((run.reasons or {}).items())),
        "campaign_s": round(campaign_s, 2),
        "read_and_policy_s": round(marks["decided"], 2),
        "content_and_outbox_s": round(marks["outbox_written"] - marks["decided"], 2),
        "delivery_log_s": round(marks["logged"] - marks["outbox_written"], 2),
        "people_per_s": round(n / campaign_s),
        "bare_write_s": round(bare_s, 2),
        "ratio_to_bare_write": round(campaign_s / bare_s, 1),
    }


def simulate(k: int, effect: float, rng: np.random.Generator) -> dict[str, float]:
    n, share, base = 10_000, 0.2, 0.05
    significant = covered = 0
    for _ in range(k):
        held = rng.binomial(n, share)
        treated = n - held
        xt = rng.binomial(treated, base + effect)
        xc = rng.binomial(held, base)
        r = lift(int(xt), int(treated), int(xc), int(held))
        significant += r.significant
        covered += r.absolute_low <= effect <= r.absolute_high
    rate = significant / k
    return {"rate": rate, "rate_se": math.sqrt(rate * (1 - rate) / k), "coverage": covered / k}


def simulate_winner(k: int, effects: list[float], rng: np.random.Generator) -> dict[str, float]:
    """``k`` campaigns with one variant per effect: the share with a declared winner, with
    the right one (the largest effect's, when it is positive), and the naive rule's share."""
    n, share, base = 10_000, 0.2, 0.05
    shares = [share, *[(1 - share) / len(effects)] * len(effects)]
    best = f"v{int(np.argmax(effects))}" if max(effects) > 0 else None
    declared = right = naive = 0
    for _ in range(k):
        counts = rng.multinomial(n, shares)
        hx = int(rng.binomial(counts[0], base))
        arms = [
            (f"v{i}", int(rng.binomial(m, base + e)), int(m))
            for i, (m, e) in enumerate(zip(counts[1:], effects, strict=True))
        ]
        w = choose_winner((hx, int(counts[0])), arms)
        declared += w.name is not None
        right += best is not None and w.name == best
        top = max(arms, key=lambda a: a[1] / a[2])
        vs = lift(top[1], top[2], hx, int(counts[0]))
        naive += vs.absolute > 0 and vs.p_value < 0.05
    rate = declared / k
    return {
        "rate": rate,
        "rate_se": math.sqrt(rate * (1 - rate) / k),
        "right": right / k,
        "naive": naive / k,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--audience", type=int, default=1_000_000)
    ap.add_argument("--campaigns", type=int, default=2_000)
    args = ap.parse_args()
    rng = np.random.default_rng(2026)
    aa = simulate(args.campaigns, 0.0, rng)
    power = simulate(args.campaigns, 0.02, rng)
    t = time.process_time()
    aa2 = simulate_winner(args.campaigns, [0.0, 0.0], rng)
    aa3 = simulate_winner(args.campaigns, [0.0, 0.0, 0.0], rng)
    ab2 = simulate_winner(args.campaigns, [0.02, 0.0], rng)
    ab3 = simulate_winner(args.campaigns, [0.02, 0.0, 0.0], rng)
    winner_cpu_s = time.process_time() - t
    with tempfile.TemporaryDirectory() as tmp:
        tp = throughput(args.audience, Path(tmp))
    fig: dict[str, object] = {
        **tp,
        "aa_campaigns": args.campaigns,
        "aa_false_positive_rate": round(aa["rate"], 4),
        "aa_false_positive_se": round(aa["rate_se"], 4),
        "aa_ci_coverage": round(aa["coverage"], 4),
        "power_2pt_effect": round(power["rate"], 4),
        "ci_coverage_2pt_effect": round(power["coverage"], 4),
        "ab_winner_fp_rate_aa": round(aa2["rate"], 4),
        "ab_winner_fp_se_aa": round(aa2["rate_se"], 4),
        "ab_winner_fp_rate_aaa": round(aa3["rate"], 4),
        "ab_winner_fp_se_aaa": round(aa3["rate_se"], 4),
        "naive_winner_fp_rate_aa": round(aa2["naive"], 4),
        "naive_winner_fp_rate_aaa": round(aa3["naive"], 4),
        "ab_winner_power_2pt_ab": round(ab2["right"], 4),
        "ab_winner_power_2pt_abc": round(ab3["right"], 4),
        "ab_winner_wrong_2pt_abc": round(ab3["rate"] - ab3["right"], 4),
        "ab_winner_cpu_s": round(winner_cpu_s, 2),
        "machine": f"{platform.machine()}, {platform.python_version()}",
    }
    for key, value in fig.items():
        print(f"{key:>26}: {value}")
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
