"""The contact policy: consent, frequency caps, quiet hours and do-not-disturb periods."""

from __future__ import annotations

from datetime import date, time
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from closedloop.core.definitions.base import Definition


class Channel(StrEnum):
    EMAIL = "email"
    SMS = "sms"
    WECHAT = "wechat"  # WeChat template messages (through a webhook)
    PUSH = "push"  # app push (through a provider's webhook)
    STAFF_TASK = "staff_task"  # a next best action for the person's shopping guide
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


class NoResponse(Definition):
    """The no-response rule: a sequence goes on only while the person answers it.

    After a message with no response (one of ``responses``, carrying the message's id, or the
    campaign's goal event) within ``within_hours``, the journey stops until the next occasion.
    Checked before each later message of the same journey (see ``activate.journeys``).
    """

    within_hours: float = Field(gt=0, le=24 * 90)
    responses: list[str] = Field(
        # The last three are what providers report through `campaign feedback` and the
        # collector's callback route (core.feedback_events), carrying the message's id.
        default_factory=lambda: [
            "Email Opened",
            "Email Link Clicked",
            "SMS Clicked",
            "Message Opened",
            "Message Clicked",
            "Message Replied",
        ],
        description="events that count as a response when they carry the message_id",
    )


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
    no_response: NoResponse | None = Field(
        None, description="stop a journey after a message nobody answered (None: never stop)"
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
