"""Webhooks for SMS, WeChat template messages and push providers: signed, retried, checked.

* **Signed.** The body is JSON; the request carries ``X-Closedloop-Timestamp`` (Unix seconds)
  and ``X-Closedloop-Signature: sha256=HEX`` where HEX is HMAC-SHA256 over
  ``"{timestamp}.{body}"`` with the channel's secret (from the environment variable the
  definition names). The receiver recomputes it and refuses stale timestamps, so a captured
  request cannot be replayed later or altered. ``Idempotency-Key`` is the message id: a
  receiver that saw it already drops the repeat a retry may cause.
* **Retried** with exponential backoff (``backoff_seconds`` × 2^k) on 5xx answers, 408/429,
  timeouts and connection errors — the provider may succeed later; a 4xx means the request
  itself is wrong (bad number, unknown openid) and is recorded ``bounced``, never retried.
* **Checked.** Every address the host resolves to must be public: private (RFC 1918, ULA),
  loopback, link-local (cloud metadata at 169.254.169.254), multicast, reserved and
  unspecified ranges are refused — a webhook URL must not reach into our own network —
  unless the project lists the host in ``allowed_hosts``. The connection then goes to the
  address that was checked (no second DNS lookup that could answer differently), and
  redirects are not followed.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import os
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from closedloop.activate.channels.base import Attempt, SendResult
from closedloop.core.clock import Clock
from closedloop.core.definitions import ChannelConfig
from closedloop.core.errors import ClosedloopError

SIGNATURE_HEADER = "X-Closedloop-Signature"
TIMESTAMP_HEADER = "X-Closedloop-Timestamp"
RETRY_STATUS = frozenset({408, 429})
MAX_BACKOFF = 30.0


class UnsafeURLError(ClosedloopError):
    """A webhook URL that resolves to an address we must not call."""


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """``sha256=HEX``: HMAC-SHA256 of ``"{timestamp}.{body}"`` (what receivers verify)."""
    mac = hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    secret: bytes, timestamp: str, body: bytes, signature: str, *, now: float, tolerance: int = 300
) -> bool:
    """The receiver's check: a valid signature on a timestamp within ``tolerance`` seconds."""
    try:
        ts = int(timestamp)
    except ValueError:
        return False
    if abs(now - ts) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


def _forbidden(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return _forbidden(ip.ipv4_mapped)
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


def vetted_address(url: str, allowed_hosts: list[str] | tuple[str, ...] = ()) -> str:
    """The address to connect to for ``url``: resolved once, and public unless allowed.

    Raises ``UnsafeURLError`` naming the host and the address when any address the host
    resolves to is private, loopback, link-local or otherwise not public.
    """
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise UnsafeURLError(f"webhook url {url!r} must be http(s)://host/...")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UnsafeURLError(f"webhook host {host!r} does not resolve: {e}") from None
    addresses = [str(info[4][0]) for info in infos]
    if host.lower() not in {h.lower() for h in allowed_hosts}:
        for a in addresses:
            if _forbidden(ipaddress.ip_address(a.split("%")[0])):
                raise UnsafeURLError(
                    f"webhook host {host!r} resolves to {a}, a private, loopback or link-local "
                    "address; list the host in the channel's allowed_hosts to call it anyway"
                )
    return addresses[0]


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to a checked address, sending the URL's host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """An HTTPS connection to a checked address; the certificate is checked for the host."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        self._ctx = ssl.create_default_context()
        super().__init__(host, port, timeout=timeout, context=self._ctx)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._ctx.wrap_socket(sock, server_hostname=self.host)


def message_body(m: dict[str, Any], channel: str) -> dict[str, Any]:
    """What a provider gets: who, what, and the ids to report back with."""
    return {
        "message_id": m["message_id"],
        "delivery_id": m.get("delivery_id"),
        "campaign": m.get("campaign"),
        "variant": m.get("variant"),
        "channel": channel,
        "customer_id": m.get("customer_id"),
        "to": m.get("address"),
        "subject": m.get("subject") or "",
        "body": m.get("body") or "",
        "offer_code": m.get("offer_code"),
    }


class WebhookChannel:
    """POSTs each message as signed JSON to the channel's URL (see the module docstring)."""

    def __init__(
        self,
        name: str,
        config: ChannelConfig,
        *,
        secret: bytes | None = None,
        clock: Clock | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if config.url is None or config.secret_env is None:
            raise ClosedloopError(f"channel {name}: a webhook needs url and secret_env")
        if secret is None:
            value = os.environ.get(config.secret_env)
            if not value:
                raise ClosedloopError(
                    f"channel {name}: environment variable {config.secret_env} (the webhook's "
                    "signing secret) is not set"
                )
            secret = value.encode()
        self.name = name
        self.config = config
        self.url = config.url
        self.secret = secret
        self.clock = clock or Clock()
        self.sleep = sleep
        vetted_address(self.url, config.allowed_hosts)  # refuse a bad URL before any send

    def send(
        self, message: dict[str, Any], *, attempts_left: int, pace: Callable[[], None]
    ) -> SendResult:
        body = json.dumps(message_body(message, self.name), ensure_ascii=False, default=str)
        data = body.encode("utf-8")
        attempts: list[Attempt] = []
        provider_id: str | None = None
        for k in range(attempts_left):
            if k:
                self.sleep(min(self.config.backoff_seconds * 2 ** (k - 1), MAX_BACKOFF))
            pace()
            status, error, retry, provider_id = self._post(data, str(message["message_id"]))
            attempts.append(Attempt(status, error, self.clock.now()))
            if not retry:
                break
        return SendResult(attempts, provider_id)

    def _post(self, data: bytes, message_id: str) -> tuple[str, str | None, bool, str | None]:
        """One request: (status, error, retry?, provider message id)."""
        try:
            address = vetted_address(self.url, self.config.allowed_hosts)
        except UnsafeURLError as e:
            return "failed", str(e), False, None
        parts = urlsplit(self.url)
        https = parts.scheme == "https"
        host = parts.hostname or ""
        port = parts.port or (443 if https else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        cls = _PinnedHTTPS if https else _PinnedHTTP
        conn = cls(host, port, address, self.config.timeout_seconds)
        ts = int(time.time())
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            TIMESTAMP_HEADER: str(ts),
            SIGNATURE_HEADER: sign(self.secret, ts, data),
            "Idempotency-Key": message_id,
            "User-Agent": "closedloop-webhook/1",
        }
        try:
            conn.request("POST", path, body=data, headers=headers)
            resp = conn.getresponse()
            text = resp.read(4096).decode("utf-8", "replace")
            code = resp.status
        except TimeoutError as e:
            return "failed", f"timeout after {self.config.timeout_seconds:g}s: {e}", True, None
        except (OSError, http.client.HTTPException) as e:
            return "failed", f"{type(e).__name__}: {e}", True, None
        finally:
            conn.close()
        if 200 <= code < 300:
            return "delivered", None, False, _provider_id(text)
        error = f"HTTP {code}: {text[:200]}"
        if code >= 500 or code in RETRY_STATUS:
            return "failed", error, True, None
        return "bounced", error, False, None

    def close(self) -> None:
        return None


def _provider_id(text: str) -> str | None:
    """The provider's own message id, when its answer is JSON with ``id``/``message_id``."""
    try:
        answer = json.loads(text)
    except ValueError:
        return None
    if isinstance(answer, dict):
        for key in ("message_id", "id"):
            if isinstance(answer.get(key), str | int):
                return str(answer[key])
    return None
