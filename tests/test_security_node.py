"""Security at the node level: enrolled nodes on sealed in-memory transports.

Unenrolled peers are refused and counted, replays and tampering change nothing,
a revocation cuts a node off once it has spread, drivers are authorised offline
with signed tokens, and the store holds nothing in clear.
"""

from __future__ import annotations

import base64
import functools
import subprocess
import sys
import time
from pathlib import Path

import nacl.signing
import pytest
import trio

from crdt import MemoryAdapter, StoreOpener, open_doc_store
from meshnode._discovery import StaticDiscovery
from meshnode._node import Node, NodeConfig
from meshnode.services import Conflict, NotAuthorised
from meshnode._protocol import SyncRequest
from meshnode._security import (
    Identity,
    SealedTransport,
    Sealer,
    create_site,
    enroll,
    issue_driver_token,
    load_or_create_store_key,
    load_site,
    network_key_id,
    signed_token_list_entry,
    site_revoke,
    site_rotate_network_key,
)
from meshnode._transport import MemoryNetwork, RemoteRefused

from .procs import NodeProcess, free_port, wait_until

ROOT = Path(__file__).resolve().parent.parent


class SecureMesh:
    def __init__(
        self,
        tmp_path: Path,
        nursery: trio.Nursery,
        *,
        cloud_key: nacl.signing.SigningKey | None = None,
        clock=time.time,
    ):
        self.tmp_path, self.nursery = tmp_path, nursery
        self.clock = clock  # the nodes' and sealers' wall clock
        self.net = MemoryNetwork()
        self.site_dir = tmp_path / "site"
        create_site(self.site_dir, "field", now=clock())
        if cloud_key is not None:
            (self.site_dir / "cloud.pub").write_bytes(bytes(cloud_key.verify_key))
        self.nodes: dict[str, Node] = {}
        self.transports: dict[str, SealedTransport] = {}
        self.scopes: dict[str, trio.CancelScope] = {}

    @staticmethod
    def address(name: str) -> str:
        return f"10.0.0.{int(name[1:])}:5683"

    async def start(
        self, name: str, peers: list[str], *, enrolled: bool = True, store: StoreOpener | None = None, **config
    ) -> Node:
        data_dir = self.tmp_path / name
        if enrolled and not (data_dir / "node.cert").exists():
            enroll(self.site_dir, name, data_dir, now=self.clock())
        holder: dict[str, Node] = {}

        async def run(task_status=trio.TASK_STATUS_IGNORED):
            with trio.CancelScope() as scope:
                self.scopes[name] = scope
                async with self.net.transport(self.address(name)) as inner:
                    identity = Identity.load(data_dir) if enrolled else None
                    transport, sealer = inner, None
                    if identity is not None:
                        sealer = Sealer(identity, identity.site_public_key, identity.network_key, started=self.clock())
                        transport = SealedTransport(inner, sealer, clock=self.clock)
                        self.transports[name] = transport
                    node = Node(
                        NodeConfig(node_id=name, data_dir=data_dir, site="field", seed=3, **config),
                        transport=transport,
                        discovery=StaticDiscovery([self.address(p) for p in peers]),
                        identity=identity,
                        sealer=sealer,
                        wall_clock=self.clock,
                        store=store,
                    )
                    holder["node"] = node
                    async with trio.open_nursery() as inner_nursery:
                        await inner_nursery.start(node.serve)
                        task_status.started()
                        await trio.sleep_forever()

        await self.nursery.start(run)
        self.nodes[name] = holder["node"]
        return holder["node"]


async def wait_for(predicate, timeout=60.0):
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.1)


def refused(node: Node) -> int:
    return sum(node.sealer.refused.values()) if node.sealer is not None else 0


async def test_unenrolled_node_can_neither_read_nor_write(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        mesh = SecureMesh(tmp_path, nursery)
        a = await mesh.start("n1", ["n2", "n9"])
        b = await mesh.start("n2", ["n1", "n9"])
        intruder = await mesh.start("n9", ["n1", "n2"], enrolled=False)
        sid = (await a.create_session("bay-1", 1, "TOKEN-1"))["session_id"]
        mine = (await intruder.create_session("fake", 1, "X"))["session_id"]
        await wait_for(lambda: sid in b.replica.docs)
        await trio.sleep(10)  # many gossip rounds
        assert sid not in intruder.replica.docs  # cannot read
        assert mine not in a.replica.docs and mine not in b.replica.docs  # cannot write
        assert refused(a) > 0 and refused(b) > 0  # refused and counted
        assert a.status_json()["security"]["refused"]
        # It still discovers the mesh through the open resource.
        assert {"n1", "n2"} <= set(intruder.neighbours)
        nursery.cancel_scope.cancel()


async def test_replayed_and_tampered_requests_change_nothing(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        mesh = SecureMesh(tmp_path, nursery)
        a = await mesh.start("n1", [])
        b = await mesh.start("n2", [])
        sid = (await b.create_session("bay-2", 1, "T"))["session_id"]
        # n2 asks n1 for nothing but sends its document: capture the sealed bytes on the way.
        msg = b.replica.generate("n1", sid)
        sealed, _ = b.sealer.seal_request("/m/sync", SyncRequest("n2", {sid: msg}).encode(), time.time())
        inner = mesh.transports["n2"].inner
        await inner.request(mesh.address("n1"), "/m/sync", sealed)  # the original: accepted
        heads = {d: doc.get_heads() for d, doc in a.replica.docs.items()}
        before = refused(a)
        for bad in (sealed, sealed[:-7], sealed[:40] + bytes([sealed[40] ^ 1]) + sealed[41:], b"\x00" * 64):
            with pytest.raises(RemoteRefused) as info:
                await inner.request(mesh.address("n1"), "/m/sync", bad)
            assert info.value.code in ("4.01", "4.03")
        assert refused(a) == before + 4
        assert {d: doc.get_heads() for d, doc in a.replica.docs.items()} == heads
        # A node of another site (wrong network key and certificate) is refused too.
        other = SecureMesh(tmp_path / "other", nursery)
        other.net = mesh.net
        stranger = await other.start("n7", [])
        stranger_msg = stranger.replica.generate("n1", sid)
        sealed2, _ = stranger.sealer.seal_request(
            "/m/sync", SyncRequest("n7", {sid: stranger_msg}).encode(), time.time()
        )
        with pytest.raises(RemoteRefused) as info:
            await other.transports["n7"].inner.request(mesh.address("n1"), "/m/sync", sealed2)
        assert info.value.code == "4.01"
        nursery.cancel_scope.cancel()


async def test_revoked_node_is_cut_off_once_the_revocation_spreads(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        mesh = SecureMesh(tmp_path, nursery)
        a = await mesh.start("n1", ["n2", "n3"])
        b = await mesh.start("n2", ["n1", "n3"])
        c = await mesh.start("n3", ["n1", "n2"])
        first = (await c.create_session("bay-3", 1, "T"))["session_id"]
        await wait_for(lambda: first in a.replica.docs and first in b.replica.docs)
        _, entry = site_revoke(mesh.site_dir, node_id="n3", now=time.time(), reason="stolen")
        await a.add_site_entry(entry)  # the operator hands it to one node
        await wait_for(lambda: b.status_json()["security"]["revocations"] == 1)
        later = (await c.create_session("bay-3", 2, "T"))["session_id"]
        await trio.sleep(10)
        assert later not in a.replica.docs and later not in b.replica.docs
        assert a.sealer.refused.get("revoked", 0) + b.sealer.refused.get("revoked", 0) > 0
        # The others still talk to each other.
        sid = (await a.create_session("bay-1", 1, "T"))["session_id"]
        await wait_for(lambda: sid in b.replica.docs)
        nursery.cancel_scope.cancel()


async def test_offline_authorisation_with_signed_driver_tokens(tmp_path, autojump_clock):
    cloud_key = nacl.signing.SigningKey(b"c" * 32)
    async with trio.open_nursery() as nursery:
        mesh = SecureMesh(tmp_path, nursery, cloud_key=cloud_key)
        node = await mesh.start("n1", [], unknown_token_policy="refuse")
        token = issue_driver_token(cloud_key, "DRIVER-7", max_wh=5000, max_minutes=None, not_after=time.time() + 3600)
        session = await node.create_session("bay-1", 1, "DRIVER-7", driver_token=token, meter_wh=100)
        assert session["state"] == "charging"
        authorize_event = node.fold(session["session_id"])[1].applied[0]
        assert authorize_event.record.data["auth"] == "driver_token"
        # Its energy limit is enforced offline: the session stops when it is reached.
        await node.record_event(session["session_id"], "meter", 5200)
        assert node.session_json(session["session_id"])["state"] == "completed"

        expired = issue_driver_token(cloud_key, "DRIVER-8", max_wh=None, max_minutes=None, not_after=time.time() - 1)
        with pytest.raises(NotAuthorised, match="token_expired"):
            await node.create_session("bay-1", 1, "DRIVER-8", driver_token=expired)
        forged = issue_driver_token(
            nacl.signing.SigningKey(b"f" * 32), "DRIVER-9", max_wh=None, max_minutes=None, not_after=time.time() + 3600
        )
        with pytest.raises(NotAuthorised, match="token_invalid"):
            await node.create_session("bay-1", 1, "DRIVER-9", driver_token=forged)
        with pytest.raises(NotAuthorised, match="unknown_refused"):
            await node.create_session("bay-1", 1, "WALK-IN")
        nursery.cancel_scope.cancel()


async def test_unknown_driver_accepted_with_limits_is_flagged_for_review(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        mesh = SecureMesh(tmp_path, nursery)
        node = await mesh.start("n1", [], unknown_token_policy="accept_limited", unknown_token_max_wh=1000)
        session = await node.create_session("bay-1", 1, "WALK-IN", meter_wh=0)
        data = node.fold(session["session_id"])[1].applied[0].record.data
        assert (data["auth"], data["review"], data["limits"]["max_wh"]) == ("unknown_accepted", True, 1000)
        nursery.cancel_scope.cancel()


async def test_node_store_on_disk_holds_no_session_content(tmp_path, autojump_clock):
    async with trio.open_nursery() as nursery:
        mesh = SecureMesh(tmp_path, nursery)
        node = await mesh.start("n1", [])
        sid = (await node.create_session("bay-secret", 1, "TOKEN-SECRET-99"))["session_id"]
        await node.record_event(sid, "meter", 987654)
        nursery.cancel_scope.cancel()
    import cbor2

    raw = b"".join(p.read_bytes() for p in (tmp_path / "n1").iterdir() if p.name.startswith("store.db"))
    for secret in (sid.encode(), b"TOKEN-SECRET-99", b"bay-secret", cbor2.dumps(987654), b"meter_wh"):
        assert secret not in raw


def virtual_wall_clock():
    """A wall clock that moves with trio's (autojumping) clock: certificates, key activation and
    retirement, and session limits are all in wall-clock time."""
    base = time.time()
    return lambda: base + trio.current_time()


async def test_an_offline_session_accepted_with_a_time_limit_stops_at_max_minutes(tmp_path, autojump_clock):
    clock = virtual_wall_clock()
    async with trio.open_nursery() as nursery:
        mesh = SecureMesh(tmp_path, nursery, clock=clock)
        # An in-memory store commits inline: with a store thread, the autojump clock
        # moved on by whole timer periods while a commit ran (23 minutes once).
        store = functools.partial(open_doc_store, adapter=MemoryAdapter({}))
        node = await mesh.start(
            "n1", [], store=store, unknown_token_policy="accept_limited", unknown_token_max_minutes=30
        )
        sid = (await node.create_session("bay-1", 1, "WALK-IN", meter_wh=0))["session_id"]
        authorize_event = node.fold(sid)[1].applied[0].record
        assert authorize_event.data["limits"] == {"max_wh": None, "max_minutes": 30}
        # Virtual time also jumps while the store's thread commits, so the test reads the
        # events' own timestamps rather than assume how far the clock moved.
        start_ts = node.fold(sid)[1].started_ts
        await trio.sleep(20 * 60)
        await node.record_event(sid, "meter", 1000)
        view = node.fold(sid)[1]
        assert view.applied[-1].record.ts - start_ts < 30 * 60_000
        assert view.state == "charging"  # before 30 minutes: still charging
        await trio.sleep(10 * 60)
        await node.record_event(sid, "meter", 1500)
        view = node.fold(sid)[1]
        assert view.state == "completed"
        meter, stop = view.applied[-2].record, view.applied[-1].record
        assert meter.ts - start_ts >= 30 * 60_000
        assert (meter.type, stop.type, stop.meter_wh, stop.data["reason"]) == ("meter", "stop", 1500, "time_limit")
        with pytest.raises(Conflict):
            await node.record_event(sid, "meter", 1600)  # nothing more once it stopped
        nursery.cancel_scope.cancel()


async def test_network_key_rotation_through_the_site_config(tmp_path, autojump_clock):
    """`site rotate-network-key`'s grant, handed to one node, reaches the others through the site
    config; they seal with the new key from its activation, and the old key stops opening
    anything at its retirement: a node that missed the grant is cut off then, the others go on."""
    clock = virtual_wall_clock()
    async with trio.open_nursery() as nursery:
        mesh = SecureMesh(tmp_path, nursery, clock=clock)
        a = await mesh.start("n1", ["n2", "n3"])
        b = await mesh.start("n2", ["n1", "n3"])
        c = await mesh.start("n3", ["n1", "n2"])
        nodes = (a, b, c)
        # n4 is enrolled but not running: it never sees the grant, and keeps the old key only.
        enroll(mesh.site_dir, "n4", tmp_path / "n4", now=clock())
        n4 = Identity.load(tmp_path / "n4")
        stale = Sealer(n4, n4.site_public_key, n4.network_key, started=clock())
        old_kid = network_key_id(n4.network_key)

        async def stale_request() -> None:
            body = SyncRequest("n4", {"nothing": None}).encode()
            sealed, _ = stale.seal_request("/m/sync", body, clock(), to="n2")
            await mesh.transports["n1"].inner.request(mesh.address("n2"), "/m/sync", sealed)

        first = (await a.create_session("bay-1", 1, "T"))["session_id"]
        await wait_for(lambda: all(first in n.replica.docs for n in nodes))
        await stale_request()  # the old key opens today

        _, grant = site_rotate_network_key(mesh.site_dir, now=clock(), activate_in=60, retire_previous_after=300)
        new_kid = network_key_id((mesh.site_dir / "network.key").read_bytes())
        assert new_kid != old_kid
        await a.add_site_entry(grant)  # handed to one node only
        await wait_for(lambda: all(new_kid in {k.key_id for k in n.sealer.network_keys} for n in nodes))
        await stale_request()  # granted, not active yet: the old key still opens

        await trio.sleep(60 + 300 + 1)  # past activation and the old key's retirement
        before = b.sealer.refused.get("unknown_network_key", 0)
        with pytest.raises(RemoteRefused) as info:
            await stale_request()
        assert info.value.code == "4.01"
        assert b.sealer.refused.get("unknown_network_key", 0) == before + 1
        # The granted nodes now talk under the new key only, and still replicate.
        later = (await c.create_session("bay-3", 1, "T"))["session_id"]
        await wait_for(lambda: all(later in n.replica.docs for n in nodes))
        for n in nodes:
            assert {k.key_id for k in n.sealer.network_keys if k.retire_at is None} == {new_kid}
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# Real processes: the HTTP API, the CLI, and what ends up in logs and files


def _encodings(key: bytes) -> dict[str, bytes]:
    """The forms a key could leak in: raw, hex (both cases), base64 (standard and URL-safe,
    with and without padding)."""
    forms = {"raw": key, "hex": key.hex().encode(), "HEX": key.hex().upper().encode()}
    for name, enc in (("b64", base64.b64encode), ("b64url", base64.urlsafe_b64encode)):
        forms[name] = enc(key)
        forms[name + "-nopad"] = enc(key).rstrip(b"=")
    return forms


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshnode.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.slow
def test_token_lists_through_the_http_api_and_no_key_in_logs_or_data(tmp_path):
    """Two enrolled `meshnode run` processes at DEBUG, refusing unknown drivers. `meshnode token
    list --http` hands an allowed entry to one node; the other then accepts that driver, and
    after `token list --revoke --http` refuses it again; entries that do not verify get a 400.
    Afterwards no key (node, network, store, site, cloud) appears in any form in the logs, the
    stores or the other data files."""
    from uplink import load_or_create_cloud_key

    site_dir = tmp_path / "site"
    create_site(site_dir, "field", now=time.time())
    cloud_key_path = tmp_path / "cloud.key"
    cloud_key = load_or_create_cloud_key(cloud_key_path)
    (site_dir / "cloud.pub").write_bytes(bytes(cloud_key.verify_key))
    hosts = {"n1": "127.0.17.1", "n2": "127.0.17.2"}
    ports = {name: (free_port(host), free_port(host)) for name, host in hosts.items()}
    nodes = {}
    for name, host in hosts.items():
        enroll(site_dir, name, tmp_path / name, now=time.time())
        other = next(n for n in hosts if n != name)
        nodes[name] = NodeProcess(
            name,
            host,
            tmp_path / name,
            coap_port=ports[name][0],
            http_port=ports[name][1],
            peers=[f"{hosts[other]}:{ports[other][0]}"],
            insecure=False,
            extra=["--log-level", "debug", "--unknown-token-policy", "refuse"],
        )
    try:
        for node in nodes.values():
            node.start()
        n1, n2 = nodes["n1"], nodes["n2"]

        def start_status(node: NodeProcess, token: str) -> int:
            return node.post(
                "/v1/sessions", {"charger": "bay-1", "connector": 1, "id_token": token, "meter_wh": 0}
            ).status_code

        assert start_status(n2, "FLEET-1") == 403  # unknown, and this site refuses unknown drivers
        allowed = _cli(
            "token", "list", "--cloud-key", str(cloud_key_path), "--token-id", "FLEET-1", "--http", n1.url,
            "--data-dir", str(tmp_path / "n1"),
        )  # fmt: skip
        assert allowed.returncode == 0, allowed.stderr
        wait_until(lambda: start_status(n2, "FLEET-1") == 201, what="n2 to accept the allowed token")
        revoked = _cli(
            "token", "list", "--cloud-key", str(cloud_key_path), "--token-id", "FLEET-1", "--revoke", "--http", n1.url,
            "--data-dir", str(tmp_path / "n1"),
        )  # fmt: skip
        assert revoked.returncode == 0, revoked.stderr
        wait_until(lambda: start_status(n2, "FLEET-1") == 403, what="n2 to refuse the revoked token")
        assert start_status(n1, "FLEET-1") == 403

        # Entries a node cannot verify are refused and change nothing.
        forged = signed_token_list_entry(nacl.signing.SigningKey(b"f" * 32), "FORGED-1", True, time.time())
        for junk in (forged.hex(), "00" * 40, "zz"):
            response = n1.post("/v1/site/entries", {"entry": junk})
            assert response.status_code == 400, (junk, response.text)
        assert start_status(n1, "FORGED-1") == 403
        refused_cli = _cli(
            "token", "list", "--cloud-key", str(tmp_path / "none.key"), "--token-id", "X", "--http", n1.url
        )
        assert refused_cli.returncode != 0
        for node in nodes.values():
            assert node.stop() == 0
    finally:
        for node in nodes.values():
            node.kill()

    keys = {
        "cloud": bytes(cloud_key),
        "site": load_site(site_dir).require_signing_key().encode(),
        "network": (site_dir / "network.key").read_bytes(),
    }
    for name in hosts:
        identity = Identity.load(tmp_path / name)
        keys[f"{name} node"] = identity.signing_key.encode()
        keys[f"{name} network"] = identity.network_key
        keys[f"{name} store"] = load_or_create_store_key(tmp_path / name)
    key_files = {"node.key", "network.key", "store.key"}
    searched = [p for name in hosts for p in (tmp_path / name).iterdir() if p.is_file() and p.name not in key_files]
    searched += [nodes[name].log_path for name in hosts]
    assert any(p.name.startswith("store.db") for p in searched)
    logs = b"".join(nodes[name].log_path.read_bytes() for name in hosts)
    assert b"DEBUG" in logs and len(logs) > 10_000  # DEBUG logging was on and said a lot
    leaks = [
        (what, form, path.name)
        for path in searched
        for what, key in keys.items()
        for form, text in _encodings(key).items()
        if text in path.read_bytes()
    ]
    assert leaks == []


async def test_sealed_one_way_push_over_real_coap(tmp_path):
    """An enrolled site pushes one way (a NON request, no answer) and still seals it:
    the receiver opens and checks it like a request; plain bytes and a replay are
    refused and never reach the handler."""
    import trio_asyncio

    from meshnode._coap import open_coap_transport
    from meshnode._security import authenticated_peer

    site_dir = tmp_path / "site"
    create_site(site_dir, "field", now=time.time())
    sealers = {}
    for name in ("a", "b"):
        enroll(site_dir, name, tmp_path / name, now=time.time())
        identity = Identity.load(tmp_path / name)
        sealers[name] = Sealer(identity, identity.site_public_key, identity.network_key, started=time.time())
    hosts = ("127.0.12.20", "127.0.12.21")
    port = free_port(hosts[0])
    calls: list[tuple[bytes, str | None]] = []
    arrived = trio.Event()

    async def handler(payload: bytes, remote: str) -> bytes:
        calls.append((payload, authenticated_peer.get()))
        arrived.set()
        return b"an answer nobody reads"

    async with trio_asyncio.open_loop():
        async with open_coap_transport(hosts[0], port) as ca, open_coap_transport(hosts[1], port) as cb:
            sa, sb = SealedTransport(ca, sealers["a"]), SealedTransport(cb, sealers["b"])
            sa.route("/m/push", handler)
            with trio.fail_after(10):
                await sb.send(sa.address, "/m/push", b"changes")
                await arrived.wait()
            assert calls == [(b"changes", "b")]
            assert cb.stats.requests_sent == 1 and cb.stats.bytes_received == 0  # one way: nothing came back
            # Plain bytes, one way: refused before the handler.
            await cb.send(sa.address, "/m/push", b"\xa0")
            await wait_for(lambda: sa.refused["not_sealed"] == 1, timeout=10)
            # A replayed sealed push: refused too.
            sealed, _ = sealers["b"].seal_request("/m/push", b"once", time.time())
            await cb.send(sa.address, "/m/push", sealed)
            await wait_for(lambda: len(calls) == 2, timeout=10)
            await cb.send(sa.address, "/m/push", sealed)
            await wait_for(lambda: sa.refused["replayed"] == 1, timeout=10)
            assert calls == [(b"changes", "b"), (b"once", "b")]


def test_a_sealer_with_a_nonce_seam_seals_the_same_bytes_every_time(tmp_path):
    """A seeded simulation of a sealed site stays reproducible: with the nonce seam
    two runs seal identical bytes (and they still open); without it they differ."""
    import hashlib

    site_dir = tmp_path / "site"
    create_site(site_dir, "field", now=1_800_000_000)
    enroll(site_dir, "a", tmp_path / "a", now=1_800_000_000)
    enroll(site_dir, "b", tmp_path / "b", now=1_800_000_000)
    a, b = Identity.load(tmp_path / "a"), Identity.load(tmp_path / "b")

    def seeded(seed: int):
        return lambda inner: hashlib.sha256(b"%d:nonce:" % seed + inner).digest()[:24]

    def sealer(identity, nonce=None):
        return Sealer(identity, identity.site_public_key, identity.network_key, started=1_800_000_000, nonce=nonce)

    t = 1_800_000_001.0
    one, _ = sealer(a, seeded(1)).seal_request("/m/push", b"changes", t)
    two, _ = sealer(a, seeded(1)).seal_request("/m/push", b"changes", t)
    assert one == two
    assert sealer(b).open_request("/m/push", one, t).body == b"changes"
    other, _ = sealer(a, seeded(2)).seal_request("/m/push", b"changes", t)
    assert other != one
    random1, _ = sealer(a).seal_request("/m/push", b"changes", t)
    random2, _ = sealer(a).seal_request("/m/push", b"changes", t)
    assert random1 != random2
