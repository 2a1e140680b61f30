"""Provider callbacks over HTTP: delivery reports become feedback events, durably, once each.

SMS gateways, WeChat template-message services, push providers and e-mail services report
what became of a message (delivered, opened, clicked, replied, bounced, unsubscribed) by
calling a URL. ``POST /v1/callbacks/SOURCE`` is that URL: each report becomes a Segment
``track`` event named as ``closedloop campaign feedback`` names it (``Message Opened`` …,
``Unsubscribed`` for an opt-out; see ``core.feedback_events``), so the no-response rule,
triggers and measurement read it unchanged, and it takes the path every event takes — the
fsynced spool, then the loader's messageId dedup.

**What a report holds.** One JSON object, an array of them, or ``{"callbacks": [...]}``.
Two forms are read, field by field, so a provider needs no adapter:

* closedloop's own: what the webhook channel sent (``message_id``, ``delivery_id``,
  ``campaign``, ``variant``, ``channel``, ``customer_id``) echoed back with ``event`` — the
  same shape as a line of a ``campaign feedback`` file;
* a generic one: ``message_id`` (or ``messageId``), ``status``, ``timestamp`` (ISO 8601 or
  Unix seconds/milliseconds; also ``time``/``occurred_at``), ``id`` (the provider's event
  id; also ``event_id``), ``recipient``/``to``, ``customer_id``, ``campaign``, ``variant``,
  ``step``, and ``url`` (a click), ``text`` (a reply), ``reason`` (a bounce).

**Who it is about.** The collector never reads the warehouse, so it cannot look the person
up. Every outcome event of a message carries the message's own anonymous id
(``closedloop:MESSAGE_ID``); the attempt event activate records when it hands the message
over also names the person (member id or contact), so identity resolution ties that
anonymous id to them and the callback lands on the right customer. The recipient's
address is not copied into the event: it would be a second identifier that could join
people a staff split had kept apart.

**Exactly once.** A report's messageId is derived from our message id and the provider's
event id (else the status and time, else the whole report), so a provider retrying a
callback — or the same report later replayed from a file — is stored once.

**Authenticated.** A source with ``callback_secret_env`` accepts only signed requests: the
scheme activate's webhooks use (``X-Closedloop-Timestamp`` and ``X-Closedloop-Signature:
sha256=HEX`` of ``"{timestamp}.{body}"``), or core's ``t=…,v1=…`` form; a stale timestamp
(over five minutes) is refused, so a captured request cannot be replayed later. A source
without a secret accepts its write key (HTTP Basic user, or ``?writeKey=``) — write keys of
browser sources are public, which is why a provider's source should have a secret.

A refused request or report is kept in failed events with a typed reason, as on every
other route; the answer carries the same counts (received = accepted + failed + duplicate).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from closedloop.collect.ingest import (
    MAX_BATCH_MESSAGES,
    MAX_REPORTED_ERRORS,
    Collector,
    Outcome,
    RequestError,
    basic_user,
    decode_body,
    parse_json,
)
from closedloop.collect.messages import AcceptedMessage, Reason, check_message, encode_json
from closedloop.collect.spool import encode_record
from closedloop.core.definitions import Source
from closedloop.core.feedback_events import (
    CALLBACK_EVENT,
    callback_message_id,
    message_anonymous_id,
)
from closedloop.core.signed_post import verify as verify_core_signature

log = logging.getLogger(__name__)

ROUTE_PREFIX: Final = "callback:"  # the collector's route key: "callback:SOURCE"
SIGNATURE_HEADER: Final = "x-closedloop-signature"
TIMESTAMP_HEADER: Final = "x-closedloop-timestamp"
TOLERANCE_S: Final = 300
MAX_ID_CHARS: Final = 200
MAX_TEXT_CHARS: Final = 2000

_MESSAGE_ID_KEYS: Final = ("message_id", "messageId", "closedloop_message_id")
_STATUS_KEYS: Final = ("status", "event")
_TIME_KEYS: Final = ("timestamp", "time", "occurred_at")
_PROVIDER_ID_KEYS: Final = ("id", "event_id", "provider_event_id")
_ID_KEYS: Final = ("campaign", "variant", "step", "delivery_id", "customer_id", "channel")
_TEXT_KEYS: Final = {"url": MAX_TEXT_CHARS, "reason": MAX_TEXT_CHARS, "text": MAX_TEXT_CHARS}
_encode = msgspec.json.Encoder().encode

STATUSES: Final = sorted(CALLBACK_EVENT)

_CALLBACK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["message_id", "status"],
    "description": "One provider report about a message closedloop sent.",
    "properties": {
        "message_id": {"type": "string", "description": "closedloop's id, as sent"},
        "status": {"type": "string", "enum": STATUSES, "description": "or `event`"},
        "timestamp": {
            "oneOf": [{"type": "string", "format": "date-time"}, {"type": "number"}],
            "description": "when it happened (ISO 8601, Unix seconds or milliseconds)",
        },
        "id": {"type": "string", "description": "the provider's event id (dedup key)"},
        "recipient": {"type": "string", "description": "accepted, not stored"},
        "customer_id": {"type": "string"},
        "campaign": {"type": "string"},
        "variant": {"type": "string"},
        "step": {"type": "string"},
        "delivery_id": {"type": "string"},
        "channel": {"type": "string"},
        "url": {"type": "string", "description": "the link clicked"},
        "text": {"type": "string", "description": "a reply's text"},
        "reason": {"type": "string", "description": "why it bounced"},
    },
    "additionalProperties": True,
}
_ANSWER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "success": {"type": "boolean"},
        "received": {"type": "integer"},
        "accepted": {"type": "integer", "description": "durably kept"},
        "failed": {"type": "integer", "description": "kept in failed events with a reason"},
        "duplicate": {"type": "integer", "description": "repeated in this request"},
        "errors": {"type": "array", "items": {"type": "object"}},
    },
}
OPENAPI_EXTRA: Final[dict[str, Any]] = {
    "parameters": [
        {
            "name": "source",
            "in": "path",
            "required": True,
            "schema": {"type": "string"},
            "description": "the source (provider) the reports are recorded under",
        },
        {
            "name": "X-Closedloop-Signature",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "`sha256=HEX` (with X-Closedloop-Timestamp) or `t=UNIX,v1=HEX`: "
            "HMAC-SHA256 of `{timestamp}.{body}` with the source's callback secret",
        },
        {
            "name": "X-Closedloop-Timestamp",
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
        },
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        _CALLBACK_SCHEMA,
                        {"type": "array", "items": _CALLBACK_SCHEMA},
                        {
                            "type": "object",
                            "required": ["callbacks"],
                            "properties": {
                                "callbacks": {
                                    "type": "array",
                                    "items": _CALLBACK_SCHEMA,
                                    "maxItems": MAX_BATCH_MESSAGES,
                                }
                            },
                        },
                    ]
                }
            }
        },
    },
    "responses": {
        "200": {
            "description": "durably accepted (see the counts)",
            "content": {"application/json": {"schema": _ANSWER}},
        },
        "400": {"description": "a single report that cannot be read, or a malformed body"},
        "401": {"description": "no such source, a wrong write key or a bad signature"},
        "413": {"description": "over a size limit"},
        "429": {"description": "under pressure: retry after Retry-After seconds"},
        "503": {"description": "the spool cannot write: retry after Retry-After seconds"},
    },
}


class _Bad(Exception):
    """One report that cannot become an event: the typed reason and a sentence."""

    def __init__(self, code: Reason, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _utc_text(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _first(report: Mapping[str, Any], keys: Sequence[str]) -> tuple[str, Any]:
    for k in keys:
        if report.get(k) is not None:
            return k, report[k]
    return keys[0], None


def _scalar_text(key: str, value: Any, limit: int = MAX_ID_CHARS) -> str:
    """An id or text field as a string; numbers are ids too, anything else is refused."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _Bad(Reason.INVALID_FIELD, f"`{key}` must be a string, got {type(value).__name__}")
    text = str(value)
    if len(text) > limit:
        raise _Bad(Reason.INVALID_FIELD, f"`{key}` is over {limit} characters")
    return text


def _when(key: str, value: Any) -> datetime:
    """A report's time: ISO 8601 (UTC when it names no zone), Unix seconds or milliseconds."""
    if isinstance(value, str):
        try:
            t = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise _Bad(
                Reason.INVALID_FIELD, f"`{key}` {value[:40]!r} is not an ISO 8601 time"
            ) from None
        return t if t.tzinfo else t.replace(tzinfo=UTC)
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = value / 1000 if abs(value) >= 1e11 else value  # milliseconds past 5138 AD
        try:
            return datetime.fromtimestamp(seconds, UTC)
        except (ValueError, OverflowError, OSError):
            raise _Bad(Reason.INVALID_FIELD, f"`{key}` {value!r} is not a Unix time") from None
    raise _Bad(Reason.INVALID_FIELD, f"`{key}` must be a time, got {type(value).__name__}")


def callback_message(report: object, received_at: datetime) -> dict[str, Any]:
    """One report as a Segment ``track`` message (raises ``_Bad`` saying why it cannot be).

    The messageId and the timestamp follow ``campaign feedback``: a report arriving both
    ways is the same event.
    """
    if not isinstance(report, dict):
        kind = "an array" if isinstance(report, list) else type(report).__name__
        raise _Bad(Reason.MALFORMED, f"a callback must be a JSON object, got {kind}")
    key, raw_id = _first(report, _MESSAGE_ID_KEYS)
    if raw_id is None or raw_id == "":
        raise _Bad(Reason.MISSING_FIELD, "a callback needs `message_id`: the id closedloop sent")
    message_id = _scalar_text(key, raw_id)
    skey, raw_status = _first(report, _STATUS_KEYS)
    if raw_status is None:
        raise _Bad(
            Reason.MISSING_FIELD,
            f"a callback needs `status` (one of {', '.join(STATUSES)})",
        )
    status = _scalar_text(skey, raw_status).strip().lower()
    event = CALLBACK_EVENT.get(status)
    if event is None:
        raise _Bad(
            Reason.INVALID_FIELD,
            f"`{skey}` {str(raw_status)[:40]!r} is not a status closedloop knows "
            f"(known: {', '.join(STATUSES)})",
        )
    tkey, raw_time = _first(report, _TIME_KEYS)
    at = received_at if raw_time is None else _when(tkey, raw_time)
    pkey, raw_pid = _first(report, _PROVIDER_ID_KEYS)
    provider_id = None if raw_pid is None else _scalar_text(pkey, raw_pid)
    if provider_id:
        dedup = provider_id
    elif raw_time is not None:
        dedup = f"{event}|{at.isoformat()}"
    else:  # neither id nor time: the report itself, so a retry of it is still one event
        dedup = "report|" + json.dumps(report, sort_keys=True, default=str)
    props: dict[str, Any] = {"message_id": message_id}
    for k in _ID_KEYS:
        if report.get(k) is not None:
            props[k] = _scalar_text(k, report[k])
    if provider_id:
        props["provider_event_id"] = provider_id
    for k, limit in _TEXT_KEYS.items():
        v = report.get(k)
        if v is not None:
            if not isinstance(v, str):
                raise _Bad(Reason.INVALID_FIELD, f"`{k}` must be a string")
            props[k] = v[:limit]
    return {
        "type": "track",
        "event": event,
        "messageId": callback_message_id(message_id, dedup),
        "anonymousId": message_anonymous_id(message_id),
        "timestamp": _utc_text(at),
        "properties": props,
        "context": {"library": {"name": "closedloop-callbacks"}},
    }


def signature_ok(
    secret: bytes, headers: Mapping[str, str], body: bytes, now: float | None = None
) -> bool:
    """Whether ``body`` is signed with ``secret`` within the tolerance, in either scheme."""
    header = (headers.get(SIGNATURE_HEADER) or "").strip()
    now = time.time() if now is None else now
    if header.startswith("sha256="):
        stamp = (headers.get(TIMESTAMP_HEADER) or "").strip()
        if not stamp.isdigit() or abs(now - int(stamp)) > TOLERANCE_S:
            return False
        mac = hmac.new(secret, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        return hmac.compare_digest("sha256=" + mac, header)
    if "v1=" in header:
        return verify_core_signature(secret, header, body, now=now, tolerance_s=TOLERANCE_S)
    return False


def secrets_from_env(sources: Sequence[Source]) -> dict[str, bytes]:
    """Each source's callback secret from the environment variable it names (if set)."""
    out: dict[str, bytes] = {}
    for s in sources:
        if s.callback_secret_env:
            value = os.environ.get(s.callback_secret_env)
            if value:
                out[s.name] = value.encode()
            else:
                log.warning(
                    "source %s: %s is not set; its callbacks are refused until it is",
                    s.name,
                    s.callback_secret_env,
                )
    return out


class CallbackIntake:
    """The callback route's rules over a project's sources, for one worker process."""

    def __init__(
        self,
        collector: Collector,
        sources: Sequence[Source],
        secrets: Mapping[str, bytes] | None = None,
    ) -> None:
        self.collector = collector
        self.by_name = {s.name: s for s in sources}
        self.secrets = dict(secrets_from_env(sources) if secrets is None else secrets)

    def _authenticate(
        self, name: str, raw: bytes, headers: Mapping[str, str], query_key: str | None
    ) -> Source:
        source = self.by_name.get(name)
        if source is None:
            raise RequestError(401, Reason.BAD_WRITE_KEY, f"no source named {name!r}")
        if source.callback_secret_env:
            secret = self.secrets.get(source.name)
            if secret is None:
                raise RequestError(
                    401,
                    Reason.BAD_WRITE_KEY,
                    f"source {name}: the collector has no callback secret "
                    f"({source.callback_secret_env} is not set)",
                )
            if not signature_ok(secret, headers, raw):
                has = bool(headers.get(SIGNATURE_HEADER))
                raise RequestError(
                    401,
                    Reason.BAD_WRITE_KEY,
                    "signature does not verify (wrong secret, altered body or a timestamp "
                    "over five minutes old)"
                    if has
                    else f"source {name} needs signed callbacks: send X-Closedloop-Signature",
                )
            return source
        given = basic_user(headers.get("authorization")) or query_key
        if given != source.write_key:
            raise RequestError(
                401,
                Reason.BAD_WRITE_KEY,
                f"the write key of source {name} is needed (HTTP Basic user or ?writeKey=)"
                if not given
                else f"write key is not that of source {name}",
            )
        return source

    def prepare(
        self,
        name: str,
        raw: bytes,
        headers: Mapping[str, str],
        query_key: str | None,
        client_ip: str | None,
        now: datetime,
    ) -> Outcome:
        """Judge one callback request; never raises for anything a client can send."""
        request_id = self.collector.request_id()
        text = raw.decode("utf-8", "replace")
        try:
            source = self._authenticate(name, raw, headers, query_key)
        except RequestError as e:
            return self.collector.refuse(e, None, text, request_id)
        try:
            parsed = parse_json(decode_body(raw, headers.get("content-encoding")))
            reports, single = self._reports(parsed)
        except RequestError as e:
            return self.collector.refuse(e, source, text, request_id)
        return self._judge(reports, single, source, client_ip, now, request_id)

    @staticmethod
    def _reports(parsed: object) -> tuple[list[Any], bool]:
        if isinstance(parsed, list):
            reports, single = parsed, False
        elif isinstance(parsed, dict) and isinstance(parsed.get("callbacks"), list):
            reports, single = parsed["callbacks"], False
        elif isinstance(parsed, dict):
            reports, single = [parsed], True
        else:
            raise RequestError(
                400,
                Reason.MALFORMED,
                f"body must be a callback object or an array, got {type(parsed).__name__}",
            )
        if len(reports) > MAX_BATCH_MESSAGES:
            raise RequestError(
                413,
                Reason.TOO_LARGE,
                f"{len(reports):,} callbacks in one request; at most {MAX_BATCH_MESSAGES:,}",
            )
        return reports, single

    def _judge(
        self,
        reports: list[Any],
        single: bool,
        source: Source,
        client_ip: str | None,
        now: datetime,
        request_id: str,
    ) -> Outcome:
        received_at = _utc_text(now)
        lines: list[bytes] = []
        failures: list[list[Any]] = []
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        duplicate = 0
        status = 200
        for index, report in enumerate(reports):
            location = f"http:{request_id}#{index}"
            mid: str | None = None
            try:
                m, event_id = _event(report, source, now, received_at, client_ip)
                mid = event_id
                line = _encode(m)
                result = check_message(m, source, now, None, len(line), serialised=True)
                if not isinstance(result, AcceptedMessage):
                    raise _Bad(result.reason_code, result.reason)
            except _Bad as e:
                failures.append([e.code.value, e.reason, location, mid, _payload(report)])
                if len(errors) < MAX_REPORTED_ERRORS:
                    errors.append(
                        {"index": index, "message_id": mid, "reason_code": e.code.value}
                        | {"reason": e.reason}
                    )
                status = 413 if e.code is Reason.TOO_LARGE else 400
                continue
            if event_id in seen:
                duplicate += 1
                continue
            seen.add(event_id)
            lines.append(line)
        body: dict[str, Any] = {
            "success": True,
            "received": len(reports),
            "accepted": len(lines),
            "failed": len(failures),
            "duplicate": duplicate,
        }
        if errors:
            body["errors"] = errors
        answer = 200
        if single and failures:  # one report that cannot be read: say so, as /v1/track does
            answer = status
            body["success"] = False
            body["error"] = errors[0]["reason"]
            body["reason_code"] = errors[0]["reason_code"]
        record = encode_record({"s": source.name, "f": failures}, lines) if reports else None
        return Outcome(answer, body, record)


def _event(
    report: object, source: Source, now: datetime, received_at: str, client_ip: str | None
) -> tuple[dict[str, Any], str]:
    """The track message of one report and its messageId, stamped as the collector stamps."""
    try:
        m = callback_message(report, now)
    except (ValueError, TypeError, RecursionError) as e:  # e.g. a report nested too deep
        raise _Bad(Reason.MALFORMED, f"callback cannot be read ({type(e).__name__})") from None
    m["receivedAt"] = received_at
    if client_ip:
        m["context"]["ip"] = client_ip
    return m, str(m["messageId"])


def _payload(value: object) -> str:
    try:
        return encode_json(value)
    except (ValueError, TypeError, RecursionError):
        return repr(value)[:MAX_TEXT_CHARS]
