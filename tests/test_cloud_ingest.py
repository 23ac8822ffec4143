"""The batched ingest path (`uplink/_ingest.py`): many sessions per request, each exactly once.

The cloud reconciles everything one sync request changed as one batch: one read
and one write statement per table for all its sessions, in the request's one
transaction. These tests are about what batching could break: a bad session
must not take the good ones of its request with it nor let them land twice, a
failure part-way must leave nothing, decisions that used to follow each other
session by session (key pins, the cross-session chain) must come out the same,
and each event is decoded and verified once. Over the real app (httpx ASGI
transport), on SQLite and a real PostgreSQL server (`tests/pg.py`).
"""

from __future__ import annotations

import itertools
import sqlite3
from typing import Any

import nacl.signing
import pytest
from automerge.core import ROOT, Document, ScalarType

from crdt import (
    EVENT_CACHE,
    GENESIS_PREV,
    BadSignature,
    EventCache,
    EventError,
    EventSigner,
    Keyring,
    Replica,
    add_event,
    read_session,
)
from uplink._cloud import BROKEN_CHAIN, FORK, OK, verify_receipt
from uplink._wire import CloudSyncRequest, CloudSyncResponse, decompress

from .conftest import make_signer
from .test_cloud import (
    CLOUD,
    CLOUD_KEY,
    Leader,
    asgi_cloud,
    by_id,
    completed,
    content,
    copy,
    db_url,  # noqa: F401  (a fixture)
    new_doc,
    post,
    put,
    receipt_of,
    request_body,
    sqlite_url,  # noqa: F401  (a fixture)
    state,
)
from .pg import pg_server, pg_url  # noqa: F401  (fixtures)

GOOD = 24


def good_sessions(count: int = GOOD) -> dict[str, Document]:
    """Completed sessions of three chargers whose chains run across the sessions."""
    signers = [make_signer(f"charger-{d}") for d in range(3)]
    return {f"s-{k:03d}": completed(f"s-{k:03d}", signers[k % 3], 0, 100 * (k + 1), ts=1000 * k) for k in range(count)}


def not_a_session() -> Document:
    doc = Document()
    with doc.transaction() as tx:
        tx.put(ROOT, "hello", ScalarType.Str, "world")
    return doc


async def test_a_bad_session_is_refused_and_the_rest_of_its_batch_lands_once(db_url: str) -> None:
    docs = good_sessions()
    impostor = EventSigner("charger-1", nacl.signing.SigningKey(b"evil".ljust(32, b"\0")))
    rekeyed = new_doc("s-rekeyed")  # a key another session of the batch pinned: its events do not verify
    for kind, ts, meter in (("authorize", 1, None), ("start", 2, 0), ("stop", 3, 9000)):
        add_event(rekeyed, impostor.sign(kind, "s-rekeyed", ts, meter_wh=meter), public_key=impostor.public_key)
    bad = {"x-not-a-session": not_a_session(), "s-misnamed": completed("s-other", make_signer("charger-9"))}
    leader = Leader("node-a", {**docs, **bad, "s-rekeyed": rekeyed})
    async with asgi_cloud(db_url) as (cloud, client):
        # Everything in one request per round: the good sessions, the refused ones, and garbage.
        await leader.sync(client)
        response = await post(client, request_body("node-a", {"s-garbage": b"\x42garbage", "s-000": None}))
        assert response.status_code == 200
        sessions, conflicts, stats = await state(client)
        rows = by_id(sessions)

        assert set(leader.errors) == set(bad)
        assert set(rows) == {*docs, "s-rekeyed"} and not set(bad) & set(cloud.replica.docs)
        for doc_id in docs:
            row = rows[doc_id]
            assert (row["state"], row["conflicts"]) == ("reconciled", 0), doc_id
            assert bytes.fromhex(row["receipt"]) == receipt_of(leader.replica.docs[doc_id])
            assert verify_receipt(bytes.fromhex(row["receipt"]), CLOUD_KEY.verify_key.encode())["session_id"] == doc_id
        assert (rows["s-rekeyed"]["state"], rows["s-rekeyed"]["receipt"]) == ("idle", None)
        kinds = sorted(c["kind"] for c in conflicts["conflicts"])
        assert kinds == ["invalid_event"] * 3 + ["key_mismatch"]
        assert stats["receipts"] == GOOD and stats["sessions"] == GOOD + 1 and stats["events"] == 4 * GOOD

        # The whole batch again, byte for byte, and by a second leader from before the receipts.
        for body in leader.bodies:
            assert (await post(client, body)).status_code == 200
        await Leader("node-b", {d: copy(doc) for d, doc in {**docs, "s-rekeyed": rekeyed}.items()}).sync(client)
        again = await state(client)
        assert again[0] == sessions and again[1] == conflicts and content(again[2]) == content(stats)

        # One batch with late readings for receipted sessions, new sessions, and a bad one:
        # the receipted keep their receipt (the late events are not billed), the new get one.
        late_meter = make_signer("meter-7")
        late = {
            d: put(leader.replica.docs[d], late_meter, "meter", d, 1000 * int(d[2:]) + 2, 1) for d in list(docs)[:6]
        }
        more = {f"s-{k:03d}": completed(f"s-{k:03d}", make_signer(f"charger-{k}"), ts=1000 * k) for k in range(50, 56)}
        for doc_id, doc in {**more, "x-also-bad": not_a_session()}.items():
            leader.replica.add(doc_id, doc)
        await leader.sync(client)
        sessions, conflicts, stats = await state(client)
        rows = by_id(sessions)
        assert "x-also-bad" in leader.errors and "x-also-bad" not in rows
        assert stats["receipts"] == GOOD + len(more) and stats["sessions"] == GOOD + 1 + len(more)
        for doc_id in docs:
            assert rows[doc_id]["receipt"] == by_id(again[0])[doc_id]["receipt"]
            assert bytes.fromhex(rows[doc_id]["receipt"]) == receipt_of(leader.replica.docs[doc_id])
        for doc_id in more:
            assert rows[doc_id]["state"] == "reconciled" and rows[doc_id]["receipt"] is not None
        assert {(c["session_id"], c["event_id"]) for c in conflicts["conflicts"] if c["kind"] == "late"} == {
            (d, e) for d, e in late.items()
        }


async def test_a_failure_in_the_last_write_of_a_batch_leaves_nothing_and_the_retry_lands_once(
    tmp_path: Any,
) -> None:
    path = tmp_path / "cloud.db"
    docs = good_sessions()
    leader = Leader("node-a", docs)
    async with asgi_cloud(f"sqlite:///{path}") as (cloud, client):
        before = await state(client)
        # The documents are written last in a batch: everything written before them must roll back.
        with sqlite3.connect(path) as other:
            other.execute("CREATE TRIGGER full BEFORE INSERT ON documents BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        failed = None
        for _ in range(4):
            msgs = {d: leader.replica.generate(CLOUD, d) for d in docs}
            response = await post(client, request_body("node-a", msgs))
            if response.status_code != 200:
                failed = response
                break
            for doc_id, msg in CloudSyncResponse.decode(response.content).msgs.items():
                leader.replica.receive(CLOUD, doc_id, msg)
        assert failed is not None and failed.status_code == 503
        after = await state(client)
        assert not cloud.replica.docs and after[:2] == before[:2] and content(after[2]) == content(before[2])
        with sqlite3.connect(path) as other:
            assert other.execute("SELECT count(*) FROM events").fetchone() == (0,)
            assert other.execute("SELECT count(*) FROM conflicts").fetchone() == (0,)
            other.execute("DROP TRIGGER full")
        leader.replica.book.forget_peer(CLOUD)
        await leader.sync(client, reset=True)
        sessions, conflicts, stats = await state(client)
    assert stats["sessions"] == stats["receipts"] == GOOD and stats["events"] == 4 * GOOD
    assert conflicts == {"conflicts": []}
    assert all(receipt_of(leader.replica.docs[d]) is not None for d in docs)


async def test_chains_and_pins_across_sessions_of_one_batch_decide_as_one_at_a_time(db_url: str) -> None:
    """In one request: a device's chain running through two sessions is accepted; a fork
    between two sessions goes to the smaller event id (as inside one session); a chain
    that starts wrong is refused and so is what extends it; and the first session (by
    id) that declares a device's key pins it for the next ones."""
    a = make_signer("charger-1")
    first = completed("s-1", a, 0, 1000, ts=10)  # seq 1..4
    second = completed("s-2", a, 1000, 2500, ts=20)  # seq 5..8, linked to s-1
    c = make_signer("charger-3")
    twin = EventSigner("charger-3", c.signing_key)  # a restored backup: seq 1 signed twice
    fork_a, fork_b = new_doc("s-5"), new_doc("s-6")
    forks = {put(fork_a, c, "authorize", "s-5", 60): "s-5", put(fork_b, twin, "authorize", "s-6", 61): "s-6"}
    winner = min(forks)
    d = EventSigner("charger-4", make_signer("charger-4").signing_key, seq=0, prev=b"\1" * 32)
    lost = new_doc("s-7")
    bad_start = put(lost, d, "authorize", "s-7", 70)  # seq 1 with a prev that is not zeros
    extends = put(lost, d, "start", "s-7", 71, 0)  # extends the refused seq 1
    b = make_signer("charger-2")
    pinned_first = completed("s-3", b, 0, 700, ts=40)
    impostor = EventSigner("charger-2", nacl.signing.SigningKey(b"evil".ljust(32, b"\0")))
    rekeying = new_doc("s-4")
    for kind, ts, meter in (("authorize", 50, None), ("start", 51, 0), ("stop", 52, 100)):
        add_event(rekeying, impostor.sign(kind, "s-4", ts, meter_wh=meter), public_key=impostor.public_key)
    assert GENESIS_PREV != d.prev

    batch = {"s-1": first, "s-2": second, "s-3": pinned_first, "s-4": rekeying, "s-5": fork_a, "s-6": fork_b}
    batch["s-7"] = lost
    leader = Leader("node-a", batch)
    async with asgi_cloud(db_url) as (_, client):
        await leader.sync(client)
        assert leader.bodies and all(len(request_msgs(body)) == len(batch) for body in leader.bodies[:2])
        sessions, conflicts, _ = await state(client)
        statuses = {}
        for doc_id in ("s-5", "s-6", "s-7"):
            detail = (await client.get(f"/v1/sessions/{doc_id}")).json()
            statuses.update({e["event_id"]: e["status"] for e in detail["events"]})
    rows = by_id(sessions)
    assert (rows["s-1"]["state"], rows["s-1"]["energy_wh"], rows["s-1"]["conflicts"]) == ("reconciled", 1000, 0)
    assert (rows["s-2"]["state"], rows["s-2"]["energy_wh"], rows["s-2"]["conflicts"]) == ("reconciled", 1500, 0)
    assert (rows["s-3"]["state"], rows["s-3"]["energy_wh"]) == ("reconciled", 700)
    assert (rows["s-4"]["state"], rows["s-4"]["energy_wh"]) == ("idle", 0)
    assert statuses == {
        winner: OK, max(forks): FORK, bad_start: BROKEN_CHAIN, extends: BROKEN_CHAIN,
    }  # fmt: skip
    found = {(c["session_id"], c["event_id"], c["kind"]) for c in conflicts["conflicts"] if c["session_id"] != "s-4"}
    assert found == {
        (forks[max(forks)], max(forks), FORK), ("s-7", bad_start, BROKEN_CHAIN), ("s-7", extends, BROKEN_CHAIN),
    }  # fmt: skip
    assert sorted(c["kind"] for c in conflicts["conflicts"] if c["session_id"] == "s-4") == (
        ["invalid_event"] * 3 + ["key_mismatch"]
    )


def request_msgs(body: bytes) -> dict[str, Any]:
    return dict(CloudSyncRequest.decode(decompress(body)).msgs)


async def test_each_event_is_decoded_and_verified_once(sqlite_url: str) -> None:
    docs = good_sessions()
    events = {e for doc in docs.values() for e in read_session(doc).events.values()}
    EVENT_CACHE.clear()
    parses, verifications = EVENT_CACHE.parses, EVENT_CACHE.verifications
    async with asgi_cloud(sqlite_url) as (_, client):
        await Leader("node-a", docs).sync(client)
        stats = (await client.get("/v1/stats")).json()
    assert stats["receipts"] == GOOD
    assert EVENT_CACHE.parses - parses == len(events)
    assert EVENT_CACHE.verifications - verifications == len(events)


async def test_re_pricing_a_session_that_did_not_change_saves_no_document(tmp_path: Any) -> None:
    """A request that names an unpriced session makes the cloud reconcile it again (to
    price it if it can); when nothing changed, the stored document is not written again."""
    path = tmp_path / "cloud.db"
    signer = make_signer("charger-1")
    docs = {}
    for k in range(4):
        # No site tariff and still charging: unpriced and without a receipt (a completed
        # session would get its unpriced receipt, and only a tariff change prices it then).
        doc = new_doc(f"s-{k}", tariff={})
        put(doc, signer, "authorize", f"s-{k}", 10 * k)
        docs[f"s-{k}"] = doc
    clock = itertools.count(1_700_000_000)
    async with asgi_cloud(f"sqlite:///{path}", wall_clock=lambda: float(next(clock))) as (_, client):
        await Leader("node-a", docs).sync(client)
        with sqlite3.connect(path) as db:
            saved = db.execute("SELECT session_id, updated, heads_hash FROM documents ORDER BY session_id").fetchall()
            priced = dict(db.execute("SELECT session_id, updated FROM ledger").fetchall())
        response = await post(client, request_body("node-a", dict.fromkeys(docs)))
        assert response.status_code == 200
    with sqlite3.connect(path) as db:
        assert (
            db.execute("SELECT session_id, updated, heads_hash FROM documents ORDER BY session_id").fetchall() == saved
        )
        again = dict(db.execute("SELECT session_id, updated FROM ledger").fetchall())
    assert [r[0] for r in saved] == sorted(docs)
    assert all(again[d] > priced[d] for d in docs)  # reconciled again (re-priced), yet not re-saved


# --- the crdt parts the ingest path leans on ----------------------------------------------


def test_the_event_cache_parses_once_for_the_peek_and_the_signature_check() -> None:
    signer = make_signer("charger-1")
    event = signer.sign("authorize", "s-1", 10)
    cache = EventCache()
    assert cache.parse(event.encoded).record == event.record  # who signed it, before any key is trusted
    assert cache.verify(event.encoded, Keyring({"charger-1": signer.public_key})).chain_hash == event.chain_hash
    assert cache.verify(event.encoded, Keyring({"charger-1": signer.public_key})) is not None
    assert (cache.parses, cache.verifications, cache.hits) == (1, 1, 1)
    with pytest.raises(BadSignature):
        cache.verify(event.encoded, Keyring({"charger-1": make_signer("charger-2").public_key}))
    with pytest.raises(EventError):
        cache.parse(b"\xa1\x61a\x01")
    assert (cache.parses, cache.verifications) == (2, 2)


def test_a_replica_without_change_bytes_reports_the_same_changes_without_their_bytes() -> None:
    doc = completed("s-1", make_signer("charger-1"))
    full, lean = Replica(), Replica(change_bytes=False)
    sender = Replica({"s-1": doc})
    for receiver in (full, lean):
        msg = sender.generate(f"r{id(receiver)}", "s-1")
        assert msg is not None
        receiver.receive("sender", "s-1", msg)
        sender.receive(f"r{id(receiver)}", "s-1", receiver.generate("sender", "s-1") or b"")
        msg = sender.generate(f"r{id(receiver)}", "s-1")
        assert msg is not None
        receiver.changes = receiver.receive("sender", "s-1", msg)  # type: ignore[attr-defined]
    assert [h for h, _ in lean.changes] == [h for h, _ in full.changes] and full.changes  # type: ignore[attr-defined]
    assert all(b for _, b in full.changes) and not any(b for _, b in lean.changes)  # type: ignore[attr-defined]
    assert lean.docs["s-1"].get_heads() == full.docs["s-1"].get_heads() == doc.get_heads()
