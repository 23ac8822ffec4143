"""A mesh of mixed failure detectors is refused at hello (``Hello.det``, docs/protocol.md).

The heartbeat detector reads a SWIM node's record (no heartbeats) as a node that stopped
beating, and SWIM reads a heartbeat node's record (no links) as a member no path reaches:
mixed, each side holds the other dead and follows its own leader. So a hello names its
sender's detector and a node refuses one that names another with 4.09, logging which node
runs which, and changes nothing. Real nodes on real CoAP over loopback (127.0.15.x), as a
misconfigured peer would meet them.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import cbor2
import pytest
import trio
import trio_asyncio

from meshnode._coap import CoapTransport, open_coap_transport
from meshnode._discovery import StaticDiscovery
from meshnode._node import Node, NodeConfig
from meshnode._protocol import DetectorMismatch, Hello, ProtocolError
from meshnode._transport import RemoteRefused

HOST_A, HOST_B, CLIENT_HOST = "127.0.15.1", "127.0.15.2", "127.0.15.3"
SILENT = "127.0.15.4:5683"  # a claimed address where nobody answers: a greet-back stays in flight
TIMEOUT = 3.0


def free_udp_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


# --- the message ------------------------------------------------------------------------------


def test_a_hello_carries_its_detector_and_one_without_it_is_still_read() -> None:
    hello = Hello("a", "10.0.0.1:5683", 1, bytes(32), "default", detector="heartbeat")
    assert cbor2.loads(hello.encode())["det"] == "heartbeat"
    assert Hello.decode(hello.encode()) == hello
    older = Hello("a", "10.0.0.1:5683", 1, bytes(32), "default")  # a version 4 node before `det`
    assert "det" not in cbor2.loads(older.encode()) and Hello.decode(older.encode()).detector is None
    older.check_detector("b", "swim")  # it does not say: nothing to refuse
    hello.check_detector("b", "heartbeat")
    with pytest.raises(DetectorMismatch) as refused:
        hello.check_detector("b", "swim")
    assert refused.value.code == "4.09"
    assert refused.value.message.startswith("mixed failure detectors: node 'a' runs 'heartbeat', node 'b' runs 'swim'")


@pytest.mark.parametrize("bad", [3, b"swim", "", "x" * 33, "sw im", "swïm", None])
def test_a_bad_detector_name_is_refused_as_a_bad_hello(bad: object) -> None:
    obj = cbor2.loads(Hello("a", "10.0.0.1:5683", 1, bytes(32), "default").encode())
    obj["det"] = bad
    if bad is None:  # null is "does not say"
        assert Hello.decode(cbor2.dumps(obj)).detector is None
        return
    with pytest.raises(ProtocolError, match="det must be"):
        Hello.decode(cbor2.dumps(obj))


# --- a real node --------------------------------------------------------------------------------


@asynccontextmanager
async def open_nodes(tmp_path: Path, *detectors: str, peers: bool = False) -> AsyncIterator[list[Node]]:
    """One serving node per detector (a at 127.0.15.1, b at .2); with `peers`, each one's
    static discovery names the other's address."""
    hosts = [HOST_A, HOST_B][: len(detectors)]
    ports = [free_udp_port(h) for h in hosts]
    addresses = [f"{h}:{p}" for h, p in zip(hosts, ports, strict=True)]
    async with trio_asyncio.open_loop(), AsyncExitStack() as stack:
        transports = [
            await stack.enter_async_context(open_coap_transport(h, p)) for h, p in zip(hosts, ports, strict=True)
        ]
        nodes = [
            Node(
                NodeConfig(node_id=f"node-{name}", data_dir=tmp_path / name, seed=15, detector=detector),
                transport=transport,
                discovery=StaticDiscovery([a for a in addresses if a != own] if peers else []),
            )
            for name, detector, transport, own in zip("ab", detectors, transports, addresses, strict=False)
        ]
        async with trio.open_nursery() as nursery:
            for node in nodes:
                await nursery.start(node.serve)
            yield nodes
            nursery.cancel_scope.cancel()


def standing(node: Node) -> tuple[object, ...]:
    """What a hello may change: the neighbour table, the addresses to greet (back), the
    membership view, our record."""
    hellos = node.engine.hellos
    assert node.membership is not None
    return (
        sorted(node.engine.table.peers),
        sorted(hellos.unverified),
        sorted(hellos.in_flight),
        [(v.record, v.state) for v in node.membership.view(node.now())],
        node.membership.self_record,
    )


@asynccontextmanager
async def open_client() -> AsyncIterator[CoapTransport]:
    async with open_coap_transport(CLIENT_HOST, free_udp_port(CLIENT_HOST)) as client:
        yield client


async def test_a_hello_from_a_node_with_another_detector_is_refused_logged_and_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    async with open_nodes(tmp_path, "swim") as (node,), open_client() as client:
        served = Hello.decode(await client.request(node.transport.address, "/m/hello", method="GET", timeout=TIMEOUT))
        assert served.detector == "swim"
        before = standing(node)
        bad = Hello("node-x", SILENT, 1, bytes(32), "default", detector="heartbeat").encode()
        with pytest.raises(RemoteRefused) as refused:
            await client.request(node.transport.address, "/m/hello", bad, timeout=TIMEOUT)
        assert refused.value.code == "4.09"
        assert "node 'node-x' runs 'heartbeat', node 'node-a' runs 'swim'" in refused.value.message
        assert standing(node) == before
        lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any("4.09" in line and "'node-x' runs 'heartbeat'" in line and "'node-a' runs 'swim'" in line
                   for line in lines), lines  # fmt: skip
        # Still serving; and the same hello naming our detector is taken (the check above can
        # see a change: the claimed address goes on the greet-back list).
        Hello.decode(await client.request(node.transport.address, "/m/hello", method="GET", timeout=TIMEOUT))
        good = Hello("node-x", SILENT, 1, bytes(32), "default", detector="swim").encode()
        Hello.decode(await client.request(node.transport.address, "/m/hello", good, timeout=TIMEOUT))
        assert standing(node) != before


async def test_two_nodes_with_different_detectors_never_become_neighbours_and_both_say_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each one's hello to the other (static discovery) is refused with 4.09, and each logs a
    warning that names both detectors; neither holds the other as a neighbour or a member."""
    caplog.set_level(logging.WARNING)
    async with open_nodes(tmp_path, "swim", "heartbeat", peers=True) as (a, b):

        def said(line_of: str) -> bool:
            return any(
                line_of in r.getMessage() and "'node-a' runs 'swim'" in r.getMessage()
                for r in caplog.records
                if r.levelno == logging.WARNING
            )

        with trio.fail_after(20):
            # Both sides' refusals (server: "refused request", client: "hello to ... refused").
            while not (said("refused request for /m/hello") and said("hello to")):
                await trio.sleep(0.05)
        for node, other in ((a, b), (b, a)):
            assert other.node_id not in node.engine.table.peers
            assert node.membership is not None
            assert other.node_id not in {v.record.node_id for v in node.membership.view(node.now())}
