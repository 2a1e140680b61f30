"""The stock JavaScript libraries, unchanged, pointed at the collector.

analytics.js (Segment's browser library, the standalone build the classic snippet loads) runs in
headless Debian Chromium on a page served on loopback; ``@segment/analytics-node`` and
RudderStack's Node SDK run under the machine's ``node``. Their npm packages are pinned in
``tests/collect/js/package-lock.json`` and installed with ``npm install`` (which keeps the lock; npm 11's ``npm ci`` refuses
the lock it wrote, for want of other platforms' optional binaries) on first use. Without node or
Chromium the tests skip, except in CI (``CI`` set), where they must run.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.collect.conftest import POS, WEB, LiveCollector, free_port

JS = Path(__file__).parent / "js"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
IN_CI = bool(os.environ.get("CI"))


def _missing(what: str) -> None:
    """Skip on a developer machine without ``what``; in CI a missing tool is a failure."""
    if IN_CI:
        pytest.fail(f"{what} is missing in CI (.ci/run installs it)")
    pytest.skip(f"{what} is not installed (apt-get install chromium chromium-driver nodejs npm)")


@pytest.fixture(scope="module")
def js_deps() -> Path:
    """``tests/collect/js/node_modules``, installed from the lock file if absent or stale."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        _missing("node/npm")
    stamp = JS / "node_modules" / ".package-lock.json"
    lock = JS / "package-lock.json"
    if not stamp.exists() or stamp.stat().st_mtime < lock.stat().st_mtime:
        done = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=JS,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"npm install failed:\n{done.stdout}\n{done.stderr}"
    return JS / "node_modules"


def _node_send(live: LiveCollector, library: str, write_key: str, tag: str) -> dict[str, Any]:
    done = subprocess.run(
        ["node", "send.cjs", library, live.url, write_key, tag],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.strip(), f"no answer from send.cjs: {done.stderr}"
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    answer["returncode"] = done.returncode
    return answer


@pytest.mark.parametrize(("library", "source"), [("segment", WEB), ("rudderstack", POS)])
def test_node_library(live: LiveCollector, js_deps: Path, library: str, source: Any) -> None:
    tag = f"node-{library}-{uuid.uuid4().hex[:8]}"
    answer = _node_send(live, library, source.write_key, tag)
    assert answer["errors"] == [] and answer["returncode"] == 0
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
    assert {r["source"] for r in rows} == {source.name}
    order = next(r for r in rows if r["type"] == "track")
    assert order["event"] == "Order Completed"
    assert order["revenue"] == 99.5 and order["order_id"] == f"{tag}-o1"
    names = {json.loads(r["context"])["library"]["name"] for r in rows}
    assert names == {"@segment/analytics-node" if library == "segment" else "analytics-node"}
    assert len({r["message_id"] for r in rows}) == 6


def test_node_library_hears_a_bad_write_key(live: LiveCollector, js_deps: Path) -> None:
    """The collector's 401 reaches the stock library as an error; nothing is loaded."""
    tag = f"node-bad-{uuid.uuid4().hex[:8]}"
    answer = _node_send(live, "segment", "wk_not_a_source", tag)
    assert answer["returncode"] == 1 and answer["errors"], answer
    live.load()
    assert not [r for r in live.rows("events") if (r["user_id"] or "").startswith(tag)]


# ---- analytics.js in headless Chromium -----------------------------------------------------
SNIPPET = """<!doctype html><html><head><title>shop</title></head><body><script>
!function(){var analytics=window.analytics=window.analytics||[];
analytics.methods=["trackSubmit","trackClick","trackLink","trackForm","pageview","identify",
"reset","group","track","ready","alias","debug","page","screen","once","off","on",
"addSourceMiddleware","addIntegrationMiddleware","setAnonymousId","addDestinationMiddleware",
"register"];
analytics.factory=function(e){return function(){var t=Array.prototype.slice.call(arguments);
t.unshift(e);analytics.push(t);return analytics}};
for(var n=0;n<analytics.methods.length;n++){var key=analytics.methods[n];
analytics[key]=analytics.factory(key)}
analytics._writeKey="%(write_key)s";
analytics._cdn="%(collector)s";
analytics.SNIPPET_VERSION="5.2.0";
analytics.load=function(key,options){analytics._loadOptions=options};
analytics.load("%(write_key)s");
analytics.identify("%(user)s",{email:"%(user)s@example.com"});
analytics.track("Order Completed",{order_id:"%(user)s-o1",revenue:12.5});
analytics.page("Shop","Home",{path:"/"});
analytics.ready(function(){document.title="ready"});
}();
</script><script src="/analytics-next/bundles/standalone.js"></script></body></html>
"""


class _Site:
    """A static web site on loopback: the shop's page and the analytics.js bundles it serves."""

    def __init__(self, root: Path) -> None:
        self.root = root
        handler = functools.partial(_QuietHandler, directory=str(root))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """Headless Debian Chromium driven by its chromedriver, that resolves no host but loopback."""
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        _missing("chromium/chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium (pip install -e '.[dev]')")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        # Belt and braces: no name resolves to anything but loopback, so nothing leaves the machine.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _requests(driver: Any) -> list[tuple[str, str, int | None]]:
    """(method, url, status) of every web request the page made, from Chromium's network log."""
    sent: dict[str, tuple[str, str]] = {}
    status: dict[str, int] = {}
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        params = msg.get("params", {})
        if msg["method"] == "Network.requestWillBeSent":
            req = params["request"]
            sent[params["requestId"] + req["method"]] = (req["method"], req["url"])
        elif msg["method"] == "Network.responseReceived":
            status[params["requestId"]] = params["response"]["status"]
    return [
        (method, url, status.get(key[: -len(method)]))
        for key, (method, url) in sent.items()
        if url.startswith(("http:", "https:", "ws:", "wss:"))
    ]


def test_analytics_js_in_chromium(
    live: LiveCollector, js_deps: Path, browser: Any, tmp_path: Path
) -> None:
    site_root = tmp_path / "site"
    (site_root / "analytics-next").mkdir(parents=True)
    (site_root / "analytics-next" / "bundles").symlink_to(
        js_deps / "@segment" / "analytics-next" / "dist" / "umd"
    )
    user = f"browser-{uuid.uuid4().hex[:8]}"
    page = SNIPPET % {"write_key": WEB.write_key, "collector": live.url, "user": user}
    (site_root / "index.html").write_text(page, encoding="utf-8")
    site = _Site(site_root)
    try:
        browser.get(f"{site.url}/index.html")
        deadline = time.monotonic() + 30
        while browser.title != "ready" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert browser.title == "ready", browser.get_log("browser")
        # analytics.js sends after ready; wait until the collector has all three in its spool.
        rows: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            live.load()
            rows = [r for r in live.rows("events") if r["user_id"] == user]
            if len(rows) >= 3:
                break
            time.sleep(0.2)
        requests = _requests(browser)
    finally:
        site.stop()
    assert sorted(r["type"] for r in rows) == ["identify", "page", "track"], requests
    assert {r["source"] for r in rows} == {"web"}
    assert len({r["anonymous_id"] for r in rows}) == 1 and rows[0]["anonymous_id"]
    order = next(r for r in rows if r["type"] == "track")
    assert order["event"] == "Order Completed" and order["revenue"] == 12.5
    context = json.loads(order["context"])
    assert context["library"]["name"] == "analytics.js"
    assert context["page"]["url"] == f"{site.url}/index.html"
    home = next(r for r in rows if r["type"] == "page")
    assert home["event"] == "Home"  # a page's name is its event name in the log
    # It loaded its settings from the collector, posted to the one-letter routes across origins
    # (CORS), and asked nothing of any host but these two loopback servers.
    urls = [url for _, url, _ in requests]
    assert f"{live.url}/v1/projects/{WEB.write_key}/settings" in urls
    assert {f"{live.url}/v1/{letter}" for letter in "itp"} <= set(urls)
    assert all(url.startswith((live.url, site.url)) for url in urls), urls
    posts = [(url, code) for method, url, code in requests if method == "POST"]
    assert posts and all(code == 200 for _, code in posts), posts
