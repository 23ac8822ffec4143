"""The cloud, in-process: the reference reconciliation service behind simulated uplinks.

Every node with an uplink gets a real `uplink.CloudClient` whose httpx
transport is an `UplinkTransport`: it waits the uplink's latency in virtual
time, raises `httpx.ConnectError` while the node's uplink is down (per its
`UplinkSchedule`), and otherwise hands the request to `httpx.ASGITransport`
over the real `uplink.CloudService` app. The service keeps its ledger in an
in-memory SQLite database.

Two things keep a run reproducible, both through `uplink.open_cloud`'s seams
(nothing inside the service is patched):

- **Blocking work runs inline** (`run_sync=`). The service does its database
  work through `run_sync`, a worker thread by default. Under
  the simulator's `VirtualClock` (as under `MockClock(autojump_threshold=0)`)
  virtual time jumps to the next timer as soon
  as every task is blocked, and a task waiting for a thread counts as blocked:
  the answer would come back at a virtual time that depends on how fast the
  thread ran. Run inline in the trio thread, a request is served in zero
  virtual time, whatever the machine's speed.
- **Keys and actors come from the seed.** The service's receipt key is derived
  from the seed, and so is the Automerge actor it writes each document's
  receipt with (`actor_for=`); with random actors the receipt changes' hashes
  (and with them Automerge's Bloom filters, hence how many sync rounds a node
  needs) would differ from run to run.
"""

from __future__ import annotations

import hashlib
import math
import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import nacl.signing
import trio

from meshnode import Certificate, Identity, Sealer, Site, issue_certificate
from uplink import CloudClient
from uplink import CloudService, RemoteRequestError, open_cloud

from ._scenario import Dist, UplinkSpec

log = logging.getLogger("sim.cloud")

CLOUD_URL = "http://cloud.sim"


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
        response = await self._asgi.handle_async_request(request)
        content = b"".join([chunk async for chunk in response.aiter_raw()])  # still encoded
        counters.bytes_down += len(content)
        await trio.sleep(self._delay("down", content))
        if not self._schedule.up(trio.current_time()):
            raise httpx.ReadError("uplink went down during the response (simulated)", request=request)
        return httpx.Response(response.status_code, headers=response.headers, stream=httpx.ByteStream(content))


class SimCloud:
    """The reference cloud service, opened for one run."""

    def __init__(self, service: CloudService, seed: int) -> None:
        self.service = service
        self.seed = seed
        self.counters = CloudCounters()

    def client(self, node_id: str, schedule: UplinkSchedule, latency: Dist) -> CloudClient:
        """A fresh CloudClient for one run of one node (the node closes it when it stops)."""
        return CloudClient(CLOUD_URL, transport=UplinkTransport(self, node_id, schedule, latency))


class SimSite:
    """An enrolled site in-process (scenario `sealed = true`): the site key, the
    network key, every node's certificate and its Sealer's nonces derive from the
    seed, so a sealed run seals the same bytes every time (`meshnode`'s seams:
    `issue_certificate(serial=)`, `Sealer(nonce=)`); nothing is written to disk."""

    def __init__(self, seed: int, name: str, now: float) -> None:
        key = nacl.signing.SigningKey(hashlib.sha256(f"{seed}:site-key".encode()).digest())
        network_key = hashlib.sha256(f"{seed}:network-key".encode()).digest()
        self.seed = seed
        self.now = now
        self.site = Site(name, key, bytes(key.verify_key), network_key, now)

    def identity(self, node_id: str, device_key: nacl.signing.SigningKey) -> Identity:
        """The node's enrolment: a certificate for its device key, as `meshnode enroll` gives."""
        serial = hashlib.sha256(f"{self.seed}:serial:{node_id}:{bytes(device_key.verify_key).hex()}".encode())
        cert = issue_certificate(
            self.site, node_id, bytes(device_key.verify_key), now=self.now, serial=serial.hexdigest()[:32]
        )
        return Identity(
            node_id,
            device_key,
            Certificate.decode(cert, self.site.public_key),
            cert,
            self.site.public_key,
            self.site.network_key,
            self.site.name,
        )

    def certify(self, device_id: str, declared: bytes) -> bytes | None:
        """The cloud's trust in this site's certificates (as `meshnode cloud --site`)."""
        try:
            cert = Certificate.decode(declared, self.site.public_key)
        except Exception:  # noqa: BLE001 - not a certificate of this site: not trusted
            return None
        return cert.public_key if cert.node_id == device_id else None

    def authenticate(self, certificate: bytes, now: float) -> tuple[str, bytes]:
        """Who may sync with the cloud (as `meshnode cloud --site`): a device with a valid
        certificate of this site and a mesh role. The simulator revokes no one."""
        try:
            cert = Certificate.decode(certificate, self.site.public_key)
        except Exception as exc:  # noqa: BLE001 - not a certificate of this site
            raise RemoteRequestError(401, "the request's certificate is not one this site issued") from exc
        if now > cert.not_after:
            raise RemoteRequestError(403, f"the certificate of {cert.node_id!r} has expired")
        if not set(cert.roles) & {"charger", "gateway"}:
            raise RemoteRequestError(403, f"role {list(cert.roles)} may not forward sessions")
        return cert.node_id, cert.public_key

    def sealer(self, identity: Identity, start: int, now: float) -> Sealer:
        """A Sealer for one run (`start`) of a node whose bytes do not depend on the
        order in which trio runs the tasks of one virtual instant: the nonce is a
        function of the seed and the signed message, the counter of the instant
        and the message's place (channel, resource, kind, its number among those)."""
        prefix = f"{self.seed}:nonce:{identity.node_id}:{start}:".encode()
        first = int(now * 1_000_000) << 8  # above every counter of an earlier run, as the default
        channels: dict[str, _Channel] = {}

        def nonce(inner: bytes) -> bytes:
            return hashlib.sha256(prefix + inner).digest()[:24]

        def counter(now: float, resource: str, kind: int, channel: str) -> int:
            c = channels.setdefault(channel, _Channel())
            if now != c.instant:  # the places of the last instant are used up
                c.instant, c.base, c.used = now, c.base + c.span, {}
                c.span = 0
            n = c.used.get((resource, kind), 0)
            c.used[(resource, kind)] = n + 1
            place = (_SEALED_RESOURCES.get(resource, len(_SEALED_RESOURCES)) * 2 + kind) + _PLACES * n
            c.span = max(c.span, place + 1)
            return first + c.base + place

        return Sealer(identity, self.site.public_key, self.site.network_key, started=now, nonce=nonce, counter=counter)


_SEALED_RESOURCES = {"/m/push": 0, "/m/state": 1, "/m/digest": 2, "/m/sync": 3}
_PLACES = 2 * (len(_SEALED_RESOURCES) + 1)
"""Places of a counter within one instant on one channel: (resource, kind), then
the same again for a second message of a kind. Counters on a channel grow by the
places an instant used, so the 64 counters of a replay window cover several
instants of reordering, as the default (one per message) covers 64 messages."""


@dataclass
class _Channel:
    instant: float = math.nan
    base: int = 0
    span: int = 0
    used: dict[tuple[str, int], int] = field(default_factory=dict)


async def _inline(fn: Callable[..., Any], *args: Any) -> Any:
    """The service's `run_sync` in the simulator: blocking work in the trio thread."""
    return fn(*args)


@asynccontextmanager
async def open_sim_cloud(
    seed: int, wall_clock: Callable[[], float], *, site: SimSite | None = None
) -> AsyncIterator[SimCloud]:
    """The cloud for one run; for an enrolled site it trusts that site's certificates only."""
    key = nacl.signing.SigningKey(hashlib.sha256(f"{seed}:cloud-key".encode()).digest())
    trust: dict[str, Any] = (
        {}
        if site is None
        else {"certify": site.certify, "authenticate": site.authenticate, "trust_document_keys": False}
    )

    def actor_for(doc_id: str) -> bytes:
        return hashlib.sha256(f"{seed}:cloud:{doc_id}".encode()).digest()[:16]

    async with open_cloud(
        "sqlite:///:memory:", signing_key=key, wall_clock=wall_clock, run_sync=_inline, actor_for=actor_for, **trust
    ) as service:
        yield SimCloud(service, seed)
