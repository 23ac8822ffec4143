"""Tariffs: signed site entries, the choice among them, pricing, and the cloud applying them.

The cloud tests play the leader with a `crdt.Replica` holding the site config and
sessions, over the cloud's real app (httpx ASGI transport), as tests/test_cloud.py does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
from automerge.core import Document

from crdt import SITE_CONFIG_ID, EventSigner, Replica, new_site_config, read_session, site_config_put
from meshnode._security import Identity, create_site, enroll
from meshnode.services import InvalidCommand, SiteConfigService
from uplink import (
    TariffEntryError,
    make_tariff_entry,
    price_session,
    select_tariff,
    site_tariffs,
    verify_tariff_entry,
)
from uplink._cloud import verify_receipt
from uplink._tariffs import NO_TARIFF, OperatorConfig, Tariff, charge_end_ts, decide_price

from .conftest import make_signer
from .test_cloud import CLOUD_KEY, Leader, asgi_cloud, new_doc, put

SITE_KEY = nacl.signing.SigningKey(b"site".ljust(32, b"\0"))
OTHER_KEY = nacl.signing.SigningKey(b"other".ljust(32, b"\0"))
SITE_PUB = bytes(SITE_KEY.verify_key)
T0 = 1_700_000_000  # seconds
REPO = Path(__file__).resolve().parent.parent


def entry(**overrides: Any) -> bytes:
    args: dict[str, Any] = {
        "site": "field", "tariff_id": "std", "version": 1, "currency": "EUR", "energy_per_kwh": "0.39",
        "time_per_hour": "1.20", "idle_per_hour": "6", "idle_grace_minutes": 10, "valid_from": T0 - 86400,
        "valid_to": None, "now": T0 - 86400,
    }  # fmt: skip
    args.update(overrides)
    return make_tariff_entry(overrides.pop("key", SITE_KEY), **{k: v for k, v in args.items() if k != "key"})


# --- entries --------------------------------------------------------------------------


def test_a_signed_tariff_verifies_and_says_what_it_charges():
    tariff = verify_tariff_entry(entry(), SITE_PUB, expected_key="std@1")
    assert (tariff.tariff_id, tariff.version, tariff.currency, tariff.site) == ("std", 1, "EUR", "field")
    assert tariff.energy_per_kwh == Decimal("0.39") and tariff.idle_grace_minutes == 10
    assert tariff.key == "std@1" and tariff.valid_at(T0) and not tariff.valid_at(T0 - 2 * 86400)


def test_forged_misplaced_or_damaged_tariffs_are_refused():
    with pytest.raises(TariffEntryError, match="signature"):
        verify_tariff_entry(entry(key=OTHER_KEY), SITE_PUB)
    with pytest.raises(TariffEntryError, match="stored under"):
        verify_tariff_entry(entry(), SITE_PUB, expected_key="std@2")
    good = entry()
    with pytest.raises(TariffEntryError):
        verify_tariff_entry(good[:-1] + bytes([good[-1] ^ 1]), SITE_PUB)
    with pytest.raises(TariffEntryError, match="CBOR"):
        verify_tariff_entry(b"\xff\x00garbage", SITE_PUB)
    tariffs, rejected = site_tariffs({"std@1": entry(), "x@1": entry(key=OTHER_KEY), "std@9": entry()}, SITE_PUB)
    assert [t.key for t in tariffs] == ["std@1"] and len(rejected) == 2
    _, other_site = site_tariffs({"std@1": entry(site="elsewhere")}, SITE_PUB, "field")
    assert "not 'field'" in other_site[0]


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("currency", "eur", "ISO 4217"),
        ("currency", "EURO", "ISO 4217"),
        ("energy_per_kwh", "-0.1", "from 0"),
        ("energy_per_kwh", "0.123456", "4 decimals"),
        ("energy_per_kwh", "free", "not a decimal"),
        ("time_per_hour", "NaN", "from 0"),
        ("version", 0, "version"),
        ("valid_to", T0 - 2 * 86400, "after valid_from"),
        ("tariff_id", "a" * 26, "1 to 25"),
        ("tariff_id", "a@b", "without '@'"),
        ("idle_grace_minutes", -1, "idle_grace_minutes"),
    ],
)
def test_a_tariff_with_a_bad_value_is_not_even_signed(field: str, value: Any, match: str):
    with pytest.raises(TariffEntryError, match=match):
        entry(**{field: value})


# --- choosing and pricing ---------------------------------------------------------------


def tariff(tariff_id: str = "std", version: int = 1, valid_from: float | None = None, valid_to: float | None = None,
           **prices: str) -> Tariff:  # fmt: skip
    return Tariff(
        tariff_id, version, "field", "EUR", Decimal(prices.get("energy", "0.39")), Decimal(prices.get("time", "0")),
        Decimal(prices.get("idle", "0")), int(prices.get("grace", "0")), valid_from, valid_to, 0.0,
    )  # fmt: skip


def test_the_tariff_valid_at_the_start_prices_the_session():
    old = tariff(version=1, valid_from=0, valid_to=1000)
    new = tariff(version=2, valid_from=1000)
    promo = tariff("promo", 1, valid_from=1100, valid_to=1500)
    assert select_tariff([old, new], 999) is old
    assert select_tariff([old, new], 1000) is new
    assert select_tariff([old, new, promo], 1200) is promo  # became valid last
    assert select_tariff([old, new, promo], 1200, "std") is new  # the session named it
    assert select_tariff([old, new, promo], 1200, "gone") is promo  # a name not valid then: the rule
    assert select_tariff([old], 1000) is None
    assert select_tariff([tariff(version=1, valid_from=0), tariff(version=3, valid_from=0)], 5).version == 3


def test_energy_time_and_idle_add_up_and_round_half_up_once():
    t = tariff(energy="0.39", time="1.20", idle="6", grace="10")
    # 10 kWh, 1 h charging, then 40 min plugged in: 30 min after the grace.
    priced = price_session(t, energy_wh=10_000, start_ms=0, charge_end_ms=3_600_000, stop_ms=3_600_000 + 2_400_000)
    assert (priced.energy_cents, priced.time_cents, priced.idle_cents) == (390, 120, 300)
    assert priced.total_cents == 810 and priced.idle_seconds == 2400 and priced.charging_seconds == 3600
    # 0.39 * 0.5 kWh = 0.195 -> 20 cents (half-up), not 19.
    assert price_session(tariff(), energy_wh=500, start_ms=0, charge_end_ms=0, stop_ms=0).total_cents == 20
    # Idle within the grace costs nothing.
    within = price_session(t, energy_wh=0, start_ms=0, charge_end_ms=0, stop_ms=600_000)
    assert within.idle_cents == 0 and within.total_cents == 0


def test_the_cloud_prices_only_with_a_site_tariff_valid_at_the_start():
    events = [("authorize", 0, None), ("start", 1_000_000, 0), ("stop", 1_000_000 + 3_600_000, 2_000)]
    legacy = {"currency": "EUR", "per_kwh_cents": 39, "per_session_cents": 50}  # an unsigned price map: ignored
    for tariffs, why in (([], "no tariff the cloud can verify"), ([tariff(valid_from=2000)], "valid at the session")):
        got = decide_price(tariffs, legacy, events, 2_000)
        assert (got.cost_cents, got.currency, got.tariff_id, got.tariff_version) == (None, None, None, None)
        assert got.detail["status"] == "unpriced" and got.detail["kind"] == NO_TARIFF and why in got.detail["reason"]
    both = [tariff("std", 1, valid_from=0), tariff("promo", 1, valid_from=500, energy="0.20")]
    assert decide_price(both, {}, events, 2_000).tariff_id == "promo"  # valid from the latest date
    named = decide_price(both, {"tariff_id": "std"}, events, 2_000)  # what the node showed the driver
    assert (named.tariff_id, named.tariff_version, named.cost_cents, named.currency) == ("std", 1, 78, "EUR")


def test_charging_ends_at_the_last_reading_that_rose():
    events = [("authorize", 0, None), ("start", 10, 100), ("meter", 20, 500), ("meter", 30, 900),
              ("meter", 40, 900), ("stop", 50, 900)]  # fmt: skip
    assert charge_end_ts(events) == 30
    assert charge_end_ts([("start", 10, 100), ("stop", 50, 100)]) == 10
    assert charge_end_ts([("authorize", 0, None)]) is None


# --- the node's site-config service ----------------------------------------------------------


async def test_an_enrolled_node_files_a_site_tariff_and_snapshots_it(tmp_path: Path):
    site = create_site(tmp_path / "site", "field", now=T0)
    enroll(tmp_path / "site", "n1", tmp_path / "n1", now=T0)
    identity = Identity.load(tmp_path / "n1", now=T0)
    assert identity is not None
    replica = Replica({SITE_CONFIG_ID: new_site_config("field")})
    commits: list[str] = []

    async def commit(doc_id: str, changes: list[tuple[bytes, bytes]]) -> None:
        commits.append(doc_id)

    service = SiteConfigService(
        replica=replica, identity=identity, sealer=None, actor=lambda d: b"a" * 16, commit=commit,
        wall_clock=lambda: T0, unknown_token_policy="accept_limited", unknown_token_limits=None,
    )  # fmt: skip
    assert service.tariff_snapshot() == {}
    signed = make_tariff_entry(
        site.require_signing_key(), site="field", tariff_id="std", version=1, currency="EUR",
        energy_per_kwh="0.30", valid_from=T0 - 10, now=T0,
    )  # fmt: skip
    assert service.classify(signed) == ("tariffs", "std@1")
    with pytest.raises(InvalidCommand, match="tariff refused"):
        service.classify(entry())  # signed with a key that is not this site's
    assert await service.add_entry(signed) == {"section": "tariffs", "key": "std@1"} and commits == [SITE_CONFIG_ID]
    snapshot = service.tariff_snapshot()
    assert snapshot["tariff_id"] == "std" and snapshot["version"] == 1 and snapshot["energy_per_kwh"] == "0.30"


def test_meshnode_site_tariff_signs_an_entry_the_site_key_verifies(tmp_path: Path):
    site = create_site(tmp_path / "site", "field", now=T0)
    out = subprocess.run(
        [sys.executable, "-m", "meshnode.cli", "site", "tariff", "--site", str(tmp_path / "site"), "--id", "std",
         "--version", "2", "--energy", "0.45", "--time", "0.5", "--idle", "3", "--idle-grace-minutes", "15",
         "--valid-from", "2030-01-01", "--valid-to", "2031-01-01T00:00:00+00:00"],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=True,
    )  # fmt: skip
    got = verify_tariff_entry(bytes.fromhex(out.stdout.strip()), site.public_key, expected_key="std@2")
    assert (got.energy_per_kwh, got.time_per_hour, got.idle_per_hour) == (Decimal("0.45"), Decimal("0.5"), 3)
    assert got.valid_from == 1893456000 and got.valid_to == 1924992000 and got.idle_grace_minutes == 15
    bad = subprocess.run(
        [sys.executable, "-m", "meshnode.cli", "site", "tariff", "--site", str(tmp_path / "site"), "--energy", "x"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 1 and "tariff refused" in bad.stderr


# --- the cloud applies them -----------------------------------------------------------------


def site_config(*entries: bytes, site: str = "field") -> Document:
    doc = new_site_config(site)
    for blob in entries:
        key = verify_tariff_entry(blob, [SITE_PUB, bytes(OTHER_KEY.verify_key)]).key
        site_config_put(doc, "tariffs", key, blob)
    return doc


def session(
    session_id: str, *, tariff: dict[str, Any] | None = None, start_s: int = T0, signer: EventSigner | None = None
) -> Document:
    """10 kWh in the first hour, then 40 minutes plugged in without energy (one device chain per signer)."""
    signer = signer or make_signer("node-a")
    doc = new_doc(session_id, tariff=tariff if tariff is not None else {})
    ts = start_s * 1000
    put(doc, signer, "authorize", session_id, ts)
    put(doc, signer, "start", session_id, ts + 1, 0)
    put(doc, signer, "meter", session_id, ts + 3_600_001, 10_000)
    put(doc, signer, "stop", session_id, ts + 3_600_001 + 2_400_000, 10_000)
    return doc


OPERATOR = OperatorConfig(site_keys={"field": [SITE_PUB]})


async def test_the_cloud_prices_with_the_site_tariff_and_the_receipt_names_it(tmp_path: Path):
    docs = {SITE_CONFIG_ID: site_config(entry()), "s1": session("s1", tariff={"currency": "EUR", "per_kwh_cents": 99})}
    async with asgi_cloud(f"sqlite:///{tmp_path}/c.db", operator=OPERATOR) as (cloud, client):
        leader = Leader("node-a", docs)
        await leader.sync(client)
        assert leader.errors == {}
        row = (await client.get("/v1/sessions/s1")).json()["session"]
        # energy 3.90 + time 1.20 + idle 30 min past the 10 min grace 3.00; the snapshot's 99 c/kWh is ignored.
        assert (row["cost_cents"], row["currency"], row["tariff_id"], row["tariff_version"]) == (810, "EUR", "std", 1)
        receipt = verify_receipt(read_session(leader.replica.docs["s1"]).receipt, CLOUD_KEY.verify_key.encode())
        assert (receipt["tariff_id"], receipt["tariff_version"], receipt["cost_cents"]) == ("std", 1, 810)
        assert cloud.site_configs.tariffs("field")[0].key == "std@1"
    # The site config is kept: a restarted cloud still knows the tariff.
    async with asgi_cloud(f"sqlite:///{tmp_path}/c.db", operator=OPERATOR) as (cloud, client):
        assert [t.key for t in cloud.site_configs.tariffs("field")] == ["std@1"]


async def test_a_site_without_a_valid_tariff_bills_energy_unpriced_then_a_backdated_tariff_prices_it(tmp_path: Path):
    """No tariff valid at the start: a receipt without money, a row without a price,
    flagged `no_tariff`; a tariff signed later prices it only if valid at its start."""
    docs = {SITE_CONFIG_ID: site_config(entry(valid_from=T0 + 86400)), "s1": session("s1")}
    async with asgi_cloud(f"sqlite:///{tmp_path}/c.db", operator=OPERATOR) as (cloud, client):
        leader = Leader("node-a", docs)
        await leader.sync(client)
        row = (await client.get("/v1/sessions/s1")).json()["session"]
        assert (row["cost_cents"], row["currency"], row["tariff_id"], row["energy_wh"]) == (None, None, None, 10_000)
        assert row["state"] == "reconciled" and json.loads(row["pricing"])["kind"] == "no_tariff"
        receipt = verify_receipt(read_session(leader.replica.docs["s1"]).receipt, CLOUD_KEY.verify_key.encode())
        assert receipt["priced"] is False and receipt["energy_wh"] == 10_000 and "cost_cents" not in receipt
        overview = (await client.get("/v1/page/overview")).json()
        assert [(f["session_id"], f["kinds"]) for f in overview["flagged"]] == [("s1", ["no_tariff"])]
        assert "meshnode_cloud_reviews_pending 1.0" in (await client.get("/metrics")).text
        config = leader.replica.docs[SITE_CONFIG_ID]
        # A tariff that starts after the session does not price it.
        site_config_put(config, "tariffs", "std@2", entry(version=2, valid_from=T0 + 60))
        await leader.sync(client)
        assert (await client.get("/v1/sessions/s1")).json()["session"]["cost_cents"] is None
        # One valid at the session's start (signed later, back-dated by the operator) does.
        site_config_put(config, "tariffs", "std@3", entry(version=3, valid_from=T0 - 60))
        await leader.sync(client)
        row = (await client.get("/v1/sessions/s1")).json()["session"]
        assert (row["cost_cents"], row["currency"], row["tariff_id"], row["tariff_version"]) == (810, "EUR", "std", 3)
        assert row["state"] == "reconciled" and json.loads(row["pricing"])["priced_after_receipt"] == T0 * 1000
        # The receipt stays the one issued (one per session, ever); the review flag goes.
        assert read_session(leader.replica.docs["s1"]).receipt == bytes.fromhex(row["receipt"])
        assert verify_receipt(bytes.fromhex(row["receipt"]))["priced"] is False
        assert (await client.get("/v1/page/overview")).json()["flagged"] == []
        assert "meshnode_cloud_reviews_pending 0.0" in (await client.get("/metrics")).text
        assert (await client.get("/v1/stats")).json()["receipts"] == 1


async def test_without_the_site_key_the_cloud_uses_no_site_tariff(tmp_path: Path):
    docs = {SITE_CONFIG_ID: site_config(entry()), "s1": session("s1", tariff={"tariff_id": "std", "version": 1})}
    async with asgi_cloud(f"sqlite:///{tmp_path}/c.db") as (cloud, client):
        await Leader("node-a", docs).sync(client)
        row = (await client.get("/v1/sessions/s1")).json()["session"]
        assert row["cost_cents"] is None and "no tariff the cloud can verify" in row["pricing"]
        assert cloud.site_configs.rejected("field") == ["std@1: the cloud has no key for site 'field'"]


async def test_a_forged_tariff_prices_nothing_and_a_foreign_site_config_is_refused(tmp_path: Path):
    async with asgi_cloud(f"sqlite:///{tmp_path}/c.db", operator=OPERATOR) as (cloud, client):
        # A leader of site "field" sending the config of site "other" is refused for that document only.
        other = Leader("node-b", {SITE_CONFIG_ID: site_config(entry(site="other"), site="other"), "s0": session("s0")})
        await other.sync(client)
        assert "site config of site 'other'" in other.errors[SITE_CONFIG_ID]
        assert "s0" not in other.errors and cloud.site_configs.sites() == []
        docs = {SITE_CONFIG_ID: site_config(entry(key=OTHER_KEY)), "s1": session("s1")}
        await Leader("node-a", docs).sync(client)
        row = (await client.get("/v1/sessions/s1")).json()["session"]
        assert row["cost_cents"] is None and cloud.site_configs.tariffs("field") == []
        assert "signature" in cloud.site_configs.rejected("field")[0]


# --- end to end: real processes -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_tariff_set_on_a_node_prices_its_sessions_in_the_cloud(tmp_path: Path):
    """`meshnode site tariff --http NODE` -> site config -> forwarder -> `meshnode cloud --site` -> receipt."""
    import httpx

    from .procs import NodeProcess, free_port, wait_until
    from .test_e2e_uplink import CloudProcess

    import time

    site_dir = tmp_path / "site"
    create_site(site_dir, "field", now=time.time())
    enroll(site_dir, "n1", tmp_path / "n1", now=time.time())
    host_cloud, host_node = "127.0.12.20", "127.0.12.21"
    cloud = CloudProcess(
        host_cloud, free_port(host_cloud), f"sqlite:///{tmp_path}/c.db", tmp_path / "c.key", tmp_path / "c.log",
        extra=["--site", str(site_dir)],
    )  # fmt: skip
    node = NodeProcess(
        "n1", host_node, tmp_path / "n1", coap_port=free_port(host_node), http_port=free_port(host_node),
        extra=["--cloud-url", cloud.url, "--probe-interval", "0.5"], insecure=False,
    )  # fmt: skip
    try:
        cloud.start()
        node.start()
        made = subprocess.run(
            [sys.executable, "-m", "meshnode.cli", "site", "tariff", "--site", str(site_dir), "--id", "std",
             "--energy", "0.50", "--valid-from", "2020-01-01", "--http", node.url, "--data-dir", str(tmp_path / "n1")],
            capture_output=True, text=True, cwd=REPO, timeout=60,
        )  # fmt: skip
        assert made.returncode == 0, made.stderr
        created = node.post("/v1/sessions", {"charger": "c1", "connector": 1, "id_token": "T", "meter_wh": 0})
        assert created.status_code == 201, created.text
        sid = created.json()["session_id"]
        assert created.json()["tariff"]["tariff_id"] == "std"  # the node snapshots the site tariff
        assert node.post(f"/v1/sessions/{sid}/events", {"type": "stop", "meter_wh": 2_000}).status_code == 201
        wait_until(lambda: node.get(f"/v1/sessions/{sid}")["state"] == "reconciled", 90, what="the receipt")
        on_node = node.get(f"/v1/sessions/{sid}")["receipt"]
        assert (on_node["tariff_id"], on_node["tariff_version"], on_node["cost_cents"]) == ("std", 1, 100)
        row = cloud.get(f"/v1/sessions/{sid}")["session"]
        assert (row["cost_cents"], row["currency"], row["tariff_id"], row["tariff_version"]) == (100, "EUR", "std", 1)
        receipt = verify_receipt(bytes.fromhex(row["receipt"]), cloud.get("/v1/issuer")["issuer"])
        assert (receipt["tariff_id"], receipt["tariff_version"], receipt["cost_cents"]) == ("std", 1, 100)
        assert httpx.get(cloud.url + "/metrics", headers=cloud.headers(), timeout=10).status_code == 200
    finally:
        node.kill()
        cloud.kill()
