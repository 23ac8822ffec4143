"""Meter plausibility and default offline limits (issue 14, hole 3).

The issue's input: a `meter_wh` of 2**53 that the cloud billed 351,280,770,934,860
cents with a signed receipt. Here it is refused by a node's API, and filed as a
conflict (never billed) by the cloud when an enrolled device signs it anyway.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from crdt import (
    DEFAULT_MAX_POWER_W,
    IMPLAUSIBLE_METER,
    EventSigner,
    Keyring,
    add_event,
    fold,
    meter_plausibility,
    new_session_doc,
    session_max_power_w,
)
from meshnode._security import create_site, enroll
from meshnode.services.site_config import DEFAULT_UNKNOWN_TOKEN_LIMITS, SiteConfigService
from tests.conftest import make_signer
from tests.procs import NodeProcess, free_port
from tests.test_e2e_uplink import CloudProcess
from tests.test_security_cloud import CLOUD, credential, post_sync

HUGE = 2**53
T0 = 1_700_000_000_000


def session_events(signer: EventSigner, sid: str, readings: list[tuple[str, int | None, int]], **auth):
    out = {}
    for kind, meter, ts in readings:
        e = signer.sign(kind, sid, ts, meter_wh=meter, data=auth if kind == "authorize" else None)
        out[e.event_id] = e.encoded
    return out


def test_the_fold_files_an_implausible_reading_as_a_conflict_and_bills_nothing() -> None:
    signer = make_signer("bay-1")
    keyring = Keyring({"bay-1": signer.public_key})
    events = session_events(
        signer,
        "s",
        [("authorize", None, T0), ("start", 0, T0), ("meter", HUGE, T0 + 60_000), ("stop", HUGE, T0 + 120_000)],
    )
    view = fold("s", events, keyring)
    assert (view.state, view.energy_wh) == ("charging", 0)
    assert [c.kind for c in view.conflicts] == [IMPLAUSIBLE_METER, IMPLAUSIBLE_METER]
    # A real hour at 300 kW passes; the bound follows the session's stated maximum.
    ok = session_events(signer, "s", [("authorize", None, T0), ("start", 0, T0), ("stop", 300_000, T0 + 3_600_000)])
    assert fold("s", ok, keyring).energy_wh == 300_000
    slow = session_events(
        signer, "s", [("authorize", None, T0), ("start", 0, T0), ("stop", 30_000, T0 + 3_600_000)], max_power_w=11_000
    )
    view = fold("s", slow, keyring)
    assert view.state == "charging" and view.conflicts[0].kind == IMPLAUSIBLE_METER
    assert session_max_power_w({"max_power_w": 10**12}) == 4_000_000 and session_max_power_w({}) == DEFAULT_MAX_POWER_W
    assert meter_plausibility(0, T0, 5_833, T0, DEFAULT_MAX_POWER_W) is None  # 60 s of slack at 350 kW
    assert meter_plausibility(0, T0, 5_834, T0, DEFAULT_MAX_POWER_W) is not None


def test_accept_limited_has_default_limits() -> None:
    from crdt import Replica

    service = SiteConfigService(
        replica=Replica(), identity=None, sealer=None, actor=lambda d: b"a" * 16, commit=None,  # type: ignore[arg-type]
        wall_clock=time.time, unknown_token_policy="accept_limited", unknown_token_limits=None,
    )  # fmt: skip
    decision = service.authorize("WHO-1", None)
    assert decision.accepted and decision.review and decision.limits == DEFAULT_UNKNOWN_TOKEN_LIMITS
    assert DEFAULT_UNKNOWN_TOKEN_LIMITS.max_wh and DEFAULT_UNKNOWN_TOKEN_LIMITS.max_minutes


@pytest.mark.slow
def test_a_node_refuses_an_implausible_reading(tmp_path: Path) -> None:
    host = "127.0.18.20"
    create_site(tmp_path / "site", "field", now=time.time())
    enroll(tmp_path / "site", "bay-1", tmp_path / "bay-1", now=time.time())
    node = NodeProcess(
        "bay-1", host, tmp_path / "bay-1", coap_port=free_port(host), http_port=free_port(host), insecure=False,
        extra=["--max-power-kw", "22"],
    )  # fmt: skip
    node.start()
    try:
        r = node.post("/v1/sessions", {"charger": "bay-1", "connector": 1, "id_token": "D1", "meter_wh": 1_500})
        assert r.status_code == 201, r.text
        sid = r.json()["session_id"]
        for meter in (HUGE, 1_500 + 2_000):  # 2 kWh within a minute is more than 22 kW delivers
            r = node.post(f"/v1/sessions/{sid}/events", {"type": "meter", "meter_wh": meter})
            assert r.status_code == 409 and "implausible" in r.json()["error"], r.text
        r = node.post(f"/v1/sessions/{sid}/events", {"type": "stop", "meter_wh": 1_600})
        assert r.status_code == 201, r.text
        session = node.get(f"/v1/sessions/{sid}")
        assert (session["state"], session["energy_wh"]) == ("completed", 100)
        assert [e["type"] for e in session["events"]] == ["authorize", "start", "stop"]
    finally:
        node.kill()


@pytest.mark.slow
def test_the_cloud_bills_nothing_for_an_implausible_reading_a_device_signed(tmp_path: Path) -> None:
    """An enrolled (so trusted) device signs the issue's reading: a conflict, no receipt."""
    create_site(tmp_path / "site", "field-a", now=time.time())
    enroll(tmp_path / "site", "gw-1", tmp_path / "gw-1", roles=("gateway",), now=time.time())
    cloud = CloudProcess(
        CLOUD, free_port(CLOUD), f"sqlite:///{tmp_path}/cloud.db", tmp_path / "cloud.key", tmp_path / "cloud.log",
        extra=["--site", str(tmp_path / "site")],
    )  # fmt: skip
    cloud.start()
    try:
        gw = credential(tmp_path / "gw-1")
        signer = EventSigner("gw-1", gw.signing_key)
        sid = os.urandom(16).hex()
        doc = new_session_doc(
            sid, site="field-a", charger="bay-1", connector=1, id_token="D1",
            tariff={"currency": "EUR", "per_kwh_cents": 39}, created_by="gw-1",
        )  # fmt: skip
        now = int(time.time() * 1000)
        for kind, meter, ts in (("authorize", None, now), ("start", 0, now), ("stop", HUGE, now + 60_000)):
            add_event(doc, signer.sign(kind, sid, ts, meter_wh=meter), public_key=gw.certificate)
        assert post_sync(cloud.url, "gw-1", {sid: doc}, gw).status_code == 200
        row = cloud.ledger()[sid]
        assert (row["energy_wh"], row["receipt"], row["state"]) == (0, None, "charging"), row
        assert row["cost_cents"] is None and row["conflicts"] == 1  # no site tariff: unpriced
        kinds = [c["kind"] for c in cloud.get(f"/v1/sessions/{sid}")["conflicts"]]
        assert kinds == [IMPLAUSIBLE_METER]
    finally:
        cloud.kill()


async def test_a_session_cannot_start_over_the_api_without_its_start_reading(tmp_path: Path, autojump_clock) -> None:
    """Issue 14, trap 3: created without `meter_wh`, "meter 1500, stop 1700" billed 200 Wh
    (energy before the first reading was lost). The API now wants the start reading."""
    import httpx
    import trio

    from meshnode._api import build_app
    from meshnode._discovery import StaticDiscovery
    from meshnode._node import Node, NodeConfig
    from meshnode._transport import MemoryNetwork

    net = MemoryNetwork()
    async with trio.open_nursery() as nursery, net.transport("10.0.0.1:5683") as transport:
        node = Node(
            NodeConfig(node_id="n1", data_dir=tmp_path / "n1", seed=7),
            transport=transport, discovery=StaticDiscovery([]), wall_clock=lambda: T0 / 1000 + trio.current_time(),
        )  # fmt: skip
        await nursery.start(node.serve)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_app(node)), base_url="http://n") as api:
            start = {"charger": "bay-1", "connector": 1, "id_token": "D1"}
            for body in (start, {**start, "meter_wh": None}):
                r = await api.post("/v1/sessions", json=body)
                assert r.status_code == 400, r.text
                assert "'meter_wh' is required" in r.json()["error"] and "start" in r.json()["error"]
            for bad in ("1500", -1, 1.5, True, HUGE + 1):
                assert (await api.post("/v1/sessions", json={**start, "meter_wh": bad})).status_code == 400, bad
            assert (await api.get("/v1/sessions")).json() == {"sessions": []}  # nothing was started
            # With the start reading, the readings bill what the charger delivered since it.
            r = await api.post("/v1/sessions", json={**start, "meter_wh": 1_000})
            assert r.status_code == 201, r.text
            sid = r.json()["session_id"]
            for kind, meter in (("meter", 1_500), ("stop", 1_700)):
                await trio.sleep(60)
                assert (await api.post(f"/v1/sessions/{sid}/events", json={"type": kind, "meter_wh": meter})).is_success
            session = (await api.get(f"/v1/sessions/{sid}")).json()
            assert (session["state"], session["energy_wh"]) == ("completed", 700)
        nursery.cancel_scope.cancel()
