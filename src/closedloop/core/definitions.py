"""A user's project ("CDP as code"): YAML definitions loaded into pydantic models.

Layout of a project folder::

    closedloop.yaml        engine URL, time zone, sources and their write keys, imports
    identity.yaml          identifier types, priorities, blocked values, never-link pairs
    traits/*.yaml          computed traits
    tags/*.yaml            tags
    segments/*.yaml        audiences
    campaigns/*.yaml       campaigns

Loading collects *every* problem (file, line, key, what was expected) before failing, so a
user fixes a project in one pass rather than one error per run.
"""

from __future__ import annotations

import re
from datetime import date, time
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from closedloop.core.conditions import Condition
from closedloop.core.errors import DefinitionError, Problem
from closedloop.core.yamlfile import load_yaml, locate

NAME_PATTERN = r"^[a-z][a-z0-9_]*$"


class Definition(BaseModel):
    """Base for every definition: unknown keys are errors (a typo must not pass silently)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- closedloop.yaml -----------------------------------------------------------------------
class DataClass(StrEnum):
    FIRST_PARTY = "first_party"
    SECOND_PARTY = "second_party"
    THIRD_PARTY = "third_party"


class Source(Definition):
    """A touchpoint that sends data; every event records the source and channel it came by."""

    name: str = Field(pattern=NAME_PATTERN)
    channel: str = Field(min_length=1, description="web, app, miniprogram, pos, ...")
    data_class: DataClass = DataClass.FIRST_PARTY
    write_key: str = Field(min_length=8)
    description: str = ""


class ImportFormat(StrEnum):
    SEGMENT_JSONL = "segment_jsonl"
    CSV = "csv"
    PARQUET = "parquet"


class ImportMapping(Definition):
    """How the rows of a table become Segment messages (one message per row)."""

    type: Literal["track", "identify"]
    event: str | None = None
    message_id_from: list[str] = Field(min_length=1)
    user_id: str | None = None
    anonymous_id: str | None = None
    timestamp: str
    properties: dict[str, str] = Field(default_factory=dict)
    traits: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ImportMapping:
        if self.type == "track" and not self.event:
            raise ValueError("a track mapping needs `event`")
        if not (self.user_id or self.anonymous_id):
            raise ValueError("a mapping needs `user_id` or `anonymous_id` (a column name)")
        return self

    def columns(self) -> set[str]:
        cols = {self.timestamp, *self.message_id_from, *self.properties.values()}
        cols |= set(self.traits.values())
        cols |= {c for c in (self.user_id, self.anonymous_id) if c}
        return cols


class ImportSpec(Definition):
    """A file (or folder of files) that ``closedloop build`` loads through ``collect``."""

    name: str = Field(pattern=NAME_PATTERN)
    path: str
    source: str
    format: ImportFormat
    mapping: ImportMapping | None = None

    @model_validator(mode="after")
    def _check(self) -> ImportSpec:
        if self.format is ImportFormat.SEGMENT_JSONL:
            if self.mapping is not None:
                raise ValueError("segment_jsonl imports are Segment messages: no `mapping`")
        elif self.mapping is None:
            raise ValueError(f"a {self.format.value} import needs a `mapping`")
        return self


class ProjectConfig(Definition):
    name: str = Field(min_length=1)
    engine: str = "duckdb:///warehouse.duckdb"
    timezone: str = "Asia/Shanghai"
    outbox: str = "outbox"
    reports: str = "reports"
    sources: list[Source] = Field(min_length=1)
    imports: list[ImportSpec] = Field(default_factory=list)
    contact_policy: ContactPolicy = Field(
        default_factory=lambda: ContactPolicy(),
        description="the project's default contact policy; a campaign's `policy:` overrides keys",
    )

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {v!r} (use an IANA name such as Asia/Shanghai)"
            ) from None
        return v

    @model_validator(mode="after")
    def _check(self) -> ProjectConfig:
        names = [s.name for s in self.sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {dupes}")
        keys = [s.write_key for s in self.sources]
        if len(set(keys)) != len(keys):
            raise ValueError("each source needs its own write key")
        for imp in self.imports:
            if imp.source not in names:
                raise ValueError(f"import {imp.name!r} names unknown source {imp.source!r}")
        return self

    def source(self, name: str) -> Source:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)


# ---- identity.yaml ---------------------------------------------------------------------------
class Normaliser(StrEnum):
    PHONE = "phone"  # E.164 with the project's default region
    EMAIL = "email"  # trimmed, lower-cased, must look like an address
    TRIM = "trim"  # surrounding spaces removed
    LOWER = "lower"  # trimmed and lower-cased


class IdentifierType(Definition):
    """A kind of identifier, where it is found in messages, and how much it is trusted."""

    name: str = Field(pattern=NAME_PATTERN)
    normaliser: Normaliser = Normaliser.TRIM
    priority: int = Field(ge=0, le=1000, description="higher wins when links conflict")
    strong: bool = Field(description="identifies a person on its own (phone, member id)")
    paths: list[str] = Field(min_length=1)
    scoped: bool = Field(False, description="value is only unique within its collection (openid)")
    max_strong_neighbours: int | None = Field(
        None,
        ge=1,
        description="a value seen with more strong identifiers of one type than this is "
        "quarantined (a shared device, a clerk's phone) instead of linking them",
    )
    max_names: int | None = Field(
        None,
        ge=1,
        description="a value seen in records under more different names than this (a "
        "clerk's phone typed for walk-ins) is quarantined and listed as a suspect",
    )
    max_per_customer: int | None = Field(
        None,
        ge=1,
        description="at most this many identifiers of this type in one customer; a link that "
        "would exceed it is dropped (lowest priority first) and recorded",
    )

    @field_validator("paths")
    @classmethod
    def _paths(cls, v: list[str]) -> list[str]:
        for p in v:
            if not re.fullmatch(
                r"(user_id|anonymous_id|(traits|context)(\.[A-Za-z0-9_]+)+|external_ids\.[A-Za-z0-9_]+)",
                p,
            ):
                raise ValueError(
                    f"path {p!r}: expected user_id, anonymous_id, traits.KEY, context.KEY.KEY "
                    "or external_ids.TYPE"
                )
        return v


MATCH_FIELDS = ("name", "birthday", "city", "gender", "email", "phone")


class MatchingConfig(Definition):
    """Probabilistic (Fellegi–Sunter) matching of profile records that share no identifier.

    A record is a message carrying ``name`` (a CRM row, a registration); it stands for the
    message's highest-priority identifier. Records are compared only within blocks (pairs
    agreeing on every field of one blocking rule); m/u probabilities are estimated without
    labels by EM, and pairs whose match probability reaches ``threshold`` become links.
    """

    name: str = Field("traits.name", description="path of the person's name")
    birthday: str | None = "traits.birthday"
    city: str | None = "traits.city"
    gender: str | None = "traits.gender"
    email: str | None = Field("email", description="identifier type holding the e-mail")
    phone: str | None = Field("phone", description="identifier type holding the phone")
    blocking: list[list[str]] = Field(
        default_factory=lambda: [["birthday", "city", "gender"]], min_length=1
    )
    threshold: float = Field(0.99, gt=0.0, lt=1.0, description="match probability for a link")
    priority: int = Field(5, ge=0, le=1000, description="rank of these links when rules conflict")
    max_block_size: int = Field(
        2000, ge=2, description="blocks with more records are skipped (too common to compare)"
    )
    iterations: int = Field(60, ge=1, le=1000)
    u_sample: int = Field(
        200_000, ge=100, description="random record pairs used to measure non-match rates"
    )

    @field_validator("name", "birthday", "city", "gender")
    @classmethod
    def _trait_path(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"traits(\.[A-Za-z0-9_]+)+", v):
            raise ValueError(f"path {v!r}: expected traits.KEY")
        return v

    @model_validator(mode="after")
    def _check(self) -> MatchingConfig:
        present = {f for f in MATCH_FIELDS if getattr(self, f) is not None}
        for rule in self.blocking:
            if not rule:
                raise ValueError("a blocking rule needs at least one field")
            for f in rule:
                if f not in present:
                    raise ValueError(
                        f"blocking field {f!r} is not a configured matching field "
                        f"(configured: {sorted(present)})"
                    )
        return self


class IdentityConfig(Definition):
    default_region: str = Field("CN", min_length=2, max_length=2)
    types: list[IdentifierType] = Field(min_length=1)
    blocked_values: list[str] = Field(default_factory=list)
    blocked_patterns: list[str] = Field(default_factory=list)
    never_link: list[tuple[str, str]] = Field(default_factory=list)
    matching: MatchingConfig | None = None

    @field_validator("blocked_patterns")
    @classmethod
    def _regex(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"blocked pattern {p!r} is not a valid regex: {e}") from None
        return v

    @model_validator(mode="after")
    def _check(self) -> IdentityConfig:
        names = [t.name for t in self.types]
        if len(set(names)) != len(names):
            raise ValueError("identifier type names must be unique")
        for a, b in self.never_link:
            for n in (a, b):
                if n not in names:
                    raise ValueError(f"never_link names unknown identifier type {n!r}")
        if self.matching is not None:
            for f in ("email", "phone"):
                n = getattr(self.matching, f)
                if n is not None and n not in names:
                    raise ValueError(f"matching.{f} names unknown identifier type {n!r}")
        return self

    def type(self, name: str) -> IdentifierType:
        for t in self.types:
            if t.name == name:
                return t
        raise KeyError(name)


# ---- traits, tags, segments, campaigns -------------------------------------------------------
class Aggregation(StrEnum):
    COUNT = "count"
    SUM = "sum"
    AVG = "avg"
    MIN = "min"
    MAX = "max"
    FIRST = "first"
    LAST = "last"
    DISTINCT_COUNT = "distinct_count"
    MOST_FREQUENT = "most_frequent"


class TraitDef(Definition):
    """A computed trait: an aggregation over a customer's events, within a window."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    event: str | None = Field(None, description="event name; omitted = all track events")
    aggregation: Aggregation
    column: str | None = Field(
        None, description="events column to aggregate (revenue, category, channel, ...)"
    )
    window_days: int | None = Field(None, ge=1, description="last N days; omitted = lifetime")

    @model_validator(mode="after")
    def _check(self) -> TraitDef:
        if self.aggregation is not Aggregation.COUNT and not self.column:
            raise ValueError(f"aggregation {self.aggregation.value!r} needs a `column`")
        return self


class TagRule(Definition):
    value: str
    when: Condition


class TagDef(Definition):
    """A rule tag: the first rule whose condition holds gives the value."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    owner: str = ""
    parent: str | None = None
    rules: list[TagRule] = Field(min_length=1)
    default: str | None = None


class SegmentDef(Definition):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    where: Condition


class Channel(StrEnum):
    EMAIL = "email"
    SMS = "sms"
    OUTBOX = "outbox"


class PolicyAction(StrEnum):
    """What a time rule does to a message that falls inside it."""

    POSTPONE = "postpone"  # send at the end of the period
    DROP = "drop"  # do not send (a suppressed delivery with the rule as reason)


def _clock_time(v: Any) -> Any:
    """Accept ``"21:00"``; refuse YAML 1.1's reading of a bare ``21:00`` as 1260 (sexagesimal)."""
    if isinstance(v, int) and not isinstance(v, bool):
        raise ValueError('write times of day in quotes, e.g. "21:00" (bare 21:00 is a number)')
    return v


class QuietHours(Definition):
    """Local hours (in the person's time zone) in which no message may go out.

    ``start`` after ``end`` wraps midnight (21:00–09:00); ``start`` equal to ``end`` is refused
    (it would mean never or always).
    """

    start: time
    end: time
    action: PolicyAction = PolicyAction.POSTPONE

    _t = field_validator("start", "end", mode="before")(_clock_time)

    @model_validator(mode="after")
    def _check(self) -> QuietHours:
        if self.start == self.end:
            raise ValueError("quiet hours need a start different from their end")
        if self.start.tzinfo is not None or self.end.tzinfo is not None:
            raise ValueError("quiet hours are local times: no time zone offset")
        return self


class DoNotDisturb(Definition):
    """A holiday period (whole local days, ``start`` to ``end`` inclusive) with no messages."""

    name: str = ""
    start: date
    end: date
    action: PolicyAction = PolicyAction.POSTPONE

    @model_validator(mode="after")
    def _check(self) -> DoNotDisturb:
        if self.end < self.start:
            raise ValueError(f"do-not-disturb {self.name!r} ends ({self.end}) before it starts")
        return self


class FrequencyCap(Definition):
    """At most ``max`` marketing messages per person in any ``days`` consecutive local days.

    Counted across all campaigns from the delivery log; ``channel`` limits the count (and the
    cap) to one channel, omitted means every channel.
    """

    max: int = Field(ge=1)
    days: int = Field(ge=1, le=366)
    channel: Channel | None = None


class ContactPolicy(Definition):
    """Rules every marketing message must pass at send time (see ``activate.policy``).

    Consent and opt-outs decide eligibility before the holdout split; caps, quiet hours and
    do-not-disturb periods are checked after it, for the treatment group only.
    """

    require_consent: bool = Field(
        True, description="send only to people whose marketing consent is true (null = no)"
    )
    caps: list[FrequencyCap] = Field(default_factory=list)
    quiet_hours: QuietHours | None = None
    do_not_disturb: list[DoNotDisturb] = Field(default_factory=list)
    default_timezone: str | None = Field(
        None, description="for people with no known time zone; omitted = the project's"
    )

    @field_validator("default_timezone")
    @classmethod
    def _tz(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                ZoneInfo(v)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(f"unknown time zone {v!r} (use an IANA name)") from None
        return v

    def overridden_by(self, other: ContactPolicy | None) -> ContactPolicy:
        """This policy with the keys ``other`` states explicitly replaced by ``other``'s."""
        if other is None:
            return self
        return self.model_copy(update={k: getattr(other, k) for k in other.model_fields_set})


class Goal(Definition):
    event: str = "Order Completed"
    window_days: int = Field(14, ge=1, le=365)


class Offer(Definition):
    code: str
    description: str
    conditions: str = Field(description="the offer's terms, stated in every message")
    expires_days: int = Field(14, ge=1)


class CampaignDef(Definition):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    audience: str = Field(description="segment name")
    channel: Channel = Channel.EMAIL
    holdout: float = Field(0.2, gt=0.0, le=0.5, description="share held out as control")
    subject: str = ""
    template: str = Field(min_length=1, description="Jinja2 (sandboxed) message body")
    offer: Offer | None = None
    goal: Goal = Field(default_factory=lambda: Goal())
    priority: int = 0
    policy: ContactPolicy | None = Field(
        None, description="keys given here override the project's contact_policy"
    )


ProjectConfig.model_rebuild()


# ---- the project -----------------------------------------------------------------------------
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
    )


def birthday_of(value: Any) -> date | None:
    """Parse a birthday trait (``YYYY-MM-DD``); anything else is treated as unknown."""
    if isinstance(value, date):
        return value
    if isinstance(value, str):
        try:
            return date.fromisoformat(value.strip())
        except ValueError:
            return None
    return None
