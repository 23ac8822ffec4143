"""Child process for the durability test: append events to a DocStore and print each ack.

Usage: python -m tests.store_child DB_PATH START_INDEX

Writers run concurrently (so group commit is exercised); each prints
`ack <session_id> <event_id>` only after `await store.write(...)` returned.
"""

from __future__ import annotations

import sys

import trio

from crdt import Replica, add_event, new_session_doc, open_doc_store

from .conftest import make_signer


async def main(path: str, start: int) -> None:
    async with open_doc_store(path) as store:
        replica = Replica(store.sync.load_all())
        signer = make_signer(f"dev-{start}")

        async def writer(w: int) -> None:
            for n in range(10_000):
                session_id = f"p{start}-w{w}-s{n // 20}"
                if session_id not in replica.docs:
                    doc = new_session_doc(
                        session_id, site="x", charger=f"c{w}", connector=1, id_token="t", tariff={}, created_by="child"
                    )
                    await store.write(session_id, replica.add(session_id, doc))
                doc = replica.docs[session_id]
                heads = doc.get_heads()
                event = signer.sign("meter", session_id, n, meter_wh=n)
                add_event(doc, event)
                await store.write(session_id, replica.changes_since(session_id, heads))
                print(f"ack {session_id} {event.event_id}", flush=True)

        print("ready", flush=True)
        async with trio.open_nursery() as nursery:
            for w in range(4):
                nursery.start_soon(writer, w)


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]))
