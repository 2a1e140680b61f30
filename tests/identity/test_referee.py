"""The demo's identity referee: linkable recall and matching accuracy against a known truth."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from closedloop.core.engine import Engine
from closedloop.demo.accuracy import identity_accuracy, matching_accuracy
from closedloop.identity.resolve import resolve
from tests.conftest import add_events
from tests.identity.test_resolve import CONFIG


def test_linkable_recall_ignores_pairs_no_evidence_could_join(
    engine: Engine, tmp_path: Path
) -> None:
    add_events(
        engine,
        [
            {"user_id": "M1", "anonymous_id": "ck1"},
            {"anonymous_id": "ck2"},  # P1's cookie, never seen with anything else
            {"user_id": "M2"},
            {"user_id": "M3"},  # P2 registered twice; nothing links M2 and M3
        ],
    )
    resolve(engine, CONFIG)
    truth = pd.DataFrame(
        {
            "person_id": ["P1", "P1", "P1", "P2", "P2"],
            "id_type": ["member_id", "anonymous_id", "anonymous_id", "member_id", "member_id"],
            "value": ["M1", "ck1", "ck2", "M2", "M3"],
            "junk": [False] * 5,
        }
    )
    truth.to_parquet(tmp_path / "identifiers.parquet")
    acc = identity_accuracy(engine, tmp_path)
    assert acc.precision == 1.0
    assert acc.recall == 1 / 4  # of (M1,ck1) (M1,ck2) (ck1,ck2) (M2,M3), one is found
    assert acc.linkable_recall == 1.0  # the only evidence-linkable pair is (M1, ck1)
    m = matching_accuracy(engine, tmp_path)
    assert m["true_pairs"] == 1 and m["links"] == 0 and m["recall"] == 0.0
