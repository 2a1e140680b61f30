"""The incremental segment path and ``row_digest`` on Spark (local mode): no DELETE there,
so ``evaluate_changed`` replaces the membership tables whole; the results must not differ.

(Incremental tags pass on Spark too, but take over a minute here: PostgreSQL covers them.)
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from closedloop.core.engine import Engine
from tests.segments.test_incremental_backends import check_account_chain
from tests.tags.test_row_digest import T, _digests

pytest.importorskip("pyspark")


@pytest.mark.spark
@pytest.mark.slow
def test_digest_and_account_chain_on_spark() -> None:
    data = [
        (("a", 1, 0.1, T), ("a", 1, 0.1, T)),
        (("a", 1, 0.1, T), ("a", 2, 0.1, T)),
        (("ab", None, None, None), ("a", None, None, None)),
        (("1:a", 1, None, None), ("1", None, None, None)),
        (("", None, None, None), (None, None, None, None)),
        ((None, None, None, T), (None, None, None, T + timedelta(microseconds=1))),
    ]
    with Engine("pyspark://") as engine:
        assert not engine.can("row_hash")
        assert _digests(engine, data, portable=False) == [a == b for a, b in data]
    check_account_chain("pyspark://")
