"""The cloud page logs in with the cloud's tokens, in a real browser (Chromium).

A `meshnode cloud --site` process on 127.0.13.x; a certified device of the site syncs a
session whose events no certified key signed (so the cloud flags it: conflicts). The
page asks for a token, shows the ledger with the read-only one, refuses a decision
with it, and records one with the operator's.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from meshnode._security import create_site, enroll
from tests.procs import free_port
from tests.test_e2e_uplink import CloudProcess
from tests.test_security_cloud import credential, forged_session, post_sync
from tests.test_web_node import browser, by_css, wait_for  # noqa: F401  (browser: a fixture)

pytestmark = pytest.mark.slow

CLOUD = "127.0.13.20"


def enter_token(driver: Any, token: str) -> None:
    wait_for(driver, lambda d: by_css(d, "#token-section")[0].is_displayed(), what="the token form")
    field = by_css(driver, "#token-input")[0]
    field.clear()
    field.send_keys(token)
    by_css(driver, "#token-form button")[0].click()


def test_the_cloud_page_asks_for_the_token_and_a_read_token_cannot_decide(
    tmp_path: Path,
    browser: Any,  # noqa: F811
) -> None:
    create_site(tmp_path / "site", "field-a", now=time.time())
    enroll(tmp_path / "site", "gw-1", tmp_path / "gw-1", roles=("gateway",), now=time.time())
    (tmp_path / "cloud").mkdir()
    cloud = CloudProcess(
        CLOUD, free_port(CLOUD), f"sqlite:///{tmp_path}/cloud/cloud.db", tmp_path / "cloud" / "cloud.key",
        tmp_path / "cloud.log", extra=["--site", str(tmp_path / "site")],
    )  # fmt: skip
    cloud.start()
    try:
        sid, doc = forged_session()
        assert post_sync(cloud.url, "gw-1", {sid: doc}, credential(tmp_path / "gw-1")).status_code == 200
        write = (tmp_path / "cloud" / "api.token").read_text().strip()
        read = (tmp_path / "cloud" / "api-read.token").read_text().strip()
        card = f'#flagged .card[data-session="{sid}"]'

        browser.get(cloud.url + "/")
        wait_for(browser, lambda d: by_css(d, "#live")[0].get_attribute("data-state") == "token needed")
        assert not by_css(browser, card)  # no data without a token
        enter_token(browser, "mn_" + "z" * 43)  # a wrong token: asked again
        wait_for(browser, lambda d: "token" in by_css(d, "#token-error")[0].text, what="the refusal shown")
        enter_token(browser, read)
        wait_for(browser, lambda d: by_css(d, card), what="the flagged session, read with the read-only token")
        assert not by_css(browser, "#token-section")[0].is_displayed()

        by_css(browser, card + " button.approve")[0].click()  # a read-only token cannot decide
        wait_for(browser, lambda d: "read-only" in by_css(d, "#token-error")[0].text, what="the 403 shown")
        reviews = httpx.get(cloud.url + "/v1/reviews", headers=cloud.headers(), timeout=10).json()["reviews"]
        assert reviews == []
        enter_token(browser, write)
        wait_for(browser, lambda d: by_css(d, card + " button.approve")[0].is_enabled(), what="the card again")
        by_css(browser, card + " button.approve")[0].click()
        wait_for(browser, lambda d: by_css(d, card)[0].get_attribute("data-decision") == "approve", what="the decision")
        reviews = httpx.get(cloud.url + "/v1/reviews", headers=cloud.headers(), timeout=10).json()["reviews"]
        assert [(r["session_id"], r["decision"]) for r in reviews] == [(sid, "approve")]

        # A link with ?token= logs a new tab in and leaves the address bar clean.
        browser.execute_script("sessionStorage.clear()")
        browser.get(cloud.url + f"/?token={read}")
        wait_for(browser, lambda d: by_css(d, card), what="the page opened with ?token=")
        assert "token=" not in browser.current_url
    finally:
        cloud.kill()
    assert write not in cloud.log_path.read_text() and read not in cloud.log_path.read_text()
