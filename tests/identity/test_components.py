from __future__ import annotations

import ibis
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from closedloop.core.engine import Engine
from closedloop.identity.components import components_ibis, components_local


def _partition(rows: dict[int, int]) -> set[frozenset[int]]:
    groups: dict[int, set[int]] = {}
    for node, comp in rows.items():
        groups.setdefault(comp, set()).add(node)
    return {frozenset(g) for g in groups.values()}


def _reference(n: int, edges: list[tuple[int, int]]) -> set[frozenset[int]]:
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        parent[find(a)] = find(b)
    return _partition({i: find(i) for i in range(n)})


graphs = st.integers(1, 30).flatmap(
    lambda n: st.tuples(
        st.just(n), st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=40)
    )
)


@settings(max_examples=25, deadline=None)
@given(graphs)
def test_local_and_ibis_components_agree_with_union_find(
    graph: tuple[int, list[tuple[int, int]]],
) -> None:
    n, edges = graph
    src = np.array([a for a, _ in edges], dtype=np.int64)
    dst = np.array([b for _, b in edges], dtype=np.int64)
    local = components_local(np.arange(n, dtype=np.int64), src, dst)
    local_rows = dict(
        zip(local["node_id"].to_pylist(), local["component"].to_pylist(), strict=True)
    )
    expected = _reference(n, edges)
    assert _partition(local_rows) == expected
    # Labels are the smallest member of each component.
    assert all(comp == min(g) for g in expected for comp in {local_rows[x] for x in g})

    engine = Engine("duckdb://")
    nodes = ibis.memtable({"node_id": list(range(n))}, schema={"node_id": "int64"})
    e = ibis.memtable(
        {"src": src.tolist(), "dst": dst.tolist()}, schema={"src": "int64", "dst": "int64"}
    )
    out = components_ibis(engine, nodes, e).to_pyarrow()
    ibis_rows = dict(zip(out["node_id"].to_pylist(), out["component"].to_pylist(), strict=True))
    assert ibis_rows == local_rows
    engine.close()
