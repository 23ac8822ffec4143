"""The cloud's operator page (`uplink/_cloud_web.py`): reviews recorded in the ledger, the overview, a real browser.

The review table runs on SQLite and a real PostgreSQL server (`tests/pg.py`). The
browser test runs `meshnode cloud --site` as a process, plays the site's enrolled
leader over real HTTP (signed sync requests, a signed site tariff in the site
config), and approves a flagged session in Chromium (see tests/test_web_node.py for
the browser and the screenshot option).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from automerge.core import Document

from crdt import SITE_CONFIG_ID, EventSigner, Replica, add_event, new_session_doc, new_site_config, site_config_put
from meshnode._security import create_site, enroll, load_or_create_node_key
from uplink import DeviceCredential, SignedSyncRequest, make_tariff_entry
from uplink._cloud_web import SiteContacts, is_flagged, overview, peek_sync_request, review_kinds
from uplink._ledger import Ledger
from uplink._wire import CloudSyncRequest, CloudSyncResponse, compress

from .conftest import make_signer
from .pg import pg_server, pg_url  # noqa: F401  (fixtures)
from .procs import free_port
from .test_cloud import Leader, asgi_cloud, completed, db_url, new_doc, put  # noqa: F401  (db_url: a fixture)
from .test_e2e_uplink import CloudProcess
from .test_tariffs import OPERATOR, entry, site_config
from .test_web_node import PHONE, browser, by_css, screenshot, wait_for  # noqa: F401  (browser: a fixture)

HOST = "127.0.12.10"


def walk_in(session_id: str = "s-walk") -> Document:
    """A completed session a node let an unknown driver charge on its offline policy."""
    signer = make_signer("charger-1")
    doc = new_doc(session_id)
    event = signer.sign("authorize", session_id, 1000, data={"auth": "unknown_accepted", "review": True})
    add_event(doc, event, public_key=signer.public_key)
    put(doc, signer, "start", session_id, 1001, 0)
    put(doc, signer, "stop", session_id, 1002, 900)
    return doc


def site_docs() -> dict[str, Document]:
    return {"s-walk": walk_in(), "s-known": completed("s-known", make_signer("charger-2"), ts=2000)}


# --- the ledger's review table --------------------------------------------------------


def test_reviews_are_recorded_and_kept_across_a_reopen(db_url: str) -> None:  # noqa: F811
    ledger = Ledger(db_url)
    try:
        with ledger.transaction() as tx:
            tx.add_review("s1", "approve", "ana", "known driver", 1000)
            tx.add_review("s2", "reject", "bo", "", 1001)
            tx.add_review("s1", "reject", "ana", "changed my mind", 1002)
    finally:
        ledger.close()
    ledger = Ledger(db_url)  # the schema is created again if missing: nothing lost, nothing doubled
    try:
        with ledger.read() as tx:
            assert [(r["session_id"], r["decision"], r["decided_ts"]) for r in tx.reviews()] == [
                ("s1", "approve", 1000), ("s2", "reject", 1001), ("s1", "reject", 1002),
            ]  # fmt: skip
            assert tx.reviews("s1")[-1] == {
                "session_id": "s1", "decision": "reject", "reviewer": "ana", "note": "changed my mind", "decided_ts": 1002,
            }  # fmt: skip
    finally:
        ledger.close()


# --- the HTTP routes, in-process ------------------------------------------------------


async def test_approve_and_reject_are_recorded_and_bad_requests_change_nothing(db_url: str) -> None:  # noqa: F811
    # The site has a tariff (valid always), so only the walk-in waits for a person.
    docs = {SITE_CONFIG_ID: site_config(entry(valid_from=None)), **site_docs()}
    async with asgi_cloud(db_url, operator=OPERATOR) as (cloud, client):
        await Leader("node-a", docs).sync(client)
        page = (await client.get("/v1/page/overview")).json()
        assert [f["session_id"] for f in page["flagged"]] == ["s-walk"] and page["pending_reviews"] == 1
        assert page["flagged"][0]["reasons"] == ["unknown driver (unknown_accepted)"]
        assert page["flagged"][0]["decision"] is None and page["flagged"][0]["reconciled"] is True
        assert {r["session_id"] for r in page["ledger"]} == {"s-walk", "s-known"} and page["ledger_total"] == 2
        (site,) = page["sites"]
        assert (site["site"], site["leader"], site["sessions"], site["reconciled"]) == ("field", "node-a", 2, 2)

        bad = [
            ("/v1/reviews/s-walk", b"not json", 400),
            ("/v1/reviews/s-walk", b"[1]", 400),
            ("/v1/reviews/s-walk", b'{"decision": "maybe"}', 400),
            ("/v1/reviews/s-walk", b'{"decision": "approve", "note": "\\u0000"}', 400),
            ("/v1/reviews/s-walk", b'{"decision": "approve", "reviewer": 7}', 400),
            ("/v1/reviews/s-walk", b'{"decision": "approve", "note": "' + b"x" * 5000 + b'"}', 413),
            ("/v1/reviews/s-none", b'{"decision": "approve"}', 404),
            ("/v1/reviews/s-known", b'{"decision": "approve"}', 409),  # not flagged
        ]
        for path, body, status in bad:
            r = await client.post(path, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == status, (body[:40], r.text)
            assert "error" in r.json()
        assert (await client.get("/v1/reviews")).json() == {"reviews": []}

        r = await client.post("/v1/reviews/s-walk", json={"decision": "approve", "reviewer": "ana", "note": "regular"})
        assert r.status_code == 201 and r.json()["decision"] == "approve"
        r = await client.post("/v1/reviews/s-walk", json={"decision": "reject"})
        assert r.status_code == 201 and r.json()["reviewer"] == "operator"
        history = (await client.get("/v1/reviews", params={"session_id": "s-walk"})).json()["reviews"]
        assert [(h["decision"], h["reviewer"], h["note"]) for h in history] == [
            ("approve", "ana", "regular"), ("reject", "operator", ""),
        ]  # fmt: skip
        page = (await client.get("/v1/page/overview")).json()
        assert page["pending_reviews"] == 0 and page["flagged"][0]["decision"]["decision"] == "reject"
        # Deciding changes no billing.
        assert (await client.get("/v1/sessions/s-walk")).json()["session"]["state"] == "reconciled"


async def test_the_page_and_its_assets_come_from_the_cloud(sqlite_url_: str) -> None:
    async with asgi_cloud(sqlite_url_) as (_, client):
        page = await client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "https://" not in page.text and "http://" not in page.text
        for asset in ("page.css", "common.js", "cloud.js"):
            r = await client.get(f"/assets/{asset}")
            assert r.status_code == 200 and "https://" not in r.text, asset
        r = await client.get("/v1/page/nothing")
        assert r.status_code == 404


@pytest.fixture
def sqlite_url_(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/cloud.db"


def test_flagged_means_an_unknown_driver_conflicts_or_no_tariff() -> None:
    assert review_kinds({"review": "unknown_accepted", "conflicts": 0, "cost_cents": 1}) == ["review"]
    assert review_kinds({"review": None, "conflicts": 2, "cost_cents": 1}) == ["conflicts"]
    assert not is_flagged({"review": None, "conflicts": 0, "cost_cents": 1, "state": "reconciled"})
    # Completed and unpriced (the site had no tariff valid at its start): a person looks at it.
    assert review_kinds({"review": None, "conflicts": 0, "cost_cents": None, "state": "reconciled"}) == ["no_tariff"]
    assert review_kinds({"review": None, "conflicts": 0, "cost_cents": None, "state": "completed"}) == ["no_tariff"]
    assert not is_flagged({"review": None, "conflicts": 0, "cost_cents": None, "state": "charging"})


def test_the_overview_takes_the_latest_decision_and_remembers_contacts() -> None:
    row = {
        "session_id": "s", "site": "depot", "charger": "c", "connector": 1, "id_token": "t", "start_ts": 1,
        "stop_ts": 2, "energy_wh": 10, "cost_cents": 1, "currency": "EUR", "state": "reconciled", "conflicts": 1,
        "review": None, "receipt": b"r", "receipt_ts": 3, "first_seen": 4, "updated": 5,
    }  # fmt: skip
    decisions = [
        {"session_id": "s", "decision": "approve", "reviewer": "a", "note": "", "decided_ts": 6},
        {"session_id": "s", "decision": "reject", "reviewer": "b", "note": "", "decided_ts": 7},
    ]
    contacts = SiteContacts(limit=2)
    contacts.note("depot", "n1", 10)
    contacts.note("field", "n9", 11)
    contacts.note("depot", "n2", 12)
    contacts.note("lab", "n5", 13)  # over the limit: the oldest contact (field) goes
    out = overview([row], decisions, contacts.sites, {"sessions": 1}, 20)
    assert out["flagged"][0]["decision"]["decision"] == "reject" and out["pending_reviews"] == 0
    assert [(s["site"], s["leader"], s["last_contact_ms"]) for s in out["sites"]] == [
        ("depot", "n2", 12),
        ("lab", "n5", 13),
    ]
    assert contacts.sites["depot"].requests == 2


# --- a real browser on a real cloud process ------------------------------------------


def signed_site(tmp_path: Path, now: float) -> tuple[Path, DeviceCredential, dict[str, Document]]:
    """Site "field" with its gateway node-a, and what node-a's leader holds: the site
    config with a tariff (EUR 0.39/kWh, 1.20/h, valid from an hour ago) and three
    sessions signed by node-a: a walk-in (an unknown driver let in offline), a known
    driver, and one that ran before the tariff was valid (unpriced)."""
    site_dir = tmp_path / "site"
    site = create_site(site_dir, "field", now=now)
    enroll(site_dir, "node-a", tmp_path / "node-a", roles=("gateway",), now=now)
    cred = DeviceCredential(
        load_or_create_node_key(tmp_path / "node-a"), (tmp_path / "node-a" / "node.cert").read_bytes()
    )
    config = new_site_config("field")
    tariff = make_tariff_entry(
        site.require_signing_key(), site="field", tariff_id="std", version=1, currency="EUR", energy_per_kwh="0.39",
        time_per_hour="1.20", valid_from=now - 3600, now=now - 3600,
    )  # fmt: skip
    site_config_put(config, "tariffs", "std@1", tariff)
    signer = EventSigner("node-a", cred.signing_key)
    t = int(now * 1000)
    docs: dict[str, Document] = {SITE_CONFIG_ID: config}
    plan = [
        ("s-early", "c3", t - 7_200_000, {"auth": "allowed_list"}, 5_400),  # before the tariff
        ("s-walk", "c1", t - 1_800_000, {"auth": "unknown_accepted", "review": True}, 900),
        ("s-known", "c2", t - 1_200_000, {"auth": "allowed_list"}, 3_200),
    ]
    for sid, charger, ts, auth, wh in plan:
        doc = docs[sid] = new_session_doc(
            sid, site="field", charger=charger, connector=1, id_token="tok", tariff={}, created_by="node-a"
        )
        for kind, at, meter, data in (("authorize", ts, None, auth), ("start", ts + 1, 0, None),
                                      ("stop", ts + 900_000, wh, None)):  # fmt: skip
            add_event(doc, signer.sign(kind, sid, at, meter_wh=meter, data=data), public_key=cred.certificate)
    return site_dir, cred, docs


def _play_signed_leader(url: str, docs: dict[str, Document], cred: DeviceCredential) -> None:
    """node-a's forwarder in short: signed sync rounds until neither side has more to say."""
    replica, ids = Replica(dict(docs)), sorted(docs)
    with httpx.Client(base_url=url, timeout=30) as client:
        for round_ in range(12):
            msgs = {d: replica.generate("cloud", d) for d in ids}
            if round_ and all(m is None for m in msgs.values()):
                return
            request = SignedSyncRequest("node-a", "field", msgs, (), credential=cred, ts=time.time())
            r = client.post("/v1/sync", content=compress(request.encode()), headers={"Content-Encoding": "deflate"})
            assert r.status_code == 200, r.text
            reply = CloudSyncResponse.decode(r.content)
            assert reply.errors == {}
            for d, m in reply.msgs.items():
                replica.receive("cloud", d, m)
    raise AssertionError("sync did not settle")


def test_the_contact_tracker_reads_signed_requests_too() -> None:
    """A cloud run with --site takes only signed requests: the page must still learn the leader."""
    import nacl.signing

    plain = CloudSyncRequest("node-a", "field", {"s": None})
    cred = DeviceCredential(nacl.signing.SigningKey(bytes(32)), b"cert")
    signed = SignedSyncRequest("node-a", "field", {"s": None}, (), credential=cred, ts=1.0)
    for body in (compress(plain.encode()), compress(signed.encode())):
        got = peek_sync_request(body)
        assert got is not None and (got.node_id, got.site) == ("node-a", "field")
    assert peek_sync_request(b"garbage") is None and peek_sync_request(compress(b"\xa1\x66signed\x40")) is None


@pytest.mark.slow  # real processes (and a browser)
def test_an_operator_approves_a_flagged_session_in_the_browser(tmp_path: Path, browser: Any) -> None:  # noqa: F811
    site_dir, cred, docs = signed_site(tmp_path, time.time())
    cloud = CloudProcess(
        HOST, free_port(HOST), f"sqlite:///{tmp_path}/cloud.db", tmp_path / "cloud.key", tmp_path / "cloud.log",
        extra=["--site", str(site_dir)],
    )  # fmt: skip
    cloud.start()
    try:
        _play_signed_leader(cloud.url, docs, cred)
        rows = {r["session_id"]: r for r in cloud.get("/v1/sessions")["sessions"]}
        # 0.39 * 0.9 kWh + 1.20 * 0.25 h = 0.351 + 0.30 -> 65 cents; 0.39 * 3.2 + 0.30 = 1.548 -> 155.
        assert {s: (r["cost_cents"], r["tariff_id"]) for s, r in rows.items()} == {
            "s-walk": (65, "std"), "s-known": (155, "std"), "s-early": (None, None),
        }  # fmt: skip
        write_token = (tmp_path / "api.token").read_text().strip()  # a cloud with --site asks for it
        browser.get(cloud.url + f"/?token={write_token}")
        card = '#flagged .card[data-session="s-walk"]'
        wait_for(browser, lambda d: by_css(d, card), what="the flagged session")
        assert by_css(browser, card)[0].get_attribute("data-decision") == "pending"
        assert "unknown driver" in by_css(browser, card)[0].text and "0.65 EUR" in by_css(browser, card)[0].text
        assert not by_css(browser, '#flagged .card[data-session="s-known"]')
        early = '#flagged .card[data-session="s-early"]'
        assert "no tariff" in by_css(browser, early)[0].text
        wait_for(
            browser,
            lambda d: "node-a" in by_css(d, '#sites .card[data-site="field"]')[0].text,
            what="the site's leader",
        )
        assert by_css(browser, '#ledger tr[data-session="s-known"]')

        by_css(browser, "#reviewer")[0].send_keys("Ana")
        by_css(browser, card + " input.note")[0].send_keys("walk-in, paid at the desk")
        by_css(browser, card + " button.approve")[0].click()
        wait_for(
            browser, lambda d: by_css(d, card)[0].get_attribute("data-decision") == "approve", what="the decision shown"
        )
        assert "by Ana" in by_css(browser, card)[0].text
        assert "1 to review" in by_css(browser, "#pending")[0].text  # s-early waits for its tariff

        recorded = cloud.get("/v1/reviews")["reviews"]
        assert [(r["session_id"], r["decision"], r["reviewer"], r["note"]) for r in recorded] == [
            ("s-walk", "approve", "Ana", "walk-in, paid at the desk")
        ]
        assert browser.execute_script("return document.documentElement.scrollWidth") <= PHONE[0]
        screenshot(browser, "cloud-page.png")
    finally:
        cloud.kill()
    # The decision is in the database, not only in the process: a restarted cloud still has it.
    cloud.start()
    try:
        assert cloud.get("/v1/reviews")["reviews"][0]["reviewer"] == "Ana"
    finally:
        cloud.kill()


async def test_sessions_with_conflicts_are_flagged_too(sqlite_url_: str) -> None:
    # One device, two sessions, each starting the device's chain at seq 1 (two signers, one key): a fork.
    docs = {
        SITE_CONFIG_ID: site_config(entry(valid_from=None)),  # priced: only the conflicts flag them
        "s-a": completed("s-a", make_signer("charger-1"), ts=1000),
        "s-b": completed("s-b", make_signer("charger-1"), ts=2000),
    }
    async with asgi_cloud(sqlite_url_, operator=OPERATOR) as (_, client):
        await Leader("node-a", docs).sync(client)
        page = (await client.get("/v1/page/overview")).json()
    flagged = {f["session_id"]: f for f in page["flagged"]}
    assert flagged and all(f["kinds"] == ["conflicts"] and f["conflicts"] > 0 for f in flagged.values())
    assert all(f["reasons"][-1].endswith("conflict(s)") for f in flagged.values())
    assert page["pending_reviews"] == len(flagged)
