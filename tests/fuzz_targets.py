"""Fuzz targets: every CoAP resource of a node, the node's HTTP API, the cloud's endpoints.

Each target takes one input (bytes) and checks three things:

- no unexpected exception: a CoAP handler that crashes (the dispatcher's
  5.00) or raises past the dispatcher, an ASGI app that raises or answers 500;
- no document changed: every document's heads, the number of documents and
  the node's incarnation are compared before and after; the HTTP API may
  change documents only when it answers 201 (it acknowledged a write);
- bounded memory: the runner samples RSS and reports start and end.

The CoAP targets are built from the node's route table (``Router.routes()``),
so a resource added to the node is fuzzed without touching this file. They
run twice: against an insecure node ("coap:") and against a node enrolled in
a site whose traffic is sealed ("coap-sealed:", which mostly exercises the
sealer: a mutated sealed message no longer verifies). Their
seeds are recorded from a real exchange between two nodes (every payload
that crossed the wire, per resource), so mutations start from valid messages.
Requests reach the node through the in-memory transport's server path (the
shared Dispatcher, as on CoAP), from a known peer's address or a stranger's.

Run (coverage-guided, atheris/libFuzzer)::

    python -m tests.fuzz_targets --inputs 100000 [--target coap:/m/sync:POST] [--json out.json]

One atheris run drives all targets: the first input byte picks the target,
so libFuzzer's coverage feedback spans them all. ``bench/fuzz.py`` runs this
for 1,000,000 inputs; ``tests/test_fuzz.py`` for a few thousand.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports(include=["meshnode", "crdt", "uplink"]):
    import trio

    from meshnode._api import build_app
    from meshnode._discovery import StaticDiscovery
    from meshnode._node import Node, NodeConfig
    from meshnode._security import (
        Identity,
        SealedTransport,
        Sealer,
        create_site,
        enroll,
    )
    from meshnode._transport import MemoryNetwork, MemoryTransport
    from uplink._cloud import open_cloud
    from uplink._wire import CONTENT_ENCODING, SYNC_PATH, CloudSyncRequest, compress

import nacl.signing

VICTIM, PEER = "10.0.0.1:5683", "10.0.0.2:5683"
TRAFFIC = {
    "requests",
    "messages",
    "messages_refused",
    "bytes_received",
    "bytes_received_inflated",
    "duplicates_rejected",
}
"""Cloud counters that count traffic, not what the cloud holds."""
CLOUD_KEY = nacl.signing.SigningKey(bytes(range(32)))


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Outcome:
    crashed: str | None = None
    """What went wrong, if the target saw an unexpected exception."""
    changed: bool = False
    """A document changed where nothing may change."""
    refuted: bool = False
    """The node raised its incarnation to refute a record about itself."""


@dataclass
class Target:
    name: str
    one: Callable[[bytes], Awaitable[Outcome]]
    seeds: list[bytes] = field(default_factory=list)


# --------------------------------------------------------------------------
# The node: a victim that holds two sessions, and recorded traffic


class RecordingNetwork(MemoryNetwork):
    """Records every request payload per (resource, method-less) path."""

    def __init__(self) -> None:
        super().__init__()
        self.recorded: dict[str, list[bytes]] = defaultdict(list)

    async def carry(self, src: str, dst: str, resource: str, payload: bytes, *, response: bool) -> bool:
        if not response and len(self.recorded[resource]) < 64:
            self.recorded[resource].append(payload)
        return True


def snapshot(node: Node) -> tuple[Any, ...]:
    """Every document's heads and how many there are."""
    heads = tuple(sorted((doc_id, tuple(sorted(doc.get_heads()))) for doc_id, doc in node.replica.docs.items()))
    return heads, len(node.replica.docs)


def incarnation(node: Node) -> int:
    """Our incarnation: a member record claiming a newer one about us makes
    the node refute it by raising its own (SWIM); counted, not a document."""
    return int(node.status_json()["incarnation"])


def _node(name: str, data_dir: Path, inner: MemoryTransport, peer: str, site_dir: Path | None) -> Node:
    """A node on ``inner``; enrolled in the site at ``site_dir`` (sealed
    transport) if one is given, else insecure."""
    config = NodeConfig(
        node_id=name,
        data_dir=data_dir / name,
        seed=len(name),
        gossip_interval=0.1,
        inline_io=True,
        site="field" if site_dir else "default",
    )
    if site_dir is None:
        return Node(config, transport=inner, discovery=StaticDiscovery([peer]))
    enroll(site_dir, name, data_dir / name, now=time.time())
    identity = Identity.load(data_dir / name)
    assert identity is not None
    sealer = Sealer(identity, identity.site_public_key, identity.network_key, started=time.time())
    return Node(
        config,
        transport=SealedTransport(inner, sealer),
        discovery=StaticDiscovery([peer]),
        identity=identity,
        sealer=sealer,
    )


@asynccontextmanager
async def open_victim(
    data_dir: Path, *, enrolled: bool = False
) -> AsyncIterator[tuple[Node, MemoryTransport, RecordingNetwork, str]]:
    """A node that synced two sessions with a peer (recording the traffic);
    the peer is then gone, so nothing but the fuzzer changes the victim.
    ``enrolled``: both are enrolled in one site and seal their traffic (the
    recorded seeds are sealed too); the transport handed out is the inner one,
    whose routes are the sealed handlers."""
    net = RecordingNetwork()
    site_dir = None
    if enrolled:
        site_dir = data_dir / "site"
        create_site(site_dir, "field", now=time.time())
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        transport = await stack.enter_async_context(net.transport(VICTIM))
        victim = _node("victim", data_dir, transport, PEER, site_dir)
        await nursery.start(victim.serve)
        async with net.transport(PEER) as peer_transport, trio.open_nursery() as peer_nursery:
            peer = _node("peer", data_dir, peer_transport, VICTIM, site_dir)
            await peer_nursery.start(peer.serve)
            mine = await victim.create_session("charger-1", 1, "TOKEN-1", meter_wh=0)
            await victim.record_event(mine["session_id"], "meter", 1200)
            theirs = await peer.create_session("charger-2", 1, "TOKEN-2", meter_wh=0)
            with trio.fail_after(30):
                while not (theirs["session_id"] in victim.replica.docs and mine["session_id"] in peer.replica.docs):
                    await trio.sleep(0.05)
                await trio.sleep(1.0)  # a few more rounds: digests, members, syncs both ways
            peer_nursery.cancel_scope.cancel()
        try:
            yield victim, transport, net, mine["session_id"]
        finally:
            nursery.cancel_scope.cancel()


def coap_targets(
    victim: Node, transport: MemoryTransport, recorded: dict[str, list[bytes]], prefix: str = "coap"
) -> list[Target]:
    """One target per (resource, method) in the node's route table."""
    targets = []
    for resource, method in transport.routes():

        async def one(data: bytes, resource: str = resource, method: str = method) -> Outcome:
            # First byte: who asks (the known peer, or one of 64 strangers).
            who = data[0] if data else 0
            remote = PEER if who & 1 else f"10.9.{who >> 1 & 63}.{who % 7 + 2}:5683"
            payload = data[1:]
            before, inc = snapshot(victim), incarnation(victim)
            try:
                response = await transport._serve(remote, resource, method, payload)
            except BaseException as exc:  # PanicException from automerge is a BaseException
                if isinstance(exc, trio.Cancelled):
                    raise
                return Outcome(crashed=f"{type(exc).__name__}: {exc}"[:300])
            outcome = Outcome(changed=snapshot(victim) != before, refuted=incarnation(victim) != inc)
            if response.code.startswith("5."):
                outcome.crashed = f"{response.code} {response.payload[:200]!r}"
            return outcome

        seeds = [b"\x01" + p for p in recorded.get(resource, [])] or [b"\x01"]
        targets.append(Target(f"{prefix}:{resource}:{method}", one, seeds))
    return targets


# --------------------------------------------------------------------------
# ASGI apps called in-process


async def asgi_call(app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes) -> int:
    """One HTTP request through an ASGI app, without sockets; returns the status."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-length", str(len(body)).encode()), *headers],
        "client": ("10.9.9.9", 40000),
        "server": ("fuzz", 80),
    }
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await trio.sleep_forever()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


def _pick(data: bytes, i: int, options: list[Any]) -> Any:
    return options[data[i] % len(options)] if len(data) > i else options[0]


def api_target(victim: Node, session_id: str) -> Target:
    app = build_app(victim)
    paths = [
        ("POST", "/v1/sessions"),
        ("GET", "/v1/sessions"),
        ("GET", "/v1/sessions/{sid}"),
        ("POST", "/v1/sessions/{sid}/events"),
        ("GET", "/v1/sessions/{sid}/automerge"),
        ("GET", "/v1/status"),
        ("POST", "/v1/site/entries"),
    ]

    async def one(data: bytes) -> Outcome:
        method, template = _pick(data, 0, paths)
        sid = _pick(data, 1, [session_id, "nope", "../x", "%00", "a" * 300])
        path = template.format(sid=sid)
        if len(data) > 2 and data[2] == 0xFF:
            method = "PUT"
        body = data[3:]
        before = snapshot(victim)
        try:
            status = await asgi_call(app, method, path, [(b"content-type", b"application/json")], body)
        except Exception as exc:  # noqa: BLE001 (any exception out of the app is the finding)
            return Outcome(crashed=f"{type(exc).__name__}: {exc}"[:300])
        changed = snapshot(victim) != before
        return Outcome(
            crashed=f"HTTP {status}" if status >= 500 else None,
            changed=changed and status != 201,
        )

    seeds = [
        bytes([0, 0, 0]) + json.dumps({"charger": "c9", "connector": 1, "id_token": "T"}).encode(),
        bytes([3, 0, 0]) + json.dumps({"type": "meter", "meter_wh": 1500}).encode(),
        bytes([6, 0, 0]) + json.dumps({"entry": "00ff"}).encode(),
        bytes([5, 0, 0]),
    ]
    return Target("http:node-api", one, seeds)


def cloud_target(cloud: Any) -> Target:
    paths = [
        ("POST", SYNC_PATH),
        ("GET", "/v1/sessions"),
        ("GET", "/v1/sessions/{sid}"),
        ("GET", "/v1/conflicts"),
        ("GET", "/v1/stats"),
        ("GET", "/v1/issuer"),
        ("GET", "/healthz"),
    ]

    def cloud_state() -> Any:
        heads = sorted((d, tuple(sorted(doc.get_heads()))) for d, doc in cloud.replica.docs.items())
        return heads, {k: v for k, v in cloud.stats().items() if k not in TRAFFIC}

    async def one(data: bytes) -> Outcome:
        method, template = _pick(data, 0, paths)
        path = template.format(sid=_pick(data, 1, ["s-1", "x" * 200, "%2e%2e"]))
        mode = data[2] if len(data) > 2 else 0
        raw = data[3:]
        # Mostly deflate what the fuzzer wrote, so its mutations reach the CBOR decoder.
        body = raw if mode & 3 == 0 else compress(raw)
        headers = [(b"content-type", b"application/cbor")]
        if mode & 4 == 0:
            headers.append((b"content-encoding", CONTENT_ENCODING.encode()))
        before = cloud_state()
        try:
            status = await asgi_call(cloud.app, method, path, headers, body)
        except Exception as exc:  # noqa: BLE001 (any exception out of the app is the finding)
            return Outcome(crashed=f"{type(exc).__name__}: {exc}"[:300])
        return Outcome(crashed=f"HTTP {status}" if status >= 500 else None, changed=cloud_state() != before)

    empty = CloudSyncRequest("node-a", "default", {}).encode()
    one_doc = CloudSyncRequest("node-a", "default", {"s-1": b"\x42\x00\x00\x00"}, ("s-2",)).encode()
    seeds = [bytes([0, 0, 1]) + empty, bytes([0, 0, 1]) + one_doc, bytes([4, 0, 0])]
    return Target("http:cloud", one, seeds)


VICTIMS: dict[str, Node] = {}
"""The fuzzed nodes, for the sizes of their per-peer state in the report."""


def victim_state() -> dict[str, dict[str, int]]:
    """Sizes of the per-peer and per-document state each fuzzed node keeps: what
    bad input must not grow without bound (reported at the end of a run)."""
    return {
        name: {
            "documents": len(node.replica.docs),
            "sync_states": len(node.replica.book._states),
            "neighbours": len(node.neighbours),
            "reported": len(node._reported),
            "sync_locks": len(node._sync_locks),
        }
        for name, node in VICTIMS.items()
    }


@asynccontextmanager
async def open_targets(workdir: Path) -> AsyncIterator[list[Target]]:
    (workdir / "plain").mkdir()
    (workdir / "sealed").mkdir()
    async with (
        open_victim(workdir / "plain") as (victim, transport, net, session_id),
        open_victim(workdir / "sealed", enrolled=True) as (sealed_victim, sealed_transport, sealed_net, _),
        open_cloud(
            f"sqlite:///{workdir / 'cloud.db'}", signing_key=CLOUD_KEY, wall_clock=lambda: 1_700_000_000.0
        ) as cloud,
    ):
        VICTIMS.update(plain=victim, sealed=sealed_victim)
        yield [
            *coap_targets(victim, transport, net.recorded),
            *coap_targets(sealed_victim, sealed_transport, sealed_net.recorded, prefix="coap-sealed"),
            api_target(victim, session_id),
            cloud_target(cloud),
        ]


# --------------------------------------------------------------------------
# The runner: trio in a thread of its own, atheris in the main thread


@dataclass
class Tally:
    inputs: int = 0
    crashes: int = 0
    changed: int = 0
    refuted: int = 0
    by_target: Counter[str] = field(default_factory=Counter)
    crash_kinds: Counter[str] = field(default_factory=Counter)
    examples: list[dict[str, str]] = field(default_factory=list)
    rss_start: int = 0
    rss_after_warmup: int = 0
    rss_end: int = 0
    rss_series: list[tuple[int, float]] = field(default_factory=list)  # (inputs, RSS MB)
    heap: dict[str, Any] = field(default_factory=dict)  # --tracemalloc: what the Python heap grew by
    victims: dict[str, dict[str, int]] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def record(self, target: str, data: bytes, outcome: Outcome) -> None:
        self.inputs += 1
        self.by_target[target] += 1
        self.refuted += outcome.refuted
        if outcome.crashed or outcome.changed:
            kind = f"{target}: {'changed a document' if outcome.changed else outcome.crashed}"
            self.crashes += bool(outcome.crashed)
            self.changed += outcome.changed
            self.crash_kinds[kind[:160]] += 1
            if len(self.examples) < 20:
                self.examples.append({"target": target, "what": kind, "input": data.hex()[:400]})

    def report(self, targets: list[str]) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "crashes": self.crashes,
            "documents_changed": self.changed,
            "incarnation_refutations": self.refuted,
            "targets": targets,
            "inputs_by_target": dict(self.by_target),
            "failures": dict(self.crash_kinds.most_common(20)),
            "examples": self.examples,
            "rss_start_mb": round(self.rss_start / 2**20, 1),
            "rss_after_warmup_mb": round(self.rss_after_warmup / 2**20, 1),
            "rss_end_mb": round(self.rss_end / 2**20, 1),
            "rss_series": self.rss_series,
            **({"python_heap": self.heap} if self.heap else {}),
            "victim_state": self.victims,
            "seconds": round(time.monotonic() - self.started, 1),
        }


class Runner:
    """Starts the targets in a trio run on a helper thread; ``call`` runs one
    input there from any other thread (atheris calls from the main thread)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.targets: list[Target] = []
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise RuntimeError("fuzz targets failed to start") from self._error

    def _main(self) -> None:
        async def run() -> None:
            try:
                async with open_targets(self.workdir) as targets:
                    self.targets = targets
                    self._token = trio.lowlevel.current_trio_token()
                    self._stop = trio.Event()
                    self._ready.set()
                    await self._stop.wait()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                raise

        try:
            trio.run(run)
        except BaseException:  # noqa: BLE001 (a thread of our own: print, the caller sees the error)
            traceback.print_exc()

    def call(self, target: Target, data: bytes) -> Outcome:
        async def bounded() -> Outcome:
            with trio.move_on_after(10) as scope:
                return await target.one(data)
            assert scope.cancelled_caught
            return Outcome(crashed="no answer within 10 s")

        return trio.from_thread.run(bounded, trio_token=self._token)

    def stop(self) -> None:
        if self._token is not None and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(30)


def heap_growth(before: Any, after: Any, top: int = 15) -> dict[str, Any]:
    """What the Python heap (tracemalloc) grew by between two snapshots: the
    total and the allocation sites that grew most. RSS growth beyond this total
    is native memory: libFuzzer's corpus and coverage tables, or the allocator's."""
    import tracemalloc

    keep = [tracemalloc.Filter(False, tracemalloc.__file__)]
    before, after = before.filter_traces(keep), after.filter_traces(keep)
    stats = after.compare_to(before, "traceback")
    total_before = sum(s.size for s in before.statistics("filename"))
    total_after = sum(s.size for s in after.statistics("filename"))
    return {
        "traced_mb_at_warmup": round(total_before / 2**20, 2),
        "traced_mb_at_end": round(total_after / 2**20, 2),
        "top_growth": [
            {
                "kb": round(s.size_diff / 1024, 1),
                "blocks": s.count_diff,
                "where": [f"{f.filename.rsplit('/site-packages/', 1)[-1]}:{f.lineno}" for f in s.traceback][-6:],
            }
            for s in stats[:top]
            if s.size_diff > 0
        ],
    }


def fuzz(inputs: int, only: str | None, json_path: str | None, seed: int, trace: bool = False) -> None:
    logging.basicConfig(level=logging.CRITICAL)  # refusals are expected by the thousand
    workdir = Path(tempfile.mkdtemp(prefix="meshnode-fuzz-"))
    runner = Runner(workdir)
    runner.start()
    targets = [t for t in runner.targets if only is None or t.name == only]
    if not targets:
        raise SystemExit(f"no target {only!r}; have {[t.name for t in runner.targets]}")
    tally = Tally(rss_start=rss_bytes())
    warmup = max(1, inputs // 10)
    every = max(1, inputs // 50)
    snapshots: list[Any] = []
    if trace:
        import tracemalloc

        tracemalloc.start(8)

    def finish() -> None:
        tally.rss_end = rss_bytes()
        tally.rss_series.append((tally.inputs, round(tally.rss_end / 2**20, 1)))
        tally.victims = victim_state()
        if snapshots:
            import tracemalloc

            tally.heap = heap_growth(snapshots[0], tracemalloc.take_snapshot())
        result = tally.report([t.name for t in targets])
        text = json.dumps(result, indent=2)
        if json_path:
            Path(json_path).write_text(text)
        print(text, flush=True)
        runner.stop()
        os._exit(0)  # libFuzzer's own exit skips Python's; the report is written

    def test_one_input(data: bytes) -> None:
        target = targets[data[0] % len(targets)] if data else targets[0]
        outcome = runner.call(target, data[1:])
        tally.record(target.name, data[1:], outcome)
        if tally.inputs == warmup:
            tally.rss_after_warmup = rss_bytes()
            if trace:
                import tracemalloc

                snapshots.append(tracemalloc.take_snapshot())
        if tally.inputs % every == 0:
            tally.rss_series.append((tally.inputs, round(rss_bytes() / 2**20, 1)))
        if tally.inputs >= inputs:
            finish()
        elif json_path and tally.inputs % 20_000 == 0:  # a long run reports as it goes
            tally.rss_end = rss_bytes()
            partial = tally.report([t.name for t in targets]) | {"partial": True}
            Path(json_path).write_text(json.dumps(partial, indent=2))

    corpus = workdir / "corpus"
    corpus.mkdir()
    for i, target in enumerate(targets):
        for j, seed_input in enumerate(target.seeds):
            (corpus / f"{i}-{j}").write_bytes(bytes([i]) + seed_input)
    argv = [
        sys.argv[0],
        f"-seed={seed}",
        f"-runs={inputs * 2 + 1000}",
        "-max_len=4096",
        "-rss_limit_mb=4096",
        "-print_final_stats=0",
        "-close_fd_mask=0",
        str(corpus),
    ]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
    finish()  # libFuzzer ran out of runs first (not expected)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=10_000)
    parser.add_argument("--target", default=None, help="fuzz only this target (default: all)")
    parser.add_argument("--json", default=None, help="also write the report here")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="trace the Python heap (slower): report what grew between the warm-up and the end",
    )
    args = parser.parse_args()
    if args.list:
        runner = Runner(Path(tempfile.mkdtemp(prefix="meshnode-fuzz-")))
        runner.start()
        print(json.dumps([t.name for t in runner.targets]))
        runner.stop()
        return
    fuzz(args.inputs, args.target, args.json, args.seed, trace=args.tracemalloc)


if __name__ == "__main__":
    main()
