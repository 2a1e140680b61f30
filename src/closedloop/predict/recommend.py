"""Next-best products per customer, from purchase history, as Ibis expressions.

Why this method: the only signal every brand has is what people bought. Two products bought
by the same customers are likely to interest a customer who bought one of them ("bought
together", item-to-item co-occurrence at customer level, cosine-normalised so best-sellers do
not dominate every list). A customer with too few co-purchase candidates is filled from the
most popular products of their preferred category (the category they bought most), then
from the most popular products overall. Products the customer bought within
``exclude_days`` are never recommended: a message that offers what was just bought is noise.

Every step is an Ibis expression over ``events``/``event_customers``, so the same definition
runs on DuckDB and PostgreSQL (tested equal) and is written to the declared
``recommendations`` table that templates read as ``recommended``.

``recommend`` takes an ``items`` relation (customer, order, time, product, category, price,
name) rather than the events, so ``bench/recommend.py`` can hold out each customer's last
order and measure the hit rate against ground truth with the very same expression.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import ibis
import ibis.expr.types as ir

from closedloop.core.catalogue import Erasure, TableSpec, declare
from closedloop.core.clock import Clock
from closedloop.core.engine import Engine

ORDER_EVENT = "Order Completed"
TS = "timestamp('UTC', 6)"

RECOMMENDATIONS = declare(
    TableSpec(
        name="recommendations",
        stage="predict",
        description=(
            "Next-best products per customer (rank 1 = best): bought together with what the "
            "customer bought (co-occurrence), else popular in their preferred category, else "
            "popular overall; never a product they bought recently. Templates read the top "
            "rows as `recommended`."
        ),
        columns={
            "customer_id": "string",
            "rank": "int32",
            "product_id": "string",
            "name": "string",
            "category": "string",
            "price": "float64",
            "score": "float64",
            "reason": "string",  # bought_together | popular_in_category | popular
            "computed_at": TS,
        },
        key=("customer_id", "rank"),
        erasure=Erasure.DELETE_BY_CUSTOMER,
        erasure_column="customer_id",
    )
)

FIELDS = ("rank", "product_id", "name", "category", "price", "score", "reason")
"""What a template may read of each recommended product."""

REASONS = ("bought_together", "popular_in_category", "popular")


@dataclass(frozen=True)
class RecommendRun:
    customers: int
    rows: int
    by_reason: dict[str, int]


def order_items(engine: Engine) -> ir.Table:
    """One row per product line of every ``Order Completed`` with a known customer.

    Products come from the Segment e-commerce spec's ``properties.products`` array
    (``product_id``, ``category``, ``price``, ``name`` when given).
    """
    ev = engine.table("events")
    ec = engine.table("event_customers")
    orders = ev.filter(ev.event == ORDER_EVENT).join(ec, "message_id")
    products = orders.properties.cast("json")["products"].array
    lines = orders.select(
        "customer_id",
        "timestamp",
        order_id=ibis.coalesce(orders.order_id, orders.message_id),
        item=products,
    ).unnest("item")
    item = lines.item
    out = lines.select(
        "customer_id",
        "order_id",
        "timestamp",
        product_id=item["product_id"].unwrap_as("string"),
        category=item["category"].unwrap_as("string"),
        price=item["price"].unwrap_as("float64"),
        name=item["name"].unwrap_as("string"),
    )
    return out.filter(out.product_id.notnull() & out.customer_id.notnull())


def catalogue(items: ir.Table) -> ir.Table:
    """Per product: its latest stated category, price and name, and how many bought it."""
    i = items
    return i.group_by("product_id").aggregate(
        category=i.category.argmax(i.timestamp, where=i.category.notnull()),
        price=i.price.argmax(i.timestamp, where=i.price.notnull()),
        name=i.name.argmax(i.timestamp, where=i.name.notnull()),
        buyers=i.customer_id.nunique(),
    )


def recommend(items: ir.Table, *, as_of: datetime, k: int = 5, exclude_days: int = 90) -> ir.Table:
    """The top ``k`` products per customer who bought anything in ``items`` (see module doc).

    Columns: customer_id, rank (1..k), product_id, name, category, price, score, reason.
    Ties are broken by product id, so every engine gives the same lists.
    """
    cat = catalogue(items)
    bought = items.group_by("customer_id", "product_id").aggregate(last=items.timestamp.max())
    recent = bought.filter(bought["last"] >= as_of - timedelta(days=exclude_days))
    recent = recent.select("customer_id", "product_id")

    # Item-to-item cosine over buyers: co(a, b) / sqrt(buyers(a) * buyers(b)).
    a = bought.select(customer_id="customer_id", a="product_id")
    b = bought.select(cid_b="customer_id", b="product_id")
    pairs = a.join(b, (a.customer_id == b.cid_b) & (a.a != b.b))
    co = pairs.group_by("a", "b").aggregate(co=pairs.customer_id.nunique())
    na = cat.select(pa_id="product_id", na="buyers")
    nb = cat.select(pb_id="product_id", nb="buyers")
    co = co.join(na, co.a == na.pa_id).join(nb, co.b == nb.pb_id)
    co = co.select("a", "b", sim=co.co.cast("float64") / (co.na * co.nb).cast("float64").sqrt())
    mine = bought.select(uid="customer_id", a="product_id")
    cand = mine.join(co, "a")
    together = cand.group_by(customer_id=cand.uid, product_id=cand.b).aggregate(
        score=cand.sim.sum()
    )
    together = together.mutate(reason=ibis.literal("bought_together"), tier=ibis.literal(0))

    # Popularity within the customer's preferred category (most items bought; ties: name).
    per_cat = items.filter(items.category.notnull())
    per_cat = per_cat.group_by("customer_id", "category").aggregate(n=per_cat.count())
    order = ibis.row_number().over(
        group_by=per_cat.customer_id, order_by=[ibis.desc(per_cat.n), per_cat.category]
    )
    preferred = per_cat.mutate(r=order).filter(lambda t: t.r == 0)
    preferred = preferred.select(uid="customer_id", pref="category")
    total = cat.buyers.sum().cast("float64")
    pop = cat.select("product_id", "category", score=cat.buyers.cast("float64") / total)
    in_cat = preferred.join(pop, preferred.pref == pop.category)
    in_cat = in_cat.select(
        customer_id=in_cat.uid,
        product_id=in_cat.product_id,
        score=in_cat.score,
        reason=ibis.literal("popular_in_category"),
        tier=ibis.literal(1),
    )

    # Overall popularity: the best sellers, more than k of them, as a customer may have
    # bought some recently (ties by product id).
    best_sellers = ibis.row_number().over(order_by=[ibis.desc(pop.score), pop.product_id])
    top = pop.mutate(r=best_sellers).filter(lambda t: t.r < 3 * k)
    customers = bought.select(uid="customer_id").distinct()
    overall = customers.cross_join(top.select("product_id", "score"))
    overall = overall.select(
        customer_id=overall.uid,
        product_id=overall.product_id,
        score=overall.score,
        reason=ibis.literal("popular"),
        tier=ibis.literal(2),
    )

    cols = ["customer_id", "product_id", "score", "reason", "tier"]
    allc = ibis.union(together.select(*cols), in_cat.select(*cols), overall.select(*cols))
    allc = allc.anti_join(recent, ["customer_id", "product_id"])
    best = ibis.row_number().over(
        group_by=[allc.customer_id, allc.product_id],
        order_by=[allc.tier, ibis.desc(allc.score)],
    )
    allc = allc.mutate(first=best).filter(lambda t: t.first == 0)
    rank = ibis.row_number().over(
        group_by=allc.customer_id,
        order_by=[allc.tier, ibis.desc(allc.score), allc.product_id],
    )
    ranked = allc.mutate(rank=(rank + 1).cast("int32")).filter(lambda t: t["rank"] <= k)
    info = cat.select(pid="product_id", name="name", category="category", price="price")
    out = ranked.join(info, ranked.product_id == info.pid)
    return out.select(
        "customer_id",
        "rank",
        "product_id",
        "name",
        "category",
        "price",
        out.score.cast("float64").name("score"),
        "reason",
    )


def popular(items: ir.Table, k: int = 5) -> list[str]:
    """The ``k`` best sellers (by buyers, ties by id): the baseline the bench compares with."""
    cat = catalogue(items)
    top = cat.order_by([ibis.desc(cat.buyers), cat.product_id]).limit(k)
    return [str(x) for x in top.product_id.to_pyarrow().to_pylist()]


def build_recommendations(
    engine: Engine,
    *,
    clock: Clock | None = None,
    k: int = 5,
    exclude_days: int = 90,
) -> RecommendRun:
    """Compute every customer's recommendations and replace the ``recommendations`` table."""
    now = (clock or Clock()).now()
    recs = recommend(order_items(engine), as_of=now, k=k, exclude_days=exclude_days)
    recs = recs.mutate(computed_at=ibis.literal(now, type="timestamp('UTC')"))
    engine.replace("recommendations", recs)
    t = engine.table("recommendations")
    counts = t.group_by("reason").aggregate(n=t.count()).to_pyarrow().to_pylist()
    return RecommendRun(
        customers=int(t.customer_id.nunique().execute()),
        rows=int(t.count().execute()),
        by_reason={str(r["reason"]): int(r["n"]) for r in counts},
    )


def recommended_for(
    engine: Engine, customers: list[str] | None, limit: int
) -> dict[str, list[dict[str, object]]]:
    """Each customer's top ``limit`` recommendations (rank order), as template items."""
    if not engine.exists("recommendations"):
        return {}
    t = engine.table("recommendations")
    t = t.filter(t["rank"] <= limit)
    if customers is not None:
        t = t.filter(t.customer_id.isin(customers))
    out: dict[str, list[dict[str, object]]] = {}
    rows = t.select("customer_id", *FIELDS).order_by(["customer_id", "rank"])
    for r in rows.to_pyarrow().to_pylist():
        cid = r.pop("customer_id")
        out.setdefault(cid, []).append(r)
    return out
