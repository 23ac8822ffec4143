"""Benchmark: the uplink path, from a charger's stop to its receipt on every node, and the cloud's ingest.

Two parts; one JSON object on stdout, progress on stderr. Every process this
starts is stopped at the end, also on error or Ctrl-C, and the temp dir removed.

Part 1, "receipt" (through the real mesh): a `meshnode cloud` process (SQLite in
a temp dir) and `--nodes` real `meshnode run` processes on loopback (node i on
127.0.0.(base + i), same ports, every other node a static --peer, --no-mdns).
Only node 1 has an uplink (`--cloud-url` straight at the cloud, `--probe-interval
1`), so it leads. Sessions run one at a time; each on a node picked at random
(seeded), so usually not the leader, and the receipt makes the whole trip: mesh
to the leader, leader to the cloud, cloud to the leader, leader to the mesh. A
session is created, gets `--meters` meter events, then, after `--settle`
seconds (so that what came before has reached the cloud and the timing is that
of the stop alone), is stopped. From the stop's 201, the benchmark polls every
node's GET /v1/sessions/{id} and the cloud's GET /v1/sessions/{id} concurrently
every `--poll-interval` until each shows `reconciled`:

- `stop_to_ledger_s`: until the cloud's ledger row is reconciled (receipt issued);
- `stop_to_receipt_own_node_s`: until the node that recorded the stop shows it;
- `stop_to_receipt_every_node_s`: until the last node shows it (the headline);
- `per_node_s`: every (session, node) pair.

Bytes: the delta of the cloud's `/v1/stats` over the phase, per session:
`bytes_received` (request bodies as sent, deflated), `bytes_received_inflated`,
and the leader's forwarder `bytes_sent`, against the raw signed events of the
session (sum of the event CBOR sizes in its Automerge document, fetched from a
node at the end) and the size of the whole saved document.

Part 2, "ingest" (the cloud alone, over HTTP): a fresh `meshnode cloud` process
per configuration. `--ingest-sessions` completed sessions (authorize, start,
`--meters` meters, stop, signed by `--devices` charger keys with valid chains)
are built in memory with `crdt` first (not timed). Then each simulated leader
(`--ingest-leaders`, e.g. "1,4": one leader, then four leaders in parallel, each
with its share) sends them with `uplink.CloudClient.sync`, the forwarder's own
client: `--ingest-batch` documents per request, Automerge sync rounds per batch
until neither side has anything to say (so every receipt is back). Ingest rate =
sessions / wall time from the first request to the last receipt; the cloud's
stats must then show every session once, with its receipt. `--ingest-postgres
URL` runs it on PostgreSQL (a fresh database per row, created on that server),
and `--ingest-instances N` starts N cloud processes on that one database (the
same key), leaders spread over them round-robin.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Run as a script, this file's directory comes first on sys.path, and `import uplink`
# below would find this file (bench/uplink.py) instead of the package: drop it.
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    del sys.path[0]

import httpx
import nacl.signing
import trio
from automerge.core import Document

from crdt import EventSigner, Replica, add_event, new_session_doc, read_session
from meshnode._demo import (
    STARTUP_TIMEOUT,
    Child,
    DemoError,
    agreed_leader,
    common_free_port,
    loopback_hosts,
    percentile,
    read_ready_line,
    spawn_meshnode,
    stop_children,
)
from uplink import CloudClient, CloudSyncRequest, UplinkError

CLOUD_PEER = "cloud"
TARIFF = {"currency": "EUR", "per_kwh_cents": 39, "per_session_cents": 0}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def summary(values: list[float]) -> dict[str, float | int | None]:
    """p50/p95/max/mean/min in seconds (3 decimals), and how many values."""
    if not values:
        return {"n": 0, "p50": None, "p95": None, "max": None, "min": None, "mean": None}
    r3 = lambda x: round(x, 3)  # noqa: E731
    return {
        "n": len(values), "p50": r3(percentile(values, 0.5) or 0.0), "p95": r3(percentile(values, 0.95) or 0.0),
        "max": r3(max(values)), "min": r3(min(values)), "mean": r3(statistics.fmean(values)),
    }  # fmt: skip


async def start_children(children: list[Child]) -> None:
    """Wait for every child's ready line (in threads, so they start in parallel)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    async with trio.open_nursery() as nursery:
        for child in children:

            async def one(child: Child = child) -> None:
                child.ready = await trio.to_thread.run_sync(read_ready_line, child, deadline, abandon_on_cancel=True)

            nursery.start_soon(one)


def spawn_cloud(workdir: Path, name: str, db: str | None = None, bind: str = "127.0.0.1") -> tuple[Child, str]:
    """A `meshnode cloud` on a fresh SQLite file, or on `db` (shared by instances, with one key)."""
    port = common_free_port([bind], socket.SOCK_STREAM)
    child = spawn_meshnode(name, [
        "cloud", "--db", db or f"sqlite:///{workdir / (name + '.db')}", "--bind", bind, "--port", str(port),
        "--key", str(workdir / "cloud.key"), "--log-level", "warning",
    ], workdir)  # fmt: skip
    return child, f"http://{bind}:{port}"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc), 0.0 if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fresh_postgres_database(server_url: str, name: str) -> str:
    """CREATE DATABASE `name` (dropped first if present) on the server of `server_url`; its URL."""
    import psycopg

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return server_url.rsplit("/", 1)[0] + f"/{name}"


async def get_json(client: httpx.AsyncClient, url: str) -> Any:
    response = await client.get(url)
    response.raise_for_status()
    return response.json()


# --- part 1: stop to receipt through the mesh -------------------------------------------------


async def receipt_phase(args: argparse.Namespace, workdir: Path, children: list[Child]) -> dict[str, Any]:
    rng = random.Random(args.seed)
    hosts = loopback_hosts(args.base_address, args.nodes)
    coap = common_free_port(hosts, socket.SOCK_DGRAM)
    http = common_free_port(hosts, socket.SOCK_STREAM)
    cloud, cloud_url = spawn_cloud(workdir, "cloud-receipt")
    children.append(cloud)
    names = [f"bench-{i + 1}" for i in range(args.nodes)]
    urls = [f"http://{h}:{http}" for h in hosts]
    for i, (name, host) in enumerate(zip(names, hosts, strict=True)):
        cmd = [
            "run",
            "--insecure",
            "--node-id",
            name,
            "--data-dir",
            str(workdir / name),
            "--bind",
            host,
            "--coap-port",
            str(coap),
            "--http-port",
            str(http),
            "--no-mdns",
            "--log-level",
            "warning",
        ]
        cmd += [a for j, other in enumerate(hosts) if j != i for a in ("--peer", f"{other}:{coap}")]
        if i == 0:
            cmd += ["--cloud-url", cloud_url, "--probe-interval", "1"]
        children.append(spawn_meshnode(name, cmd, workdir))
    await start_children(children)
    log(f"receipt: cloud and {args.nodes} nodes up ({hosts[0]}..{hosts[-1]}), only {names[0]} has an uplink")

    limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
    async with httpx.AsyncClient(timeout=10.0, limits=limits, trust_env=False) as client:

        async def statuses() -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = [{} for _ in urls]

            async def one(i: int) -> None:
                out[i] = await get_json(client, urls[i] + "/v1/status")

            async with trio.open_nursery() as nursery:
                for i in range(len(urls)):
                    nursery.start_soon(one, i)
            return out

        with trio.move_on_after(args.startup_timeout) as formed:
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    s = await statuses()
                    if agreed_leader([x.get("leader") for x in s]) == names[0] and all(
                        {p["node_id"] for p in x["peers"] if p["state"] == "alive"} >= set(names) - {x["node_id"]}
                        for x in s
                    ):
                        break
                await trio.sleep(0.2)
        if formed.cancelled_caught:
            raise DemoError(f"the mesh did not form with {names[0]} as leader within {args.startup_timeout:g} s")
        await trio.sleep(args.settle)

        stats0 = await get_json(client, cloud_url + "/v1/stats")
        fwd0 = (await get_json(client, urls[0] + "/v1/status"))["forwarder"]
        results: list[dict[str, Any]] = []
        meter = 10_000
        for k in range(args.sessions):
            writer = rng.randrange(args.nodes)
            r = await client.post(
                urls[writer] + "/v1/sessions",
                json={"charger": f"{names[writer]}-cp1", "connector": 1, "id_token": f"tok-{k}", "meter_wh": meter},
            )
            if r.status_code != 201:
                raise DemoError(f"POST /v1/sessions on {names[writer]} answered {r.status_code}: {r.text}")
            sid = r.json()["session_id"]
            events_url = f"{urls[writer]}/v1/sessions/{sid}/events"
            for _ in range(args.meters):
                meter += rng.randrange(100, 2000)
                r = await client.post(events_url, json={"type": "meter", "meter_wh": meter})
                if r.status_code != 201:
                    raise DemoError(f"meter on {names[writer]} answered {r.status_code}: {r.text}")
            await trio.sleep(args.settle)
            meter += rng.randrange(0, 100)
            r = await client.post(events_url, json={"type": "stop", "meter_wh": meter})
            t_stop = trio.current_time()
            if r.status_code != 201:
                raise DemoError(f"stop on {names[writer]} answered {r.status_code}: {r.text}")
            arrived: dict[str, float] = {}

            async def poll(name: str, url: str, in_cloud: bool) -> None:
                while True:
                    try:
                        body = await get_json(client, url)
                        state = body["session"]["state"] if in_cloud else body["state"]
                    except (httpx.HTTPError, KeyError, ValueError):
                        state = None
                    if state == "reconciled":
                        arrived[name] = trio.current_time() - t_stop
                        return
                    await trio.sleep(args.poll_interval)

            with trio.move_on_after(args.timeout):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(poll, "cloud", f"{cloud_url}/v1/sessions/{sid}", True)
                    for name, url in zip(names, urls, strict=True):
                        nursery.start_soon(poll, name, f"{url}/v1/sessions/{sid}", False)
            nodes_done = {n: arrived[n] for n in names if n in arrived}
            results.append({
                "session_id": sid, "writer": names[writer], "ledger_s": arrived.get("cloud"),
                "own_node_s": arrived.get(names[writer]),
                "every_node_s": max(nodes_done.values()) if len(nodes_done) == len(names) else None,
                "per_node_s": nodes_done,
            })  # fmt: skip
            last = results[-1]
            fmt = lambda x: "timed out" if x is None else f"{x * 1000:.0f} ms"  # noqa: E731
            log(
                f"  session {k + 1}/{args.sessions} on {names[writer]}: stop to ledger {fmt(last['ledger_s'])}, "
                f"to every node {fmt(last['every_node_s'])}"
            )
        await trio.sleep(args.settle)
        stats1 = await get_json(client, cloud_url + "/v1/stats")
        fwd1 = (await get_json(client, urls[0] + "/v1/status"))["forwarder"]
        raw = docs = 0
        for res in results:
            rr = await client.get(f"{urls[names.index(res['writer'])]}/v1/sessions/{res['session_id']}/automerge")
            rr.raise_for_status()
            docs += len(rr.content)
            raw += sum(len(b) for b in read_session(Document.load(rr.content)).events.values())

    n = len(results)
    delta = {k: stats1[k] - stats0[k] for k in ("bytes_received", "bytes_received_inflated", "requests", "messages")}
    return {
        "nodes": args.nodes,
        "uplink_nodes": 1,
        "sessions": n,
        "meters_per_session": args.meters,
        "sessions_reconciled_everywhere": sum(1 for r in results if r["every_node_s"] is not None),
        "stop_to_receipt_every_node_s": summary([r["every_node_s"] for r in results if r["every_node_s"] is not None]),
        "stop_to_receipt_own_node_s": summary([r["own_node_s"] for r in results if r["own_node_s"] is not None]),
        "stop_to_ledger_s": summary([r["ledger_s"] for r in results if r["ledger_s"] is not None]),
        "per_node_s": summary([v for r in results for v in r["per_node_s"].values()]),
        "writer_was_leader": sum(1 for r in results if r["writer"] == names[0]),
        "cloud_bytes_per_session": round(delta["bytes_received"] / max(n, 1), 1),
        "cloud_bytes_inflated_per_session": round(delta["bytes_received_inflated"] / max(n, 1), 1),
        "cloud_requests_per_session": round(delta["requests"] / max(n, 1), 2),
        "forwarder_bytes_sent_per_session": round((fwd1["bytes_sent"] - fwd0["bytes_sent"]) / max(n, 1), 1),
        "forwarder_batches_per_session": round((fwd1["batches"] - fwd0["batches"]) / max(n, 1), 2),
        "raw_event_bytes_per_session": round(raw / max(n, 1), 1),
        "automerge_doc_bytes_per_session": round(docs / max(n, 1), 1),
        "cloud_bytes_per_raw_event_byte": round(delta["bytes_received"] / raw, 3) if raw else None,
    }


# --- part 2: cloud ingest ------------------------------------------------------------------------


def build_sessions(count: int, meters: int, devices: int, seed: int) -> tuple[dict[str, Document], int]:
    """`count` completed sessions signed by `devices` chargers; returns them and their raw event bytes."""
    rng = random.Random(seed)
    signers = [EventSigner(f"charger-{d + 1}", nacl.signing.SigningKey(rng.randbytes(32))) for d in range(devices)]
    registers = [rng.randrange(0, 100_000) for _ in signers]
    docs: dict[str, Document] = {}
    raw = 0
    ts = 1_700_000_000_000
    for k in range(count):
        d = k % devices
        signer = signers[d]
        sid = f"ingest-{seed}-{k:06d}"
        doc = new_session_doc(
            sid,
            site="bench",
            charger=signer.device_id,
            connector=1,
            id_token=f"tok-{k}",
            tariff=TARIFF,
            created_by=signer.device_id,
        )
        ts += 1000
        kinds = [("authorize", None), ("start", registers[d])]
        for _ in range(meters):
            registers[d] += rng.randrange(100, 2000)
            kinds.append(("meter", registers[d]))
        registers[d] += rng.randrange(0, 100)
        kinds.append(("stop", registers[d]))
        for i, (kind, meter) in enumerate(kinds):
            event = signer.sign(kind, sid, ts + i, meter_wh=meter)
            add_event(doc, event, public_key=signer.public_key)
            raw += len(event.encoded)
        docs[sid] = doc
    return docs, raw


async def one_leader(
    cloud_url: str,
    node_id: str,
    docs: dict[str, Document],
    batch: int,
    counters: dict[str, int],
    latencies: dict[str, list[float]],
) -> None:
    """Send `docs` like a leader's forwarder: batches of sync rounds until every receipt is back.

    `latencies["request"]` gets the time of each request (one sync round: POST to reply),
    `latencies["exchange"]` that of each batch's whole exchange (every round until settled).
    """
    replica = Replica(docs)
    client = CloudClient(cloud_url)
    try:
        ids = sorted(docs)
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            t_exchange = time.perf_counter()
            for _round in range(12):
                msgs = {d: m for d in chunk if (m := replica.generate(CLOUD_PEER, d)) is not None}
                if not msgs:
                    latencies["exchange"].append(time.perf_counter() - t_exchange)
                    break
                t_request = time.perf_counter()
                reply, size = await client.sync(CloudSyncRequest(node_id, "bench", msgs), timeout=60.0)
                latencies["request"].append(time.perf_counter() - t_request)
                counters["requests"] += 1
                counters["bytes"] += size
                if reply.errors:
                    raise DemoError(f"the cloud refused documents: {dict(list(reply.errors.items())[:3])}")
                for d, msg in reply.msgs.items():
                    replica.receive(CLOUD_PEER, d, msg)
            else:
                raise DemoError(f"sync of a batch did not settle within 12 rounds (leader {node_id})")
    finally:
        await client.aclose()
    missing = [d for d, doc in docs.items() if read_session(doc).receipt is None]
    if missing:
        raise DemoError(f"{len(missing)} sessions of leader {node_id} got no receipt, e.g. {missing[:3]}")


async def ingest_phase(args: argparse.Namespace, workdir: Path, children: list[Child]) -> list[dict[str, Any]]:
    results = []
    for leaders in args.ingest_leaders:
        log(f"ingest: building {args.ingest_sessions} completed sessions for {leaders} leader(s)")
        docs, raw = build_sessions(args.ingest_sessions, args.meters, args.devices, args.seed + leaders)
        db = None
        if args.ingest_postgres:
            db = fresh_postgres_database(args.ingest_postgres, f"bench_ingest_{leaders}")
        # The first instance creates the schema alone; the others are spawned once it is ready.
        clouds = [spawn_cloud(workdir, f"cloud-ingest-{leaders}-1", db, args.ingest_bind)]
        children.append(clouds[0][0])
        await start_children([clouds[0][0]])
        for k in range(1, args.ingest_instances):
            clouds.append(spawn_cloud(workdir, f"cloud-ingest-{leaders}-{k + 1}", db, args.ingest_bind))
            children.append(clouds[-1][0])
        await start_children([c for c, _ in clouds[1:]])
        url = clouds[0][1]
        ids = sorted(docs)
        shares = [{d: docs[d] for d in ids[i::leaders]} for i in range(leaders)]
        counters = {"requests": 0, "bytes": 0}
        latencies: dict[str, list[float]] = {"request": [], "exchange": []}
        load0 = os.getloadavg()
        cpu0 = [cpu_seconds(c.proc.pid) for c, _ in clouds]
        client_cpu0 = time.process_time()
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i, share in enumerate(shares):
                target = clouds[i % len(clouds)][1]  # leaders spread over the instances
                nursery.start_soon(one_leader, target, f"leader-{i + 1}", share, args.ingest_batch, counters, latencies)
        elapsed = time.perf_counter() - t0
        client_cpu = time.process_time() - client_cpu0
        cloud_cpu = sum(cpu_seconds(c.proc.pid) - before for (c, _), before in zip(clouds, cpu0, strict=True))
        load1 = os.getloadavg()
        async with httpx.AsyncClient(timeout=30.0, trust_env=False) as client:
            stats = await get_json(client, url + "/v1/stats")
        if stats["sessions"] != len(docs) or stats["receipts"] != len(docs) or stats["conflicts"]:
            raise DemoError(
                f"after ingest the cloud holds {stats}, expected {len(docs)} sessions and receipts, no conflicts"
            )
        stop_children([c for c, _ in clouds])
        for c, _ in clouds:
            children.remove(c)
        rate = len(docs) / elapsed
        log(
            f"ingest: {leaders} leader(s): {len(docs)} sessions in {elapsed:.2f} s = {rate:.1f} sessions/s, "
            f"cloud CPU {1000 * cloud_cpu / len(docs):.2f} ms/session, load {load0[0]:.2f}"
        )
        results.append({
            "leaders": leaders, "instances": len(clouds), "database": "postgresql" if db else "sqlite",
            "sessions": len(docs), "batch_docs": args.ingest_batch, "seconds": round(elapsed, 3),
            "sessions_per_s": round(rate, 1), "requests": counters["requests"],
            "bytes_per_session": round(counters["bytes"] / len(docs), 1),
            "raw_event_bytes_per_session": round(raw / len(docs), 1),
            "bytes_per_raw_event_byte": round(counters["bytes"] / raw, 3),
            "sync_request_s": summary(latencies["request"]), "sync_exchange_s": summary(latencies["exchange"]),
            "cloud_cpu_s": round(cloud_cpu, 2), "cloud_cpu_ms_per_session": round(1000 * cloud_cpu / len(docs), 3),
            "client_cpu_ms_per_session": round(1000 * client_cpu / len(docs), 3),
            "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in load1],
        })  # fmt: skip
    return results


# --- main ----------------------------------------------------------------------------------------


async def inprocess_phase(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The cloud's `handle_sync` called in this process, no HTTP, the reconciliation run inline.

    Times and CPU are counted only inside `handle_sync` (the leader's side is not); with
    `--profile FILE` cProfile records exactly that and writes its stats to FILE.
    """
    import cProfile
    import pstats

    from uplink import CloudSyncResponse
    from uplink._cloud import open_cloud
    from uplink._wire import compress, decompress

    async def inline(fn: Any, *a: Any) -> Any:
        return fn(*a)

    docs, _raw = build_sessions(args.ingest_sessions, args.meters, args.devices, args.seed)
    db = (
        fresh_postgres_database(args.ingest_postgres, "bench_ingest_inprocess")
        if args.ingest_postgres
        else f"sqlite:///{workdir / 'inprocess.db'}"
    )
    # CPU time, not wall time: on a shared machine a wall-clock profile charges the
    # time this process waited for a CPU to whatever it happened to be running.
    profiler = cProfile.Profile(time.process_time) if args.profile else None
    cloud_wall = cloud_cpu = 0.0
    requests: list[float] = []
    key = nacl.signing.SigningKey(bytes(32))
    async with open_cloud(db, signing_key=key, run_sync=inline) as cloud:
        replica = Replica(docs)
        ids = sorted(docs)
        for start in range(0, len(ids), args.ingest_batch):
            chunk = ids[start : start + args.ingest_batch]
            for _round in range(12):
                msgs = {d: m for d in chunk if (m := replica.generate(CLOUD_PEER, d)) is not None}
                if not msgs:
                    break
                body = compress(CloudSyncRequest("leader-1", "bench", msgs).encode())
                c0, t0 = time.process_time(), time.perf_counter()
                if profiler is not None:
                    profiler.enable()
                answer = await cloud.handle_sync(body, "deflate")
                if profiler is not None:
                    profiler.disable()
                requests.append(time.perf_counter() - t0)
                cloud_wall += requests[-1]
                cloud_cpu += time.process_time() - c0
                reply = CloudSyncResponse.decode(decompress(answer))
                if reply.errors:
                    raise DemoError(f"the cloud refused documents: {dict(list(reply.errors.items())[:3])}")
                for d, msg in reply.msgs.items():
                    replica.receive(CLOUD_PEER, d, msg)
            else:
                raise DemoError("sync of a batch did not settle within 12 rounds")
        stats = cloud.stats()
    if stats["sessions"] != len(docs) or stats["receipts"] != len(docs) or stats["conflicts"]:
        raise DemoError(f"after ingest the cloud holds {stats}, expected {len(docs)} sessions and receipts")
    if profiler is not None:
        profiler.dump_stats(args.profile)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(40)
    n = len(docs)
    log(
        f"in process: {n} sessions, {n / cloud_wall:.1f} sessions/s of handle_sync, {1000 * cloud_cpu / n:.2f} ms CPU each"
    )
    return {
        "database": "postgresql" if args.ingest_postgres else "sqlite", "sessions": n,
        "batch_docs": args.ingest_batch, "requests": len(requests), "handle_sync_s": round(cloud_wall, 3),
        "sessions_per_s": round(n / cloud_wall, 1), "cpu_ms_per_session": round(1000 * cloud_cpu / n, 3),
        "sync_request_s": summary(requests), "profiled": bool(profiler), "loadavg": [round(x, 2) for x in os.getloadavg()],
    }  # fmt: skip


async def run(args: argparse.Namespace, workdir: Path, children: list[Child]) -> dict[str, Any]:
    out: dict[str, Any] = {"benchmark": "uplink", "cpus": os.cpu_count()}
    if args.sessions > 0:
        out["receipt"] = await receipt_phase(args, workdir, children)
        stop_children(children)
        children.clear()
    if args.ingest_sessions > 0 and args.ingest_inprocess:
        out["ingest_inprocess"] = await inprocess_phase(args, workdir)
    elif args.ingest_sessions > 0:
        out["ingest"] = await ingest_phase(args, workdir, children)
    out["notes"] = [
        f"receipt: real processes on loopback: a meshnode cloud (SQLite) and {args.nodes} meshnode run nodes, full "
        "mesh of static peers, only the first node has --cloud-url (straight at the cloud, --probe-interval 1) and "
        "leads. Sessions run one at a time on a node chosen at random (seeded); each is stopped "
        f"{args.settle:g} s after its last meter event. Times are from the stop's 201 until each node's "
        "GET /v1/sessions/{id} (or the cloud's) shows 'reconciled', polled every "
        f"{args.poll_interval * 1000:g} ms, so each is an upper bound by up to one poll interval plus a round trip.",
        "receipt bytes: deltas of the cloud's /v1/stats over the phase (bytes_received = deflated request bodies; "
        "responses, HTTP headers and probes excluded) and of the leader's forwarder bytes_sent, per session; "
        "raw_event_bytes = sum of the signed event CBOR sizes in each session document.",
        f"ingest: {args.ingest_instances} cloud instance(s) alone over HTTP on loopback, "
        f"{'a fresh PostgreSQL database' if args.ingest_postgres else 'fresh SQLite'} per row, sessions built with crdt beforehand "
        f"(authorize, start, {args.meters} meters, stop; {args.devices} charger keys, valid chains), sent with "
        f"uplink.CloudClient in batches of {args.ingest_batch} documents, Automerge sync rounds until every "
        "receipt is back; leaders > 1 run in parallel (as separate sites would), splitting the sessions. "
        "The client runs in the benchmark process and shares the CPUs with the cloud.",
        f"All processes share this machine's {os.cpu_count()} CPUs.",
    ]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Uplink benchmark: time from a session's stop to its receipt on every node of a real mesh, "
        "cloud ingest in sessions per second, and bytes to the cloud per session against the raw signed events. "
        "Prints one JSON object on stdout, progress on stderr.",
    )
    p.add_argument("--nodes", type=int, default=5, help="mesh nodes, one with an uplink (default 5)")
    p.add_argument(
        "--sessions", type=int, default=25, help="sessions through the mesh, one at a time (default 25; 0 skips)"
    )
    p.add_argument("--meters", type=int, default=4, help="meter events per session (default 4)")
    p.add_argument(
        "--settle", type=float, default=1.0, help="seconds between a session's last meter and its stop (default 1)"
    )
    p.add_argument("--poll-interval", type=float, default=0.05, help="seconds between polls of a node (default 0.05)")
    p.add_argument(
        "--timeout", type=float, default=30.0, help="give up on a receipt after this many seconds (default 30)"
    )
    p.add_argument(
        "--ingest-sessions",
        type=int,
        default=400,
        help="completed sessions sent straight to the cloud (default 400; 0 skips)",
    )
    p.add_argument("--ingest-batch", type=int, default=50, help="documents per sync request (default 50)")
    p.add_argument(
        "--ingest-leaders",
        default="1,4",
        help="comma-separated numbers of leaders sending in parallel, one run each (default 1,4)",
    )
    p.add_argument(
        "--ingest-postgres",
        default=None,
        help="ingest on PostgreSQL: the URL of a server's database to connect to; the benchmark creates (and "
        "drops first) one database per row there (default: SQLite files)",
    )
    p.add_argument(
        "--ingest-instances",
        type=int,
        default=1,
        help="meshnode cloud processes sharing the ingest database, leaders spread over them (default 1; more "
        "than 1 needs --ingest-postgres)",
    )
    p.add_argument(
        "--devices", type=int, default=10, help="charger keys the ingest sessions are signed with (default 10)"
    )
    p.add_argument(
        "--ingest-inprocess",
        action="store_true",
        help="ingest by calling the cloud's handle_sync in this process (no HTTP, reconciliation inline; "
        "times and CPU counted inside handle_sync only) instead of cloud processes",
    )
    p.add_argument(
        "--profile", metavar="FILE", default=None, help="with --ingest-inprocess: cProfile handle_sync into FILE"
    )
    p.add_argument(
        "--ingest-bind", default="127.0.0.1", help="loopback address the ingest clouds listen on (default 127.0.0.1)"
    )
    p.add_argument("--base-address", default="127.0.0.40", help="address of node 1 (default 127.0.0.40)")
    p.add_argument("--startup-timeout", type=float, default=30.0, help="seconds for the mesh to form (default 30)")
    p.add_argument("--seed", type=int, default=1, help="seed (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (data dirs, logs) afterwards")
    args = p.parse_args(argv)
    try:
        args.ingest_leaders = [int(x) for x in str(args.ingest_leaders).split(",") if x.strip()]
    except ValueError:
        p.error(f"--ingest-leaders must be comma-separated integers, got {args.ingest_leaders!r}")
    if args.nodes < 2:
        p.error("--nodes must be at least 2")
    if min(args.ingest_leaders, default=1) < 1 or args.ingest_batch < 1 or args.devices < 1 or args.meters < 0:
        p.error("--ingest-leaders, --ingest-batch and --devices must be at least 1, --meters at least 0")
    if args.ingest_instances < 1 or (args.ingest_instances > 1 and not args.ingest_postgres):
        p.error("--ingest-instances must be at least 1, and more than 1 needs --ingest-postgres")
    if args.poll_interval <= 0 or args.timeout <= 0 or args.settle < 0:
        p.error("--poll-interval and --timeout must be positive, --settle not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="meshbench-uplink-", dir=os.environ.get("BENCH_DIR")))
    children: list[Child] = []
    try:
        result = trio.run(run, args, workdir, children)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except (DemoError, UplinkError, httpx.HTTPError) as exc:
        log(f"bench/uplink.py: {exc}")
        return 1
    except BaseExceptionGroup as group:
        errors = [e for e in group.exceptions if isinstance(e, DemoError | UplinkError | httpx.HTTPError)]
        if not errors:
            raise
        log(f"bench/uplink.py: {errors[0]}")
        return 1
    finally:
        stop_children(children)
        if args.keep:
            log(f"data dirs and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
