"""The stock Segment and RudderStack Python libraries, unchanged, pointed at the collector."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from tests.collect.conftest import POS, WEB, LiveCollector


def _send(client: Any, tag: str) -> None:
    user = f"{tag}-user"
    client.identify(
        user,
        {"email": f"{tag}@example.com"},
        context={
            "externalIds": [
                {
                    "id": f"{tag}-openid",
                    "type": "wechat_openid",
                    "collection": "users",
                    "encoding": "none",
                }
            ]
        },
    )
    client.track(user, "Order Completed", {"order_id": f"{tag}-o1", "revenue": 99.5})
    client.page(user, "Shop", "Home", {"path": "/"})
    client.screen(user, "App", "Cart")
    client.group(user, f"{tag}-g", {"name": "Tea lovers"})
    client.alias(f"{tag}-anon", user)
    client.flush()


@pytest.mark.parametrize("gzip", [False, True])
def test_segment_analytics_python(live: LiveCollector, gzip: bool) -> None:
    client_mod = pytest.importorskip("segment.analytics.client")
    errors: list[Any] = []
    tag = f"seg-{uuid.uuid4().hex[:8]}"
    client = client_mod.Client(
        WEB.write_key,
        host=live.url,
        sync_mode=True,
        gzip=gzip,
        on_error=lambda e, b: errors.append(e),
    )
    _send(client, tag)
    assert errors == []
    live.load()
    rows = [r for r in live.rows("events") if (r["user_id"] or "").startswith(tag)]
    assert sorted(r["type"] for r in rows) == [
        "alias",
        "group",
        "identify",
        "page",
        "screen",
        "track",
    ]
    assert {r["source"] for r in rows} == {"web"}
    order = next(r for r in rows if r["type"] == "track")
    assert order["revenue"] == 99.5 and order["order_id"] == f"{tag}-o1"
    assert json.loads(order["context"])["library"]["name"] == "analytics-python"
    ext = [r for r in live.rows("event_external_ids") if r["id"] == f"{tag}-openid"]
    assert len(ext) == 1


def test_segment_library_reads_our_errors(live: LiveCollector) -> None:
    client_mod = pytest.importorskip("segment.analytics.client")
    request_mod = pytest.importorskip("segment.analytics.request")
    client = client_mod.Client("wk_not_a_source", host=live.url, sync_mode=True, max_retries=0)
    with pytest.raises(request_mod.APIError) as e:  # 4xx: the library does not retry
        client.track("u", "E")
    assert e.value.status == 401 and e.value.code == "bad_write_key"
    assert "names no source" in e.value.message


def test_rudderstack_python(live: LiveCollector) -> None:
    client_mod = pytest.importorskip("rudderstack.analytics.client")
    errors: list[Any] = []
    tag = f"rud-{uuid.uuid4().hex[:8]}"
    client = client_mod.Client(
        POS.write_key, host=live.url, sync_mode=True, on_error=lambda e, b: errors.append(e)
    )
    _send(client, tag)
    assert errors == []
    live.load()
    rows = [r for r in live.rows("events") if (r["user_id"] or "").startswith(tag)]
    assert len(rows) == 6 and {r["source"] for r in rows} == {"pos"}
