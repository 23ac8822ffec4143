"""The mesh node: one trio nursery that owns the store, membership, gossip and sync.

The node talks to the world only through its seams (DESIGN.md): a `Transport`
(CoAP or in-memory), a `Discovery` (mDNS, static, in-memory), the trio clock
(`trio.current_time()`, so `MockClock` drives the simulator) and an injected
wall clock for the timestamps written into events. Decisions are made by the
sans-IO parts (`Membership`, `choose_gossip_targets`, the digest functions of
`crdt`); the tasks here only move bytes and sleep.

Replication is anti-entropy plus push:

- every gossip round (1 s with jitter) the node exchanges membership records and
  a digest of its documents with up to `fanout` live peers, and syncs exactly
  the documents the digest shows to differ (starting those sync states afresh,
  so that a lost message or a restarted peer can never stall them);
- every change, local or received, is pushed at once to the direct neighbours
  (except the one it came from), so a line of nodes relays it end to end
  without waiting for rounds.

Sync states are per (peer node id, document). When an exchange fails, the
states involved are dropped: Automerge assumes what it sent was delivered.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
import nacl.signing
import trio

from crdt import (
    EVENT_TYPES,
    SITE_CONFIG_ID,
    new_site_config,
    read_site_config,
    AsyncDocStore,
    EventSigner,
    Replica,
    InvalidSyncMessage,
    Keyring,
    SessionData,
    SessionView,
    StoreError,
    StoreOpener,
    bucket_entries,
    differing_buckets,
    differing_docs,
    make_digest,
    open_doc_store,
    decode_event,
    decode_sync_message,
    read_session,
    verify_event,
)

from uplink import (
    CloudClient,
    Forwarder,
    ForwardPlanner,
    UplinkScorer,
    change_priority,
    serve_forwarder,
    serve_probe,
)

from ._discovery import Discovery, PeerGone, PeerSeen
from ._membership import MemberRecord, Membership, PeerState, choose_gossip_targets
from ._protocol import (
    MAX_DOCS_PER_SYNC,
    PROTOCOL_VERSION,
    DigestRequest,
    DigestResponse,
    Hello,
    MembersRequest,
    MembersResponse,
    ProtocolError,
    SyncRequest,
    SyncResponse,
)
from ._security import (
    Authorization,
    Identity,
    Limits,
    Sealer,
    authenticated_peer,
)
from ._transport import BadRequest, Forbidden, RemoteRefused, Transport, TransportError
from .services import API_EVENT_TYPES, SessionService, SiteConfigService

log = logging.getLogger("meshnode.node")

EXPLORE = 0.1
"""Chance per gossip round of trying one member that is not a direct neighbour."""
MAX_GOSSIP_RECORDS = 32
"""Membership records per exchange before sampling (see `Node._member_sample`)."""
ARCHIVE_CACHE = 256
"""Archived documents kept loaded to serve peers that still sync them."""
DEFAULT_TARIFF = {"currency": "EUR", "per_kwh_cents": 39, "per_session_cents": 0}


class NodeError(Exception):
    """Base of the node's own errors."""


@dataclass
class NodeConfig:
    """Everything a node is told at start-up (CLI flags or TOML, same names)."""

    node_id: str
    data_dir: Path
    site: str = "default"
    gossip_interval: float = 1.0
    fanout: int = 3
    suspect_after: float = 5.0
    dead_after: float = 15.0
    request_timeout: float = 3.0
    max_sync_rounds: int = 12
    seed: int | None = None
    inline_io: bool = False
    """Do store I/O in the trio thread (simulator: keeps virtual time reproducible)."""
    cloud_url: str | None = None
    """The cloud reconciliation service; a node without one never leads."""
    probe_interval: float = 5.0
    leader_threshold: int = 50
    retention: float = 3600.0
    """Seconds a reconciled session stays in active gossip after its receipt."""
    meter_hold: float = 5.0
    """Seconds a meter-only change waits before the leader forwards it, so readings batch."""
    unknown_token_policy: str = "accept_limited"
    """Offline policy for an id token that is neither allowed nor revoked nor a driver
    token: "refuse", or "accept_limited" (start with `unknown_token_limits`, flagged for
    review in the cloud), like OCPP's AllowOfflineTxForUnknownId."""
    unknown_token_max_wh: int | None = None
    unknown_token_max_minutes: int | None = None
    tariff: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_TARIFF))


@dataclass
class _Neighbour:
    """What the node knows about a peer it talks to directly."""

    node_id: str
    address: str
    last_ok: float | None = None
    failures: int = 0
    unsynced: set[str] = field(default_factory=set)
    """Documents this peer may lack or hold in another version (for status)."""
    push: set[str] = field(default_factory=set)
    """Documents to push to this peer at the next wake-up."""
    pushing: bool = False
    discovered: bool = False
    """Discovery (mDNS, static list, simulator topology) reported it: on our link."""
    retry_at: float = -math.inf
    """After failures, not chosen for gossip before this time (backoff, up to 30 s)."""
    lock: trio.Lock = field(default_factory=trio.Lock)
    """Held while syncing with this peer: one exchange per peer at a time, so
    two loops never interleave messages of the same Automerge sync state."""


def load_or_create_secret(path: Path) -> bytes:
    """A 32-byte secret kept in a file of its own (mode 0600), created on first use."""
    if path.exists():
        secret = path.read_bytes()
        if len(secret) != 32:
            raise NodeError(f"{path} is damaged: expected a 32-byte key, found {len(secret)} bytes")
        return secret
    secret = os.urandom(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
        f.flush()
        os.fsync(f.fileno())
    return secret


def load_or_create_key(data_dir: Path) -> nacl.signing.SigningKey:
    """The node's Ed25519 device key (`node.key`, a raw seed), created on first start."""
    return nacl.signing.SigningKey(load_or_create_secret(data_dir / "node.key"))


class Node:
    """One mesh node. Create it, then run `serve` in a nursery.

    Args:
        config: identity, data directory and protocol settings.
        transport: an open Transport; the node registers its resources on it.
        discovery: where peers come from (mDNS, static list, simulator); one or several.
        wall_clock: seconds since the epoch, for event timestamps (injected so
            the simulator controls it).
        store: opens this node's document store (`crdt.StoreOpener`, e.g.
            `functools.partial(open_doc_store, adapter=MemoryAdapter(disk), key=k)`).
            Default: the encrypted SQLite store `store.db` in the data dir, its
            key in `store.key` (created on first start).
        device_key: the node's Ed25519 device key when it is not enrolled.
            Default: `node.key` in the data dir (created on first start).
    """

    def __init__(
        self,
        config: NodeConfig,
        *,
        transport: Transport,
        discovery: Discovery | Sequence[Discovery] = (),
        wall_clock: Callable[[], float] = time.time,
        cloud: CloudClient | None = None,
        identity: Identity | None = None,
        sealer: Sealer | None = None,
        store: StoreOpener | None = None,
        device_key: nacl.signing.SigningKey | None = None,
    ) -> None:
        if identity is not None and identity.node_id != config.node_id:
            raise NodeError(f"node id {config.node_id!r} differs from the enrolled id {identity.node_id!r}")
        self.identity = identity
        self.sealer = sealer
        self.config = config
        self.node_id = config.node_id
        self.transport = transport
        self.discoveries: list[Discovery] = (
            list(discovery) if isinstance(discovery, list | tuple) else [discovery]  # type: ignore[list-item]
        )
        self.wall_clock = wall_clock
        seed = config.seed if config.seed is not None else random.SystemRandom().randrange(2**63)
        self.rng = random.Random(f"{seed}:{config.node_id}")
        if store is None:
            config.data_dir.mkdir(parents=True, exist_ok=True)

            def store() -> AbstractAsyncContextManager[AsyncDocStore]:
                """The encrypted SQLite store in the data dir, its key beside it (read when serving)."""
                key = load_or_create_secret(config.data_dir / "store.key")
                return open_doc_store(config.data_dir / "store.db", inline=config.inline_io or None, key=key)

        self._open_store: StoreOpener = store
        if identity is not None:
            self.signing_key = identity.signing_key
        elif device_key is not None:
            self.signing_key = device_key
        else:
            config.data_dir.mkdir(parents=True, exist_ok=True)
            self.signing_key = load_or_create_key(config.data_dir)
        self.signer = EventSigner(self.node_id, self.signing_key)
        self.keyring = Keyring({self.node_id: self.signer.public_key})
        self.store: AsyncDocStore | None = None
        self.replica = Replica()
        self.membership: Membership | None = None
        self.neighbours: dict[str, _Neighbour] = {}
        self._static: set[str] = set()
        self._push_wakeup = trio.Event()
        self._started = trio.Event()
        self.counters = {"sync_requests_refused": 0, "peer_errors": 0, "changes_received": 0}
        self._receive_lock = trio.Lock()
        self.change_listeners: list[Callable[[str], None]] = []
        # Uplink: probe score, election, forwarder (only with a cloud).
        if cloud is None and config.cloud_url:
            cloud = CloudClient(config.cloud_url)
        self.cloud = cloud
        self.scorer = UplinkScorer()
        self.leader: str | None = None
        self.leader_changes = 0
        self.forwarder: Forwarder | None = None
        if cloud is not None:
            planner = ForwardPlanner(
                random.Random(f"{seed}:{config.node_id}:forwarder"), meter_hold=config.meter_hold
            )
            self.forwarder = Forwarder(self.replica, self.node_id, config.site, cloud, planner, self._persist_from_cloud)
        self.archived: set[str] = set()
        # Retired sessions a peer still asks about are served from their archived
        # copy (read-only: nothing a peer sends is stored), so a node that was away
        # when the receipt came still gets it, and then retires the session too.
        self._archive_replica = Replica()
        self._gossip_records: tuple[float, list[MemberRecord]] | None = None
        self._actor_salt = ""
        self._receipt_ts: dict[str, int] = {}
        # Session and site-config commands (domain errors, no HTTP codes), wired to this node.
        unknown_limits = None
        if config.unknown_token_max_wh is not None or config.unknown_token_max_minutes is not None:
            unknown_limits = Limits(config.unknown_token_max_wh, config.unknown_token_max_minutes)
        self.site_config = SiteConfigService(
            replica=self.replica, identity=identity, sealer=sealer, actor=self._actor, commit=self._commit_local,
            wall_clock=wall_clock, unknown_token_policy=config.unknown_token_policy,
            unknown_token_limits=unknown_limits,
        )
        self.sessions = SessionService(
            node_id=self.node_id, site=config.site, tariff=config.tariff, replica=self.replica,
            site_config=self.site_config, signer=lambda: self.signer, keyring=self.keyring, identity=identity,
            actor=self._actor, rng=self.rng, wall_clock=lambda: self.wall_clock(), commit=self._commit_local,
            archived=lambda: self.archived,
        )
        self._fold_cache = self.sessions.fold_cache

    # --- lifecycle ------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the node until cancelled. The store is closed last."""
        async with self._open_store() as store:
            self.store = store
            if self.config.inline_io or not store.blocking:
                # The store does not block (in memory): every store call is inline.
                self.config = dataclasses.replace(self.config, inline_io=True)
            docs = await store.load_all()
            self.replica.docs.update(docs)
            self._resume_chain()
            incarnation = int.from_bytes(store.sync.get_meta("incarnation") or b"\0", "big") + 1
            store.sync.set_meta("incarnation", incarnation.to_bytes(8, "big"))
            # Automerge actor ids come from this salt, not from the OS: a simulated
            # run then produces the same change hashes every time (its rng and
            # virtual clock are seeded), and a new incarnation never reuses an actor.
            self._actor_salt = f"{self.rng.getrandbits(64)}:{incarnation}:{trio.current_time()!r}"
            self.membership = Membership(
                MemberRecord(self.node_id, incarnation, 0, 0, self.transport.address, str(PROTOCOL_VERSION)),
                suspect_after=self.config.suspect_after,
                dead_after=self.config.dead_after,
            )
            self._route()
            self.archived = set(store.sync.archived_ids())
            if SITE_CONFIG_ID not in self.replica.docs:
                site_doc = new_site_config(self.config.site, actor=self._actor(SITE_CONFIG_ID))
                await self._persist(SITE_CONFIG_ID, self.replica.add(SITE_CONFIG_ID, site_doc))
            self._apply_site_config()
            for doc_id in sorted(docs):
                self._note_stored(doc_id)
            log.info("node %s serving at %s with %d documents", self.node_id, self.transport.address, len(docs))
            try:
                async with trio.open_nursery() as nursery:
                    if self.discoveries:
                        send, recv = trio.open_memory_channel[PeerSeen | PeerGone](64)
                        async with send:
                            for discovery in self.discoveries:
                                await nursery.start(discovery.serve, send.clone())
                        nursery.start_soon(self._consume_discovery, recv)
                    nursery.start_soon(self._gossip_loop)
                    nursery.start_soon(self._push_loop)
                    if self.cloud is not None and self.forwarder is not None:
                        await nursery.start(
                            functools.partial(serve_probe, interval=self.config.probe_interval,
                                              timeout=min(2.0, self.config.probe_interval / 2)),
                            self.cloud, self.scorer, self._on_score,
                        )
                        await nursery.start(
                            functools.partial(serve_forwarder, is_leader=lambda: self.leader == self.node_id),
                            self.forwarder,
                        )
                    self._started.set()
                    task_status.started()
                    await trio.sleep_forever()
            finally:
                self._persist_incarnation()
                if self.cloud is not None:
                    with trio.CancelScope(shield=True):
                        await self.cloud.aclose()

    def _persist_incarnation(self) -> None:
        if self.store is not None and self.membership is not None:
            inc = self.membership.self_record.incarnation
            self.store.sync.set_meta("incarnation", inc.to_bytes(8, "big"))

    def _resume_chain(self) -> None:
        """Continue this device's event chain after its last stored event."""
        # Parse every event but verify only our own, newest first, until one is
        # genuinely ours: verifying every signature of every stored session made
        # start-up cost a signature check per event.
        candidates: list[tuple[int, bytes]] = []
        for doc in self.replica.docs.values():
            try:
                data = read_session(doc)
            except Exception:
                continue
            for blob in data.events.values():
                try:
                    body, _ = decode_event(blob)
                except Exception:
                    continue
                if body["device_id"] == self.node_id:
                    candidates.append((body["seq"], blob))
        for _, blob in sorted(candidates, reverse=True):
            try:
                last = verify_event(blob, self.keyring)
            except Exception:
                continue  # not signed by our key: a forgery must not move our chain
            self.signer = EventSigner.resume(self.node_id, self.signing_key, [last])
            return
        self.signer = EventSigner(self.node_id, self.signing_key)

    def _route(self) -> None:
        t = self.transport
        t.route("/m/hello", self._on_hello, method="GET")
        t.route("/m/members", self._on_members)
        t.route("/m/digest", self._on_digest)
        t.route("/m/sync", self._on_sync)

    def _actor(self, doc_id: str) -> bytes:
        return hashlib.sha256(f"{self.node_id}:{self._actor_salt}:{doc_id}".encode()).digest()[:16]

    def now(self) -> float:
        return trio.current_time()

    def _wall_ms(self) -> int:
        return int(self.wall_clock() * 1000)

    # --- local operations (API, simulator): the session service ----------------------

    async def create_session(
        self,
        charger: str,
        connector: int,
        id_token: str,
        *,
        meter_wh: int | None = None,
        driver_token: str | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        """Start a session on this node (see `SessionService.create`). Raises NotAuthorised, Conflict."""
        return await self.sessions.create(
            charger, connector, id_token, meter_wh=meter_wh, driver_token=driver_token, request_id=request_id
        )

    async def record_event(self, session_id: str, type: str, meter_wh: int | None) -> dict[str, Any]:
        """Sign and append an event (see `SessionService.record`). Raises NotFound,
        InvalidCommand, Conflict."""
        return await self.sessions.record(session_id, type, meter_wh)

    async def _commit_local(self, doc_id: str, changes: list[tuple[bytes, bytes]]) -> None:
        """A service's write: durable first, then on to the mesh."""
        await self._persist(doc_id, changes)
        self._changed(doc_id, source=None)

    # --- site config: revocations, network keys, id-token lists, authorisation -----------

    def _site_config(self) -> dict[str, Any]:
        return self.site_config.read()

    def _apply_site_config(self) -> None:
        self.site_config.apply()

    def authorize(self, id_token: str, driver_token: str | None) -> Authorization:
        """The offline authorisation decision for a driver (see `SiteConfigService.authorize`)."""
        return self.site_config.authorize(id_token, driver_token)

    async def add_site_entry(self, entry: bytes) -> dict[str, Any]:
        """Put a signed site entry into the replicated site config (see
        `SiteConfigService.add_entry`). Raises InvalidCommand."""
        return await self.site_config.add_entry(entry)

    async def _persist(self, doc_id: str, changes: list[tuple[bytes, bytes]]) -> None:
        assert self.store is not None, "the node is not serving"
        try:
            await self.store.write(doc_id, changes)
        except StoreError:
            log.error("could not store changes of %s", doc_id, exc_info=True)
            raise

    def _changed(self, doc_id: str, *, source: str | None, size: int = 0) -> None:
        """A document changed: everyone but `source` may now lack something.

        A local change is pushed to every live neighbour at once. A change that
        came from a peer is relayed to only `fanout` of them: in a dense mesh the
        others have it already (pushing to all made traffic grow with the square
        of the node count), and anti-entropy rounds cover anyone missed.
        """
        before = self._fold_cache.pop(doc_id, None)
        if doc_id == SITE_CONFIG_ID:
            self._apply_site_config()
        else:
            self._track(doc_id, before[2] if before else None, size)
        for n in self.neighbours.values():
            if n.node_id != source:
                n.unsynced.add(doc_id)
        live = sorted(n.node_id for n in self.live_neighbours() if n.node_id != source)
        targets = live if source is None else choose_gossip_targets(self.rng, live, self.config.fanout)
        for node_id in targets:
            self.neighbours[node_id].push.add(doc_id)
        self._push_wakeup.set()
        for listener in self.change_listeners:
            listener(doc_id)

    def _track(self, doc_id: str, before: SessionView | None, size: int) -> None:
        """Tell the forwarder about a change, and note receipts for retention."""
        try:
            _, after = self.fold(doc_id)
        except Exception:
            return  # not a session document: nothing to forward or retire
        if after.state == "reconciled":
            self._receipt_ts.setdefault(doc_id, self._receipt_issued(doc_id))
        if self.forwarder is not None:
            self.forwarder.note_change(doc_id, change_priority(before, after), size)

    def _note_stored(self, doc_id: str) -> None:
        """At start-up every stored session waits until the cloud (re)confirms it."""
        # The document is in memory already: its saved size is the hint, no second read.
        self._track(doc_id, None, len(self.replica.docs[doc_id].save()))

    def _receipt_issued(self, doc_id: str) -> int:
        data, _ = self.fold(doc_id)
        try:
            issued = cbor2.loads(data.receipt or b"").get("issued_ts")
        except Exception:
            issued = None
        return issued if isinstance(issued, int) else self._wall_ms()

    async def _persist_from_cloud(self, changed: list[tuple[str, list[tuple[bytes, bytes]]]]) -> None:
        """The cloud's changes (receipts): durable first, then on to the mesh."""
        assert self.store is not None
        await self.store.write_many(changed)
        for doc_id, changes in changed:
            self._changed(doc_id, source="cloud", size=sum(len(c) for _, c in changes))

    def _on_score(self, score: int) -> None:
        assert self.membership is not None
        if score != self.membership.self_record.uplink_score:
            log.info("uplink score %d", score)
            self.membership.set_uplink_score(score)
            for discovery in self.discoveries:
                discovery.update_fields({"up": str(score)})

    def _elect(self) -> None:
        assert self.membership is not None
        leader = self.membership.leader(self.now(), self.leader, threshold=self.config.leader_threshold)
        if leader != self.leader:
            log.info("leader is now %s (was %s)", leader, self.leader)
            if self.leader is not None or leader is not None:
                self.leader_changes += 1
            self.leader = leader
            self.membership.set_leader(leader)
            if self.forwarder is not None:
                self.forwarder.poke()

    async def _retire(self) -> None:
        """Move reconciled sessions past their retention out of active gossip."""
        assert self.store is not None
        cutoff = self._wall_ms() - int(self.config.retention * 1000)
        for doc_id, issued in sorted(self._receipt_ts.items()):
            if issued <= cutoff and doc_id in self.replica.docs:
                if self.forwarder is not None and self.forwarder.planner.is_waiting(doc_id):
                    continue  # the cloud has not confirmed our last version yet
                await self._archive(doc_id)

    async def _archive(self, doc_id: str) -> None:
        assert self.store is not None
        doc = self.replica.docs[doc_id]
        if self.config.inline_io:
            self.store.sync.compact(doc_id, doc, archive=True)
        else:
            await trio.to_thread.run_sync(functools.partial(self.store.sync.compact, doc_id, doc, archive=True))
        del self.replica.docs[doc_id]
        self.replica.book.forget_doc(doc_id)
        self.archived.add(doc_id)
        self._receipt_ts.pop(doc_id, None)
        self._fold_cache.pop(doc_id, None)
        if self.forwarder is not None:
            self.forwarder.planner.forget(doc_id)
        for n in self.neighbours.values():
            n.unsynced.discard(doc_id)
            n.push.discard(doc_id)
        log.info("archived reconciled session %s", doc_id)

    # --- reading ---------------------------------------------------------------------

    def fold(self, session_id: str) -> tuple[SessionData, SessionView]:
        return self.sessions.fold(session_id)

    def session_json(self, session_id: str) -> dict[str, Any]:
        return self.sessions.session_json(session_id)

    def sessions_json(self) -> list[dict[str, Any]]:
        return self.sessions.sessions_json()

    def automerge_bytes(self, session_id: str) -> bytes:
        return self.sessions.automerge_bytes(session_id)

    def live_neighbours(self) -> list[_Neighbour]:
        now = self.now()
        return [
            n for n in self.neighbours.values()
            if n.last_ok is not None and now - n.last_ok <= self.config.dead_after
        ]

    def documents_not_everywhere(self) -> set[str]:
        """Documents that some live neighbour may lack or hold in another version."""
        return {d for n in self.live_neighbours() for d in n.unsynced}

    def status_json(self) -> dict[str, Any]:
        assert self.membership is not None
        now = self.now()
        direct = {n.node_id for n in self.live_neighbours()}
        peers = []
        for view in self.membership.view(now):
            if view.record.node_id == self.node_id:
                continue
            peers.append({
                "node_id": view.record.node_id,
                "address": view.record.address,
                "state": view.state.name.lower(),
                "last_seen_s": round(view.age, 1),
                "incarnation": view.record.incarnation,
                "uplink_score": view.record.uplink_score,
                "direct": view.record.node_id in direct,
            })
        live = [p for p in peers if p["state"] != "dead"]
        not_everywhere = self.documents_not_everywhere()
        if not self.live_neighbours() or not live:
            sync_state = "OFFLINE"
        elif not_everywhere:
            sync_state = "SYNCING"
        else:
            sync_state = "SYNCED"
        return {
            "node_id": self.node_id,
            "address": self.transport.address,
            "site": self.config.site,
            "incarnation": self.membership.self_record.incarnation,
            "peers": peers,
            "documents": len(self.replica.docs) - (SITE_CONFIG_ID in self.replica.docs),
            "archived": len(self.archived),
            "leader": self.leader,
            "leader_changes": self.leader_changes,
            "uplink_score": self.membership.self_record.uplink_score,
            "cloud_url": self.config.cloud_url,
            "forwarder": dataclasses.asdict(self.forwarder.counters) if self.forwarder is not None else None,
            "documents_not_everywhere": len(not_everywhere),
            "sync_state": sync_state,
            "transport": dataclasses.asdict(self.transport.stats),
            "counters": dict(self.counters),
            "security": self._security_status(),
        }

    def _security_status(self) -> dict[str, Any]:
        if self.identity is None:
            return {"enrolled": False, "mode": "insecure"}
        out: dict[str, Any] = {
            "enrolled": True,
            "certificate_serial": self.identity.certificate.serial,
            "certificate_not_after": self.identity.certificate.not_after,
            "site": self.identity.site_name,
        }
        if self.sealer is not None:
            out["refused"] = dict(sorted(self.sealer.refused.items()))
            out["revocations"] = len(self._site_config().get("revocations", {}))
        return out

    # --- discovery ---------------------------------------------------------------------

    async def _consume_discovery(self, recv: trio.MemoryReceiveChannel[PeerSeen | PeerGone]) -> None:
        async for event in recv:
            if isinstance(event, PeerSeen):
                if event.node_id == self.node_id or event.address == self.transport.address:
                    continue
                if event.node_id is None:
                    self._static.add(event.address)
                else:
                    self._neighbour(event.node_id, event.address).discovered = True
                self._push_wakeup.set()
            elif isinstance(event, PeerGone) and event.node_id is not None:
                n = self.neighbours.get(event.node_id)
                if n is not None:
                    log.info("peer %s left (discovery)", event.node_id)
                    n.last_ok = None
                    n.discovered = False

    def _neighbour(self, node_id: str, address: str) -> _Neighbour:
        n = self.neighbours.get(node_id)
        if n is None:
            n = self.neighbours[node_id] = _Neighbour(node_id, address, unsynced=set(self.replica.docs))
            log.info("new neighbour %s at %s", node_id, address)
        elif n.address != address:
            n.address = address
        return n

    def _direct_ok(self, node_id: str, address: str) -> _Neighbour:
        n = self._neighbour(node_id, address)
        n.last_ok = self.now()
        n.failures = 0
        n.retry_at = -math.inf
        assert self.membership is not None
        self.membership.observe_direct(node_id, self.now())
        return n

    def _direct_failed(self, n: _Neighbour, exc: Exception) -> None:
        n.failures += 1
        # Back off from a peer that does not answer (out of reach, partitioned, gone),
        # but never for good: a partition heals, a charger comes back.
        # The jitter comes from the pair and the count, not from the node's shared rng:
        # exchanges that time out at the same instant would draw in trio's (random)
        # scheduling order and make simulated runs differ.
        jitter = 0.5 + 0.5 * _unit(f"{self._actor_salt}:{n.node_id}:{n.failures}")
        n.retry_at = self.now() + jitter * min(30.0, 2.0 ** min(n.failures, 5))
        level = logging.WARNING if isinstance(exc, RemoteRefused) else logging.INFO
        log.log(level, "exchange with %s at %s failed: %s", n.node_id, n.address, exc)

    # --- gossip --------------------------------------------------------------------

    async def _gossip_loop(self) -> None:
        assert self.membership is not None
        while True:
            self.membership.tick(self.now())
            self._elect()
            await self._retire()
            async with trio.open_nursery() as nursery:
                for address in sorted(self._static - {n.address for n in self.neighbours.values()}):
                    nursery.start_soon(self._hello, address)
                for n in self._gossip_targets():
                    nursery.start_soon(self._gossip_with, n)
            jitter = self.rng.uniform(-0.2, 0.2) * self.config.gossip_interval
            await trio.sleep(self.config.gossip_interval + jitter)

    def _gossip_targets(self) -> list[_Neighbour]:
        """Up to `fanout` direct neighbours, and now and then one member to try directly.

        Direct neighbours are the peers discovery reported and those we exchanged
        with recently. Membership also names nodes we may not reach (the far end of
        a line, the other side of a radio gap): one of those is tried in a round
        with probability `EXPLORE`, so reachable ones become neighbours over time
        while unreachable ones cost one timeout now and then, not every round.
        """
        assert self.membership is not None
        now = self.now()
        direct = sorted(
            n.node_id for n in self.neighbours.values()
            if now >= n.retry_at and (n.discovered or (n.last_ok is not None and now - n.last_ok <= self.config.dead_after))
        )
        chosen = choose_gossip_targets(self.rng, direct, self.config.fanout)
        addresses: dict[str, str] = {}
        if not direct or self.rng.random() < EXPLORE:
            addresses = {r.node_id: r.address for r in self.membership.live_peers(now)}
            others = sorted(
                node_id for node_id in addresses
                if node_id not in direct and (node_id not in self.neighbours or now >= self.neighbours[node_id].retry_at)
            )
            if others:
                chosen.append(self.rng.choice(others))
        return [self._neighbour(node_id, self.neighbours[node_id].address if node_id in self.neighbours
                                else addresses[node_id]) for node_id in chosen]

    def _member_sample(self, peer: str) -> tuple[MemberRecord, ...]:
        """The records to gossip: all of them up to `MAX_GOSSIP_RECORDS`, else a sample.

        A mesh of hundreds would otherwise send, parse and check hundreds of records
        in every exchange (the simulator's profile: most of its time). The sample
        always holds our own record, every possible leader (nodes with an uplink
        score: the election must see them fresh), and our direct neighbours; random
        others fill the rest, so each record still travels every few rounds.
        """
        assert self.membership is not None
        now = self.now()
        cached = self._gossip_records
        if cached is None or now - cached[0] > 0.25:
            # One view serves every exchange of the next quarter second (a record
            # a quarter second old is as good as new: heartbeats tick each second).
            cached = self._gossip_records = (now, self.membership.records_for_gossip(now))
        records = cached[1]
        if len(records) <= MAX_GOSSIP_RECORDS:
            return tuple(records)
        direct = {n.node_id for n in self.live_neighbours()}
        own = [r for r in records if r.node_id == self.node_id]
        must = own + [r for r in records if r.node_id != self.node_id and (r.uplink_score > 0 or r.node_id in direct)]
        taken = {r.node_id for r in must}
        rest = [r for r in records if r.node_id not in taken]
        room = max(0, MAX_GOSSIP_RECORDS - len(must))
        # Seeded by the exchange, not drawn from the node's rng (see `_direct_failed`).
        pick = random.Random(f"{self._actor_salt}:{peer}:{now!r}")
        return tuple(must[:MAX_GOSSIP_RECORDS] + pick.sample(rest, min(room, len(rest))))

    async def _hello(self, address: str) -> None:
        try:
            reply = await self.transport.request(address, "/m/hello", method="GET", timeout=self.config.request_timeout)
            hello = Hello.decode(reply)
        except (TransportError, ProtocolError) as exc:
            log.debug("hello to %s failed: %s", address, exc)
            return
        if hello.node_id != self.node_id:
            self._direct_ok(hello.node_id, address).discovered = True

    async def _gossip_with(self, n: _Neighbour) -> None:
        assert self.membership is not None
        try:
            request = MembersRequest(self.node_id, self._member_sample(n.node_id))
            reply = MembersResponse.decode(
                await self.transport.request(n.address, "/m/members", request.encode(), timeout=self.config.request_timeout)
            )
            self._direct_ok(n.node_id, n.address)
            self.membership.merge(reply.records, self.now())
            await self._anti_entropy(n)
        except (TransportError, ProtocolError) as exc:
            self._direct_failed(n, exc)

    async def _anti_entropy(self, n: _Neighbour) -> None:
        mine = self.replica.heads_hashes()
        request = DigestRequest(self.node_id, tuple(make_digest(mine)))
        reply = DigestResponse.decode(
            await self.transport.request(n.address, "/m/digest", request.encode(), timeout=self.config.request_timeout)
        )
        ours = bucket_entries(mine, reply.buckets)
        differ = differing_docs(ours, dict(reply.entries)) - self.archived
        n.unsynced = set(differ)
        if differ:
            await self._sync_docs(n, sorted(differ), reset=True)

    # --- push ----------------------------------------------------------------------

    async def _push_loop(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                await self._push_wakeup.wait()
                self._push_wakeup = trio.Event()
                for n in self.live_neighbours():
                    if n.push and not n.pushing:
                        docs = sorted(n.push)
                        n.push.clear()
                        n.pushing = True
                        nursery.start_soon(self._push_to, n, docs)

    async def _push_to(self, n: _Neighbour, doc_ids: list[str]) -> None:
        try:
            await self._sync_docs(n, doc_ids, reset=False)
        except (TransportError, ProtocolError) as exc:
            self._direct_failed(n, exc)
        finally:
            n.pushing = False
            if n.push:
                self._push_wakeup.set()

    # --- sync (client side) -----------------------------------------------------------

    async def _sync_docs(self, n: _Neighbour, doc_ids: list[str], *, reset: bool) -> None:
        """Run Automerge sync with one peer for these documents until both are quiet."""
        async with n.lock:
            for start in range(0, len(doc_ids), MAX_DOCS_PER_SYNC):
                await self._sync_batch(n, doc_ids[start : start + MAX_DOCS_PER_SYNC], reset=reset)

    async def _sync_batch(self, n: _Neighbour, docs: list[str], *, reset: bool) -> None:
        book = self.replica.book
        if reset:
            for d in docs:
                book.reset(n.node_id, d)
        pending = list(docs)
        first = True
        try:
            for _ in range(self.config.max_sync_rounds):
                msgs = {d: self.replica.generate(n.node_id, d) for d in pending}
                if not first and all(m is None for m in msgs.values()):
                    break
                request = SyncRequest(self.node_id, msgs, tuple(docs) if reset and first else ())
                payload = await self.transport.request(
                    n.address, "/m/sync", request.encode(), timeout=self.config.request_timeout
                )
                reply = SyncResponse.decode(payload)
                self._direct_ok(n.node_id, n.address)
                first = False
                for d, error in reply.errors.items():
                    book.reset(n.node_id, d)
                    log.warning("peer %s refused our sync message for %s: %s", n.node_id, d, error)
                await self._apply_messages(n.node_id, reply.msgs)
                # A document the peer refused leaves this exchange (anti-entropy retries it later).
                pending = [
                    d for d in pending if d not in reply.errors and (msgs.get(d) is not None or d in reply.msgs)
                ]
                if not pending:
                    break
            else:
                log.info("sync with %s not finished after %d rounds", n.node_id, self.config.max_sync_rounds)
                return
        except BaseException:
            for d in docs:
                book.reset(n.node_id, d)
            raise
        n.unsynced.difference_update(docs)

    def _archived_copy(self, doc_id: str) -> bool:
        """Load an archived document into the read-only archive replica; False if it is gone."""
        if doc_id in self._archive_replica.docs:
            return True
        assert self.store is not None
        doc = self.store.sync.load(doc_id)
        if doc is None:
            return False
        if len(self._archive_replica.docs) >= ARCHIVE_CACHE:
            self._archive_replica = Replica()
        self._archive_replica.docs[doc_id] = doc
        return True

    async def _apply_messages(self, peer: str, msgs: dict[str, bytes] | Any) -> dict[str, str]:
        """Apply sync messages from `peer`; persist new changes; return per-doc errors."""
        errors: dict[str, str] = {}
        changed: list[tuple[str, list[tuple[bytes, bytes]]]] = []
        for d, m in msgs.items():
            if m is None:
                continue
            if d in self.archived:
                if self._archived_copy(d):
                    try:
                        self._archive_replica.receive(peer, d, m)
                    except InvalidSyncMessage as exc:
                        errors[d] = str(exc)
                continue
            try:
                changes = self.replica.receive(peer, d, m, validate=functools.partial(_check_document, self.config.site, d))
            except InvalidSyncMessage as exc:
                errors[d] = str(exc)
                self.counters["sync_requests_refused"] += 1
                log.warning("refused sync message from %s for %s: %s", peer, d, exc)
                continue
            if changes:
                changed.append((d, changes))
        if changed:
            assert self.store is not None
            await self.store.write_many(changed)
            self.counters["changes_received"] += sum(len(c) for _, c in changed)
            for d, c in changed:
                self._changed(d, source=peer, size=sum(len(b) for _, b in c))
        return errors

    # --- handlers (server side) --------------------------------------------------------

    def _hello_message(self) -> Hello:
        assert self.membership is not None
        return Hello(self.node_id, self.transport.address, self.membership.self_record.incarnation,
                     self.signer.public_key, self.config.site)

    async def _on_hello(self, payload: bytes, remote: str) -> bytes:
        return self._hello_message().encode()

    def _requester(self, node_id: str, remote: str) -> None:
        """A peer reached us directly: it is a neighbour (at `remote` unless we know better)."""
        if node_id == self.node_id:
            raise BadRequest("request claims to come from this node's own id")
        self._check_sender(node_id)
        known = self.neighbours.get(node_id)
        self._direct_ok(node_id, known.address if known else remote)

    def _check_sender(self, node_id: str) -> None:
        """On sealed traffic, `from` must be the node whose certificate signed the request."""
        peer = authenticated_peer.get()
        if peer is not None and peer != node_id:
            raise Forbidden(f"request says it is from {node_id!r} but was signed by {peer!r}")

    async def _on_members(self, payload: bytes, remote: str) -> bytes:
        assert self.membership is not None
        request = MembersRequest.decode(payload)
        self._check_sender(request.sender)
        sender = next((r for r in request.records if r.node_id == request.sender), None)
        self._requester(request.sender, sender.address if sender else remote)
        self.membership.merge(request.records, self.now())
        return MembersResponse(self._member_sample(request.sender)).encode()

    async def _on_digest(self, payload: bytes, remote: str) -> bytes:
        request = DigestRequest.decode(payload)
        if request.sender == self.node_id:
            raise BadRequest("request claims to come from this node's own id")
        self._check_sender(request.sender)
        self._requester(request.sender, remote)
        mine = self.replica.heads_hashes()
        buckets = differing_buckets(make_digest(mine), list(request.buckets))
        return DigestResponse(tuple(buckets), bucket_entries(mine, buckets)).encode()

    async def _on_sync(self, payload: bytes, remote: str) -> bytes:
        request = SyncRequest.decode(payload)
        if request.sender == self.node_id:
            raise BadRequest("request claims to come from this node's own id")
        self._check_sender(request.sender)
        # Refuse the whole request, before changing anything, if a message does not parse.
        for d, m in request.msgs.items():
            if m is not None:
                try:
                    decode_sync_message(m)
                except InvalidSyncMessage as exc:
                    self.counters["sync_requests_refused"] += 1
                    raise ProtocolError(f"sync message for {d!r}: {exc}") from exc
        self._requester(request.sender, remote)
        for d in request.reset:
            self.replica.book.reset(request.sender, d)
        async with self._receive_lock:
            errors = await self._apply_messages(request.sender, request.msgs)
        replies = {}
        for d in request.msgs:
            if d in errors:
                continue
            if d in self.archived:
                m = self._archive_replica.generate(request.sender, d) if self._archived_copy(d) else None
            else:
                m = self.replica.generate(request.sender, d)
            if m is not None:
                replies[d] = m
        return SyncResponse(replies, errors).encode()


def _unit(key: str) -> float:
    """A number in [0, 1) fixed by `key` (deterministic jitter)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def _check_document(site: str, doc_id: str, doc: Any) -> None:
    """A document received for the first time must be our site's config, or a
    session stored under its own id."""
    if doc_id == SITE_CONFIG_ID:
        if read_site_config(doc).get("site") != site:
            raise ProtocolError("the site-config document belongs to another site")
        return
    session_id = read_session(doc).session_id
    if session_id != doc_id:
        raise ProtocolError(f"document {doc_id!r} holds session {session_id!r}")


__all__ = ["API_EVENT_TYPES", "EVENT_TYPES", "Node", "NodeConfig", "NodeError", "PeerState"]
