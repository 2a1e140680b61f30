"""closedloop.yaml: engine, time zone, sources and their write keys, imports, default policy."""

from __future__ import annotations

from enum import StrEnum
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from closedloop.core.definitions.base import NAME_PATTERN, Definition
from closedloop.core.definitions.channels import ChannelConfig, check_channels
from closedloop.core.definitions.policy import Channel, ContactPolicy
from closedloop.core.definitions.variants import GlobalControl


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
    callback_secret_env: str | None = Field(
        None,
        pattern=r"^[A-Z_][A-Z0-9_]*$",
        description="environment variable holding the secret a provider signs its delivery "
        "callbacks with (POST /v1/callbacks/NAME); when set, a signature is required",
    )


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
    channels: dict[Channel, ChannelConfig] = Field(
        default_factory=dict, description="how each channel's messages leave (default: outbox)"
    )
    global_control: GlobalControl | None = Field(
        None, description="a share of everyone that no campaign messages (programme lift)"
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

    @field_validator("channels")
    @classmethod
    def _channels(cls, v: dict[Channel, ChannelConfig]) -> dict[Channel, ChannelConfig]:
        check_channels(v)  # here, so an error names the `channels` key and its line
        return v

    def source(self, name: str) -> Source:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)
