"""`crdt.SyncSession`: both sides of an Automerge sync exchange, run here over a loop of bytes.

Real Automerge documents and `Replica`s on both sides; only the wire is this file's
loop (the claim is about the exchange's decisions, not about a transport).
"""

from __future__ import annotations

import pytest

from crdt import (
    InvalidSyncMessage,
    Replica,
    SyncSession,
    add_event,
    new_session_doc,
    read_session,
)

from .conftest import make_signer


def _session(sid: str, events: int = 3) -> object:
    doc = new_session_doc(sid, site="x", charger="c", connector=1, id_token="T", tariff={}, created_by="n")
    signer = make_signer(f"dev-{sid}")
    for i in range(events):
        add_event(doc, signer.sign("meter", sid, i, meter_wh=i))
    return doc


def _check(doc_id, doc):
    if read_session(doc).session_id != doc_id:
        raise ValueError("not this session")


def exchange(
    mine: Replica,
    theirs: Replica,
    docs: list[str],
    *,
    reset: bool = False,
    tamper=None,
    reply_cap: int | None = None,
    **limits,
) -> tuple[SyncSession, list[dict]]:
    """Run one exchange from `mine` (peer id "a") to `theirs` (peer id "b"); returns the requests sent."""
    initiator = SyncSession(mine, "b", validate=_check, **limits)
    initiator.begin(docs, reset=reset)
    requests = []
    while (step := initiator.next_request()) is not None:
        requests.append(step.msgs)
        responder = SyncSession(theirs, "a", validate=_check, check_changed=_check)
        applied = responder.on_request(step.msgs, step.reset)
        msgs = responder.replies(step.msgs, applied.errors, max_bytes=reply_cap)
        errors = dict(applied.errors)
        if tamper is not None:
            msgs, errors = tamper(msgs, errors)
        initiator.on_reply(msgs, errors)
    return initiator, requests


def test_both_sides_end_with_the_same_documents():
    a, b = Replica(), Replica()
    a.add("s1", _session("s1"))
    b.add("s2", _session("s2"))
    session, requests = exchange(a, b, ["s1", "s2"])
    assert session.done and session.synced == ("s1", "s2") and not session.refused
    for d in ("s1", "s2"):
        assert a.docs[d].get_heads() == b.docs[d].get_heads()
    # A second exchange has nothing to move: one request (rule 1), no message in it.
    again, requests = exchange(a, b, ["s1", "s2"])
    assert len(requests) == 1 and again.synced == ("s1", "s2")


def test_the_first_request_goes_out_even_with_nothing_to_say():
    a, b = Replica(), Replica()
    b.add("s1", _session("s1"))
    a_session = SyncSession(a, "b")
    a_session.begin(["s1"])
    first = a_session.next_request()
    assert first is not None and set(first.msgs) == {"s1"}
    session, _ = exchange(a, b, ["s1"])
    assert "s1" in a.docs and session.synced == ("s1",)


def test_a_document_the_peer_refuses_leaves_the_exchange_alone():
    a, b = Replica(), Replica()
    a.add("s1", _session("s1"))
    a.add("s2", _session("s2"))
    b.add("s2", _session("s2-other"))  # another history under this id: b refuses it

    session, _ = exchange(a, b, ["s1", "s2"])
    assert session.synced == ("s1",) and set(session.refused) == {"s2"}
    assert a.docs["s1"].get_heads() == b.docs["s1"].get_heads()
    assert ("b", "s2") not in a.book._states  # its state was dropped (rule 2)


def test_a_bad_reply_is_refused_and_changes_nothing():
    a, b = Replica(), Replica()
    b.add("s1", _session("s1"))

    def garble(msgs, errors):
        return {d: b"\x42garbage" for d in msgs}, errors

    session, _ = exchange(a, b, ["s1"], tamper=garble)
    assert "s1" not in a.docs and "s1" in session.refused and session.synced == ()


def test_a_reply_about_another_document_is_ignored():
    a, b = Replica(), Replica()
    a.add("s1", _session("s1"))
    b.add("s9", _session("s9"))
    # A message with all of s9's changes (b's answer to an empty replica) would create it.
    empty = SyncSession(Replica(), "b")
    empty.begin(["s9"])
    ask = empty.next_request()
    answer = SyncSession(b, "z")
    answer.on_request(ask.msgs)
    unasked = answer.replies(ask.msgs)["s9"]
    probe = Replica()
    assert probe.receive("b", "s9", unasked) and "s9" in probe.docs  # it would, if taken

    def add_unasked(msgs, errors):
        return {**msgs, "s9": unasked}, errors

    session, _ = exchange(a, b, ["s1"], tamper=add_unasked)
    assert "s9" not in a.docs and session.synced == ("s1",)


def test_the_round_limit_leaves_documents_unsettled():
    a, b = Replica(), Replica()
    b.add("s1", _session("s1"))
    session, requests = exchange(a, b, ["s1"], max_rounds=1)
    assert len(requests) == 1 and session.done
    assert session.unsettled == ("s1",) and session.synced == ()


def test_the_byte_cap_splits_requests_and_loses_nothing():
    a, b = Replica(), Replica()
    docs = [f"s{i}" for i in range(12)]
    for d in docs:
        a.add(d, _session(d, events=4))
    one = len(SyncSession(Replica({"s0": a.docs["s0"].fork()}), "z").replies(["s0"])["s0"])
    cap = 3 * one
    session, requests = exchange(a, b, docs, max_bytes=cap, max_rounds=50)
    assert session.synced == tuple(docs)
    for d in docs:
        assert a.docs[d].get_heads() == b.docs[d].get_heads()
    for msgs in requests:
        sizes = [len(m) for m in msgs.values() if m is not None]
        assert sum(sizes) <= cap or len(sizes) == 1
    assert len(requests) > 3  # it did have to split


def test_the_responders_byte_cap_splits_replies_and_loses_nothing():
    # The responder holds everything, the initiator nothing: every reply is capped,
    # and the documents it left out stay in the exchange until they had their turn.
    a, b = Replica(), Replica()
    docs = [f"s{i:02d}" for i in range(12)]
    for d in docs:
        b.add(d, _session(d, events=4))
    one = sum(len(c.bytes) for c in b.docs["s00"].get_changes([]))  # about one document's message
    cap = 3 * one
    sizes: list[int] = []

    def measure(msgs, errors):
        sizes.append(sum(len(m) for m in msgs.values()))
        return msgs, errors

    session, requests = exchange(a, b, docs, max_bytes=cap, reply_cap=cap, max_rounds=50, tamper=measure)
    assert session.synced == tuple(docs)
    for d in docs:
        assert a.docs[d].get_heads() == b.docs[d].get_heads()
    assert max(sizes) < cap + 2 * one  # the cap is checked before each message
    assert len(requests) > 3  # it did have to split


def test_a_reply_under_the_cap_still_ends_the_exchange():
    a, b = Replica(), Replica()
    b.add("s1", _session("s1"))
    session, requests = exchange(a, b, ["s1"], max_bytes=10**6, reply_cap=10**6)
    assert session.synced == ("s1",) and len(requests) <= 3


def test_a_message_larger_than_the_cap_still_goes():
    a, b = Replica(), Replica()
    a.add("s1", _session("s1", events=20))
    session, _ = exchange(a, b, ["s1"], max_bytes=1)
    assert session.synced == ("s1",) and a.docs["s1"].get_heads() == b.docs["s1"].get_heads()


def test_abort_drops_every_state_of_the_batch():
    a = Replica()
    a.add("s1", _session("s1"))
    session = SyncSession(a, "b")
    session.begin(["s1", "s2"])
    assert session.next_request() is not None
    assert ("b", "s1") in a.book._states
    session.abort()
    assert not a.book._states and session.done and session.next_request() is None


def test_reset_starts_both_sides_afresh():
    a, b = Replica(), Replica()
    a.add("s1", _session("s1"))
    a.add("s2", _session("s2"))
    exchange(a, b, ["s1", "s2"])
    assert ("b", "s1") in a.book._states and ("a", "s1") in b.book._states
    before = a.book.state("b", "s1")
    session = SyncSession(a, "b")
    session.begin(["s1", "s2"], reset=["s1"])
    assert a.book.state("b", "s1") is not before  # ours: now
    first = session.next_request()
    assert first.reset == ("s1",)
    responder = SyncSession(b, "a")
    kept = b.book.state("a", "s2")
    responder.on_request({}, first.reset)
    assert ("a", "s1") not in b.book._states and b.book.state("a", "s2") is kept  # theirs: with the request
    session.on_reply(responder.replies(first.msgs), {})
    later = session.next_request()
    assert later is None or later.reset == ()  # only the first request carries it


def test_the_responder_refuses_a_request_whole_when_a_message_does_not_parse():
    b = Replica()
    b.add("s1", _session("s1"))
    responder = SyncSession(b, "a")
    with pytest.raises(InvalidSyncMessage, match="'s2'"):
        responder.check({"s1": None, "s2": b"\x00nope"})


def test_the_responder_reports_a_document_a_message_damaged():
    a, b = Replica(), Replica()
    a.add("s1", _session("s1"))
    exchange(a, b, ["s1"])
    doc = a.docs["s1"]
    heads = doc.get_heads()
    with doc.transaction() as tx:  # a change that makes it stop being session s1
        from automerge.core import ROOT, ScalarType

        tx.put(ROOT, "session_id", ScalarType.Str, "someone-else")
    assert doc.get_heads() != heads
    initiator = SyncSession(a, "b")
    initiator.begin(["s1"])
    step = initiator.next_request()
    applied = SyncSession(b, "a", check_changed=_check).on_request(step.msgs)
    assert applied.damaged == {"s1"} and "s1" in applied.errors and not applied.changes
