"""Tracking plans: per source, which events may arrive and what their properties look like.

A plan is an optional YAML file ``tracking_plans/SOURCE.yaml`` in the project::

    mode: quarantine          # allow | quarantine | block
    events:
      Order Completed:
        properties:           # a JSON Schema for the event's properties
          type: object
          required: [order_id, revenue]
          properties: {revenue: {type: number, minimum: 0}}
      Product Viewed: {}      # allowed, properties unchecked
    identify:
      traits: {type: object, properties: {email: {type: string}}}

A ``track`` whose event the plan does not list is a ``forbidden_event``; properties or
traits that break their schema are a ``tracking_plan`` violation. The mode says what then
happens: ``allow`` accepts the message anyway (the plan documents, it does not enforce);
``quarantine`` and ``block`` both keep it in failed events with its payload, to replay
(``closedloop failed replay``) once the plan or the sender is fixed. They differ in what the
sender hears: a quarantined message is held on the server's side — a single-message request
is answered 200 with ``quarantined: 1`` — while a blocked one is refused, 400, as any invalid
message. In a batch, both are listed in ``errors``. Either way the message is counted as
failed, so the accounting stays true.

Schemas are compiled once (fastjsonschema turns each into a Python function), so checking
costs microseconds on the collector's hot path.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any

import fastjsonschema
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from closedloop.collect.messages import Reason
from closedloop.core.errors import DefinitionError, Problem
from closedloop.core.yamlfile import load_yaml, locate

PLANS_FOLDER = "tracking_plans"


class Mode(StrEnum):
    ALLOW = "allow"
    QUARANTINE = "quarantine"
    BLOCK = "block"


class _Def(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EventRule(_Def):
    properties: dict[str, Any] | None = Field(None, description="JSON Schema of properties")


class IdentifyRule(_Def):
    traits: dict[str, Any] | None = Field(None, description="JSON Schema of traits")


class PlanDef(_Def):
    mode: Mode = Mode.ALLOW
    events: dict[str, EventRule] = Field(default_factory=dict)
    identify: IdentifyRule | None = None


Check = Callable[[Any], Any]


class TrackingPlan:
    """A source's plan with its schemas compiled; ``violation`` judges one message."""

    def __init__(self, source: str, definition: PlanDef) -> None:
        self.source = source
        self.mode = definition.mode
        self.events: dict[str, Check | None] = {
            name: _compile(rule.properties) for name, rule in definition.events.items()
        }
        traits = definition.identify.traits if definition.identify else None
        self.traits: Check | None = _compile(traits)

    def violation(self, message: dict[str, Any]) -> tuple[Reason, str] | None:
        """Why the message breaks the plan, or None. Only called on valid messages."""
        mtype = message.get("type")
        if mtype == "track":
            event = message.get("event")
            if event not in self.events:
                return Reason.FORBIDDEN_EVENT, (
                    f"event {event!r} is not in the tracking plan of source {self.source!r}"
                )
            check = self.events[event]
            if check is not None:
                return _run(check, message.get("properties") or {}, f"`{event}` properties")
        elif mtype == "identify" and self.traits is not None:
            return _run(self.traits, message.get("traits") or {}, "identify traits")
        return None


def _compile(schema: dict[str, Any] | None) -> Check | None:
    if schema is None:
        return None
    compiled: Check = fastjsonschema.compile(schema)
    return compiled


def _run(check: Check, value: Any, what: str) -> tuple[Reason, str] | None:
    try:
        check(value)
    except fastjsonschema.JsonSchemaValueException as e:
        return Reason.TRACKING_PLAN, f"{what} break the tracking plan: {e.message}"
    except (RecursionError, TypeError, ValueError) as e:
        return Reason.TRACKING_PLAN, f"{what} cannot be checked against the plan: {e}"
    return None


def load_tracking_plans(root: Path, source_names: set[str]) -> dict[str, TrackingPlan]:
    """The plans in ``root/tracking_plans``, one per source; every problem reported at once.

    Each problem names its file, line and key (``tracking_plans/web.yaml:7 [events.Order
    Completed.properties]: not a valid JSON Schema: …``), so ``closedloop validate`` points
    at the schema to fix rather than at the file.
    """
    folder = Path(root) / PLANS_FOLDER
    plans: dict[str, TrackingPlan] = {}
    problems: list[Problem] = []
    if not folder.is_dir():
        return plans
    for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        display = f"{PLANS_FOLDER}/{path.name}"
        if path.stem not in source_names:
            problems.append(
                Problem(display, f"names no source (known: {', '.join(sorted(source_names))})")
            )
            continue
        try:
            data, lines = load_yaml(path, display=display)
        except DefinitionError as e:
            problems.extend(e.problems)
            continue
        try:
            definition = PlanDef.model_validate(data or {})
        except ValidationError as e:
            for err in e.errors():
                line, key = locate(lines, tuple(err["loc"]))
                problems.append(
                    Problem(display, err["msg"], line=line, key=".".join(map(str, key)) or None)
                )
            continue
        schemas: list[tuple[tuple[str, ...], dict[str, Any] | None]] = [
            (("events", name, "properties"), rule.properties)
            for name, rule in definition.events.items()
        ]
        if definition.identify is not None:
            schemas.append((("identify", "traits"), definition.identify.traits))
        bad = False
        for where, schema in schemas:
            try:
                _compile(schema)
            except Exception as e:  # any way a schema fails to compile is a problem
                bad = True
                line, _ = locate(lines, where)
                problems.append(
                    Problem(
                        display,
                        f"not a valid JSON Schema: {e}",
                        line=line,
                        key=".".join(where),
                    )
                )
        if not bad:
            plans[path.stem] = TrackingPlan(path.stem, definition)
    if problems:
        raise DefinitionError(problems)
    return plans


def check_tracking_plans(root: Path, source_names: set[str]) -> list[Problem]:
    """Every problem of the project's tracking plans (for ``closedloop validate``), or none."""
    try:
        load_tracking_plans(root, source_names)
    except DefinitionError as e:
        return list(e.problems)
    return []
