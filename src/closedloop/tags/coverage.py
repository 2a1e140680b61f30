"""Tag coverage: how many customers hold each tag, and how its values are spread.

"Chaotic tag systems" come from tags nobody checks; coverage and value distribution are the
first thing to look at (freshness and last use come with the governed catalogue).
"""

from __future__ import annotations

from dataclasses import dataclass

from closedloop.core.engine import Engine


@dataclass(frozen=True)
class TagCoverage:
    tag: str
    customers: int
    share: float
    values: dict[str, int]


def tag_coverage(engine: Engine) -> list[TagCoverage]:
    total = engine.count("profiles")
    tv = engine.table("tag_values")
    rows = tv.group_by("tag", "value").aggregate(n=tv.count()).order_by(["tag", "value"])
    by_tag: dict[str, dict[str, int]] = {}
    for r in rows.to_pyarrow().to_pylist():
        by_tag.setdefault(str(r["tag"]), {})[str(r["value"])] = int(r["n"])
    return [
        TagCoverage(tag, sum(v.values()), sum(v.values()) / total if total else 0.0, v)
        for tag, v in sorted(by_tag.items())
    ]
