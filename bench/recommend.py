"""Benchmark: do recommended products predict what customers buy next?

Run as ``python bench/recommend.py [--persons N] [--k 5]``. It generates a brand with the
demo generator (N persons, default 5,000), builds it, then holds out each repeat
customer's last order: recommendations are computed from everything else
(``predict.recommend.recommend``, the very expression ``closedloop predict recommend``
writes), with the clock at the end of history. A customer is a hit when any product of the
held-out order is among their top k. Two baselines are measured in the same run over the
same customers:

* ``popular`` — the k best sellers overall (the usual fallback of a shop);
* ``popular_in_category`` — the k best sellers of the customer's most-bought category.

The generator's purchase model (three items in four from the person's favourite category,
a product picked uniformly within the category) decides which wins; the numbers are
reported as measured. The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import ibis

from closedloop.core.clock import Clock
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from closedloop.demo.generator import generate
from closedloop.demo.project import init_project, relative_data_dir
from closedloop.pipeline import build
from closedloop.predict.recommend import order_items, popular, recommend

AS_OF = datetime(2026, 11, 20, tzinfo=UTC)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--persons", type=int, default=5000)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    k = args.k
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate(root / "brand", args.persons, seed=args.seed)
        init_project(root / "p", data_dir=relative_data_dir(root / "p", root / "brand" / "data"))
        project = load_project(root / "p")
        with Engine(project.engine_url) as engine:
            build(engine, project, clock=Clock(AS_OF))
            items = engine.scratch("items", order_items(engine))
            # Each customer's last order (latest time, then largest order id) is held out.
            orders = items.group_by("customer_id", "order_id").aggregate(at=items.timestamp.max())
            n_orders = orders.group_by("customer_id").aggregate(n=orders.count())
            last = ibis.row_number().over(
                group_by=orders.customer_id,
                order_by=[ibis.desc(orders.at), ibis.desc(orders.order_id)],
            )
            held = orders.mutate(r=last).filter(lambda t: t.r == 0)
            held = held.join(n_orders, "customer_id").filter(lambda t: t.n >= 2)
            held = engine.scratch("held", held.select("customer_id", "order_id"))
            train = items.anti_join(held, ["customer_id", "order_id"])
            truth = items.semi_join(held, ["customer_id", "order_id"])
            truth_sets: dict[str, set[str]] = {}
            for r in truth.select("customer_id", "product_id").to_pyarrow().to_pylist():
                truth_sets.setdefault(r["customer_id"], set()).add(r["product_id"])

            started = time.perf_counter()
            recs = recommend(train, as_of=AS_OF, k=k)
            rec_rows = recs.to_pyarrow().to_pylist()
            seconds = time.perf_counter() - started
            rec_sets: dict[str, set[str]] = {}
            reasons: dict[str, int] = {}
            for r in rec_rows:
                rec_sets.setdefault(r["customer_id"], set()).add(r["product_id"])
                reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1

            best = set(popular(train, k))
            # The best sellers of each customer's most-bought category (in training).
            per_cat = train.group_by("customer_id", "category").aggregate(n=train.count())
            top_cat = ibis.row_number().over(
                group_by=per_cat.customer_id, order_by=[ibis.desc(per_cat.n), per_cat.category]
            )
            pref = per_cat.mutate(r=top_cat).filter(lambda t: t.r == 0)
            buyers = train.group_by("category", "product_id").aggregate(
                b=train.customer_id.nunique()
            )
            rank = ibis.row_number().over(
                group_by=buyers.category, order_by=[ibis.desc(buyers.b), buyers.product_id]
            )
            cat_top = buyers.mutate(r=rank).filter(lambda t: t.r < k)
            cat_sets: dict[str, set[str]] = {}
            for r in cat_top.to_pyarrow().to_pylist():
                cat_sets.setdefault(r["category"], set()).add(r["product_id"])
            pref_of = {
                r["customer_id"]: r["category"]
                for r in pref.select("customer_id", "category").to_pyarrow().to_pylist()
            }
            n_products = int(items.product_id.nunique().execute())

    customers = sorted(truth_sets)
    n = len(customers)

    def rate(hit: list[bool]) -> float:
        return sum(hit) / n if n else 0.0

    ours = rate([bool(truth_sets[c] & rec_sets.get(c, set())) for c in customers])
    base = rate([bool(truth_sets[c] & best) for c in customers])
    in_cat = rate(
        [bool(truth_sets[c] & cat_sets.get(pref_of.get(c, ""), set())) for c in customers]
    )
    fig: dict[str, object] = {
        "persons": args.persons,
        "k": k,
        "products": n_products,
        "customers_evaluated": n,
        "hit_rate_recommend": round(ours, 4),
        "hit_rate_popular": round(base, 4),
        "hit_rate_popular_in_category": round(in_cat, 4),
        "ratio_vs_popular": round(ours / base, 3) if base else None,
        "ratio_vs_popular_in_category": round(ours / in_cat, 3) if in_cat else None,
        "recommend_seconds": round(seconds, 3),
        "rows_by_reason": reasons,
        "machine": f"{platform.machine()}, {platform.python_version()}",
    }
    for key, value in fig.items():
        print(f"{key:>30}: {value}")
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
