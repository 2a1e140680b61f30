"""Campaign definitions (``campaigns/*.yaml``)."""

from __future__ import annotations

from pydantic import Field

from closedloop.core.definitions.base import NAME_PATTERN, Definition
from closedloop.core.definitions.policy import Channel, ContactPolicy


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
