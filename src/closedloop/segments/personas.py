"""Personas: customers clustered on chosen traits, each cluster described so it can be named.

Method, stated so a marketer can trust and repeat it:

1. the chosen traits (numeric profile fields or numeric computed traits) are read for every
   customer; customers missing any of them are left out and counted;
2. a non-negative trait with a long right tail (skewness above 2, e.g. revenue) is taken as
   ``log1p`` first, so a handful of big spenders do not become clusters of their own;
3. every trait is standardised to z-scores (mean 0, standard deviation 1; a constant trait
   becomes 0);
4. k-means (scikit-learn, ``n_init=10``, fixed seed) is run for each k in the stated range and
   the k with the best silhouette (on a seeded sample of at most 5,000 customers) is kept,
   unless k is given;
5. each cluster becomes a persona card: its size and share, its mean of every trait, the
   traits that set it apart (mean z-score against the population, largest first) and a
   typical member — the customer nearest to the centroid (ties: the smallest id).

scikit-learn is in the ``models`` extra and imported only here, when personas are asked for.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import numpy.typing as npt

from closedloop.core.engine import Engine
from closedloop.core.errors import ClosedloopError
from closedloop.portrait.tables import PROFILES

NUMERIC_TYPES = ("int32", "int64", "float64")
NUMERIC_PROFILE = sorted(c for c, t in PROFILES.columns.items() if t in NUMERIC_TYPES)
SILHOUETTE_SAMPLE = 5_000
SKEWED = 2.0


@dataclass
class PersonaCard:
    persona: int  # 1 = largest
    size: int
    share: float
    means: dict[str, float]  # the cluster's mean of each trait, in the trait's own units
    z: dict[str, float]  # the cluster's mean z-score of each trait against the population
    distinctive: list[str]  # traits ordered by how far the cluster sits from the population
    typical_member: str
    description: str  # e.g. "high revenue (+1.6 sd), low recency_days (-0.9 sd)"


@dataclass
class Personas:
    traits: list[str]
    k: int
    silhouettes: dict[int, float]  # silhouette of each k tried
    customers: int  # clustered
    left_out: int  # missing a trait
    log_traits: list[str]  # traits taken as log1p before standardising
    seed: int
    cards: list[PersonaCard]
    labels: dict[str, int] = field(repr=False, default_factory=dict)  # customer -> persona

    @property
    def method(self) -> str:
        logs = f"log1p of {', '.join(self.log_traits)}; " if self.log_traits else ""
        tried = ", ".join(f"k={k}: {s:.3f}" for k, s in sorted(self.silhouettes.items()))
        return (
            f"k-means on z-scores of {', '.join(self.traits)} ({logs}seed {self.seed}); "
            f"k={self.k} by silhouette ({tried})"
        )

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("labels")
        d["method"] = self.method
        return d


def _sklearn() -> Any:
    try:
        import sklearn.cluster
        import sklearn.metrics
        import threadpoolctl  # type: ignore[import-untyped]  # a scikit-learn dependency
    except ImportError:
        raise ClosedloopError(
            "personas need scikit-learn, in the `models` extra: pip install 'closedloop[models]'"
        ) from None
    return SimpleNamespace(
        cluster=sklearn.cluster,
        metrics=sklearn.metrics,
        threadpool_limits=threadpoolctl.threadpool_limits,
    )


def trait_matrix(
    engine: Engine, traits: list[str]
) -> tuple[list[str], npt.NDArray[np.float64], int]:
    """Customer ids (sorted), their trait values, and how many customers miss a trait."""
    if not traits:
        raise ClosedloopError("name at least one trait to cluster on")
    p = engine.table("profiles")
    ct = engine.table("computed_traits")
    known_traits = {
        str(x) for x in ct.select("trait").distinct().to_pyarrow().column(0).to_pylist()
    }
    unknown = [t for t in traits if t not in NUMERIC_PROFILE and t not in known_traits]
    if unknown:
        raise ClosedloopError(
            f"not a numeric profile field or computed trait: {', '.join(unknown)}; "
            f"numeric profile fields: {', '.join(NUMERIC_PROFILE)}"
        )
    t = p.select(
        "customer_id", *[p[c].cast("float64").name(c) for c in traits if c in NUMERIC_PROFILE]
    )
    computed = [c for c in traits if c not in NUMERIC_PROFILE]
    if computed:
        pivot = ct.group_by("customer_id").aggregate(
            **{c: ct.number_value.max(where=ct.trait == c) for c in computed}
        )
        t = t.left_join(pivot, "customer_id").drop("customer_id_right")
    data = t.order_by("customer_id").to_pyarrow()
    ids = [str(x) for x in data.column("customer_id").to_pylist()]
    x = (
        np.column_stack(
            [
                np.asarray(data.column(c).to_numpy(zero_copy_only=False), dtype=np.float64)
                for c in traits
            ]
        )
        if ids
        else np.empty((0, len(traits)))
    )
    keep = np.asarray(~np.isnan(x).any(axis=1), dtype=np.bool_)
    kept = [i for i, k in zip(ids, keep.tolist(), strict=True) if k]
    return kept, x[keep], int((~keep).sum())


def _skew(col: npt.NDArray[np.float64]) -> float:
    sd = col.std()
    return float(((col - col.mean()) ** 3).mean() / sd**3) if sd > 0 else 0.0


def find_personas(
    engine: Engine,
    traits: list[str],
    *,
    k: int | None = None,
    k_range: tuple[int, int] = (2, 8),
    seed: int = 7,
) -> Personas:
    """Cluster customers on ``traits`` and describe each cluster (see the module's method)."""
    sk = _sklearn()
    threadpool_limits = sk.threadpool_limits

    ids, raw, left_out = trait_matrix(engine, traits)
    x = raw.copy()
    log_traits = []
    for j, name in enumerate(traits):
        col = x[:, j]
        if len(col) and col.min() >= 0 and _skew(col) > SKEWED:
            x[:, j] = np.log1p(col)
            log_traits.append(name)
    mean, sd = x.mean(axis=0) if len(x) else 0.0, x.std(axis=0) if len(x) else 1.0
    z = (x - mean) / np.where(sd > 0, sd, 1.0)
    distinct = len(np.unique(z, axis=0)) if len(z) else 0
    lo, hi = (k, k) if k is not None else k_range
    if lo < 2 or hi < lo:
        raise ClosedloopError(f"k must be at least 2 (got {lo}..{hi})")
    # k clusters need k distinct points; a silhouette needs fewer clusters than points.
    hi = min(hi, distinct) if k is not None else min(hi, distinct - 1)
    if hi < lo:
        raise ClosedloopError(
            f"too few distinct customers to cluster: {len(ids)} customers, {distinct} distinct "
            f"trait combinations ({left_out} left out for missing values)"
        )
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(z), min(len(z), SILHOUETTE_SAMPLE), replace=False)
    silhouettes: dict[int, float] = {}
    fits: dict[int, Any] = {}
    for kk in range(lo, hi + 1):
        # One thread: k-means on a few thousand rows is fast alone; OpenMP threads fighting
        # for a busy machine's cores made each fit ~30x slower when measured here.
        with threadpool_limits(1):
            model = sk.cluster.KMeans(n_clusters=kk, n_init=10, random_state=seed).fit(z)
        labels = model.labels_
        if len(set(labels[sample])) > 1:
            silhouettes[kk] = float(sk.metrics.silhouette_score(z[sample], labels[sample]))
        else:
            silhouettes[kk] = -1.0
        fits[kk] = model
    best = max(silhouettes, key=lambda kk: (silhouettes[kk], -kk))
    model = fits[best]
    return _cards(ids, raw, z, model, traits, best, silhouettes, left_out, log_traits, seed)


def _cards(
    ids: list[str],
    raw: npt.NDArray[np.float64],
    z: npt.NDArray[np.float64],
    model: Any,
    traits: list[str],
    k: int,
    silhouettes: dict[int, float],
    left_out: int,
    log_traits: list[str],
    seed: int,
) -> Personas:
    labels = np.asarray(model.labels_)
    sizes = np.bincount(labels, minlength=k)
    order = sorted(range(k), key=lambda c: (-sizes[c], c))  # persona 1 is the largest
    number = {c: i + 1 for i, c in enumerate(order)}
    cards = []
    for c in order:
        members = np.flatnonzero(labels == c)
        zc = z[members].mean(axis=0)
        dist = ((z[members] - model.cluster_centers_[c]) ** 2).sum(axis=1)
        typical = ids[int(members[int(np.argmin(dist))])]  # ids are sorted: ties go to the smallest
        ranked = sorted(range(len(traits)), key=lambda j: (-abs(zc[j]), traits[j]))
        words = [
            f"{'high' if zc[j] > 0 else 'low'} {traits[j]} ({zc[j]:+.1f} sd)"
            for j in ranked
            if abs(zc[j]) >= 0.25
        ][:3]
        cards.append(
            PersonaCard(
                persona=number[c],
                size=int(sizes[c]),
                share=float(sizes[c] / len(ids)),
                means={t: float(raw[members, j].mean()) for j, t in enumerate(traits)},
                z={t: float(zc[j]) for j, t in enumerate(traits)},
                distinctive=[traits[j] for j in ranked],
                typical_member=typical,
                description=", ".join(words) or "close to the average on every trait",
            )
        )
    return Personas(
        traits=list(traits),
        k=k,
        silhouettes=silhouettes,
        customers=len(ids),
        left_out=left_out,
        log_traits=log_traits,
        seed=seed,
        cards=cards,
        labels={ids[i]: number[int(labels[i])] for i in range(len(ids))},
    )
