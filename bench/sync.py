"""Benchmark: bytes and round trips to bring a replica up to date.

Case 1: a fresh replica catches up with 1,000 sessions of 60 meter events each.
Case 2: one new event on an up-to-date replica.

The exchange follows the mesh protocol: a digest exchange (64 bucket summaries),
then the (doc id, heads hash) entries of the differing buckets, then rounds of
batched Automerge sync messages (one request carries every document's message,
the response carries the replies). Bytes are counted as CBOR on the wire, before
CoAP and sealing overhead. Prints JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time

import cbor2
import nacl.signing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crdt import (  # noqa: E402
    EventSigner,
    Replica,
    add_event,
    bucket_entries,
    differing_buckets,
    differing_docs,
    make_digest,
    new_session_doc,
)

SESSIONS = int(os.environ.get("BENCH_SESSIONS", 1000))
EVENTS = 60


def catch_up(a: Replica, b: Replica) -> dict[str, int]:
    """b catches up with a; returns bytes and round trips (requests from b)."""
    wire = 0
    round_trips = 1
    mine, theirs = make_digest(b.heads_hashes()), make_digest(a.heads_hashes())
    wire += len(cbor2.dumps({"digest": mine})) + len(cbor2.dumps({"digest": theirs}))
    buckets = differing_buckets(mine, theirs)
    if not buckets:
        return {"bytes": wire, "round_trips": round_trips}
    round_trips += 1
    e_b, e_a = bucket_entries(b.heads_hashes(), buckets), bucket_entries(a.heads_hashes(), buckets)
    wire += len(cbor2.dumps({"buckets": buckets, "entries": e_b})) + len(cbor2.dumps({"entries": e_a}))
    docs = sorted(differing_docs(e_b, e_a))
    while True:
        # b's request names every document still being synced, with its message if it has one;
        # a answers each with its own message. Stop when neither side has anything to say.
        request = {d: b.generate("a", d) for d in docs}
        for d, m in request.items():
            if m is not None:
                a.receive("b", d, m)
        reply = {d: m for d in docs if (m := a.generate("b", d)) is not None}
        if not reply and all(m is None for m in request.values()):
            break
        round_trips += 1
        wire += len(cbor2.dumps(request)) + len(cbor2.dumps(reply))
        for d, m in reply.items():
            b.receive("a", d, m)
        docs = [d for d in docs if request.get(d) is not None or d in reply]
    return {"bytes": wire, "round_trips": round_trips}


def main() -> None:
    signer = EventSigner("charger-1", nacl.signing.SigningKey(b"s" * 32))
    source = Replica()
    raw = 0
    t0 = time.perf_counter()
    for s in range(SESSIONS):
        sid = f"session-{s:05d}"
        doc = new_session_doc(
            sid,
            site="bench",
            charger="c1",
            connector=1,
            id_token="TOKEN-1234",
            tariff={"currency": "EUR", "per_kwh_cents": 39},
            created_by="node-1",
        )
        for i in range(EVENTS):
            event = signer.sign("meter", sid, 1_700_000_000_000 + i * 60_000, meter_wh=i * 250)
            raw += len(event.encoded)
            add_event(doc, event)
        source.add(sid, doc)
    print(f"  built {SESSIONS} sessions in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    fresh = Replica()
    # Both clocks: process_time is the CPU this process spent (both replicas are in it), the
    # figure to compare between runs; wall time also counts waiting for a busy machine's cores.
    t0, c0 = time.perf_counter(), time.process_time()
    full = catch_up(source, fresh)
    full_wall, full_cpu = time.perf_counter() - t0, time.process_time() - c0
    assert all(fresh.docs[d].get_heads() == source.docs[d].get_heads() for d in source.docs)

    sid = "session-00042"
    event = signer.sign("meter", sid, 1_800_000_000_000, meter_wh=EVENTS * 250)
    add_event(source.docs[sid], event)
    one = catch_up(source, fresh)
    assert fresh.docs[sid].get_heads() == source.docs[sid].get_heads()

    print(
        json.dumps(
            {
                "benchmark": "sync",
                "fresh_replica": {
                    "sessions": SESSIONS,
                    "events_per_session": EVENTS,
                    "raw_signed_event_bytes": raw,
                    "wire_bytes": full["bytes"],
                    "wire_over_raw": round(full["bytes"] / raw, 3),
                    "round_trips": full["round_trips"],
                    "cpu_seconds": round(full_cpu, 2),
                    "wall_seconds": round(full_wall, 2),
                },
                "one_new_event": {
                    "raw_signed_event_bytes": len(event.encoded),
                    "wire_bytes": one["bytes"],
                    "round_trips": one["round_trips"],
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
