"""The Discovery seam: which other nodes are out there, and where to reach them.

Discovery is an adapter that knows no meaning (docs/discovery.md): it reports
that a peer appeared at a CoAP endpoint with some advertised fields, that those
fields changed, or that the peer left. Whether the peer is alive, trusted, or
speaks a compatible protocol is decided by membership and security, which
consume the event stream.

The stream is two frozen events, :class:`PeerSeen` and :class:`PeerGone`. A
``PeerSeen`` for a peer already seen is an update (its uplink score moved, say);
a consumer never needs to tell "new" from "changed".

Three implementations share this module's vocabulary:

- :class:`meshnode._mdns.MdnsDiscovery`: multicast DNS service discovery
  (RFC 6762, RFC 6763) with python-zeroconf, for real networks.
- :class:`StaticDiscovery`: a fixed ``HOST:PORT`` list for networks without
  multicast. It never says a peer is gone; liveness is membership's job.
- :class:`MemoryDiscoveryHub`: an in-memory fake for tests and the simulator,
  with an optional neighbour relation so that each simulated node discovers
  exactly its topology neighbours.

The advertised fields are a small TXT-record schema (RFC 6763 section 6),
parsed by one function, :func:`parse_fields`, for every implementation. A
peer's fields that break the schema are the peer's fault: they are logged at
WARNING and ignored, and the implementation keeps serving. Our own fields that
break it are a local mistake and raise :class:`InvalidFields`, a ValueError.

========  =============================================  =========
TXT key   meaning                                        required
========  =============================================  =========
``id``    node id; equals the DNS-SD instance name       yes
``v``     protocol version, decimal, currently ``"1"``   yes
``port``  CoAP port, decimal; equals the SRV port        yes
``up``    uplink score, decimal integer 0..100           no
others    passed through untouched (forward compatible)  no
========  =============================================  =========
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import math
import re
import types
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Protocol

import trio

log = logging.getLogger(__name__)

__all__ = [
    "FIELD_ID",
    "FIELD_PORT",
    "FIELD_UPLINK",
    "FIELD_VERSION",
    "PROTOCOL_VERSION",
    "SERVICE_TYPE",
    "Discovery",
    "DiscoveryError",
    "DiscoveryEvent",
    "DiscoveryFailed",
    "InvalidFields",
    "MemoryAdvert",
    "MemoryDiscovery",
    "MemoryDiscoveryHub",
    "PeerGone",
    "PeerSeen",
    "StaticDiscovery",
    "build_fields",
    "check_node_id",
    "merge_fields",
    "parse_fields",
    "parse_peer_address",
    "peer_seen",
    "split_host_port",
    "uplink_score",
]

SERVICE_TYPE = "_evmesh._udp.local."
"""DNS-SD service type (RFC 6763 section 7): the CoAP endpoint of a mesh node."""

PROTOCOL_VERSION = "1"

FIELD_ID = "id"
FIELD_VERSION = "v"
FIELD_PORT = "port"
FIELD_UPLINK = "up"

_MAX_LABEL_BYTES = 63  # RFC 6763 section 4.1.1: an instance name is one DNS label
_MAX_TXT_ENTRY_BYTES = 255  # RFC 6763 section 6.1: one length byte per string
_DECIMAL = re.compile(r"0|[1-9][0-9]*")
_KEY = re.compile(r"[\x20-\x3c\x3e-\x7e]+")  # RFC 6763 section 6.4: printable ASCII except "="
_HOSTNAME = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)


# --------------------------------------------------------------------------
# Errors


class DiscoveryError(Exception):
    """Base of the errors this seam raises."""


class InvalidFields(DiscoveryError, ValueError):
    """A set of advertised fields breaks the TXT schema.

    Raised to the caller when the fields are our own (a local mistake); caught,
    logged at WARNING and dropped when they came from a peer.
    """


class DiscoveryFailed(DiscoveryError):
    """Our own discovery could not run: a socket could not be opened, the
    multicast group could not be joined, or another node already advertises
    our node id. Never raised because of a peer's bad input."""


# --------------------------------------------------------------------------
# Events


def _frozen_mapping(fields: Mapping[str, str]) -> Mapping[str, str]:
    return types.MappingProxyType(dict(fields))


@dataclasses.dataclass(frozen=True)
class PeerSeen:
    """A peer is advertising itself, or changed what it advertises.

    Attributes:
        node_id: the peer's node id, or None when the source cannot know it
            (static peers: the node learns the id over CoAP).
        address: the peer's CoAP endpoint, "host:port" ("[v6]:port" for IPv6).
        fields: the advertised fields (see the module docstring); read-only.
    """

    node_id: str | None
    address: str
    fields: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # Events are handed to several consumers; a shared mutable dict would
        # let one of them change what the others see.
        object.__setattr__(self, "fields", _frozen_mapping(self.fields))

    __hash__ = None  # type: ignore[assignment]  # fields is a mapping: not hashable


@dataclasses.dataclass(frozen=True)
class PeerGone:
    """A peer said goodbye or its advertisement expired."""

    node_id: str | None
    address: str


DiscoveryEvent = PeerSeen | PeerGone


class Discovery(Protocol):
    """What the node needs from a discovery mechanism."""

    async def serve(
        self,
        send: trio.MemorySendChannel[DiscoveryEvent],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Announce this node and send events about other nodes (never about
        this one) until cancelled. ``task_status.started()`` is called once
        this node is announced and browsing has begun."""
        ...

    def update_fields(self, fields: Mapping[str, str]) -> None:
        """Change our advertised fields (merged over the current ones); safe
        to call from trio at any time, serving or not.

        Raises:
            InvalidFields: the result would break the TXT schema, or tries to
                change ``id`` or ``port``.
        """
        ...


# --------------------------------------------------------------------------
# Addresses


def split_host_port(address: str) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port" into ``(host, port)``.

    The host is an IPv4 literal, an IPv6 literal in brackets, or a DNS host
    name; the port is 1..65535.

    Raises:
        ValueError: anything else.
    """
    if address.startswith("["):
        host, sep, rest = address[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"expected [v6]:port, got {address!r}")
        port_text = rest[1:]
        try:
            if ipaddress.ip_address(host).version != 6:
                raise ValueError
        except ValueError:
            raise ValueError(f"expected an IPv6 literal in brackets, got {address!r}") from None
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"expected host:port, got {address!r}")
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"bad host in {address!r}")
    if not _DECIMAL.fullmatch(port_text) or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in {address!r}: expected 1..65535")
    return host, int(port_text)


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_peer_address(text: str) -> str:
    """Validate one ``--peer`` value and return it as "host:port".

    Raises:
        ValueError: with a message meant for the command line.
    """
    try:
        host, port = split_host_port(text.strip())
    except ValueError as exc:
        raise ValueError(f"--peer expects HOST:PORT, got {text!r} ({exc})") from None
    return _format_address(host, port)


# --------------------------------------------------------------------------
# Fields


def check_node_id(node_id: str) -> str:
    """Return ``node_id`` if it can serve as a DNS-SD instance name.

    RFC 6763 section 4.1.1 allows any UTF-8 up to 63 bytes in an instance
    name; we also refuse control characters, which would make logs and the
    TXT record ambiguous.

    Raises:
        InvalidFields: empty, too long, or not printable.
    """
    if not isinstance(node_id, str) or not node_id:
        raise InvalidFields(f"node id must be a non-empty string, got {node_id!r}")
    if len(node_id.encode("utf-8")) > _MAX_LABEL_BYTES:
        raise InvalidFields(f"node id {node_id!r} is longer than {_MAX_LABEL_BYTES} bytes")
    if not node_id.isprintable():
        raise InvalidFields(f"node id {node_id!r} has control characters")
    return node_id


def _decimal(fields: Mapping[str, str], key: str, low: int, high: int) -> int:
    text = fields[key]
    if not _DECIMAL.fullmatch(text) or not low <= int(text) <= high:
        raise InvalidFields(f"field {key}={text!r}: expected a decimal in {low}..{high}")
    return int(text)


def _text(value: str | bytes | None, what: str) -> str:
    if value is None:
        return ""  # RFC 6763 section 6.4: a key with no "=" is a boolean flag
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidFields(f"{what} is not UTF-8: {value!r}") from None
    if isinstance(value, str):
        return value
    raise InvalidFields(f"{what} must be a string, got {type(value).__name__}")


def _check_entries(raw: Mapping[str, str] | Mapping[bytes, bytes | None]) -> dict[str, str]:
    """The part of the schema that holds for any TXT record: text keys and
    values that fit in one TXT string each (RFC 6763 sections 6.1 and 6.4),
    keys lower-cased."""
    if not isinstance(raw, Mapping):
        raise InvalidFields(f"fields must be a mapping, got {type(raw).__name__}")
    fields: dict[str, str] = {}
    for raw_key, raw_value in raw.items():
        key = _text(raw_key, "a field name")
        if not _KEY.fullmatch(key):
            raise InvalidFields(f"field name {key!r}: expected printable ASCII without '='")
        value = _text(raw_value, f"field {key}")
        if len(key.encode()) + 1 + len(value.encode()) > _MAX_TXT_ENTRY_BYTES:
            raise InvalidFields(f"field {key} is longer than a TXT string ({_MAX_TXT_ENTRY_BYTES} bytes)")
        # Section 6.4: keys are compared without case, and only the first
        # occurrence of a key counts.
        fields.setdefault(key.lower(), value)
    return fields


def parse_fields(raw: Mapping[str, str] | Mapping[bytes, bytes | None]) -> dict[str, str]:
    """Check a set of TXT fields against the schema and return them as text.

    Accepts what python-zeroconf hands out (bytes keys, bytes or None values)
    as well as plain strings. Keys are lower-cased. Unknown keys are kept, so
    that a newer node can advertise more without older ones rejecting it.

    Raises:
        InvalidFields: a required field is missing or malformed, a key or
            value is not text, or an entry is longer than a TXT string can be.
    """
    fields = _check_entries(raw)
    for key in (FIELD_ID, FIELD_VERSION, FIELD_PORT):
        if key not in fields:
            raise InvalidFields(f"required field {key!r} is missing")
    check_node_id(fields[FIELD_ID])
    _decimal(fields, FIELD_VERSION, 1, 999_999)
    _decimal(fields, FIELD_PORT, 1, 65535)
    if FIELD_UPLINK in fields:
        _decimal(fields, FIELD_UPLINK, 0, 100)
    return fields


def build_fields(
    node_id: str,
    port: int,
    *,
    uplink: int | None = None,
    version: str = PROTOCOL_VERSION,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The fields a node advertises, checked against the schema.

    Raises:
        InvalidFields: if any value breaks the schema.
    """
    fields = dict(extra or {})
    fields.update({FIELD_ID: node_id, FIELD_VERSION: version, FIELD_PORT: str(port)})
    if uplink is not None:
        fields[FIELD_UPLINK] = str(uplink)
    return parse_fields(fields)


def merge_fields(current: Mapping[str, str], update: Mapping[str, str]) -> dict[str, str]:
    """Apply an ``update_fields`` call: ``update`` wins key by key.

    ``id`` and ``port`` name the advertisement itself (instance name, SRV
    port), so an update may repeat them but not change them; a node that
    wants another id or port starts a new discovery.

    Raises:
        InvalidFields: the result breaks the schema, or ``id``/``port`` change.
    """
    update = _check_entries(update)
    for key in (FIELD_ID, FIELD_PORT):
        if key in update and key in current and update[key] != current[key]:
            raise InvalidFields(f"field {key} cannot change while advertising ({current[key]!r} -> {update[key]!r})")
    merged = dict(current)
    merged.update(update)
    return parse_fields(merged)


def uplink_score(fields: Mapping[str, str]) -> int | None:
    """The advertised uplink score, or None when the peer does not advertise one.
    Assumes ``fields`` came through :func:`parse_fields`."""
    text = fields.get(FIELD_UPLINK)
    return int(text) if text is not None else None


def peer_seen(instance: str, host: str, port: int, raw: Mapping[str, str] | Mapping[bytes, bytes | None]) -> PeerSeen:
    """Turn one resolved advertisement into an event, checking that it agrees
    with itself: the TXT ``id`` must be the instance name and the TXT ``port``
    the SRV port. Shared by the real and the fake implementation so that
    both accept and refuse the same peers.

    Raises:
        InvalidFields: the advertisement is malformed or inconsistent.
    """
    fields = parse_fields(raw)
    if fields[FIELD_ID].casefold() != instance.casefold():  # DNS names compare without case
        raise InvalidFields(f"field id={fields[FIELD_ID]!r} differs from the instance name {instance!r}")
    if int(fields[FIELD_PORT]) != port:
        raise InvalidFields(f"field port={fields[FIELD_PORT]} differs from the service port {port}")
    return PeerSeen(fields[FIELD_ID], _format_address(host, port), fields)


def _own_fields(node_id: str, port: int, fields: Mapping[str, str]) -> dict[str, str]:
    """Our initial fields: ``fields`` with ``id``, ``v`` and ``port`` filled in."""
    check_node_id(node_id)
    base = {FIELD_ID: node_id, FIELD_VERSION: PROTOCOL_VERSION, FIELD_PORT: str(port)}
    return merge_fields(base, fields)


# --------------------------------------------------------------------------
# Static peers


class StaticDiscovery:
    """A fixed list of peers, for networks where multicast does not work.

    Each peer is reported once, as ``PeerSeen(None, address, {})``, when
    serving starts; the node learns ids and fields over CoAP. No ``PeerGone``
    is ever sent: whether a static peer is alive is membership's call, and it
    may come back at any time at the same address. Nothing is announced, so
    :meth:`update_fields` only checks and keeps the fields.

    Args:
        peers: "host:port" strings, e.g. from repeated ``--peer`` options.
            Duplicates are reported once.

    Raises:
        ValueError: a peer is not HOST:PORT.
    """

    def __init__(self, peers: Sequence[str]) -> None:
        if isinstance(peers, str):
            raise ValueError(f"--peer expects HOST:PORT, got a single string {peers!r} where a list was expected")
        addresses = [parse_peer_address(peer) for peer in peers]
        self.peers: tuple[str, ...] = tuple(dict.fromkeys(addresses))
        self._fields: dict[str, str] = {}

    async def serve(
        self,
        send: trio.MemorySendChannel[DiscoveryEvent],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()
        for address in self.peers:
            log.debug("static peer %s", address)
            await send.send(PeerSeen(None, address, {}))
        await trio.sleep_forever()

    def update_fields(self, fields: Mapping[str, str]) -> None:
        # There is nobody to tell, but a bad value is still our bug: report it
        # here rather than only when the node switches to mDNS.
        candidate = dict(self._fields)
        candidate.update(_check_entries(fields))
        if FIELD_UPLINK in candidate:
            _decimal(candidate, FIELD_UPLINK, 0, 100)
        self._fields = candidate


# --------------------------------------------------------------------------
# In-memory fake

Neighbours = Callable[[str, str], bool] | Mapping[str, Collection[str]]
"""Who may discover whom: ``neighbours(observer_id, peer_id) -> bool``, or an
adjacency mapping ``{observer_id: peer_ids}``."""


def _neighbour_predicate(neighbours: Neighbours | None) -> Callable[[str, str], bool]:
    if neighbours is None:
        return lambda observer, peer: True
    if isinstance(neighbours, Mapping):
        adjacency = {node: frozenset(peers) for node, peers in neighbours.items()}
        return lambda observer, peer: peer in adjacency.get(observer, frozenset())
    return neighbours


@dataclasses.dataclass
class _Advert:
    """One advertisement on the hub: a serving node or a raw publication."""

    instance: str
    host: str
    port: int
    raw: dict[str, str]
    event: PeerSeen | None  # the last version that parsed; None if none has


class MemoryDiscoveryHub:
    """The shared medium of in-memory discoveries: the fake of an mDNS link.

    Nodes that are serving see each other, restricted by ``neighbours``. All
    decisions happen synchronously in the hub when something changes (a node
    starts or stops serving, fields change, the neighbour relation changes),
    so under a ``MockClock`` the events are queued at exactly the virtual time
    of the change; each node's own task then delivers them in order.

    Peers' fields go through :func:`peer_seen`, the same check the mDNS
    browser applies, so a malformed advertisement is ignored here too. Only
    :meth:`advertise` can publish one; nodes validate their own fields.

    Args:
        neighbours: who may discover whom; None means everyone sees everyone.
    """

    def __init__(self, neighbours: Neighbours | None = None) -> None:
        self._visible = _neighbour_predicate(neighbours)
        self._adverts: dict[str, _Advert] = {}  # key: casefolded instance
        self._observers: dict[str, MemoryDiscovery] = {}  # key: casefolded node id

    def discovery(self, node_id: str, address: str, fields: Mapping[str, str] | None = None) -> MemoryDiscovery:
        """A discovery for one node at ``address`` ("host:port").

        ``fields`` get ``id``, ``v`` and ``port`` (from the address) filled in.

        Raises:
            ValueError: bad address or fields.
        """
        host, port = split_host_port(address)
        return MemoryDiscovery(self, node_id, host, port, _own_fields(node_id, port, fields or {}))

    def set_neighbours(self, neighbours: Neighbours | None) -> None:
        """Replace the neighbour relation and send the resulting PeerSeen and
        PeerGone events. Call it again with the same callable after the
        relation it consults has changed."""
        self._visible = _neighbour_predicate(neighbours)
        for observer in list(self._observers.values()):
            for advert in list(self._adverts.values()):
                self._evaluate(observer, advert)

    @contextmanager
    def advertise(self, instance: str, address: str, fields: Mapping[str, str]) -> Iterator[MemoryAdvert]:
        """Publish an advertisement that is not a node, unchecked, for the
        time of the ``with`` block: the fake of registering a raw zeroconf
        ServiceInfo. Tests use it to play a peer with malformed fields.

        Raises:
            DiscoveryFailed: the instance name is already advertised.
            ValueError: bad address.
        """
        host, port = split_host_port(address)
        advert = MemoryAdvert(self, self._publish(instance, host, port, dict(fields)))
        try:
            yield advert
        finally:
            advert.withdraw()

    # Everything below runs synchronously on a change; no checkpoints.

    def _publish(self, instance: str, host: str, port: int, raw: dict[str, str]) -> _Advert:
        key = instance.casefold()
        if key in self._adverts:
            raise DiscoveryFailed(f"instance {instance!r} is already advertised on this hub")
        advert = _Advert(instance, host, port, {}, None)
        self._adverts[key] = advert
        self._republish(advert, raw)
        return advert

    def _republish(self, advert: _Advert, raw: dict[str, str]) -> None:
        advert.raw = raw
        try:
            advert.event = peer_seen(advert.instance, advert.host, advert.port, raw)
        except InvalidFields as exc:
            # Keep the last good version, as an mDNS browser keeps what it
            # resolved before a bad update.
            log.warning("peer %r advertises bad fields, ignored: %s", advert.instance, exc)
        for observer in list(self._observers.values()):
            self._evaluate(observer, advert)

    def _withdraw(self, advert: _Advert) -> None:
        key = advert.instance.casefold()
        if self._adverts.get(key) is not advert:
            return
        del self._adverts[key]
        for observer in list(self._observers.values()):
            observer._deliver_gone(key)

    def _join(self, node: MemoryDiscovery) -> None:
        key = node.node_id.casefold()
        advert = self._publish(node.node_id, node.host, node.port, dict(node.fields))
        node._advert = advert
        self._observers[key] = node
        for other in sorted(self._adverts.values(), key=lambda a: a.instance):
            self._evaluate(node, other)

    def _leave(self, node: MemoryDiscovery) -> None:
        key = node.node_id.casefold()
        if self._observers.get(key) is node:
            del self._observers[key]
        if node._advert is not None:
            self._withdraw(node._advert)
            node._advert = None

    def _evaluate(self, observer: MemoryDiscovery, advert: _Advert) -> None:
        """Bring one observer's view of one advertisement up to date."""
        key = advert.instance.casefold()
        if key == observer.node_id.casefold():
            return
        if advert.event is not None and self._visible(observer.node_id, advert.instance):
            observer._deliver_seen(key, advert.event)
        else:
            observer._deliver_gone(key)


class MemoryAdvert:
    """Handle on a raw advertisement made with :meth:`MemoryDiscoveryHub.advertise`."""

    def __init__(self, hub: MemoryDiscoveryHub, advert: _Advert) -> None:
        self._hub = hub
        self._advert: _Advert | None = advert

    def update(self, fields: Mapping[str, str]) -> None:
        """Replace the advertised fields (unchecked)."""
        if self._advert is None:
            raise RuntimeError("advertisement already withdrawn")
        self._hub._republish(self._advert, dict(fields))

    def withdraw(self) -> None:
        """Stop advertising; observers that saw it get PeerGone."""
        if self._advert is not None:
            self._hub._withdraw(self._advert)
            self._advert = None


class MemoryDiscovery:
    """One node's discovery on a :class:`MemoryDiscoveryHub`; see there.

    Events are queued without bound and delivered by :meth:`serve` in order,
    so a change never blocks the code that made it (a PeerGone is queued even
    while the observer is busy), the way datagrams queue in a socket buffer.
    """

    def __init__(self, hub: MemoryDiscoveryHub, node_id: str, host: str, port: int, fields: dict[str, str]) -> None:
        self._hub = hub
        self.node_id = node_id
        self.host = host
        self.port = port
        self.address = _format_address(host, port)
        self._fields = fields
        self._advert: _Advert | None = None
        self._view: dict[str, PeerSeen] = {}
        self._outbox: trio.MemorySendChannel[DiscoveryEvent] | None = None

    @property
    def fields(self) -> Mapping[str, str]:
        """What this node advertises (read-only)."""
        return types.MappingProxyType(self._fields)

    async def serve(
        self,
        send: trio.MemorySendChannel[DiscoveryEvent],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        if self._outbox is not None:
            raise RuntimeError(f"discovery for {self.node_id!r} is already serving")
        outbox, inbox = trio.open_memory_channel[DiscoveryEvent](math.inf)
        self._outbox = outbox
        try:
            async with inbox:
                try:
                    self._hub._join(self)
                    log.debug("memory discovery %s serving at %s", self.node_id, self.address)
                    task_status.started()
                    async for event in inbox:
                        await send.send(event)
                finally:
                    # Leave while the inbox is still open: a node leaving at the same
                    # moment sends us PeerGone, which must not hit a closed channel.
                    self._hub._leave(self)
        finally:
            self._view.clear()
            self._outbox = None
            outbox.close()

    def update_fields(self, fields: Mapping[str, str]) -> None:
        self._fields = merge_fields(self._fields, fields)
        if self._advert is not None:
            self._hub._republish(self._advert, dict(self._fields))

    def _deliver_seen(self, key: str, event: PeerSeen) -> None:
        if self._view.get(key) == event:
            return
        if key not in self._view:
            log.info("%s discovered %s at %s", self.node_id, event.node_id, event.address)
        self._view[key] = event
        assert self._outbox is not None
        self._outbox.send_nowait(event)

    def _deliver_gone(self, key: str) -> None:
        event = self._view.pop(key, None)
        if event is None:
            return
        log.info("%s lost %s at %s", self.node_id, event.node_id, event.address)
        assert self._outbox is not None
        self._outbox.send_nowait(PeerGone(event.node_id, event.address))
