"""Rules that prevent over-merging: per-type limits and never-link pairs.

Why a separate pass: plain connected components merge everything reachable, so one wrong
link (a typo'd phone, a shared e-mail) can fuse two people. After components are found, the
few components that break a rule are rebuilt link by link, strongest evidence first
(Kruskal-style union-find): a link is made only if the merged cluster still respects every
rule, otherwise it is dropped and recorded with the rule it would have broken. So the
lowest-priority offending links are the ones dropped, and the result depends only on the set
of links and their priorities — never on the order events arrived in.

Only rule-breaking components are pulled into the process, so this stays cheap on engines
without ``local_arrow``: they are a tiny share of the graph.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from closedloop.core.definitions import IdentityConfig


@dataclass(frozen=True)
class Rules:
    """The merge rules of an identity config, in the form the refinement needs."""

    limits: dict[str, int]
    never: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, config: IdentityConfig) -> Rules:
        limits = {t.name: t.max_per_customer for t in config.types if t.max_per_customer}
        return cls(limits=limits, never=tuple((a, b) for a, b in config.never_link))

    @property
    def empty(self) -> bool:
        return not self.limits and not self.never

    @property
    def types(self) -> set[str]:
        """Identifier types any rule mentions (only these need counting)."""
        return set(self.limits) | {t for pair in self.never for t in pair}

    def broken(self, counts: Counter[str]) -> str | None:
        """The first rule a cluster with these per-type counts breaks, or None."""
        for t, limit in sorted(self.limits.items()):
            if counts.get(t, 0) > limit:
                return f"max_per_customer {t}={limit}"
        for a, b in self.never:
            n_a, n_b = counts.get(a, 0), counts.get(b, 0)
            if (a == b and n_a > 1) or (a != b and n_a > 0 and n_b > 0):
                return f"never_link {a}~{b}"
        return None


@dataclass(frozen=True)
class Link:
    """One candidate link inside a rule-breaking component."""

    src: int
    dst: int
    priority: int
    messages: int


def refine(
    node_ids: Sequence[int],
    node_types: Sequence[str],
    links: Sequence[Link],
    rules: Rules,
) -> tuple[dict[int, int], list[tuple[int, str]]]:
    """Re-cluster nodes making links strongest first, skipping any that would break a rule.

    Returns (node id → component labelled by its smallest node id, [(link index, rule)] of
    dropped links). Order: higher priority, then more messages, then node ids — a total
    order, so the result is deterministic.
    """
    parent = {n: n for n in node_ids}
    counts: dict[int, Counter[str]] = {
        n: Counter({t: 1}) for n, t in zip(node_ids, node_types, strict=True)
    }

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:
            parent[x], x = root, parent[x]
        return root

    order = sorted(
        range(len(links)),
        key=lambda i: (-links[i].priority, -links[i].messages, links[i].src, links[i].dst),
    )
    dropped: list[tuple[int, str]] = []
    for i in order:
        ra, rb = find(links[i].src), find(links[i].dst)
        if ra == rb:
            continue
        merged = counts[ra] + counts[rb]
        rule = rules.broken(merged)
        if rule is not None:
            dropped.append((i, rule))
            continue
        keep, gone = (ra, rb) if ra < rb else (rb, ra)
        parent[gone] = keep
        counts[keep] = merged
        del counts[gone]
    groups: dict[int, int] = {}
    for n in node_ids:
        r = find(n)
        groups[r] = min(groups.get(r, n), n)
    return {n: groups[find(n)] for n in node_ids}, dropped
