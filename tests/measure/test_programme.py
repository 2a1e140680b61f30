"""Programme lift over the global control: a simulated programme with a known effect, and A/A."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from closedloop.activate.tables import DELIVERIES
from closedloop.core.engine import Engine
from closedloop.core.ids import unit_interval
from closedloop.measure.programme import programme_lift
from tests.conftest import add_events

START = datetime(2026, 10, 1, tzinfo=UTC)
END = START + timedelta(days=30)
N = 6000
SHARE = 0.1


def world(engine: Engine, effect: float, seed: int, leak: int = 0) -> tuple[float, Any]:
    """Customers, a control column, messages to two thirds of the others, orders; true ITT."""
    rng = np.random.default_rng(seed)
    ids = [f"c{i:05d}" for i in range(N)]
    control = [unit_interval("test-global", c) < SHARE for c in ids]
    messaged = [(not g and rng.random() < 2 / 3) for g in control]
    for j in [i for i, g in enumerate(control) if g][:leak]:  # contaminate the control
        messaged[j] = True
    deliveries: list[dict[str, Any]] = [
        {
            **dict.fromkeys(DELIVERIES.columns),
            "delivery_id": f"d{c}",
            "campaign": "any",
            "occasion": "o",
            "customer_id": c,
            "group": "treatment",
            "status": "sent",
            "decided_at": START + timedelta(days=1),
            "send_at": START + timedelta(days=1),
        }
        for c, m in zip(ids, messaged, strict=True)
        if m
    ]
    engine.append("deliveries", pa.Table.from_pylist(deliveries))
    p = np.where(np.array(messaged) & ~np.array(control), 0.2 + effect, 0.2)
    buy = rng.random(N) < p
    msgs = [
        {
            "message_id": f"o{c}",
            "user_id": c,
            "event": "Order Completed",
            "revenue": 100.0,
            "timestamp": START + timedelta(days=3),
        }
        for c, b in zip(ids, buy, strict=True)
        if b
    ]
    # An order outside the period and a non-goal event: never counted.
    msgs.append(
        {
            "message_id": "late",
            "user_id": ids[0],
            "event": "Order Completed",
            "revenue": 1e6,
            "timestamp": END,
        }
    )
    msgs.append(
        {"message_id": "view", "user_id": ids[1], "event": "Product Viewed", "timestamp": START}
    )
    add_events(engine, msgs)
    engine.append(
        "event_customers",
        pa.table(
            {
                "message_id": [m["message_id"] for m in msgs],
                "customer_id": [m["user_id"] for m in msgs],
            }
        ),
    )
    exposed = [m for m, g in zip(messaged, control, strict=True) if not g]
    true_itt = effect * sum(exposed) / len(exposed)
    return true_itt, pa.table({"customer_id": ids, "control": control})


@pytest.mark.parametrize(("effect", "seed"), [(0.0, 3), (0.15, 4)])
def test_programme_lift_covers_the_true_effect(engine: Engine, effect: float, seed: int) -> None:
    true_itt, population = world(engine, effect, seed)
    with engine.temporary(population) as pop:
        out = programme_lift(engine, pop, "Order Completed", START, END, control_share=SHARE)
    assert out.exposed + out.control == N
    assert abs(out.control / N - SHARE) < 0.02
    assert out.sample_ratio_p is not None and out.sample_ratio_p > 0.01
    assert out.lift.absolute_low <= true_itt <= out.lift.absolute_high
    assert out.revenue.low <= 100 * true_itt <= out.revenue.high
    assert out.revenue.difference == pytest.approx(100 * out.lift.absolute)
    assert out.control_messaged == 0
    assert out.exposed_messaged == pytest.approx(out.exposed * 2 / 3, rel=0.05)
    assert out.lift.significant == (effect > 0)


def test_messages_to_the_control_are_counted(engine: Engine) -> None:
    _, population = world(engine, 0.0, 5, leak=4)
    with engine.temporary(population) as pop:
        out = programme_lift(engine, pop, "Order Completed", START, END)
    assert out.control_messaged == 4 and out.sample_ratio_p is None


def test_a_population_without_control_is_rejected(engine: Engine) -> None:
    world(engine, 0.0, 6)
    with (
        engine.temporary(pa.table({"customer_id": ["c00001"], "control": [False]})) as pop,
        pytest.raises(ValueError, match="both in and outside"),
    ):
        programme_lift(engine, pop, "Order Completed", START, END)
