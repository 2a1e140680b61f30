"""The HTTP collector: the Segment/RudderStack wire contract as an ASGI app.

Handlers take the raw ``Request`` rather than pydantic models: the body is decoded once and
every message goes through the shared gate (``closedloop.collect.ingest``); validating the
same message twice, once by a framework model and once by the gate, would cost half the
throughput and let the two disagree. FastAPI is used for routing and for the OpenAPI
document (``/openapi.json``, ``/docs``), whose request schemas are declared by hand.

A request is answered 200 only after its spool record is fsynced (``SpoolWriter``); a
spool that cannot write gives 503, a backlog the loader has not caught up with gives 429,
both with ``Retry-After`` — stock clients retry those, and the messageId dedup downstream
makes the retries harmless.

Configuration for worker processes started by uvicorn comes from the environment
(``CLOSEDLOOP_PROJECT``, ``CLOSEDLOOP_SPOOL``, ``CLOSEDLOOP_MAX_BACKLOG``) through
``app_from_env``, since uvicorn imports the app factory anew in every worker.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.responses import Response

from closedloop.collect.callbacks import OPENAPI_EXTRA as CALLBACK_OPENAPI
from closedloop.collect.callbacks import ROUTE_PREFIX as CALLBACK_ROUTE
from closedloop.collect.callbacks import CallbackIntake
from closedloop.collect.ingest import (
    MAX_BATCH_MESSAGES,
    MAX_REQUEST_BYTES,
    SINGLE_ROUTES,
    Collector,
    Outcome,
    RequestError,
)
from closedloop.collect.messages import MAX_MESSAGE_BYTES, Reason
from closedloop.collect.spool import SpoolUnavailable, SpoolWriter, backlog_bytes
from closedloop.collect.tracking_plan import TrackingPlan, load_tracking_plans
from closedloop.core.definitions import Source

DEFAULT_MAX_BACKLOG: Final = 2 * 1024**3  # spool bytes not yet loaded before answering 429
DEFAULT_MAX_IN_FLIGHT: Final = 1024  # requests one worker holds at once before answering 429
DRAIN_LIMIT: Final = 16 * 1024 * 1024  # an oversize body is read and dropped up to here
RETRY_AFTER_BUSY: Final = "1"
RETRY_AFTER_DOWN: Final = "5"
_CORS_BASE: Final = {
    "access-control-allow-methods": "GET, POST, OPTIONS",
    "access-control-max-age": "86400",
}

_MESSAGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "A Segment message (see the Segment spec). Needs userId or anonymousId.",
    "properties": {
        "type": {"type": "string", "enum": sorted(set(SINGLE_ROUTES.values()))},
        "messageId": {"type": "string", "maxLength": 100},
        "userId": {"type": "string"},
        "anonymousId": {"type": "string"},
        "event": {"type": "string", "description": "track only: required"},
        "name": {"type": "string"},
        "groupId": {"type": "string", "description": "group only: required"},
        "previousId": {"type": "string", "description": "alias only: required"},
        "properties": {"type": "object"},
        "traits": {"type": "object"},
        "context": {"type": "object"},
        "integrations": {"type": "object"},
        "timestamp": {"type": "string", "format": "date-time"},
        "originalTimestamp": {"type": "string", "format": "date-time"},
        "sentAt": {"type": "string", "format": "date-time"},
        "writeKey": {"type": "string"},
    },
    "additionalProperties": True,
}
_BATCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["batch"],
    "properties": {
        "batch": {"type": "array", "items": _MESSAGE_SCHEMA, "maxItems": MAX_BATCH_MESSAGES},
        "context": {"type": "object", "description": "merged into every message's context"},
        "integrations": {"type": "object"},
        "sentAt": {"type": "string", "format": "date-time"},
        "writeKey": {"type": "string"},
    },
}
_ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "success": {"type": "boolean"},
        "received": {"type": "integer"},
        "accepted": {"type": "integer", "description": "durably kept"},
        "failed": {"type": "integer", "description": "kept in failed events with a reason"},
        "duplicate": {"type": "integer", "description": "messageId repeated in this request"},
        "errors": {"type": "array", "items": {"type": "object"}},
        "error": {"type": "string"},
        "reason_code": {"type": "string"},
    },
}


def _openapi_extra(schema: dict[str, Any]) -> dict[str, Any]:
    content = {"schema": schema}
    answers = {"content": {"application/json": {"schema": _ANSWER_SCHEMA}}}
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": content, "text/plain": content},
        },
        "responses": {
            "200": {"description": "durably accepted (see the counts)", **answers},
            "400": {"description": "malformed request or message", **answers},
            "401": {"description": "the write key names no source", **answers},
            "413": {"description": "over a size limit", **answers},
            "429": {"description": "under pressure: retry after Retry-After seconds"},
            "503": {"description": "the spool cannot write: retry after Retry-After seconds"},
        },
        "security": [{"writeKeyBasic": []}, {}],
    }


def _cors(request: Request) -> dict[str, str]:
    origin = request.headers.get("origin")
    headers = dict(_CORS_BASE)
    if origin:
        headers["access-control-allow-origin"] = origin
        headers["access-control-allow-credentials"] = "true"
        headers["vary"] = "Origin"
    else:
        headers["access-control-allow-origin"] = "*"
    requested = request.headers.get("access-control-request-headers")
    headers["access-control-allow-headers"] = (
        requested or "Content-Type, Authorization, Content-Encoding"
    )
    return headers


def _json(status: int, body: dict[str, Any], headers: dict[str, str]) -> Response:
    if "error" in body:
        # Segment's and RudderStack's libraries read `code` and `message` from an error
        # answer (and fail on a KeyError without them).
        body.setdefault("code", body.get("reason_code", "error"))
        body.setdefault("message", body["error"])
    return Response(
        json.dumps(body, separators=(",", ":")).encode(),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


class _Pressure:
    """The spool backlog, measured at most every ``every`` seconds (a folder listing)."""

    def __init__(self, folder: Path, limit: int, every: float = 0.5) -> None:
        self.folder, self.limit, self.every = folder, limit, every
        self._at = 0.0
        self._busy = False

    def busy(self) -> bool:
        now = time.monotonic()
        if now - self._at >= self.every:
            self._at = now
            self._busy = backlog_bytes(self.folder) > self.limit
        return self._busy


async def _read_body(request: Request) -> bytes:
    """The raw body; past the request limit, a 413 — after reading the rest of the body.

    Answering before the client has finished sending makes the server close the
    connection under a client still writing, which sees a broken pipe instead of the 413
    (and retries). So an oversize body is read and dropped, up to ``DRAIN_LIMIT``; only a
    body larger still is cut off.
    """
    declared = request.headers.get("content-length")
    too_large = RequestError(
        413, Reason.TOO_LARGE, f"request body is over {MAX_REQUEST_BYTES:,} bytes (500 KB)"
    )
    if declared is not None and declared.isdigit() and int(declared) > DRAIN_LIMIT:
        raise too_large
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > DRAIN_LIMIT:
            raise too_large
        if size <= MAX_REQUEST_BYTES:
            parts.append(part)
    if size > MAX_REQUEST_BYTES:
        raise too_large
    return b"".join(parts)


def create_app(
    sources: list[Source],
    spool_folder: Path,
    *,
    max_backlog: int = DEFAULT_MAX_BACKLOG,
    plans: dict[str, TrackingPlan] | None = None,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    callback_secrets: dict[str, bytes] | None = None,
) -> FastAPI:
    """The collector app for a project's sources, spooling into ``spool_folder``.

    ``max_in_flight`` bounds the requests one worker holds at once (reading, judging or
    waiting for fsync); past it the worker answers 429 at once rather than queueing work
    — and memory — it cannot get through. ``callback_secrets`` (source name → secret) sign
    provider callbacks; by default each source's ``callback_secret_env`` is read.
    """
    collector = Collector(sources, plans)
    callbacks = CallbackIntake(collector, sources, callback_secrets)
    in_flight = [0]
    pressure = _Pressure(Path(spool_folder), max_backlog)
    writer: list[SpoolWriter] = []  # opened at startup: one segment per worker process

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Everything alive at start-up (the framework, the app) is moved out of the cyclic
        # collector's sight: otherwise each full collection walks it all, a pause of tens of
        # milliseconds that lands on some request's acknowledgement.
        gc.collect()
        gc.freeze()
        writer.append(SpoolWriter(Path(spool_folder)))
        try:
            yield
        finally:
            writer.pop().close()

    app = FastAPI(
        title="closedloop collector",
        version="1",
        description=(
            "Segment- and RudderStack-compatible tracking API. Send the source's write key "
            "as HTTP Basic user (empty password), or as `writeKey` in the body. Bodies may "
            "be JSON sent as text/plain and gzip-compressed. Limits: "
            f"{MAX_MESSAGE_BYTES // 1024} KB per message, {MAX_REQUEST_BYTES // 1024} KB per "
            f"request, {MAX_BATCH_MESSAGES:,} messages per batch. A 200 means every accepted "
            "message is on disk."
        ),
        lifespan=lifespan,
    )
    app.openapi_schema = None
    original_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = original_openapi()
            schema.setdefault("components", {})["securitySchemes"] = {
                "writeKeyBasic": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "the write key as user, empty password",
                }
            }
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    async def handle(request: Request, route: str) -> Response:
        if in_flight[0] >= max_in_flight:
            return _json(
                429,
                {"success": False, "error": "too many requests in progress; retry later"},
                {**_cors(request), "retry-after": RETRY_AFTER_BUSY},
            )
        in_flight[0] += 1
        try:
            return await judge(request, route)
        finally:
            in_flight[0] -= 1

    async def judge(request: Request, route: str) -> Response:
        cors = _cors(request)
        now = datetime.now(UTC)
        if pressure.busy():
            return _json(
                429,
                {"success": False, "error": "the collector is catching up; retry later"},
                {**cors, "retry-after": RETRY_AFTER_BUSY},
            )
        client = request.client
        query_key = request.query_params.get("writeKey")
        try:
            raw = await _read_body(request)
        except RequestError as e:
            source = collector.source_for(query_key)
            outcome: Outcome = collector.refuse(e, source, "", collector.request_id())
        else:
            # Provider callbacks ("callback:SOURCE") have their own form and authentication.
            prepare = (
                functools.partial(callbacks.prepare, route.removeprefix(CALLBACK_ROUTE))
                if route.startswith(CALLBACK_ROUTE)
                else functools.partial(collector.prepare, route)
            )
            outcome = prepare(
                raw,
                request.headers,
                query_key,
                client.host if client else None,
                now,
            )
        if outcome.record is not None:
            try:
                await writer[0].append(outcome.record)
            except SpoolUnavailable as e:
                return _json(
                    503,
                    {"success": False, "error": f"not stored: {e}"},
                    {**cors, "retry-after": RETRY_AFTER_DOWN},
                )
        return _json(outcome.status, outcome.body, {**cors, **outcome.headers})

    def endpoint(route: str) -> Callable[[Request], Awaitable[Response]]:
        async def receive(request: Request) -> Response:
            return await handle(request, route)

        receive.__name__ = f"post_{route}"
        return receive

    single_doc = "One {kind} message. The browser library posts to the one-letter route."
    for path, route in SINGLE_ROUTES.items():
        kind = route
        app.add_api_route(
            f"/v1/{path}",
            endpoint(path),
            methods=["POST"],
            summary=f"{kind} ({'/v1/' + path})",
            description=single_doc.format(kind=kind),
            openapi_extra=_openapi_extra({**_MESSAGE_SCHEMA}),
            tags=["tracking"],
        )
    for path, route in (
        ("/v1/batch", "batch"),
        ("/v1/b", "b"),
        ("/v1/import", "import"),
        ("/beacon/v1/batch", "beacon"),
    ):
        app.add_api_route(
            path,
            endpoint(route),
            methods=["POST"],
            summary=f"batch ({path})",
            description="Up to 2,500 messages; batch-level context, integrations and sentAt "
            "apply to every message.",
            openapi_extra=_openapi_extra(_BATCH_SCHEMA),
            tags=["tracking"],
        )

    async def callback(source: str, request: Request) -> Response:
        return await handle(request, CALLBACK_ROUTE + source)

    app.add_api_route(
        "/v1/callbacks/{source}",
        callback,
        methods=["POST"],
        summary="provider delivery callbacks",
        description="Delivery, open, click, reply, bounce and unsubscribe reports about "
        "messages closedloop sent, recorded as `Message *` / `Unsubscribed` events of the "
        "source. Signed with the source's callback secret (X-Closedloop-Signature), or the "
        "source's write key when it has none. See closedloop.collect.callbacks.",
        openapi_extra=CALLBACK_OPENAPI,
        tags=["callbacks"],
    )

    @app.get("/v1/projects/{write_key}/settings", tags=["browser"])
    async def settings(write_key: str, request: Request) -> Response:
        """Settings the browser library loads first; names this host as its API host."""
        cors = _cors(request)
        if collector.source_for(write_key) is None:
            return _json(
                401,
                {"success": False, "error": "write key names no source of this project"},
                cors,
            )
        host = request.headers.get("host", "localhost")
        body = {
            "integrations": {
                "Segment.io": {
                    "apiKey": write_key,
                    "apiHost": f"{host}/v1",
                    # analytics.js assumes https unless told; a plain-HTTP collector says so.
                    "protocol": request.url.scheme,
                    "unbundledIntegrations": [],
                    "addBundledMetadata": True,
                    "maybeBundledConfigIds": {},
                    "versionSettings": {"version": "4.4.7", "componentTypes": ["browser"]},
                }
            },
            "plan": {
                "track": {"__default": {"enabled": True, "integrations": {}}},
                "identify": {"__default": {"enabled": True}},
                "group": {"__default": {"enabled": True}},
            },
            "edgeFunction": {},
            "analyticsNextEnabled": True,
            "middlewareSettings": {},
            "enabledMiddleware": {},
            "metrics": {"sampleRate": 0},
            "legacyVideoPluginsEnabled": False,
            "remotePlugins": [],
        }
        return _json(200, body, cors)

    @app.options("/{path:path}", include_in_schema=False)
    async def preflight(path: str, request: Request) -> Response:
        return Response(status_code=204, headers=_cors(request))

    @app.get("/health", tags=["operations"])
    async def health() -> dict[str, Any]:
        """Liveness, and whether the spool is under pressure."""
        return {"ok": True, "busy": pressure.busy()}

    return app


def app_from_env() -> FastAPI:
    """The app for a uvicorn worker, configured from ``CLOSEDLOOP_*`` environment variables."""
    from closedloop.core.definitions import load_project

    project = load_project(os.environ.get("CLOSEDLOOP_PROJECT", "."))
    spool = os.environ.get("CLOSEDLOOP_SPOOL") or str(project.root / "spool")
    backlog = int(os.environ.get("CLOSEDLOOP_MAX_BACKLOG", str(DEFAULT_MAX_BACKLOG)))
    sources = list(project.config.sources)
    plans = load_tracking_plans(project.root, {s.name for s in sources})
    return create_app(sources, Path(spool), max_backlog=backlog, plans=plans)
