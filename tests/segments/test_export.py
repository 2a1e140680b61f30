"""Segment export to a webhook: signed batches with retries, against a real HTTP server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from closedloop.core.signed_post import (
    SIGNATURE_HEADER,
    DeliveryError,
    RetryPolicy,
    post_signed,
    sign,
    verify,
)
from closedloop.segments.export import ExportError, export_id, export_to_webhook

SECRET = b"s3cret"
AS_OF = datetime(2026, 11, 20, tzinfo=UTC)
FAST = RetryPolicy(attempts=4, backoff_s=0.01, max_wait_s=0.05, timeout_s=2.0)


@dataclass
class Receiver:
    """A loopback webhook: verifies signatures, records requests, answers from a script.

    ``script`` holds the answers to the next requests: an HTTP status, ``"drop"`` (close the
    connection without answering) or ``"slow"`` (answer after 1 s); then 200 for the rest.
    """

    script: list[int | str] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    def handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                answer = receiver.script.pop(0) if receiver.script else 200
                receiver.requests.append(
                    {
                        "answer": answer,
                        "signed": verify(SECRET, self.headers[SIGNATURE_HEADER], body),
                        "key": self.headers["Idempotency-Key"],
                        "body": json.loads(body),
                    }
                )
                if answer == "drop":
                    self.close_connection = True
                    return
                if answer == "slow":
                    time.sleep(1.0)
                    answer = 200
                assert isinstance(answer, int)
                self.send_response(answer)
                if answer == 429:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def delivered(self) -> list[dict[str, Any]]:
        return [r["body"] for r in self.requests if r["answer"] in (200, "slow")]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", 0), r.handler())
    r.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield r
    server.shutdown()
    server.server_close()


def members(n: int) -> pa.Table:
    return pa.table(
        {
            "customer_id": [f"c{i:05d}" for i in range(n)],
            "orders": list(range(n)),
            "last_order_at": [AS_OF] * n,
        }
    )


def test_members_arrive_once_in_signed_batches(receiver: Receiver) -> None:
    r = export_to_webhook("vip", AS_OF, members(1234), receiver.url, SECRET, batch_size=500)
    assert (r.members, r.batches, r.attempts) == (1234, 3, 3)
    assert all(q["signed"] for q in receiver.requests)
    bodies = receiver.delivered()
    assert [b["batch"] for b in bodies] == [1, 2, 3]
    assert [len(b["members"]) for b in bodies] == [500, 500, 234]
    assert {b["total"] for b in bodies} == {1234} and {b["batches"] for b in bodies} == {3}
    ids = [m["customer_id"] for b in bodies for m in b["members"]]
    assert ids == [f"c{i:05d}" for i in range(1234)]
    assert bodies[0]["members"][0]["last_order_at"] == "2026-11-20T00:00:00+00:00"
    assert len({q["key"] for q in receiver.requests}) == 3


def test_an_empty_segment_still_says_so(receiver: Receiver) -> None:
    r = export_to_webhook("vip", AS_OF, members(0), receiver.url, SECRET)
    assert (r.members, r.batches) == (0, 1)
    assert receiver.delivered()[0]["members"] == []


def test_transient_failures_are_retried_with_the_same_key(receiver: Receiver) -> None:
    receiver.script = [503, "drop", 429]
    waits: list[float] = []
    r = export_to_webhook(
        "vip", AS_OF, members(10), receiver.url, SECRET, policy=FAST, sleep=waits.append
    )
    assert r.attempts == 4 and len(receiver.delivered()) == 1
    assert len({q["key"] for q in receiver.requests}) == 1
    assert waits == [0.01, 0.02, 0.0]  # doubling backoff; Retry-After: 0 honoured


def test_a_slow_receiver_times_out_and_is_retried(receiver: Receiver) -> None:
    receiver.script = ["slow"]
    policy = RetryPolicy(attempts=2, backoff_s=0.01, timeout_s=0.3)
    d = post_signed(receiver.url, b"{}", SECRET, "k", policy)
    assert d.attempts == 2


def test_a_refused_batch_stops_the_export_and_says_how_far_it_got(receiver: Receiver) -> None:
    receiver.script = [200, 401]
    with pytest.raises(ExportError) as e:
        export_to_webhook("vip", AS_OF, members(30), receiver.url, SECRET, 10, FAST)
    assert e.value.delivered == 1 and e.value.batches == 3
    assert "batch 2 of 3" in str(e.value) and "HTTP 401" in str(e.value)
    assert len(receiver.requests) == 2  # 401 is not retried


def test_giving_up_after_the_last_attempt(receiver: Receiver) -> None:
    receiver.script = [500] * 10
    with pytest.raises(DeliveryError, match="gave up after 4 attempts") as e:
        post_signed(receiver.url, b"{}", SECRET, "k", FAST)
    assert e.value.status == 500 and len(receiver.requests) == 4


def test_nobody_listening() -> None:
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as s:
        port = s.server_address[1]  # bound, then closed: nothing listens there any more
    with pytest.raises(DeliveryError, match="gave up after 4 attempts"):
        post_signed(f"http://127.0.0.1:{port}/", b"{}", SECRET, "k", FAST)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="http"):
        export_to_webhook("vip", AS_OF, members(1), "ftp://x/", SECRET)
    with pytest.raises(ValueError, match="secret"):
        export_to_webhook("vip", AS_OF, members(1), "http://127.0.0.1:1/", b"")


def test_export_id_is_stable_for_the_same_members() -> None:
    a = export_id("vip", AS_OF, members(5))
    assert a == export_id("vip", AS_OF, members(5))
    assert a != export_id("vip", AS_OF, members(6))
    assert a != export_id("vip", datetime(2026, 11, 21, tzinfo=UTC), members(5))


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=32), st.binary(max_size=200), st.integers(0, 2**31))
def test_signatures_verify_and_tampering_does_not(secret: bytes, body: bytes, t: int) -> None:
    header = sign(secret, t, body)
    assert verify(secret, header, body, now=t)
    assert not verify(secret, header, body + b"x", now=t)
    assert not verify(secret + b"x", header, body, now=t)
    assert not verify(secret, header, body, now=t + 301)  # too old: a replay
    assert not verify(secret, header.replace("t=", "t=1"), body, now=t)


@given(st.text(max_size=80))
def test_garbage_signature_headers_are_rejected(header: str) -> None:
    assert not verify(SECRET, header, b"{}", now=0)
