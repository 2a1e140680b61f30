"""Wrong tag definitions fail at `validate` with file:line [key] and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from closedloop.core.definitions import load_project
from closedloop.core.errors import DefinitionError
from closedloop.demo.project import init_project
from closedloop.pipeline import check_project


def _problems(tmp_path: Path, files: dict[str, str]) -> list[str]:
    init_project(tmp_path / "p")
    for name, text in files.items():
        (tmp_path / "p" / "tags" / name).write_text(text, encoding="utf-8")
    try:
        project = load_project(tmp_path / "p")
    except DefinitionError as e:
        return [str(p) for p in e.problems]
    return [str(p) for p in check_project(project)]


CASES = {
    "bad type": (
        "name: x\ntype: bukket\nfield: revenue\n",
        "tags/x.yaml:2 [type]: expected 'rule', 'bucket'",
    ),
    "bucket without cuts": (
        "name: x\ntype: bucket\nfield: revenue\n",
        "tags/x.yaml:1 [ranges]: give either `ranges` or `percentiles`",
    ),
    "bucket on a text field": (
        "name: x\ntype: bucket\nfield: city\npercentiles: [0.5]\n",
        "tags/x.yaml:3 [field]: 'city' is not a numeric profile field or trait",
    ),
    "percentiles out of range": (
        "name: x\ntype: bucket\nfield: revenue\npercentiles: [0.5, 1.5]\n",
        "tags/x.yaml:4 [percentiles]: percentiles are cut points",
    ),
    "labels count": (
        "name: x\ntype: bucket\nfield: revenue\npercentiles: [0.5]\nlabels: [a, b, c]\n",
        "tags/x.yaml:5 [labels]: 1 cut points make 2 buckets",
    ),
    "empty range": (
        "name: x\ntype: bucket\nfield: revenue\nranges:\n  - {value: a}\n",
        "tags/x.yaml:5 [ranges.0]: a range needs `min`, `max` or both",
    ),
    "inverted range": (
        "name: x\ntype: model\nmodel: churn\nranges:\n  - {value: a, min: 2, max: 1}\n",
        "tags/x.yaml:5 [ranges.0]: min 2.0 is not below max 1.0",
    ),
    "stray field": (
        "name: x\ntype: rfm\nfield: revenue\n",
        "tags/x.yaml:3 [field]: 'field' does not apply to a rfm tag",
    ),
    "first without a column": (
        "name: x\ntype: first\nevent: Order Completed\n",
        "tags/x.yaml:1 [column]: give exactly one of `column`",
    ),
    "unknown events column": (
        "name: x\ntype: top_n\ncolumn: categry\n",
        "tags/x.yaml:3 [column]: unknown events column 'categry'",
    ),
    "sql that writes": (
        "name: x\ntype: sql\nsql: DELETE FROM profiles\n",
        "tags/x.yaml:3 [sql]: only a SELECT is allowed, got DELETE",
    ),
    "sql without value": (
        "name: x\ntype: sql\nsql: SELECT customer_id FROM profiles\n",
        "tags/x.yaml:3 [sql]: the SELECT must return customer_id and value; missing value",
    ),
    "import of a text file": (
        "name: x\ntype: import\npath: vip.txt\n",
        "tags/x.yaml:3 [path]: 'vip.txt': expected a .csv or .parquet file",
    ),
    "model without a model": (
        "name: x\ntype: model\n",
        "tags/x.yaml:1 [model]: a model tag needs `model`",
    ),
    "rule tag without rules": (
        "name: x\n",
        "tags/x.yaml:1 [rules]: a rule tag needs at least one rule",
    ),
    "rule tag with empty rules": (
        "name: x\ndescription: y\nrules: []\n",
        "tags/x.yaml:3 [rules]: a rule tag needs at least one rule",
    ),
    "rule on unknown field": (
        "name: x\nrules:\n  - {value: a, when: {trait: revnue, op: gt, value: 1}}\n",
        "tags/x.yaml:3 [rules.0.when]: unknown profile field 'revnue'",
    ),
    "unknown parent": (
        "name: x\ntype: rfm\nparent: nothing\n",
        "tags/x.yaml [parent]: unknown parent tag 'nothing'",
    ),
    "stale days": (
        "name: x\ntype: rfm\nstale_after_days: 0\n",
        "tags/x.yaml:3 [stale_after_days]: Input should be greater than or equal to 1",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_wrong_tag_definitions_point_at_the_key(tmp_path: Path, case: str) -> None:
    text, expected = CASES[case]
    got = _problems(tmp_path, {"x.yaml": text})
    assert any(p.startswith(expected) for p in got), got


def test_example_project_tags_are_valid(tmp_path: Path) -> None:
    assert _problems(tmp_path, {}) == []


def test_bucket_on_a_numeric_trait_is_valid(tmp_path: Path) -> None:
    text = "name: x\ntype: bucket\nfield: orders_90d\nranges: [{value: many, min: 3}]\n"
    assert _problems(tmp_path, {"x.yaml": text}) == []


def test_parent_cycles_are_reported_once(tmp_path: Path) -> None:
    got = _problems(
        tmp_path,
        {
            "a.yaml": "name: a\ntype: rfm\nparent: b\n",
            "b.yaml": "name: b\ntype: rfm\nparent: a\n",
            "c.yaml": "name: c\ntype: rfm\nparent: a\n",
        },
    )
    assert got == ["tags/a.yaml:3 [parent]: parents form a cycle: a -> b -> a"]
