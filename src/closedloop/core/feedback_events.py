"""The names and ids of message-outcome events, shared by activate and collect.

A provider's report about a message (delivered, opened, clicked, replied, bounced,
unsubscribed) comes back into the event log either from a file (``closedloop campaign
feedback``, in activate) or over HTTP (``POST /v1/callbacks/SOURCE``, in collect). Data
flows one way, so collect may not import activate: the vocabulary both speak lives here,
and a report has the same event name and the same messageId whichever way it arrives —
a callback replayed from a file after it came over HTTP is stored once.
"""

from __future__ import annotations

from typing import Final

from closedloop.core.ids import stable_hash64

#: A provider's status word (and its common variants) → the track event it becomes.
#: ``Unsubscribed`` is the portrait's opt-out event: with the message's ``channel`` in its
#: properties it opts the person out of that channel, as a form on the website would.
CALLBACK_EVENT: Final = {
    "delivered": "Message Delivered",
    "opened": "Message Opened",
    "open": "Message Opened",
    "clicked": "Message Clicked",
    "click": "Message Clicked",
    "replied": "Message Replied",
    "reply": "Message Replied",
    "bounced": "Message Bounced",
    "bounce": "Message Bounced",
    "failed": "Message Failed",
    "unsubscribed": "Unsubscribed",
    "unsubscribe": "Unsubscribed",
}

#: The anonymous id every outcome event of one message carries: identity links it to the
#: person the message went to (through the attempt event, which names them), so a callback
#: that knows only the message id is attributed to that person and to no one else.
MESSAGE_ANONYMOUS_PREFIX: Final = "closedloop:"


def message_anonymous_id(message_id: str) -> str:
    """The anonymous id of the outcome events of ``message_id`` (see the prefix above)."""
    return f"{MESSAGE_ANONYMOUS_PREFIX}{message_id}"


def callback_message_id(message_id: str, key: str) -> str:
    """The messageId of one provider report: ``key`` is the provider's event id if it gave
    one, else the event name and time — a retried report gets the same id, so it is stored
    once however often and by whichever path it arrives."""
    return "fb_" + format(stable_hash64("callback", message_id, key), "016x")
