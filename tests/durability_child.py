"""Child process for the system-call durability test (tests/test_durability.py).

Usage: python -m tests.durability_child DB_PATH WRITERS EVENTS [KEY_HEX]

WRITERS concurrent writers (so group commit batches several of them) each append EVENTS meter
events to sessions in a store opened at DB_PATH (sealed with KEY_HEX when given). Around every
`await store.write(...)` a writer writes one line to stdout, a pipe, with a single write(2):
`req <event_id>` just before the call (the rows are queued from then on) and `ack <event_id>` after
it returned. Under strace those lines place each acknowledgement among the store's own writes and
syncs; the test checks that a sync of the store's files lies between them.
"""

from __future__ import annotations

import os
import sys

import trio

from crdt import Replica, add_event, new_session_doc, open_doc_store

from .conftest import make_signer


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())  # one system call per line, unbuffered


async def main(path: str, writers: int, events: int, key: bytes | None) -> None:
    async with open_doc_store(path, key=key) as store:
        replica = Replica(store.sync.load_all())
        signer = make_signer("durability-child")

        async def writer(w: int) -> None:
            session_id = f"dur-w{w}"
            doc = new_session_doc(
                session_id, site="x", charger=f"c{w}", connector=1, id_token="t", tariff={}, created_by="child"
            )
            changes = replica.add(session_id, doc)
            say(f"req {session_id}-created")
            await store.write(session_id, changes)
            say(f"ack {session_id}-created")
            for n in range(events):
                doc = replica.docs[session_id]
                heads = doc.get_heads()
                event = signer.sign("meter", session_id, n, meter_wh=n)
                add_event(doc, event)
                changes = replica.changes_since(session_id, heads)
                say(f"req {event.event_id}")
                await store.write(session_id, changes)
                say(f"ack {event.event_id}")

        say("ready")
        async with trio.open_nursery() as nursery:
            for w in range(writers):
                nursery.start_soon(writer, w)
    say("done")


if __name__ == "__main__":
    key = bytes.fromhex(sys.argv[4]) if len(sys.argv) > 4 else None
    trio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), key)
