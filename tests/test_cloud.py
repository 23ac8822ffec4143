"""The reference cloud reconciliation service: ledger, receipts, conflicts, bad input.

The core flows run against SQLite and a real PostgreSQL server (`tests/pg.py`).
The leader is played by a `crdt.Replica` speaking the wire format; the main flow
goes over real HTTP (Hypercorn on a free port), the rest through httpx's ASGI
transport, which runs the same app in-process.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import cbor2
import httpx
import nacl.signing
import pytest
import trio
from automerge.core import ROOT, Document, ScalarType

from crdt import (
    EventSigner,
    Keyring,
    Replica,
    add_event,
    fold_session,
    new_session_doc,
    read_session,
    set_receipt,
)
from uplink._cloud import (
    BROKEN_CHAIN,
    FORK,
    LATE,
    OK,
    ChainLink,
    CloudKeyError,
    ReceiptError,
    check_chains,
    create_cloud_app,
    default_key_path,
    load_or_create_cloud_key,
    make_receipt,
    open_cloud,
    serve_cloud,
    sync_message_carries_changes,
    verify_receipt,
)
from uplink._ledger import LedgerUrlError, parse_db_url
from uplink._wire import MAX_INFLATED, CloudSyncRequest, CloudSyncResponse, compress, decompress

from .conftest import make_signer
from .pg import pg_server, pg_url  # noqa: F401  (fixtures)

TARIFF: Mapping[str, Any] = {}
"""No tariff: these tests bill energy (unpriced); prices are tests/test_tariffs.py's."""
CLOUD_KEY = nacl.signing.SigningKey(b"cloud".ljust(32, b"\0"))
CLOUD = "cloud"  # the leader's name for the cloud as a sync peer


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/cloud.db"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def sqlite_url(tmp_path: Any) -> str:
    return f"sqlite:///{tmp_path}/cloud.db"


# --- building sessions ---------------------------------------------------------------


def new_doc(session_id: str, tariff: Mapping[str, Any] = TARIFF) -> Document:
    return new_session_doc(
        session_id, site="field", charger="c1", connector=1, id_token="tok", tariff=tariff, created_by="node-a"
    )


def put(doc: Document, signer: EventSigner, kind: str, session_id: str, ts: int, meter: int | None = None) -> str:
    event = signer.sign(kind, session_id, ts, meter_wh=meter)
    add_event(doc, event, public_key=signer.public_key)
    return event.event_id


def completed(session_id: str, signer: EventSigner, start: int = 1000, stop: int = 4200, ts: int = 1000) -> Document:
    doc = new_doc(session_id)
    put(doc, signer, "authorize", session_id, ts)
    put(doc, signer, "start", session_id, ts + 1, start)
    put(doc, signer, "meter", session_id, ts + 2, (start + stop) // 2)
    put(doc, signer, "stop", session_id, ts + 3, stop)
    return doc


def copy(doc: Document) -> Document:
    return Document.load(doc.save())


def receipt_of(doc: Document) -> bytes | None:
    return read_session(doc).receipt


# --- playing the leader ---------------------------------------------------------------


def request_body(node: str, msgs: Mapping[str, bytes | None], reset: Iterable[str] = ()) -> bytes:
    return compress(CloudSyncRequest(node, "field", dict(msgs), tuple(reset)).encode())


async def post(client: httpx.AsyncClient, body: bytes, **headers: str) -> httpx.Response:
    return await client.post("/v1/sync", content=body, headers={"Content-Encoding": "deflate", **headers})


class Leader:
    """A site's leader: a Replica of session documents and the cloud wire format."""

    def __init__(self, node_id: str, docs: Mapping[str, Document]) -> None:
        self.node_id = node_id
        self.replica = Replica(docs)
        self.bodies: list[bytes] = []
        self.errors: dict[str, str] = {}

    async def sync(
        self, client: httpx.AsyncClient, doc_ids: Iterable[str] | None = None, *, reset: bool = False
    ) -> None:
        """Run sync rounds until neither side has anything to say."""
        ids = sorted(doc_ids if doc_ids is not None else self.replica.docs)
        first = True
        for _ in range(12):
            ids = [d for d in ids if d not in self.errors]
            msgs = {d: self.replica.generate(CLOUD, d) for d in ids}
            body = request_body(self.node_id, msgs, ids if reset and first else ())
            first = False
            self.bodies.append(body)
            response = await post(client, body)
            assert response.status_code == 200, response.text
            assert response.headers["content-type"] == "application/cbor"
            assert response.headers["content-encoding"] == "deflate"
            reply = CloudSyncResponse.decode(response.content)  # httpx inflated it
            for doc_id, error in reply.errors.items():
                self.errors[doc_id] = error
                self.replica.book.reset(CLOUD, doc_id)
            for doc_id, msg in reply.msgs.items():
                self.replica.receive(CLOUD, doc_id, msg)
            if not reply.msgs and all(m is None for m in msgs.values()):
                return
        raise AssertionError("sync did not settle")


@asynccontextmanager
async def asgi_cloud(db_url: str, **kwargs: Any) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    kwargs.setdefault("signing_key", CLOUD_KEY)
    kwargs.setdefault("wall_clock", lambda: 1_700_000_000.0)
    async with open_cloud(db_url, **kwargs) as cloud:
        transport = httpx.ASGITransport(app=cloud.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cloud") as client:
            yield cloud, client


async def state(client: httpx.AsyncClient) -> tuple[Any, Any, Any]:
    sessions = (await client.get("/v1/sessions")).json()
    conflicts = (await client.get("/v1/conflicts")).json()
    stats = (await client.get("/v1/stats")).json()
    return sessions, conflicts, stats


TRAFFIC = (
    "requests",
    "messages",
    "messages_refused",
    "bytes_received",
    "bytes_received_inflated",
    "duplicates_rejected",
)


def content(stats: Mapping[str, int]) -> dict[str, int]:
    """The counters that describe what the cloud holds, not the traffic it saw."""
    return {k: v for k, v in stats.items() if k not in TRAFFIC}


def by_id(sessions: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["session_id"]: row for row in sessions["sessions"]}


# --- the main flow, over real HTTP -----------------------------------------------------


async def test_completed_session_is_billed_once_and_gets_a_receipt_over_http(db_url: str, tmp_path: Any) -> None:
    signer = make_signer("charger-1")
    done = completed("s-1", signer)
    charging = new_doc("s-2")
    put(charging, signer, "authorize", "s-2", 2000)
    put(charging, signer, "start", "s-2", 2001, 0)
    put(charging, signer, "meter", "s-2", 2002, 700)
    leader = Leader("node-a", {"s-1": done, "s-2": charging})
    key_path = tmp_path / "cloud.key"

    async with trio.open_nursery() as nursery:
        urls = await nursery.start(partial(serve_cloud, db_url, "127.0.0.1", 0, key_path=key_path))
        async with httpx.AsyncClient(base_url=urls[0]) as client:
            assert (await client.get("/healthz")).json() == {"ok": True}
            await leader.sync(client)
            sessions, conflicts, stats = await state(client)
            detail = (await client.get("/v1/sessions/s-1")).json()
            issuer = (await client.get("/v1/issuer")).json()["issuer"]
        nursery.cancel_scope.cancel()

    cloud_key = load_or_create_cloud_key(key_path)  # created by serve_cloud, 0600
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    assert issuer == bytes(cloud_key.verify_key).hex()
    rows = by_id(sessions)
    assert set(rows) == {"s-1", "s-2"}
    s1 = rows["s-1"]
    # The site has no tariff: energy billed, no money (docs/cloud.md, "Tariffs").
    assert (s1["energy_wh"], s1["cost_cents"], s1["currency"], s1["tariff_id"]) == (3200, None, None, None)
    assert (s1["state"], s1["conflicts"], s1["start_ts"], s1["stop_ts"]) == ("reconciled", 0, 1001, 1003)
    assert (s1["site"], s1["charger"], s1["connector"], s1["id_token"]) == ("field", "c1", 1, "tok")
    s2 = rows["s-2"]
    assert (s2["state"], s2["energy_wh"], s2["cost_cents"], s2["receipt"]) == ("charging", 700, None, None)

    # The receipt travelled back in a response and sits in the leader's replica.
    blob = receipt_of(leader.replica.docs["s-1"])
    assert blob is not None and blob.hex() == s1["receipt"]
    receipt = verify_receipt(blob, cloud_key.verify_key.encode())
    assert (receipt["session_id"], receipt["energy_wh"], receipt["priced"]) == ("s-1", 3200, False)
    assert "cost_cents" not in receipt and "currency" not in receipt and "tariff_id" not in receipt
    assert [h.hex() for h in receipt["heads"]] == s1["receipt_heads"]
    _, view = fold_session(leader.replica.docs["s-1"], Keyring(), trust_document_keys=True)
    assert view.state == "reconciled"
    assert receipt_of(leader.replica.docs["s-2"]) is None

    assert [e["status"] for e in detail["events"]] == [OK] * 4 and all(e["applied"] for e in detail["events"])
    assert detail["conflicts"] == [] and conflicts == {"conflicts": []}
    inflated = sum(len(decompress(b)) for b in leader.bodies)
    assert stats == {
        "sessions": 2, "events": 7, "conflicts": 0, "receipts": 1, "duplicates_rejected": 0,
        "bytes_received": sum(len(b) for b in leader.bodies), "bytes_received_inflated": inflated,
        "requests": len(leader.bodies), "messages": stats["messages"], "messages_refused": 0,
    }  # fmt: skip


async def test_resent_batches_and_a_second_leader_change_nothing(db_url: str) -> None:
    signer = make_signer("charger-1")
    docs = {"s-1": completed("s-1", signer), "s-2": completed("s-2", signer, 0, 1500, ts=5000)}
    pristine = {d: copy(doc) for d, doc in docs.items()}
    first = Leader("node-a", docs)
    async with asgi_cloud(db_url) as (cloud, client):
        await first.sync(client)
        before = await state(client)
        assert before[2]["receipts"] == 2 and before[2]["duplicates_rejected"] == 0
        receipts = {d: receipt_of(doc) for d, doc in first.replica.docs.items()}

        # The same batches again, byte for byte (a retry after a lost reply).
        carrying = 0
        for body in first.bodies:
            assert (await post(client, body)).status_code == 200
            msgs = CloudSyncRequest.decode(decompress(body)).msgs
            carrying += sum(1 for m in msgs.values() if m is not None and sync_message_carries_changes(m))
        assert carrying >= 2
        # A second leader with copies from before the receipts.
        second = Leader("node-b", pristine)
        await second.sync(client)
        # The first leader again, with fresh sync states.
        again = Leader("node-a", {d: copy(doc) for d, doc in first.replica.docs.items()})
        await again.sync(client, reset=True)

        after = await state(client)
        assert after[0] == before[0] and after[1] == before[1]
        assert after[2]["receipts"] == 2 and after[2]["sessions"] == 2 and after[2]["events"] == 8
        assert after[2]["duplicates_rejected"] == carrying
        for doc_id in docs:
            assert receipt_of(second.replica.docs[doc_id]) == receipts[doc_id]
            assert receipt_of(again.replica.docs[doc_id]) == receipts[doc_id]
            assert second.replica.docs[doc_id].get_heads() == cloud.replica.docs[doc_id].get_heads()


async def test_racing_leaders_get_one_receipt_per_session(sqlite_url: str) -> None:
    signer = make_signer("charger-1")
    docs = {f"s-{i}": completed(f"s-{i}", signer, 0, 100 * (i + 1), ts=1000 * i) for i in range(6)}
    leaders = [Leader(f"node-{n}", {d: copy(doc) for d, doc in docs.items()}) for n in "abc"]
    async with asgi_cloud(sqlite_url) as (_, client):
        async with trio.open_nursery() as nursery:
            for leader in leaders:
                nursery.start_soon(leader.sync, client)
        for leader in leaders:  # a last round so every leader hears the final state
            await leader.sync(client)
        sessions, conflicts, stats = await state(client)
    assert stats["receipts"] == stats["sessions"] == 6 and conflicts == {"conflicts": []}
    for doc_id, row in by_id(sessions).items():
        got = {receipt_of(leader.replica.docs[doc_id]) for leader in leaders}
        assert got == {bytes.fromhex(row["receipt"])}


async def test_restart_keeps_everything_and_a_reset_leader_resyncs_without_duplicates(db_url: str) -> None:
    signer = make_signer("charger-1")
    docs = {"s-1": completed("s-1", signer), "s-2": new_doc("s-2")}
    put(docs["s-2"], signer, "authorize", "s-2", 9000)
    pristine = {d: copy(doc) for d, doc in docs.items()}
    leader = Leader("node-a", docs)
    async with asgi_cloud(db_url) as (_, client):
        await leader.sync(client)
        before = await state(client)

    async with asgi_cloud(db_url) as (cloud, client):
        assert set(cloud.replica.docs) == {"s-1", "s-2"}
        assert await state(client) == before
        fresh = Leader("node-a", {d: copy(doc) for d, doc in leader.replica.docs.items()})
        await fresh.sync(client, reset=True)
        late = Leader("node-z", pristine)
        await late.sync(client)
        assert receipt_of(late.replica.docs["s-1"]) == receipt_of(leader.replica.docs["s-1"])
        after = await state(client)
        assert after[0] == before[0] and after[1] == before[1] and after[2]["receipts"] == 1

        # The session goes on after the restart and is billed once it stops.
        put(fresh.replica.docs["s-2"], signer, "start", "s-2", 9001, 100)
        put(fresh.replica.docs["s-2"], signer, "stop", "s-2", 9002, 600)
        await fresh.sync(client)
        rows = by_id((await client.get("/v1/sessions")).json())
    assert (rows["s-2"]["state"], rows["s-2"]["energy_wh"], rows["s-2"]["cost_cents"]) == ("reconciled", 500, None)
    assert receipt_of(fresh.replica.docs["s-2"]) is not None


# --- conflicts -----------------------------------------------------------------------


async def test_forged_event_is_a_conflict_and_never_billed(db_url: str) -> None:
    real = make_signer("charger-1")
    doc = new_doc("s-f")
    put(doc, real, "authorize", "s-f", 1)
    put(doc, real, "start", "s-f", 2, 1000)
    put(doc, real, "meter", "s-f", 3, 1500)
    # Someone without the device's key signs a stop with a huge reading in its name.
    impostor = EventSigner("charger-1", nacl.signing.SigningKey(b"evil".ljust(32, b"\0")), seq=real.seq, prev=real.prev)
    forged = impostor.sign("stop", "s-f", 4, meter_wh=90_000)
    add_event(doc, forged)
    put(doc, real, "stop", "s-f", 5, 2000)
    leader = Leader("node-a", {"s-f": doc})
    async with asgi_cloud(db_url) as (_, client):
        await leader.sync(client)
        detail = (await client.get("/v1/sessions/s-f")).json()
    row = detail["session"]
    assert (row["energy_wh"], row["cost_cents"], row["state"], row["conflicts"]) == (1000, None, "reconciled", 1)
    [conflict] = detail["conflicts"]
    assert (conflict["event_id"], conflict["kind"]) == (forged.event_id, "invalid_event")
    assert "bad_signature" in conflict["detail"]
    assert forged.event_id not in {e["event_id"] for e in detail["events"]}
    receipt = receipt_of(leader.replica.docs["s-f"])
    assert receipt is not None and verify_receipt(receipt, CLOUD_KEY.verify_key.encode())["energy_wh"] == 1000


async def test_forks_and_broken_chains_across_sessions_are_conflicts_not_billing(db_url: str) -> None:
    a = make_signer("charger-1")
    s_a = new_doc("s-a")
    put(s_a, a, "authorize", "s-a", 10)
    clone = EventSigner("charger-1", a.signing_key, seq=a.seq, prev=a.prev)  # a restored backup of the device
    put(s_a, a, "start", "s-a", 11, 0)
    put(s_a, a, "stop", "s-a", 12, 1000)
    s_b = new_doc("s-b")
    fork1 = put(s_b, clone, "authorize", "s-b", 20)  # seq 2 again
    fork2 = put(s_b, clone, "start", "s-b", 21, 0)  # seq 3 again
    broken = put(s_b, clone, "stop", "s-b", 22, 5000)  # seq 4, prev is not the accepted seq 3

    c = make_signer("charger-2")
    s_c = completed("s-c", c, 0, 500, ts=30)  # seq 1..4
    s_d = new_doc("s-d")
    c.prev = bytes(32)  # the device lost its chain head
    d1 = put(s_d, c, "authorize", "s-d", 40)
    d2 = put(s_d, c, "start", "s-d", 41, 0)
    d3 = put(s_d, c, "stop", "s-d", 42, 800)

    async with asgi_cloud(db_url) as (_, client):
        await Leader("node-a", {"s-a": s_a, "s-c": s_c}).sync(client)
        leader = Leader("node-b", {"s-b": s_b, "s-d": s_d})
        await leader.sync(client)
        sessions, conflicts, stats = await state(client)
        b_detail = (await client.get("/v1/sessions/s-b")).json()
        # Sending it all again adds nothing.
        await Leader("node-c", {d: copy(doc) for d, doc in leader.replica.docs.items()}).sync(client)
        again = await state(client)
        assert again[:2] == (sessions, conflicts) and content(again[2]) == content(stats)

    rows = by_id(sessions)
    assert (rows["s-a"]["state"], rows["s-a"]["energy_wh"], rows["s-a"]["conflicts"]) == ("reconciled", 1000, 0)
    assert (rows["s-c"]["state"], rows["s-c"]["energy_wh"], rows["s-c"]["conflicts"]) == ("reconciled", 500, 0)
    for doc_id in ("s-b", "s-d"):
        assert (rows[doc_id]["state"], rows[doc_id]["energy_wh"], rows[doc_id]["receipt"]) == ("idle", 0, None)
        assert rows[doc_id]["conflicts"] == 3
    found = {(c["session_id"], c["event_id"], c["kind"]) for c in conflicts["conflicts"]}
    assert found == {
        ("s-b", fork1, FORK), ("s-b", fork2, FORK), ("s-b", broken, BROKEN_CHAIN),
        ("s-d", d1, BROKEN_CHAIN), ("s-d", d2, BROKEN_CHAIN), ("s-d", d3, BROKEN_CHAIN),
    }  # fmt: skip
    assert {e["event_id"]: e["status"] for e in b_detail["events"]} == {fork1: FORK, fork2: FORK, broken: BROKEN_CHAIN}
    assert receipt_of(leader.replica.docs["s-b"]) is None


async def test_a_document_cannot_rekey_a_known_device(sqlite_url: str) -> None:
    real = make_signer("charger-1")
    first = completed("s-1", real)
    impostor = EventSigner("charger-1", nacl.signing.SigningKey(b"evil".ljust(32, b"\0")))
    second = new_doc("s-2")
    for kind, ts, meter in (("authorize", 1, None), ("start", 2, 0), ("stop", 3, 9000)):
        add_event(second, impostor.sign(kind, "s-2", ts, meter_wh=meter), public_key=impostor.public_key)
    async with asgi_cloud(sqlite_url) as (_, client):
        await Leader("node-a", {"s-1": first}).sync(client)
        await Leader("node-a", {"s-2": second}).sync(client)
        detail = (await client.get("/v1/sessions/s-2")).json()
    assert (detail["session"]["energy_wh"], detail["session"]["state"]) == (0, "idle")
    kinds = sorted(c["kind"] for c in detail["conflicts"])
    assert kinds == ["invalid_event"] * 3 + ["key_mismatch"]


async def test_configured_keys_only_when_document_keys_are_not_trusted(sqlite_url: str) -> None:
    enrolled, stranger = make_signer("charger-1"), make_signer("charger-9")
    docs = {"s-1": completed("s-1", enrolled), "s-9": completed("s-9", stranger)}
    async with asgi_cloud(sqlite_url, trusted_keys={"charger-1": enrolled.public_key}, trust_document_keys=False) as (
        _,
        client,
    ):
        await Leader("node-a", docs).sync(client)
        rows = by_id((await client.get("/v1/sessions")).json())
        conflicts = (await client.get("/v1/conflicts", params={"session_id": "s-9"})).json()["conflicts"]
    assert (rows["s-1"]["state"], rows["s-1"]["energy_wh"]) == ("reconciled", 3200)
    assert (rows["s-9"]["state"], rows["s-9"]["energy_wh"], rows["s-9"]["conflicts"]) == ("idle", 0, 4)
    assert all("unknown_key" in c["detail"] for c in conflicts)


async def test_events_after_the_receipt_are_kept_but_not_billed(sqlite_url: str) -> None:
    a, b = make_signer("charger-1"), make_signer("charger-2")
    doc = completed("s-1", a, 0, 1000, ts=100)
    leader = Leader("node-a", {"s-1": doc})
    async with asgi_cloud(sqlite_url) as (_, client):
        await leader.sync(client)
        receipt = receipt_of(leader.replica.docs["s-1"])
        # A reading from another device, taken before the stop, reaches the cloud late.
        late = put(leader.replica.docs["s-1"], b, "meter", "s-1", 102, 5000)
        await leader.sync(client)
        detail = (await client.get("/v1/sessions/s-1")).json()
    row = detail["session"]
    assert (row["energy_wh"], row["cost_cents"], row["state"]) == (1000, None, "reconciled")
    assert {e["event_id"]: e["status"] for e in detail["events"]}[late] == LATE
    assert [(c["event_id"], c["kind"]) for c in detail["conflicts"]] == [(late, LATE)]
    assert receipt_of(leader.replica.docs["s-1"]) == receipt


async def test_billed_events_the_fold_refuses_are_filed_as_conflicts(db_url: str) -> None:
    """Valid, chained events that the session's state machine refuses: billed nothing, filed as conflicts."""
    a, b = make_signer("charger-1"), make_signer("charger-2")
    doc = new_doc("s-1")
    put(doc, a, "authorize", "s-1", 100)
    put(doc, a, "start", "s-1", 101, 0)
    put(doc, a, "meter", "s-1", 102, 500)
    backwards = put(doc, b, "meter", "s-1", 103, 200)  # another meter on the session, behind the first
    put(doc, a, "stop", "s-1", 104, 1000)
    second_stop = put(doc, b, "stop", "s-1", 105, 1200)  # a stop after the stop
    leader = Leader("node-a", {"s-1": doc})
    async with asgi_cloud(db_url) as (_, client):
        await leader.sync(client)
        detail = (await client.get("/v1/sessions/s-1")).json()
        _, conflicts, stats = await state(client)
    row = detail["session"]
    assert (row["state"], row["energy_wh"], row["conflicts"]) == ("reconciled", 1000, 2)
    # Both are stored as chain-valid ("ok"): only the fold refuses them, and the fold's verdict is filed.
    assert {e["event_id"]: e["status"] for e in detail["events"]}[backwards] == OK
    filed = {(c["event_id"], c["kind"]) for c in detail["conflicts"]}
    assert filed == {(backwards, "meter_backwards"), (second_stop, "illegal_transition")}
    assert {(c["event_id"], c["kind"]) for c in conflicts["conflicts"]} == filed and stats["conflicts"] == 2
    assert verify_receipt(receipt_of(leader.replica.docs["s-1"]), CLOUD_KEY.verify_key.encode())["energy_wh"] == 1000  # type: ignore[arg-type]


async def test_a_billed_event_deleted_from_the_document_still_counts_and_is_reported(db_url: str) -> None:
    signer = make_signer("charger-1")
    doc = new_doc("s-1")
    put(doc, signer, "authorize", "s-1", 100)
    put(doc, signer, "start", "s-1", 101, 1000)
    reading = put(doc, signer, "meter", "s-1", 102, 1600)
    leader = Leader("node-a", {"s-1": doc})
    async with asgi_cloud(db_url) as (_, client):
        await leader.sync(client)
        assert (await client.get("/v1/sessions/s-1")).json()["session"]["energy_wh"] == 600
        # Someone with write access to the document deletes the reading (an Automerge delete is a change).
        held = leader.replica.docs["s-1"]
        events = held.get(ROOT, "events")[1]
        with held.transaction() as tx:
            tx.delete(events, reading)
        assert reading not in read_session(held).events
        await leader.sync(client)
        assert reading not in read_session(leader.replica.docs["s-1"]).events  # the cloud does not put it back
        detail = (await client.get("/v1/sessions/s-1")).json()
        await leader.sync(client)  # a re-send files nothing twice
        again = (await client.get("/v1/sessions/s-1")).json()
    row = detail["session"]
    assert (row["state"], row["energy_wh"], row["conflicts"]) == ("charging", 600, 1)  # still billed
    assert [(c["event_id"], c["kind"]) for c in detail["conflicts"]] == [(reading, "event_removed")]
    assert {e["event_id"]: e["status"] for e in detail["events"]}[reading] == OK
    assert again["conflicts"] == detail["conflicts"]


async def test_foreign_receipts_are_replaced_by_the_ledgers(sqlite_url: str) -> None:
    signer = make_signer("charger-1")
    doc = completed("s-1", signer)
    set_receipt(doc, cbor2.dumps({"session_id": "s-1", "cost_cents": 0}))  # a node forges one first
    leader = Leader("node-a", {"s-1": doc})
    async with asgi_cloud(sqlite_url) as (_, client):
        await leader.sync(client)
        genuine = receipt_of(leader.replica.docs["s-1"])
        assert verify_receipt(genuine, CLOUD_KEY.verify_key.encode())["energy_wh"] == 3200  # type: ignore[arg-type]
        set_receipt(leader.replica.docs["s-1"], b"overwritten later")
        await leader.sync(client)
        _, conflicts, stats = await state(client)
    assert receipt_of(leader.replica.docs["s-1"]) == genuine and stats["receipts"] == 1
    assert [c["kind"] for c in conflicts["conflicts"]] == ["foreign_receipt", "foreign_receipt"]


async def test_a_price_written_in_the_document_is_never_used(sqlite_url: str) -> None:
    """A session document's `tariff` map is a node's unsigned note: whatever price it
    holds, the cloud bills the energy and no money unless a site tariff prices it."""
    signer = make_signer("charger-1")
    docs = {}
    for sid, tariff in (("s-legacy", {"currency": "EUR", "per_kwh_cents": 39, "per_session_cents": 50}),
                        ("s-junk", {"currency": "EUR", "per_kwh_cents": "free"})):  # fmt: skip
        doc = docs[sid] = new_doc(sid, tariff=tariff)
        put(doc, signer, "authorize", sid, 1)
        put(doc, signer, "start", sid, 2, 0)
        put(doc, signer, "stop", sid, 3, 2000)
    leader = Leader("node-a", docs)
    async with asgi_cloud(sqlite_url) as (_, client):
        await leader.sync(client)
        for sid in docs:
            detail = (await client.get(f"/v1/sessions/{sid}")).json()
            row = detail["session"]
            assert (row["state"], row["energy_wh"], row["cost_cents"], row["currency"]) == (
                "reconciled",
                2000,
                None,
                None,
            )
            assert (row["tariff_id"], row["tariff_version"]) == (None, None) and detail["conflicts"] == []
            receipt = verify_receipt(receipt_of(leader.replica.docs[sid]), CLOUD_KEY.verify_key.encode())  # type: ignore[arg-type]
            assert receipt["priced"] is False and "cost_cents" not in receipt and receipt["energy_wh"] == 2000


# --- bad input -----------------------------------------------------------------------


def _cbor_request(obj: Any) -> bytes:
    return compress(cbor2.dumps(obj))


BAD_BODIES = {
    "not deflate": (b"this is not a zlib stream", 400),
    "deflate of garbage": (compress(b"\xff\xfe not cbor \x00"), 400),
    "truncated deflate": (compress(CloudSyncRequest("n", "field", {"s": None}).encode())[:-6], 400),
    "zip bomb": (compress(bytes(MAX_INFLATED + 1)), 400),
    "cbor list": (_cbor_request(["node", "site"]), 400),
    "no node": (_cbor_request({"site": "field", "msgs": {}}), 400),
    "msgs not a map": (_cbor_request({"node": "n", "site": "field", "msgs": [b"x"]}), 400),
    "empty message": (_cbor_request({"node": "n", "site": "field", "msgs": {"s-1": b""}}), 400),
    "node id too long": (_cbor_request({"node": "n" * 500, "site": "field", "msgs": {}}), 400),
    "reset not a list": (_cbor_request({"node": "n", "site": "field", "msgs": {}, "reset": "s-1"}), 400),
}


async def test_bad_bodies_get_a_json_4xx_and_change_nothing(sqlite_url: str) -> None:
    signer = make_signer("charger-1")
    leader = Leader("node-a", {"s-1": completed("s-1", signer)})
    async with asgi_cloud(sqlite_url) as (_, client):
        await leader.sync(client)
        before = await state(client)
        for name, (body, status) in BAD_BODIES.items():
            response = await post(client, body)
            assert response.status_code == status, name
            assert response.headers["content-type"] == "application/json", name
            assert response.json()["error"], name
        assert len(BAD_BODIES["zip bomb"][0]) < 64 * 1024
        plain = await client.post("/v1/sync", content=leader.bodies[0])
        assert plain.status_code == 415 and "deflate" in plain.json()["error"]
        huge = await post(client, os.urandom(9 * 1024 * 1024))
        assert huge.status_code == 413
        assert await state(client) == before
        assert (await client.get("/healthz")).json() == {"ok": True}
        # Still serving: a new session goes through.
        leader.replica.add("s-2", completed("s-2", signer, ts=7000))
        await leader.sync(client)
        assert (await client.get("/v1/stats")).json()["receipts"] == 2


async def test_per_document_refusals_leave_the_rest_of_the_batch_alone(sqlite_url: str) -> None:
    signer = make_signer("charger-1")
    not_a_session = Document()
    with not_a_session.transaction() as tx:
        tx.put(ROOT, "hello", ScalarType.Str, "world")
    misnamed = completed("s-real", signer)
    good = completed("s-1", signer, ts=5000)
    leader = Leader("node-a", {"x-1": not_a_session, "s-other": misnamed, "s-1": good})
    async with asgi_cloud(sqlite_url) as (cloud, client):
        # An invalid Automerge message next to valid ones.
        response = await post(client, request_body("node-a", {"s-bad": b"\x42garbage", "s-1": None}))
        reply = CloudSyncResponse.decode(response.content)
        assert response.status_code == 200 and set(reply.errors) == {"s-bad"} and "s-1" in reply.msgs
        await leader.sync(client)
        assert set(leader.errors) == {"x-1", "s-other"}
        assert "session document" in leader.errors["x-1"] and "s-real" in leader.errors["s-other"]
        assert set(cloud.replica.docs) == {"s-1"}
        before = await state(client)
        assert [r["session_id"] for r in before[0]["sessions"]] == ["s-1"]
        assert before[2]["messages_refused"] == 3

        # A change that turns a known session into something else is refused and rolled back.
        heads = cloud.replica.docs["s-1"].get_heads()
        with leader.replica.docs["s-1"].transaction() as tx:
            tx.put(ROOT, "session_id", ScalarType.Int, 42)
        await leader.sync(client, ["s-1"])
        assert "s-1" in leader.errors
        assert cloud.replica.docs["s-1"].get_heads() == heads
        after = await state(client)
        assert after[0] == before[0] and after[1] == before[1]
        assert (await client.get("/healthz")).status_code == 200


async def test_a_database_failure_is_a_503_and_leaves_memory_as_the_database(tmp_path: Any) -> None:
    path = tmp_path / "cloud.db"
    signer = make_signer("charger-1")
    leader = Leader("node-a", {"s-1": completed("s-1", signer)})
    async with asgi_cloud(f"sqlite:///{path}") as (cloud, client):
        await leader.sync(client)
        before = await state(client)
        heads = cloud.replica.docs["s-1"].get_heads()
        # Another process breaks the schema under the running service.
        with sqlite3.connect(path) as other:
            other.execute("ALTER TABLE stats RENAME TO stats_gone")
        put(leader.replica.docs["s-1"], signer, "meter", "s-1", 1004, 4300)
        leader.replica.add("s-2", completed("s-2", signer, ts=5000))
        failures = []
        for _ in range(3):
            msgs = {d: leader.replica.generate(CLOUD, d) for d in ("s-1", "s-2")}
            response = await post(client, request_body("node-a", msgs))
            if response.status_code != 200:
                failures.append(response)
                break
            for doc_id, msg in CloudSyncResponse.decode(response.content).msgs.items():
                leader.replica.receive(CLOUD, doc_id, msg)
        assert failures and failures[0].status_code == 503 and "database" in failures[0].json()["error"]
        assert cloud.replica.docs["s-1"].get_heads() == heads and "s-2" not in cloud.replica.docs
        with sqlite3.connect(path) as other:
            other.execute("ALTER TABLE stats_gone RENAME TO stats")
        assert await state(client) == before
        # The leader resets its sync states after a failure, as the wire protocol says.
        leader.replica.book.forget_peer(CLOUD)
        await leader.sync(client, reset=True)
        rows = by_id((await client.get("/v1/sessions")).json())
    assert set(rows) == {"s-1", "s-2"} and rows["s-2"]["state"] == "reconciled"
    assert cloud.replica.docs["s-1"].get_heads() != heads


def full_history(doc_id: str, doc: Document) -> bytes:
    """The sync message that carries a document's whole history to a peer that has nothing."""
    sender, receiver = Replica({doc_id: doc}), Replica()
    receiver.receive("s", doc_id, sender.generate("r", doc_id))  # type: ignore[arg-type]
    sender.receive("r", doc_id, receiver.generate("s", doc_id))  # type: ignore[arg-type]
    message = sender.generate("r", doc_id)
    assert message is not None and sync_message_carries_changes(message)
    return message


async def test_grafted_histories_and_engine_bombs_are_refused_per_document(sqlite_url: str) -> None:
    signer = make_signer("charger-1")
    leader = Leader("node-a", {"s-1": completed("s-1", signer)})
    # A second, independent creation of "s-1": its history would hide one side of every root key.
    history = full_history("s-1", completed("s-1", make_signer("charger-1"), 0, 99_000, ts=1))
    # A Bloom filter with an entry but zero bits per entry (Automerge would panic later).
    bomb = bytes([0x42, 0, 0, 1, 0, 3, 1, 0, 7, 0])
    async with asgi_cloud(sqlite_url) as (cloud, client):
        await leader.sync(client)
        before = await state(client)
        heads = cloud.replica.docs["s-1"].get_heads()
        for msgs in ({"s-1": history}, {"s-1": bomb, "s-2": bomb}):
            response = await post(client, request_body("node-x", msgs))
            reply = CloudSyncResponse.decode(response.content)
            assert response.status_code == 200 and set(reply.errors) == set(msgs)
        assert cloud.replica.docs["s-1"].get_heads() == heads and "s-2" not in cloud.replica.docs
        after = await state(client)
        assert after[:2] == before[:2] and content(after[2]) == content(before[2])
        await leader.sync(client, reset=True)  # and the cloud still serves the real leader
        assert (await client.get("/healthz")).json() == {"ok": True}


async def test_unknown_session_is_a_json_404(sqlite_url: str) -> None:
    async with asgi_cloud(sqlite_url) as (_, client):
        response = await client.get("/v1/sessions/nope")
    assert response.status_code == 404 and "nope" in response.json()["error"]


async def test_create_cloud_app_opens_the_database_in_its_lifespan(sqlite_url: str) -> None:
    app = create_cloud_app(sqlite_url, signing_key=CLOUD_KEY)
    leader = Leader("node-a", {"s-1": completed("s-1", make_signer("charger-1"))})
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cloud") as client:
            await leader.sync(client)
            assert (await client.get("/v1/stats")).json()["receipts"] == 1


# --- pure parts ----------------------------------------------------------------------


def test_receipts_verify_and_detect_tampering() -> None:
    blob = make_receipt(
        session_id="s", energy_wh=10, cost_cents=1, currency="EUR", heads=[bytes(32)], issued_ts=5,
        signing_key=CLOUD_KEY,
    )  # fmt: skip
    assert verify_receipt(blob, CLOUD_KEY.verify_key.encode())["energy_wh"] == 10
    assert verify_receipt(blob)["issuer"] == CLOUD_KEY.verify_key.encode().hex()
    other = nacl.signing.SigningKey(bytes(range(32)))
    with pytest.raises(ReceiptError, match="issued by"):
        verify_receipt(blob, other.verify_key.encode())
    tampered = cbor2.loads(blob) | {"cost_cents": 0}
    with pytest.raises(ReceiptError, match="signature"):
        verify_receipt(cbor2.dumps(tampered, canonical=True))
    for bad in (b"\xff", cbor2.dumps([1]), cbor2.dumps({"session_id": "s"})):
        with pytest.raises(ReceiptError):
            verify_receipt(bad)


def test_an_unpriced_receipt_carries_no_money_and_cannot_be_given_some() -> None:
    blob = make_receipt(
        session_id="s", energy_wh=10, cost_cents=None, currency=None, heads=[bytes(32)], issued_ts=5,
        signing_key=CLOUD_KEY, tariff=("std", 1),
    )  # fmt: skip
    receipt = verify_receipt(blob, CLOUD_KEY.verify_key.encode())
    assert receipt["priced"] is False and receipt["energy_wh"] == 10
    assert not {"cost_cents", "currency", "tariff_id", "tariff_version"} & set(receipt)
    signed = {k: v for k, v in cbor2.loads(blob).items() if k != "sig"}
    for forged in ({**signed, "cost_cents": 0}, {**signed, "priced": True}):
        forged["sig"] = CLOUD_KEY.sign(cbor2.dumps(forged, canonical=True)).signature  # even signed: wrong shape
        with pytest.raises(ReceiptError, match="priced|exactly"):
            verify_receipt(cbor2.dumps(forged, canonical=True))


def _link(event_id: str, seq: int, prev: bytes, chain: bytes, status: str = OK, device: str = "d") -> ChainLink:
    return ChainLink(event_id, device, seq, prev, chain, "s", status)


def test_check_chains_rules() -> None:
    h = [bytes([i]) * 32 for i in range(10)]
    zero = bytes(32)
    stored = [_link("e1", 1, zero, h[1]), _link("e2", 2, h[1], h[2]), _link("e4", 4, h[3], h[4])]
    verdicts = check_chains(
        [
            _link("f2", 2, h[1], h[9]),  # fork with e2
            _link("e3", 3, h[2], h[3]),  # fills the gap: links both ways
            _link("x5", 5, h[7], h[5]),  # does not point at e4
            _link("y6", 6, h[5], h[6]),  # extends the refused x5
            _link("z1", 1, h[7], h[8], device="other"),  # first event with a non-zero prev
        ],
        stored,
    )
    assert {v.event_id: v.status for v in verdicts} == {
        "f2": FORK, "e3": OK, "x5": BROKEN_CHAIN, "y6": BROKEN_CHAIN, "z1": BROKEN_CHAIN,
    }  # fmt: skip
    # The stored successor must point at a newcomer.
    assert check_chains([_link("w3", 3, h[2], h[0])], stored)[0].status == BROKEN_CHAIN
    # In one batch the smaller event_id wins a slot, whatever the input order.
    twins = [_link("b", 1, zero, h[1]), _link("a", 1, zero, h[2])]
    assert [(v.event_id, v.status) for v in check_chains(twins, [])] == [("a", OK), ("b", FORK)]
    assert [(v.event_id, v.status) for v in check_chains(twins[::-1], [])] == [("a", OK), ("b", FORK)]


def test_sync_message_carries_changes() -> None:
    doc = completed("s-1", make_signer("charger-1"))
    sender, receiver = Replica({"s-1": doc}), Replica()
    hello = sender.generate("r", "s-1")
    assert hello is not None and not sync_message_carries_changes(hello)
    receiver.receive("s", "s-1", hello)
    ask = receiver.generate("s", "s-1")
    assert ask is not None and not sync_message_carries_changes(ask)
    sender.receive("r", "s-1", ask)
    changes = sender.generate("r", "s-1")
    assert changes is not None and sync_message_carries_changes(changes)
    for junk in (b"", b"\x42", b"\x00\x01", b"\x42\xff\xff\xff"):
        assert not sync_message_carries_changes(junk)


def test_cloud_key_is_created_once_with_mode_0600(tmp_path: Any) -> None:
    path = tmp_path / "cloud.key"
    key = load_or_create_cloud_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert bytes(load_or_create_cloud_key(path)) == bytes(key)
    path.write_text("not hex\n")
    with pytest.raises(CloudKeyError):
        load_or_create_cloud_key(path)
    with pytest.raises(CloudKeyError):
        load_or_create_cloud_key(tmp_path / "missing-dir" / "cloud.key")


def test_database_urls() -> None:
    assert parse_db_url("sqlite:///rel/c.db") == ("sqlite", "rel/c.db")
    assert parse_db_url("sqlite:////abs/c.db") == ("sqlite", "/abs/c.db")
    assert parse_db_url("postgresql://u@h/db") == ("postgresql", "postgresql://u@h/db")
    assert str(default_key_path("sqlite:////var/lib/cloud.db")) == "/var/lib/cloud.db.key"
    for bad in ("mysql://h/db", "sqlite://", "/just/a/path"):
        with pytest.raises(LedgerUrlError):
            parse_db_url(bad)


async def test_sessions_authorised_offline_for_unknown_drivers_are_flagged_for_review(sqlite_url: str) -> None:
    signer = make_signer("charger-1")
    walk_in = new_doc("s-walk")
    event = signer.sign("authorize", "s-walk", 1000, data={"auth": "unknown_accepted", "review": True})
    add_event(walk_in, event, public_key=signer.public_key)
    put(walk_in, signer, "start", "s-walk", 1001, 0)
    put(walk_in, signer, "stop", "s-walk", 1002, 900)
    docs = {"s-walk": walk_in, "s-known": completed("s-known", signer, ts=2000)}
    async with asgi_cloud(sqlite_url) as (_, client):
        await Leader("node-a", docs).sync(client)
        rows = by_id((await client.get("/v1/sessions")).json())
    assert rows["s-walk"]["review"] == "unknown_accepted" and rows["s-walk"]["state"] == "reconciled"
    assert rows["s-known"]["review"] is None


async def test_only_devices_certified_by_the_site_are_trusted(sqlite_url: str) -> None:
    """`certify` (what `meshnode cloud --site` passes): certificates in the document decide."""
    enrolled, stranger = make_signer("charger-1"), make_signer("charger-9")
    certificate = b"CERT:" + enrolled.public_key

    def certify(device_id: str, declared: bytes) -> bytes | None:
        return declared[5:] if declared.startswith(b"CERT:") and device_id == "charger-1" else None

    good = new_doc("s-1")
    for kind, ts, meter in (("authorize", 1, None), ("start", 2, 0), ("stop", 3, 700)):
        add_event(good, enrolled.sign(kind, "s-1", ts, meter_wh=meter), public_key=certificate)
    docs = {"s-1": good, "s-9": completed("s-9", stranger)}  # the stranger declares a raw key only
    async with asgi_cloud(sqlite_url, certify=certify, trust_document_keys=False) as (_, client):
        await Leader("node-a", docs).sync(client)
        rows = by_id((await client.get("/v1/sessions")).json())
    assert (rows["s-1"]["state"], rows["s-1"]["energy_wh"]) == ("reconciled", 700)
    assert (rows["s-9"]["state"], rows["s-9"]["energy_wh"]) == ("idle", 0) and rows["s-9"]["conflicts"] == 4
