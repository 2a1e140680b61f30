"""Explain and split: why two identifiers are one customer, and how to take them apart.

Why: false merges "fail quietly" in other CDPs because nobody can see why two people became
one, nor undo it. Here every link used by the last resolve is in ``identity_edges`` with a
message that showed it (or the scored record pair), so the path of evidence between any two
identifiers of a customer is a shortest path in that small graph. ``split`` records a block
in ``identity_blocks`` (a catalogued table every later resolve honours) and re-partitions by
running ``resolve`` again, which keeps ids stable and writes the split to the ledger.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import pyarrow as pa

from closedloop.core.clock import Clock
from closedloop.core.definitions import IdentityConfig
from closedloop.core.engine import Engine
from closedloop.core.errors import ClosedloopError
from closedloop.core.ids import stable_hash64
from closedloop.identity.normalise import normalise
from closedloop.identity.resolve import ResolveResult, resolve, resolve_customer


class IdentityError(ClosedloopError):
    """A request about identities that cannot be answered (unknown customer, identifier...)."""


@dataclass(frozen=True, order=True)
class Ident:
    """A normalised identifier, written ``type:value``."""

    id_type: str
    value: str

    def __str__(self) -> str:
        return f"{self.id_type}:{self.value}"


@dataclass(frozen=True)
class Hop:
    """One link of evidence: two identifiers and what showed they belong together."""

    a: Ident
    b: Ident
    kind: str  # 'message' or 'probabilistic'
    message_id: str
    messages: int
    score: float | None
    other_message_id: str | None = None

    def evidence(self) -> str:
        if self.kind == "probabilistic":
            return (
                f"records {self.message_id} and {self.other_message_id} matched, "
                f"p={self.score or 0.0:.4f}"
            )
        more = f" (+{self.messages - 1} more)" if self.messages > 1 else ""
        return f"message {self.message_id}{more}"


@dataclass
class Explanation:
    """The evidence paths of one customer: from ``root`` to each asked identifier."""

    asked: str
    customer_id: str
    root: Ident
    identifiers: list[Ident]
    paths: dict[Ident, list[Hop]] = field(default_factory=dict)
    unreachable: list[Ident] = field(default_factory=list)

    def tree(self) -> list[tuple[int, Ident, Hop | None]]:
        """(depth, identifier, hop that reached it) in depth-first order from the root."""
        children: dict[Ident, list[tuple[Ident, Hop]]] = {}
        for target, hops in self.paths.items():
            if hops:
                last = hops[-1]
                parent = last.a if last.b == target else last.b
                children.setdefault(parent, []).append((target, last))
        out: list[tuple[int, Ident, Hop | None]] = []
        stack: list[tuple[int, Ident, Hop | None]] = [(0, self.root, None)]
        while stack:
            depth, node, hop = stack.pop()
            out.append((depth, node, hop))
            for child, h in sorted(children.get(node, []), reverse=True):
                stack.append((depth + 1, child, h))
        return out


def parse_identifier(text: str, config: IdentityConfig) -> Ident:
    """``TYPE:VALUE`` as typed by a person, normalised as resolve normalises it."""
    id_type, sep, raw = text.partition(":")
    if not sep or not raw:
        raise IdentityError(f"identifier {text!r}: expected TYPE:VALUE, e.g. phone:13800138000")
    names = [t.name for t in config.types]
    if id_type not in names:
        raise IdentityError(f"identifier {text!r}: unknown type {id_type!r} (known: {names})")
    n = normalise(raw, config.type(id_type).normaliser, config.default_region)
    if n.value is None:
        raise IdentityError(f"identifier {text!r}: {n.reason}")
    return Ident(id_type, n.value)


def customer_of(engine: Engine, ident: Ident) -> str | None:
    m = engine.table("identity_map")
    hit = (
        m.filter((m.id_type == ident.id_type) & (m.id_value == ident.value))
        .select("customer_id")
        .to_pyarrow()
    )
    return str(hit["customer_id"][0]) if hit.num_rows else None


def _graph(engine: Engine, customer_id: str) -> tuple[list[Ident], dict[Ident, list[Hop]]]:
    m = engine.table("identity_map")
    mine = m.filter(m.customer_id == customer_id).select("id_type", "id_value")
    ids = sorted(Ident(r["id_type"], r["id_value"]) for r in mine.to_pyarrow().to_pylist())
    e = engine.table("identity_edges")
    e = e.filter(e.used)
    e = e.semi_join(mine, [e.a_type == mine.id_type, e.a_value == mine.id_value])
    cols = ["a_type", "a_value", "b_type", "b_value", "kind", "message_id", "messages", "score"]
    cols.append("other_message_id")
    adj: dict[Ident, list[Hop]] = {i: [] for i in ids}
    for r in e.select(*cols).to_pyarrow().to_pylist():
        a, b = Ident(r["a_type"], r["a_value"]), Ident(r["b_type"], r["b_value"])
        if a not in adj or b not in adj:
            continue
        hop = Hop(
            a,
            b,
            r["kind"] or "message",
            r["message_id"],
            int(r["messages"]),
            r["score"],
            r["other_message_id"],
        )
        adj[a].append(hop)
        adj[b].append(hop)
    for hops in adj.values():
        hops.sort(key=lambda h: (h.kind != "message", -h.messages, h.a, h.b))
    return ids, adj


def _bfs(adj: dict[Ident, list[Hop]], start: Ident) -> dict[Ident, list[Hop]]:
    """Shortest evidence path from ``start`` to every reachable identifier."""
    paths: dict[Ident, list[Hop]] = {start: []}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for hop in adj[node]:
            other = hop.b if hop.a == node else hop.a
            if other not in paths:
                paths[other] = [*paths[node], hop]
                queue.append(other)
    return paths


def explain(
    engine: Engine,
    config: IdentityConfig,
    customer: str,
    frm: str | None = None,
    to: str | None = None,
) -> Explanation:
    """The path of evidence between identifiers of ``customer`` (an id or a retired alias).

    Without ``frm``/``to``: from the customer's highest-priority identifier to every other.
    """
    cid = resolve_customer(engine, customer)
    ids, adj = _graph(engine, cid)
    if not ids:
        raise IdentityError(f"no customer {customer!r} (nor an alias of one)")
    prio = {t.name: t.priority for t in config.types}
    wanted: list[Ident] | None = None
    if frm is not None or to is not None:
        if frm is None or to is None:
            raise IdentityError("give both --from and --to, or neither")
        root, target = parse_identifier(frm, config), parse_identifier(to, config)
        for i in (root, target):
            if i not in adj:
                owner = customer_of(engine, i)
                where = f"it belongs to {owner}" if owner else "it is not in the identity map"
                raise IdentityError(f"{i} is not an identifier of {cid}: {where}")
        wanted = [target]
    else:
        root = min(ids, key=lambda i: (-prio.get(i.id_type, 0), i))
    reach = _bfs(adj, root)
    out = Explanation(customer, cid, root, ids)
    for target in wanted if wanted is not None else ids:
        if target in reach:
            out.paths[target] = reach[target]
        else:
            out.unreachable.append(target)
    return out


def split(
    engine: Engine,
    config: IdentityConfig,
    *,
    identifier: str | None = None,
    edge: str | None = None,
    block: bool = False,
    reason: str = "",
    clock: Clock | None = None,
) -> ResolveResult:
    """Remove an identifier's links or one link, then re-partition by resolving again.

    Without ``block`` only the evidence seen so far is removed (a later message showing the
    same link links again); with ``block`` the identifier or link never links again.
    """
    if (identifier is None) == (edge is None):
        raise IdentityError("give exactly one of --identifier or --edge")
    clock = clock or Clock()
    now = clock.now()
    if identifier is not None:
        a = parse_identifier(identifier, config)
        b: Ident | None = None
        what = f"identifier {a}"
    else:
        left, sep, right = (edge or "").partition("~")
        if not sep:
            raise IdentityError(f"edge {edge!r}: expected TYPE:VALUE~TYPE:VALUE")
        a, b = sorted((parse_identifier(left.strip(), config), parse_identifier(right, config)))
        what = f"link {a} ~ {b}"
    if customer_of(engine, a) is None or (b is not None and customer_of(engine, b) is None):
        raise IdentityError(f"{what}: not in the identity map (run a build first)")
    scope = "always" if block else "past"
    text = f"split {what} ({'blocked' if block else 'evidence so far'})"
    if reason:
        text += f": {reason}"
    row = {
        "block_id": format(stable_hash64("block", str(a), str(b), scope, now.isoformat()), "016x"),
        "a_type": a.id_type,
        "a_value": a.value,
        "b_type": b.id_type if b else None,
        "b_value": b.value if b else None,
        "scope": scope,
        "reason": text,
        "blocked_at": now,
    }
    schema = pa.schema(
        [
            *[(k, pa.string()) for k in row if k != "blocked_at"],
            ("blocked_at", pa.timestamp("us", tz="UTC")),
        ]
    )
    engine.append("identity_blocks", pa.Table.from_pylist([row], schema=schema))
    return resolve(engine, config, clock, reason=text)


def blocks(engine: Engine) -> pa.Table:
    """Every block recorded by ``split``, oldest first."""
    b = engine.table("identity_blocks")
    return b.order_by([b.blocked_at, b.block_id]).to_pyarrow()


__all__ = [
    "Explanation",
    "Hop",
    "Ident",
    "IdentityError",
    "blocks",
    "customer_of",
    "explain",
    "parse_identifier",
    "split",
]
