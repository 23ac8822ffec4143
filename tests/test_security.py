"""Tests of meshnode._security: sites, enrolment, certificates, revocations,
sealed messages over real transports, network-key rotation and offline
authorisation.

Every refusal is provoked with real bad input travelling over a real
SealedTransport pair (in-memory network; one round trip over CoAP on
loopback), and each checks that the handler was not called and that the
refusal was counted under its reason.
"""

from __future__ import annotations

import dataclasses
import socket
import stat
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import nacl.secret
import nacl.signing
import nacl.utils
import pytest
import trio
import trio_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crdt import EventSigner, Keyring, verify_event
from meshnode._coap import open_coap_transport
from meshnode._security import (
    _CTX_SEALED,
    DEFAULT_MAX_SKEW,
    MIN_SEALED,
    SEALED_MAGIC,
    BadCertificate,
    BadEnvelope,
    BadSignature,
    BadSiteEntry,
    Certificate,
    CertificateExpired,
    ClockSkew,
    Identity,
    Limits,
    LocalSecurityError,
    Misaddressed,
    NetworkKey,
    RemoteSecurityError,
    Replayed,
    ReplayWindow,
    ResponseRejected,
    Revocations,
    RoleNotAllowed,
    SealedTransport,
    Sealer,
    Site,
    TokenExpired,
    TokenInvalid,
    WrongKind,
    WrongResource,
    _canonical,
    _sign,
    authenticated_peer,
    authorize,
    create_site,
    enroll,
    enrolled_certificates,
    entry_key,
    grant_network_key,
    issue_certificate,
    issue_driver_token,
    load_or_create_node_key,
    load_or_create_store_key,
    load_site,
    network_key_id,
    open_network_key_grant,
    revoke,
    signed_token_list_entry,
    site_entries,
    site_revoke,
    site_rotate_network_key,
    trusted_device_keys,
    verify_driver_token,
    verify_token_list_entry,
)
from meshnode._transport import (
    BadRequest,
    Forbidden,
    Handler,
    MemoryNetwork,
    MemoryTransport,
    RemoteRefused,
    Unauthorized,
)

T0 = 1_800_000_000.0
"""A fixed wall-clock time for the tests (2027-01-15)."""

DAY = 86400.0


# --------------------------------------------------------------------------
# Helpers


def memory_site(name: str = "fieldday") -> Site:
    """A site held in memory only (no files): for tests that need many keys fast."""
    key = nacl.signing.SigningKey.generate()
    return Site(name, key, bytes(key.verify_key), nacl.utils.random(32), T0, None)


def memory_identity(
    site: Site,
    node_id: str,
    *,
    roles: tuple[str, ...] = ("charger",),
    issued: float = T0,
    valid_for: float = 365 * DAY,
    network_key: bytes | None = None,
) -> Identity:
    key = nacl.signing.SigningKey.generate()
    cert = issue_certificate(site, node_id, bytes(key.verify_key), roles=roles, valid_for=valid_for, now=issued)
    return Identity(
        node_id,
        key,
        Certificate.decode(cert, site.public_key),
        cert,
        site.public_key,
        network_key if network_key is not None else site.network_key,
        site.name,
    )


def sealer_for(identity: Identity, **kwargs: object) -> Sealer:
    return Sealer(identity, identity.site_public_key, identity.network_key, **kwargs)  # type: ignore[arg-type]


class Clock:
    """An injected wall clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class TapNetwork(MemoryNetwork):
    """A MemoryNetwork that records every payload on the wire (its ``carry``
    extension point), so tests can capture sealed bytes and replay them."""

    def __init__(self) -> None:
        super().__init__()
        self.wire: list[tuple[str, str, str, bytes, bool]] = []

    async def carry(self, src: str, dst: str, resource: str, payload: bytes, *, response: bool) -> bool:
        self.wire.append((src, dst, resource, payload, response))
        return True

    def requests(self, resource: str) -> list[bytes]:
        return [p for _, _, r, p, resp in self.wire if r == resource and not resp]

    def responses(self, resource: str) -> list[bytes]:
        return [p for _, _, r, p, resp in self.wire if r == resource and resp]


@dataclasses.dataclass
class Server:
    """A sealed node with two recording routes."""

    transport: SealedTransport
    inner: MemoryTransport
    calls: list[tuple[str, bytes, str | None]]


ADDR = {name: f"10.0.0.{i}:5683" for i, name in enumerate("abcdefghtuvx", start=1)}


@asynccontextmanager
async def sealed_mesh(
    identities: dict[str, Identity | None],
    *,
    clocks: dict[str, Clock] | None = None,
    sealers: dict[str, Sealer] | None = None,
) -> AsyncIterator[tuple[TapNetwork, dict[str, Server]]]:
    """One transport per name; sealed if it has an identity, plain if None.
    Every sealed one routes POST /m/sync, POST /m/digest and GET /m/hello."""
    net = TapNetwork()
    clocks = clocks or {}
    sealers = sealers or {}
    async with AsyncExitStack() as stack:
        servers: dict[str, Server] = {}
        for name, identity in identities.items():
            inner = await stack.enter_async_context(net.transport(ADDR[name]))
            calls: list[tuple[str, bytes, str | None]] = []
            if identity is None:
                servers[name] = Server(inner, inner, calls)  # type: ignore[arg-type]
                continue
            sealer = sealers.get(name) or sealer_for(identity)
            transport = SealedTransport(inner, sealer, clock=clocks.get(name, Clock()))

            def recorder(resource: str, calls: list[tuple[str, bytes, str | None]] = calls) -> Handler:
                async def handler(payload: bytes, remote: str) -> bytes:
                    calls.append((resource, payload, authenticated_peer.get()))
                    return b"ok:" + payload

                return handler

            transport.route("/m/sync", recorder("/m/sync"))
            transport.route("/m/digest", recorder("/m/digest"))

            async def hello(payload: bytes, remote: str, name: str = name) -> bytes:
                return f"hello from {name}".encode()

            transport.route("/m/hello", hello, method="GET")
            servers[name] = Server(transport, inner, calls)
        yield net, servers


async def refused(inner: MemoryTransport, server: Server, payload: bytes, resource: str = "/m/sync") -> RemoteRefused:
    """Send raw bytes with a plain inner transport; return the refusal."""
    with pytest.raises(RemoteRefused) as info:
        await inner.request(server.transport.address, resource, payload)
    return info.value


def free_port(hosts: list[str]) -> int:
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as first:
            first.bind((hosts[0], 0))
            port = int(first.getsockname()[1])
            try:
                for host in hosts[1:]:
                    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
                        other.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no common free UDP port")


@pytest.fixture
def site() -> Site:
    return memory_site()


@pytest.fixture
def pair(site: Site) -> dict[str, Identity | None]:
    return {"a": memory_identity(site, "a"), "b": memory_identity(site, "b")}


# --------------------------------------------------------------------------
# Sealed traffic over a real SealedTransport pair


async def test_round_trip_is_sealed_and_names_the_sender(pair: dict[str, Identity | None]) -> None:
    async with sealed_mesh(pair) as (net, s):
        secret = b"session 7f3a id_token=TOKEN-1234 meter_wh=48211"
        assert await s["b"].transport.request(ADDR["a"], "/m/sync", secret) == b"ok:" + secret
        assert s["a"].calls == [("/m/sync", secret, "b")]
        # Nothing readable on the wire, either way.
        for _, _, _, payload, _ in net.wire:
            assert b"TOKEN-1234" not in payload and b"7f3a" not in payload and b"48211" not in payload
        # Outside the handler nobody is authenticated.
        assert authenticated_peer.get() is None
        assert s["a"].transport.refused == {} and s["b"].transport.bad_responses == {}


async def test_replayed_request_is_refused(pair: dict[str, Identity | None]) -> None:
    async with sealed_mesh(pair) as (net, s):
        await s["b"].transport.request(ADDR["a"], "/m/sync", b"change 1")
        captured = net.requests("/m/sync")[-1]
        exc = await refused(s["b"].inner, s["a"], captured)
        assert exc.code == "4.01"
        assert len(s["a"].calls) == 1
        assert s["a"].transport.refused == {"replayed": 1}
        # The sender itself carries on: its next request has a new counter.
        await s["b"].transport.request(ADDR["a"], "/m/sync", b"change 2")
        assert len(s["a"].calls) == 2


async def test_reordered_requests_inside_the_window_pass_and_too_old_ones_do_not(
    pair: dict[str, Identity | None],
) -> None:
    a, b = pair["a"], pair["b"]
    assert a is not None and b is not None
    sb = sealer_for(b)
    held = [sb.seal_request("/m/sync", b"%d" % i, T0)[0] for i in range(70)]
    async with sealed_mesh(pair) as (net, s):
        # Deliver the newest first, then one 10 behind (reordered: fine), then one 69 behind (too old).
        for payload in (held[69], held[59]):
            await s["b"].inner.request(ADDR["a"], "/m/sync", payload)
        exc = await refused(s["b"].inner, s["a"], held[0])
        assert exc.code == "4.01"
        assert [c[1] for c in s["a"].calls] == [b"69", b"59"]
        assert s["a"].transport.refused == {"too_old": 1}


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda p: p[:20] + bytes([p[20] ^ 1]) + p[21:], "bad_mac"),  # in the nonce
        (lambda p: p[:-1] + bytes([p[-1] ^ 0x80]), "bad_mac"),  # in the ciphertext
        (lambda p: p[:3] + bytes([p[3] ^ 1]) + p[4:], "unknown_network_key"),  # in the key id
        (lambda p: b"X" + p[1:], "not_sealed"),  # in the magic
    ],
    ids=["nonce", "ciphertext", "key-id", "magic"],
)
async def test_tampered_byte_is_refused(
    pair: dict[str, Identity | None], mutate: Callable[[bytes], bytes], reason: str
) -> None:
    async with sealed_mesh(pair) as (net, s):
        await s["b"].transport.request(ADDR["a"], "/m/sync", b"x" * 100)
        captured = net.requests("/m/sync")[-1]
        exc = await refused(s["b"].inner, s["a"], mutate(captured))
        assert exc.code == "4.01"
        assert len(s["a"].calls) == 1
        assert s["a"].transport.refused == {reason: 1}


@pytest.mark.parametrize("keep", [MIN_SEALED + 40, MIN_SEALED - 1, 2], ids=["short-box", "no-box", "magic-only"])
async def test_truncated_message_is_refused(pair: dict[str, Identity | None], keep: int) -> None:
    async with sealed_mesh(pair) as (net, s):
        sealed, _ = sealer_for(pair["b"]).seal_request("/m/sync", b"x" * 100, T0)  # type: ignore[arg-type]
        exc = await refused(s["b"].inner, s["a"], sealed[:keep])
        assert exc.code == "4.01"
        assert s["a"].calls == []
        assert s["a"].transport.refused == {"bad_mac" if keep > MIN_SEALED else "truncated": 1}


async def test_wrong_network_key_is_refused(site: Site, pair: dict[str, Identity | None]) -> None:
    outsider = memory_identity(site, "c", network_key=nacl.utils.random(32))
    async with sealed_mesh({**pair, "c": outsider}) as (net, s):
        with pytest.raises(RemoteRefused) as info:
            await s["c"].transport.request(ADDR["a"], "/m/sync", b"let me in")
        assert info.value.code == "4.01"
        assert s["a"].calls == []
        assert s["a"].transport.refused == {"unknown_network_key": 1}


async def test_certificate_from_another_site_is_refused(site: Site, pair: dict[str, Identity | None]) -> None:
    # The worst case: the intruder knows our network key (a stolen charger's),
    # but its certificate was signed by another site's key.
    other = memory_site("fieldday")
    intruder = memory_identity(other, "a2", network_key=site.network_key)
    async with sealed_mesh({**pair, "x": intruder}) as (net, s):
        with pytest.raises(RemoteRefused) as info:
            await s["x"].transport.request(ADDR["a"], "/m/sync", b"forged")
        assert info.value.code == "4.01"
        assert s["a"].calls == []
        assert s["a"].transport.refused == {"unknown_certificate": 1}


async def test_stolen_certificate_without_its_key_is_refused(pair: dict[str, Identity | None]) -> None:
    b = pair["b"]
    assert b is not None
    impostor = dataclasses.replace(b, signing_key=nacl.signing.SigningKey.generate())
    async with sealed_mesh({"a": pair["a"], "x": impostor}) as (net, s):
        with pytest.raises(RemoteRefused) as info:
            await s["x"].transport.request(ADDR["a"], "/m/sync", b"I am b")
        assert info.value.code == "4.01"
        assert s["a"].calls == []
        assert s["a"].transport.refused == {"bad_signature": 1}


async def test_expired_certificate_is_refused(site: Site, pair: dict[str, Identity | None]) -> None:
    old = memory_identity(site, "c", issued=T0 - 2 * DAY, valid_for=DAY)
    async with sealed_mesh({**pair, "c": old}) as (net, s):
        with pytest.raises(RemoteRefused) as info:
            await s["c"].transport.request(ADDR["a"], "/m/sync", b"x")
        assert info.value.code == "4.03"
        assert s["a"].calls == []
        assert s["a"].transport.refused == {"expired": 1}


@pytest.mark.parametrize("by", ["node_id", "serial"])
async def test_revoked_node_is_cut_off_once_the_revocation_arrives(
    site: Site, pair: dict[str, Identity | None], by: str
) -> None:
    b = pair["b"]
    assert b is not None
    async with sealed_mesh(pair) as (net, s):
        await s["b"].transport.request(ADDR["a"], "/m/sync", b"before")
        entry = revoke(site, now=T0 + 1, **({"node_id": "b"} if by == "node_id" else {"serial": b.certificate.serial}))
        # What the node does when the site-config document brings the entry.
        s["a"].transport.sealer.revocations = Revocations.from_entries({entry_key(entry): entry}, site.public_key)
        with pytest.raises(RemoteRefused) as info:
            await s["b"].transport.request(ADDR["a"], "/m/sync", b"after")
        assert info.value.code == "4.03"
        assert [c[1] for c in s["a"].calls] == [b"before"]
        assert s["a"].transport.refused == {"revoked": 1}
        # The revoked node cannot read a's requests either once b has the list:
        # and b's answers to a are refused by a the other way round.
        with pytest.raises(ResponseRejected) as rejected:
            await s["a"].transport.request(ADDR["b"], "/m/sync", b"to a revoked node")
        assert rejected.value.reason == "revoked"
        assert s["a"].transport.bad_responses == {"revoked": 1}


async def test_resource_swap_is_refused(pair: dict[str, Identity | None]) -> None:
    async with sealed_mesh(pair) as (net, s):
        # Sealed for /m/digest, never delivered there: replayed against /m/sync.
        sealed, _ = s["b"].transport.sealer.seal_request("/m/digest", b"digest", T0)
        exc = await refused(s["b"].inner, s["a"], sealed, "/m/sync")
        assert exc.code == "4.03"
        assert s["a"].calls == []
        assert s["a"].transport.refused == {"wrong_resource": 1}


async def test_response_passed_off_as_request_is_refused(pair: dict[str, Identity | None]) -> None:
    async with sealed_mesh(pair) as (net, s):
        await s["a"].transport.request(ADDR["b"], "/m/sync", b"hi")
        response = net.responses("/m/sync")[-1]  # sealed by b
        exc = await refused(s["b"].inner, s["a"], response)
        assert exc.code == "4.03"
        assert s["a"].calls == []
        assert s["a"].transport.refused == {"wrong_kind": 1}


@pytest.mark.parametrize("offset", [+300.0, -300.0])
async def test_timestamp_skew_is_refused(pair: dict[str, Identity | None], offset: float) -> None:
    async with sealed_mesh(pair, clocks={"b": Clock(T0 + offset)}) as (net, s):
        with pytest.raises(RemoteRefused) as info:
            await s["b"].transport.request(ADDR["a"], "/m/sync", b"x")
        assert info.value.code == "4.03"
        assert "clock" in info.value.message
        assert s["a"].calls == []
        assert s["a"].transport.refused == {"skew": 1}


async def test_skew_within_the_limit_is_accepted(pair: dict[str, Identity | None]) -> None:
    async with sealed_mesh(pair, clocks={"b": Clock(T0 + 100)}) as (net, s):
        assert await s["b"].transport.request(ADDR["a"], "/m/sync", b"x") == b"ok:x"


async def test_request_from_before_a_restart_is_refused(pair: dict[str, Identity | None]) -> None:
    # b's request was captured 60 s before a restarted: a's replay windows are gone,
    # but the request predates a's start.
    old, _ = sealer_for(pair["b"]).seal_request("/m/sync", b"x", T0 - 60)  # type: ignore[arg-type]
    async with sealed_mesh(pair) as (net, s):
        exc = await refused(s["b"].inner, s["a"], old)
        assert exc.code == "4.01"
        assert s["a"].transport.refused == {"before_start": 1}


async def test_open_resources_need_no_keys_and_sealed_ones_refuse_the_unenrolled(
    pair: dict[str, Identity | None],
) -> None:
    async with sealed_mesh({**pair, "u": None}) as (net, s):
        stranger = s["u"].inner
        # Discovery works without keys...
        assert await stranger.request(ADDR["a"], "/m/hello", method="GET") == b"hello from a"
        # ...reading or writing sessions does not: 4.01, counted, handler not called.
        for resource, payload in (("/m/sync", b"\xa1\x64from\x61u"), ("/m/digest", b""), ("/m/sync", b"garbage")):
            exc = await refused(stranger, s["a"], payload, resource)
            assert exc.code == "4.01"
            assert "enrol" in exc.message
        assert s["a"].calls == []
        assert s["a"].transport.refused == {"not_sealed": 3}
        # And a sealed node reads the open resource through its SealedTransport too.
        assert await s["b"].transport.request(ADDR["a"], "/m/hello", method="GET") == b"hello from a"


async def test_role_not_allowed_in_the_mesh_is_refused(site: Site, pair: dict[str, Identity | None]) -> None:
    tool = memory_identity(site, "laptop", roles=("operator",))
    async with sealed_mesh({**pair, "t": tool}) as (net, s):
        with pytest.raises(RemoteRefused) as info:
            await s["t"].transport.request(ADDR["a"], "/m/sync", b"x")
        assert info.value.code == "4.03"
        assert s["a"].transport.refused == {"role": 1}


async def test_reflected_and_misaddressed_requests_are_refused(site: Site, pair: dict[str, Identity | None]) -> None:
    c = memory_identity(site, "c")
    async with sealed_mesh({**pair, "c": c}) as (net, s):
        # a's own request, reflected back to a.
        await s["a"].transport.request(ADDR["b"], "/m/digest", b"1")
        reflected = net.requests("/m/digest")[-1]
        exc = await refused(s["c"].inner, s["a"], reflected, "/m/digest")
        assert exc.code == "4.03"
        assert s["a"].transport.refused == {"reflected": 1}
        # Once a has heard b answer, its requests to b name b: replayed to c, refused.
        await s["a"].transport.request(ADDR["b"], "/m/sync", b"2")
        addressed = net.requests("/m/sync")[-1]
        exc = await refused(s["a"].inner, s["c"], addressed)
        assert exc.code == "4.03"
        assert s["c"].transport.refused == {"misaddressed": 1}
        assert s["c"].calls == []


async def test_forged_or_replayed_response_is_rejected(pair: dict[str, Identity | None]) -> None:
    async with sealed_mesh({"b": pair["b"], "a": None}) as (net, s):
        responses: list[bytes] = []

        async def answer(payload: bytes, remote: str) -> bytes:
            return responses.pop()

        s["a"].inner.route("/m/sync", answer)
        sa = sealer_for(pair["a"])  # type: ignore[arg-type]
        # A genuine response by a, but to another request of b's: replayed.
        responses.append(sa.seal_response("/m/sync", b"old", request_ctr=12345, now=T0, to="b"))
        with pytest.raises(ResponseRejected) as info:
            await s["b"].transport.request(ADDR["a"], "/m/sync", b"x")
        assert info.value.reason == "unmatched_response"
        # Plain bytes instead of a sealed answer.
        responses.append(b"\xa0")
        with pytest.raises(ResponseRejected) as info:
            await s["b"].transport.request(ADDR["a"], "/m/sync", b"x")
        assert info.value.reason == "not_sealed"
        assert s["b"].transport.bad_responses == {"unmatched_response": 1, "not_sealed": 1}


async def test_handler_refusals_keep_their_code_but_not_their_text(pair: dict[str, Identity | None]) -> None:
    async with sealed_mesh(pair) as (net, s):

        async def picky(payload: bytes, remote: str) -> bytes:
            raise BadRequest("document 'session-7f3a' holds session 'session-9b1c'")

        s["a"].transport.route("/m/picky", picky)
        with pytest.raises(RemoteRefused) as info:
            await s["b"].transport.request(ADDR["a"], "/m/picky", b"x")
        assert info.value.code == "4.00"
        assert "session-7f3a" not in info.value.message
        assert s["a"].transport.refused == {}


async def test_authenticated_peer_is_per_request(site: Site, pair: dict[str, Identity | None]) -> None:
    # The in-memory transport runs all handlers in one shared contextvars
    # context: concurrent requests from b and c must each see their own sender.
    c = memory_identity(site, "c")
    async with sealed_mesh({**pair, "c": c}) as (net, s):
        seen: list[tuple[bytes, str | None]] = []

        async def slow(payload: bytes, remote: str) -> bytes:
            await trio.sleep(0.01 if payload == b"b" else 0)
            seen.append((payload, authenticated_peer.get()))
            return b""

        s["a"].transport.route("/m/slow", slow)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(s["b"].transport.request, ADDR["a"], "/m/slow", b"b")
            nursery.start_soon(s["c"].transport.request, ADDR["a"], "/m/slow", b"c")
        assert sorted(seen) == [(b"b", "b"), (b"c", "c")]


async def test_refusal_classes_are_the_transports_codes() -> None:
    # A handler that lets a refusal escape answers with the right code, automatically.
    from meshnode._security import BadEnvelope, ClockSkew, Replayed

    assert isinstance(BadEnvelope(), Unauthorized) and BadEnvelope().code == "4.01"
    assert isinstance(Replayed(), Unauthorized)
    assert isinstance(ClockSkew(), Forbidden) and ClockSkew().code == "4.03"
    assert isinstance(CertificateExpired(), RemoteSecurityError) and CertificateExpired().code == "4.03"
    assert isinstance(BadCertificate(), Unauthorized)


async def test_sealed_round_trip_over_real_coap(pair: dict[str, Identity | None]) -> None:
    a, b = pair["a"], pair["b"]
    assert a is not None and b is not None
    port = free_port(["127.0.0.2", "127.0.0.3"])
    async with trio_asyncio.open_loop():
        async with open_coap_transport("127.0.0.2", port) as ca, open_coap_transport("127.0.0.3", port) as cb:
            sa, sb = SealedTransport(ca, sealer_for(a)), SealedTransport(cb, sealer_for(b))
            calls: list[tuple[bytes, str | None]] = []

            async def handler(payload: bytes, remote: str) -> bytes:
                calls.append((payload, authenticated_peer.get()))
                return payload[::-1]

            sa.route("/m/sync", handler)
            big = bytes(range(256)) * 20  # 5 KiB: block-wise both ways
            assert await sb.request(sa.address, "/m/sync", big) == big[::-1]
            assert calls == [(big, "b")]
            # Plain bytes from the CoAP side: refused with 4.01, counted.
            with pytest.raises(RemoteRefused) as info:
                await cb.request(sa.address, "/m/sync", b"\xa0")
            assert info.value.code == "4.01"
            # A replay of a sealed request, sent over CoAP: refused with 4.01.
            sealed, _ = sb.sealer.seal_request("/m/sync", b"once", time.time())
            await cb.request(sa.address, "/m/sync", sealed)
            with pytest.raises(RemoteRefused) as info:
                await cb.request(sa.address, "/m/sync", sealed)
            assert info.value.code == "4.01"
            assert len(calls) == 2
            assert sa.refused == {"not_sealed": 1, "replayed": 1}


# --------------------------------------------------------------------------
# Network-key rotation


async def test_network_key_rotation_through_grants(site: Site) -> None:
    a, b, gone = memory_identity(site, "a"), memory_identity(site, "b"), memory_identity(site, "stolen")
    new_key = nacl.utils.random(32)
    grant = grant_network_key(
        site, new_key, [a.certificate, b.certificate], activate_at=T0 + 600, retire_previous_at=T0 + 3600, now=T0
    )
    assert entry_key(grant) == f"netkey:{network_key_id(new_key).hex()}"
    assert open_network_key_grant(grant, gone) is None  # not addressed to the revoked node
    ga = open_network_key_grant(grant, a)
    assert ga is not None and ga.key == new_key and ga.activate_at == T0 + 600
    sa, sb, sgone = sealer_for(a), sealer_for(b), sealer_for(gone)
    sa.apply_grant(ga)
    # Before activation a still seals with the old key: b (without the grant) reads it.
    msg, _ = sa.seal_request("/m/sync", b"1", T0 + 1)
    assert sb.open_request("/m/sync", msg, T0 + 1).body == b"1"
    # After activation a seals with the new key: only holders of the grant read it.
    msg, _ = sa.seal_request("/m/sync", b"2", T0 + 601)
    assert msg[3:7] == network_key_id(new_key)
    with pytest.raises(RemoteSecurityError) as info:
        sgone.open_request("/m/sync", msg, T0 + 601)
    assert info.value.reason == "unknown_network_key"
    gb = open_network_key_grant(grant, b)
    assert gb is not None
    sb.apply_grant(gb)
    assert sb.open_request("/m/sync", msg, T0 + 601).body == b"2"
    # A late node still on the old key is answered under the old key until it retires...
    late, ctr = sgone.seal_request("/m/sync", b"3", T0 + 700)
    opened = sa.open_request("/m/sync", late, T0 + 700)
    reply = sa.seal_response("/m/sync", b"r", opened.ctr, T0 + 700, to="stolen", key_id=opened.key_id)
    assert sgone.open_response("/m/sync", reply, ctr, T0 + 700) == b"r"
    # ...and refused afterwards.
    late, _ = sgone.seal_request("/m/sync", b"4", T0 + 3601)
    with pytest.raises(RemoteSecurityError) as info:
        sa.open_request("/m/sync", late, T0 + 3601)
    assert info.value.reason == "unknown_network_key"


def test_grant_from_another_site_is_refused(site: Site) -> None:
    a = memory_identity(site, "a")
    other = memory_site()
    forged = grant_network_key(
        other, nacl.utils.random(32), [a.certificate], activate_at=T0, retire_previous_at=None, now=T0
    )
    with pytest.raises(BadSiteEntry):
        open_network_key_grant(forged, a)


def test_site_rotate_network_key_grants_every_enrolled_unrevoked_node(tmp_path: Path) -> None:
    site_dir = tmp_path / "site"
    create_site(site_dir, "depot", now=T0)
    for node in ("a", "b", "c"):
        enroll(site_dir, node, tmp_path / node, now=T0)
    site_revoke(site_dir, node_id="c", now=T0 + 10)
    old = load_site(site_dir).network_key
    name, grant = site_rotate_network_key(site_dir, now=T0 + 20)
    new = load_site(site_dir).network_key
    assert new != old and name == f"netkey:{network_key_id(new).hex()}"
    ids = {n: Identity.load(tmp_path / n) for n in "abc"}
    for n in "ab":
        g = open_network_key_grant(grant, ids[n])  # type: ignore[arg-type]
        assert g is not None and g.key == new and g.activate_at == T0 + 620
    assert open_network_key_grant(grant, ids["c"]) is None  # type: ignore[arg-type]
    assert set(site_entries(site_dir)) == {"node:c", name}
    # Revocations read from the same map skip the grant without complaint.
    revs = Revocations.from_entries(site_entries(site_dir), load_site(site_dir).public_key)
    assert revs.rejected == [] and len(revs) == 1


# --------------------------------------------------------------------------
# The sans-IO sealer


def test_replay_window() -> None:
    w = ReplayWindow(8)
    for ctr in (10, 12, 11):
        assert w.check(ctr) is None
        w.accept(ctr)
    assert w.check(11) == "replayed" and w.check(12) == "replayed"
    assert w.check(9) is None  # never seen, inside the window
    assert w.check(12 - 7) is None and w.check(12 - 8) == "too_old"  # the window holds the 8 below and at 12
    w.accept(100)  # a jump beyond the window forgets the bitmap
    assert w.check(100) == "replayed" and w.check(99) is None and w.check(92) == "too_old"
    # check() never changes anything.
    assert w.check(99) is None and w.check(99) is None


def test_counters_start_from_the_clock_so_a_restart_never_reuses_one(pair: dict[str, Identity | None]) -> None:
    b = pair["b"]
    assert b is not None
    first = sealer_for(b)
    ctrs = [first.seal_request("/m/sync", b"", T0)[1] for _ in range(1000)]
    assert ctrs == list(range(ctrs[0], ctrs[0] + 1000))
    assert ctrs[0] == (int(T0 * 1e6) << 8) + 1
    restarted = sealer_for(b)
    assert restarted.seal_request("/m/sync", b"", T0 + 1)[1] > ctrs[-1]
    # The receiver keeps accepting the restarted sender.
    a = sealer_for(pair["a"])  # type: ignore[arg-type]
    a.open_request("/m/sync", first.seal_request("/m/sync", b"", T0)[0], T0)
    a.open_request("/m/sync", restarted.seal_request("/m/sync", b"", T0 + 1)[0], T0 + 1)


def test_sender_silent_for_twice_the_skew_is_forgotten_safely(pair: dict[str, Identity | None]) -> None:
    sa, sb = sealer_for(pair["a"]), sealer_for(pair["b"])  # type: ignore[arg-type]
    msg, _ = sb.seal_request("/m/sync", b"", T0)
    sa.open_request("/m/sync", msg, T0)
    # Much later the replay state of b has gone, but the old message fails the time check.
    with pytest.raises(RemoteSecurityError) as info:
        sa.open_request("/m/sync", msg, T0 + 241)
    assert info.value.reason == "skew"
    fresh, _ = sb.seal_request("/m/sync", b"", T0 + 241)
    sa.open_request("/m/sync", fresh, T0 + 241)
    assert sa.refused == {"skew": 1}


def test_message_overhead_is_bounded(pair: dict[str, Identity | None]) -> None:
    sb = sealer_for(pair["b"])  # type: ignore[arg-type]
    sealed, _ = sb.seal_request("/m/sync", b"x" * 1000, T0)
    assert len(sealed) - 1000 < 450


def _sealers() -> tuple[Sealer, Sealer, Identity]:
    site = memory_site()
    a, b = memory_identity(site, "a"), memory_identity(site, "b")
    return sealer_for(a), sealer_for(b), b


_A, _B, _B_ID = _sealers()
_VALID, _ = _B.seal_request("/m/sync", b"body", T0)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_only_raise_remote_security_errors(data: bytes) -> None:
    with pytest.raises(RemoteSecurityError):
        _A.open_request("/m/sync", data, T0)
    with pytest.raises(RemoteSecurityError):
        _A.open_request("/m/sync", b"MS\x01" + _VALID[3:7] + data, T0)


@settings(max_examples=300)
@given(st.integers(min_value=0, max_value=len(_VALID) - 1), st.integers(min_value=1, max_value=255))
def test_any_flipped_byte_is_refused(position: int, xor: int) -> None:
    mutated = bytearray(_VALID)
    mutated[position] ^= xor
    with pytest.raises(RemoteSecurityError):
        _A.open_request("/m/sync", bytes(mutated), T0)


@settings(max_examples=200)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.binary(max_size=40),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=10),
        max_leaves=30,
    )
)
def test_junk_from_a_network_key_holder_only_raises_remote_security_errors(junk: object) -> None:
    # Whatever CBOR someone holding the network key puts in the box.
    import cbor2
    import nacl.secret

    inner = cbor2.dumps(junk)
    sealed = (
        b"MS\x01" + network_key_id(_B_ID.network_key) + bytes(nacl.secret.SecretBox(_B_ID.network_key).encrypt(inner))
    )
    with pytest.raises(RemoteSecurityError):
        _A.open_request("/m/sync", sealed, T0)
    pair_form = cbor2.dumps([cbor2.dumps(junk), b"\0" * 64])
    sealed = (
        b"MS\x01"
        + network_key_id(_B_ID.network_key)
        + bytes(nacl.secret.SecretBox(_B_ID.network_key).encrypt(pair_form))
    )
    with pytest.raises(RemoteSecurityError):
        _A.open_request("/m/sync", sealed, T0)


# A malicious enrolled node: its certificate is of our site and its signature verifies, so
# everything after the signature check (kind, resource, method, address, validity, role, clock,
# replay) is all that stands between its message and a handler. Each fault below is a message
# such a node can sign; the test expects the matching refusal, and a fault-free message to open.
_SITE = memory_site()
_RECEIVER = memory_identity(_SITE, "a")
_SENDERS = {
    "ok": memory_identity(_SITE, "b"),
    "expired": memory_identity(_SITE, "old", issued=T0 - 400 * DAY, valid_for=DAY),
    "operator": memory_identity(_SITE, "op", roles=("operator",)),
}
_FAULTS: dict[str, tuple[type[RemoteSecurityError], ...]] = {
    "kind": (WrongKind,),
    "resource": (WrongResource,),
    "method": (WrongResource,),
    "to": (Misaddressed,),
    "skew": (ClockSkew,),
    "expired": (CertificateExpired,),
    "operator": (RoleNotAllowed,),
    "stolen_cert": (BadSignature,),
    "before_start": (Replayed,),
    "extra_field": (BadEnvelope,),
    "body_text": (BadEnvelope,),
}


def _signed_by(identity: Identity, fields: dict[str, object], network_key: bytes) -> bytes:
    inner = _sign(identity.signing_key, _CTX_SEALED, _canonical(fields))
    return SEALED_MAGIC + network_key_id(network_key) + bytes(nacl.secret.SecretBox(network_key).encrypt(inner))


def _attempt(faults: set[str], body: bytes) -> None:
    started = T0 + 1000
    receiver = sealer_for(_RECEIVER, started=started)
    now = started + 10
    sender = _SENDERS["expired" if "expired" in faults else "operator" if "operator" in faults else "ok"]
    fields: dict[str, object] = {
        "v": 1,
        "k": 0,
        "m": "POST",
        "res": "/m/sync",
        "cert": sender.certificate_bytes,
        "ctr": 1000,
        "ts": int(now * 1000),
        "body": body,
        "to": "a",
    }
    if "kind" in faults:
        fields["k"], fields["re"] = 1, 999
    if "resource" in faults:
        fields["res"] = "/m/members"
    if "method" in faults:
        fields["m"] = "GET"
    if "to" in faults:
        fields["to"] = "c"
    if "skew" in faults:
        fields["ts"] = int((now + 10 * DEFAULT_MAX_SKEW) * 1000)
    if "stolen_cert" in faults:  # another node's certificate, signed with this node's key
        fields["cert"] = _SENDERS["ok" if sender is not _SENDERS["ok"] else "operator"].certificate_bytes
    if "before_start" in faults:
        fields["ts"] = int((started - 60) * 1000)  # within the clock skew: only the start time is wrong
    if "extra_field" in faults:
        fields["x"] = 1
    if "body_text" in faults:
        fields["body"] = body.hex()
    sealed = _signed_by(sender, fields, _SITE.network_key)
    if not faults:
        opened = receiver.open_request("/m/sync", sealed, now)
        assert (opened.sender_node_id, opened.body) == ("b", body)
        with pytest.raises(Replayed):  # the same message again
            receiver.open_request("/m/sync", sealed, now)
        return
    expected = tuple(cls for f in faults for cls in _FAULTS[f])
    with pytest.raises(RemoteSecurityError) as refused:
        receiver.open_request("/m/sync", sealed, now)
    assert isinstance(refused.value, expected), (faults, refused.value)
    # Refusing it left nothing behind: the same node's next, honest message opens.
    honest = dict(
        fields,
        k=0,
        m="POST",
        res="/m/sync",
        to="a",
        ts=int(now * 1000),
        ctr=1001,
        body=b"ok",
        cert=_SENDERS["ok"].certificate_bytes,
    )
    honest.pop("re", None)
    honest.pop("x", None)
    assert receiver.open_request("/m/sync", _signed_by(_SENDERS["ok"], honest, _SITE.network_key), now).body == b"ok"


@pytest.mark.parametrize("fault", [None, *sorted(_FAULTS)])
def test_an_enrolled_node_with_a_valid_signature_is_refused_by_each_later_check(fault: str | None) -> None:
    _attempt(set() if fault is None else {fault}, b"payload")


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.sets(st.sampled_from(sorted(_FAULTS)), max_size=3), st.binary(max_size=64))
def test_an_enrolled_node_with_a_valid_signature_and_several_faults_is_refused(faults: set[str], body: bytes) -> None:
    _attempt(faults, body)


# --------------------------------------------------------------------------
# Certificates


def test_certificate_round_trip_and_checks(site: Site) -> None:
    key = nacl.signing.SigningKey.generate()
    data = issue_certificate(
        site, "charger-7", bytes(key.verify_key), roles=("charger", "gateway"), valid_for=DAY, now=T0
    )
    cert = Certificate.decode(data, site.public_key)
    assert (cert.node_id, cert.public_key, cert.roles, cert.not_after, cert.site, cert.issued) == (
        "charger-7",
        bytes(key.verify_key),
        ("charger", "gateway"),
        T0 + DAY,
        "fieldday",
        T0,
    )
    assert len(cert.serial) == 32 and cert.encode() == data
    cert.check_valid(T0 + DAY)
    with pytest.raises(CertificateExpired, match="expired"):
        cert.check_valid(T0 + DAY + 1)
    with pytest.raises(BadCertificate):
        Certificate.decode(data, memory_site().public_key)  # another site's key
    tampered = bytearray(data)
    tampered[data.index(b"charger-7")] ^= 1
    with pytest.raises(BadCertificate):
        Certificate.decode(bytes(tampered), site.public_key)
    for junk in (b"", b"\xa0", data[:-5], b"\x82\x40\x40"):
        with pytest.raises(BadCertificate):
            Certificate.decode(junk, site.public_key)
    with pytest.raises(LocalSecurityError, match="not signed"):
        dataclasses.replace(cert, encoded=b"").encode()
    with pytest.raises(LocalSecurityError, match="roles"):
        issue_certificate(site, "x", bytes(key.verify_key), roles=("admin",), now=T0)
    public_only = dataclasses.replace(site, signing_key=None)
    with pytest.raises(LocalSecurityError, match="site init"):
        issue_certificate(public_only, "x", bytes(key.verify_key), now=T0)


# --------------------------------------------------------------------------
# Site and enrolment files


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_create_site_writes_its_files_and_refuses_to_overwrite(tmp_path: Path) -> None:
    site_dir = tmp_path / "site"
    created = create_site(site_dir, "field day 2027", now=T0)
    assert mode(site_dir / "site.key") == 0o600 and mode(site_dir / "network.key") == 0o600
    assert (site_dir / "site.pub").read_bytes() == created.public_key
    assert len((site_dir / "network.key").read_bytes()) == 32
    loaded = load_site(site_dir)
    assert (loaded.name, loaded.public_key, loaded.network_key, loaded.created) == (
        "field day 2027",
        created.public_key,
        created.network_key,
        T0,
    )
    assert loaded.signing_key is not None
    assert "network_key" not in repr(loaded) and created.network_key.hex() not in repr(loaded)
    with pytest.raises(LocalSecurityError, match="refusing to overwrite"):
        create_site(site_dir, "again")
    assert load_site(site_dir).public_key == created.public_key
    # A copy with the public half only can verify but not sign.
    (site_dir / "site.key").unlink()
    assert load_site(site_dir).signing_key is None
    with pytest.raises(LocalSecurityError, match="site.key"):
        enroll(site_dir, "a", tmp_path / "a", now=T0)


def test_missing_site_says_which_command_to_run(tmp_path: Path) -> None:
    with pytest.raises(LocalSecurityError, match="meshnode site init --site"):
        load_site(tmp_path / "nowhere")
    with pytest.raises(LocalSecurityError, match="meshnode site init"):
        enroll(tmp_path / "nowhere", "a", tmp_path / "a", now=T0)


def test_enroll_writes_what_the_node_needs_and_keeps_its_device_key(tmp_path: Path) -> None:
    from meshnode._node import load_or_create_key

    site_dir, data_dir = tmp_path / "site", tmp_path / "node-a"
    site = create_site(site_dir, "depot", now=T0)
    data_dir.mkdir()
    device_key = load_or_create_key(data_dir)  # the node ran before enrolment
    assert Identity.load(data_dir) is None  # not enrolled yet
    path = enroll(site_dir, "a", data_dir, roles=("charger", "gateway"), valid_for=30 * DAY, now=T0)
    assert path == data_dir / "node.cert"
    assert {p.name for p in data_dir.iterdir()} == {"node.key", "node.cert", "site.pub", "network.key", "site.toml"}
    assert mode(data_dir / "node.key") == 0o600 and mode(data_dir / "network.key") == 0o600
    assert (data_dir / "network.key").read_bytes() == site.network_key
    identity = Identity.load(data_dir, node_id="a", now=T0 + DAY)
    assert identity is not None
    assert bytes(identity.signing_key) == bytes(device_key)  # events signed before stay verifiable
    assert identity.certificate.public_key == bytes(device_key.verify_key)
    assert (identity.node_id, identity.site_name, identity.site_public_key) == ("a", "depot", site.public_key)
    assert identity.certificate.roles == ("charger", "gateway")
    assert identity.certificate_bytes == (data_dir / "node.cert").read_bytes()
    assert [c.serial for c in enrolled_certificates(site_dir)] == [identity.certificate.serial]
    # The same key file the node itself would use.
    assert bytes(load_or_create_key(data_dir)) == bytes(load_or_create_node_key(data_dir)) == bytes(device_key)
    # Mismatches are clear errors.
    with pytest.raises(LocalSecurityError, match="does not match the enrolment"):
        Identity.load(data_dir, node_id="b")
    with pytest.raises(LocalSecurityError, match="enrolled as 'a'"):
        enroll(site_dir, "b", data_dir, now=T0)
    with pytest.raises(LocalSecurityError, match="expired"):
        Identity.load(data_dir, now=T0 + 31 * DAY)
    other_site = tmp_path / "other"
    create_site(other_site, "elsewhere", now=T0)
    with pytest.raises(LocalSecurityError, match="another site"):
        enroll(other_site, "a", data_dir, now=T0)
    # Renewal: same node, same key, new certificate.
    enroll(site_dir, "a", data_dir, now=T0 + 20 * DAY)
    renewed = Identity.load(data_dir)
    assert renewed is not None and renewed.certificate.not_after == T0 + 20 * DAY + 365 * DAY
    assert bytes(renewed.signing_key) == bytes(device_key)


def test_enroll_creates_a_device_key_and_copies_the_cloud_key(tmp_path: Path) -> None:
    site_dir, data_dir = tmp_path / "site", tmp_path / "fresh" / "node"
    create_site(site_dir, "depot", now=T0)
    cloud = nacl.signing.SigningKey.generate()
    (site_dir / "cloud.pub").write_bytes(bytes(cloud.verify_key))
    enroll(site_dir, "n1", data_dir, now=T0)
    assert mode(data_dir / "node.key") == 0o600
    identity = Identity.load(data_dir)
    assert identity is not None and identity.cloud_public_key == bytes(cloud.verify_key)
    assert not (data_dir / "site.key").exists()


def test_damaged_or_partial_enrolment_is_a_clear_error(tmp_path: Path) -> None:
    site_dir, data_dir = tmp_path / "site", tmp_path / "node"
    create_site(site_dir, "depot", now=T0)
    enroll(site_dir, "a", data_dir, now=T0)
    (data_dir / "network.key").unlink()
    with pytest.raises(LocalSecurityError, match="meshnode enroll"):
        Identity.load(data_dir)
    enroll(site_dir, "a", data_dir, now=T0)
    (data_dir / "node.key").write_bytes(b"short")
    with pytest.raises(LocalSecurityError, match="damaged"):
        Identity.load(data_dir)
    (data_dir / "node.key").write_bytes(bytes(nacl.signing.SigningKey.generate()))
    with pytest.raises(LocalSecurityError, match="another key"):
        Identity.load(data_dir)


def test_store_key_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    key = load_or_create_store_key(tmp_path)
    assert len(key) == 32 and mode(tmp_path / "store.key") == 0o600
    assert load_or_create_store_key(tmp_path) == key


# --------------------------------------------------------------------------
# Revocations


def test_revocations_by_serial_and_by_node_id(site: Site) -> None:
    a = memory_identity(site, "a")
    b_old = memory_identity(site, "b", issued=T0)
    b_new = memory_identity(site, "b", issued=T0 + 100)  # the replacement charger, same id
    by_node = revoke(site, node_id="b", now=T0 + 50, reason="stolen")
    by_serial = revoke(site, serial=a.certificate.serial, now=T0 + 50)
    assert entry_key(by_node) == "node:b" and entry_key(by_serial) == a.certificate.serial
    revs = Revocations.from_entries({"node:b": by_node, a.certificate.serial: by_serial}, site.public_key)
    assert revs.rejected == []
    assert revs.is_revoked(a.certificate) and revs.is_revoked(b_old.certificate)
    assert not revs.is_revoked(b_new.certificate)
    with pytest.raises(LocalSecurityError):
        revoke(site, now=T0)
    with pytest.raises(LocalSecurityError):
        revoke(site, node_id="a", serial="x", now=T0)


def test_bad_revocation_entries_are_ignored_and_reported(site: Site) -> None:
    a = memory_identity(site, "a")
    good = revoke(site, node_id="c", now=T0)
    forged = revoke(memory_site(), serial=a.certificate.serial, now=T0)  # another site's key
    misfiled = revoke(site, node_id="d", now=T0)
    revs = Revocations.from_entries(
        {"node:c": good, a.certificate.serial: forged, "node:a": misfiled, "junk": b"\x00\x01"}, site.public_key
    )
    assert revs.node_ids == {"c": T0}
    assert not revs.is_revoked(a.certificate)
    assert len(revs.rejected) == 3
    assert all(r.split(":")[0] in {a.certificate.serial, "node", "junk"} for r in revs.rejected)


def test_site_revoke_records_the_entry_and_checks_the_node(tmp_path: Path) -> None:
    site_dir = tmp_path / "site"
    create_site(site_dir, "depot", now=T0)
    enroll(site_dir, "a", tmp_path / "a", now=T0)
    name, entry = site_revoke(site_dir, node_id="a", now=T0 + 1, reason="stolen")
    assert name == "node:a" and site_entries(site_dir) == {name: entry}
    with pytest.raises(LocalSecurityError, match="never enrolled"):
        site_revoke(site_dir, node_id="zz", now=T0)
    identity = Identity.load(tmp_path / "a")
    assert identity is not None
    revs = Revocations.from_entries(site_entries(site_dir), identity.site_public_key)
    assert revs.is_revoked(identity.certificate)


def test_trusted_device_keys_for_the_cloud(site: Site) -> None:
    a, b = memory_identity(site, "a"), memory_identity(site, "b")
    stranger = memory_identity(memory_site(), "x")
    revs = Revocations.from_entries([revoke(site, node_id="b", now=T0 + 1)], site.public_key)
    keys = trusted_device_keys(
        [a.certificate_bytes, b.certificate_bytes, stranger.certificate_bytes], site.public_key, revocations=revs
    )
    assert keys == {"a": a.certificate.public_key}
    # The keys verify the events those devices sign.
    signer = EventSigner("a", a.signing_key)
    event = signer.sign("authorize", "s1", int(T0 * 1000), data={"id_token": "T"})
    assert verify_event(event.encoded, Keyring(keys)).event_id == event.event_id


# --------------------------------------------------------------------------
# Driver tokens and token lists


@pytest.fixture
def cloud() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey.generate()


def test_driver_token_valid(cloud: nacl.signing.SigningKey) -> None:
    text = issue_driver_token(cloud, "DRIVER-42", max_wh=22_000, max_minutes=120, not_after=T0 + DAY)
    assert text.startswith("mdt1.") and len(text) < 200 and text.isascii()
    token = verify_driver_token(text, bytes(cloud.verify_key), T0)
    assert (token.token_id, token.max_wh, token.max_minutes, token.not_after) == ("DRIVER-42", 22_000, 120, T0 + DAY)
    # During a cloud key rotation either key is accepted.
    assert (
        verify_driver_token(
            text, [bytes(nacl.signing.SigningKey.generate().verify_key), bytes(cloud.verify_key)], T0
        ).token_id
        == "DRIVER-42"
    )


def test_driver_token_refusals(cloud: nacl.signing.SigningKey) -> None:
    text = issue_driver_token(cloud, "DRIVER-42", max_wh=None, max_minutes=None, not_after=T0 + DAY)
    with pytest.raises(TokenExpired, match="expired"):
        verify_driver_token(text, bytes(cloud.verify_key), T0 + DAY + 1)
    other = nacl.signing.SigningKey.generate()
    with pytest.raises(TokenInvalid, match="not signed by this site's cloud"):
        verify_driver_token(text, bytes(other.verify_key), T0)
    forged = issue_driver_token(other, "DRIVER-42", max_wh=None, max_minutes=None, not_after=T0 + DAY)
    with pytest.raises(TokenInvalid):
        verify_driver_token(forged, bytes(cloud.verify_key), T0)
    for i in range(len("mdt1."), len(text)):
        tampered = text[:i] + ("A" if text[i] != "A" else "B") + text[i + 1 :]
        with pytest.raises(TokenInvalid):
            verify_driver_token(tampered, bytes(cloud.verify_key), T0)
    for junk in ("", "hello", "mdt1.", "mdt1.!!!!", "mdt1." + "A" * 2000):
        with pytest.raises(TokenInvalid):
            verify_driver_token(junk, bytes(cloud.verify_key), T0)


def test_token_list_entries(cloud: nacl.signing.SigningKey) -> None:
    entry = signed_token_list_entry(cloud, "RFID-1", True, T0)
    parsed = verify_token_list_entry(entry, bytes(cloud.verify_key))
    assert (parsed.token_id, parsed.allowed, parsed.ts) == ("RFID-1", True, T0)
    with pytest.raises(TokenInvalid):
        verify_token_list_entry(entry, bytes(nacl.signing.SigningKey.generate().verify_key))
    with pytest.raises(TokenInvalid):
        verify_token_list_entry(entry[:-1] + bytes([entry[-1] ^ 1]), bytes(cloud.verify_key))


AUTH_TABLE = [
    # (case, id_token, token: (id, not_after) | "forged" | None, allowed, revoked, policy, expected)
    ("driver token", None, ("D1", T0 + DAY), {}, {}, "refuse", (True, "driver_token", Limits(5000, 60), False)),
    (
        "driver token, matching id",
        "D1",
        ("D1", T0 + DAY),
        {},
        {},
        "refuse",
        (True, "driver_token", Limits(5000, 60), False),
    ),
    ("driver token for another id", "D2", ("D1", T0 + DAY), {}, {}, "refuse", (False, "token_mismatch", None, False)),
    ("expired driver token", None, ("D1", T0 - 1), {}, {}, "accept_limited", (False, "token_expired", None, False)),
    (
        "expired token, allowed id",
        "D1",
        ("D1", T0 - 1),
        {"D1": (True, T0)},
        {},
        "accept_limited",
        (False, "token_expired", None, False),
    ),
    ("forged driver token", None, "forged", {}, {}, "accept_limited", (False, "token_invalid", None, False)),
    (
        "revoked beats a driver token",
        None,
        ("D1", T0 + DAY),
        {},
        {"D1": (False, T0)},
        "refuse",
        (False, "revoked", None, False),
    ),
    ("allowed list", "R1", None, {"R1": (True, T0)}, {}, "refuse", (True, "allowed_list", None, False)),
    ("revoked list", "R1", None, {}, {"R1": (False, T0)}, "accept_limited", (False, "revoked", None, False)),
    (
        "re-allowed after revocation",
        "R1",
        None,
        {"R1": (True, T0 + 5)},
        {"R1": (False, T0)},
        "refuse",
        (True, "allowed_list", None, False),
    ),
    (
        "revoked after allowed",
        "R1",
        None,
        {"R1": (True, T0)},
        {"R1": (False, T0 + 5)},
        "refuse",
        (False, "revoked", None, False),
    ),
    ("unknown, refuse", "R9", None, {}, {}, "refuse", (False, "unknown_refused", None, False)),
    (
        "unknown, accept limited",
        "R9",
        None,
        {},
        {},
        "accept_limited",
        (True, "unknown_accepted", Limits(7000, 90), True),
    ),
    (
        "forged allowed entry is worth nothing",
        "R1",
        None,
        {"R1": "forged"},
        {},
        "refuse",
        (False, "unknown_refused", None, False),
    ),
    (
        "forged revoked entry locks nobody out",
        "R1",
        None,
        {"R1": (True, T0)},
        {"R1": "forged"},
        "refuse",
        (True, "allowed_list", None, False),
    ),
    (
        "allowed entry for another token is ignored",
        "R1",
        None,
        {"R1": ("R2", T0)},
        {},
        "refuse",
        (False, "unknown_refused", None, False),
    ),
]


@pytest.mark.parametrize(
    "case, id_token, token, allowed, revoked, policy, expected", AUTH_TABLE, ids=[row[0] for row in AUTH_TABLE]
)
def test_authorize_decision_table(
    cloud: nacl.signing.SigningKey,
    case: str,
    id_token: str | None,
    token: object,
    allowed: dict[str, object],
    revoked: dict[str, object],
    policy: str,
    expected: tuple[bool, str, Limits | None, bool],
) -> None:
    other = nacl.signing.SigningKey.generate()

    def entry(spec: object, is_allowed: bool, key: str) -> bytes:
        if spec == "forged":
            return signed_token_list_entry(other, key, is_allowed, T0)
        assert isinstance(spec, tuple)
        first, ts = spec
        if isinstance(first, str):  # an entry for another token, filed under this one
            return signed_token_list_entry(cloud, first, is_allowed, ts)
        return signed_token_list_entry(cloud, key, is_allowed, ts)

    if token == "forged":
        text: str | None = issue_driver_token(other, "D1", max_wh=5000, max_minutes=60, not_after=T0 + DAY)
    elif token is None:
        text = None
    else:
        assert isinstance(token, tuple)
        text = issue_driver_token(cloud, token[0], max_wh=5000, max_minutes=60, not_after=token[1])
    result = authorize(
        id_token,
        driver_token_text=text,
        allowed_entries={k: entry(v, True, k) for k, v in allowed.items()},
        revoked_entries={k: entry(v, False, k) for k, v in revoked.items()},
        policy=policy,  # type: ignore[arg-type]
        limits=Limits(7000, 90),
        cloud_public_key=bytes(cloud.verify_key),
        now=T0,
    )
    assert (result.accepted, result.reason, result.limits, result.review) == expected, case
    if "forged" in case or "another token" in case:
        assert result.ignored or result.reason == "token_invalid"


def test_authorize_refuses_misuse(cloud: nacl.signing.SigningKey) -> None:
    with pytest.raises(LocalSecurityError):
        authorize(
            None,
            driver_token_text=None,
            allowed_entries={},
            revoked_entries={},
            policy="refuse",
            limits=None,
            cloud_public_key=bytes(cloud.verify_key),
            now=T0,
        )
    with pytest.raises(LocalSecurityError):
        authorize(
            "x",
            driver_token_text=None,
            allowed_entries={},
            revoked_entries={},
            policy="accept",
            limits=None,
            cloud_public_key=bytes(cloud.verify_key),
            now=T0,
        )  # type: ignore[arg-type]


def test_network_key_schedule_defaults(pair: dict[str, Identity | None]) -> None:
    sa = sealer_for(pair["a"])  # type: ignore[arg-type]
    assert [k.activate_at for k in sa.network_keys] == [0.0]
    sa.add_network_key(NetworkKey(nacl.utils.random(32), activate_at=T0 + 10))
    sealed, _ = sa.seal_request("/m/sync", b"", T0)
    assert sealed[3:7] == network_key_id(pair["a"].network_key)  # type: ignore[union-attr]
