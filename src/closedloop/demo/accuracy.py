"""Identity accuracy against the generator's ground truth (the demo's and benches' referee).

Only the demo and benchmarks read the truth; the pipeline never does. Metrics are over
identifiers that belong to exactly one true person (junk values and shared devices have no
single right answer and are left out):

* pairwise precision — of all pairs of identifiers put in the same customer, the share that
  truly belong to the same person;
* pairwise recall — of all pairs that truly belong to the same person, the share put together;
* exact persons — the share of persons whose identifiers form exactly one customer holding
  nobody else's identifiers;
* linkable recall — recall over the pairs that *some* message evidence could join: pairs of
  one person's identifiers connected through co-occurrence links whose two ends are both
  that person's. A cookie never seen with another identifier is unlinkable by any method; this
  figure separates "the resolver missed it" from "nothing in the data shows it".

Probabilistic matching has its own referee, ``matching_accuracy``: the scored links between
member ids against the persons the truth gives them.

Pair counts come from the (customer × person) contingency table, so the cost is linear in the
number of identifiers, not quadratic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

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
    linkable_recall: float = 0.0


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
    linkable = _linkable_recall(engine, j)
    return IdentityAccuracy(
        linkable_recall=linkable,
        identifiers=len(j),
        persons=int(j["person_id"].nunique()),
        customers=int(j["customer_id"].nunique()),
        precision=precision,
        recall=recall,
        f1=f1,
        exact_persons=float(exact) / max(1, int(j["person_id"].nunique())),
    )


def _linkable_recall(engine: Engine, j: pd.DataFrame) -> float:
    """Recall over pairs joined by some same-person chain of message evidence."""
    e = engine.table("identity_edges")
    e = e.filter(e.kind == "message").select("a_type", "a_value", "b_type", "b_value")
    edges = e.to_pandas()
    key = j["id_type"] + ":" + j["value"]
    person = dict(zip(key, j["person_id"], strict=True))
    a = (edges["a_type"] + ":" + edges["a_value"]).map(person)
    b = (edges["b_type"] + ":" + edges["b_value"]).map(person)
    same = edges[a.notna() & (a == b)]
    nodes = {k: i for i, k in enumerate(key)}
    src = (same["a_type"] + ":" + same["a_value"]).map(nodes).to_numpy()
    dst = (same["b_type"] + ":" + same["b_value"]).map(nodes).to_numpy()
    n = len(nodes)
    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    jj = j.assign(evidence=comp[key.map(nodes).to_numpy()])
    linkable = _pairs(jj.groupby(["person_id", "evidence"]).size())
    found = _pairs(jj.groupby(["person_id", "evidence", "customer_id"]).size())
    return found / linkable if linkable else 1.0


def matching_accuracy(engine: Engine, truth_dir: Path) -> dict[str, float]:
    """Precision, recall and F1 of probabilistic links between member ids.

    Truth pairs: two member ids of one person (a second registration). Found: a scored
    link between them. Precision: scored links whose two member ids are one person.
    """
    truth = pd.read_parquet(
        truth_dir / "identifiers.parquet", columns=["person_id", "id_type", "value"]
    )
    members = truth[truth["id_type"] == "member_id"].drop_duplicates(["person_id", "value"])
    owner = members.drop_duplicates("value").set_index("value")["person_id"]
    per_person = members.groupby("person_id").size()
    truly = _pairs(per_person)
    e = engine.table("identity_edges")
    e = e.filter(
        (e.kind == "probabilistic") & (e.a_type == "member_id") & (e.b_type == "member_id")
    )
    links = e.select("a_value", "b_value").to_pandas()
    right = int((links["a_value"].map(owner) == links["b_value"].map(owner)).sum())
    precision = right / len(links) if len(links) else 1.0
    recall = right / truly if truly else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "links": float(len(links)),
        "true_pairs": truly,
        "precision": precision,
        "recall": recall,
        "f1": f1,
    }
