"""Rules that prevent over-merging: per-type limits and never-link pairs.

Why a separate pass: plain connected components merge everything reachable, so one wrong
link (a typo'd phone, a shared e-mail) can fuse two people. After components are found, the
few components that break a rule are rebuilt link by link, strongest evidence first
(Kruskal-style union-find): a link is made only if the merged cluster still respects every
rule, otherwise it is dropped and recorded with the rule it would have broken. So the
lowest-priority offending links are the ones dropped, and the result depends only on the set
of links and their priorities — never on the order events arrived in.

A limit may hold per time window (``window_days``): then no window of that many days may
contain more than the limit of the type's identifiers *first seen* in it, so a customer can
change phones over the years but not collect five in a month. Counting only a subset never
raises a window count, so a component that breaks no windowed limit as a whole is left as is.

Only rule-breaking components are pulled into the process, so this stays cheap on engines
without ``local_arrow``: they are a tiny share of the graph.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from closedloop.core.definitions import IdentityConfig


@dataclass(frozen=True)
class Rules:
    """The merge rules of an identity config, in the form the refinement needs."""

    limits: dict[str, int]
    never: tuple[tuple[str, str], ...]
    windows: dict[str, timedelta] = field(default_factory=dict)  # type → window of its limit

    @classmethod
    def of(cls, config: IdentityConfig) -> Rules:
        limits = {t.name: t.max_per_customer for t in config.types if t.max_per_customer}
        windows = {
            t.name: timedelta(days=t.window_days)
            for t in config.types
            if t.max_per_customer and t.window_days
        }
        return cls(
            limits=limits, never=tuple((a, b) for a, b in config.never_link), windows=windows
        )

    @property
    def empty(self) -> bool:
        return not self.limits and not self.never

    @property
    def types(self) -> set[str]:
        """Identifier types any rule mentions (only these need counting)."""
        return set(self.limits) | {t for pair in self.never for t in pair}

    def broken(
        self, counts: Counter[str], times: dict[str, list[datetime]] | None = None
    ) -> str | None:
        """The first rule a cluster breaks, or None.

        ``counts``: identifiers per type; ``times``: sorted first-seen times per windowed type.
        """
        for t, limit in sorted(self.limits.items()):
            window = self.windows.get(t)
            if window is None:
                if counts.get(t, 0) > limit:
                    return f"max_per_customer {t}={limit}"
            elif most_in_window((times or {}).get(t, []), window) > limit:
                return f"max_per_customer {t}={limit} per {window.days} days"
        for a, b in self.never:
            n_a, n_b = counts.get(a, 0), counts.get(b, 0)
            if (a == b and n_a > 1) or (a != b and n_a > 0 and n_b > 0):
                return f"never_link {a}~{b}"
        return None


def most_in_window(times: Sequence[datetime], window: timedelta) -> int:
    """The largest number of ``times`` (sorted) inside any half-open window [t, t + window)."""
    best = 0
    for i, t in enumerate(times):
        best = max(best, bisect_left(times, t + window, lo=i) - i)
    return best


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
    node_times: Sequence[datetime] | None = None,
) -> tuple[dict[int, int], list[tuple[int, str]]]:
    """Re-cluster nodes making links strongest first, skipping any that would break a rule.

    ``node_times`` (each node's first-seen time) is needed when a limit has a window.
    Returns (node id → component labelled by its smallest node id, [(link index, rule)] of
    dropped links). Order: higher priority, then more messages, then node ids — a total
    order, so the result is deterministic.
    """
    parent = {n: n for n in node_ids}
    counts: dict[int, Counter[str]] = {
        n: Counter({t: 1}) for n, t in zip(node_ids, node_types, strict=True)
    }
    if rules.windows and node_times is None:
        raise ValueError("a windowed limit needs the nodes' first-seen times")
    times: dict[int, dict[str, list[datetime]]] = {n: {} for n in node_ids}
    if node_times is not None:
        for n, t, ts in zip(node_ids, node_types, node_times, strict=True):
            if t in rules.windows:
                times[n] = {t: [ts]}

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
        merged_times = {t: list(v) for t, v in times[ra].items()}
        for t, v in times[rb].items():
            for ts in v:
                insort(merged_times.setdefault(t, []), ts)
        rule = rules.broken(merged, merged_times)
        if rule is not None:
            dropped.append((i, rule))
            continue
        keep, gone = (ra, rb) if ra < rb else (rb, ra)
        parent[gone] = keep
        counts[keep] = merged
        times[keep] = merged_times
        del counts[gone], times[gone]
    groups: dict[int, int] = {}
    for n in node_ids:
        r = find(n)
        groups[r] = min(groups.get(r, n), n)
    return {n: groups[find(n)] for n in node_ids}, dropped
