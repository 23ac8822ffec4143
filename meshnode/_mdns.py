"""Discovery over multicast DNS: DNS-SD (RFC 6763) on mDNS (RFC 6762).

Each node registers one service instance of type ``_evmesh._udp.local.``
(RFC 6763 section 7) whose instance name is its node id (section 4.1), whose
SRV record points at its CoAP port on a host name of its own (section 5), and
whose TXT record carries the fields of :mod:`meshnode._discovery` (section 6).
It browses the same type (PTR queries, section 4), resolves every instance it
learns of, and reports ``PeerSeen`` with ``"{ipv4}:{srv port}"``. A removed
instance (a goodbye packet, RFC 6762 section 10.1, or an expired record)
becomes ``PeerGone``.

python-zeroconf is an asyncio library and the node is a trio program, so it
runs in the node's trio run through trio-asyncio: the caller opens the loop
(``async with trio_asyncio.open_loop():``, shared with aiocoap) and every call
into zeroconf goes through ``trio_asyncio.aio_as_trio``. Zeroconf's browser
calls back synchronously inside that loop; the callback only queues the change,
and trio tasks resolve it, one task per instance name so that one silent peer
cannot hold up the others and changes of one instance stay in order.

Choices, and why:

- Zeroconf is bound to the node's own IPv4 address (``interfaces=[bind]``):
  it joins the group and sends only there (``IP_MULTICAST_IF``), and it
  advertises only that address. That is what lets several nodes share one
  machine, each on its own 127.0.0.x, with no set-up: on Linux, multicast sent
  with an explicit loopback interface is looped back to every socket that
  joined the group on ``lo``, whether or not ``lo`` has the MULTICAST flag and
  whether or not a 224.0.0.0/4 route exists. :func:`check_multicast` proves it
  on a given machine; docs/discovery.md has the details.
- TTLs are 120 s for every record, not the 75 minutes RFC 6762 section 10
  suggests for PTR and TXT, so that a node that dies without a goodbye leaves
  peers' caches sooner. python-zeroconf receivers raise any PTR TTL below
  1125 s to 1125 s (a guard against refresh storms), so between our own nodes
  such a peer is reported gone after about 19 minutes; a goodbye is seen at
  once. Liveness is membership's job, on its own much shorter timers.
- What a peer advertises is read from zeroconf's cache newest record first,
  and every refreshed TXT, SRV or A record is compared with what was last
  resolved. python-zeroconf's browser and ServiceInfo both miss a TXT record
  that goes back to an earlier value (uplink score 10, 20, 10): the old
  record is still cached, marked to expire (RFC 6762 section 10.2), so the
  browser sees nothing new and ServiceInfo reads the stale record.
- A peer's malformed advertisement (TXT outside the schema, TXT ``id`` other
  than the instance name, TXT ``port`` other than the SRV port, no IPv4
  address) is logged at WARNING once per distinct content and ignored; the
  last good version of that peer stays in force.
- An instance name already taken on the link (another node with our id)
  fails :meth:`MdnsDiscovery.serve` with :class:`DiscoveryFailed` instead of
  renaming: the instance name is the node id, which others rely on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import logging
import math
import os
import re
import socket
import struct
import time
import types
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import trio
import trio_asyncio
import zeroconf
from zeroconf import IPVersion, ServiceStateChange

# zeroconf re-exports its record classes for backwards compatibility, outside __all__.
from zeroconf import DNSAddress, DNSRecord, DNSService, DNSText  # type: ignore[attr-defined]
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from ._discovery import (
    SERVICE_TYPE,
    DiscoveryEvent,
    DiscoveryFailed,
    InvalidFields,
    PeerGone,
    PeerSeen,
    _own_fields,
    merge_fields,
    peer_seen,
)

log = logging.getLogger(__name__)

__all__ = ["MDNS_GROUP", "MDNS_PORT", "MdnsDiscovery", "check_multicast", "decode_txt"]

MDNS_GROUP = "224.0.0.251"  # RFC 6762 section 3
MDNS_PORT = 5353

DEFAULT_TTL = 120  # seconds, every record; see the module docstring
DEFAULT_RESOLVE_TIMEOUT = 3.0  # seconds to resolve one instance before giving up on it
_CLOSE_TIMEOUT = 5.0  # seconds for goodbyes and socket teardown at shutdown

# DNS record types and class (RFC 1035 section 3.2.2, RFC 2782)
_TYPE_A = 1
_TYPE_TXT = 16
_TYPE_SRV = 33
_CLASS_IN = 1


def _aio(proc: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Run an asyncio coroutine function from trio, in the caller's loop."""
    return cast(Callable[..., Awaitable[Any]], trio_asyncio.aio_as_trio(proc))


async def _await(awaitable: Awaitable[Any]) -> None:
    await awaitable


def _check_bind_address(bind: str) -> str:
    try:
        address = ipaddress.ip_address(bind)
    except ValueError:
        raise ValueError(f"mDNS discovery needs an IPv4 address to bind to, got {bind!r}") from None
    if address.version != 4:
        raise ValueError(f"mDNS discovery supports IPv4 only, got {bind!r}")
    if address.is_unspecified or address.is_multicast or bind == "255.255.255.255":
        # 0.0.0.0 would be advertised to peers as our address; a node that
        # serves on every interface must pick the one to be discovered on.
        raise ValueError(f"mDNS discovery needs the node's own unicast address, got {bind!r}")
    return str(address)


def _host_name(node_id: str) -> str:
    """A DNS host name for our SRV target and A record (RFC 6763 section 5).

    The node id may hold characters a host name cannot, so it is squashed to
    letters, digits and hyphens and made unique again with a digest.
    """
    label = re.sub(r"[^a-z0-9-]+", "-", node_id.lower()).strip("-")[:40] or "node"
    digest = hashlib.sha256(node_id.encode("utf-8")).hexdigest()[:8]
    return f"evmesh-{label}-{digest}.local."


def _instance_of(name: str) -> str | None:
    suffix = "." + SERVICE_TYPE
    if not name.lower().endswith(suffix.lower()) or len(name) == len(suffix):
        return None
    return name[: -len(suffix)]


class MdnsDiscovery:
    """Announce this node and browse for the others with mDNS/DNS-SD.

    Args:
        node_id: our id, also the DNS-SD instance name (at most 63 bytes).
        bind: our own IPv4 address; zeroconf joins the mDNS group on its
            interface only, and peers are told to reach us there.
        port: our CoAP port, advertised in SRV and in the TXT ``port`` field.
        fields: further TXT fields (``up`` ...); ``id``, ``v`` and ``port``
            are filled in.
        ttl: seconds every record lives in peers' caches.
        resolve_timeout: seconds to resolve one peer before giving up on it
            until its next announcement.

    Raises:
        ValueError: bad node id, bind address, port or fields.
    """

    def __init__(
        self,
        node_id: str,
        bind: str,
        port: int,
        fields: Mapping[str, str] | None = None,
        *,
        ttl: int = DEFAULT_TTL,
        resolve_timeout: float = DEFAULT_RESOLVE_TIMEOUT,
    ) -> None:
        if ttl < 1 or resolve_timeout <= 0:
            raise ValueError(f"ttl and resolve_timeout must be positive, got {ttl} and {resolve_timeout}")
        self.node_id = node_id
        self.bind = _check_bind_address(bind)
        self.port = port
        self._fields = _own_fields(node_id, port, fields or {})
        self.ttl = ttl
        self.resolve_timeout = resolve_timeout
        self.service_name = f"{node_id}.{SERVICE_TYPE}"
        self.host_name = _host_name(node_id)
        self._wake: trio.MemorySendChannel[None] | None = None
        self._serving = False

    @property
    def address(self) -> str:
        """Our CoAP endpoint as peers will see it."""
        return f"{self.bind}:{self.port}"

    @property
    def fields(self) -> Mapping[str, str]:
        """What we advertise now (read-only)."""
        return types.MappingProxyType(self._fields)

    def update_fields(self, fields: Mapping[str, str]) -> None:
        self._fields = merge_fields(self._fields, fields)
        if self._wake is not None:
            try:
                self._wake.send_nowait(None)
            except trio.WouldBlock:
                pass  # a wake-up is already pending; it will read the latest fields

    async def serve(
        self,
        send: trio.MemorySendChannel[DiscoveryEvent],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Register, browse and report peers until cancelled; then send
        goodbyes and close every socket.

        ``task_status.started()`` is called once our name has survived
        probing (RFC 6762 section 8.1), about a second after the start.

        Raises:
            DiscoveryFailed: our own mDNS could not run (socket, group
                membership, our node id already advertised by another node).
            RuntimeError: no trio-asyncio loop, or already serving.
        """
        if trio_asyncio.current_loop.get() is None:
            raise RuntimeError(
                "MdnsDiscovery.serve needs an asyncio loop: run it inside `async with trio_asyncio.open_loop():`"
            )
        if self._serving:
            raise RuntimeError(f"mDNS discovery for {self.node_id!r} is already serving")
        self._serving = True
        try:
            await self._serve(send, task_status)
        finally:
            self._serving = False

    async def _serve(self, send: trio.MemorySendChannel[DiscoveryEvent], task_status: trio.TaskStatus[None]) -> None:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.bind((self.bind, 0))
        except OSError as exc:
            raise DiscoveryFailed(f"cannot use {self.bind} for mDNS: {exc.strerror}") from exc

        # Shielded so that a cancellation cannot drop a zeroconf instance
        # that was created but not yet handed back: its sockets would leak.
        with trio.CancelScope(shield=True):
            try:
                azc: AsyncZeroconf = await _aio(self._open_zeroconf)()
            except (OSError, zeroconf.Error) as exc:
                raise DiscoveryFailed(f"cannot start mDNS on {self.bind}: {exc}") from exc
        browsing: _Browsing | None = None
        try:
            try:
                await _aio(azc.zeroconf.async_wait_for_start)()
            except zeroconf.Error as exc:
                raise DiscoveryFailed(f"mDNS on {self.bind} did not start") from exc
            if not azc.zeroconf.engine.senders:
                raise DiscoveryFailed(
                    f"cannot join the mDNS group on {self.bind} (see zeroconf's log above and docs/discovery.md)"
                )
            published = dict(self._fields)
            announced = await self._register(azc, self._service_info(published))
            log.info("announcing %s at %s", self.node_id, self.address)

            peers = _PeerTracker(self, azc.zeroconf, send)
            wake_send, wake_recv = trio.open_memory_channel[None](1)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_aio(_await), announced)
                with trio.CancelScope(shield=True):
                    browsing = await _aio(self._open_browser)(azc, peers.on_change, _RecordWatch(peers.refreshed))
                self._wake = wake_send
                nursery.start_soon(self._publish_updates, azc, published, wake_recv)
                nursery.start_soon(peers.run, nursery)
                task_status.started()
        finally:
            self._wake = None
            with trio.CancelScope(shield=True):
                with trio.move_on_after(_CLOSE_TIMEOUT) as timeout:
                    try:
                        await _aio(self._close_zeroconf)(azc, browsing)
                    except (OSError, zeroconf.Error):
                        log.exception("closing mDNS on %s failed", self.bind)
                if timeout.cancelled_caught:
                    log.error("closing mDNS on %s took longer than %s s; gave up", self.bind, _CLOSE_TIMEOUT)
            log.info("mDNS discovery for %s on %s stopped", self.node_id, self.bind)

    async def _open_zeroconf(self) -> AsyncZeroconf:
        # A coroutine only because zeroconf attaches to the running asyncio loop.
        return AsyncZeroconf(interfaces=[self.bind], ip_version=IPVersion.V4Only)

    @staticmethod
    async def _open_browser(azc: AsyncZeroconf, on_change: Callable[..., None], watch: _RecordWatch) -> _Browsing:
        azc.zeroconf.async_add_listener(watch, None)
        return _Browsing(AsyncServiceBrowser(azc.zeroconf, SERVICE_TYPE, handlers=[on_change]), watch)

    @staticmethod
    async def _close_zeroconf(azc: AsyncZeroconf, browsing: _Browsing | None) -> None:
        if browsing is not None:
            azc.zeroconf.async_remove_listener(browsing.watch)
            await browsing.browser.async_cancel()
        await azc.async_close()  # unregisters, which sends the goodbyes first

    def _service_info(self, fields: Mapping[str, str]) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            SERVICE_TYPE,
            self.service_name,
            port=self.port,
            properties=dict(fields),
            addresses=[self.bind],
            server=self.host_name,
            host_ttl=self.ttl,
            other_ttl=self.ttl,
        )

    async def _register(self, azc: AsyncZeroconf, info: AsyncServiceInfo) -> Awaitable[None]:
        """Probe for our name and start announcing; returns the announcements' future."""
        try:
            return cast(Awaitable[None], await _aio(azc.async_register_service)(info))
        except zeroconf.NonUniqueNameException as exc:
            raise DiscoveryFailed(
                f"node id {self.node_id!r} is already advertised on this link by another node"
            ) from exc
        except zeroconf.Error as exc:
            raise DiscoveryFailed(f"cannot register {self.service_name}: {exc!r}") from exc

    async def _publish_updates(
        self, azc: AsyncZeroconf, published: dict[str, str], wake: trio.MemoryReceiveChannel[None]
    ) -> None:
        """Re-announce our TXT record when update_fields changed it. Waiting
        for each round of announcements before the next coalesces bursts of
        updates into one."""
        while True:
            fields = dict(self._fields)
            if fields == published:
                await wake.receive()
                continue
            try:
                announced = await _aio(azc.async_update_service)(self._service_info(fields))
            except zeroconf.Error as exc:
                raise DiscoveryFailed(f"cannot update {self.service_name}: {exc!r}") from exc
            published = fields
            log.debug("advertising %s", fields)
            await _aio(_await)(announced)


@dataclasses.dataclass(frozen=True)
class _Browsing:
    browser: AsyncServiceBrowser
    watch: _RecordWatch


class _RecordWatch(zeroconf.RecordUpdateListener):
    """Sees every record zeroconf receives, to catch what its browser misses.

    AsyncServiceBrowser reports Updated only for record data that is not in
    the cache yet. A peer whose TXT goes back to an earlier value (uplink
    score 10, 20, 10) sends data that is still cached, marked to expire
    (RFC 6762 section 10.2), so the browser stays silent. Every refreshed
    TXT, SRV or A record is handed to ``refreshed``, which decides whether it
    differs from what was last resolved.
    """

    def __init__(self, refreshed: Callable[[str, DNSRecord], None]) -> None:
        self._refreshed = refreshed

    def async_update_records(self, zc: zeroconf.Zeroconf, now: float, records: list[zeroconf.RecordUpdate]) -> None:
        for update in records:
            record = update.new
            if update.old is None or record.is_expired(now):
                continue  # new data and goodbyes: the browser reports those
            if isinstance(record, (DNSText, DNSService)):
                self._refreshed(record.name, record)
            elif isinstance(record, DNSAddress) and len(record.address) == 4:  # A, not AAAA
                for service in zc.cache.async_entries_with_server(record.name):
                    self._refreshed(service.name, record)

    def async_update_records_complete(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class _Resolved:
    """A peer's records as last read from the cache: what an event is made of."""

    port: int
    server: str
    txt: bytes
    address: str | None


def _newest(records: list[DNSRecord], now: float) -> DNSRecord | None:
    """The most recently received live record. Ties go to the longer TTL:
    RFC 6762 section 10.2 flushing re-stamps superseded records with the
    time of the packet that superseded them and a TTL of 1 s."""
    live = [r for r in records if not r.is_expired(now)]
    return max(live, key=lambda r: (r.created, r.ttl)) if live else None


def _read_cache(zc: zeroconf.Zeroconf, name: str) -> _Resolved | None:
    """Read a service from the cache, newest records first.

    Not ``ServiceInfo``'s own view: that picks a TXT record by its place in
    the cache, and data that comes back keeps its old place, so after a value
    goes back to an earlier one it reads the superseded record.
    """
    now = zeroconf.current_time_millis()
    srv = _newest(zc.cache.async_all_by_details(name, _TYPE_SRV, _CLASS_IN), now)
    txt = _newest(zc.cache.async_all_by_details(name, _TYPE_TXT, _CLASS_IN), now)
    if not isinstance(srv, DNSService) or not isinstance(txt, DNSText):
        return None
    addresses = [
        r
        for r in zc.cache.async_all_by_details(srv.server, _TYPE_A, _CLASS_IN)
        if isinstance(r, DNSAddress) and len(r.address) == 4 and not r.is_expired(now)
    ]
    newest = max(addresses, key=lambda r: (r.created, r.ttl), default=None)
    address = socket.inet_ntoa(newest.address) if newest is not None else None
    return _Resolved(srv.port, srv.server_key, txt.text, address)


def decode_txt(text: bytes) -> dict[bytes, bytes | None]:
    """Decode TXT record data (RFC 6763 section 6) into key/value pairs.

    Keys are lower-cased (section 6.4: case is ignored), only the first
    occurrence of a key counts, strings starting with "=" are ignored, and a
    key without "=" maps to None (a boolean attribute).

    Raises:
        InvalidFields: a length byte points past the end of the data.
    """
    pairs: dict[bytes, bytes | None] = {}
    offset = 0
    while offset < len(text):
        length = text[offset]
        entry = text[offset + 1 : offset + 1 + length]
        if len(entry) < length:
            raise InvalidFields("TXT record is truncated")
        offset += 1 + length
        key, sep, value = entry.partition(b"=")
        if key:
            pairs.setdefault(key.lower(), value if sep else None)
    return pairs


class _PeerTracker:
    """The browsing half of one :meth:`MdnsDiscovery.serve`: turns zeroconf's
    Added/Updated/Removed into PeerSeen/PeerGone, remembering what it reported
    so that it reports only changes."""

    def __init__(
        self, owner: MdnsDiscovery, zc: zeroconf.Zeroconf, send: trio.MemorySendChannel[DiscoveryEvent]
    ) -> None:
        self._owner = owner
        self._zc = zc
        self._send = send
        self._own_key = owner.service_name.lower()
        self._known: dict[str, PeerSeen] = {}  # key: lower-case service name
        self._resolved: dict[str, _Resolved] = {}  # what each event (or rejection) was made of
        self._rejected: dict[str, str] = {}  # last warning per service name, to warn once
        self._pending: dict[str, tuple[str, ServiceStateChange]] = {}
        self._active: set[str] = set()
        self._changes, self._changes_out = trio.open_memory_channel[tuple[str, ServiceStateChange]](math.inf)

    def on_change(self, zeroconf: Any, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        """AsyncServiceBrowser's handler. Runs inside the asyncio loop, which
        trio-asyncio runs in the trio thread: it only queues."""
        self._changes.send_nowait((name, state_change))

    def refreshed(self, name: str, record: DNSRecord) -> None:
        """A record of ``name`` arrived with data already in the cache; ask
        for a new resolution if it is not the data we last used."""
        key = name.lower()
        resolved = self._resolved.get(key)
        if resolved is None or key == self._own_key:
            return  # not resolved yet: the browser's Added is on its way
        if isinstance(record, DNSText):
            stale = record.text != resolved.txt
        elif isinstance(record, DNSService):
            stale = (record.port, record.server_key) != (resolved.port, resolved.server)
        else:
            stale = (
                isinstance(record, DNSAddress)
                and len(record.address) == 4
                and socket.inet_ntoa(record.address) != resolved.address
            )
        if stale:
            self._changes.send_nowait((name, ServiceStateChange.Updated))

    async def run(self, nursery: trio.Nursery) -> None:
        """Handle queued changes until cancelled, resolving in ``nursery``."""
        async for name, change in self._changes_out:
            key = name.lower()
            if key == self._own_key:
                continue
            # Only the latest change per instance matters: an Added then
            # Updated resolves once, an Added then Removed never.
            self._pending[key] = (name, change)
            if key not in self._active:
                self._active.add(key)
                nursery.start_soon(self._follow, key)

    async def _follow(self, key: str) -> None:
        try:
            while key in self._pending:
                name, change = self._pending.pop(key)
                if change is ServiceStateChange.Removed:
                    await self._removed(key)
                else:
                    await self._changed(key, name)
        finally:
            self._active.discard(key)

    async def _removed(self, key: str) -> None:
        self._rejected.pop(key, None)
        self._resolved.pop(key, None)
        event = self._known.pop(key, None)
        if event is None:
            return
        log.info("peer %s at %s is gone", event.node_id, event.address)
        await self._send.send(PeerGone(event.node_id, event.address))

    async def _changed(self, key: str, name: str) -> None:
        # The request only brings missing records into the cache (asking the
        # peer if need be); what the event says is read from the cache after.
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        try:
            complete = await _aio(info.async_request)(self._zc, self._owner.resolve_timeout * 1000)
        except zeroconf.Error as exc:
            log.info("cannot resolve %s: %r", name, exc)
            return
        resolved = _read_cache(self._zc, name) if complete else None
        if resolved is None:
            log.info(
                "%s did not answer within %s s; waiting for its next announcement", name, self._owner.resolve_timeout
            )
            return
        self._resolved[key] = resolved
        try:
            event = self._event(name, resolved)
        except InvalidFields as exc:
            message = f"{exc}; TXT {resolved.txt!r}"
            if self._rejected.get(key) != message:
                self._rejected[key] = message
                log.warning("peer %s advertises a bad service record, ignored: %s", name, message)
            return
        self._rejected.pop(key, None)
        previous = self._known.get(key)
        if previous == event:
            return
        self._known[key] = event
        if previous is None:
            log.info("discovered peer %s at %s", event.node_id, event.address)
        else:
            log.debug("peer %s now advertises %s", event.node_id, dict(event.fields))
        await self._send.send(event)

    @staticmethod
    def _event(name: str, resolved: _Resolved) -> PeerSeen:
        instance = _instance_of(name)
        if instance is None:
            raise InvalidFields(f"{name!r} is not an instance of {SERVICE_TYPE}")
        if resolved.address is None:
            raise InvalidFields("no IPv4 address")
        if not resolved.port:
            raise InvalidFields("port 0 in the SRV record")
        return peer_seen(instance, resolved.address, resolved.port, decode_txt(resolved.txt))


def check_multicast(bind: str, *, timeout: float = 2.0) -> None:
    """Check that mDNS can work on the interface that holds ``bind``.

    Sends one datagram, with ``IP_MULTICAST_IF`` set to ``bind`` exactly as
    zeroconf does, to the mDNS group on a throw-away port, and waits for it on
    a socket that joined the group on the same interface. On loopback that is
    the whole path between two local nodes; on a real interface it checks only
    this host's half. Nothing is changed on the machine. Blocks for up to
    ``timeout`` seconds: call it before ``trio.run`` or in a thread.

    Raises:
        ValueError: ``bind`` is not a usable IPv4 address.
        DiscoveryFailed: the datagram did not come back, with what to try.
    """
    bind = _check_bind_address(bind)
    token = os.urandom(16)
    group = socket.inet_aton(MDNS_GROUP)
    try:
        with (
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx,
        ):
            rx.bind(("", 0))
            rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group + socket.inet_aton(bind))
            tx.bind((bind, 0))
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(bind))
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, struct.pack("B", 1))
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, struct.pack("B", 1))
            tx.sendto(token, (MDNS_GROUP, rx.getsockname()[1]))
            deadline = time.monotonic() + timeout
            while (remaining := deadline - time.monotonic()) > 0:
                rx.settimeout(remaining)
                try:
                    data, _ = rx.recvfrom(64)
                except TimeoutError:
                    break
                if data == token:
                    return
    except OSError as exc:
        raise DiscoveryFailed(
            f"multicast on {bind} failed: {exc}; mDNS discovery cannot work there "
            "(use static peers, see docs/discovery.md)"
        ) from exc
    raise DiscoveryFailed(
        f"multicast sent from {bind} to {MDNS_GROUP} did not come back within {timeout} s; "
        "is the interface up, and does a firewall drop multicast? (see docs/discovery.md)"
    )
