"""The session and site-config services, alone (no node, no store), and the API's error table.

The services are wired here the way the node wires them, with a `commit` that records
what would be stored: a refused command must raise its domain error and commit
nothing, leave the document as it was, and a re-read after one new event must verify
only that event.
"""

from __future__ import annotations

import random
from pathlib import Path

import httpx
import pytest
import trio

from crdt import (
    EVENT_CACHE,
    SITE_CONFIG_ID,
    EventSigner,
    Keyring,
    Replica,
    new_site_config,
)
from meshnode._api import ERROR_STATUS, build_app, status_of
from meshnode._discovery import StaticDiscovery
from meshnode._node import Node, NodeConfig
from meshnode._security import Limits
from meshnode._transport import MemoryNetwork
from meshnode.services import (
    Conflict,
    InvalidCommand,
    NotAuthorised,
    NotFound,
    ServiceError,
    SessionService,
    SiteConfigService,
)

from .conftest import make_signer

NOW = 1_800_000_000.0


class Rig:
    """A session service and a site-config service over one replica, committing into a list."""

    def __init__(self, *, policy: str = "accept_limited", limits: Limits | None = None) -> None:
        self.replica = Replica()
        self.replica.add(SITE_CONFIG_ID, new_site_config("site"))
        self.signer: EventSigner = make_signer("n1")
        self.commits: list[tuple[str, int]] = []
        self.clock = NOW

        async def commit(doc_id: str, changes: list[tuple[bytes, bytes]]) -> None:
            self.commits.append((doc_id, len(changes)))

        self.site_config = SiteConfigService(
            replica=self.replica, identity=None, sealer=None, actor=lambda d: b"a" * 16, commit=commit,
            wall_clock=lambda: self.clock, unknown_token_policy=policy, unknown_token_limits=limits,
        )  # fmt: skip
        self.sessions = SessionService(
            node_id="n1", site="site", replica=self.replica,
            site_config=self.site_config, signer=lambda: self.signer,
            keyring=Keyring({"n1": self.signer.public_key}), identity=None, actor=lambda d: b"a" * 16,
            rng=random.Random(1), wall_clock=lambda: self.clock, commit=commit,
        )  # fmt: skip


async def test_create_and_record_commit_durable_changes():
    rig = Rig()
    session = await rig.sessions.create("c1", 1, "TOKEN", meter_wh=100)
    sid = session["session_id"]
    assert session["state"] == "charging" and rig.commits == [(sid, 3)]
    event = await rig.sessions.record(sid, "meter", 400)
    assert event["type"] == "meter" and event["meter_wh"] == 400
    assert rig.sessions.session_json(sid)["energy_wh"] == 300
    assert rig.sessions.automerge_bytes(sid) == rig.replica.docs[sid].save()


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (("nope", "meter", 1), NotFound, "no session"),
        ((SITE_CONFIG_ID, "meter", 1), NotFound, "no session"),
        ((None, "explode", 1), InvalidCommand, "type must be one of"),
        ((None, "meter", None), InvalidCommand, "needs meter_wh"),
        ((None, "resume", None), Conflict, "cannot resume a session that is charging"),
        ((None, "meter", 99), Conflict, "below the last reading"),
    ],
)
async def test_a_refused_command_raises_its_domain_error_and_changes_nothing(args, error, match):
    rig = Rig()
    sid = (await rig.sessions.create("c1", 1, "TOKEN", meter_wh=100))["session_id"]
    heads, commits, seq = rig.replica.docs[sid].get_heads(), list(rig.commits), rig.signer.seq
    with pytest.raises(error, match=match):
        await rig.sessions.record(args[0] or sid, *args[1:])
    assert rig.replica.docs[sid].get_heads() == heads and rig.commits == commits and rig.signer.seq == seq


async def test_a_refused_driver_is_not_authorised_and_nothing_is_created():
    rig = Rig(policy="refuse")
    with pytest.raises(NotAuthorised, match="unknown_refused"):
        await rig.sessions.create("c1", 1, "WALK-IN")
    assert list(rig.replica.docs) == [SITE_CONFIG_ID] and rig.commits == []


async def test_an_offline_limit_stops_the_session():
    rig = Rig(limits=Limits(max_wh=1000))
    sid = (await rig.sessions.create("c1", 1, "WALK-IN", meter_wh=0))["session_id"]
    await rig.sessions.record(sid, "meter", 600)
    assert rig.sessions.session_json(sid)["state"] == "charging"
    await rig.sessions.record(sid, "meter", 1000)
    session = rig.sessions.session_json(sid)
    assert session["state"] == "completed" and session["events"][-1]["type"] == "stop"


async def test_time_limit_stops_the_session():
    rig = Rig(limits=Limits(max_minutes=30))
    sid = (await rig.sessions.create("c1", 1, "WALK-IN", meter_wh=0))["session_id"]
    rig.clock += 30 * 60
    await rig.sessions.record(sid, "meter", 10)
    assert rig.sessions.session_json(sid)["state"] == "completed"


async def test_re_reading_after_one_event_verifies_only_that_event():
    rig = Rig()
    sid = (await rig.sessions.create("c1", 1, "TOKEN", meter_wh=0))["session_id"]
    for wh in range(10, 200, 10):
        await rig.sessions.record(sid, "meter", wh)
    rig.sessions.session_json(sid)
    before = EVENT_CACHE.verifications
    await rig.sessions.record(sid, "meter", 500)  # folds once (to check it), then re-read below
    view = rig.sessions.fold(sid)[1]
    assert view.last_meter_wh == 500
    assert EVENT_CACHE.verifications - before == 1


async def test_an_unverifiable_site_entry_is_an_invalid_command():
    rig = Rig()
    heads = rig.replica.docs[SITE_CONFIG_ID].get_heads()
    with pytest.raises(InvalidCommand, match="cannot verify site entries"):
        await rig.site_config.add_entry(b"\x01\x02")
    assert rig.replica.docs[SITE_CONFIG_ID].get_heads() == heads and rig.commits == []


# --- the HTTP API: one table gives the codes ---------------------------------------


def test_every_service_error_has_one_status():
    assert {cls.__name__: code for cls, code in ERROR_STATUS.items()} == {
        "NotFound": 404, "NotAuthorised": 403, "InvalidCommand": 400, "Conflict": 409,
    }  # fmt: skip

    class Narrower(Conflict):
        pass

    assert status_of(Narrower("x")) == 409 and status_of(ServiceError("x")) == 400


async def test_the_api_answers_service_errors_with_their_codes(tmp_path: Path, autojump_clock):
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery, net.transport("10.0.0.1:5683") as transport:
        node = Node(
            NodeConfig(node_id="n1", data_dir=tmp_path / "n1", seed=7, unknown_token_policy="refuse"),
            transport=transport, discovery=StaticDiscovery([]), wall_clock=lambda: NOW + trio.current_time(),
        )  # fmt: skip
        await nursery.start(node.serve)
        app = httpx.ASGITransport(app=build_app(node))
        async with httpx.AsyncClient(transport=app, base_url="http://node") as client:

            async def post(path: str, body: object) -> httpx.Response:
                return await client.post(path, json=body)

            refused = await post(
                "/v1/sessions", {"charger": "c1", "connector": 1, "id_token": "WALK-IN", "meter_wh": 0}
            )
            assert (refused.status_code, refused.json()) == (403, {"error": "not authorised offline: unknown_refused"})
            missing = await client.get("/v1/sessions/nope")
            assert missing.status_code == 404 and "no session" in missing.json()["error"]
            assert (await client.get("/v1/sessions/nope/automerge")).status_code == 404
            assert (await post("/v1/sessions/nope/events", {"type": "meter", "meter_wh": 1})).status_code == 404
            assert (await post("/v1/site/entries", {"entry": "0102"})).status_code == 400
            # Refused before any service sees it: not JSON, wrong field types.
            garbage = await client.post("/v1/sessions", content=b"{nope")
            assert garbage.status_code == 400 and "not valid JSON" in garbage.json()["error"]
            assert (
                await post("/v1/sessions", {"charger": "c1", "connector": "x", "id_token": "T", "meter_wh": 0})
            ).status_code == 400
        nursery.cancel_scope.cancel()


async def test_the_api_maps_a_conflict_to_409(tmp_path: Path, autojump_clock):
    net = MemoryNetwork()
    async with trio.open_nursery() as nursery, net.transport("10.0.0.1:5683") as transport:
        node = Node(
            NodeConfig(node_id="n1", data_dir=tmp_path / "n1", seed=7),
            transport=transport, discovery=StaticDiscovery([]), wall_clock=lambda: NOW + trio.current_time(),
        )  # fmt: skip
        await nursery.start(node.serve)
        app = httpx.ASGITransport(app=build_app(node))
        async with httpx.AsyncClient(transport=app, base_url="http://node") as client:
            created = await client.post(
                "/v1/sessions", json={"charger": "c1", "connector": 1, "id_token": "T", "meter_wh": 0}
            )
            assert created.status_code == 201
            sid = created.json()["session_id"]
            ok = await client.post(f"/v1/sessions/{sid}/events", json={"type": "meter", "meter_wh": 50})
            assert ok.status_code == 201 and ok.json()["session"]["state"] == "charging"
            back = await client.post(f"/v1/sessions/{sid}/events", json={"type": "meter", "meter_wh": 40})
            assert back.status_code == 409 and "below the last reading" in back.json()["error"]
            resume = await client.post(f"/v1/sessions/{sid}/events", json={"type": "resume"})
            assert resume.status_code == 409
        nursery.cancel_scope.cancel()


async def test_a_retried_start_with_its_request_id_finds_the_first_session(tmp_path: Path, autojump_clock):
    """A charger that lost the 201 of a start retries it: the same request id must not
    start a second session (the cloud would bill one nobody charged), also after a restart."""
    net = MemoryNetwork()
    config = NodeConfig(node_id="n1", data_dir=tmp_path / "n1", seed=7)
    body = {"charger": "c1", "connector": 1, "id_token": "T", "meter_wh": 10, "request_id": "c1-start-1"}
    for restart in range(2):
        async with trio.open_nursery() as nursery, net.transport("10.0.0.1:5683") as transport:
            node = Node(config, transport=transport, discovery=StaticDiscovery([]),
                        wall_clock=lambda: NOW + trio.current_time())  # fmt: skip
            await nursery.start(node.serve)
            app = httpx.ASGITransport(app=build_app(node))
            async with httpx.AsyncClient(transport=app, base_url="http://node") as client:
                if restart == 0:
                    first = await client.post("/v1/sessions", json=body)
                    assert first.status_code == 201
                    sid = first.json()["session_id"]
                    other = await client.post("/v1/sessions", json={**body, "request_id": "c1-start-2"})
                    assert other.status_code == 201 and other.json()["session_id"] != sid
                    plain = await client.post("/v1/sessions", json={k: v for k, v in body.items() if k != "request_id"})
                    assert plain.status_code == 201 and plain.json()["session_id"] not in (
                        sid,
                        other.json()["session_id"],
                    )
                again = await client.post("/v1/sessions", json=body)
                assert again.status_code == 200, again.text
                assert again.json()["session_id"] == sid and "existing" not in again.json()
                assert len((await client.get("/v1/sessions")).json()["sessions"]) == 3
                bad = await client.post("/v1/sessions", json={**body, "request_id": ""})
                assert bad.status_code == 400
            nursery.cancel_scope.cancel()
