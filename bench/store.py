"""Benchmark: durable DocStore appends per second, one at a time and in concurrent groups.

Each append is one signed meter event added to a session document; it counts when
`await store.write(...)` has returned (committed with synchronous=FULL). Run on both
storage adapters: SQLite (the node's; a worker thread, group commit) and in memory
(the simulator's and the tests'; inline, one commit per write), so the cost of the
seam itself shows. Prints JSON.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import nacl.signing
import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crdt import EventSigner, MemoryAdapter, Replica, add_event, new_session_doc, open_doc_store  # noqa: E402


async def run(adapter: str, concurrency: int, total: int, directory: str) -> dict[str, object]:
    path = os.path.join(directory, f"bench-{concurrency}.db")
    signer = EventSigner("bench", nacl.signing.SigningKey(b"b" * 32))
    opened = open_doc_store(path) if adapter == "sqlite" else open_doc_store(adapter=MemoryAdapter())
    async with opened as store:
        replica = Replica()
        for w in range(concurrency):
            sid = f"s{w}"
            await store.write(
                sid,
                replica.add(
                    sid,
                    new_session_doc(sid, site="b", charger="c", connector=1, id_token="t", tariff={}, created_by="b"),
                ),
            )
        commits_before = store.sync.commits
        per_writer = total // concurrency

        async def writer(w: int) -> None:
            sid = f"s{w}"
            doc = replica.docs[sid]
            for i in range(per_writer):
                heads = doc.get_heads()
                add_event(doc, signer.sign("meter", sid, i, meter_wh=i))
                await store.write(sid, replica.changes_since(sid, heads))

        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for w in range(concurrency):
                nursery.start_soon(writer, w)
        elapsed = time.perf_counter() - start
        commits = store.sync.commits - commits_before
    n = per_writer * concurrency
    return {
        "adapter": adapter,
        "concurrency": concurrency,
        "appends": n,
        "seconds": round(elapsed, 3),
        "appends_per_s": round(n / elapsed, 1),
        "commits": commits,
        "appends_per_commit": round(n / max(commits, 1), 2),
    }


async def main() -> None:
    results = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as directory:
        for adapter in ("sqlite", "memory"):
            for concurrency, total in ((1, 300), (8, 1600), (64, 6400)):
                results.append(await run(adapter, concurrency, total, directory))
                print(
                    f"  {adapter}, concurrency {concurrency}: {results[-1]['appends_per_s']} appends/s", file=sys.stderr
                )
    print(json.dumps({"benchmark": "store", "results": results}, indent=2))


if __name__ == "__main__":
    trio.run(main)
