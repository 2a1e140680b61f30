"""One HTTP request's intake, independent of the web framework: the wire contract's rules.

``Collector.prepare`` turns a request (route, headers, raw body, peer address) into an
``Outcome``: the HTTP status and JSON body to answer, and the spool record that must be
durable before that answer is sent. Keeping this apart from the ASGI app means the contract
(``WIRE-CONTRACT.md``) is written once, and tested without timing or sockets in the way.

Every message is judged by ``check_message`` — the same gate files and tables pass — after
the collector has done what only a collector can: merged the batch's ``context``,
``integrations`` and ``sentAt`` into each message, stamped ``receivedAt`` with the server's
clock (so the gate's clock-skew correction uses a trusted receipt time) and filled
``context.ip`` from the connection. The message is then serialised once; those exact bytes
are both what the 32 KB limit is measured on and what the spool keeps, and the loader
re-validates them to the same result.

Accounting per request: ``received = accepted + failed + duplicate``. ``duplicate`` counts
repeats of a messageId inside the request; a repeat of an earlier request's message is
accepted again (it is durably kept) and recognised by the loader, which writes nothing for
it — the warehouse holds each messageId once, forever.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import itertools
import json
import secrets
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import msgspec

from closedloop.collect.messages import (
    MAX_MESSAGE_BYTES,
    AcceptedMessage,
    Reason,
    Refusal,
    check_message,
    derived_message_id,
    encode_json,
)
from closedloop.collect.spool import encode_record
from closedloop.collect.tracking_plan import Mode, TrackingPlan
from closedloop.core.definitions import DataClass, Source

MAX_REQUEST_BYTES: Final = 500 * 1024
MAX_BATCH_MESSAGES: Final = 2500
MAX_REPORTED_ERRORS: Final = 100
BATCH_ROUTES: Final = frozenset({"batch", "b", "import", "beacon"})
SINGLE_ROUTES: Final = {
    "identify": "identify",
    "track": "track",
    "page": "page",
    "screen": "screen",
    "group": "group",
    "alias": "alias",
    "i": "identify",
    "t": "track",
    "p": "page",
    "s": "screen",
    "g": "group",
    "a": "alias",
}
#: The source recorded on input whose write key names no source (kept, never loaded).
UNKNOWN_SOURCE: Final = Source.model_construct(
    name="(unknown)",
    channel="http",
    data_class=DataClass.FIRST_PARTY,
    write_key="",
    description="requests whose write key names no source",
)


_decode = msgspec.json.Decoder().decode
_encode_message = msgspec.json.Encoder().encode


class RequestError(Exception):
    """A request refused as a whole: the status and a sentence saying what was wrong."""

    def __init__(self, status: int, code: Reason, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.code = code
        self.reason = reason


@dataclass
class Outcome:
    """What to answer, and the record to make durable before answering (if any)."""

    status: int
    body: dict[str, Any]
    record: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _utc_text(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _safe_text(value: object) -> str:
    """Any parsed value as text for a failure's payload, whatever it holds."""
    try:
        return encode_json(value)
    except (ValueError, TypeError):
        pass
    try:
        return json.dumps(value, default=repr, ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):
        return repr(value)[:MAX_MESSAGE_BYTES]


def basic_user(authorization: str | None) -> str | None:
    """The user of an HTTP Basic header (the write key); the password is ignored."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    user, _, _password = decoded.partition(":")
    return user or None


def decode_body(raw: bytes, content_encoding: str | None) -> bytes:
    """The request body, gunzipped when so marked, refused past the request limit."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        body = raw
    elif encoding in ("gzip", "x-gzip", "deflate"):
        wbits = 47 if encoding != "deflate" else 15  # 47: gzip or zlib header, detected
        inflater = zlib.decompressobj(wbits)
        try:
            body = inflater.decompress(raw, MAX_REQUEST_BYTES + 1)
        except zlib.error as e:
            raise RequestError(
                400, Reason.MALFORMED, f"body is marked {encoding} but cannot be inflated: {e}"
            ) from None
        if len(body) <= MAX_REQUEST_BYTES and not inflater.eof:
            raise RequestError(400, Reason.MALFORMED, f"{encoding} body is truncated")
    else:
        raise RequestError(
            400, Reason.MALFORMED, f"unsupported Content-Encoding {encoding!r}; send gzip or none"
        )
    if len(body) > MAX_REQUEST_BYTES:
        raise RequestError(
            413,
            Reason.TOO_LARGE,
            f"request body is over {MAX_REQUEST_BYTES:,} bytes (500 KB) once decompressed",
        )
    return body


def parse_json(body: bytes) -> object:
    """The JSON value of the body, or a 400 saying why it is not one.

    msgspec decodes about twice as fast as the standard library and is strict where the
    standard library is lenient: NaN, Infinity and lone surrogate escapes are not JSON, and
    a body holding them is refused whole. Everything it returns encodes back to UTF-8 JSON.
    """
    if body.startswith(b"\xef\xbb\xbf"):
        body = body[3:]
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError(
            400, Reason.MALFORMED, f"body is not UTF-8 text (bad byte at {e.start})"
        ) from None
    try:
        return _decode(body)
    except RecursionError:
        raise RequestError(400, Reason.MALFORMED, "body is nested too deeply") from None
    except (msgspec.MsgspecError, ValueError) as e:
        raise RequestError(400, Reason.MALFORMED, f"body is not JSON: {e}") from None


class Collector:
    """The collector's rules over a project's sources, for one worker process."""

    def __init__(self, sources: list[Source], plans: dict[str, TrackingPlan] | None = None) -> None:
        self.by_key = {s.write_key: s for s in sources}
        self.plans = plans or {}
        self._token = secrets.token_hex(4)
        self._counter = itertools.count(1)

    def source_for(self, *keys: object) -> Source | None:
        """The source of the first candidate key that names one."""
        for key in keys:
            if isinstance(key, str) and key in self.by_key:
                return self.by_key[key]
        return None

    def request_id(self) -> str:
        return f"{self._token}-{next(self._counter)}"

    def refuse(
        self,
        error: RequestError,
        source: Source | None,
        payload: str,
        request_id: str,
    ) -> Outcome:
        """A whole request refused: answer 4xx, and keep what was sent as one failure."""
        src = source or UNKNOWN_SOURCE
        failure = [error.code.value, error.reason, f"http:{request_id}", None, payload]
        record = encode_record({"s": src.name, "f": [failure]}, [])
        body = {
            "success": False,
            "error": error.reason,
            "reason_code": error.code.value,
            "received": 0,
            "accepted": 0,
            "failed": 0,
            "duplicate": 0,
            "kept_in_failed_events": 1,  # the request itself, with this reason
        }
        return Outcome(error.status, body, record)

    def prepare(
        self,
        route: str,
        raw: bytes,
        headers: Mapping[str, str],
        query_key: str | None,
        client_ip: str | None,
        now: datetime,
    ) -> Outcome:
        """Judge one request; never raises for anything a client can send."""
        request_id = self.request_id()
        auth_key = basic_user(headers.get("authorization"))
        try:
            body = decode_body(raw, headers.get("content-encoding"))
        except RequestError as e:
            source = self.source_for(auth_key, query_key)
            return self.refuse(
                e, source, raw[:MAX_MESSAGE_BYTES].decode("utf-8", "replace"), request_id
            )
        try:
            parsed = parse_json(body)
        except RequestError as e:
            source = self.source_for(auth_key, query_key)
            return self.refuse(e, source, body.decode("utf-8", "replace"), request_id)
        body_key = parsed.get("writeKey") if isinstance(parsed, dict) else None
        source = self.source_for(auth_key, body_key, query_key)
        if source is None:
            given = any(isinstance(k, str) and k for k in (auth_key, body_key, query_key))
            reason = (
                "write key names no source of this project"
                if given
                else "no write key: send it as HTTP Basic user, or as `writeKey` in the body"
            )
            error = RequestError(401, Reason.BAD_WRITE_KEY, reason)
            kept = parsed
            if isinstance(parsed, dict) and route in SINGLE_ROUTES:
                # The route names the type; keep it so `failed replay` can resend the message.
                kept = {**parsed, "type": SINGLE_ROUTES[route]}
            return self.refuse(error, None, _safe_text(kept), request_id)
        try:
            messages, batch = self._messages(route, parsed)
        except RequestError as e:
            return self.refuse(e, source, _safe_text(parsed), request_id)
        return self._judge(route, messages, batch, source, client_ip, now, request_id)

    def _messages(self, route: str, parsed: object) -> tuple[list[Any], dict[str, Any]]:
        """The messages of a request and its batch-level fields (context, integrations, sentAt)."""
        if not isinstance(parsed, dict):
            kind = "an array" if isinstance(parsed, list) else type(parsed).__name__
            raise RequestError(400, Reason.MALFORMED, f"body must be a JSON object, got {kind}")
        if route not in BATCH_ROUTES:
            return [parsed], {}
        batch = parsed.get("batch")
        if not isinstance(batch, list):
            raise RequestError(
                400, Reason.MALFORMED, "a batch body needs `batch`: an array of messages"
            )
        if len(batch) > MAX_BATCH_MESSAGES:
            raise RequestError(
                413,
                Reason.TOO_LARGE,
                f"batch holds {len(batch):,} messages; at most {MAX_BATCH_MESSAGES:,} are allowed",
            )
        shared: dict[str, Any] = {}
        for key in ("context", "integrations"):
            value = parsed.get(key)
            if value is None:
                continue
            if not isinstance(value, dict):
                raise RequestError(400, Reason.MALFORMED, f"batch-level `{key}` must be an object")
            shared[key] = value
        sent_at = parsed.get("sentAt")
        if sent_at is not None:
            shared["sentAt"] = sent_at
        return batch, shared

    def _judge(
        self,
        route: str,
        messages: list[Any],
        shared: dict[str, Any],
        source: Source,
        client_ip: str | None,
        now: datetime,
        request_id: str,
    ) -> Outcome:
        received_at = _utc_text(now)
        forced_type = SINGLE_ROUTES.get(route)
        batch_context = shared.get("context")
        batch_integrations = shared.get("integrations")
        batch_sent_at = shared.get("sentAt")
        lines: list[bytes] = []
        failures: list[list[Any]] = []
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        duplicate = 0
        quarantined = 0
        plan = self.plans.get(source.name)
        single_status = 200
        for index, msg in enumerate(messages):
            location = f"http:{request_id}#{index}"
            if not isinstance(msg, dict):
                reason = "a message must be a JSON object"
                failures.append([Reason.MALFORMED.value, reason, location, None, _safe_text(msg)])
                errors.append({"index": index, "reason_code": "malformed", "reason": reason})
                single_status = 400
                continue
            m = dict(msg)
            m.pop("writeKey", None)
            if m.get("messageId") in (None, ""):
                # Derived from what the client sent, before the server adds receivedAt and
                # context.ip: a retry of a message without an id gets the same id.
                # (An integer too long to print, nesting too deep: the gate refuses those.)
                with contextlib.suppress(ValueError, RecursionError):
                    m["messageId"] = derived_message_id(
                        m if forced_type is None else {**m, "type": forced_type}, source
                    )
            if forced_type is not None:
                m["type"] = forced_type
            if batch_sent_at is not None and m.get("sentAt") is None:
                m["sentAt"] = batch_sent_at
            m["receivedAt"] = received_at
            context = m.get("context")
            if batch_context is not None and (context is None or isinstance(context, dict)):
                context = {**batch_context, **(context or {})}
            if context is None:
                context = {}
            if isinstance(context, dict) and client_ip and "ip" not in context:
                context = {**context, "ip": client_ip}
            m["context"] = context
            integrations = m.get("integrations")
            if batch_integrations is not None and (
                integrations is None or isinstance(integrations, dict)
            ):
                m["integrations"] = {**batch_integrations, **(integrations or {})}
            line: bytes | None = None
            try:
                line = _encode_message(m)
                result = check_message(m, source, now, None, len(line), serialised=True)
            except (msgspec.MsgspecError, ValueError, TypeError, UnicodeEncodeError):
                result = check_message(m, source, now, None, None)
                if isinstance(result, AcceptedMessage):  # valid fields, unstorable extras
                    result = Refusal(
                        Reason.MALFORMED,
                        "message holds a value JSON cannot carry (NaN, Infinity or broken "
                        "Unicode) outside the fields closedloop reads",
                        result.message_id,
                    )
            except RecursionError:
                result = Refusal(Reason.MALFORMED, "message is nested too deeply", None)
            held = False
            if plan is not None and isinstance(result, AcceptedMessage) and line is not None:
                broken = plan.violation(m)
                if broken is not None and plan.mode is not Mode.ALLOW:
                    result = Refusal(broken[0], broken[1], result.message_id)
                    held = plan.mode is Mode.QUARANTINE
            if isinstance(result, AcceptedMessage) and line is not None:
                mid = result.message_id
                if mid in seen:
                    duplicate += 1
                    continue
                seen.add(mid)
                lines.append(line)
                continue
            assert not isinstance(result, AcceptedMessage)  # noqa: S101 - narrowed for mypy
            code = result.reason_code
            kept = msg if forced_type is None else {**msg, "type": forced_type}
            # Kept whole in either plan mode, so `failed replay` can send it again once the
            # plan or the sender is fixed.
            failures.append(
                [code.value, result.reason, location, result.message_id, _safe_text(kept)]
            )
            if held:
                quarantined += 1
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(
                    {
                        "index": index,
                        "message_id": result.message_id,
                        "reason_code": code.value,
                        "reason": result.reason,
                    }
                )
            single_status = 413 if code is Reason.TOO_LARGE else 400
        received = len(messages)
        body: dict[str, Any] = {
            "success": True,
            "received": received,
            "accepted": len(lines),
            "failed": len(failures),
            "duplicate": duplicate,
        }
        if errors:
            body["errors"] = errors
        if quarantined:
            body["quarantined"] = quarantined
        status = 200
        # A single message refused answers 4xx — unless a quarantine plan holds it: then it
        # is kept for repair on the server's side and the sender has nothing to do or retry.
        if forced_type is not None and len(failures) > quarantined:
            status = single_status
            body["success"] = False
            body["error"] = errors[0]["reason"]
            body["reason_code"] = errors[0]["reason_code"]
        record = None
        if lines or failures:
            record = encode_record({"s": source.name, "f": failures}, lines)
        return Outcome(status, body, record)
