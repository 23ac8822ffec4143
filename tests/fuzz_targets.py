"""Fuzz targets: every CoAP resource of a node, the node's HTTP API, OCPP frames, the cloud's endpoints.

Each target takes one input (bytes) and checks:

- no unexpected exception: a CoAP handler that crashes (the dispatcher's
  5.00) or raises past the dispatcher, an ASGI app that raises or answers 5xx,
  an OCPP frame that raises out of `route_message` (which ends the charger's
  connection) or makes a handler fail (InternalError "An unexpected error
  occurred."); a guarded API must refuse a request without a valid token;
- no document changed: every document's heads, the number of documents and
  the node's incarnation are compared before and after (at the cloud: its
  documents, ledger counters, review decisions and site entries); the HTTP APIs
  may change them only when they answer 201, an OCPP handler only when it
  answers a CALLRESULT (a write was acknowledged);
- bounded memory: the runner samples RSS and reports start and end;
- bounded logging: WARNING and ERROR lines are counted per template.

Targets: ``coap:`` and ``coap-sealed:`` (below), ``http:node-api`` (an insecure
node's API), ``http:node-api-guarded`` (an enrolled node's API behind its token
guard, with no token, the operator's, the read-only one or an unknown one),
``ocpp:1.6`` and ``ocpp:2.0.1`` (frames from a charger connected to the node),
``http:cloud`` (an open cloud) and ``http:cloud-site`` (a cloud that trusts a
site: signed sync requests only, ``POST /v1/site/entries``). The HTTP targets'
route lists are checked against the applications by ``tests/test_fuzz.py``.

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
import base64
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
    from uplink._wire import CONTENT_ENCODING, SYNC_PATH, compress

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
    wrote: bool = False
    """Documents changed and the target acknowledged a write (a 201, a CALLRESULT): the
    memory this takes is the node's data growing, not a leak."""


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
        suspect_after=1.0,
        dead_after=2.0,
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
        with trio.fail_after(30):  # the peer is gone: a remote command asks nobody (else it waits for it)
            while victim.membership is not None and victim.membership.live_peers(victim.now()):
                await trio.sleep(0.1)
        try:
            yield victim, transport, net, mine["session_id"]
        finally:
            nursery.cancel_scope.cancel()


def command_seeds() -> dict[str, list[bytes]]:
    """Valid `/m/ocpp/command` requests (no exchange between two nodes makes one unless an
    operator asks for a charger held elsewhere)."""
    from meshnode.ocpp._remote import Command, CommandRequest

    commands = [
        Command("start", "charger-1", id_token="TOKEN-1", evse=1),
        Command("stop", "charger-1", transaction_id="7", session_id="s-1"),
        Command("profile", "charger-1", slot=1, url="ws://10.0.0.3:9000/ocpp/"),
    ]
    return {"/m/ocpp/command": [CommandRequest("peer", c).encode() for c in commands]}


def coap_targets(
    victim: Node,
    transport: MemoryTransport,
    recorded: dict[str, list[bytes]],
    prefix: str = "coap",
    extra_seeds: dict[str, list[bytes]] | None = None,
) -> list[Target]:
    """One target per (resource, method) in the node's route table."""
    extra = extra_seeds or {}
    recorded = {k: [*recorded.get(k, []), *extra.get(k, [])] for k in {*recorded, *extra}}
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
# OCPP: frames from a charger connected to the node


class FrameSink:
    """The charger's end of a connection: keeps what the node sends (one input's worth)."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def recv(self) -> str:  # the handler is driven by `route_message`, never reads
        raise AssertionError("not read")

    async def send(self, message: str) -> None:
        self.sent.append(message)


UNEXPECTED = "An unexpected error occurred."
"""The description the `ocpp` library gives an exception of ours in a handler (InternalError)."""


def _ocpp_seeds(version: str) -> list[bytes]:
    t = "2026-11-27T12:00:00Z"
    if version == "ocpp1.6":
        calls = [
            ["BootNotification", {"chargePointVendor": "V", "chargePointModel": "M"}],
            ["Heartbeat", {}],
            ["StatusNotification", {"connectorId": 1, "errorCode": "NoError", "status": "Available"}],
            ["Authorize", {"idTag": "TOKEN-1"}],
            ["StartTransaction", {"connectorId": 1, "idTag": "TOKEN-1", "meterStart": 100, "timestamp": t}],
            ["MeterValues", {"connectorId": 1, "transactionId": 1, "meterValue": [
                {"timestamp": t, "sampledValue": [{"value": "1500", "measurand": "Energy.Active.Import.Register"}]}]}],
            ["StopTransaction", {"transactionId": 1, "meterStop": 2000, "timestamp": t, "idTag": "TOKEN-1"}],
            ["DataTransfer", {"vendorId": "V", "data": "x"}],
        ]  # fmt: skip
    else:
        tx = {"transactionId": "tx-1"}
        token = {"idToken": "TOKEN-1", "type": "ISO14443"}
        sample = [{"timestamp": t, "sampledValue": [{"value": 1500, "measurand": "Energy.Active.Import.Register"}]}]
        calls = [
            ["BootNotification", {"chargingStation": {"model": "M", "vendorName": "V"}, "reason": "PowerUp"}],
            ["Heartbeat", {}],
            ["StatusNotification", {"timestamp": t, "connectorStatus": "Available", "evseId": 1, "connectorId": 1}],
            ["Authorize", {"idToken": token}],
            ["TransactionEvent", {"eventType": "Started", "timestamp": t, "triggerReason": "Authorized", "seqNo": 0,
                                  "transactionInfo": tx, "idToken": token, "evse": {"id": 1}, "meterValue": sample}],
            ["TransactionEvent", {"eventType": "Updated", "timestamp": t, "triggerReason": "MeterValuePeriodic",
                                  "seqNo": 1, "transactionInfo": tx, "meterValue": sample}],
            ["TransactionEvent", {"eventType": "Ended", "timestamp": t, "triggerReason": "StopAuthorized", "seqNo": 2,
                                  "transactionInfo": tx, "meterValue": sample}],
            ["MeterValues", {"evseId": 1, "meterValue": sample}],
            ["NotifyEvent", {"generatedAt": t, "seqNo": 0, "eventData": []}],
        ]  # fmt: skip
    frames = [json.dumps([2, f"m{i}", action, payload]).encode() for i, (action, payload) in enumerate(calls)]
    return [b"\x00" + f for f in frames] + [b"\x00" + json.dumps([3, "r1", {}]).encode(), b"\x07" + frames[1]]


def ocpp_targets(victim: Node, server: Any, loop: Any) -> list[Target]:
    """One target per OCPP version: frames from a charger connected to ``victim``.

    The handler is the one `OcppServer` makes for a connection (`VERSIONS`), fed frame by
    frame through `route_message` (what its reader does with each frame). Input: byte 0
    (7: a binary frame, else text), then the frame. A frame must not raise out of
    `route_message` (that ends the connection), nor make a handler fail (the library's
    InternalError "An unexpected error occurred."); documents may change only when the
    node answered a CALL with a CALLRESULT (it accepted the message)."""
    import trio_asyncio

    from meshnode.ocpp import VERSIONS, ChargerContext

    targets = []
    for version in sorted(VERSIONS):
        charger = f"CP-F{version.removeprefix('ocpp').replace('.', '')}"
        sink = FrameSink()
        handler = VERSIONS[version](charger, sink, ChargerContext(server.bridge, server, "10.9.9.9"))
        server.handlers[charger] = handler
        server.bridge.connected(charger, version, "10.9.9.9")

        async def one(data: bytes, handler: Any = handler, sink: FrameSink = sink) -> Outcome:
            frame: str | bytes = data[1:] if data[:1] == b"\x07" else data[1:].decode("utf-8", "replace")
            sink.sent.clear()
            before = snapshot(victim)
            # This task was started from the fuzzer's thread, outside `open_loop`: the handler's
            # way back into trio (`trio_as_aio`) finds the loop here, as in `meshnode run`.
            trio_asyncio.current_loop.set(loop)
            try:
                await loop.run_aio_coroutine(handler.route_message(frame))  # on the node's asyncio loop
            except BaseException as exc:
                if isinstance(exc, trio.Cancelled):
                    raise
                return Outcome(crashed=f"{type(exc).__name__}: {exc}"[:300])
            answers = []
            for text in sink.sent:
                try:
                    answers.append(json.loads(text))
                except ValueError:
                    return Outcome(crashed=f"not JSON sent to the charger: {text[:100]!r}")
            failed = [a for a in answers if a[:1] == [4] and len(a) > 3 and a[3] == UNEXPECTED]
            accepted = any(a[:1] == [3] for a in answers)
            return Outcome(
                crashed=f"CALLERROR {failed[0][2]}: {failed[0][3]}" if failed else None,
                changed=snapshot(victim) != before and not accepted,
                wrote=snapshot(victim) != before and accepted,
            )

        targets.append(Target(f"ocpp:{version.removeprefix('ocpp')}", one, _ocpp_seeds(version)))
    return targets


# --------------------------------------------------------------------------
# ASGI apps called in-process


async def asgi_call(
    app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes, query: bytes = b""
) -> int:
    """One HTTP request through an ASGI app, without sockets; returns the status.

    The client "disconnects" once the first body chunk arrives, so a stream that
    never ends by itself (the page's server-sent events) ends there."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8", "surrogateescape"),
        "query_string": query,
        "root_path": "",
        "headers": [(b"content-length", str(len(body)).encode()), *headers],
        "client": ("10.9.9.9", 40000),
        "server": ("fuzz", 80),
    }
    sent = False
    status = 0
    answered = trio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await answered.wait()
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            answered.set()

    await app(scope, receive, send)
    return status


def _split_query(raw: bytes) -> tuple[bytes, bytes]:
    """The fuzzer writes "query\nbody": what comes before the first newline is the query string."""
    query, newline, body = raw.partition(b"\n")
    return (query, body) if newline else (b"", raw)


def _pick(data: bytes, i: int, options: list[Any]) -> Any:
    return options[data[i] % len(options)] if len(data) > i else options[0]


NODE_API = [
    ("POST", "/v1/sessions"),
    ("GET", "/v1/sessions"),
    ("GET", "/v1/sessions/{sid}"),
    ("POST", "/v1/sessions/{sid}/events"),
    ("GET", "/v1/sessions/{sid}/automerge"),
    ("GET", "/v1/status"),
    ("POST", "/v1/site/entries"),
    ("POST", "/v1/chargers/{cp}/start"),
    ("POST", "/v1/sessions/{sid}/stop"),
    ("POST", "/v1/chargers/{cp}/network-profile"),
    ("GET", "/"),
    ("GET", "/assets/{asset}"),
    ("GET", "/v1/page/snapshot"),
    ("GET", "/v1/page/events"),
    ("GET", "/metrics"),
]
"""Every route of the node's HTTP API (`meshnode._api`, `meshnode.ocpp._remote`, `meshnode.web`);
`test_fuzz.py` checks this list against the application's own routes."""
WRONG_TOKEN = "a-well-formed-but-unknown-token"


def api_target(victim: Node, session_id: str, *, tokens: Any = None, name: str = "http:node-api") -> Target:
    """The node's HTTP API, in front of it the guard `serve_api` puts there (with the
    node's tokens when ``tokens`` is given: an enrolled node).

    Input: byte 0 picks the route, byte 1 the id in it, byte 2 the flags (0xFF: PUT;
    bits 0-1 the token: none, operator, read-only, unknown; bit 2: as ``?access_token``
    of an event stream instead of the header; bit 3: the body starts with "query\\n"); the rest is the body.
    A guarded API must answer 401 without a valid token on /v1 and 403 to a write
    with the read-only one; documents may change only when it answers 201."""
    from meshnode._api import MAX_BODY
    from meshnode._apiauth import READ_METHODS, ApiGuard

    app = ApiGuard(build_app(victim), tokens=tokens, max_body=MAX_BODY)
    ids = [session_id, "nope", "../x", "%00", "a" * 300]
    chargers = ["charger-1", "CP-F16", "nope", "a" * 300, ""]
    assets = ["node.css", "node.js", "../../etc/passwd", "nope", "%2e%2e/x"]

    async def one(data: bytes) -> Outcome:
        method, template = _pick(data, 0, NODE_API)
        path = template.format(sid=_pick(data, 1, ids), cp=_pick(data, 1, chargers), asset=_pick(data, 1, assets))
        flags = data[2] if len(data) > 2 else 0
        if flags == 0xFF:
            method = "PUT"
        query, body = _split_query(data[3:]) if flags & 8 else (b"", data[3:])
        headers = [(b"content-type", b"application/json")]
        token = None
        if tokens is not None:
            token = [None, tokens.write, tokens.read, WRONG_TOKEN][flags & 3]
            if token is not None and flags & 4:  # as a browser's EventSource sends it
                query = b"access_token=" + token.encode() + (b"&" + query if query else b"")
                headers.append((b"accept", b"text/event-stream"))
            elif token is not None:
                headers.append((b"authorization", f"Bearer {token}".encode()))
        before = snapshot(victim)
        try:
            status = await asgi_call(app, method, path, headers, body, query)
        except Exception as exc:  # noqa: BLE001 (any exception out of the app is the finding)
            return Outcome(crashed=f"{type(exc).__name__}: {exc}"[:300])
        changed = snapshot(victim) != before
        # 503: too many live pages open; 504: a remote command's answer when a node that may
        # hold the charger did not answer (HTTP_STATUS in meshnode.ocpp._remote).
        fine = (503, 504) if "/chargers/" in template or template.endswith("/stop") else (503,)
        crashed = f"HTTP {status}" if status >= 500 and status not in fine or status == 0 else None
        if tokens is not None and path.startswith("/v1"):
            # The guard's answer when the request carries no valid token where it reads one.
            role = None if token in (None, WRONG_TOKEN) else "read" if token == tokens.read else "write"
            if flags & 4 and method != "GET":  # ?access_token counts only for a GET of an event stream
                role = None
            if role is None and status != 401:
                crashed = f"HTTP {status} to a request without a valid token"
            if role == "read" and method not in READ_METHODS and status != 403:
                crashed = f"HTTP {status} to a write with the read-only token"
        return Outcome(crashed=crashed, changed=changed and status != 201, wrote=changed and status == 201)

    seeds = [
        bytes([0, 0, 1]) + json.dumps({"charger": "c9", "connector": 1, "id_token": "T"}).encode(),
        bytes([3, 0, 1]) + json.dumps({"type": "meter", "meter_wh": 1500}).encode(),
        bytes([6, 0, 1]) + json.dumps({"entry": "00ff"}).encode(),
        bytes([5, 0, 2]),
        bytes([7, 0, 1]) + json.dumps({"id_token": "T", "evse": 1}).encode(),
        bytes([8, 0, 1]) + b"{}",
        bytes([9, 1, 1]) + json.dumps({"slot": 1, "url": "ws://10.0.0.3:9000/ocpp/"}).encode(),
        bytes([11, 0, 0]),
        bytes([12, 0, 2]),
        bytes([13, 0, 2]),
        bytes([14, 0, 0]),
        bytes([1, 0, 10]) + b"site=x&limit=3\n",
    ]
    return Target(name, one, seeds)


CLOUD_API = [
    ("POST", SYNC_PATH),
    ("GET", "/v1/sessions"),
    ("GET", "/v1/sessions/{sid}"),
    ("GET", "/v1/conflicts"),
    ("GET", "/v1/stats"),
    ("GET", "/v1/issuer"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("POST", "/v1/site/entries"),
    ("GET", "/"),
    ("GET", "/assets/{asset}"),
    ("GET", "/v1/page/overview"),
    ("GET", "/v1/reviews"),
    ("POST", "/v1/reviews/{sid}"),
    ("GET", "/ocpi/versions"),
    ("GET", "/ocpi/2.2.1"),
    ("GET", "/ocpi/2.2.1/cdrs"),
    ("GET", "/ocpi/2.2.1/sessions"),
    ("GET", "/ocpi/2.2.1/tariffs"),
]
"""Every route of the cloud (`uplink._cloud`, `uplink._cloud_web`, `uplink._ocpi`);
`test_fuzz.py` checks this list against the application's own routes."""
OCPI_TOKEN = "fuzz-ocpi-token"


def cloud_state(cloud: Any, site_dir: Path | None = None) -> Any:
    """What bad input must not change at the cloud: its documents, what its ledger
    holds (its counters but those of traffic), the review decisions, the site's entries."""
    heads = sorted((d, tuple(sorted(doc.get_heads()))) for d, doc in cloud.replica.docs.items())
    with cloud.ledger.read() as tx:
        reviews = len(tx.reviews())
    entries = sorted(p.name for p in (site_dir / "entries").glob("*")) if site_dir is not None else []
    return heads, {k: v for k, v in cloud.stats().items() if k not in TRAFFIC}, reviews, entries


def cloud_target(
    cloud: Any, *, name: str = "http:cloud", site_dir: Path | None = None, seeds: list[bytes] = ()
) -> Target:
    """The cloud's HTTP endpoints. Input: byte 0 picks the route, byte 1 the id in it,
    byte 2 the mode (bits 0-1: 0 sends the body as written, else deflated, so mutations
    reach the CBOR decoder; bit 2: no Content-Encoding header; bits 3-4 the OCPI
    Authorization: none, the right token, a wrong one, the token unencoded; bit 5: the body
    starts with "query\\n"). Nothing may change but on a 201 (a review decision, a
    site entry): a sync request may change documents only if it is valid, which a
    mutation of a valid one is not."""

    async def one(data: bytes) -> Outcome:
        method, template = _pick(data, 0, CLOUD_API)
        path = template.format(
            sid=_pick(data, 1, ["s-1", "x" * 200, "%2e%2e"]), asset=_pick(data, 1, ["cloud.css", "../x", "nope"])
        )
        mode = data[2] if len(data) > 2 else 0
        query, raw = _split_query(data[3:]) if mode & 32 else (b"", data[3:])
        body = raw if mode & 3 == 0 or not template == SYNC_PATH else compress(raw)
        headers = [(b"content-type", b"application/cbor")]
        if mode & 4 == 0 and template == SYNC_PATH:
            headers.append((b"content-encoding", CONTENT_ENCODING.encode()))
        auth = [None, base64.b64encode(OCPI_TOKEN.encode()), b"d3Jvbmc=", OCPI_TOKEN.encode()][mode >> 3 & 3]
        if auth is not None:
            headers.append((b"authorization", b"Token " + auth))
        before = cloud_state(cloud, site_dir)
        try:
            status = await asgi_call(cloud.app, method, path, headers, body, query)
        except Exception as exc:  # noqa: BLE001 (any exception out of the app is the finding)
            return Outcome(crashed=f"{type(exc).__name__}: {exc}"[:300])
        allowed = status == 201
        return Outcome(
            crashed=f"HTTP {status}" if status >= 500 or status == 0 else None,
            changed=(after := cloud_state(cloud, site_dir)) != before and not allowed,
            wrote=after != before and allowed,
        )

    return Target(name, one, list(seeds))


def cloud_seeds(
    credential: Any = None, node_id: str = "node-a", site: str = "default", now: float = 0.0
) -> list[bytes]:
    """Valid requests to the cloud (sync requests signed with ``credential`` when given)."""
    from uplink._forwarder import SignedSyncRequest

    def sync(docs: dict[str, bytes], need: tuple[str, ...] = ()) -> bytes:
        request = SignedSyncRequest(node_id, site, docs, need, credential=credential, ts=now)
        return bytes([0, 0, 1]) + request.encode()

    review = json.dumps({"decision": "approve", "reviewer": "fuzz", "note": "ok"}).encode()
    return [
        sync({}),
        sync({"s-1": b"\x42\x00\x00\x00"}, ("s-2",)),
        bytes([4, 0, 0]),
        bytes([13, 0, 0]) + review,
        bytes([16, 0, 8]),
        bytes([17, 0, 40]) + b"date_from=2024-01-01T00:00:00Z&offset=1&limit=2\n",
        bytes([18, 0, 40]) + b"date_to=2030-01-01T00:00:00Z\n",
        bytes([11, 0, 0]),
        bytes([12, 0, 32]) + b"session_id=s-1\n",
    ]


ANSWER_WITHIN = 15.0
"""Seconds an input may take: a remote command waits up to its own 10 s deadline for a
node that may hold the charger (one a fuzzed member record made up, for instance)."""
VICTIMS: dict[str, Node] = {}
"""The fuzzed nodes, for the sizes of their per-peer state in the report."""
OCPP: dict[str, Any] = {}
"""The fuzzed OCPP servers, for the sizes of what they keep per charger."""


def victim_state() -> dict[str, dict[str, int]]:
    """Sizes of the per-peer and per-document state each fuzzed node keeps: what
    bad input must not grow without bound (reported at the end of a run)."""
    return {
        name: {
            "documents": len(node.replica.docs),
            "document_changes": sum(len(doc.get_changes([])) for doc in node.replica.docs.values()),
            "sync_states": len(node.replica.book._states),
            "neighbours": len(node.neighbours),
            "reported": len(node._reported),
            "sync_locks": len(node._sync_locks),
        }
        for name, node in VICTIMS.items()
    } | {
        f"ocpp-{name}": {
            "chargers": len(server.bridge.chargers),
            "connectors": sum(len(c.connectors) for c in server.bridge.chargers.values()),
            "handler_tasks": sum(len(h._tasks) for h in server.handlers.values()),
            "unauthorised": sum(len(getattr(h, "_unauthorised", ())) for h in server.handlers.values()),
        }
        for name, server in OCPP.items()
    }


@asynccontextmanager
async def open_targets(workdir: Path) -> AsyncIterator[list[Target]]:
    import trio_asyncio

    from meshnode._apiauth import ApiTokens
    from meshnode._security import load_site, revoke
    from meshnode._sitetrust import SiteTrust
    from meshnode.ocpp import open_server
    from uplink import OperatorConfig
    from uplink._forwarder import DeviceCredential

    (workdir / "plain").mkdir()
    (workdir / "sealed").mkdir()
    now = time.time()
    operator = OperatorConfig(ocpi_token=OCPI_TOKEN)
    async with (
        trio_asyncio.open_loop() as loop,
        open_victim(workdir / "plain") as (victim, transport, net, session_id),
        open_victim(workdir / "sealed", enrolled=True) as (sealed_victim, sealed_transport, sealed_net, sealed_sid),
        open_cloud(
            f"sqlite:///{workdir / 'cloud.db'}",
            signing_key=CLOUD_KEY,
            wall_clock=lambda: 1_700_000_000.0,
            operator=operator,
        ) as cloud,
        trio.open_nursery() as nursery,
    ):
        # The cloud of the sealed victim's site (`meshnode cloud --site DIR`): signed sync only,
        # and `POST /v1/site/entries` keeps the site's revocations in DIR/entries.
        site_dir = workdir / "sealed" / "site"
        trust = SiteTrust(site_dir)
        async with open_cloud(
            f"sqlite:///{workdir / 'site-cloud.db'}",
            signing_key=CLOUD_KEY,
            certify=trust.certify,
            authenticate=trust.authenticate,
            site_entry=trust.add_entry,
            trust_document_keys=False,
            wall_clock=lambda: now,
            operator=operator,
        ) as site_cloud:
            server = open_server(victim)  # chargers connect to the plain victim (any id is let in)
            victim.change_listeners.append(server.bridge.document_changed)
            await nursery.start(server.bridge.serve_held)
            identity = sealed_victim.identity
            assert identity is not None
            credential = DeviceCredential(identity.signing_key, identity.certificate_bytes)
            revocation = revoke(load_site(site_dir), node_id="retired-node", now=now)
            site_seeds = [
                *cloud_seeds(credential, "victim", "field", now),
                bytes([8, 0, 0]) + json.dumps({"entry": revocation.hex()}).encode(),
            ]
            VICTIMS.update(plain=victim, sealed=sealed_victim)
            OCPP.update(plain=server)
            yield [
                *coap_targets(victim, transport, net.recorded, extra_seeds=command_seeds()),
                *coap_targets(sealed_victim, sealed_transport, sealed_net.recorded, prefix="coap-sealed"),
                api_target(victim, session_id),
                api_target(
                    sealed_victim,
                    sealed_sid,
                    tokens=ApiTokens.load_or_create(workdir / "sealed" / "victim"),
                    name="http:node-api-guarded",
                ),
                *ocpp_targets(victim, server, loop),
                cloud_target(cloud, seeds=cloud_seeds()),
                cloud_target(site_cloud, name="http:cloud-site", site_dir=site_dir, seeds=site_seeds),
            ]
            nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# The runner: trio in a thread of its own, atheris in the main thread


@dataclass
class Tally:
    inputs: int = 0
    crashes: int = 0
    changed: int = 0
    refuted: int = 0
    wrote: int = 0
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
        self.wrote += outcome.wrote
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
            "writes_acknowledged": self.wrote,
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
            "log_lines": sum(LOG_LINES.lines.values()),
            "log_lines_by_template": dict(LOG_LINES.lines.most_common()),
            **({"logged_tracebacks": LOG_LINES.tracebacks} if LOG_LINES.tracebacks else {}),
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
            with trio.move_on_after(ANSWER_WITHIN) as scope:
                return await target.one(data)
            assert scope.cancelled_caught
            return Outcome(crashed=f"no answer within {ANSWER_WITHIN:g} s")

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


class CountingHandler(logging.Handler):
    """Counts the log lines (WARNING and above) the fuzzed code writes, per logger and
    message template, without writing them: bad input must be logged at a bounded rate."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: Counter[str] = Counter()
        self.tracebacks: dict[str, str] = {}
        """The last lines of the first few tracebacks logged (an exception of ours)."""

    def emit(self, record: logging.LogRecord) -> None:
        # The template's start: a line that says how many like it were held back keeps it.
        key = f"{record.levelname} {record.name}: {str(record.msg)[:40]}"
        self.lines[key] += 1
        if record.exc_info and record.exc_info[1] is not None and len(self.tracebacks) < 10:
            text = "".join(traceback.format_exception(record.exc_info[1]))
            self.tracebacks.setdefault(f"{key} {type(record.exc_info[1]).__name__}", text[-1500:])


LOG_LINES = CountingHandler()


def fuzz(inputs: int, only: str | None, json_path: str | None, seed: int, trace: bool = False) -> None:
    root = logging.getLogger()
    root.handlers[:] = [LOG_LINES]
    root.setLevel(logging.WARNING)
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
            tally.victims = victim_state()
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
        f"-artifact_prefix={workdir}/",  # slow-unit-*, crash-*: beside the corpus, not in the repository
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
