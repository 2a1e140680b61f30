"""Signed HTTP POSTs with retries: how closedloop hands data to a receiver's webhook.

Why in core: segments export audiences to webhooks, and segments may not import activate
(which has its own channels). The standard library is enough — no HTTP client dependency.

Signing follows the widely used "timestamp.body" scheme: the header
``X-Closedloop-Signature: t=UNIX_SECONDS,v1=HEX`` carries HMAC-SHA256(secret, f"{t}." + body).
Binding the time in stops a captured request from being replayed later (``verify`` rejects
old timestamps); hex keeps it readable in logs. Every request also carries an
``Idempotency-Key`` that stays the same across retries, so a receiver can drop a batch it
has already applied when an acknowledgement was lost.

Retries: connection errors, timeouts, 408, 429 and 5xx are retried with exponential backoff
(honouring ``Retry-After`` seconds, capped); any other 4xx is the caller's mistake (a wrong
URL or secret) and fails at once — retrying would only repeat it.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

SIGNATURE_HEADER = "X-Closedloop-Signature"
RETRYABLE = {408, 425, 429, 500, 502, 503, 504}


class DeliveryError(Exception):
    """A POST that did not succeed: a non-retryable answer, or retries exhausted."""

    def __init__(self, message: str, status: int | None, attempts: int) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = attempts


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The signature header value for ``body`` sent at ``timestamp`` (Unix seconds)."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(
    secret: bytes, header: str, body: bytes, now: float | None = None, tolerance_s: int = 300
) -> bool:
    """Whether ``header`` is a valid signature of ``body`` made within ``tolerance_s`` of now.

    For receivers (and the tests): parses ``t=...,v1=...``, compares in constant time.
    """
    parts: dict[str, str] = {}
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            return False
        parts[key] = value
    t, mac = parts.get("t", ""), parts.get("v1", "")
    if not t.isdigit() or not mac:
        return False
    if abs((time.time() if now is None else now) - int(t)) > tolerance_s:
        return False
    want = sign(secret, int(t), body).split("v1=", 1)[1]
    return hmac.compare_digest(want, mac)


def check_url(url: str) -> str:
    """``url`` if it is an http(s) URL with a host; a clear ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http:// or https:// URL")
    return url


@dataclass(frozen=True)
class Delivery:
    status: int
    attempts: int


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    backoff_s: float = 0.5  # first wait; doubles each time
    max_wait_s: float = 30.0
    timeout_s: float = 10.0


DEFAULT_POLICY = RetryPolicy()


def post_signed(
    url: str,
    body: bytes,
    secret: bytes,
    idempotency_key: str,
    policy: RetryPolicy = DEFAULT_POLICY,
    sleep: Callable[[float], None] = time.sleep,
) -> Delivery:
    """POST ``body`` (JSON) to ``url`` signed with ``secret``; retry what is worth retrying.

    Each attempt is signed afresh (its own timestamp), so a slow retry is not rejected as a
    replay. Raises ``DeliveryError`` with the last status when it gives up.
    """
    check_url(url)
    last = "no attempt made"
    status: int | None = None
    for attempt in range(1, policy.attempts + 1):
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "closedloop",
            "Idempotency-Key": idempotency_key,
            SIGNATURE_HEADER: sign(secret, int(time.time()), body),
        }
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310 - scheme checked
        wait = policy.backoff_s * 2 ** (attempt - 1)
        try:
            with urllib.request.urlopen(req, timeout=policy.timeout_s) as resp:  # noqa: S310
                return Delivery(int(resp.status), attempt)
        except urllib.error.HTTPError as e:
            status = e.code
            last = f"HTTP {e.code} {e.reason}"
            if e.code not in RETRYABLE:
                raise DeliveryError(f"{url}: {last} (not retried)", status, attempt) from None
            retry_after = (e.headers.get("Retry-After") or "").strip()
            if retry_after.isdigit():
                wait = float(retry_after)
        except (http.client.HTTPException, OSError) as e:  # refused, reset, timed out, garbled
            status = None
            last = str(getattr(e, "reason", e))
        if attempt < policy.attempts:
            sleep(min(wait, policy.max_wait_s))
    raise DeliveryError(
        f"{url}: gave up after {policy.attempts} attempts ({last})", status, policy.attempts
    )
