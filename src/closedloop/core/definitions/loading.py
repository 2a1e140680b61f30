"""Loading a project folder: every file validated, every problem reported at once."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from closedloop.core.definitions.accounts import AccountsConfig, load_accounts
from closedloop.core.definitions.campaigns import CampaignDef
from closedloop.core.definitions.identity import IdentityConfig
from closedloop.core.definitions.project import ProjectConfig
from closedloop.core.definitions.segments import SegmentDef
from closedloop.core.definitions.tags import TagDef
from closedloop.core.definitions.traits import TraitDef
from closedloop.core.errors import DefinitionError, Problem
from closedloop.core.yamlfile import load_yaml, locate


class Project(BaseModel):
    """All definitions of one project folder, validated and cross-checked."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    root: Path
    config: ProjectConfig
    identity: IdentityConfig
    traits: dict[str, TraitDef]
    tags: dict[str, TagDef]
    segments: dict[str, SegmentDef]
    campaigns: dict[str, CampaignDef]
    # accounts.yaml: where B2B contacts' roles are read; the defaults when the file is absent.
    accounts: AccountsConfig = AccountsConfig()

    def path(self, relative: str) -> Path:
        p = Path(relative)
        return p if p.is_absolute() else self.root / p

    @property
    def engine_url(self) -> str:
        url = self.config.engine
        prefix = "duckdb:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/"):
            rel = url[len(prefix) :]
            if rel and rel != ":memory:":
                return prefix + str((self.root / rel).resolve()).lstrip("/")
        return url


M = TypeVar("M", bound=BaseModel)


def _problems(err: ValidationError, file: str, lines: dict[Any, int]) -> list[Problem]:
    out = []
    for e in err.errors():
        line, path = locate(lines, tuple(e["loc"]))
        key = ".".join(str(p) for p in path) or None
        msg = e["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if e["type"] in ("literal_error", "enum") and "expected" in e.get("ctx", {}):
            msg = f"expected {e['ctx']['expected']}, got {e['input']!r}"
        out.append(Problem(file, msg, line=line, key=key))
    return out


def _load_one(path: Path, model: type[M], root: Path) -> M:
    display = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    data, lines = load_yaml(path, display=display)
    if not isinstance(data, dict):
        raise DefinitionError([Problem(display, "expected a mapping of keys to values", line=1)])
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise DefinitionError(_problems(e, display, lines)) from None


def _load_folder(root: Path, folder: str, model: type[M], problems: list[Problem]) -> dict[str, M]:
    out: dict[str, M] = {}
    where: dict[str, str] = {}
    d = root / folder
    if not d.is_dir():
        return out
    for path in sorted([*d.glob("*.yaml"), *d.glob("*.yml")]):
        try:
            item = _load_one(path, model, root)
        except DefinitionError as e:
            problems.extend(e.problems)
            continue
        name = item.name  # type: ignore[attr-defined]
        rel = str(path.relative_to(root))
        if name in out:
            problems.append(
                Problem(rel, f"{folder[:-1]} {name!r} is also defined in {where[name]}")
            )
            continue
        out[name] = item
        where[name] = rel
    return out


def load_project(root: Path | str) -> Project:
    """Load and validate a project folder; raise DefinitionError listing every problem."""
    root = Path(root).resolve()
    if not (root / "closedloop.yaml").is_file():
        raise DefinitionError(
            [
                Problem(
                    str(root),
                    "not a closedloop project (no closedloop.yaml); try `closedloop init`",
                )
            ]
        )
    problems: list[Problem] = []
    config: ProjectConfig | None = None
    identity: IdentityConfig | None = None
    try:
        config = _load_one(root / "closedloop.yaml", ProjectConfig, root)
    except DefinitionError as e:
        problems.extend(e.problems)
    try:
        identity = _load_one(root / "identity.yaml", IdentityConfig, root)
    except DefinitionError as e:
        problems.extend(e.problems)
    accounts = AccountsConfig()
    try:
        accounts = load_accounts(root)
    except DefinitionError as e:
        problems.extend(e.problems)
    traits = _load_folder(root, "traits", TraitDef, problems)
    tags = _load_folder(root, "tags", TagDef, problems)
    before = len(problems)
    segments = _load_folder(root, "segments", SegmentDef, problems)
    segments_complete = len(problems) == before  # else an audience may be in a broken file
    campaigns = _load_folder(root, "campaigns", CampaignDef, problems)
    for name, c in campaigns.items():
        if segments_complete and c.audience not in segments:
            problems.append(
                Problem(
                    f"campaigns/{name}.yaml",
                    f"audience {c.audience!r} is not a segment (known: {sorted(segments)})",
                    key="audience",
                )
            )
    if config is not None:
        # The campaign carries its effective policy: the project's, overridden key by key.
        base = config.contact_policy
        if base.default_timezone is None:
            base = base.model_copy(update={"default_timezone": config.timezone})
        campaigns = {
            n: c.model_copy(update={"policy": base.overridden_by(c.policy)})
            for n, c in campaigns.items()
        }
    for name, t in tags.items():
        if t.parent is not None and t.parent not in tags:
            problems.append(
                Problem(f"tags/{name}.yaml", f"unknown parent tag {t.parent!r}", key="parent")
            )
    if problems or config is None or identity is None:
        raise DefinitionError(problems)
    return Project(
        root=root,
        config=config,
        identity=identity,
        traits=traits,
        tags=tags,
        segments=segments,
        campaigns=campaigns,
        accounts=accounts,
    )
