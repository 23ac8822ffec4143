"""Forwarding to the cloud: the planner's decisions, and the forwarder against a fake cloud.

The fake cloud is a real Automerge peer: an `httpx.MockTransport` handler that holds a
`crdt.Replica`, decodes `CloudSyncRequest`s, applies their messages with one sync state
per (leader, document) and answers with its own. A script of outcomes per request lets
tests make it fail (HTTP 500, a timeout, or a lost response after applying the batch).
"""

from __future__ import annotations

import base64
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from automerge.core import Document
from hypothesis import given, settings
from hypothesis import strategies as st

from crdt import (
    EventSigner,
    InvalidSyncMessage,
    Keyring,
    Replica,
    add_event,
    add_note,
    fold,
    new_session_doc,
    read_session,
    set_receipt,
)
from uplink._forwarder import (
    CLOUD_PEER,
    CONFIRM_SIZE,
    PRIORITY_METER,
    PRIORITY_STATE,
    ForwardCounters,
    Forwarder,
    ForwardPlanner,
    change_priority,
    serve_forwarder,
)
from uplink._probe import CloudClient
from uplink._wire import MAX_BATCH_BYTES, CloudSyncRequest, CloudSyncResponse, compress, decompress

from .conftest import make_signer
import trio.lowlevel

KIB = 1024

# --- the planner ---------------------------------------------------------------------------


def planner(seed: int = 7, **kwargs: Any) -> ForwardPlanner:
    return ForwardPlanner(random.Random(seed), **kwargs)


def test_state_changes_go_before_meter_readings_then_oldest_first() -> None:
    p = planner()
    p.note_change("m1", PRIORITY_METER, 100)
    p.note_change("s1", PRIORITY_STATE, 100)
    p.note_change("m2", PRIORITY_METER, 100)
    p.note_change("s2", PRIORITY_STATE, 100)
    assert p.next_batch(0.0) == ["s1", "s2", "m1", "m2"]


def test_a_state_change_promotes_a_waiting_document_keeping_its_age() -> None:
    p = planner()
    p.note_change("a", PRIORITY_STATE, 10)
    p.note_change("m", PRIORITY_METER, 10)
    p.note_change("b", PRIORITY_STATE, 10)
    p.note_change("m", PRIORITY_STATE, 10)  # e.g. the session stopped
    p.note_change("a", PRIORITY_METER, 10)  # a later meter reading does not demote it
    assert p.next_batch(0.0) == ["a", "m", "b"]


def test_batches_are_bounded_by_size_hints_in_strict_order() -> None:
    p = planner()
    p.note_change("a", PRIORITY_STATE, 200 * KIB)
    p.note_change("b", PRIORITY_STATE, 100 * KIB)
    p.note_change("c", PRIORITY_STATE, 10 * KIB)
    # b does not fit after a; c would, but it does not jump ahead of b.
    assert p.next_batch(0.0) == ["a"]
    p.note_synced("a")
    p.on_success(0.0)
    assert p.next_batch(0.0) == ["b", "c"]
    assert p.next_batch(0.0, max_bytes=100 * KIB) == ["b"]


def test_hints_of_a_waiting_document_add_up() -> None:
    p = planner()
    p.note_change("a", PRIORITY_METER, 150 * KIB)
    p.note_change("b", PRIORITY_METER, 50 * KIB)
    assert p.next_batch(0.0) == ["a", "b"]
    p.note_change("a", PRIORITY_METER, 100 * KIB)  # a now hints 250 KiB
    assert p.next_batch(0.0) == ["a"]


def test_a_document_larger_than_the_bound_goes_alone() -> None:
    p = planner()
    p.note_change("huge", PRIORITY_STATE, 5 * 1024 * KIB)
    p.note_change("small", PRIORITY_STATE, 1 * KIB)
    assert p.next_batch(0.0) == ["huge"]
    p.note_synced("huge")
    p.on_success(1.0)
    assert p.next_batch(1.0) == ["small"]


def test_batches_are_bounded_by_document_count() -> None:
    p = planner(max_docs=3)
    for i in range(5):
        p.note_change(f"d{i}", PRIORITY_METER, 0)
    assert p.next_batch(0.0) == ["d0", "d1", "d2"]


def test_backoff_is_full_jitter_doubling_to_sixty_seconds() -> None:
    seed = 1234
    p = planner(seed)
    expected_rng = random.Random(seed)
    p.note_change("a", PRIORITY_STATE, 10)
    now = 100.0
    delays = []
    for n in range(10):
        assert p.next_batch(now) == ["a"]
        retry_at = p.on_failure(now)
        bound = min(60.0, 2.0**n)
        delay = retry_at - now
        assert 0.0 <= delay <= bound
        assert delay == pytest.approx(expected_rng.uniform(0.0, bound))
        delays.append(delay)
        assert p.next_deadline() == retry_at
        if delay > 0:
            assert p.next_batch(now + delay / 2) is None  # still backing off
        now = retry_at
    assert p.counters.failures == 10


def test_full_jitter_covers_the_whole_interval() -> None:
    """Over many seeds the n-th delay spreads across [0, bound], as full jitter should."""
    for n, bound in ((0, 1.0), (3, 8.0), (7, 60.0)):
        samples = []
        for seed in range(400):
            p = planner(seed)
            p.note_change("a", PRIORITY_STATE, 1)
            now = 0.0
            for _ in range(n + 1):
                delay = p.on_failure(now) - now
                now += delay
            samples.append(delay)
        assert 0.0 <= min(samples) < bound * 0.05
        assert bound * 0.95 < max(samples) <= bound
        assert sum(samples) / len(samples) == pytest.approx(bound / 2, rel=0.15)


def test_success_ends_the_backoff_series() -> None:
    p = planner(3)
    p.note_change("a", PRIORITY_STATE, 10)
    for _ in range(8):
        p.on_failure(0.0)
    p.on_success(50.0)
    assert p.next_deadline() == 50.0
    assert p.next_batch(50.0) == ["a"]
    assert p.on_failure(50.0) - 50.0 <= 1.0  # back to the first step
    assert p.counters.batches == 1 and p.counters.failures == 9


def test_same_seed_same_decisions() -> None:
    def run(seed: int) -> list[Any]:
        p = planner(seed)
        out: list[Any] = []
        for i in range(6):
            p.note_change(f"d{i}", i % 2, 40 * KIB * (i % 3 + 1))
        now = 0.0
        for _ in range(12):
            out.append(p.next_batch(now))
            now = p.on_failure(now)
            out.append(now)
        return out

    assert run(5) == run(5)
    assert run(5) != run(6)


def test_documents_waiting_counts_unconfirmed_documents() -> None:
    p = planner()
    assert p.counters == ForwardCounters(0, 0, 0, 0, 0)
    assert p.next_deadline() is None
    assert p.next_batch(0.0) == []
    p.note_change("a", PRIORITY_STATE, 1)
    p.note_change("b", PRIORITY_METER, 1)
    p.note_change("a", PRIORITY_METER, 1)
    assert p.counters.documents_waiting == 2
    assert p.next_batch(0.0) == ["a", "b"]
    p.note_synced("a")
    assert p.counters.documents_waiting == 1
    p.forget("b")
    assert p.counters.documents_waiting == 0
    assert p.next_deadline() is None


def test_a_change_during_flight_keeps_the_document_waiting() -> None:
    p = planner()
    p.note_change("a", PRIORITY_METER, 100)
    p.note_change("b", PRIORITY_METER, 100)
    assert p.next_batch(0.0) == ["a", "b"]
    p.note_change("b", PRIORITY_STATE, 7)  # arrives while the batch is out
    p.note_synced("a")
    p.note_synced("b")
    p.on_success(1.0)
    assert p.counters.documents_waiting == 1
    assert p.next_batch(1.0) == ["b"]
    p.note_synced("b")
    assert p.counters.documents_waiting == 0


def test_a_change_before_the_batch_is_confirmed_with_it() -> None:
    p = planner()
    p.note_change("a", PRIORITY_METER, 100)
    p.note_change("a", PRIORITY_STATE, 100)
    assert p.next_batch(0.0) == ["a"]
    p.note_synced("a")
    assert p.counters.documents_waiting == 0


def test_reset_all_brings_confirmed_documents_back_behind_waiting_ones() -> None:
    p = planner()
    for d in ("c", "a", "b"):
        p.note_change(d, PRIORITY_STATE, 50 * KIB)
    assert p.next_batch(0.0) == ["c", "a", "b"]
    p.note_synced("c")
    p.note_synced("a")
    p.on_success(0.0)
    p.note_change("z", PRIORITY_METER, 1)
    p.on_failure(1.0)
    p.reset_all()
    assert p.counters.documents_waiting == 4
    assert p.next_deadline() == float("-inf")  # no backoff left: due now
    # Still-waiting documents keep their place; the confirmed ones follow in id order.
    assert p.next_batch(1.0) == ["b", "z", "a", "c"]
    # Confirming a document the cloud probably has is assumed to cost CONFIRM_SIZE bytes.
    assert p.next_batch(1.0, max_bytes=50 * KIB + 1 + 2 * CONFIRM_SIZE) == ["b", "z", "a", "c"]
    assert p.next_batch(1.0, max_bytes=50 * KIB + 1 + 2 * CONFIRM_SIZE - 1) == ["b", "z", "a"]


def test_deferred_document_waits_alone() -> None:
    p = planner(11)
    p.note_change("bad", PRIORITY_STATE, 10)
    p.note_change("good", PRIORITY_STATE, 10)
    assert p.next_batch(0.0) == ["bad", "good"]
    not_before = p.defer("bad", 0.0)
    p.note_synced("good")
    p.on_success(0.0)
    assert 0.0 < not_before <= 1.0
    assert p.next_batch(not_before / 2) == []  # nothing else waits
    assert p.next_deadline() == not_before
    assert p.next_batch(not_before) == ["bad"]
    second = p.defer("bad", 10.0)
    assert 10.0 <= second <= 12.0  # its own series: second step, bound 2 s
    assert p.counters.deferred == 2 and p.counters.documents_waiting == 1


def test_planner_rejects_bad_input() -> None:
    p = planner()
    with pytest.raises(ValueError):
        p.note_change("a", 2, 1)
    with pytest.raises(ValueError):
        p.note_change("a", PRIORITY_STATE, -1)
    with pytest.raises(ValueError):
        ForwardPlanner(random.Random(1), base_delay=0.0)
    with pytest.raises(ValueError):
        ForwardPlanner(random.Random(1), max_docs=5000)


@dataclass
class _Model:
    """The planner's batching rule restated as plainly as possible."""

    waiting: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # doc -> (prio, seq, size)
    seq: int = 0

    def note(self, doc: str, prio: int, size: int) -> None:
        self.seq += 1
        if doc in self.waiting:
            p, s, z = self.waiting[doc]
            self.waiting[doc] = (min(p, prio), s, z + size)
        else:
            self.waiting[doc] = (prio, self.seq, size)

    def batch(self, limit: int) -> list[str]:
        out: list[str] = []
        total = 0
        for doc, (_, _, size) in sorted(self.waiting.items(), key=lambda kv: kv[1][:2]):
            if out and total + size > limit:
                break
            out.append(doc)
            total += size
        return out


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("note"), st.sampled_from("abcdefgh"), st.integers(0, 1), st.integers(0, 120 * KIB)),
            st.tuples(st.just("sync_first"), st.just(""), st.just(0), st.just(0)),
        ),
        max_size=60,
    )
)
def test_planner_matches_a_plain_model(ops: list[tuple[str, str, int, int]]) -> None:
    p, model = planner(), _Model()
    for op, doc, prio, size in ops:
        if op == "note":
            p.note_change(doc, prio, size)
            model.note(doc, prio, size)
        else:
            batch = p.next_batch(0.0)
            assert batch == model.batch(256 * KIB)
            if batch:
                p.note_synced(batch[0])
                del model.waiting[batch[0]]
            p.on_success(0.0)
        assert p.counters.documents_waiting == len(model.waiting)
    assert p.next_batch(0.0) == model.batch(256 * KIB)


def test_change_priority_from_the_fold(signer: EventSigner) -> None:
    doc = _session("s1", signer, events=1)
    before = fold_of(doc)
    assert change_priority(None, before) == PRIORITY_STATE
    add_event(doc, signer.sign("start", "s1", 2000, meter_wh=0), public_key=signer.public_key)
    started = fold_of(doc)
    assert change_priority(before, started) == PRIORITY_STATE
    add_event(doc, signer.sign("meter", "s1", 3000, meter_wh=50), public_key=signer.public_key)
    assert change_priority(started, fold_of(doc)) == PRIORITY_METER


# --- a fake cloud that is a real Automerge peer -----------------------------------------------


def _session(doc_id: str, signer: EventSigner, *, events: int = 2) -> Document:
    doc = new_session_doc(
        doc_id,
        site="field",
        charger="c1",
        connector=1,
        id_token="tok",
        tariff={"per_kwh_cents": 30},
        created_by="n1",
    )
    kinds = [("authorize", None), ("start", 0)] + [("meter", 100 * i) for i in range(1, 50)]
    for i, (kind, meter) in enumerate(kinds[:events]):
        add_event(doc, signer.sign(kind, doc_id, 1000 + i, meter_wh=meter), public_key=signer.public_key)
    return doc


def fold_of(doc: Document) -> Any:
    data = read_session(doc)
    return fold(data.session_id, data.events, Keyring(data.devices), receipt_present=data.receipt is not None)


@dataclass
class FakeCloud:
    """An Automerge peer behind `httpx.MockTransport`. `script` holds one outcome per request:
    "ok", "500", "timeout" (never answers), "lose" (applies the batch, then the answer is lost),
    "slow" (answers after 30 s)."""

    replica: Replica = field(default_factory=Replica)
    script: list[str] = field(default_factory=list)
    refuse: set[str] = field(default_factory=set)
    write_receipts: bool = False
    requests: list[CloudSyncRequest] = field(default_factory=list)
    applied: list[tuple[int, str, int]] = field(default_factory=list)  # (request no, doc, new changes)
    on_request: Any = None
    times: list[float] = field(default_factory=list)
    """When each request arrived (trio time), whatever its outcome."""
    body_sizes: list[int] = field(default_factory=list)
    """The size of each request body as it came over the wire (compressed)."""

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.times.append(trio.current_time())
        self.body_sizes.append(len(await request.aread()))
        mode = self.script.pop(0) if self.script else "ok"
        if mode == "500":
            return httpx.Response(500, json={"error": "ledger unavailable"})
        if mode == "timeout":
            await trio.sleep_forever()
        if mode == "slow":
            await trio.sleep(30)
        body = await request.aread()
        req = CloudSyncRequest.decode(decompress(body))
        self.requests.append(req)
        number = len(self.requests)
        if self.on_request is not None:
            self.on_request(req)
        peer = req.node_id
        for doc_id in req.reset:
            self.replica.book.reset(peer, doc_id)
        errors: dict[str, str] = {}
        for doc_id, msg in req.msgs.items():
            if doc_id in self.refuse:
                errors[doc_id] = "not a session of this site"
                continue
            if msg is not None:
                try:
                    new = self.replica.receive(peer, doc_id, msg, validate=read_session)
                except InvalidSyncMessage as exc:
                    errors[doc_id] = str(exc)
                    continue
                self.applied.append((number, doc_id, len(new)))
            doc = self.replica.docs.get(doc_id)
            if self.write_receipts and doc is not None and read_session(doc).receipt is None:
                set_receipt(doc, b"receipt:" + doc_id.encode())
        msgs = {}
        for doc_id in req.msgs:
            if doc_id not in errors:
                out = self.replica.generate(peer, doc_id)
                if out is not None:
                    msgs[doc_id] = out
        if mode == "lose":
            raise httpx.ReadError("connection reset after the request was applied", request=request)
        return httpx.Response(
            200,
            stream=httpx.ByteStream(compress(CloudSyncResponse(msgs, errors).encode())),
            headers={"Content-Type": "application/cbor", "Content-Encoding": "deflate"},
        )


@dataclass
class Leader:
    """One node's side: a replica, the persist callback's record, a forwarder."""

    replica: Replica
    cloud: FakeCloud
    forwarder: Forwarder
    persisted: list[list[tuple[str, list[tuple[bytes, bytes]]]]]

    @property
    def planner(self) -> ForwardPlanner:
        return self.forwarder.planner

    def note_all(self) -> None:
        for doc_id, doc in sorted(self.replica.docs.items()):
            self.forwarder.note_change(doc_id, PRIORITY_STATE, len(doc.save()))

    async def drain(self, limit: int = 50) -> None:
        """Forward until nothing waits, sleeping through backoffs (virtual time)."""
        for _ in range(limit):
            if self.planner.counters.documents_waiting == 0:
                return
            await self.forwarder.forward_once(trio.current_time())
            deadline = self.planner.next_deadline()
            if deadline is not None and deadline > trio.current_time():
                await trio.sleep_until(deadline)
        raise AssertionError(f"still waiting: {self.planner.counters}")


def make_leader(cloud: FakeCloud, docs: int = 5, *, seed: int = 42, **kwargs: Any) -> Leader:
    signer = make_signer("charger-1")
    replica = Replica()
    for i in range(docs):
        replica.add(f"s{i:03d}", _session(f"s{i:03d}", signer, events=2 + i))
    persisted: list[list[tuple[str, list[tuple[bytes, bytes]]]]] = []

    async def persist(changes: list[tuple[str, list[tuple[bytes, bytes]]]]) -> None:
        persisted.append(changes)

    client = CloudClient("http://cloud.test", transport=cloud.transport())
    forwarder = Forwarder(
        replica, "n1", "field", client, ForwardPlanner(random.Random(seed)), persist, timeout=5.0, **kwargs
    )
    return Leader(replica, cloud, forwarder, persisted)


def same_heads(a: Replica, b: Replica) -> Iterator[tuple[str, bool]]:
    for doc_id, doc in a.docs.items():
        other = b.docs.get(doc_id)
        yield doc_id, other is not None and sorted(other.get_heads()) == sorted(doc.get_heads())


# --- the forwarder ---------------------------------------------------------------------------


async def test_every_document_reaches_the_cloud_with_identical_heads(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cloud = FakeCloud()
    leader = make_leader(cloud, docs=6)
    leader.forwarder.start_leading()
    leader.note_all()
    assert await leader.forwarder.forward_once(trio.current_time()) is True
    assert all(ok for _, ok in same_heads(leader.replica, cloud.replica))
    first = cloud.requests[0]
    assert first.node_id == "n1" and first.site == "field"
    assert sorted(first.reset) == sorted(leader.replica.docs)  # first contact: both sides start fresh
    assert all(not r.reset for r in cloud.requests[1:])
    counters = leader.forwarder.counters
    assert counters.documents_waiting == 0 and counters.batches == 1 and counters.failures == 0
    assert counters.bytes_sent > 0
    assert leader.persisted == []  # the cloud had nothing we lacked
    assert await leader.forwarder.forward_once(trio.current_time()) is False  # nothing waits


async def test_a_later_change_is_sent_without_reset_and_counters_move(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cloud = FakeCloud()
    leader = make_leader(cloud, docs=3)
    leader.note_all()
    await leader.drain()
    sent, batches, requests = (
        leader.forwarder.counters.bytes_sent,
        leader.forwarder.counters.batches,
        len(cloud.requests),
    )
    doc = leader.replica.docs["s001"]
    heads = doc.get_heads()
    add_note(doc, "n1", "cable replaced")
    size = sum(len(b) for _, b in leader.replica.changes_since("s001", heads))
    leader.forwarder.note_change("s001", PRIORITY_METER, size)
    await leader.drain()
    new = cloud.requests[requests:]
    assert new and all(set(r.msgs) == {"s001"} and not r.reset for r in new)
    assert read_session(cloud.replica.docs["s001"]).notes == {"n1": "cable replaced"}
    assert leader.forwarder.counters.bytes_sent > sent
    assert leader.forwarder.counters.batches == batches + 1


async def test_the_cloud_receipt_comes_back_and_is_persisted(autojump_clock: trio.testing.MockClock) -> None:
    cloud = FakeCloud(write_receipts=True)
    leader = make_leader(cloud, docs=3)
    leader.note_all()
    await leader.drain()
    for doc_id, doc in leader.replica.docs.items():
        assert read_session(doc).receipt == b"receipt:" + doc_id.encode()
    assert all(ok for _, ok in same_heads(leader.replica, cloud.replica))
    persisted = {doc_id: changes for call in leader.persisted for doc_id, changes in call}
    assert set(persisted) == set(leader.replica.docs)
    for doc_id, changes in persisted.items():
        # What was persisted is exactly the receipt change: replaying it onto the
        # document as it was before gives the document as it is now.
        ((change_hash, _),) = changes
        assert change_hash in leader.replica.docs[doc_id].get_heads()


def full_jitter(seed: int, failures: int) -> list[float]:
    """The backoff DESIGN.md sets, computed here on its own: the n-th failure in a row waits
    uniform [0, min(60, 2**n)] s, drawn from the planner's seeded generator."""
    rng = random.Random(seed)
    return [rng.uniform(0.0, min(60.0, 2.0**n)) for n in range(failures)]


async def test_failing_cloud_backs_off_then_succeeds_with_resets(autojump_clock: trio.testing.MockClock) -> None:
    cloud = FakeCloud(script=["500", "timeout", "timeout", "ok", "lose"])
    leader = make_leader(cloud, docs=4, seed=42)
    leader.note_all()
    await leader.drain()
    counters = leader.forwarder.counters
    assert counters.documents_waiting == 0
    assert counters.failures == 4  # 500, two timeouts, and the lost answer in the middle of a batch
    assert counters.batches == 1
    assert all(ok for _, ok in same_heads(leader.replica, cloud.replica))
    # Each failed attempt is followed by exactly the planner's jittered delay, counted from when the
    # attempt ended: a timeout itself costs the 5 s timeout. The delays are the seeded schedule, so a
    # forwarder that retried early (no backoff, or timed from the attempt's start) fails here.
    d = full_jitter(42, 4)
    assert min(d) > 0.05  # the schedule under test is not trivially zero
    t = [x - cloud.times[0] for x in cloud.times]
    expected = [0.0, d[0], d[0] + 5 + d[1], d[0] + 5 + d[1] + 5 + d[2]]  # 500, timeout, timeout, ok
    expected.append(expected[-1])  # the batch's second round: "lose"
    expected.append(expected[-1] + d[3])  # then the batch again, from a reset
    assert t[: len(expected)] == pytest.approx(expected, abs=1e-6)
    assert all(x == pytest.approx(expected[-1], abs=1e-6) for x in t[len(expected) :])  # rounds of the last batch
    # After the lost answer, both sides started the batch's sync states afresh.
    resets = [r for r in cloud.requests if r.reset]
    assert len(resets) == 2 and all(sorted(r.reset) == sorted(leader.replica.docs) for r in resets)


async def test_requests_stay_within_256_kib_except_a_larger_document_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """docs/deployment.md: "POST /v1/sync, CBOR, deflated, at most 256 KiB a request"."""
    rng = random.Random(5)
    signer = make_signer("charger-1")
    cloud = FakeCloud()
    leader = make_leader(cloud, docs=0)
    for i in range(30):
        doc = _session(f"s{i:03d}", signer, events=3)
        kib = 600 if i == 7 else rng.randrange(5, 60)  # one document far above the bound
        add_note(doc, "diag", base64.b64encode(rng.randbytes(kib * KIB * 3 // 4)).decode())
        leader.replica.add(f"s{i:03d}", doc)
    hints = {}
    for doc_id in sorted(leader.replica.docs):
        # What the node hints: the size of the changes the cloud lacks.
        hints[doc_id] = sum(len(b) for _, b in leader.replica.changes_since(doc_id, []))
        leader.forwarder.note_change(doc_id, PRIORITY_STATE, hints[doc_id])
    await leader.drain()
    assert all(ok for _, ok in same_heads(leader.replica, cloud.replica))
    assert hints["s007"] > MAX_BATCH_BYTES

    # Every body the cloud received (deflated, as on the wire) is at most 256 KiB, unless it
    # carries a single document's changes and that document alone is larger.
    assert len(cloud.body_sizes) == len(cloud.requests)
    alone = []
    for request, size in zip(cloud.requests, cloud.body_sizes, strict=True):
        carried = [d for d, m in request.msgs.items() if m is not None]
        if size > MAX_BATCH_BYTES:
            assert carried == ["s007"], (size, carried)
            alone.append(size)
    assert alone  # the large document did go, by itself

    # Batching respects the bound and fills up to it: a batch (its first request resets the
    # documents, first contact) ends only at a document that would not fit.
    batches = [list(r.reset) for r in cloud.requests if r.reset]
    assert sorted(d for b in batches for d in b) == sorted(leader.replica.docs)
    assert any(len(b) > 1 for b in batches)
    for batch, after in itertools.pairwise(batches):
        if len(batch) > 1:
            assert sum(hints[d] for d in batch) <= MAX_BATCH_BYTES, batch
        assert sum(hints[d] for d in batch) + hints[after[0]] > MAX_BATCH_BYTES, (batch, after)


async def test_a_batch_re_sent_after_a_lost_answer_changes_nothing_on_the_cloud(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Round 1 exchanges heads; round 2 carries the changes: the cloud applies them,
    # then the answer is lost.
    cloud = FakeCloud(script=["ok", "lose"])
    leader = make_leader(cloud, docs=3)
    leader.note_all()
    assert await leader.forwarder.forward_once(trio.current_time()) is False
    assert leader.forwarder.counters.failures == 1
    applied_before = {d: n for _, d, n in cloud.applied if n}
    assert set(applied_before) == set(leader.replica.docs)  # everything arrived
    saved = {d: doc.save() for d, doc in cloud.replica.docs.items()}
    seen = len(cloud.applied)
    await leader.drain()
    assert all(n == 0 for _, _, n in cloud.applied[seen:])  # the retry brought nothing new
    assert {d: doc.save() for d, doc in cloud.replica.docs.items()} == saved
    assert all(ok for _, ok in same_heads(leader.replica, cloud.replica))


async def test_after_a_lost_answer_a_cloud_that_lost_the_batch_gets_it_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """After a lost answer our sync state believes the changes were delivered. If the
    cloud then lost them (say it restored a backup), only the reset after the failure
    makes the retry send them again instead of stalling.
    """
    cloud = FakeCloud(script=["ok", "lose"])
    leader = make_leader(cloud, docs=1)
    leader.note_all()
    await leader.forwarder.forward_once(trio.current_time())
    cloud.replica = Replica()  # the cloud lost it
    await leader.drain()
    assert all(ok for _, ok in same_heads(leader.replica, cloud.replica))


async def test_a_refused_document_is_deferred_and_does_not_hold_up_the_rest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cloud = FakeCloud(refuse={"s001"})
    leader = make_leader(cloud, docs=3)
    leader.note_all()
    assert await leader.forwarder.forward_once(trio.current_time()) is True
    counters = leader.forwarder.counters
    assert counters.documents_waiting == 1 and counters.deferred == 1 and counters.failures == 0
    assert "s001" not in cloud.replica.docs
    assert {"s000", "s002"} <= set(cloud.replica.docs)
    assert leader.planner.is_waiting("s001")
    cloud.refuse.clear()
    await leader.drain()
    assert all(ok for _, ok in same_heads(leader.replica, cloud.replica))
    # Its next attempt started afresh on both sides.
    assert any(r.reset == ("s001",) for r in cloud.requests)


async def test_a_change_made_during_the_exchange_is_sent_next(
    autojump_clock: trio.testing.MockClock, signer: EventSigner
) -> None:
    cloud = FakeCloud()
    leader = make_leader(cloud, docs=2)
    leader.note_all()
    added = []

    def during(req: CloudSyncRequest) -> None:
        if not added:  # a meter reading lands while the first request is in flight
            doc = leader.replica.docs["s000"]
            heads = doc.get_heads()
            add_note(doc, "x", "late")
            added.append(leader.replica.changes_since("s000", heads))
            leader.forwarder.note_change("s000", PRIORITY_METER, 100)

    cloud.on_request = during
    await leader.forwarder.forward_once(trio.current_time())
    await leader.drain()
    assert read_session(cloud.replica.docs["s000"]).notes == {"x": "late"}
    assert all(ok for _, ok in same_heads(leader.replica, cloud.replica))


async def test_unsettled_sync_is_deferred_not_failed(autojump_clock: trio.testing.MockClock) -> None:
    cloud = FakeCloud()
    leader = make_leader(cloud, docs=1, max_rounds=1)
    leader.note_all()
    assert await leader.forwarder.forward_once(trio.current_time()) is True
    counters = leader.forwarder.counters
    assert counters.deferred == 1 and counters.failures == 0 and counters.documents_waiting == 1


async def test_persist_failure_fails_the_batch_and_resets(autojump_clock: trio.testing.MockClock) -> None:
    cloud = FakeCloud(write_receipts=True)
    leader = make_leader(cloud, docs=1)
    calls = []

    async def broken(changes: list[tuple[str, list[tuple[bytes, bytes]]]]) -> None:
        calls.append(changes)
        raise OSError("disk full")

    leader.forwarder.persist = broken
    leader.note_all()
    assert await leader.forwarder.forward_once(trio.current_time()) is False
    assert calls and leader.forwarder.counters.failures == 1
    assert leader.forwarder.counters.documents_waiting == 1


async def test_cancelled_exchange_resets_the_sync_states(autojump_clock: trio.testing.MockClock) -> None:
    cloud = FakeCloud(script=["ok", "slow"])
    leader = make_leader(cloud, docs=2)
    leader.note_all()
    with trio.move_on_after(10):
        await leader.forwarder.forward_once(trio.current_time())
    await leader.drain()
    # Request 1 was round 1 before the cancel; request 2 starts the retry afresh.
    assert sorted(cloud.requests[0].reset) == sorted(cloud.requests[1].reset) == ["s000", "s001"]
    assert all(ok for _, ok in same_heads(leader.replica, cloud.replica))


async def test_a_document_gone_from_the_replica_is_forgotten(autojump_clock: trio.testing.MockClock) -> None:
    cloud = FakeCloud()
    leader = make_leader(cloud, docs=1)
    leader.forwarder.note_change("pruned", PRIORITY_STATE, 100)
    assert await leader.forwarder.forward_once(trio.current_time()) is False
    assert leader.forwarder.counters.documents_waiting == 0
    assert cloud.requests == []


# --- the task --------------------------------------------------------------------------------


async def test_serve_forwarder_forwards_only_while_leading(autojump_clock: trio.testing.MockClock) -> None:
    cloud = FakeCloud(write_receipts=True)
    leader = make_leader(cloud, docs=3)
    leads = False
    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: serve_forwarder(leader.forwarder, is_leader=lambda: leads, task_status=task_status)
        )
        leader.note_all()
        await trio.sleep(10)
        assert cloud.requests == []  # a follower notes changes but does not forward
        leads = True
        leader.forwarder.poke()
        await trio.sleep(0.01)
        assert leader.forwarder.counters.documents_waiting == 0
        assert all(ok for _, ok in same_heads(leader.replica, cloud.replica))
        # Losing the role, then winning it back: every document is confirmed again.
        leads = False
        await trio.sleep(2)
        count = len(cloud.requests)
        leads = True
        await trio.sleep(2)  # noticed within `recheck` even without a poke
        again = cloud.requests[count:]
        assert again and sorted(again[0].reset) == sorted(leader.replica.docs)
        assert leader.forwarder.counters.documents_waiting == 0
        # A change wakes it at once.
        before = len(cloud.requests)
        doc = leader.replica.docs["s000"]
        heads = doc.get_heads()
        add_note(doc, "n", "hello")
        t0 = trio.current_time()
        leader.forwarder.note_change("s000", PRIORITY_METER, 50)
        await trio.lowlevel.checkpoint()
        while len(cloud.requests) == before:
            await trio.sleep(0.001)
        assert trio.current_time() - t0 < 0.01
        assert leader.replica.changes_since("s000", heads)
        nursery.cancel_scope.cancel()
    assert CLOUD_PEER not in leader.replica.book.peers()  # the term ended with the task


async def test_serve_forwarder_backs_off_on_a_dead_cloud(autojump_clock: trio.testing.MockClock) -> None:
    cloud = FakeCloud(script=["500"] * 12)
    leader = make_leader(cloud, docs=1)
    leader.note_all()
    times: list[float] = []
    original = cloud.handle

    async def timed(request: httpx.Request) -> httpx.Response:
        times.append(trio.current_time())
        return await original(request)

    leader.forwarder.client = CloudClient("http://cloud.test", transport=httpx.MockTransport(timed))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: serve_forwarder(leader.forwarder, is_leader=lambda: True))
        await trio.sleep(600)
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert len(times) >= 13  # twelve failures, then it got through
    # Every retry came exactly when the planner's seeded full-jitter schedule said: not before
    # (no hammering of a dead cloud), not later (the task wakes for the deadline, not its recheck).
    assert gaps[:12] == pytest.approx(full_jitter(42, 12), abs=1e-6)
    assert sum(gaps[:12]) > 60  # a dead cloud is asked about a dozen times in minutes, not at once
    assert leader.forwarder.counters.failures == 12
    assert leader.forwarder.counters.documents_waiting == 0


def test_meter_only_changes_are_held_so_readings_batch():
    import random as _random

    from uplink import PRIORITY_METER, PRIORITY_STATE, ForwardPlanner

    planner = ForwardPlanner(_random.Random(1), meter_hold=5.0)
    planner.note_change("a", PRIORITY_METER, 100, now=10.0)
    planner.note_change("a", PRIORITY_METER, 100, now=12.0)  # rides along, does not extend the hold
    assert planner.next_batch(11.0) == []
    assert planner.next_deadline() == 15.0
    assert planner.next_batch(15.0) == ["a"]
    planner.on_success(15.0)
    planner.note_synced("a")
    planner.note_change("b", PRIORITY_METER, 100, now=20.0)
    planner.note_change("b", PRIORITY_STATE, 100, now=21.0)  # a stop: due at once, readings with it
    assert planner.next_batch(21.0) == ["b"]
