"""Identity accuracy against the generator's ground truth (the demo's and benches' referee).

Only the demo and benchmarks read the truth; the pipeline never does. Metrics are over
identifiers that belong to exactly one true person (junk values and shared devices have no
single right answer and are left out):

* pairwise precision — of all pairs of identifiers put in the same customer, the share that
  truly belong to the same person;
* pairwise recall — of all pairs that truly belong to the same person, the share put together;
* exact persons — the share of persons whose identifiers form exactly one customer holding
  nobody else's identifiers.

Pair counts come from the (customer × person) contingency table, so the cost is linear in the
number of identifiers, not quadratic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from closedloop.core.engine import Engine


@dataclass(frozen=True)
class IdentityAccuracy:
    identifiers: int
    persons: int
    customers: int
    precision: float
    recall: float
    f1: float
    exact_persons: float


def _pairs(counts: pd.Series) -> float:
    c = counts.astype("float64")
    return float((c * (c - 1) / 2).sum())


def identity_accuracy(engine: Engine, truth_dir: Path) -> IdentityAccuracy:
    truth = pd.read_parquet(
        truth_dir / "identifiers.parquet", columns=["person_id", "id_type", "value", "junk"]
    )
    truth = truth[~truth["junk"]]
    owners = truth.groupby(["id_type", "value"])["person_id"].nunique()
    single = owners[owners == 1].index
    truth = truth.set_index(["id_type", "value"]).loc[single].reset_index()
    truth = truth.drop_duplicates(["id_type", "value"])

    imap = engine.table("identity_map").select("id_type", "id_value", "customer_id").to_pandas()
    imap = imap.rename(columns={"id_value": "value"})
    j = truth.merge(imap, on=["id_type", "value"], how="inner")
    if j.empty:
        return IdentityAccuracy(0, 0, 0, 0.0, 0.0, 0.0, 0.0)
    together = _pairs(j.groupby("customer_id").size())
    truly = _pairs(j.groupby("person_id").size())
    both = _pairs(j.groupby(["customer_id", "person_id"]).size())
    precision = both / together if together else 1.0
    recall = both / truly if truly else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    per_person = j.groupby("person_id")["customer_id"].nunique()
    persons_per_customer = j.groupby("customer_id")["person_id"].nunique()
    one_customer = per_person[per_person == 1].index
    home = j[j["person_id"].isin(one_customer)].drop_duplicates("person_id")
    exact = home["customer_id"].map(persons_per_customer).eq(1).sum()
    return IdentityAccuracy(
        identifiers=len(j),
        persons=int(j["person_id"].nunique()),
        customers=int(j["customer_id"].nunique()),
        precision=precision,
        recall=recall,
        f1=f1,
        exact_persons=float(exact) / max(1, int(j["person_id"].nunique())),
    )
