"""The mesh node: one trio nursery that owns the store, membership and the replication engine.

The node talks to the world only through its seams (DESIGN.md): a `Transport`
(CoAP or in-memory), a `Discovery` (mDNS, static, in-memory), the trio clock
(`trio.current_time()`, so `MockClock` drives the simulator) and an injected
wall clock for the timestamps written into events. Decisions are made by the
sans-IO parts: `meshnode.core.Replicator` (whom to greet, push to and check,
and when), `Membership`, the digest functions of `crdt`. The tasks here read
the clock, carry out the actions the core returns, and sleep until its next
deadline (docs/protocol.md describes the wire side, protocol version 4):

- a change, local or received, is pushed one way (no response) to the verified
  neighbours that may lack it, with the changes they lack; pushes are paid from
  a budget of messages per change (`Replicator.push_credits`), so with many
  neighbours or under load changes travel in batches;
- one neighbour at a time gets an anti-entropy exchange every
  `gossip_interval`: a heads-hash and membership digest, and the digest and
  Automerge sync only when the hashes differ;
- membership records ride piggybacked on pushes and exchanges.

A peer exists only after a verified hello (`meshnode.core.neighbours`, N1).
Sync states are per (peer node id, document); when an exchange fails, the
states involved are dropped: Automerge assumes what it sent was delivered.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import ipaddress
import logging
import math
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
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
    Documents,
    EventSigner,
    Replica,
    InvalidSyncMessage,
    Applied,
    SyncSession,
    Keyring,
    SessionData,
    SessionView,
    StoreError,
    StoreOpener,
    bucket_entries,
    differing_buckets,
    differing_docs,
    heads_hash,
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
from ._membership import MemberRecord, Membership, PeerState
from ._protocol import (
    MAX_BATCH_BYTES,
    PROTOCOL_VERSION,
    DigestRequest,
    DetectorMismatch,
    DigestResponse,
    Hello,
    ProtocolError,
    Push,
    StateRequest,
    StateResponse,
    SyncRequest,
    SyncResponse,
)
from .core import Action, Neighbour, Replicator, SendHello, SendPush, StartExchange, SyncDocs, Tick, build_push
from .core.neighbours import Cadence
from ._security import (
    Authorization,
    Identity,
    Limits,
    Sealer,
    authenticated_peer,
)
from .services import API_EVENT_TYPES, SessionService, SiteConfigService
from ._transport import (
    BadRequest,
    Forbidden,
    LogBudget,
    RemoteRefused,
    RequestRefused,
    Transport,
    TransportError,
    held_back,
    split_address,
)

log = logging.getLogger("meshnode.node")

PIGGYBACK_RECORDS = 8
"""Member records piggybacked on one push or exchange (our own among them)."""
MAX_VIEW_RECORDS = 32
"""Member records in a state response when the membership digests differ."""
MAX_PUSH_BYTES = 64 * 1024
"""A push stops taking documents past this many bytes (the rest waits a slot)."""
SYNC_BATCH_DOCS = 8
"""Documents per anti-entropy sync request (responses are byte-capped too): one
request is 1 KiB blocks in lock step, and on a loaded host (field suite, load 24)
64 documents' histories took longer than any deadline, every time."""
SYNC_REPLY_BYTES = 32 * 1024
"""A sync answer stops taking documents past this many bytes (the rest waits for
the next round): 32 lock-step blocks, not the 256 of MAX_BATCH_BYTES."""
PUSH_STATE = "push:"
"""Prefix of the sync-state keys used for one pushed message each."""
ARCHIVE_CACHE = 256
"""Archived documents kept loaded to serve peers that still sync them."""
LOADED_DOCUMENTS = 128
"""Active documents kept loaded (`crdt.Documents`); the others wait as their saved bytes
(~1 KB a session, ~15 KB loaded). More than a sync batch, or a forwarder batch of
small sessions (256 KiB), holds."""


class NodeError(Exception):
    """Base of the node's own errors."""


class NotReady(RequestRefused):
    """5.03: the node is starting (or overloaded): ask again later, nothing was done."""

    code = "5.03"
    message = "not ready"


@dataclass
class NodeConfig:
    """Everything a node is told at start-up (CLI flags or TOML, same names)."""

    node_id: str
    data_dir: Path
    site: str = "default"
    gossip_interval: float = 1.0
    idle_interval: float = 8.0
    """Anti-entropy backs off to this period while every exchange finds the peer in
    agreement, and returns to `gossip_interval` when one does not (`Cadence`)."""
    fanout: int = 3
    suspect_after: float = 5.0
    dead_after: float = 15.0
    detector: str = "swim"
    """The failure detector (docs/membership.md): "swim" (probe neighbours, spread
    suspicions, links in the records for reachability; its idle cost does not grow with
    the mesh) or "heartbeat" (gossip-style)."""
    request_timeout: float = 3.0
    """Deadline of one request (each request of an exchange has its own)."""
    max_sync_rounds: int = 12
    push_interval: float = 0.4
    """The longest a change waits for a push the budget cannot pay for yet
    (`Replicator`: Gossip Glomers 3d/3e, latency and messages per event)."""
    neighbour_ttl: float = 60.0
    """A neighbour not heard from for this long is forgotten (it must hello again)."""
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
        self.chain_base = 0
        """The seq a fresh chain of this device starts after (see `meshnode._sitetrust.chain_base_at_enrolment`)."""
        self.keyring = Keyring({self.node_id: self.signer.public_key})
        self.store: AsyncDocStore | None = None
        self.replica = Replica()
        self.documents = Documents(capacity=LOADED_DOCUMENTS, pinned=(SITE_CONFIG_ID,))
        """The replica's documents, the recently used loaded, the others as saved bytes (the site
        config, read on every authorisation, always loaded)."""
        self.replica.docs = self.documents  # type: ignore[assignment]  # a dict to whoever reads it
        self.membership: Membership | None = None
        self.engine = Replicator(
            self.node_id,
            push_interval=config.push_interval,
            exchange_interval=config.gossip_interval,
            tick_interval=config.gossip_interval,
            ttl=config.neighbour_ttl,
            salt=f"{seed}:{config.node_id}",
        )
        self._cadence = Cadence(config.gossip_interval, max(config.gossip_interval, config.idle_interval))
        self._wakeup = trio.Event()
        self._ready = False
        self._ticking = False
        self._sync_locks: dict[str, trio.Lock] = {}
        self._reported: dict[str, dict[str, bytes | None]] = {}
        """Per peer, the heads hashes it reported for differing documents last time."""
        self._doc_hh: dict[str, bytes] = {}
        self._heads_acc = 0
        """XOR of a hash of (document, heads hash) over every active document: the heads-hash."""
        self._started = trio.Event()
        self.counters = {"sync_requests_refused": 0, "peer_errors": 0, "changes_received": 0}
        self._refusal_log = LogBudget()
        """One "refused sync message" line per 10 s (a peer can send them as fast as it likes)."""
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
            planner = ForwardPlanner(random.Random(f"{seed}:{config.node_id}:forwarder"), meter_hold=config.meter_hold)
            self.forwarder = Forwarder(
                self.replica, self.node_id, config.site, cloud, planner, self._persist_from_cloud
            )
            if identity is not None:  # a cloud that trusts the site takes sync only from its devices
                self.forwarder.sign_with(identity.signing_key, identity.certificate_bytes, wall_clock)
        self.archived: set[str] = set()
        # Retired sessions a peer still asks about are served from their archived
        # copy (read-only: nothing a peer sends is stored), so a node that was away
        # when the receipt came still gets it, and then retires the session too.
        self._archive_replica = Replica()
        self._sync_replicas = _SyncReplicas(self)
        self._actor_salt = ""
        self._receipt_ts: dict[str, int] = {}
        # Session and site-config commands (domain errors, no HTTP codes), wired to this node.
        unknown_limits = None
        if config.unknown_token_max_wh is not None or config.unknown_token_max_minutes is not None:
            unknown_limits = Limits(config.unknown_token_max_wh, config.unknown_token_max_minutes)
        self.site_config = SiteConfigService(
            replica=self.replica,
            identity=identity,
            sealer=sealer,
            actor=self._actor,
            commit=self._commit_local,
            wall_clock=wall_clock,
            unknown_token_policy=config.unknown_token_policy,
            unknown_token_limits=unknown_limits,
        )
        self.sessions = SessionService(
            node_id=self.node_id,
            site=config.site,
            replica=self.replica,
            site_config=self.site_config,
            signer=lambda: self.signer,
            keyring=self.keyring,
            identity=identity,
            actor=self._actor,
            rng=self.rng,
            wall_clock=lambda: self.wall_clock(),
            commit=self._commit_local,
            archived=lambda: self.archived,
        )
        self._fold_cache = self.sessions.fold_cache

        # Routes exist from the start and answer 5.03 until the node is ready, so a
        # peer never takes "4.04 /m/sync" from a node that is starting (issue 10).
        self._route()
        # Remote start/stop of chargers wherever in the mesh they are connected (/m/ocpp/command).
        from .ocpp import install_remote_commands  # late: meshnode.ocpp imports services

        self.remote_commands = install_remote_commands(self)

    # --- lifecycle ------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the node until cancelled. The store is closed last."""
        async with self._open_store() as store:
            self.store = store
            # Held as their stored bytes: each is loaded when read (below, once, for its fold).
            for doc_id, data in (await store.load_all_bytes()).items():
                self.documents.put_saved(doc_id, data)
            stored = sorted(self.documents)
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
                threshold=self.config.leader_threshold,
                heartbeat_period=self.config.gossip_interval,
                refresh_sends=6,
                detector=self.config.detector,
            )
            self.archived = set(store.sync.archived_ids())
            if SITE_CONFIG_ID not in self.replica.docs:
                site_doc = new_site_config(self.config.site, actor=self._actor(SITE_CONFIG_ID))
                await self._persist(SITE_CONFIG_ID, self.replica.add(SITE_CONFIG_ID, site_doc))
            self._apply_site_config()
            for doc_id in stored:
                self._note_stored(doc_id)
            self._resume_chain()  # from the folds just made: no document is read twice
            for doc_id in sorted(self.replica.docs):
                self._note_heads(doc_id)
            _return_freed_memory()
            log.info("node %s serving at %s with %d documents", self.node_id, self.transport.address, len(stored))
            try:
                async with trio.open_nursery() as nursery:
                    if self.discoveries:
                        send, recv = trio.open_memory_channel[PeerSeen | PeerGone](64)
                        async with send:
                            for discovery in self.discoveries:
                                await nursery.start(discovery.serve, send.clone())
                        nursery.start_soon(self._consume_discovery, recv)
                    self._ready = True
                    nursery.start_soon(self._engine_loop, nursery)
                    if self.cloud is not None and self.forwarder is not None:
                        await nursery.start(
                            functools.partial(
                                serve_probe,
                                interval=self.config.probe_interval,
                                timeout=min(2.0, self.config.probe_interval / 2),
                            ),
                            self.cloud,
                            self.scorer,
                            self._on_score,
                        )
                        await nursery.start(
                            functools.partial(serve_forwarder, is_leader=lambda: self.leader == self.node_id),
                            self.forwarder,
                        )
                    self._started.set()
                    task_status.started()
                    await trio.sleep_forever()
            finally:
                self._ready = False
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
        for doc_id in self.documents:
            try:
                data = self._session_data(doc_id)
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
        # A fresh chain; a node re-enrolled under a new key starts past its old chain (issue 14).
        self.signer = EventSigner(self.node_id, self.signing_key, seq=self.chain_base)

    def _session_data(self, doc_id: str) -> SessionData:
        """A session's content: from its fold when that is current (no load), else read."""
        cached = self._fold_cache.get(doc_id)
        if cached is not None and cached[0] == heads_hash(self.documents.heads(doc_id)):
            return cached[1]
        return read_session(self.documents[doc_id])

    def _route(self) -> None:
        t = self.transport
        t.route("/m/hello", self._on_hello, method="GET")
        t.route("/m/hello", self._on_hello_post)
        t.route("/m/push", self._on_push)
        t.route("/m/state", self._on_state)
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
        """A document changed (locally when `source` is None): the engine decides who may lack it."""
        before = self._fold_cache.pop(doc_id, None)
        if doc_id == SITE_CONFIG_ID:
            self._apply_site_config()
        else:
            self._track(doc_id, before[2] if before else None, size)
        self._note_heads(doc_id, source=source, notify=True)
        self._pace(quiet=False)
        for listener in self.change_listeners:
            listener(doc_id)

    def _note_heads(self, doc_id: str, *, source: str | None = None, notify: bool = False) -> None:
        """Keep the heads-hash of all documents current, and tell the engine."""
        old = self._doc_hh.pop(doc_id, None)
        if old is not None:
            self._heads_acc ^= _entry_hash(doc_id, old)
        if doc_id not in self.documents:
            return
        heads = self.documents.heads(doc_id)  # loads nothing
        hh = heads_hash(heads)
        self._doc_hh[doc_id] = hh
        self._heads_acc ^= _entry_hash(doc_id, hh)
        if notify or doc_id not in self.engine.heads:
            self.engine.changed(doc_id, heads, self.now(), source=source)
            self._wakeup.set()

    def heads_hash(self) -> bytes:
        """8 bytes that differ when two nodes' active documents or their heads differ."""
        return self._heads_acc.to_bytes(8, "big")

    def _heads_hashes(self) -> dict[str, bytes]:
        """`Replica.heads_hashes` of every active document: the ones `_note_heads` keeps
        current for `heads_hash`, not hashed again (nor loaded) per digest."""
        return dict(self._doc_hh)

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
        # The size hint: its stored bytes (snapshot and change chunks, as a sync sends them);
        # saving each document again only to measure it cost 0.3 s of CPU per 1,000 sessions.
        held = self.documents.held_bytes(doc_id)
        self._track(doc_id, None, len(held) if held is not None else len(self.replica.docs[doc_id].save()))

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

    def _pace(self, *, quiet: bool) -> None:
        """Anti-entropy and the housekeeping tick back off while exchanges find the mesh in
        agreement, and return to `gossip_interval` when something differs (`Cadence`).
        The heartbeat is raised when it is sent (`Membership(heartbeat_period=)`), and the
        election re-runs here too, so a rarer tick delays neither."""
        if quiet and self.membership is not None and self.membership.detector == "swim":
            quiet = not self.membership.pending_updates()  # news travels at the busy pace
        interval = self._cadence.quiet() if quiet else self._cadence.busy()
        if self.engine.set_pace(interval, self.now()):
            self._wakeup.set()  # the next exchange may come sooner than the loop sleeps for
        if self.membership is not None:
            self._elect()

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
        await self.store.compact(doc_id, doc, archive=True)  # the store knows whether it may block
        del self.replica.docs[doc_id]
        self.replica.book.forget_doc(doc_id)
        self.archived.add(doc_id)
        self._receipt_ts.pop(doc_id, None)
        self._fold_cache.pop(doc_id, None)
        if self.forwarder is not None:
            self.forwarder.planner.forget(doc_id)
        self._note_heads(doc_id)
        self.engine.forget_doc(doc_id)
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

    @property
    def neighbours(self) -> dict[str, Neighbour]:
        """Verified direct peers, by node id (`meshnode.core.NeighbourTable`)."""
        return self.engine.table.peers

    def live_neighbours(self) -> list[Neighbour]:
        return self.engine.table.live()

    def documents_not_everywhere(self) -> set[str]:
        """Documents that some live neighbour may lack or hold in another version."""
        return self.engine.documents_not_everywhere()

    def status_json(self) -> dict[str, Any]:
        assert self.membership is not None
        now = self.now()
        direct = {n.node_id for n in self.live_neighbours()}
        peers = []
        for view in self.membership.view(now):
            if view.record.node_id == self.node_id:
                continue
            peers.append(
                {
                    "node_id": view.record.node_id,
                    "address": view.record.address,
                    "state": view.state.name.lower(),
                    "last_seen_s": round(view.age, 1),
                    "incarnation": view.record.incarnation,
                    "uplink_score": view.record.uplink_score,
                    "direct": view.record.node_id in direct,
                }
            )
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
                # Discovery names an address; only a hello answered from it makes a peer.
                self.engine.discovered(event.address, self.now())
            elif isinstance(event, PeerGone):
                if event.node_id is not None and event.node_id in self.engine.table.peers:
                    log.info("peer %s left (discovery)", event.node_id)
                    if self.membership is not None:  # SWIM: suspect it (it refutes if alive)
                        self.membership.suspect(event.node_id, self.now())
                self.engine.discovery_gone(event.node_id, event.address)
            self._wakeup.set()

    # --- the engine: carry out what the core decides, sleep until its deadline ------------

    async def _engine_loop(self, nursery: trio.Nursery) -> None:
        # One cancel scope serves every pass woken by `_wakeup` (its deadline moved to the
        # core's next one); only a pass woken by that deadline needs a new scope (a cancelled
        # scope stays cancelled). The Event is replaced only once it has been set.
        while True:
            with trio.CancelScope() as waiting:
                while True:
                    now = self.now()
                    actions = self.engine.poll(now)
                    if self.membership is not None:  # links for reachability (SWIM, R12); cheap if unchanged
                        self.membership.set_neighbours(self.engine.table.peers)
                    for action in actions:
                        self._act(action, nursery)
                    deadline = self.engine.next_deadline()
                    # never spin on a deadline already due
                    deadline = max(deadline, now + 1e-3) if deadline is not None else math.inf
                    if deadline != waiting.deadline:  # the setter costs as much as a new scope
                        waiting.deadline = deadline
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()

    def _act(self, action: Action, nursery: trio.Nursery) -> None:
        """Carry out one action. Everything that reads or changes state happens here,
        in the order the core returned the actions; only the waiting is left to tasks
        (tasks started at one instant run in an order trio shuffles, STYLE rule 11)."""
        assert self.membership is not None
        now = self.now()
        if isinstance(action, SendPush):
            self._push(action, nursery)
        elif isinstance(action, StartExchange):
            # An idle exchange is rare (`Cadence`): it carries as many records as a full answer.
            records = self.membership.piggyback(now, MAX_VIEW_RECORDS)
            request = StateRequest(self.node_id, self.heads_hash(), self.membership.digest(now), records)
            nursery.start_soon(self._exchange, action.peer, action.address, request)
        elif isinstance(action, SendHello):
            nursery.start_soon(self._hello, action.address, self._hello_message().encode())
        elif isinstance(action, SyncDocs):
            nursery.start_soon(self._repair, action)
        elif isinstance(action, Tick):
            self.membership.tick(now)
            self._elect()
            if not self._ticking and self._receipt_ts:  # nothing to retire: no task
                self._ticking = True
                nursery.start_soon(self._retire_task)

    async def _retire_task(self) -> None:
        try:
            await self._retire()
        finally:
            self._ticking = False

    def _hello_message(self) -> Hello:
        assert self.membership is not None
        return Hello(
            self.node_id,
            self.transport.address,
            self.membership.self_record.incarnation,
            self.signer.public_key,
            self.config.site,
            detector=self.membership.detector,
        )

    async def _hello(self, address: str, payload: bytes) -> None:
        ok = False
        try:
            reply = await self.transport.request(address, "/m/hello", payload, timeout=self.config.request_timeout)
            hello = Hello.decode(reply)
            assert self.membership is not None
            hello.check_detector(self.node_id, self.membership.detector)
            if hello.node_id != self.node_id and hello.version == PROTOCOL_VERSION:
                ok = True
                # Verified: that address answered as that node (N1). Reach it where we reached it.
                self.engine.hello_ok(hello.node_id, address, hello.incarnation, self.now())
                self._observed(hello.node_id)
        except DetectorMismatch as exc:
            log.warning("hello to %s: not a neighbour: %s", address, exc.message)
        except RemoteRefused as exc:
            if exc.code == DetectorMismatch.code:
                log.warning("hello to %s refused: %s", address, exc)
            else:
                log.debug("hello to %s failed: %s", address, exc)
        except (TransportError, ProtocolError, ValueError) as exc:
            log.debug("hello to %s failed: %s", address, exc)
        finally:
            self.engine.hello_done(address, ok)
            self._wakeup.set()

    def _observed(self, node_id: str) -> None:
        assert self.membership is not None
        self.membership.observe_direct(node_id, self.now())

    def _piggyback(self) -> tuple[MemberRecord, ...]:
        assert self.membership is not None
        return self.membership.piggyback(self.now(), PIGGYBACK_RECORDS)

    # --- push (one way) ------------------------------------------------------------------

    def _push(self, action: SendPush, nursery: trio.Nursery) -> None:
        """Build the push now (the engine's view of the peer's heads moves with it), send it in a task."""
        assert self.membership is not None
        entries, left = build_push(
            self.replica, action.docs, functools.partial(self.engine.known_heads, action.peer), MAX_PUSH_BYTES
        )
        self.engine.requeue(action.peer, left)
        if not entries:
            return
        for doc_id, (heads, _) in entries.items():
            self.engine.pushed(action.peer, doc_id, heads)
        push = Push(
            self.node_id,
            self.membership.self_record.incarnation,
            entries,
            self._piggyback(),
            tuple(self.engine.push_targets()),
        )
        nursery.start_soon(self._send, action.address, "/m/push", push.encode())

    async def _send(self, address: str, resource: str, payload: bytes) -> None:
        send = getattr(self.transport, "send", None)
        try:
            if send is not None:
                await send(address, resource, payload)
            else:
                # A transport without one-way sends: a request whose answer nobody needs
                # (the sealing wrapper has its own `send`: sealed NON pushes).
                await self.transport.request(address, resource, payload, timeout=self.config.request_timeout)
        except (TransportError, ValueError) as exc:
            log.debug("push to %s failed: %s", address, exc)

    # --- anti-entropy (client side) -------------------------------------------------------

    async def _exchange(self, peer: str, address: str, request: StateRequest) -> None:
        """Heads-hash first; digest and sync only when the hashes differ."""
        assert self.membership is not None
        done = False
        try:
            started = self.now()
            reply = StateResponse.decode(
                await self.transport.request(address, "/m/state", request.encode(), timeout=self.config.request_timeout)
            )
            self.membership.merge(reply.records, self.now())
            self._observed(peer)
            slow = self.now() - started > self.config.request_timeout / 2
            differ: set[str] = set()
            agree = reply.members_digest == self.membership.digest(self.now())
            if reply.heads_hash != self.heads_hash():
                agree = False
                differ = await self._anti_entropy(peer, address)
            self._pace(quiet=agree and not differ)
            self.engine.exchange_done(peer, self.now(), in_sync=not differ, slow=slow, unsynced=differ)
            done = True
        except (TransportError, ProtocolError) as exc:
            self._exchange_failed(peer, address, exc)
            done = True
        finally:
            if not done:  # cancelled: leave the engine consistent
                self.engine.exchange_failed(peer, self.now())
            self._wakeup.set()

    async def _repair(self, action: SyncDocs) -> None:
        """Sync the documents a push from this peer left a gap in, now (see `Replicator.gap`)."""
        ok = False
        try:
            # A gap the late push has closed meanwhile needs no sync.
            docs = [
                d
                for d, heads in zip(action.docs, action.lacking or [()] * len(action.docs), strict=True)
                if d not in self.archived
                and (d not in self.replica.docs or not heads or _lacks(self.replica.docs[d], heads))
            ]
            if docs:
                self.counters["gap_syncs"] = self.counters.get("gap_syncs", 0) + 1
                await self._sync_docs(action.peer, action.address, docs)
            ok = True
        except (TransportError, ProtocolError) as exc:
            log.info("gap sync with %s failed: %s", action.peer, exc)
        finally:
            self.engine.repair_done(action.peer, self.now(), ok=ok)
            self._wakeup.set()

    def _exchange_failed(self, peer: str, address: str, exc: Exception) -> None:
        forgotten = self.engine.exchange_failed(peer, self.now())
        if self.membership is not None and self.membership.detector == "swim":
            if forgotten:  # the probe failed `max_failures` times in a row: suspect (SWIM)
                self.membership.suspect(peer, self.now())
            else:
                self.engine.retry_soon(peer)
        level = logging.WARNING if isinstance(exc, RemoteRefused) and exc.code != "5.03" else logging.INFO
        log.log(
            level,
            "exchange with %s at %s failed%s: %s",
            peer,
            address,
            " (forgotten until it answers a hello again)" if forgotten else "",
            exc,
        )

    async def _anti_entropy(self, peer: str, address: str) -> set[str]:
        mine = self._heads_hashes()
        request = DigestRequest(self.node_id, tuple(make_digest(mine)))
        reply = DigestResponse.decode(
            await self.transport.request(address, "/m/digest", request.encode(), timeout=self.config.request_timeout)
        )
        ours = bucket_entries(mine, reply.buckets)
        theirs = dict(reply.entries)
        differ = differing_docs(ours, theirs) - self.archived
        # Sync what has settled here, or what the peer still reports at the same
        # heads as in our last exchange (a lost push it cannot get past); leave
        # the rest to the pushes that are on their way.
        now = self.now()
        before = self._reported.get(peer, {})
        sync = sorted(d for d in differ if self.engine.settled(d, now) or before.get(d, b"?") == theirs.get(d))
        self._reported[peer] = {d: theirs.get(d) for d in differ}
        if sync:
            await self._sync_docs(peer, address, sync)
        return differ

    async def _sync_docs(self, peer: str, address: str, doc_ids: list[str]) -> None:
        """Run Automerge sync with one peer for these documents, batch by batch."""
        lock = self._sync_locks.setdefault(peer, trio.Lock())
        async with lock:
            for start in range(0, len(doc_ids), SYNC_BATCH_DOCS):
                await self._sync_batch(peer, address, doc_ids[start : start + SYNC_BATCH_DOCS])

    def _sync_session(self, peer: str) -> SyncSession:
        """Both sides of node-to-node sync are a `crdt.SyncSession` on the live documents
        (archived ones routed to the read-only archive copy, see `_SyncReplicas`)."""
        return SyncSession(
            self._sync_replicas,
            peer,
            max_rounds=self.config.max_sync_rounds,
            # Both sides cap a message batch alike (crdt rule 6): requests are as many
            # lock-step blocks as answers, and a capped answer reads as capped.
            max_bytes=min(MAX_BATCH_BYTES, SYNC_REPLY_BYTES),
            validate=functools.partial(_check_document, self.config.site),
        )

    async def _sync_batch(self, peer: str, address: str, docs: list[str]) -> None:
        """One exchange, the initiator's side: each request has its own deadline (and
        tells the peer how long we wait, `ttl`), each request carries at most
        MAX_BATCH_BYTES of messages, changes are stored before the next request."""
        session = self._sync_session(peer)
        session.begin(docs, reset=True)
        ttl_ms = int(self.config.request_timeout * 1000)
        try:
            while (step := session.next_request()) is not None:
                request = SyncRequest(self.node_id, step.msgs, step.reset, ttl_ms)
                payload = await self.transport.request(
                    address, "/m/sync", request.encode(), timeout=self.config.request_timeout
                )
                reply = SyncResponse.decode(payload)
                for d, error in reply.errors.items():
                    log.warning("peer %s refused our sync message for %s: %s", peer, d, error)
                # A document the peer refused leaves this exchange (anti-entropy retries it later).
                applied = session.on_reply(reply.msgs, reply.errors)
                await self._store_applied(applied, source=peer, refused_by_peer=reply.errors)
        except BaseException:
            session.abort()
            raise
        if session.unsettled:
            log.info("sync with %s not finished after %d rounds", peer, self.config.max_sync_rounds)

    def _log_refused_sync(self, source: str, doc_id: str, error: object) -> None:
        held = self._refusal_log.allow("refused sync message", self.now())
        if held is not None:
            log.warning(
                "refused sync message from %s for %s: %s%s",
                source, doc_id, error, held_back(held, self._refusal_log.interval),
            )  # fmt: skip

    async def _store_applied(
        self, applied: Applied, *, source: str, refused_by_peer: Mapping[str, str] | None = None
    ) -> None:
        """Count what we refused, make new changes durable, then tell the engine."""
        for d, error in applied.errors.items():
            if refused_by_peer is None or d not in refused_by_peer:
                self.counters["sync_requests_refused"] += 1
                self._log_refused_sync(source, d, error)
        if applied.changes:
            assert self.store is not None
            await self.store.write_many(applied.changes)
            self.counters["changes_received"] += sum(len(c) for _, c in applied.changes)
            for d, c in applied.changes:
                self._changed(d, source=source, size=sum(len(b) for _, b in c))

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

    async def _apply_messages(self, state: str, msgs: dict[str, bytes] | Any, *, source: str) -> dict[str, str]:
        """Apply sync messages (sync state `state`) from `source`; persist new changes; return per-doc errors."""
        errors: dict[str, str] = {}
        changed: list[tuple[str, list[tuple[bytes, bytes]]]] = []
        one_shot = state.startswith(PUSH_STATE)
        for d, m in msgs.items():
            if m is None:
                continue
            if d in self.archived:
                if self._archived_copy(d) and not one_shot:
                    try:
                        self._archive_replica.receive(state, d, m)
                    except InvalidSyncMessage as exc:
                        errors[d] = str(exc)
                continue
            try:
                changes = self.replica.receive(
                    state, d, m, validate=functools.partial(_check_document, self.config.site, d)
                )
            except InvalidSyncMessage as exc:
                errors[d] = str(exc)
                self.counters["sync_requests_refused"] += 1
                self._log_refused_sync(source, d, exc)
                continue
            finally:
                if one_shot:
                    self.replica.book.reset(state, d)
            if changes:
                changed.append((d, changes))
        if changed:
            assert self.store is not None
            await self.store.write_many(changed)
            self.counters["changes_received"] += sum(len(c) for _, c in changed)
            for d, c in changed:
                self._changed(d, source=source, size=sum(len(b) for _, b in c))
        return errors

    # --- handlers (server side) --------------------------------------------------------

    def _check_ready(self) -> None:
        if not self._ready or self.membership is None:
            raise NotReady("node is starting")

    async def _on_hello(self, payload: bytes, remote: str) -> bytes:
        self._check_ready()
        return self._hello_message().encode()

    async def _on_hello_post(self, payload: bytes, remote: str) -> bytes:
        """A peer introduces itself. Its word alone makes no peer: we greet it back
        (bounded, expiring) unless the request was sealed by that very node."""
        self._check_ready()
        hello = Hello.decode(payload)
        if hello.node_id == self.node_id:
            raise BadRequest("hello claims to come from this node's own id")
        assert self.membership is not None
        hello.check_detector(self.node_id, self.membership.detector)  # 4.09, before anything changes
        self._sender(hello.node_id, hello.address, incarnation=hello.incarnation)
        return self._hello_message().encode()

    def _check_sender(self, node_id: str) -> None:
        """On sealed traffic, `from` must be the node whose certificate signed the request."""
        peer = authenticated_peer.get()
        if peer is not None and peer != node_id:
            raise Forbidden(f"request says it is from {node_id!r} but was signed by {peer!r}")

    def _sender(
        self,
        node_id: str,
        address: str | None,
        *,
        incarnation: int | None = None,
        records: tuple[MemberRecord, ...] = (),
        introduce: bool = True,
    ) -> bool:
        """Who sent this? True for a verified peer (known, or sealed by that node).

        An unverified sender creates no lasting state here (issue 10 item 5): its
        claimed address may be greeted once, from a bounded, expiring list. Only
        hello, push and state requests introduce (`introduce`); digest and sync
        requests are answered but make no peer.
        """
        if node_id == self.node_id:
            raise BadRequest("request claims to come from this node's own id")
        self._check_sender(node_id)
        now = self.now()
        own = next((r for r in records if r.node_id == node_id), None)
        claimed = own.address if own is not None else address
        if self.engine.heard(node_id, now) is not None:
            self._observed(node_id)
            return True
        if not introduce:
            return False
        if authenticated_peer.get() == node_id and claimed is not None and _plausible_address(claimed):
            # Sealed by that node's certificate: as good as a hello (N1).
            self.engine.hello_ok(
                node_id,
                claimed,
                incarnation if incarnation is not None else (own.incarnation if own is not None else None),
                now,
            )
            self._observed(node_id)
            self._wakeup.set()
            return True
        if claimed is not None and _plausible_address(claimed):
            self.engine.suggest(claimed, now)
            self._wakeup.set()
        return False

    async def _on_push(self, payload: bytes, remote: str) -> bytes:
        self._check_ready()
        assert self.membership is not None
        push = Push.decode(payload)
        for d, (_, m) in push.docs.items():
            try:
                decode_sync_message(m)
            except InvalidSyncMessage as exc:
                self.counters["sync_requests_refused"] += 1
                raise ProtocolError(f"push message for {d!r}: {exc}") from exc
        verified = self._sender(push.sender, remote, incarnation=push.incarnation, records=push.records)
        if verified:
            self.membership.merge(push.records, self.now())
            self.engine.told_targets(push.sender, push.targets)
        source = push.sender if verified else "?"
        async with self._receive_lock:
            await self._apply_messages(
                PUSH_STATE + push.sender, {d: m for d, (_, m) in push.docs.items()}, source=source
            )
        if verified:
            for d, (heads, _) in push.docs.items():
                if d in self.archived:
                    continue
                doc = self.replica.docs.get(d)
                if doc is None or _lacks(doc, heads):
                    # Changes that build on some we lack: an earlier push was lost.
                    self.engine.gap(push.sender, d, heads, self.now())
                elif doc is not None and sorted(doc.get_heads()) == sorted(heads):
                    self.engine.peer_has(push.sender, d, heads)
                    # The sender's targets got these heads too (from it, or from
                    # whoever it left them to): our next push to them starts there.
                    for target in push.targets or ():
                        if target != self.node_id:
                            self.engine.peer_has(target, d, heads)
            self._wakeup.set()
        return b""

    async def _on_state(self, payload: bytes, remote: str) -> bytes:
        self._check_ready()
        assert self.membership is not None
        request = StateRequest.decode(payload)
        if self._sender(request.sender, remote, records=request.records):
            self.membership.merge(request.records, self.now())
        now = self.now()
        digest = self.membership.digest(now)
        if digest != request.members_digest or request.heads_hash != self.heads_hash():
            self._pace(quiet=False)
        if digest != request.members_digest:
            # Views differ: a larger piggyback (queued updates first, then fresh
            # heartbeats), not the whole view: in a 200-node mesh whole views made
            # every exchange parse and merge 200 records (bench/sim.py).
            records = self.membership.piggyback(now, MAX_VIEW_RECORDS, repair=True)
        else:
            records = self._piggyback()
        return StateResponse(self.heads_hash(), digest, records).encode()

    async def _on_digest(self, payload: bytes, remote: str) -> bytes:
        self._check_ready()
        request = DigestRequest.decode(payload)
        self._sender(request.sender, remote, introduce=False)
        mine = self._heads_hashes()
        buckets = differing_buckets(make_digest(mine), list(request.buckets))
        return DigestResponse(tuple(buckets), bucket_entries(mine, buckets)).encode()

    async def _on_sync(self, payload: bytes, remote: str) -> bytes:
        """One exchange, the responder's side (`crdt.SyncSession`): refuse the request
        whole before anything changes if a message does not parse; give up, changing
        nothing, when the requester's `ttl` passes before our turn; answer at most
        MAX_BATCH_BYTES of messages."""
        self._check_ready()
        request = SyncRequest.decode(payload)
        if request.sender == self.node_id:
            raise BadRequest("request claims to come from this node's own id")
        self._check_sender(request.sender)
        session = self._sync_session(request.sender)
        try:
            session.check(request.msgs)
        except InvalidSyncMessage as exc:
            self.counters["sync_requests_refused"] += 1
            raise ProtocolError(str(exc)) from exc
        verified = self._sender(request.sender, remote, introduce=False)
        # The requester waits `ttl`: work it can no longer use is not started (the
        # apply itself is not cut short: its changes are stored before anything else).
        ttl = request.ttl_ms / 1000 if request.ttl_ms is not None else self.config.request_timeout
        with trio.move_on_after(ttl) as waiting:
            await self._receive_lock.acquire()
        if waiting.cancelled_caught:
            self.counters["sync_requests_abandoned"] = self.counters.get("sync_requests_abandoned", 0) + 1
            for d in {*request.msgs, *request.reset}:
                self._sync_replicas.book.reset(request.sender, d)
            raise NotReady("overloaded: the requester's deadline passed before its turn")
        try:
            with trio.CancelScope(shield=True):
                applied = session.on_request(request.msgs, request.reset)
                await self._store_applied(applied, source=request.sender)
        finally:
            self._receive_lock.release()
        # Byte cap: the rest waits for the requester's next round or exchange.
        replies = session.replies(request.msgs, applied.errors, max_bytes=min(MAX_BATCH_BYTES, SYNC_REPLY_BYTES))
        # No lasting sync state for an unverified sender, nor for a document we do
        # not hold (refused, or only named): one state per claimed id and document
        # piled up under bad input (the fuzz run's RSS growth, issue 10 item 5). A
        # real peer not verified yet syncs from scratch each round.
        for d in request.msgs:
            if not verified or (d not in self.replica.docs and d not in self.archived):
                self.replica.book.reset(request.sender, d)
        return SyncResponse(replies, applied.errors).encode()


class _SyncBook:
    def __init__(self, node: Node) -> None:
        self._node = node

    def reset(self, peer: str, doc_id: str) -> None:
        self._node.replica.book.reset(peer, doc_id)
        self._node._archive_replica.book.reset(peer, doc_id)


class _SyncReplicas:
    """What node-to-node `SyncSession`s work on: the node's live documents, with the
    archived ones routed to the read-only archive copy (loaded on demand): a peer
    that still syncs one is answered from it, and what it sends about one is
    applied there, never stored."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self.book = _SyncBook(node)

    @property
    def docs(self) -> dict[str, Any]:
        return self._node.replica.docs

    def generate(self, peer: str, doc_id: str) -> bytes | None:
        node = self._node
        if doc_id in node.archived:
            return node._archive_replica.generate(peer, doc_id) if node._archived_copy(doc_id) else None
        return node.replica.generate(peer, doc_id)

    def receive(
        self, peer: str, doc_id: str, msg: bytes, *, validate: Callable[[Any], Any] | None = None
    ) -> list[tuple[bytes, bytes]]:
        node = self._node
        if doc_id in node.archived:
            if node._archived_copy(doc_id):
                node._archive_replica.receive(peer, doc_id, msg)
            return []
        return node.replica.receive(peer, doc_id, msg, validate=validate)


def _return_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc's `malloc_trim`; elsewhere nothing):
    start-up loads every stored document once, and the pages that freed stay in the RSS of a
    node that may then idle for weeks (~1-3 MB; bench/footprint.py)."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def _lacks(doc: Any, heads: Sequence[bytes]) -> bool:
    """Whether the document lacks one of these changes. `get_changes([h])` of a change
    we hold never returns the root change (an ancestor of every change); for a hash we
    do not hold, automerge returns the whole history, root included."""
    return any(any(not c.deps for c in doc.get_changes([h])) for h in heads)


def _entry_hash(doc_id: str, hh: bytes) -> int:
    return int.from_bytes(hashlib.sha256(doc_id.encode() + b"\0" + hh).digest()[:8], "big")


def _plausible_address(address: str) -> bool:
    """A "host:port" we may greet: parses, and a dotted-quad host is a real IPv4 address."""
    try:
        host, _ = split_address(address)
    except ValueError:
        return False
    if host.replace(".", "").isdigit():
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
    return True


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
