"""Property tests: whatever is thrown at the live collector, no 5xx, and nothing unaccounted.

Arbitrary JSON, message-shaped objects with wrong types, huge strings, deep nesting and
bytes that are not UTF-8 go to a real server on loopback. Every answer must be a 2xx or 4xx
with a JSON body; every 200 must add up (received = accepted + failed + duplicate); and
after the loader runs, the loads it records must account for exactly what the answers
promised: each accepted or failed message, and each refused request as one failure.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.collect.conftest import WEB, LiveCollector

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
field_values = st.one_of(
    json_values,
    st.integers(0, 40_000).map(lambda n: "x" * n),  # up to past the 32 KB limit
    st.integers(1, 3_000).map(lambda n: json.loads("[" * n + "]" * n) if n < 980 else "deep"),
    st.sampled_from(["", " ", "\ud800", "2024-13-45T00:00:00Z", "2024-03-01T10:00:00+08:00"]),
)
FIELDS = [
    "userId",
    "anonymousId",
    "event",
    "messageId",
    "properties",
    "traits",
    "context",
    "timestamp",
    "sentAt",
    "groupId",
    "previousId",
    "name",
    "integrations",
]
messages = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {"type": st.sampled_from(["track", "identify", "page", "group", "alias", "nope"])},
        optional={f: field_values for f in FIELDS},
    ),
)
batches = st.fixed_dictionaries(
    {"batch": st.lists(messages, max_size=12)},
    optional={"context": json_values, "sentAt": field_values, "writeKey": st.just(WEB.write_key)},
)


def _deep(n: int) -> bytes:
    return b'{"batch":' + b"[" * n + b"]" * n + b"}"


raw_bodies = st.one_of(
    batches.map(lambda b: json.dumps(b).encode("utf-8", "surrogatepass")),
    st.binary(max_size=200),
    st.integers(100, 50_000).map(_deep),
    json_values.map(lambda v: json.dumps(v).encode()),
)
routes = st.sampled_from(["/v1/batch", "/v1/b", "/v1/import", "/v1/track", "/v1/i", "/v1/p"])


def test_anything_thrown_at_the_collector_is_answered_and_accounted(tmp_path: Path) -> None:
    live = LiveCollector(tmp_path / "spool", tmp_path / "w.duckdb")
    promised = {"messages": 0, "failed": 0, "refused": 0, "requests": 0}
    try:

        @settings(
            max_examples=300,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(route=routes, body=raw_bodies, gz=st.booleans(), auth=st.booleans())
        def check(route: str, body: bytes, gz: bool, auth: bool) -> None:
            headers: dict[str, str] = {"Content-Type": "text/plain"}
            if auth:
                headers["Authorization"] = "Basic d2tfdGVzdF93ZWJfMDAwMTo="  # wk_test_web_0001:
            if gz:
                body = gzip.compress(body)
                headers["Content-Encoding"] = "gzip"
            a = live.post(route, body, headers=headers)
            promised["requests"] += 1
            assert a.status < 500, a.raw
            assert a.status in (200, 400, 401, 413), a.raw
            j: dict[str, Any] = a.json
            assert isinstance(j, dict) and isinstance(j["success"], bool)
            assert j["received"] == j["accepted"] + j["failed"] + j["duplicate"]
            if "kept_in_failed_events" in j:
                assert a.status in (400, 401, 413) and j["received"] == 0
                promised["refused"] += 1
            else:
                promised["messages"] += j["accepted"] + j["failed"]
                promised["failed"] += j["failed"]
            if a.status == 200:
                parsed = json.loads(gzip.decompress(body) if gz else body)
                if route in ("/v1/batch", "/v1/b", "/v1/import"):
                    assert j["received"] == len(parsed["batch"])

        check()
        live.load()
        loads = [r for r in live.rows("loads") if r["import_name"] == "http"]
        received = sum(r["received"] for r in loads)
        assert received == promised["messages"] + promised["refused"]
        for r in loads:
            assert r["received"] == r["accepted"] + r["failed"] + r["duplicate"]
        # The loader re-judges every accepted message: it must agree with the answers.
        assert sum(r["failed"] for r in loads) == promised["failed"] + promised["refused"]
        failed = len(live.rows("failed_events"))
        assert failed <= sum(r["failed"] for r in loads)  # identical failures are kept once
        assert promised["requests"] >= 200
    finally:
        live.stop()
