"""Probabilistic matching: EM recovers a known model; resolve links duplicates, not strangers."""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from closedloop.core.definitions import IdentityConfig
from closedloop.core.engine import Engine
from closedloop.identity.explain import Ident, explain
from closedloop.identity.matching import MISSING, fit, probability
from closedloop.identity.resolve import resolve
from tests.conftest import add_events
from tests.identity.test_resolve import CONFIG, customer_of

MATCHING = IdentityConfig.model_validate(
    {**CONFIG.model_dump(mode="json"), "matching": {"threshold": 0.99}}
)


def test_em_recovers_a_known_mixture() -> None:
    rng = np.random.default_rng(7)
    # Three comparisons: with two, a two-class mixture is not identifiable.
    names = ["name", "email", "phone"]
    m = {"name": [0.05, 0.25, 0.70], "email": [0.1, 0.2, 0.3, 0.4], "phone": [0.1, 0.9]}
    u = {"name": [0.90, 0.08, 0.02], "email": [0.9, 0.05, 0.04, 0.01], "phone": [0.97, 0.03]}
    n, lam = 20_000, 0.1
    match = rng.random(n) < lam
    cols = []
    for k in names:
        pm = rng.choice(len(m[k]), n, p=m[k])
        pu = rng.choice(len(u[k]), n, p=u[k])
        col = np.where(match, pm, pu)
        col[rng.random(n) < 0.1] = MISSING  # some values absent: neutral
        cols.append(col)
    pats, counts = np.unique(np.column_stack(cols), axis=0, return_counts=True)
    model = fit(pats, counts, names, iterations=200)
    assert abs(model.lam - lam) < 0.02
    for k in names:
        assert np.allclose(model.m[k], m[k], atol=0.04), (k, model.m[k])
        assert np.allclose(model.u[k], u[k], atol=0.02), (k, model.u[k])
    p = probability(model, pats, names)
    best = pats.tolist().index([2, 3, 1])
    worst = pats.tolist().index([0, 0, 0])
    assert p[best] > 0.99 > 0.01 > p[worst]


def test_weights_never_fall_as_agreement_rises() -> None:
    # Duplicates that always carry a typo make EM rate an exact name below a close one.
    pats = np.array([[1, 1], [0, 0], [2, 0], [0, 1]])
    counts = np.array([50, 5000, 40, 30])
    model = fit(pats, counts, ["name", "phone"], iterations=100)
    w = model.weights()["name"]
    assert w[2] >= w[1] >= w[0]


SURNAMES = ["Wang", "Li", "Zhang", "Liu", "Chen"]
GIVEN = ["Fang", "Wei", "Jing", "Min", "Yan", "Qiang"]
CITIES = ["Beijing", "Shanghai"]


def _population(seed: int) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Members with CRM rows; some registered twice with no phone and a typo'd name."""
    rnd = random.Random(seed)
    msgs: list[dict[str, Any]] = []
    twins = []
    for i in range(400):
        s, g = rnd.choice(SURNAMES), rnd.choice(GIVEN)
        traits = {
            "name": f"{s} {g}",
            "birthday": f"19{rnd.randint(80, 82)}-01-0{rnd.randint(1, 3)}",
            "city": rnd.choice(CITIES),
            "gender": "F",
            "phone": f"139{i:08d}",
            "email": f"{s.lower()}.{g.lower()}{i}@qq.com",
        }
        msgs.append(
            {
                "message_id": f"r{i:04d}",
                "user_id": f"M{i:04d}",
                "type": "identify",
                "traits": traits,
            }
        )
        if i % 10 == 0:
            dup = dict(traits)
            del dup["phone"]
            dup["name"] = f"{s} {g[0]}{g[2]}{g[1]}{g[3:]}"  # swapped letters
            dup["email"] = f"{s.lower()}.{g.lower()}{i}@163.com"  # same user, other provider
            msgs.append(
                {
                    "message_id": f"d{i:04d}",
                    "user_id": f"D{i:04d}",
                    "type": "identify",
                    "traits": dup,
                }
            )
            twins.append((f"M{i:04d}", f"D{i:04d}"))
    return msgs, twins


def test_duplicates_link_and_strangers_sharing_name_and_birthday_do_not(engine: Engine) -> None:
    msgs, twins = _population(3)
    add_events(engine, msgs)
    r = resolve(engine, MATCHING)
    assert r.probabilistic >= len(twins)
    for a, b in twins:
        assert customer_of(engine, "member_id", a) == customer_of(engine, "member_id", b)
    # Every customer holds one main member at most: no two strangers were merged.
    m = engine.table("identity_map").to_pandas()
    mains = m[(m.id_type == "member_id") & m.id_value.str.startswith("M")]
    assert mains.customer_id.is_unique
    # Many strangers share name, birthday, city and gender here: the trap is present.
    by = [(t["traits"]["name"], t["traits"]["birthday"], t["traits"]["city"]) for t in msgs]
    assert len(by) - len(set(by)) > 20
    e = engine.table("identity_edges").to_pandas()
    prob = e[e.kind == "probabilistic"]
    assert (prob.score >= 0.99).all() and prob.other_message_id.notnull().all()
    # Explain shows the scored pair as the evidence.
    a, b = twins[0]
    ex = explain(
        engine, MATCHING, customer_of(engine, "member_id", a), f"member_id:{a}", f"member_id:{b}"
    )
    (hop,) = ex.paths[Ident("member_id", b)]
    assert hop.kind == "probabilistic" and "matched, p=" in hop.evidence()


def test_without_matching_the_duplicates_stay_apart(engine: Engine) -> None:
    msgs, twins = _population(3)
    add_events(engine, msgs)
    r = resolve(engine, CONFIG)
    assert r.probabilistic == 0
    a, b = twins[0]
    assert customer_of(engine, "member_id", a) != customer_of(engine, "member_id", b)
