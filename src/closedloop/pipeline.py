"""The build: every stage of the loop, in order, for one project.

``closedloop build`` (and the demo, and later the API) call this; each stage reads what the
stages before it wrote. Validation runs first and in full, so a wrong definition stops the
build before anything is written.
"""

from __future__ import annotations

import glob
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from closedloop.activate.templates import check_templates
from closedloop.collect.importer import import_table
from closedloop.collect.loader import LoadResult, load_jsonl
from closedloop.core.clock import Clock
from closedloop.core.definitions import ImportFormat, ImportSpec, Project, SegmentDef
from closedloop.core.engine import Engine
from closedloop.core.errors import DefinitionError, InputError, Problem
from closedloop.core.yamlfile import load_yaml, locate
from closedloop.identity.resolve import ResolveResult, resolve
from closedloop.portrait.lookup import materialise
from closedloop.portrait.refresh import RefreshResult, refresh
from closedloop.portrait.traits import check_trait, trait_dtype
from closedloop.segments.accounts import contact_segments, evaluate_in_batches
from closedloop.segments.audience import (
    Fields,
    SegmentResult,
    check_segment,
    segment_dependencies,
)
from closedloop.tags.build import build_tags
from closedloop.tags.catalogue import record_tag_uses
from closedloop.tags.check import check_tag, check_tree
from closedloop.tags.rules import PROFILE_COLUMNS

Progress = Callable[[str, int, int | None], None]
"""progress(step, advance, total): advance a named step by ``advance`` units of ``total``."""


@dataclass
class BuildReport:
    loads: dict[str, LoadResult] = field(default_factory=dict)
    identity: ResolveResult | None = None
    customers: int = 0
    traits: int = 0
    tags: dict[str, int] = field(default_factory=dict)
    segments: dict[str, SegmentResult] = field(default_factory=dict)
    refresh: RefreshResult | None = None  # how the portrait was brought up to date


def project_fields(project: Project) -> Fields:
    """The tags and computed traits a project's conditions may use."""
    return Fields(
        tags=tuple(project.tags),
        traits=tuple((t.name, trait_dtype(t)) for t in project.traits.values()),
        segments=tuple(project.segments),
        account_segments=tuple(n for n, s in project.segments.items() if s.of == "accounts"),
    )


def segment_order(project: Project) -> tuple[list[SegmentDef], list[Problem]]:
    """Segments ordered so each comes after those it names with ``in_segment`` (also inside an
    account segment's ``contacts``); cycles are errors."""
    deps = {
        n: (segment_dependencies(s) | contact_segments(s)) & set(project.segments)
        for n, s in project.segments.items()
    }
    ordered: list[SegmentDef] = []
    done: set[str] = set()
    while len(done) < len(deps):
        ready = sorted(n for n, d in deps.items() if n not in done and d <= done)
        if not ready:
            cycle = sorted(n for n in deps if n not in done)
            problem = Problem("segments/", f"segments refer to each other in a cycle: {cycle}")
            return ordered, [problem]
        for n in ready:
            ordered.append(project.segments[n])
            done.add(n)
    return ordered, []


def check_project(project: Project) -> list[Problem]:
    """Cross-definition checks that need the stages' schemas (fields, tags, templates)."""
    problems: list[Problem] = []
    for trait in project.traits.values():
        problems += check_trait(trait)
    for tag in project.tags.values():
        traits = {t.name: trait_dtype(t) for t in project.traits.values()}
        problems += check_tag(tag, PROFILE_COLUMNS, traits)
    problems += check_tree(project.tags)
    for seg in project.segments.values():
        problems += check_segment(seg, project_fields(project))
    problems += segment_order(project)[1]
    for c in project.campaigns.values():
        problems += check_templates(c, project.tags)
    if (project.root / "tracking_plans").is_dir():  # plans need the server extra's schemas
        from closedloop.collect.tracking_plan import check_tracking_plans

        problems += check_tracking_plans(project.root, {s.name for s in project.config.sources})
    return [_with_line(project, p) for p in problems]


def _with_line(project: Project, problem: Problem) -> Problem:
    """Give a cross-check problem the line of its key, as schema errors have."""
    path = project.root / problem.file
    if problem.line is not None or problem.key is None or not path.is_file():
        return problem
    _, lines = load_yaml(path)
    parts = tuple(int(x) if x.isdigit() else x for x in problem.key.split("."))
    line, _ = locate(lines, parts)
    return Problem(problem.file, problem.message, line=line, key=problem.key)


def import_files(spec: ImportSpec, project: Project) -> list[Path]:
    pattern = str(project.path(spec.path))
    files = sorted(Path(p) for p in glob.glob(pattern))
    if not files:
        raise InputError(f"import {spec.name!r}: no file matches {pattern}")
    return files


def load_imports(
    engine: Engine, project: Project, progress: Progress | None = None
) -> dict[str, LoadResult]:
    """Load every import of the project through ``collect`` (idempotent: re-runs add nothing)."""
    results: dict[str, LoadResult] = {}
    # Find every import's files first: a missing input stops the build before any load.
    planned = [(spec, import_files(spec, project)) for spec in project.config.imports]
    for spec, files in planned:
        source = project.config.source(spec.source)

        def tick(n: int, name: str = spec.name) -> None:
            if progress:
                progress(f"load {name}", n, None)

        if spec.format is ImportFormat.SEGMENT_JSONL:
            results[spec.name] = load_jsonl(
                engine, files, source, import_name=spec.name, progress=tick
            )
        else:
            total: LoadResult | None = None
            for f in files:
                r = import_table(engine, f, spec, source, progress=tick)
                total = r if total is None else total + r
            assert total is not None  # noqa: S101 - import_files never returns an empty list
            results[spec.name] = total
    return results


def build(
    engine: Engine,
    project: Project,
    *,
    clock: Clock | None = None,
    progress: Progress | None = None,
    load: bool = True,
    incremental: bool = False,
    identity: bool = True,
) -> BuildReport:
    """Validate, then run collect → identity → portrait (profiles, traits) → tags → segments.

    ``incremental`` recomputes the portrait and traits only for customers whose events,
    attribution or windows changed since the last build (``portrait.refresh``); a full build
    also records the state an incremental one starts from. ``identity=False`` keeps the
    identity resolution as it is (``identity split`` has just written it) and rebuilds what
    depends on it.
    """
    problems = check_project(project)
    if problems:
        raise DefinitionError(problems)
    clock = clock or Clock()
    report = BuildReport()
    if load:
        report.loads = load_imports(engine, project, progress)

    def step(name: str) -> None:
        if progress:
            progress(name, 1, 1)

    if identity:
        report.identity = resolve(engine, project.identity, clock)
    step("identity")
    tz = project.config.timezone
    refreshed = refresh(
        engine, project.traits, clock, tz, full=not incremental, accounts=project.accounts
    )
    report.customers, report.traits = refreshed.customers, refreshed.traits
    report.refresh = refreshed
    step("portrait")
    step("traits")
    report.tags = build_tags(engine, project.tags, clock, root=project.root)
    step("tags")
    fields = project_fields(project)
    report.segments |= evaluate_in_batches(engine, segment_order(project)[0], fields, clock)
    record_tag_uses(engine, project, [f"segment:{n}" for n in report.segments], clock)
    step("segments")
    materialise(engine)  # the profile lookup's serving store, rewritten to match this build
    step("lookup")
    return report
