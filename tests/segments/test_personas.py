"""Personas: k-means on standardised traits, k by silhouette, cards that describe clusters."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from closedloop.core.clock import Clock
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from closedloop.core.errors import ClosedloopError
from closedloop.demo.generator import generate
from closedloop.demo.project import init_project, relative_data_dir
from closedloop.pipeline import build
from closedloop.segments.personas import find_personas
from tests.tags.helpers import set_profiles


def _three_groups(engine: Engine) -> None:
    rng = np.random.default_rng(1)
    rows = []
    centres = {"bargain": (2, 80.0, 10), "loyal": (12, 900.0, 5), "lapsed": (1, 40.0, 300)}
    sizes = {"bargain": 60, "loyal": 30, "lapsed": 45}
    for group, (orders, revenue, recency) in centres.items():
        for i in range(sizes[group]):
            rows.append(
                {
                    "customer_id": f"{group}{i:03d}",
                    "orders": int(orders + rng.integers(0, 2)),
                    "revenue": revenue * (1 + 0.1 * rng.standard_normal()),
                    "recency_days": int(recency + rng.integers(0, 5)),
                }
            )
    rows.append({"customer_id": "zz_no_orders", "orders": None, "revenue": None})
    set_profiles(engine, rows)


def test_separated_groups_become_personas_with_cards(engine: Engine) -> None:
    _three_groups(engine)
    p = find_personas(engine, ["orders", "revenue", "recency_days"], k_range=(2, 6))
    assert p.k == 3 and p.customers == 135 and p.left_out == 1
    assert [c.size for c in p.cards] == [60, 45, 30]  # persona 1 is the largest
    for card in p.cards:
        members = {cid for cid, n in p.labels.items() if n == card.persona}
        prefixes = {cid.rstrip("0123456789") for cid in members}
        assert len(prefixes) == 1, prefixes  # one generator group per persona
        assert card.typical_member in members
    lapsed = next(c for c in p.cards if c.size == 45)
    assert lapsed.distinctive[0] == "recency_days" and lapsed.z["recency_days"] > 1
    assert "high recency_days" in lapsed.description
    loyal = next(c for c in p.cards if c.size == 30)
    assert loyal.means["orders"] > 10 and loyal.z["revenue"] > 1
    assert abs(sum(c.share for c in p.cards) - 1) < 1e-9
    assert "k=3 by silhouette" in p.method
    # Fixed seed: the same clusters again.
    assert (
        find_personas(engine, ["orders", "revenue", "recency_days"], k_range=(2, 6)).labels
        == p.labels
    )


def test_given_k_is_used_and_constant_traits_do_not_break(engine: Engine) -> None:
    _three_groups(engine)
    engine.replace(
        "profiles",
        engine.table("profiles").mutate(points=engine.table("profiles").orders * 0 + 7),
    )
    p = find_personas(engine, ["orders", "points"], k=2)
    assert p.k == 2 and set(p.silhouettes) == {2}
    assert all(abs(c.z["points"]) < 1e-12 for c in p.cards)


def test_clear_errors(engine: Engine) -> None:
    _three_groups(engine)
    with pytest.raises(ClosedloopError, match="not a numeric profile field"):
        find_personas(engine, ["orders", "city"])
    with pytest.raises(ClosedloopError, match="at least one trait"):
        find_personas(engine, [])
    with pytest.raises(ClosedloopError, match="k must be at least 2"):
        find_personas(engine, ["orders"], k=1)
    set_profiles(engine, [{"customer_id": "a", "orders": 1}, {"customer_id": "b", "orders": 1}])
    with pytest.raises(ClosedloopError, match="too few distinct customers"):
        find_personas(engine, ["orders"])


def test_missing_scikit_learn_says_which_extra(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _three_groups(engine)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    with pytest.raises(ClosedloopError, match=r"closedloop\[models\]"):
        find_personas(engine, ["orders"])


def _adjusted_rand(a: list[str], b: list[int]) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(a, b))


@pytest.mark.slow
def test_personas_recover_generator_lifecycles_better_than_chance(tmp_path: Path) -> None:
    """The generator's persons are active, lapsed or churned; personas on recency and activity
    should line up with those archetypes far better than random labels do."""
    summary = generate(tmp_path / "brand", 1000, seed=4)
    init_project(
        tmp_path / "p", data_dir=relative_data_dir(tmp_path / "p", tmp_path / "brand" / "data")
    )
    project = load_project(tmp_path / "p")
    with Engine("duckdb://") as engine:
        build(engine, project, clock=Clock(summary.reference_time))
        p = find_personas(engine, ["recency_days", "events"])
        imap = engine.table("identity_map").select("id_type", "id_value", "customer_id").to_pandas()
    truth = pd.read_parquet(
        tmp_path / "brand" / "truth" / "identifiers.parquet",
        columns=["person_id", "id_type", "value"],
    )
    persons = pd.read_parquet(
        tmp_path / "brand" / "truth" / "persons.parquet", columns=["person_id", "lifecycle"]
    )
    m = imap.merge(truth, left_on=["id_type", "id_value"], right_on=["id_type", "value"])
    owner = m.groupby("customer_id")["person_id"].agg(lambda s: s.value_counts().index[0])
    df = pd.DataFrame({"customer_id": list(p.labels), "persona": list(p.labels.values())})
    df["person_id"] = df.customer_id.map(owner)
    df = df.dropna().merge(persons, on="person_id")
    assert len(df) > 300
    ari = _adjusted_rand(list(df.lifecycle), list(df.persona))
    rng = np.random.default_rng(0)
    chance = max(
        _adjusted_rand(list(df.lifecycle), list(rng.permutation(df.persona.to_numpy())))
        for _ in range(20)
    )
    assert ari > 0.1 and ari > 3 * max(chance, 0.0)
