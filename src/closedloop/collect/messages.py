"""Segment messages: validate one message and normalise it into an ``events`` row.

This module is the single gate every message passes, whatever brought it in — a JSONL file,
a CSV/Parquet import (rows are turned into messages first) and, later, the HTTP collector.
Keeping one gate means a message is accepted or rejected for the same reason whichever way it
arrived, and the ``failed_events`` reason codes mean the same thing everywhere.

The rules follow Segment's spec (see ``WIRE-CONTRACT.md``): a JSON object of a known ``type``
with ``userId`` or ``anonymousId``; ``track`` needs ``event``, ``group`` needs ``groupId``,
``alias`` needs ``previousId`` and ``userId``; ``messageId`` is the dedup key (at most 100
characters, derived from the content when absent); at most 32 KB; times are ISO 8601, stored
in UTC, with the client's clock skew corrected from ``sentAt``.

Validation never raises for any input: whatever a client sends, the answer is an
``AcceptedMessage`` or a ``RejectedMessage`` with a typed reason code and a sentence saying
what is wrong and where, so a collector can answer 400 instead of 500 and a loader can keep
going past a bad line.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, NamedTuple

from closedloop.core.definitions import Source
from closedloop.core.ids import stable_hash64

MESSAGE_TYPES: Final = ("identify", "track", "page", "screen", "group", "alias")
MAX_MESSAGE_BYTES: Final = 32 * 1024
MAX_MESSAGE_ID_CHARS: Final = 100
MAX_PAYLOAD_BYTES: Final = 64 * 1024

#: Column order of ``AcceptedMessage.values``; the same names as the ``events`` table.
EVENT_COLUMNS: Final = (
    "message_id",
    "type",
    "event",
    "user_id",
    "anonymous_id",
    "timestamp",
    "original_timestamp",
    "sent_at",
    "received_at",
    "source",
    "channel",
    "data_class",
    "properties",
    "traits",
    "context",
    "order_id",
    "revenue",
    "category",
    "coupon",
    "load_id",
)
EXTERNAL_ID_COLUMNS: Final = ("message_id", "type", "id", "collection")
FAILED_COLUMNS: Final = (
    "failure_id",
    "source",
    "reason_code",
    "reason",
    "location",
    "message_id",
    "payload",
    "failed_at",
    "load_id",
)


class Reason(StrEnum):
    """Why a message was refused; stored in ``failed_events.reason_code``."""

    MALFORMED = "malformed"  # not JSON, not an object, or holds values JSON cannot carry
    MISSING_IDENTITY = "missing_identity"  # neither userId nor anonymousId
    MISSING_FIELD = "missing_field"  # a field the message type needs is absent
    INVALID_FIELD = "invalid_field"  # a field is present but of the wrong kind or format
    TOO_LARGE = "too_large"  # over 32 KB serialised
    UNKNOWN_TYPE = "unknown_type"  # `type` is not one of the six Segment types
    # Not produced by validate_message; declared here so all intake codes live in one enum:
    BAD_WRITE_KEY = "bad_write_key"  # HTTP collector: the write key names no source
    TRACKING_PLAN = "tracking_plan"  # violates the source's tracking plan
    FORBIDDEN_EVENT = "forbidden_event"  # an event the source may not send


@dataclass(frozen=True, slots=True)
class AcceptedMessage:
    """A valid message, normalised: ``values`` is one ``events`` row in ``EVENT_COLUMNS`` order.

    The row is kept as a tuple (not a dict) because the loader transposes thousands of them
    into Arrow columns at once; ``row`` gives the dict view for everyone else.
    """

    message_id: str
    values: tuple[Any, ...]
    external_ids: list[dict[str, str | None]] = field(default_factory=list)

    @property
    def row(self) -> dict[str, Any]:
        """The ``events`` row as a dict keyed by column name."""
        return dict(zip(EVENT_COLUMNS, self.values, strict=True))


@dataclass(frozen=True, slots=True)
class RejectedMessage:
    """A refused message: a typed code, a sentence for people, and where it came from."""

    reason_code: Reason
    reason: str
    location: str
    message_id: str | None = None


class _Reject(Exception):
    """Raised inside validation to stop at the first problem; turned into a RejectedMessage."""

    def __init__(self, code: Reason, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# ---- JSON helpers -------------------------------------------------------------------------
def _refuse(value: object) -> object:
    raise TypeError(f"a {type(value).__name__} is not a JSON value")


def _make_encoder() -> Callable[[object], str]:
    """A compact JSON encoder made once and reused.

    ``json.dumps`` builds a new C encoder on every call, which is most of its cost for the
    small objects messages hold; calling the C encoder directly halves the time of the
    loader's hottest step. ``allow_nan`` is off because NaN and Infinity are not JSON and
    would poison every JSON function that reads the column later.
    """
    fallback = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    if c_make_encoder is None:  # pragma: no cover - CPython always has the C accelerator
        return fallback.encode
    encoder = c_make_encoder(
        None, _refuse, json.encoder.encode_basestring, None, ":", ",", False, False, False
    )
    join = "".join

    def encode(value: object) -> str:
        return join(encoder(value, 0))

    return encode


_encode = _make_encoder()
#: Compact JSON text (no NaN/Infinity), the same bytes everywhere a message is serialised.
encode_json = _encode
_CANONICAL = json.JSONEncoder(
    separators=(",", ":"), ensure_ascii=False, sort_keys=True, allow_nan=True
)
_NUMBER = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*", re.ASCII)


def _kind(value: object) -> str:
    """The JSON name of a value's kind, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _show(value: object, limit: int = 60) -> str:
    """A short, safe rendering of a bad value for a reason text."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        text = f"<{_kind(value)}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _utf8_ok(text: str) -> bool:
    """False when ``text`` holds a lone surrogate (legal in JSON escapes, not in UTF-8)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_text(value: dict[str, Any], where: str) -> str:
    """Compact JSON text of ``value``, or a rejection saying which field cannot be stored."""
    try:
        text = _encode(value)
    except (ValueError, TypeError) as e:
        raise _Reject(
            Reason.INVALID_FIELD,
            f"`{where}` holds a value that cannot be stored as JSON ({e})",
        ) from None
    if not _utf8_ok(text):
        raise _Reject(Reason.INVALID_FIELD, f"`{where}` holds text that is not valid Unicode")
    return text


def serialized_size(raw: object) -> int:
    """Bytes of ``raw`` as compact UTF-8 JSON: what the 32 KB limit is measured on."""
    try:
        return len(_encode(raw).encode("utf-8", "surrogatepass"))
    except (ValueError, TypeError):
        pass
    # NaN/Infinity or odd Python values: measure leniently; the field checks reject them.
    try:
        text = json.dumps(
            raw, default=repr, skipkeys=True, separators=(",", ":"), ensure_ascii=False
        )
    except (ValueError, TypeError):  # e.g. an integer too long to print: its field is refused
        return 0
    return len(text.encode("utf-8", "replace"))


def derived_message_id(raw: dict[str, Any], source: Source) -> str:
    """A messageId for a message that has none: a hash of its canonical JSON and source.

    Deterministic, so loading the same file twice (or a client retrying without a messageId)
    produces the same id and the second copy is dropped as a duplicate. An empty
    ``messageId`` key is left out, so ``"messageId": ""`` and no key at all agree.
    Raises ValueError for a message holding an integer too long to print.
    """
    if "messageId" in raw:
        raw = {k: v for k, v in raw.items() if k != "messageId"}
    try:
        canonical = _CANONICAL.encode(raw)
    except TypeError:  # not JSON (a Python caller's tuple keys, objects): hash the repr
        canonical = repr(raw)
    h = hashlib.blake2b(digest_size=16)
    h.update(source.name.encode("utf-8"))
    h.update(b"\x00")
    h.update(canonical.encode("utf-8", "surrogatepass"))
    return "cl-" + h.hexdigest()


def failure_id(source: str, location: str, payload: str) -> str:
    """The key of a failed_events row: fixed for a given place and content, so re-runs dedup."""
    return "f_" + format(stable_hash64("failure", source, location, payload), "016x")


# ---- field helpers ------------------------------------------------------------------------
def _id_text(value: object, where: str) -> str | None:
    """An identifier as text: strings as given, numbers as their decimal form, blank → None."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value or value.isspace():
            return None
        if not _utf8_ok(value):
            raise _Reject(Reason.INVALID_FIELD, f"`{where}` is not valid Unicode text")
        return value
    if isinstance(value, bool):
        raise _Reject(Reason.INVALID_FIELD, f"`{where}` must be a string or a number, got boolean")
    if isinstance(value, int):
        try:
            return str(value)
        except ValueError:
            raise _Reject(Reason.INVALID_FIELD, f"`{where}` is a number too long to use") from None
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _Reject(Reason.INVALID_FIELD, f"`{where}` must be a finite number")
        # 123.0 and 123 name the same customer; many exporters write integers as floats.
        return str(int(value)) if value.is_integer() else repr(value)
    raise _Reject(
        Reason.INVALID_FIELD, f"`{where}` must be a string or a number, got {_kind(value)}"
    )


def _object(value: object, where: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return value
    raise _Reject(Reason.INVALID_FIELD, f"`{where}` must be an object, got {_kind(value)}")


def _time(value: object, where: str) -> datetime | None:
    """An ISO 8601 time in UTC; a time without an offset is taken to be UTC."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Reject(
            Reason.INVALID_FIELD, f"`{where}` must be an ISO 8601 string, got {_kind(value)}"
        )
    try:
        return _utc(datetime.fromisoformat(value))
    except (ValueError, OverflowError):
        raise _Reject(
            Reason.INVALID_FIELD, f"`{where}` is not an ISO 8601 time: {_show(value)}"
        ) from None


def _utc(t: datetime) -> datetime:
    """``t`` in UTC; a naive time is taken to be UTC already."""
    if t.tzinfo is UTC:
        return t
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def _scalar_text(value: object) -> str | None:
    """A promoted text column (order_id, category, coupon): strings and numbers, else null."""
    if isinstance(value, str):
        return value if value and not value.isspace() else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return _id_text(value, "")
        except _Reject:
            return None
    return None


def parse_number(value: object) -> float | None:
    """A finite float from a JSON number or a plain numeric string ("129.50"), else None.

    Strings are matched against a strict decimal pattern first: ``float()`` alone would also
    take "nan", "inf" and "1_000", none of which is an amount of money.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            f = float(value)
        except OverflowError:
            return None
        return f if math.isfinite(f) else None
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        f = float(value)
        return f if math.isfinite(f) else None
    return None


def _category(props: dict[str, Any]) -> str | None:
    """properties.category, else the category of the first product that has one."""
    category = props.get("category")
    if category is None:
        products = props.get("products")
        if isinstance(products, list):
            for p in products:
                if isinstance(p, dict) and p.get("category") is not None:
                    category = p["category"]
                    break
    return _scalar_text(category)


def _external_ids(context: dict[str, Any] | None, message_id: str) -> list[dict[str, str | None]]:
    """Rows for ``event_external_ids`` from ``context.externalIds``; incomplete entries skipped."""
    if context is None:
        return []
    entries = context.get("externalIds")
    if not isinstance(entries, list):
        return []
    out: list[dict[str, str | None]] = []
    seen: set[tuple[str, str]] = set()
    for e in entries:
        if not isinstance(e, dict):
            continue
        id_type = _scalar_text(e.get("type"))
        id_value = _scalar_text(e.get("id"))
        if id_type is None or id_value is None or (id_type, id_value) in seen:
            continue
        seen.add((id_type, id_value))
        out.append(
            {
                "message_id": message_id,
                "type": id_type,
                "id": id_value,
                "collection": _scalar_text(e.get("collection")),
            }
        )
    return out


# ---- the gate -----------------------------------------------------------------------------
def validate_message(
    raw: object,
    *,
    source: Source,
    received_at: datetime,
    location: str,
    load_id: str | None = None,
    size: int | None = None,
) -> AcceptedMessage | RejectedMessage:
    """Check one Segment message and normalise it into an ``events`` row; never raises.

    ``received_at`` is the server's receipt time, used when the message carries no
    ``receivedAt`` of its own (a replayed export keeps its original one). ``location`` says
    where the message came from (``file:LINE``, ``file:row N``, a request id) and is copied
    into a rejection. ``size`` is the message's serialised size in bytes when the caller
    already knows it (a loader has the raw line), saving a re-serialisation.
    """
    result = check_message(raw, source, received_at, load_id, size)
    if isinstance(result, AcceptedMessage):
        return result
    return RejectedMessage(result.reason_code, result.reason, location, result.message_id)


class Refusal(NamedTuple):
    """A rejection before it is given a location (see ``check_message``)."""

    reason_code: Reason
    reason: str
    message_id: str | None


def check_message(
    raw: object,
    source: Source,
    received_at: datetime,
    load_id: str | None = None,
    size: int | None = None,
    serialised: bool = False,
) -> AcceptedMessage | Refusal:
    """``validate_message`` without the location: for loaders that check 100,000 messages a
    second and build a ``file:LINE`` string only for the few that are refused.

    ``serialised=True`` is for a caller that has already encoded the *whole* message as
    strict JSON and UTF-8 (the HTTP collector, which spools those bytes): every sub-object
    is then known to be storable, so the verdict is the same without building the row, and
    the returned ``AcceptedMessage`` carries the message id only (``values`` is empty).
    """
    message_id: str | None = None
    try:
        if not isinstance(raw, dict):
            raise _Reject(Reason.MALFORMED, f"expected a JSON object, got {_kind(raw)}")
        mid = raw.get("messageId")
        if mid is None or mid == "":
            try:
                message_id = derived_message_id(raw, source)
            except ValueError as e:
                raise _Reject(Reason.MALFORMED, f"message cannot be read as JSON ({e})") from None
        else:
            message_id = _id_text(mid, "messageId")
            if message_id is None:
                raise _Reject(Reason.INVALID_FIELD, "`messageId` is blank")
            if len(message_id) > MAX_MESSAGE_ID_CHARS:
                raise _Reject(
                    Reason.INVALID_FIELD,
                    f"`messageId` has {len(message_id)} characters; at most "
                    f"{MAX_MESSAGE_ID_CHARS} are allowed",
                )
        return _normalise(raw, message_id, source, received_at, load_id, size, serialised)
    except _Reject as r:
        return Refusal(r.code, r.reason, message_id)
    except RecursionError:
        return Refusal(Reason.MALFORMED, "message is nested too deeply", message_id)


def _normalise(
    raw: dict[str, Any],
    message_id: str,
    source: Source,
    received_at: datetime,
    load_id: str | None,
    size: int | None,
    serialised: bool = False,
) -> AcceptedMessage:
    if size is None:
        size = serialized_size(raw)
    if size > MAX_MESSAGE_BYTES:
        raise _Reject(
            Reason.TOO_LARGE,
            f"message is {size} bytes; the limit is {MAX_MESSAGE_BYTES} bytes (32 KB)",
        )

    get = raw.get
    mtype = get("type")
    if mtype is None:
        raise _Reject(
            Reason.MISSING_FIELD, f"message needs `type` (one of {', '.join(MESSAGE_TYPES)})"
        )
    if not isinstance(mtype, str) or mtype not in MESSAGE_TYPES:
        raise _Reject(
            Reason.UNKNOWN_TYPE,
            f"unknown message `type` {_show(mtype)}; expected one of {', '.join(MESSAGE_TYPES)}",
        )

    # Fast path first: a plain ASCII string id needs no conversion or Unicode check.
    value = get("userId")
    if type(value) is str and value.isascii() and value and not value.isspace():
        user_id: str | None = value
    else:
        user_id = _id_text(value, "userId")
    value = get("anonymousId")
    if type(value) is str and value.isascii() and value and not value.isspace():
        anonymous_id: str | None = value
    else:
        anonymous_id = _id_text(value, "anonymousId")
    if mtype == "alias" and user_id is None:
        raise _Reject(Reason.MISSING_FIELD, "alias message needs `userId` (the new id)")
    if user_id is None and anonymous_id is None:
        raise _Reject(Reason.MISSING_IDENTITY, f"{mtype} message needs `userId` or `anonymousId`")

    value = get("properties")
    props = value if type(value) is dict else _object(value, "properties")
    value = get("context")
    context = value if type(value) is dict else _object(value, "context")
    # Only identify's own `traits` describe the user (a group's describe the group); other
    # messages carry the user's traits in context.traits, which is kept in `context` whatever
    # its shape and promoted to the traits column only when it is an object.
    own_traits = _object(get("traits"), "traits") if mtype in ("identify", "group") else None
    context_traits = context.get("traits") if context is not None else None
    traits: dict[str, Any] | None
    if mtype == "identify" and own_traits is not None:
        traits = own_traits
    else:
        traits = context_traits if isinstance(context_traits, dict) else None
    group_traits = own_traits if mtype == "group" else None

    event: str | None = None
    if mtype == "track":
        value = get("event")
        if value is None or value == "":
            raise _Reject(Reason.MISSING_FIELD, "track message needs `event`")
        if not isinstance(value, str):
            raise _Reject(Reason.INVALID_FIELD, f"`event` must be a string, got {_kind(value)}")
        if not _utf8_ok(value):
            raise _Reject(Reason.INVALID_FIELD, "`event` is not valid Unicode text")
        event = value
    elif mtype in ("page", "screen"):
        value = get("name")
        if value is not None:
            if not isinstance(value, str):
                raise _Reject(Reason.INVALID_FIELD, f"`name` must be a string, got {_kind(value)}")
            if not _utf8_ok(value):
                raise _Reject(Reason.INVALID_FIELD, "`name` is not valid Unicode text")
            event = value or None
    elif mtype == "group":
        group_id = _id_text(get("groupId"), "groupId")
        if group_id is None:
            raise _Reject(Reason.MISSING_FIELD, "group message needs `groupId`")
        # events has no group_id column (yet): the group id and the group's traits ride in
        # `properties` under their Segment names rather than being dropped.
        extra: dict[str, Any] = {"groupId": group_id}
        if group_traits is not None:
            extra["traits"] = group_traits
        props = {**(props or {}), **extra}
    elif mtype == "alias":
        previous_id = _id_text(get("previousId"), "previousId")
        if previous_id is None:
            raise _Reject(Reason.MISSING_FIELD, "alias message needs `previousId`")
        props = {**(props or {}), "previousId": previous_id}

    # Times: the client's clock may be wrong, the server's is trusted. The difference between
    # when the client sent the batch (sentAt) and when it created the message is exact on
    # the client's own clock, so it is carried over onto the server's receipt time.
    value = get("timestamp")
    timestamp = None if value is None else _time(value, "timestamp")
    value = get("originalTimestamp")
    original = None if value is None else _time(value, "originalTimestamp")
    value = get("sentAt")
    sent_at = None if value is None else _time(value, "sentAt")
    value = get("receivedAt")
    received = None if value is None else _time(value, "receivedAt")
    if received is None:
        received = _utc(received_at)
    client_time = original if original is not None else timestamp
    if sent_at is not None and client_time is not None:
        try:
            timestamp = received - (sent_at - client_time)
        except OverflowError:
            raise _Reject(
                Reason.INVALID_FIELD,
                "correcting the clock skew from `sentAt` gives a time out of range",
            ) from None
    elif timestamp is None:
        timestamp = client_time if client_time is not None else received

    if serialised:  # the caller encoded the whole message: the checks below cannot refuse
        return AcceptedMessage(message_id, ())
    properties_json = _json_text(props, "properties") if props is not None else None
    traits_json = _json_text(traits, "traits") if traits is not None else None
    context_json = _json_text(context, "context") if context is not None else None

    if props is not None and mtype not in ("group", "alias"):
        revenue_value = props.get("revenue")
        if revenue_value is None:
            revenue_value = props.get("total")
        order_id = _scalar_text(props.get("order_id"))
        revenue = parse_number(revenue_value)
        category = _category(props)
        coupon = _scalar_text(props.get("coupon"))
    else:
        order_id = category = coupon = None
        revenue = None

    values = (
        message_id,
        mtype,
        event,
        user_id,
        anonymous_id,
        timestamp,
        client_time,
        sent_at,
        received,
        source.name,
        source.channel,
        source.data_class.value,
        properties_json,
        traits_json,
        context_json,
        order_id,
        revenue,
        category,
        coupon,
        load_id,
    )
    return AcceptedMessage(message_id, values, _external_ids(context, message_id))


def failure_row(
    rejected: RejectedMessage,
    *,
    source: str,
    payload: str,
    failed_at: datetime,
    load_id: str | None,
) -> dict[str, Any]:
    """The ``failed_events`` row for a rejection; ``payload`` is the raw text, cut at 64 KB.

    The cut is made on UTF-8 bytes (a partial last character dropped), and text that is not
    valid Unicode is repaired, so that any payload can be stored.
    """
    encoded = payload.encode("utf-8", "replace")
    if len(encoded) > MAX_PAYLOAD_BYTES or not payload.isascii():
        payload = encoded[:MAX_PAYLOAD_BYTES].decode("utf-8", "ignore")
    return {
        "failure_id": failure_id(source, rejected.location, payload),
        "source": source,
        "reason_code": rejected.reason_code.value,
        "reason": rejected.reason,
        "location": rejected.location,
        "message_id": rejected.message_id,
        "payload": payload,
        "failed_at": failed_at,
        "load_id": load_id,
    }
