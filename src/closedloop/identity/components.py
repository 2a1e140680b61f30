"""Connected components of the identity graph, two ways that must agree.

* ``components_ibis`` — portable: label propagation written once in Ibis (min label over
  neighbours until nothing changes), so DuckDB, PostgreSQL and Spark run the same algorithm.
  Cost: O(E) per round, rounds ≤ graph diameter (small for identity graphs).
* ``components_local`` — for engines that declare ``local_arrow``: edges are pulled into the
  process as Arrow and ``scipy.sparse.csgraph`` labels them in O(V + E), far faster on one
  machine. The tests prove both give identical partitions.

Both label a component by its smallest node id, so the results are comparable row for row.
"""

from __future__ import annotations

import ibis
import ibis.expr.types as ir
import numpy as np
import pyarrow as pa
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from closedloop.core.engine import Engine


def components_local(node_ids: np.ndarray, src: np.ndarray, dst: np.ndarray) -> pa.Table:
    """(node_id, component) with component = smallest node id in the node's component."""
    if len(node_ids) == 0:
        return pa.table(
            {"node_id": pa.array([], pa.int64()), "component": pa.array([], pa.int64())}
        )
    n = int(node_ids.max()) + 1
    graph = coo_matrix((np.ones(len(src), dtype=np.int8), (src, dst)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    # Relabel each component by its smallest member among the given nodes (vectorised).
    present = np.asarray(node_ids, dtype=np.int64)
    lab = labels[present]
    smallest = np.full(int(lab.max()) + 1, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(smallest, lab, present)
    return pa.table({"node_id": present, "component": smallest[lab]})


def components_ibis(
    engine: Engine, nodes: ir.Table, edges: ir.Table, max_rounds: int = 100
) -> ir.Table:
    """Label propagation over ``edges(src, dst)``; returns (node_id, component)."""
    both = edges.select(a=edges.src, b=edges.dst).union(edges.select(a=edges.dst, b=edges.src))
    both = engine.scratch("cc_edges", both)
    labels = engine.scratch(
        "cc_labels", nodes.select(node_id=nodes.node_id, component=nodes.node_id)
    )
    for _ in range(max_rounds):
        j = both.join(labels, both.b == labels.node_id)
        neighbour_min = j.group_by(node_id=j.a).aggregate(m=j.component.min())
        new = labels.left_join(neighbour_min, labels.node_id == neighbour_min.node_id)
        new = new.select(
            node_id=new.node_id,
            component=ibis.least(new.component, new.m.fill_null(new.component)),
        )
        new = engine.scratch("cc_next", new)
        changed = int(
            new.join(labels, "node_id")
            .filter(lambda t: t.component != t.component_right)
            .count()
            .execute()
        )
        labels = engine.scratch("cc_labels", new)
        if changed == 0:
            return labels
    raise RuntimeError(f"connected components did not converge in {max_rounds} rounds")
