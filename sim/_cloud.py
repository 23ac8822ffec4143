"""The cloud, in-process: the reference reconciliation service behind simulated uplinks.

Every node with an uplink gets a real `uplink.CloudClient` whose httpx
transport is an `UplinkTransport`: it waits the uplink's latency in virtual
time, raises `httpx.ConnectError` while the node's uplink is down (per its
`UplinkSchedule`), and otherwise hands the request to `httpx.ASGITransport`
over the real `uplink.CloudService` app. The service keeps its ledger in an
in-memory SQLite database.

Three things keep a run reproducible:

- **Threads.** The service does its database work in worker threads
  (`trio.to_thread.run_sync`). Under `MockClock(autojump_threshold=0)` virtual
  time jumps to the next timer as soon as every task is blocked, and a task
  waiting for a thread counts as blocked: the answer would come back at a
  virtual time that depends on how fast the thread ran. `ClockGate` holds the
  clock while any call into the service is in flight (it sets the clock's
  `autojump_threshold` to infinity and back, MockClock's public knob), so a
  request is served in zero virtual time, whatever the machine's speed.
- **Keys.** The service's receipt key is derived from the seed.
- **Actors.** The service writes receipts into documents with each document's
  Automerge actor, which `Replica` creates at random. `DeterministicActors`
  gives every document the service adopts an actor derived from the seed and
  the document id instead; otherwise the receipt changes' hashes (and with them
  Automerge's Bloom filters, hence how many sync rounds a node needs) would
  differ from run to run.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import nacl.signing
import trio
import trio.testing

from uplink import CloudClient
from uplink import CloudService, open_cloud

from ._scenario import Dist, UplinkSpec

log = logging.getLogger("sim.cloud")

CLOUD_URL = "http://cloud.sim"


class ClockGate:
    """Holds a MockClock's virtual time while work runs outside the trio thread."""

    def __init__(self, clock: trio.testing.MockClock) -> None:
        self._clock = clock
        self._held = 0

    @contextmanager
    def hold(self) -> Iterator[None]:
        self._held += 1
        self._clock.autojump_threshold = math.inf
        try:
            yield
        finally:
            self._held -= 1
            if not self._held:
                self._clock.autojump_threshold = 0


class DeterministicActors(dict):  # type: ignore[type-arg]
    """The service's `replica.docs`: every document stored in it gets an actor from the seed."""

    def __init__(self, seed: int, docs: dict[str, Any]) -> None:
        super().__init__()
        self._seed = seed
        for doc_id, doc in docs.items():
            self[doc_id] = doc

    def __setitem__(self, doc_id: str, doc: Any) -> None:
        doc.set_actor(hashlib.sha256(f"{self._seed}:cloud:{doc_id}".encode()).digest()[:16])
        super().__setitem__(doc_id, doc)


@dataclass
class UplinkSchedule:
    """When a node's uplink is down: a sorted list of [start, end) intervals."""

    down: list[tuple[float, float]] = field(default_factory=list)

    @classmethod
    def build(cls, spec: UplinkSpec, horizon: float, rng: random.Random) -> UplinkSchedule:
        if spec.mode == "up":
            return cls([])
        if spec.mode == "down":
            return cls([(0.0, horizon)])
        if spec.mode == "windows":
            return cls(sorted(spec.down))
        out = []
        t = 0.0
        while t < horizon:
            t += spec.up_s.sample(rng.random())
            length = max(spec.down_s.sample(rng.random()), 0.001)
            if t < horizon:
                out.append((t, min(t + length, horizon)))
            t += length
        return cls(out)

    def up(self, t: float) -> bool:
        return not any(start <= t < end for start, end in self.down)

    def down_seconds(self, until: float) -> float:
        return sum(max(0.0, min(end, until) - start) for start, end in self.down if start < until)


@dataclass
class CloudCounters:
    requests: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    refused_down: int = 0
    """Requests that met a down uplink."""


class UplinkTransport(httpx.AsyncBaseTransport):
    """One node's path to the in-process cloud: latency, outages, then the real app."""

    def __init__(self, sim_cloud: SimCloud, node_id: str, schedule: UplinkSchedule, latency: Dist) -> None:
        self._cloud = sim_cloud
        self._node_id = node_id
        self._schedule = schedule
        self._latency = latency
        self._asgi = httpx.ASGITransport(app=sim_cloud.service.app, raise_app_exceptions=False,
                                         client=(node_id, 443))  # fmt: skip
        self._instant: float | None = None
        self._seen: dict[bytes, int] = {}

    def _delay(self, direction: str, what: bytes) -> float:
        """The latency of one message, a function of the message (see sim._network on why)."""
        now = trio.current_time()
        if now != self._instant:
            self._instant, self._seen = now, {}
        h = hashlib.sha256(f"{self._cloud.seed}|uplink|{self._node_id}|{direction}|{now!r}|".encode())
        h.update(what)
        digest = h.digest()
        n = self._seen.get(digest, 0)
        self._seen[digest] = n + 1
        if n:
            digest = hashlib.sha256(digest + n.to_bytes(8, "big")).digest()
        return self._latency.sample(int.from_bytes(digest[:8], "big") / 2.0**64)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        counters = self._cloud.counters
        body = await request.aread()
        counters.requests += 1
        counters.bytes_up += len(body)
        if not self._schedule.up(trio.current_time()):
            counters.refused_down += 1
            raise httpx.ConnectError("uplink down (simulated)", request=request)
        await trio.sleep(self._delay("up", request.method.encode() + request.url.raw_path + b"|" + body))
        if not self._schedule.up(trio.current_time()):
            counters.refused_down += 1
            raise httpx.ConnectError("uplink went down (simulated)", request=request)
        with self._cloud.gate.hold():
            response = await self._asgi.handle_async_request(request)
            content = b"".join([chunk async for chunk in response.aiter_raw()])  # still encoded
        counters.bytes_down += len(content)
        await trio.sleep(self._delay("down", content))
        if not self._schedule.up(trio.current_time()):
            raise httpx.ReadError("uplink went down during the response (simulated)", request=request)
        return httpx.Response(response.status_code, headers=response.headers, stream=httpx.ByteStream(content))


class SimCloud:
    """The reference cloud service, opened for one run."""

    def __init__(self, service: CloudService, gate: ClockGate, seed: int) -> None:
        self.service = service
        self.gate = gate
        self.seed = seed
        self.counters = CloudCounters()

    def client(self, node_id: str, schedule: UplinkSchedule, latency: Dist) -> CloudClient:
        """A fresh CloudClient for one run of one node (the node closes it when it stops)."""
        return CloudClient(CLOUD_URL, transport=UplinkTransport(self, node_id, schedule, latency))


@asynccontextmanager
async def open_sim_cloud(seed: int, gate: ClockGate, wall_clock: Callable[[], float]) -> AsyncIterator[SimCloud]:
    key = nacl.signing.SigningKey(hashlib.sha256(f"{seed}:cloud-key".encode()).digest())
    with gate.hold():
        cm = open_cloud("sqlite:///:memory:", signing_key=key, wall_clock=wall_clock)
        service = await cm.__aenter__()
    try:
        service.replica.docs = DeterministicActors(seed, service.replica.docs)
        yield SimCloud(service, gate, seed)
    finally:
        with gate.hold(), trio.CancelScope(shield=True):
            await cm.__aexit__(None, None, None)
