"""The incremental segment path and ``row_digest`` on Spark (local mode): no DELETE there,
so ``evaluate_changed`` replaces the membership tables whole; the results must not differ.

(Incremental tags pass on Spark too, but take over a minute here: PostgreSQL covers them.)
"""

from __future__ import annotations

import pytest

from closedloop.core.engine import Engine
from closedloop.segments import incremental
from tests.segments.test_incremental_backends import check_account_chain
from tests.tags.test_row_digest import TRICKY, _digests

pytest.importorskip("pyspark")


@pytest.mark.spark
@pytest.mark.slow
def test_digest_and_account_chain_on_spark(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(incremental, "WIDE", 1.0)  # the narrowed path (Spark scratch views)
    with Engine("pyspark://") as engine:
        assert not engine.can("row_hash")
        assert _digests(engine, TRICKY, portable=False) == [a == b for a, b in TRICKY]
    check_account_chain("pyspark://")
