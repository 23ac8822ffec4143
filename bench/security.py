"""Benchmark: what sealing mesh traffic and verifying events cost.

Per operation (best of seven timed loops, microseconds):

- ``seal`` and ``open`` of a request with a small (64 B) and a 4 KiB body: the
  full path of ``Sealer.seal_request`` (counter, CBOR, Ed25519 signature,
  SecretBox) and ``Sealer.open_request`` (SecretBox, CBOR, certificate from the
  cache, Ed25519 verification, replay window). ``open_first_contact`` is an open
  whose sender certificate is not cached yet (one more Ed25519 verification);
- ``certificate_decode``: verifying a certificate alone;
- ``ed25519_sign`` / ``ed25519_verify`` of 300 bytes: the floor (pynacl, libsodium)
  that sealing and opening are built on;
- ``verify_event``: ``crdt.verify_event`` on a signed meter event.

As a share of syncing one event between two nodes, measured two ways:

1. ``replica_sync``: CPU only. Two ``crdt.Replica`` objects hold the same
   session; one gets a new signed meter event; the other catches up with the
   mesh's message pattern (Automerge sync messages in the CBOR ``SyncRequest``
   / ``SyncResponse`` of the protocol, rounds until both are quiet). Each
   message is also sealed and opened, as ``SealedTransport`` would; the share
   is the sealing time over the whole.
2. ``two_nodes``: two real ``Node``s (store with fsync, push on change) on a
   ``MemoryNetwork`` in real time, once over plain transports and once over
   ``SealedTransport``s (enrolled from one site). For each of ``--events``
   meter events written on node A, the time from ``record_event`` returning to
   node B holding the change; medians, with the number of requests per event.
   The background gossip round (1 s) runs as in production. ``sealing_median_ms`` is
   the time measured inside the sealer (seal and open, both nodes) while the
   event travelled, and ``sealing_share`` its median share of the latency.
   Plain and sealed runs alternate in ``--blocks`` blocks; medians over blocks.

Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nacl.signing  # noqa: E402
import nacl.utils  # noqa: E402
import trio  # noqa: E402

from crdt import EventSigner, Keyring, Replica, add_event, new_session_doc, verify_event  # noqa: E402
from meshnode._discovery import StaticDiscovery  # noqa: E402
from meshnode._node import Node, NodeConfig  # noqa: E402
from meshnode._protocol import SyncRequest, SyncResponse  # noqa: E402
from meshnode._security import (  # noqa: E402
    Certificate,
    Identity,
    SealedTransport,
    Sealer,
    Site,
    create_site,
    enroll,
    issue_certificate,
)
from meshnode._transport import MemoryNetwork  # noqa: E402

NOW = time.time()


def per_op_us(fn: Callable[[int], object], n: int, repeats: int = 7) -> float:
    """Best of ``repeats`` loops of ``fn(i)`` for i in range(n), in µs per call
    (the minimum, as ``timeit`` recommends: other load on the machine only ever
    adds time)."""
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(n):
            fn(i)
        samples.append((time.perf_counter() - t0) / n * 1e6)
    return round(min(samples), 1)


class TimedSealer(Sealer):
    """A Sealer that adds up the time spent sealing and opening."""

    spent = 0.0

    def seal_request(self, *args: Any, **kwargs: Any) -> tuple[bytes, int]:
        t0 = time.perf_counter()
        try:
            return super().seal_request(*args, **kwargs)
        finally:
            TimedSealer.spent += time.perf_counter() - t0

    def seal_response(self, *args: Any, **kwargs: Any) -> bytes:
        t0 = time.perf_counter()
        try:
            return super().seal_response(*args, **kwargs)
        finally:
            TimedSealer.spent += time.perf_counter() - t0

    def open_request(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return super().open_request(*args, **kwargs)
        finally:
            TimedSealer.spent += time.perf_counter() - t0

    def open_reply(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return super().open_reply(*args, **kwargs)
        finally:
            TimedSealer.spent += time.perf_counter() - t0


def memory_identity(site: Site, node_id: str) -> Identity:
    key = nacl.signing.SigningKey.generate()
    cert = issue_certificate(site, node_id, bytes(key.verify_key), now=NOW)
    return Identity(
        node_id, key, Certificate.decode(cert, site.public_key), cert, site.public_key, site.network_key, site.name
    )


def operations(n: int) -> dict[str, Any]:
    key = nacl.signing.SigningKey.generate()
    site = Site("bench", key, bytes(key.verify_key), nacl.utils.random(32), NOW, None)
    a, b = memory_identity(site, "a"), memory_identity(site, "b")
    sender = Sealer(b, site.public_key, site.network_key)
    out: dict[str, Any] = {}
    for label, size in (("64B", 64), ("4KiB", 4096)):
        body = os.urandom(size)
        out[f"seal_{label}_us"] = per_op_us(lambda i: sender.seal_request("/m/sync", body, NOW), n)
        receiver = Sealer(a, site.public_key, site.network_key)
        receiver.open_request("/m/sync", sender.seal_request("/m/sync", body, NOW)[0], NOW)  # warm the cache
        sealed = [sender.seal_request("/m/sync", body, NOW)[0] for _ in range(n * 7)]
        it = iter(sealed)
        out[f"open_{label}_us"] = per_op_us(lambda i: receiver.open_request("/m/sync", next(it), NOW), n)
        out[f"sealed_overhead_{label}_bytes"] = len(sealed[0]) - size
    fresh = [Sealer(a, site.public_key, site.network_key) for _ in range(n * 7)]
    msgs = [sender.seal_request("/m/sync", b"x" * 64, NOW)[0] for _ in range(n * 7)]
    pairs = iter(zip(fresh, msgs))

    def first_contact(i: int) -> None:
        receiver, msg = next(pairs)
        receiver.open_request("/m/sync", msg, NOW)

    out["open_first_contact_64B_us"] = per_op_us(first_contact, n)
    raw = os.urandom(300)
    sig = key.sign(raw).signature
    out["ed25519_sign_300B_us"] = per_op_us(lambda i: key.sign(raw), n)
    out["ed25519_verify_300B_us"] = per_op_us(lambda i: key.verify_key.verify(raw, sig), n)
    out["certificate_decode_us"] = per_op_us(lambda i: Certificate.decode(b.certificate_bytes, site.public_key), n)
    signer = EventSigner("charger-1", nacl.signing.SigningKey.generate())
    event = signer.sign("meter", "session-1", int(NOW * 1000), meter_wh=12345)
    keyring = Keyring({"charger-1": signer.public_key})
    # cache=None: a real check every time (the process-wide cache would time a lookup).
    out["verify_event_us"] = per_op_us(lambda i: verify_event(event.encoded, keyring, cache=None), n)
    out["verify_event_cached_us"] = per_op_us(lambda i: verify_event(event.encoded, keyring), n)
    out["sign_event_us"] = per_op_us(lambda i: signer.sign("meter", "session-1", int(NOW * 1000), meter_wh=i), n)
    return out


def replica_sync(rounds: int) -> dict[str, Any]:
    """CPU cost of bringing a replica up to date with one new event, with and
    without sealing each protocol message."""
    key = nacl.signing.SigningKey.generate()
    site = Site("bench", key, bytes(key.verify_key), nacl.utils.random(32), NOW, None)
    ia, ib = memory_identity(site, "a"), memory_identity(site, "b")
    sa, sb = Sealer(ia, site.public_key, site.network_key), Sealer(ib, site.public_key, site.network_key)
    signer = EventSigner("a", ia.signing_key)
    sid = "session-1"
    source, sink = Replica(), Replica()
    doc = new_session_doc(
        sid,
        site="bench",
        charger="c1",
        connector=1,
        id_token="TOKEN-1",
        tariff={"currency": "EUR", "per_kwh_cents": 39},
        created_by="a",
    )
    for i in range(60):
        add_event(doc, signer.sign("meter", sid, int(NOW * 1000) + i, meter_wh=i * 250))
    source.add(sid, doc)

    def catch_up(seal: bool) -> tuple[int, float]:
        """b pulls from a: rounds of SyncRequest/SyncResponse. Returns (messages, seal seconds)."""
        messages = 0
        seal_time = 0.0
        first = True
        while True:
            msgs = {sid: sink.generate("a", sid)}
            if not first and all(m is None for m in msgs.values()):
                break
            first = False
            payload = SyncRequest("b", msgs, ()).encode()
            if seal:
                t0 = time.perf_counter()
                sealed, ctr = sb.seal_request("/m/sync", payload, NOW)
                payload = sa.open_request("/m/sync", sealed, NOW).body
                seal_time += time.perf_counter() - t0
            request = SyncRequest.decode(payload)
            for d, m in request.msgs.items():
                if m is not None:
                    source.receive("b", d, m)
            reply_msgs = {d: m for d in request.msgs if (m := source.generate("b", d)) is not None}
            reply = SyncResponse(reply_msgs, {}).encode()
            if seal:
                t0 = time.perf_counter()
                sealed_reply = sa.seal_response("/m/sync", reply, ctr, NOW, to="b")
                reply = sb.open_response("/m/sync", sealed_reply, ctr, NOW)
                seal_time += time.perf_counter() - t0
            messages += 2
            response = SyncResponse.decode(reply)
            for d, m in response.msgs.items():
                sink.receive("a", d, m)
            if not response.msgs and all(m is None for m in msgs.values()):
                break
        return messages, seal_time

    catch_up(False)  # the sink starts with the session
    results: dict[str, list[float]] = {"plain": [], "sealed": [], "seal_part": []}
    messages = 0
    for r in range(rounds):
        for mode in ("plain", "sealed"):
            add_event(source.docs[sid], signer.sign("meter", sid, int(NOW * 1000) + 1000 + r, meter_wh=20000 + r))
            t0 = time.perf_counter()
            messages, seal_time = catch_up(mode == "sealed")
            results[mode].append(time.perf_counter() - t0)
            if mode == "sealed":
                results["seal_part"].append(seal_time)
            assert sink.docs[sid].get_heads() == source.docs[sid].get_heads()
    plain = statistics.median(results["plain"]) * 1e6
    sealed = statistics.median(results["sealed"]) * 1e6
    seal_part = statistics.median(results["seal_part"]) * 1e6
    return {
        "messages_per_event": messages,
        "plain_us": round(plain, 1),
        "sealed_us": round(sealed, 1),
        "sealing_us": round(seal_part, 1),
        "sealing_share": round(seal_part / sealed, 3),
    }


async def two_nodes(events: int, sealed: bool) -> dict[str, Any]:
    """Median latency of one meter event from node A to node B, real time."""
    net = MemoryNetwork()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        addresses = {"a": "10.0.0.1:5683", "b": "10.0.0.2:5683"}
        if sealed:
            create_site(root / "site", "bench", now=time.time())
            for name in addresses:
                enroll(root / "site", name, root / name, now=time.time())
        arrived: dict[str, trio.Event] = {}
        async with trio.open_nursery() as nursery:
            nodes: dict[str, Node] = {}
            transports = {}
            for name, address in addresses.items():
                inner = await nursery_enter(nursery, net, address)
                transport: Any = inner
                if sealed:
                    identity = Identity.load(root / name)
                    assert identity is not None
                    transport = SealedTransport(
                        inner,
                        TimedSealer(identity, identity.site_public_key, identity.network_key, started=time.time()),
                    )
                transports[name] = transport
                peer = [a for n, a in addresses.items() if n != name]
                node = Node(
                    NodeConfig(node_id=name, data_dir=root / name, seed=1),
                    transport=transport,
                    discovery=StaticDiscovery(peer),
                )
                await nursery.start(node.serve)
                nodes[name] = node
            a, b = nodes["a"], nodes["b"]
            session = await a.create_session("c1", 1, "TOKEN-1", meter_wh=0)
            sid = session["session_id"]
            with trio.fail_after(30):
                while sid not in b.replica.docs:
                    await trio.sleep(0.01)
            await trio.sleep(1.5)

            def listener(doc_id: str) -> None:
                if doc_id in arrived:
                    arrived[doc_id].set()

            b.change_listeners.append(listener)
            latencies = []
            sealing = []
            requests_before = transports["a"].stats.requests_sent + transports["b"].stats.requests_sent
            for i in range(events):
                arrived[sid] = trio.Event()
                await a.record_event(sid, "meter", 100 * (i + 1))
                TimedSealer.spent = 0.0
                t0 = time.perf_counter()
                with trio.fail_after(10):
                    await arrived[sid].wait()
                latencies.append(time.perf_counter() - t0)
                sealing.append(TimedSealer.spent)
                await trio.sleep(0.005)
            requests = transports["a"].stats.requests_sent + transports["b"].stats.requests_sent - requests_before
            assert b.session_json(sid)["energy_wh"] == 100 * events
            refused = dict(transports["b"].refused) if sealed else {}
            nursery.cancel_scope.cancel()
    out = {
        "median_ms": round(statistics.median(latencies) * 1000, 3),
        "p90_ms": round(sorted(latencies)[int(len(latencies) * 0.9)] * 1000, 3),
        "requests_per_event": round(requests / events, 2),
        "refused": refused,
    }
    if sealed:
        out["sealing_median_ms"] = round(statistics.median(sealing) * 1000, 3)
        out["sealing_share"] = round(statistics.median(s / t for s, t in zip(sealing, latencies)), 3)
    return out


async def nursery_enter(nursery: trio.Nursery, net: MemoryNetwork, address: str) -> Any:
    """Open a memory transport that lives as long as the nursery."""

    async def hold(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        async with net.transport(address) as transport:
            task_status.started(transport)
            await trio.sleep_forever()

    return await nursery.start(hold)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="operations per timed loop (default 2000)")
    parser.add_argument("--rounds", type=int, default=200, help="replica sync repetitions (default 200)")
    parser.add_argument("--events", type=int, default=200, help="events in the two-node runs (default 200)")
    parser.add_argument("--blocks", type=int, default=4, help="alternating plain/sealed runs (default 4)")
    args = parser.parse_args()
    ops = operations(args.n)
    print("  operations done", file=sys.stderr)
    replica = replica_sync(args.rounds)
    print("  replica sync done", file=sys.stderr)
    # Alternate plain and sealed runs so that drifting load on the machine hits both alike.
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for _ in range(args.blocks):
        for sealed_run in (False, True):
            runs[sealed_run].append(trio.run(two_nodes, args.events // args.blocks, sealed_run))
    print("  two-node runs done", file=sys.stderr)

    def merged(results: list[dict[str, Any]]) -> dict[str, Any]:
        keys = [k for k in results[0] if k != "refused"]
        out = {k: round(statistics.median(r[k] for r in results), 3) for k in keys}
        out["refused"] = {k: sum(r["refused"].get(k, 0) for r in results) for r in results for k in r["refused"]}
        return out

    plain, sealed = merged(runs[False]), merged(runs[True])
    seal_open_small = ops["seal_64B_us"] + ops["open_64B_us"]
    print(
        json.dumps(
            {
                "benchmark": "security",
                "python": sys.version.split()[0],
                "operations_us": ops,
                "replica_sync_one_event": replica,
                "two_nodes_one_event": {
                    "plain": plain,
                    "sealed": sealed,
                    "sealed_minus_plain_ms": round(sealed["median_ms"] - plain["median_ms"], 3),
                    "seal_and_open_per_request_us": round(2 * seal_open_small, 1),
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
