"""Preview from the Python API on journeys: every send step rendered (or one), the person
found by an identifier, and the no-response rule named when it stops them."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from closedloop.activate.campaign import preview_campaign
from closedloop.activate.worker import tick
from closedloop.core.clock import Clock
from closedloop.core.engine import Engine
from closedloop.core.errors import InputError
from closedloop.segments.audience import Fields, evaluate_segment
from tests.activate.test_journey import (
    CART,
    EVERYONE,
    NUDGES,
    T0,
    make_project,
    outbox_lines,
    people,
)


def test_a_journey_preview_renders_each_send_step(engine: Engine, tmp_path: Path) -> None:
    project = make_project(tmp_path / "p", {"cart": CART})
    people(engine, 3)
    c = project.campaigns["cart"]
    pv = preview_campaign(engine, c, "c001", identity=project.identity, clock=Clock(T0))
    assert pv.matched == ("member_id", "c001") and pv.customer_id == "c001"
    assert [(m.step, m.body) for m in pv.messages] == [("remind", "N1, your tea is waiting")]
    assert pv.messages[0].address == "p1@x.cn" and pv.messages[0].channel == "email"
    assert pv.personalised
    with pytest.raises(InputError, match="no send step 'done'"):
        preview_campaign(engine, c, "c001", identity=project.identity, step="done")
    with pytest.raises(InputError, match="no customer has the identifier"):
        preview_campaign(engine, c, "c999", identity=project.identity)


def test_preview_names_the_no_response_rule(engine: Engine, tmp_path: Path) -> None:
    project = make_project(tmp_path / "p", {"nudges": NUDGES})
    ids = people(engine, 3)
    engine.drop("segment_membership")
    evaluate_segment(engine, EVERYONE, Fields(), Clock(T0))
    c = project.campaigns["nudges"]
    out = tmp_path / "outbox"
    tick(engine, project, T0 + timedelta(minutes=5), outbox_dir=out)
    sent = sorted({x["customer_id"] for x in outbox_lines(out)})
    who = sent[0]
    # Within the window the next message awaits an answer ...
    soon = preview_campaign(
        engine, c, who, identity=project.identity, clock=Clock(T0 + timedelta(hours=2))
    )
    assert any(r.startswith("awaiting_response") for r in soon.stopped_by), soon.stopped_by
    assert len(soon.messages) == 3  # one, two, three: every send step
    # ... and once the journey stopped for no response, preview says so.
    tick(engine, project, T0 + timedelta(days=2, hours=1), outbox_dir=out)
    late = preview_campaign(
        engine, c, who, identity=project.identity, clock=Clock(T0 + timedelta(days=2, hours=2))
    )
    assert any(r.startswith("no_response") for r in late.stopped_by), late.stopped_by
    other = next(i for i in ids if i not in sent) if len(sent) < len(ids) else None
    if other is not None:  # held out (or stopped) at the first send: no rule of silence
        pv = preview_campaign(engine, c, other, identity=project.identity, clock=Clock(T0))
        assert not any(r.startswith("no_response") for r in pv.stopped_by)
