"""The OCPP bridge alone (no sockets): the one path from a charger's messages into sessions.

The bridge is wired to real session and site-config services over one replica, the
way the node wires them, with a `commit` that records what would be stored. The claims:
each charger message becomes at most one event however often it is replayed; events
keep the charger's timestamps; integer transaction ids are derived, kept in the
session document, and found again by a bridge that starts from the documents alone
(a restart, another node); refused or late input changes nothing.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import nacl.signing
import pytest

from crdt import SITE_CONFIG_ID, Keyring, Replica, decode_event, new_site_config, read_session, site_config_put
from meshnode._security import Limits, Site, signed_token_list_entry
from meshnode.ocpp import AuthStatus, OcppBridge, Reading, derive_transaction_id
from meshnode.services import SessionService, SiteConfigService
from meshnode.services.chargers import charger_entry, verify_charger_entry

from .conftest import make_signer

NOW = 1_800_000_000.0
NOW_MS = int(NOW * 1000)


class Rig:
    """Services and a bridge over one replica; `commits` lists (doc id, changes) written."""

    def __init__(
        self,
        *,
        policy: str = "accept_limited",
        replica: Replica | None = None,
        identity=None,
        node_id: str = "n1",
        limits: Limits | None = None,
    ) -> None:
        self.replica = replica or Replica()
        if SITE_CONFIG_ID not in self.replica.docs:
            self.replica.add(SITE_CONFIG_ID, new_site_config("site"))
        self.signer = make_signer(node_id)
        self.commits: list[tuple[str, int]] = []
        self.clock = NOW

        async def commit(doc_id: str, changes: list[tuple[bytes, bytes]]) -> None:
            self.commits.append((doc_id, len(changes)))

        self.site_config = SiteConfigService(
            replica=self.replica, identity=identity, sealer=None, actor=lambda d: b"a" * 16, commit=commit,
            wall_clock=lambda: self.clock, unknown_token_policy=policy, unknown_token_limits=limits,
        )  # fmt: skip
        self.sessions = SessionService(
            node_id=node_id, site="site", replica=self.replica,
            site_config=self.site_config, signer=lambda: self.signer,
            keyring=Keyring({node_id: self.signer.public_key}), identity=None, actor=lambda d: b"a" * 16,
            rng=random.Random(1), wall_clock=lambda: self.clock, commit=commit,
        )  # fmt: skip
        self.bridge = OcppBridge(self.sessions, wall_clock=lambda: self.clock)

    def events(self, session_id: str) -> list[dict]:
        data = read_session(self.replica.docs[session_id])
        return sorted((decode_event(b)[0] for b in data.events.values()), key=lambda e: (e["ts"], e["seq"]))

    def session_docs(self) -> list[str]:
        return [d for d in self.replica.docs if d != SITE_CONFIG_ID]


def reading(ts_ms: int, wh: int | None, signed=()) -> Reading:
    return Reading(ts_ms, wh, tuple(signed), raw={"ts": ts_ms, "wh": wh, "signed": list(signed)})


async def test_a_full_transaction_becomes_one_session_with_the_chargers_times():
    rig = Rig()
    t0 = NOW_MS - 60_000
    started = await rig.bridge.start_transaction("CP-1", 2, "TAG", 1000, t0)
    assert started.status is AuthStatus.ACCEPTED and started.session_id is not None and not started.existing
    assert 1 <= started.transaction_id < 2**31
    signed = {"value": "OCMF|{...}|{...}", "format": "SignedData", "context": "Sample.Periodic"}
    assert (
        await rig.bridge.meter("CP-1", [reading(t0 + 10_000, 1400, [signed])], transaction_id=started.transaction_id)
        == 1
    )
    sid = await rig.bridge.stop_transaction(
        "CP-1", 2500, t0 + 20_000, transaction_id=started.transaction_id, reason="EVDisconnected"
    )
    assert sid == started.session_id
    session = rig.sessions.session_json(sid)
    assert (session["charger"], session["connector"], session["id_token"]) == ("CP-1", 2, "TAG")
    assert session["state"] == "completed" and session["energy_wh"] == 1500
    assert (session["started_ts"], session["stopped_ts"]) == (t0, t0 + 20_000)
    events = rig.events(sid)
    assert [e["type"] for e in events] == ["authorize", "start", "meter", "stop"]
    assert events[1]["data"]["ocpp"]["transaction_id"] == started.transaction_id
    assert events[2]["data"]["ocpp"]["signed"] == [signed]
    assert events[3]["data"]["ocpp"]["reason"] == "EVDisconnected"


async def test_replayed_messages_change_nothing():
    rig = Rig()
    t0 = NOW_MS - 600_000
    first = await rig.bridge.start_transaction("CP-1", 1, "TAG", 0, t0)
    again = await rig.bridge.start_transaction("CP-1", 1, "TAG", 0, t0)
    assert again.existing and (again.session_id, again.transaction_id) == (first.session_id, first.transaction_id)
    txid = first.transaction_id
    for _ in range(2):
        await rig.bridge.meter("CP-1", [reading(t0 + 1000, 300), reading(t0 + 2000, 600)], transaction_id=txid)
    for _ in range(2):
        await rig.bridge.stop_transaction("CP-1", 900, t0 + 3000, transaction_id=txid)
    assert [e["type"] for e in rig.events(first.session_id)] == ["authorize", "start", "meter", "meter", "stop"]
    assert rig.session_docs() == [first.session_id]
    assert rig.sessions.session_json(first.session_id)["energy_wh"] == 900
    # A new start with other content is another session.
    other = await rig.bridge.start_transaction("CP-1", 1, "TAG", 900, t0 + 5000)
    assert other.session_id != first.session_id and other.transaction_id != txid


async def test_a_new_bridge_over_the_same_documents_finds_the_transactions():
    """After a restart (or on another node that has the replicated documents), a stop or a
    replayed start for a transaction started before maps to the same session."""
    rig = Rig()
    t0 = NOW_MS - 60_000
    first = await rig.bridge.start_transaction("CP-1", 1, "TAG", 10, t0)
    fresh = OcppBridge(rig.sessions, wall_clock=lambda: rig.clock)
    again = await fresh.start_transaction("CP-1", 1, "TAG", 10, t0)
    assert again.existing and (again.session_id, again.transaction_id) == (first.session_id, first.transaction_id)
    assert (
        await OcppBridge(rig.sessions, wall_clock=lambda: rig.clock).stop_transaction(
            "CP-1", 50, t0 + 1000, transaction_id=first.transaction_id
        )
        == first.session_id
    )
    assert rig.sessions.session_json(first.session_id)["energy_wh"] == 40
    assert fresh.transaction_id_of(first.session_id) == first.transaction_id


async def test_a_start_replayed_to_another_node_finds_the_replicated_session():
    """Failover: the charger lost the answer to its start, reconnects to another node (which has
    the replicated document) and sends the start again: no second session."""
    rig = Rig()
    first = await rig.bridge.start_transaction("CP-1", 1, "TAG", 10, NOW_MS - 60_000)
    other = Rig(node_id="n2", replica=rig.replica)
    again = await other.bridge.start_transaction("CP-1", 1, "TAG", 10, NOW_MS - 60_000)
    assert again.existing and (again.session_id, again.transaction_id) == (first.session_id, first.transaction_id)
    assert other.commits == [] and rig.session_docs() == [first.session_id]
    await other.bridge.stop_transaction("CP-1", 60, NOW_MS - 1000, transaction_id=first.transaction_id)
    assert rig.sessions.session_json(first.session_id)["energy_wh"] == 50


async def test_transaction_ids_are_derived_and_skip_one_the_charger_already_uses():
    rig = Rig()
    sid = rig.sessions.session_id_for("CP-1", 1, "ocpp:" + _start_key("CP-1", 1, "TAG", 0, NOW_MS))
    taken = derive_transaction_id(sid, 0)
    rig.bridge._by_txid[("CP-1", taken)] = "another-session"
    started = await rig.bridge.start_transaction("CP-1", 1, "TAG", 0, NOW_MS)
    assert started.session_id == sid
    assert started.transaction_id == derive_transaction_id(sid, 1) != taken
    # Another charger may use the same integer: lookups are per charger.
    assert rig.bridge.find("CP-2", taken) is None


def _start_key(charger, connector, tag, meter, ts):
    from meshnode.ocpp import content_key

    return content_key("start", charger, connector, tag, meter, ts, None)


async def test_a_live_start_the_offline_authorisation_refuses_records_nothing():
    rig = Rig(policy="refuse")
    result = await rig.bridge.start_transaction("CP-1", 1, "STRANGER", 0, NOW_MS)
    assert (result.status, result.transaction_id, result.session_id) == (AuthStatus.INVALID, 0, None)
    assert rig.session_docs() == [] and rig.commits == []
    assert await rig.bridge.stop_transaction("CP-1", 10, NOW_MS, transaction_id=0) is None
    assert rig.commits == []


async def test_a_replayed_start_is_recorded_even_if_refused_now_flagged_for_review():
    """The charger charged while its node was away: the energy must reach the ledger."""
    rig = Rig(policy="refuse")
    result = await rig.bridge.start_transaction("CP-1", 1, "STRANGER", 0, NOW_MS - 3_600_000)
    assert result.status is AuthStatus.INVALID and result.session_id is not None and result.transaction_id > 0
    auth = rig.events(result.session_id)[0]
    assert auth["type"] == "authorize" and auth["data"]["refused"] is True and auth["data"]["review"] is True


async def test_late_backwards_and_unknown_readings_change_nothing():
    rig = Rig()
    started = await rig.bridge.start_transaction("CP-1", 1, "TAG", 100, NOW_MS - 10_000)
    txid = started.transaction_id
    assert await rig.bridge.meter("CP-1", [reading(NOW_MS - 9000, 50)], transaction_id=txid) == 0  # backwards
    assert await rig.bridge.meter("CP-1", [reading(NOW_MS - 9000, None)], transaction_id=txid) == 0  # no register
    assert await rig.bridge.meter("CP-1", [reading(NOW_MS, 500)], transaction_id=txid + 1) == 0  # unknown
    await rig.bridge.stop_transaction("CP-1", 700, NOW_MS - 5000, transaction_id=txid)
    commits = list(rig.commits)
    assert await rig.bridge.meter("CP-1", [reading(NOW_MS - 1000, 800)], transaction_id=txid) == 0  # after the stop
    assert rig.commits == commits
    assert rig.sessions.session_json(started.session_id)["energy_wh"] == 600


async def test_timestamps_are_clamped_to_the_session_and_to_now():
    rig = Rig()
    t0 = NOW_MS - 10_000
    started = await rig.bridge.start_transaction("CP-1", 1, "TAG", 0, t0)
    await rig.bridge.meter("CP-1", [reading(t0 - 5000, 10)], transaction_id=started.transaction_id)  # before the start
    await rig.bridge.meter("CP-1", [reading(NOW_MS + 3_600_000, 20)], transaction_id=started.transaction_id)  # future
    meters = [e for e in rig.events(started.session_id) if e["type"] == "meter"]
    assert [e["ts"] for e in meters] == [t0, NOW_MS]
    assert rig.sessions.session_json(started.session_id)["energy_wh"] == 20


def test_charger_states_are_kept_per_connection():
    rig = Rig()
    rig.bridge.connected("CP-1", "ocpp1.6", "127.0.0.1:1")
    rig.bridge.booted("CP-1", {"vendor": "V", "model": "M", "firmware": None})
    rig.bridge.connector_status("CP-1", 1, "Charging", "NoError", NOW_MS - 5)
    rig.bridge.disconnected("CP-1")
    (state,) = rig.bridge.status_json()
    assert state["connected"] is False and state["boot"] == {"vendor": "V", "model": "M"}
    assert state["connectors"] == {"1": {"status": "Charging", "error_code": "NoError", "ts_ms": NOW_MS - 5}}


def _site(name: str = "site") -> Site:
    key = nacl.signing.SigningKey(b"s" * 32)
    return Site(name=name, signing_key=key, public_key=bytes(key.verify_key), network_key=b"n" * 32)


def test_charger_registrations_hold_a_hash_and_verify_only_for_their_site():
    site = _site()
    entry = charger_entry(site, "CP-1", "correct horse", NOW)
    assert b"correct horse" not in entry
    reg = verify_charger_entry(entry, site.public_key, "site")
    assert reg.charger_id == "CP-1" and reg.check_password("correct horse") and not reg.check_password("wrong")
    from meshnode._security import BadSiteEntry

    with pytest.raises(BadSiteEntry):
        verify_charger_entry(entry, site.public_key, "other-site")
    with pytest.raises(BadSiteEntry):
        verify_charger_entry(entry, bytes(nacl.signing.SigningKey(b"x" * 32).verify_key), "site")


async def test_registrations_and_token_lists_come_from_the_site_config():
    site = _site()
    cloud = nacl.signing.SigningKey(b"c" * 32)
    identity = SimpleNamespace(
        site_public_key=site.public_key, site_name="site", cloud_public_key=bytes(cloud.verify_key)
    )
    rig = Rig(identity=identity)
    added = await rig.site_config.add_entry(charger_entry(site, "CP-1", "pw", NOW))
    assert added == {"section": "revocations", "key": "charger:CP-1"}
    assert rig.site_config.charger("CP-1").check_password("pw") and rig.site_config.charger("CP-2") is None
    doc = rig.replica.docs[SITE_CONFIG_ID]
    site_config_put(doc, "id_tokens_allowed", "GOOD", signed_token_list_entry(cloud, "GOOD", True, NOW))
    site_config_put(doc, "id_tokens_revoked", "BAD", signed_token_list_entry(cloud, "BAD", False, NOW))
    assert rig.bridge.authorize("GOOD") is AuthStatus.ACCEPTED and rig.bridge.authorize("BAD") is AuthStatus.BLOCKED
    version, entries = rig.bridge.local_list()
    assert entries == [("BAD", AuthStatus.BLOCKED), ("GOOD", AuthStatus.ACCEPTED)] and version > 0
    site_config_put(doc, "id_tokens_allowed", "NEW", signed_token_list_entry(cloud, "NEW", True, NOW))
    assert rig.bridge.local_list()[0] != version


async def test_a_session_ended_at_its_offline_limit_must_be_stopped_at_the_charger():
    rig = Rig(limits=Limits(max_wh=500))
    started = await rig.bridge.start_transaction("CP-1", 1, "STRANGER", 1000, NOW_MS - 10_000)
    txid = started.transaction_id
    await rig.bridge.meter("CP-1", [reading(NOW_MS - 5000, 1400)], transaction_id=txid)
    assert not rig.bridge.must_stop("CP-1", txid)
    await rig.bridge.meter("CP-1", [reading(NOW_MS - 4000, 1600)], transaction_id=txid)
    assert rig.sessions.session_json(started.session_id)["state"] == "completed"
    assert rig.bridge.must_stop("CP-1", txid)
    # The charger's own stop then changes nothing.
    commits = list(rig.commits)
    await rig.bridge.stop_transaction("CP-1", 1700, NOW_MS - 3000, transaction_id=txid, reason="Remote")
    assert rig.commits == commits and rig.sessions.session_json(started.session_id)["energy_wh"] == 600
    assert not rig.bridge.must_stop("CP-1", txid + 1)


async def test_a_driver_token_authorises_where_the_policy_refuses_and_its_limits_are_kept():
    from meshnode._security import issue_driver_token

    cloud = nacl.signing.SigningKey(b"c" * 32)
    identity = SimpleNamespace(
        site_public_key=_site().public_key, site_name="site", cloud_public_key=bytes(cloud.verify_key)
    )
    rig = Rig(policy="refuse", identity=identity)
    token = issue_driver_token(cloud, "DRV-1", max_wh=3000, max_minutes=None, not_after=NOW + 3600)
    assert rig.bridge.authorize("DRV-1") is AuthStatus.INVALID
    assert rig.bridge.authorize("DRV-1", token) is AuthStatus.ACCEPTED
    assert rig.bridge.authorize("OTHER", token) is AuthStatus.INVALID  # a token for another id
    started = await rig.bridge.start_transaction("CP-1", 1, "DRV-1", 0, NOW_MS, driver_token=token)
    assert started.status is AuthStatus.ACCEPTED
    auth = rig.events(started.session_id)[0]["data"]
    assert auth["auth"] == "driver_token" and auth["limits"] == {"max_wh": 3000, "max_minutes": None}


async def test_a_16_stop_for_a_session_still_replicating_is_held_and_applied_once_in_order():
    """Failover before replication (1.6): node 1 accepted the start and died before its
    document left; the charger's readings and stop reach node 2, which acknowledges them
    (1.6 has no "later") and holds them. When the document arrives, they are recorded in
    timestamp order, once each, however often the charger also resent them."""
    rig_a, rig_b = Rig(node_id="n1"), Rig(node_id="n2")  # two replicas: nothing replicates by itself
    t0 = NOW_MS - 600_000
    started = await rig_a.bridge.start_transaction("CP-1", 1, "TAG", 1000, t0)
    txid, sid = started.transaction_id, started.session_id
    # Node 2 gets them out of order and twice (answers lost, queue replayed).
    for _ in range(2):
        assert await rig_b.bridge.meter("CP-1", [reading(t0 + 2000, 1600)], transaction_id=txid) == 0
        assert await rig_b.bridge.meter("CP-1", [reading(t0 + 1000, 1300)], transaction_id=txid) == 0
        assert await rig_b.bridge.stop_transaction("CP-1", 1900, t0 + 3000, transaction_id=txid) is None
    assert rig_b.commits == [] and rig_b.session_docs() == [] and ("CP-1", txid) in rig_b.bridge.held
    rig_b.bridge.document_changed("some-other-doc")
    assert await rig_b.bridge.apply_held() == 0 and ("CP-1", txid) in rig_b.bridge.held  # not this one yet
    rig_b.replica.docs[sid] = rig_a.replica.docs[sid].fork()  # the document arrives, as replication brings it
    rig_b.bridge.document_changed(sid)
    assert await rig_b.bridge.apply_held() == 3
    assert await rig_b.bridge.apply_held() == 0 and len(rig_b.bridge.held) == 0
    # The charger's resends after the arrival change nothing either.
    await rig_b.bridge.meter("CP-1", [reading(t0 + 1000, 1300)], transaction_id=txid)
    await rig_b.bridge.stop_transaction("CP-1", 1900, t0 + 3000, transaction_id=txid)
    assert [(e["type"], e["device_id"], e["meter_wh"], e["ts"]) for e in rig_b.events(sid)] == [
        ("authorize", "n1", None, t0), ("start", "n1", 1000, t0),
        ("meter", "n2", 1300, t0 + 1000), ("meter", "n2", 1600, t0 + 2000), ("stop", "n2", 1900, t0 + 3000),
    ]  # fmt: skip
    session = rig_b.sessions.session_json(sid)
    assert session["state"] == "completed" and session["energy_wh"] == 900


async def test_the_hook_wakes_the_held_messages_task_when_the_document_arrives():
    import trio

    rig_a, rig_b = Rig(node_id="n1"), Rig(node_id="n2")
    started = await rig_a.bridge.start_transaction("CP-1", 1, "TAG", 0, NOW_MS - 60_000)
    await rig_b.bridge.stop_transaction("CP-1", 500, NOW_MS - 1000, transaction_id=started.transaction_id)
    async with trio.open_nursery() as nursery:
        await nursery.start(rig_b.bridge.serve_held)
        rig_b.replica.docs[started.session_id] = rig_a.replica.docs[started.session_id].fork()
        rig_b.bridge.document_changed(started.session_id)
        with trio.fail_after(5):
            while rig_b.bridge.held:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert rig_b.sessions.session_json(started.session_id)["energy_wh"] == 500


def test_held_messages_are_bounded_in_count_bytes_and_age():
    from meshnode.ocpp import HeldMessages

    held = HeldMessages(max_transactions=2, max_readings=3, max_bytes=100, max_age_ms=1000)
    stop = {"meter_stop_wh": 9, "ts_ms": 9, "signed": ()}
    assert held.hold_reading(("CP-1", 1), "a", reading(5, 50), 0) and held.hold_reading(
        ("CP-1", 2), "b", reading(5, 5), 0
    )
    assert not held.hold_reading(("CP-2", 3), "c", reading(5, 5), 0)  # a third transaction
    assert not held.hold_stop(("CP-2", 3), "s", stop, 0) and len(held) == 2
    for ts in (4, 1, 3, 2):  # beyond 3 readings the earliest go
        held.hold_reading(("CP-1", 1), f"r{ts}", reading(ts, ts), 10)
    assert held.hold_stop(("CP-1", 1), "s", stop, 10)
    assert not held.hold_reading(("CP-1", 1), "big", reading(6, 6, [{"value": "x" * 200}]), 10)  # over the bytes
    readings, kept = held.take(("CP-1", 1))
    assert [r.ts_ms for _, r in readings] == [3, 4, 5] and kept == ("s", stop) and held.bytes == 0
    assert held.expire(1001) == [("CP-1", 2)] and len(held) == 0
