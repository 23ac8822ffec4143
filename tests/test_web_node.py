"""The node's operator page (`meshnode/web`): a real browser on real node processes, the event stream, the feed.

The browser is Debian's `chromium` driven through Debian's `chromium-driver` by
Selenium, both at fixed paths: nothing is downloaded when the tests run (Selenium's
own driver manager is never asked, because the driver's path is given). Missing
packages fail the test with the fix (`apt-get install -y chromium chromium-driver`).

Screenshots for docs/: `MESHNODE_SCREENSHOTS=docs/img pytest tests/test_web_node.py
tests/test_web_cloud.py` saves the phone-sized pages there (not done on ordinary runs).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from meshnode.web import REFRESH, LiveFeed, should_send, snapshot_digest
from meshnode.web._page import MAX_CLIENTS, ChangeSignal, SessionRows, _chargers, snapshot_events

from .procs import NodeProcess, free_port, wait_until
from .test_e2e_uplink import CloudProcess

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL_HINT = "install Debian's browser and its driver: `apt-get install -y chromium chromium-driver`"
PHONE = (390, 844)
"""A phone's viewport in CSS pixels (the page must be readable at this width)."""
HOSTS = [f"127.0.16.{i}" for i in (2, 3, 4)]
REPO = Path(__file__).resolve().parent.parent


# --- the browser -----------------------------------------------------------------------


@pytest.fixture
def browser() -> Iterator[Any]:
    """A headless Chromium at a phone's size, driven by chromedriver; no downloads."""
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} is missing: {INSTALL_HINT}", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in CI
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--hide-scrollbars",
        f"--window-size={PHONE[0]},{PHONE[1]}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # to see the requests' headers
    options.add_experimental_option(
        "mobileEmulation", {"deviceMetrics": {"width": PHONE[0], "height": PHONE[1], "pixelRatio": 2}}
    )
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, predicate, timeout: float = 60.0, what: str = "the page") -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout, poll_frequency=0.2, ignored_exceptions=(StaleElementReferenceException,))
    return wait.until(predicate, message=f"timed out waiting for {what}")


def by_css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def screenshot(driver: Any, name: str) -> None:
    """Save a full-page screenshot to $MESHNODE_SCREENSHOTS/name when that is set."""
    target = os.environ.get("MESHNODE_SCREENSHOTS")
    if not target:
        return
    directory = Path(target) if Path(target).is_absolute() else REPO / target
    directory.mkdir(parents=True, exist_ok=True)
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": PHONE[0], "height": max(PHONE[1], size["height"]), "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    (directory / name).write_bytes(base64.b64decode(shot["data"]))


# --- the mesh under test ---------------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A cloud and three nodes on 127.0.16.x (a line n1 - n2 - n3), every node with the cloud's URL."""
    started: list[Any] = []
    cloud = CloudProcess(HOSTS[0], free_port(HOSTS[0]), f"sqlite:///{tmp_path}/cloud.db", tmp_path / "cloud.key",
                         tmp_path / "cloud.log")  # fmt: skip
    cloud.start()
    started.append(cloud)
    coap, http = free_port(HOSTS[0]), free_port(HOSTS[0])
    nodes = []
    for i, host in enumerate(HOSTS):
        peers = [f"{HOSTS[j]}:{coap}" for j in (i - 1, i + 1) if 0 <= j < len(HOSTS)]
        node = NodeProcess(
            f"n{i + 1}", host, tmp_path / f"n{i + 1}", coap_port=coap, http_port=http, peers=peers,
            extra=["--cloud-url", cloud.url, "--probe-interval", "1", "--site", "field"],
        )  # fmt: skip
        nodes.append(node)
    try:
        for node in nodes:
            node.start()
            started.append(node)
        yield {"cloud": cloud, "nodes": nodes}
    finally:
        for proc in started:
            proc.kill()


@pytest.mark.slow  # real processes (and a browser)
def test_the_node_page_shows_the_mesh_and_new_sessions_live(site: dict[str, Any], browser: Any) -> None:
    n1, n2, n3 = site["nodes"]
    wait_until(lambda: n1.get("/v1/status")["leader"] is not None, timeout=90, what="a leader")
    browser.get(n1.url + "/")
    assert browser.title.startswith("meshnode")

    # The mesh: every node listed, alive, and the leader marked (the page learns it from the stream).
    def mesh_shown(d: Any) -> bool:
        rows = {r.get_attribute("data-node"): r.text for r in by_css(d, "#nodes tbody tr")}
        leader = n1.get("/v1/status")["leader"]
        return (
            set(rows) == {"n1", "n2", "n3"}
            and "alive" in rows["n2"] and "alive" in rows["n3"]
            and "leader" in rows.get(leader, "")
            and by_css(d, f'#mesh-graph g[data-node="{leader}"] circle.lead') != []
        )  # fmt: skip

    wait_for(browser, mesh_shown, what="the three nodes, alive, with the leader marked")
    wait_for(browser, lambda d: by_css(d, "#uplink-state")[0].get_attribute("data-state") == "ONLINE", what="ONLINE")
    wait_for(browser, lambda d: by_css(d, "#mesh-state")[0].get_attribute("data-state") == "SYNCED", what="SYNCED")
    assert by_css(browser, "#live")[0].get_attribute("data-state") == "live"
    assert by_css(browser, "#sessions .empty")

    # A session started on the far end of the line appears on n1's page without a reload.
    browser.execute_script("window.__sameDocument = 'still here';")
    r = n3.post("/v1/sessions", {"charger": "c3", "connector": 2, "id_token": "TOKEN-LIVE", "meter_wh": 0})
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    card = f'#sessions .card[data-session="{sid}"]'
    wait_for(browser, lambda d: by_css(d, card), what=f"session {sid} on the page")
    text = by_css(browser, card)[0].text
    assert sid in text and "c3 / 2" in text
    assert browser.execute_script("return window.__sameDocument;") == "still here", "the page was reloaded"

    # It charges and stops: the card follows, and the cloud's receipt shows as reconciled.
    assert n3.post(f"/v1/sessions/{sid}/events", {"type": "meter", "meter_wh": 1500}).status_code == 201
    wait_for(browser, lambda d: "1.50 kWh" in by_css(d, card)[0].text, what="the meter reading on the card")
    assert n3.post(f"/v1/sessions/{sid}/events", {"type": "stop", "meter_wh": 2500}).status_code == 201
    wait_for(
        browser,
        lambda d: (
            by_css(d, card)[0].get_attribute("data-state") == "reconciled"
            and "cloud receipt" in by_css(d, card)[0].text
        ),
        timeout=90,
        what="the session reconciled by the cloud",
    )
    assert "2.50 kWh" in by_css(browser, card)[0].text
    wait_for(browser, lambda d: "on 2 of 3 nodes" in by_css(d, card)[0].text, what="the session held by n1 and n2")
    assert browser.execute_script("return window.__sameDocument;") == "still here", "the page was reloaded"
    # Readable on a phone: nothing wider than the screen.
    assert browser.execute_script("return document.documentElement.scrollWidth") <= PHONE[0]
    screenshot(browser, "node-page.png")


@pytest.fixture
def lone_node(tmp_path: Path) -> Iterator[NodeProcess]:
    node = NodeProcess("n1", HOSTS[0], tmp_path / "n1", coap_port=free_port(HOSTS[0]), http_port=free_port(HOSTS[0]))
    node.start()
    try:
        yield node
    finally:
        node.kill()


@pytest.mark.slow  # real processes (and a browser)
def test_every_asset_is_served_by_the_node_and_nothing_comes_from_elsewhere(lone_node: NodeProcess) -> None:
    n1 = lone_node
    page = httpx.get(n1.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text  # no CDN, no external fonts
    for asset, kind in (("page.css", "text/css"), ("common.js", "javascript"), ("node.js", "javascript")):
        r = httpx.get(f"{n1.url}/assets/{asset}", timeout=10)
        assert r.status_code == 200 and kind in r.headers["content-type"], asset
        assert "https://" not in r.text and "@import" not in r.text and "url(" not in r.text, asset
    # API paths answer JSON, also when there is nothing there.
    for path in ("/v1/page/nothing", "/assets/nothing.js", "/assets/../_page.py"):
        r = httpx.get(n1.url + path, timeout=10)
        assert r.status_code == 404, path
    assert httpx.get(n1.url + "/v1/page/nothing", timeout=10).json() == {"error": "Not Found"}


@pytest.mark.slow  # real processes (and a browser)
def test_a_token_given_once_in_the_address_is_kept_for_the_tab_and_sent_with_every_data_request(
    lone_node: NodeProcess, browser: Any
) -> None:
    """The page can talk to a node that wants a bearer token on /v1 (the event stream included)."""
    browser.get(lone_node.url + "/?token=s3cret-token")
    wait_for(browser, lambda d: by_css(d, "#live")[0].get_attribute("data-state") == "live", what="the stream")
    assert browser.execute_script("return location.search;") == ""  # not left in the address bar or history
    assert browser.execute_script("return sessionStorage.getItem('meshnode.token');") == "s3cret-token"
    sent = {}
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            request = message["params"]["request"]
            sent[request["url"].removeprefix(lone_node.url)] = request["headers"]
    assert sent["/v1/page/events"].get("Authorization") == "Bearer s3cret-token"
    assert "Authorization" not in sent["/assets/node.js"]  # the static files need none


@pytest.mark.slow  # real processes (and a browser)
def test_the_event_stream_pushes_snapshots_and_admits_a_bounded_number_of_clients(lone_node: NodeProcess) -> None:
    n1 = lone_node
    with httpx.Client(timeout=30) as client, contextlib.ExitStack() as open_streams:
        responses = [
            open_streams.enter_context(client.stream("GET", n1.url + "/v1/page/events")) for _ in range(MAX_CLIENTS)
        ]
        assert all(r.status_code == 200 for r in responses)
        assert responses[0].headers["content-type"].startswith("text/event-stream")
        refused = client.get(n1.url + "/v1/page/events")
        assert refused.status_code == 503 and "too many" in refused.json()["error"]
        first = read_event(responses[0])  # and closes it: one page gone, its place is free again
        assert first["node"]["node_id"] == "n1" and "n1" in {n["node_id"] for n in first["nodes"]}
        wait_until(lambda: client_admitted(client, n1.url), timeout=30, what="a freed slot")


def client_admitted(client: httpx.Client, url: str) -> bool:
    with client.stream("GET", url + "/v1/page/events") as response:
        return response.status_code == 200


def read_event(response: httpx.Response) -> dict[str, Any]:
    """The first `snapshot` event of a stream; the response is closed after it."""
    buffer = ""
    chunks = response.iter_text()
    with contextlib.closing(chunks):  # type: ignore[type-var]
        for chunk in chunks:
            buffer += chunk
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                lines = block.split("\n")
                if "event: snapshot" in lines:
                    return json.loads("".join(line[6:] for line in lines if line.startswith("data: ")))
    raise AssertionError("the stream ended without a snapshot")


# --- the feed and the parsing, without processes ---------------------------------------


def test_the_feed_builds_at_most_once_per_interval_and_versions_only_real_changes() -> None:
    state = {"peers": [{"node_id": "a", "last_seen_s": 1.0}], "generated_ts": 1.0}
    feed = LiveFeed(lambda: json.loads(json.dumps(state)), min_interval=1.0)
    assert feed.get(10.0)[0] == 1 and feed.builds == 1
    state["peers"][0]["last_seen_s"] = 2.0  # an age moved on: not a change
    state["generated_ts"] = 2.0
    assert feed.get(10.5) == (1, feed.get(10.9)[1]) and feed.builds == 1  # inside the interval: the cached one
    version, payload = feed.get(11.0)
    assert (version, feed.builds) == (1, 2) and json.loads(payload)["generated_ts"] == 2.0
    state["peers"].append({"node_id": "b", "last_seen_s": 0.0})  # a peer came: a change
    feed.mark_dirty()
    assert feed.dirty and feed.get(11.5)[0] == 1  # still inside the interval
    assert feed.get(12.0)[0] == 2 and not feed.dirty
    assert snapshot_digest({"a": 1, "last_seen_s": 3}) == snapshot_digest({"a": 1, "last_seen_s": 4})
    assert snapshot_digest({"a": 1}) != snapshot_digest({"a": 2})


def test_streams_send_on_change_or_after_the_refresh_period() -> None:
    assert should_send(now=5.0, version=2, sent_version=1, sent_at=4.9)
    assert not should_send(now=5.0, version=2, sent_version=2, sent_at=4.0)
    assert should_send(now=4.0 + REFRESH, version=2, sent_version=2, sent_at=4.0)


def test_the_feed_admits_at_most_max_clients() -> None:
    feed = LiveFeed(dict, max_clients=2)
    assert feed.admit() and feed.admit() and not feed.admit()
    feed.leave()
    assert feed.admit() and feed.clients == 2


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({}, []),
        ({"chargers": "garbage"}, []),
        ({"chargers": [1, None, "x"]}, []),
        (
            {"chargers": [{"charger_id": "cp-1", "status": "Available", "connectors": [{"connector_id": 1, "status": "Charging", "session_id": "s1"}]}]},
            [{"charger_id": "cp-1", "status": "Available", "protocol": None, "connectors": [{"connector_id": "1", "status": "Charging", "session_id": "s1"}]}],
        ),
        (
            {"ocpp": {"chargers": {"cp-2": {"connected": True, "ocpp_version": "1.6", "connectors": {"1": "Available", "2": {"state": "Faulted"}}}}}},
            [{"charger_id": "cp-2", "status": "connected", "protocol": "1.6", "connectors": [
                {"connector_id": "1", "status": "Available", "session_id": None},
                {"connector_id": "2", "status": "Faulted", "session_id": None}]}],
        ),
    ],
)  # fmt: skip
def test_chargers_are_read_defensively_from_whatever_the_status_holds(status: dict[str, Any], expected: Any) -> None:
    assert _chargers(status) == expected


def test_the_shared_assets_exist_once() -> None:
    """The node serves the CSS and helper script of the cloud's page (uplink/static/), no copy."""
    for name in ("page.css", "common.js"):
        assert (REPO / "uplink/static" / name).exists() and not (REPO / "meshnode/web/static" / name).exists()


async def test_a_stream_pushes_a_change_at_once_bursts_once_per_interval_and_refreshes(autojump_clock: Any) -> None:
    """Virtual time: the exact moments a page is sent a snapshot."""
    state = {"sessions": 0, "generated_ts": 0.0}
    feed = LiveFeed(lambda: dict(state), min_interval=1.0)
    changes = ChangeSignal()
    sent: list[tuple[float, int]] = []

    async def page() -> None:
        async for chunk in snapshot_events(feed, changes, max_seconds=30.0):
            if chunk.startswith(b"event: snapshot"):
                sent.append((trio.current_time(), json.loads(chunk.split(b"data: ", 1)[1])["sessions"]))

    def change(at: float) -> None:
        state["sessions"] += 1
        feed.mark_dirty()
        changes.fire()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(page)
        for at in (2.0, 2.3, 10.0, 10.1, 10.2, 10.4):
            await trio.sleep_until(at)
            change(at)
    assert sent == [
        (0.0, 0),  # on connecting
        (2.0, 1),  # a change: at once
        (3.0, 2),  # another 0.3 s later: one interval after the last build
        (8.0, 2),  # nothing for REFRESH seconds: sent again (ages move on)
        (10.0, 3),  # a burst of four changes...
        (11.0, 6),  # ...makes two snapshots, not four
        (16.0, 6),
        (21.0, 6),
        (26.0, 6),
    ]
    assert feed.builds == len(sent)  # no build that was not needed


def test_session_rows_fold_a_document_again_only_when_its_heads_change() -> None:
    from types import SimpleNamespace

    from crdt import SITE_CONFIG_ID, Documents, add_event, new_session_doc

    from .conftest import make_signer

    signer = make_signer("charger-1")
    # One document loaded at a time: the rows read every session's heads without loading it.
    docs = Documents(capacity=1, pinned=(SITE_CONFIG_ID,))
    for sid in ("s1", "s2"):
        docs[sid] = new_session_doc(sid, site="f", charger="c", connector=1, id_token="t", tariff={}, created_by="n1")
    docs[SITE_CONFIG_ID] = new_session_doc(
        "x", site="f", charger="c", connector=1, id_token="t", tariff={}, created_by="n1"
    )
    folded: list[str] = []

    def fold(doc_id: str) -> tuple[Any, Any]:
        folded.append(doc_id)
        data = SimpleNamespace(charger="c", connector=1, created_by="n1", receipt=None)
        view = SimpleNamespace(state=f"v{len(folded)}", energy_wh=0, started_ts=None, stopped_ts=None, conflicts=())
        return data, view

    node = SimpleNamespace(replica=SimpleNamespace(docs=docs), documents=docs, fold=fold)
    rows = SessionRows()
    loads = docs.loads
    assert [r[0] for r in rows.read(node)] == ["s1", "s2"] and folded == ["s1", "s2"]  # the site config is no session
    assert [r[2]["state"] for r in rows.read(node)] == ["v1", "v2"] and folded == ["s1", "s2"]  # nothing changed
    assert docs.loads == loads and not docs.is_loaded("s1")
    add_event(docs["s2"], signer.sign("authorize", "s2", 1), public_key=signer.public_key)
    assert [r[2]["state"] for r in rows.read(node)] == ["v1", "v3"] and folded == ["s1", "s2", "s2"]
    del docs["s1"]  # archived: forgotten
    assert [r[0] for r in rows.read(node)] == ["s2"] and folded == ["s1", "s2", "s2"]
