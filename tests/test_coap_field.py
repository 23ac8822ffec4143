"""CoAP the way sites run it: the default port, loss, restarts.

The conformance suite (test_transport.py) runs on free high ports, where
aiocoap always writes the port into a peer's address; these tests bind the
default port 5683 (on 127.0.15.x, addresses no other test uses) and put real
UDP loss between real transports, which is where the field saw crashes.
"""

from __future__ import annotations

import pytest
import trio_asyncio

from meshnode._coap import CoapTransport, open_coap_transport
from meshnode._transport import (  # noqa
    BadAddress,
    RequestTimeout,
    TransportError,
    split_address,
    with_default_port,
)

from .procs import NodeProcess, free_port, wait_until

A, B = "127.0.15.1", "127.0.15.2"
DEFAULT_PORT = 5683


# --------------------------------------------------------------------------
# Addresses on the default port


def test_with_default_port_completes_every_form_aiocoap_writes() -> None:
    assert with_default_port("10.78.0.4", 5683) == "10.78.0.4:5683"
    assert with_default_port("10.78.0.4:61616", 5683) == "10.78.0.4:61616"
    assert with_default_port("[fe80::1%eth0]", 5683) == "[fe80::1%eth0]:5683"
    assert with_default_port("[::1]:61616", 5683) == "[::1]:61616"
    assert with_default_port("::1", 5683) == "[::1]:5683"
    assert with_default_port("node-a.local", 5683) == "node-a.local:5683"
    for bad in ("", ":5683", "10.0.0.1:0", "10.0.0.1:99999", "[::1", "10.0.0.1:x"):
        with pytest.raises(BadAddress):
            with_default_port(bad, 5683)


def test_bad_address_is_a_transport_error_and_a_value_error() -> None:
    for bad in ("10.78.0.4", "127.0.0.525:5683x", "[::1]", "", "a:b:c"):
        with pytest.raises(BadAddress) as caught:
            split_address(bad)
        assert isinstance(caught.value, TransportError) and isinstance(caught.value, ValueError)


async def test_bad_peer_address_raises_a_transport_error_not_a_crash() -> None:
    async with trio_asyncio.open_loop(), open_coap_transport(A, DEFAULT_PORT) as a:
        for bad in ("10.78.0.4", "127.0.0.525:5683x", "[::1]"):
            with pytest.raises(TransportError):
                await a.request(bad, "/m/hello", b"")


async def _learn_and_answer(me: CoapTransport, learned: list[str]) -> None:
    """The node's pattern: record whoever asked, then ask it back."""

    async def hello(payload: bytes, remote: str) -> bytes:
        learned.append(remote)
        return b"hi " + payload

    me.route("/m/hello", hello)


async def test_default_port_peers_learned_from_requests_can_be_asked_back_after_a_restart() -> None:
    """Field issue 10.1: a node recorded a requester on the default port as
    "10.78.0.4" (aiocoap's hostinfo leaves :5683 out) and its next request to
    it raised ValueError where nothing caught it. Here each side learns the
    other only from incoming requests, and one side restarts twice."""
    async with trio_asyncio.open_loop():
        learned_by_a: list[str] = []
        async with open_coap_transport(A, DEFAULT_PORT) as a:
            await _learn_and_answer(a, learned_by_a)
            for incarnation in range(3):
                learned_by_b: list[str] = []
                async with open_coap_transport(B, DEFAULT_PORT) as b:
                    await _learn_and_answer(b, learned_by_b)
                    assert b.address == f"{B}:{DEFAULT_PORT}"
                    assert await b.request(a.address, "/m/hello", b"from b") == b"hi from b"
                    assert learned_by_a[-1] == f"{B}:{DEFAULT_PORT}"
                    # a asks back at the address it learned, b at the one it learns now
                    assert await a.request(learned_by_a[-1], "/m/hello", b"from a") == b"hi from a"
                    assert learned_by_b == [f"{A}:{DEFAULT_PORT}"]
                    assert await b.request(learned_by_b[-1], "/m/hello", b"again") == b"hi again"
                # b is down: a's request to the learned address fails as a TransportError
                with pytest.raises(TransportError):
                    await a.request(learned_by_a[-1], "/m/hello", b"down", timeout=1.0)


@pytest.fixture
def default_port_pair(tmp_path):
    nodes: list[NodeProcess] = []

    def make() -> list[NodeProcess]:
        http = free_port(A)
        # node-1 knows node-2 statically; node-2 learns node-1 only from its requests.
        nodes.append(NodeProcess("node-1", A, tmp_path / "node-1", coap_port=DEFAULT_PORT, http_port=http,
                                 peers=[f"{B}:{DEFAULT_PORT}"]))
        nodes.append(NodeProcess("node-2", B, tmp_path / "node-2", coap_port=DEFAULT_PORT, http_port=http))
        for node in nodes:
            node.start()
        return nodes

    yield make
    for node in nodes:
        node.kill()


def test_two_meshnode_processes_on_the_default_port_survive_restarts(default_port_pair) -> None:
    """Real `meshnode run` processes on 5683: kill -9 one and restart it on the
    same data dir, each in turn; sessions still flow both ways and no process exits."""
    one, two = default_port_pair()

    def open_session(node: NodeProcess, tag: str) -> str:
        r = node.post("/v1/sessions", {"charger": tag, "connector": 1, "id_token": "T"})
        assert r.status_code == 201, r.text
        return r.json()["session_id"]

    def everywhere(sids: list[str]) -> bool:
        return all(node.get(f"/v1/sessions/{sid}")["state"] == "charging" for node in (one, two) for sid in sids)

    sids = [open_session(one, "c1"), open_session(two, "c2")]
    wait_until(lambda: everywhere(sids), what="first sessions on both nodes")
    for round_ in range(1):
        for victim in (two, one):
            victim.kill()
            victim.start()
            sids += [open_session(one, f"c1-{round_}"), open_session(two, f"c2-{round_}")]
            wait_until(lambda sids=sids: everywhere(sids), what=f"sessions both ways after restarting {victim.name}")
            assert one.proc.poll() is None and two.proc.poll() is None
    for node in (one, two):
        log = node.log_path.read_text()
        assert "bad address" not in log and "Traceback" not in log, log[-3000:]
