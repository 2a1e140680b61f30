"""Benchmark: campaign throughput and the honesty of the lift test.

Run as ``python bench/activate.py [--audience N] [--campaigns K]``:

* throughput — an audience of N customers (default 1,000,000) through ``run_campaign``
  (holdout by hashing, sandboxed templates, delivery log, fsynced outbox), beside a baseline
  measured in the same run: one ``json.dumps`` and write per person, with no decisions,
  templates or delivery log — the floor for a Python outbox writer;
* false-positive rate — K simulated A/A campaigns (no true effect; 10,000 people, 20% held
  out, 5% base rate): the share declared significant at 5% must be 5% within its sampling
  error, and the 95% interval must cover 0 about 95% of the time;
* power — the same with a true +2-point effect.

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
import pyarrow as pa

import closedloop.activate.tables
import closedloop.measure.tables  # noqa: F401
from closedloop.activate.campaign import run_campaign
from closedloop.core.clock import Clock
from closedloop.core.definitions import CampaignDef
from closedloop.core.engine import Engine
from closedloop.measure.stats import lift
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


def throughput(n: int, root: Path) -> dict[str, float]:
    with Engine(f"duckdb:///{root / 'w.duckdb'}") as engine:
        ids = [f"c{i:08d}" for i in range(n)]
        cols = {c: pa.nulls(n, type=PROFILES.schema[c].to_pyarrow()) for c in PROFILES.columns}
        cols["customer_id"] = pa.array(ids)
        cols["name"] = pa.array([f"Name {i % 977}" for i in range(n)])
        cols["email"] = pa.array([f"p{i}@example.cn" for i in range(n)])
        engine.replace("profiles", pa.table(cols))
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
        t = time.perf_counter()
        run = run_campaign(
            engine, CAMPAIGN, outbox_dir=root / "outbox", occasion="o1", clock=Clock(NOW)
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
        "campaign_s": round(campaign_s, 2),
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--audience", type=int, default=1_000_000)
    ap.add_argument("--campaigns", type=int, default=2_000)
    args = ap.parse_args()
    rng = np.random.default_rng(2026)
    aa = simulate(args.campaigns, 0.0, rng)
    power = simulate(args.campaigns, 0.02, rng)
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
        "machine": f"{platform.machine()}, {platform.python_version()}",
    }
    for key, value in fig.items():
        print(f"{key:>26}: {value}")
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
