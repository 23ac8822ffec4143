"""The Discovery seam: field schema, static peers, and one conformance suite
run against both the in-memory hub and real mDNS on loopback, plus mDNS
between separate processes.

Real mDNS runs on loopback addresses chosen at random in 127.0.0.0/8 and node
ids with a random suffix, because other test runs on the same machine may be
using mDNS on ``lo`` at the same time: every assertion looks only at this
test's own nodes. No set-up of the machine is needed (see docs/discovery.md);
the ``loopback_multicast`` fixture checks that and fails with a clear message
where it does not hold.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
import trio
import trio.testing
import trio_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from meshnode._discovery import (
    SERVICE_TYPE,
    Discovery,
    DiscoveryEvent,
    DiscoveryFailed,
    InvalidFields,
    MemoryDiscoveryHub,
    PeerGone,
    PeerSeen,
    StaticDiscovery,
    build_fields,
    merge_fields,
    parse_fields,
    parse_peer_address,
    peer_seen,
    split_host_port,
    uplink_score,
)
from meshnode._mdns import MdnsDiscovery, check_multicast, decode_txt

TIMEOUT = 30  # seconds; generous, these are not speed assertions
REPO = Path(__file__).resolve().parent.parent
_random = random.SystemRandom()


def unique_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def loopback_address() -> str:
    """A random 127.x.y.z other than the usual 127.0.0.x, so that concurrent
    runs on this machine do not share a responder address."""
    return f"127.{_random.randint(100, 254)}.{_random.randint(0, 255)}.{_random.randint(1, 254)}"


# --------------------------------------------------------------------------
# Fields


def test_build_fields_fills_the_schema():
    fields = build_fields("node-1", 5683, uplink=40, extra={"site": "depot"})
    assert fields == {"id": "node-1", "v": "1", "port": "5683", "up": "40", "site": "depot"}
    assert uplink_score(fields) == 40
    assert uplink_score(build_fields("node-1", 5683)) is None


def test_parse_fields_accepts_zeroconf_bytes():
    raw = {b"id": b"n1", b"v": b"1", b"port": b"5683", b"up": b"0", b"flag": None}
    assert parse_fields(raw) == {"id": "n1", "v": "1", "port": "5683", "up": "0", "flag": ""}


GOOD = {"id": "n1", "v": "1", "port": "5683", "up": "100"}


@pytest.mark.parametrize(
    "change",
    [
        {"id": None},
        {"v": None},
        {"port": None},
        {"id": ""},
        {"id": "x" * 64},
        {"id": "bad\nid"},
        {"v": "0"},
        {"v": "one"},
        {"port": "0"},
        {"port": "65536"},
        {"port": "05683"},
        {"port": "+5683"},
        {"up": "101"},
        {"up": "-1"},
        {"up": "1.5"},
        {"up": ""},
        {"bad=key": "x"},
        {"": "x"},
        {"long": "x" * 300},
    ],
)
def test_parse_fields_rejects(change):
    fields = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(InvalidFields):
        parse_fields(fields)


def test_parse_fields_ignores_key_case_and_keeps_the_first():
    raw = {"ID": "n1", "V": "1", "Port": "5683", "up": "3", "UP": "4"}
    assert parse_fields(raw) == {"id": "n1", "v": "1", "port": "5683", "up": "3"}
    assert merge_fields(parse_fields(raw), {"Up": "9"})["up"] == "9"


@pytest.mark.parametrize(
    "text, expected",
    [
        (b"", {}),
        (b"\x00", {}),
        (b"\x04id=a\x03v=1", {b"id": b"a", b"v": b"1"}),
        (b"\x04ID=a\x04id=b", {b"id": b"a"}),
        (b"\x04flag\x02=x\x03up=", {b"flag": None, b"up": b""}),
        (b"\x05a=b=c", {b"a": b"b=c"}),
    ],
)
def test_decode_txt(text, expected):
    assert decode_txt(text) == expected


@given(st.binary(max_size=300))
def test_decode_txt_fails_only_with_invalid_fields(text):
    try:
        pairs = decode_txt(text)
    except InvalidFields:
        return
    parse_fields_or_invalid(pairs)


def parse_fields_or_invalid(pairs: Mapping[bytes, bytes | None]) -> None:
    try:
        parse_fields(pairs)
    except InvalidFields:
        pass


def test_parse_fields_rejects_non_utf8():
    with pytest.raises(InvalidFields):
        parse_fields({b"id": b"\xff", b"v": b"1", b"port": b"1"})


@given(st.dictionaries(st.binary(max_size=20), st.one_of(st.none(), st.binary(max_size=300)), max_size=8))
def test_parse_fields_fails_only_with_invalid_fields(raw):
    """Whatever bytes a peer puts in its TXT record, parsing either succeeds or
    raises InvalidFields; nothing else can escape to crash the browser. (Random
    bytes are almost never a valid advert: `adverts` below checks real parsing.)"""
    try:
        fields = parse_fields(raw)
    except InvalidFields:
        return
    assert {"id", "v", "port"} <= fields.keys()


_EXTRA_KEY = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="="), min_size=1, max_size=10
).filter(lambda k: k.lower() not in ("id", "v", "port", "up"))
_FAULTS = {
    "missing": None,  # one required field left out
    "id": ["", "a\nb", "x" * 64, "tab\there"],
    "v": ["0", "one", "1000000", "01", ""],
    "port": ["0", "65536", "05683", "+1", "", "1.5", " 1", "٣"],
    "up": ["101", "-1", "", "1.5"],
    "key": ["bad=key", "", "ключ"],
    "utf8": [b"\xff", b"\xc3"],
    "long": ["x" * 300],
}


@st.composite
def adverts(draw):
    """TXT records as a peer might send them: valid three times in four (required fields in any
    order and key case, optional uplink, unknown keys, a repeated key whose first copy counts),
    otherwise with exactly one fault. Returns (raw record, the fields parse_fields must return,
    or None when it must refuse)."""
    required = {
        "id": draw(st.text(min_size=1, max_size=15).filter(str.isprintable)),
        "v": str(draw(st.integers(1, 999_999))),
        "port": str(draw(st.integers(1, 65535))),
    }
    if draw(st.booleans()):
        required["up"] = str(draw(st.integers(0, 100)))
    extras = {
        k: v
        for k, v in draw(st.dictionaries(_EXTRA_KEY, st.one_of(st.none(), st.text(max_size=30)), max_size=3)).items()
    }
    extras = {k: v for k, v in extras.items() if k.lower() == k}  # distinct without case
    entries: list[tuple[str, str | bytes | None]] = [
        (k.upper() if draw(st.booleans()) else k, v) for k, v in [*required.items(), *extras.items()]
    ]
    entries = list(draw(st.permutations(entries)))
    # A fault about one time in four: two booleans both true (an integer in 0..3 == 0 was
    # drawn far more often than one in four, hypothesis favouring the bounds).
    faulty = draw(st.booleans()) and draw(st.booleans())
    fault = draw(st.sampled_from(sorted(_FAULTS))) if faulty else None
    if fault == "missing":
        victim = draw(st.sampled_from(["id", "v", "port"]))
        entries = [(k, v) for k, v in entries if k.lower() != victim]
    elif fault in ("id", "v", "port", "up"):
        bad = draw(st.sampled_from(_FAULTS[fault]))
        found = [i for i, (k, _) in enumerate(entries) if k.lower() == fault]
        if found:
            entries[found[0]] = (entries[found[0]][0], bad)
        else:
            entries.append((fault, bad))
    elif fault == "key":
        entries.insert(draw(st.integers(0, len(entries))), (draw(st.sampled_from(_FAULTS["key"])), "x"))
    elif fault == "utf8":
        i = draw(st.integers(0, len(entries) - 1))
        entries[i] = (entries[i][0], draw(st.sampled_from(_FAULTS["utf8"])))
    elif fault == "long":
        entries.append(("note", _FAULTS["long"][0]))
    if fault is None and draw(st.booleans()):
        # The same key again in another case, with a bad value: only the first copy counts.
        k, _ = draw(st.sampled_from(entries))
        entries.append((k.swapcase() if k.swapcase() != k else k + "x", "05"))
    expected: dict[str, str] | None = None
    if fault is None:
        expected = {}
        for k, v in entries:
            expected.setdefault(k.lower(), "" if v is None else v)
    as_bytes = draw(st.booleans())
    raw = {}
    for k, v in entries:
        if as_bytes:
            raw[k.encode()] = v.encode() if isinstance(v, str) else v
        else:
            raw[k] = v.decode("utf-8", "replace") if isinstance(v, bytes) and fault != "utf8" else v
    return raw, expected


def test_parse_fields_on_adverts_mostly_valid():
    """parse_fields against the schema, on records that are valid most of the time, so the
    property checks parsing and not just the refusal of noise."""
    outcomes: list[bool] = []

    @settings(
        max_examples=300, database=None, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(adverts())
    def check(advert):
        raw, expected = advert
        outcomes.append(expected is not None)
        if expected is None:
            with pytest.raises(InvalidFields):
                parse_fields(raw)
        else:
            assert parse_fields(raw) == expected

    check()
    assert len(outcomes) >= 100 and sum(outcomes) / len(outcomes) >= 0.6, (sum(outcomes), len(outcomes))


@given(
    node_id=st.text(min_size=1, max_size=20).filter(str.isprintable),
    port=st.integers(1, 65535),
    uplink=st.integers(0, 100),
)
def test_build_then_parse_round_trips(node_id, port, uplink):
    fields = build_fields(node_id, port, uplink=uplink)
    raw = {k.encode(): v.encode() for k, v in fields.items()}
    assert parse_fields(raw) == fields


def test_merge_fields_keeps_identity():
    current = build_fields("n1", 5683, uplink=1)
    assert merge_fields(current, {"up": "2"})["up"] == "2"
    assert merge_fields(current, {"id": "n1", "port": "5683"}) == current
    with pytest.raises(InvalidFields, match="id"):
        merge_fields(current, {"id": "n2"})
    with pytest.raises(InvalidFields, match="port"):
        merge_fields(current, {"port": "1"})
    with pytest.raises(InvalidFields):
        merge_fields(current, {"up": "500"})


def test_peer_seen_checks_the_advert_agrees_with_itself():
    event = peer_seen("n1", "10.0.0.5", 5683, GOOD)
    assert event == PeerSeen("n1", "10.0.0.5:5683", GOOD)
    with pytest.raises(InvalidFields, match="instance"):
        peer_seen("n2", "10.0.0.5", 5683, GOOD)
    with pytest.raises(InvalidFields, match="port"):
        peer_seen("n1", "10.0.0.5", 5684, GOOD)
    assert peer_seen("n1", "fd00::1", 5683, GOOD).address == "[fd00::1]:5683"


def test_events_are_immutable():
    source = dict(GOOD)
    event = PeerSeen("n1", "10.0.0.5:5683", source)
    source["up"] = "0"
    assert event.fields["up"] == "100"
    with pytest.raises(TypeError):
        event.fields["up"] = "1"  # type: ignore[index]


# --------------------------------------------------------------------------
# Static peers


@pytest.mark.parametrize(
    "text, expected",
    [
        ("10.0.0.5:5683", "10.0.0.5:5683"),
        ("charger-7.local:5683", "charger-7.local:5683"),
        (" gw:1 ", "gw:1"),
        ("[fd00::1]:5683", "[fd00::1]:5683"),
    ],
)
def test_parse_peer_address_accepts(text, expected):
    assert parse_peer_address(text) == expected


def test_split_host_port():
    assert split_host_port("10.0.0.5:5683") == ("10.0.0.5", 5683)
    assert split_host_port("[fd00::1]:1") == ("fd00::1", 1)


@pytest.mark.parametrize(
    "text",
    [
        "10.0.0.5",
        "10.0.0.5:",
        ":5683",
        "10.0.0.5:0",
        "10.0.0.5:65536",
        "10.0.0.5:http",
        "fd00::1:5683",
        "[fd00::1]",
        "[10.0.0.5]:5683",
        "bad_host:5683",
        "a b:1",
        "",
    ],
)
def test_static_discovery_rejects_bad_addresses(text):
    with pytest.raises(ValueError, match=r"--peer expects HOST:PORT, got"):
        StaticDiscovery([text])


def test_static_discovery_rejects_a_bare_string():
    with pytest.raises(ValueError, match="--peer expects HOST:PORT"):
        StaticDiscovery("10.0.0.5:5683")  # type: ignore[arg-type]


async def test_static_discovery_reports_its_peers_once_and_never_gone(autojump_clock):
    discovery = StaticDiscovery(["10.0.0.5:5683", "gw:5684", "10.0.0.5:5683"])
    send, receive = trio.open_memory_channel[DiscoveryEvent](0)
    async with trio.open_nursery() as nursery:
        await nursery.start(discovery.serve, send)
        got = [await receive.receive(), await receive.receive()]
        assert got == [PeerSeen(None, "10.0.0.5:5683", {}), PeerSeen(None, "gw:5684", {})]
        with trio.move_on_after(24 * 3600):  # a virtual day: nothing more, ever
            extra = await receive.receive()
            pytest.fail(f"unexpected {extra}")
        discovery.update_fields({"up": "12"})
        with pytest.raises(InvalidFields):
            discovery.update_fields({"up": "1000"})
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# Conformance suite: the same tests for every implementation


class Recorder:
    """Runs one discovery and keeps everything it reports."""

    def __init__(self, discovery: Discovery, node_id: str, address: str) -> None:
        self.discovery = discovery
        self.node_id = node_id
        self.address = address
        self.events: list[DiscoveryEvent] = []
        self._changed = trio.Event()
        self._scope = trio.CancelScope()
        self._done = trio.Event()

    async def start(self, nursery: trio.Nursery) -> None:
        """Serve in ``nursery``; returns once serving has started. Errors
        from serve come out of here as they are, not in an ExceptionGroup."""
        send, receive = trio.open_memory_channel[DiscoveryEvent](0)
        nursery.start_soon(self._collect, receive)
        await nursery.start(self._run, send)

    async def _run(self, send: trio.MemorySendChannel[DiscoveryEvent], *, task_status: trio.TaskStatus[None]) -> None:
        try:
            async with send:
                with self._scope:
                    await self.discovery.serve(send, task_status=task_status)
        finally:
            self._done.set()

    async def _collect(self, receive: trio.MemoryReceiveChannel[DiscoveryEvent]) -> None:
        async for event in receive:
            self.events.append(event)
            self._changed.set()
            self._changed = trio.Event()

    async def stop(self) -> None:
        self._scope.cancel()
        await self._done.wait()

    def view(self) -> dict[str | None, PeerSeen]:
        """Who this node believes is there now, folded from its events."""
        peers: dict[str | None, PeerSeen] = {}
        for event in self.events:
            if isinstance(event, PeerSeen):
                peers[event.node_id] = event
            else:
                peers.pop(event.node_id, None)
        return peers

    async def wait_until(self, predicate: Callable[[Recorder], bool], what: str) -> None:
        try:
            with trio.fail_after(TIMEOUT):
                while not predicate(self):
                    await self._changed.wait()
        except trio.TooSlowError:
            pytest.fail(f"{self.node_id}: timed out waiting until {what}; events: {self.events}")

    async def sees(self, other: Recorder, **fields: str) -> PeerSeen:
        def ok(me: Recorder) -> bool:
            seen = me.view().get(other.node_id)
            return seen is not None and all(seen.fields.get(k) == v for k, v in fields.items())

        await self.wait_until(ok, f"it sees {other.node_id} with {fields}")
        return self.view()[other.node_id]


async def start_all(nursery: trio.Nursery, recorders: Iterable[Recorder]) -> None:
    """Start several discoveries concurrently (mDNS probing takes a second each)."""
    async with trio.open_nursery() as starter:
        for recorder in recorders:
            starter.start_soon(recorder.start, nursery)


class RawAdvert(Protocol):
    async def update(self, fields: Mapping[str, str]) -> None: ...


class Harness(Protocol):
    """What the conformance suite needs from an implementation."""

    name: str
    record_flush_delay: float
    """Seconds after which a superseded advertisement counts as old."""

    def make(self, prefix: str, fields: Mapping[str, str] | None = None) -> Recorder: ...

    def raw_adverts(self, adverts: Sequence[tuple[str, Mapping[str, str]]]) -> Any:
        """Async context manager: publish adverts that are not nodes, with
        fields as given (unchecked); yields one RawAdvert each."""
        ...

    def resources(self) -> object:
        """A snapshot of what a running discovery holds (tasks, sockets)."""
        ...


def trio_task_count() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


def socket_fds() -> set[str]:
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


@dataclass
class MemoryHarness:
    hub: MemoryDiscoveryHub
    name: str = "memory"
    record_flush_delay: float = 0.0

    def make(self, prefix: str, fields: Mapping[str, str] | None = None) -> Recorder:
        node_id = unique_id(prefix)
        address = f"{node_id}.sim:5683"
        return Recorder(self.hub.discovery(node_id, address, fields), node_id, address)

    @asynccontextmanager
    async def raw_adverts(self, adverts: Sequence[tuple[str, Mapping[str, str]]]) -> AsyncIterator[list[RawAdvert]]:
        with ExitStack() as stack:
            yield [
                _MemoryRaw(stack.enter_context(self.hub.advertise(instance, f"{instance}.raw:5683", fields)))
                for instance, fields in adverts
            ]

    def resources(self) -> object:
        return (trio_task_count(), sorted(self.hub._adverts), sorted(self.hub._observers))


@dataclass
class _MemoryRaw:
    advert: Any

    async def update(self, fields: Mapping[str, str]) -> None:
        self.advert.update(fields)


@dataclass
class MdnsHarness:
    loop: Any
    name: str = "mdns"
    record_flush_delay: float = 1.5  # RFC 6762 section 10.2 flushes records older than 1 s

    def make(self, prefix: str, fields: Mapping[str, str] | None = None) -> Recorder:
        node_id = unique_id(prefix)
        bind = loopback_address()
        port = _random.randint(20000, 60000)
        return Recorder(MdnsDiscovery(node_id, bind, port, fields), node_id, f"{bind}:{port}")

    @asynccontextmanager
    async def raw_adverts(self, adverts: Sequence[tuple[str, Mapping[str, Any]]]) -> AsyncIterator[list[RawAdvert]]:
        """Register ServiceInfos straight with zeroconf: the way to play a peer
        whose TXT record breaks the schema."""
        bind = loopback_address()

        def info(instance: str, fields: Mapping[str, Any]) -> AsyncServiceInfo:
            return AsyncServiceInfo(
                SERVICE_TYPE,
                f"{instance}.{SERVICE_TYPE}",
                port=int(fields.get("port", "5683")) if str(fields.get("port", "")).isdigit() else 5683,
                properties=dict(fields),
                addresses=[bind],
                server=f"raw-{uuid.uuid4().hex[:8]}.local.",
            )

        async def open_() -> AsyncZeroconf:
            return AsyncZeroconf(interfaces=[bind], ip_version=IPVersion.V4Only)

        azc = await trio_asyncio.aio_as_trio(open_)()
        try:
            infos = [info(instance, fields) for instance, fields in adverts]

            async def register() -> None:
                tasks = await asyncio.gather(*(azc.async_register_service(i) for i in infos))
                await asyncio.gather(*tasks)

            await trio_asyncio.aio_as_trio(register)()
            yield [_MdnsRaw(azc, i, info) for i in infos]
        finally:
            with trio.CancelScope(shield=True):
                await trio_asyncio.aio_as_trio(azc.async_close)()

    def resources(self) -> object:
        return (trio_task_count(), len(asyncio.all_tasks(self.loop)), socket_fds())


@dataclass
class _MdnsRaw:
    azc: AsyncZeroconf
    registered: AsyncServiceInfo
    make_info: Callable[[str, Mapping[str, str]], AsyncServiceInfo]

    async def update(self, fields: Mapping[str, str]) -> None:
        instance = self.registered.name[: -len(SERVICE_TYPE) - 1]
        new = self.make_info(instance, fields)
        new.server = self.registered.server

        async def update() -> None:
            await (await self.azc.async_update_service(new))

        await trio_asyncio.aio_as_trio(update)()


@pytest.fixture(scope="session")
def loopback_multicast() -> None:
    """mDNS between 127.0.0.0/8 addresses needs no set-up on Linux (see
    docs/discovery.md); prove it before relying on it, and fail loudly if
    this machine differs."""
    check_multicast(loopback_address())


@pytest.fixture(params=["memory", "mdns"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        yield MemoryHarness(MemoryDiscoveryHub())
        return
    request.getfixturevalue("loopback_multicast")
    async with trio_asyncio.open_loop() as loop:
        yield MdnsHarness(loop)


def own_events(recorder: Recorder) -> list[DiscoveryEvent]:
    return [e for e in recorder.events if e.node_id == recorder.node_id]


async def test_peers_see_each_other_with_fields_but_not_themselves(harness: Harness):
    a = harness.make("a", {"up": "10"})
    b = harness.make("b", {"up": "20", "site": "depot"})
    async with trio.open_nursery() as nursery:
        await start_all(nursery, [a, b])
        seen_b = await a.sees(b)
        seen_a = await b.sees(a)
        assert seen_b == PeerSeen(
            b.node_id,
            b.address,
            {"id": b.node_id, "v": "1", "port": b.address.rsplit(":")[1], "up": "20", "site": "depot"},
        )
        assert seen_a == PeerSeen(
            a.node_id, a.address, {"id": a.node_id, "v": "1", "port": a.address.rsplit(":")[1], "up": "10"}
        )
        assert own_events(a) == [] and own_events(b) == []
        nursery.cancel_scope.cancel()


async def test_update_fields_reaches_the_peer(harness: Harness):
    a = harness.make("a", {"up": "10"})
    b = harness.make("b")
    async with trio.open_nursery() as nursery:
        await start_all(nursery, [a, b])
        await b.sees(a, up="10")
        a.discovery.update_fields({"up": "73"})
        seen = await b.sees(a, up="73")
        assert seen.address == a.address
        a.discovery.update_fields({"up": "74"})
        a.discovery.update_fields({"up": "75", "extra": "x"})
        await b.sees(a, up="75", extra="x")
        assert own_events(a) == []
        nursery.cancel_scope.cancel()


async def test_a_value_going_back_to_an_earlier_one_is_reported(harness: Harness):
    """An uplink score that flaps (10, 20, 10, 20): every change reaches the
    peer, including a return to a value the peer has seen before. The pauses
    let mDNS mark superseded records as expiring (RFC 6762 section 10.2),
    the state in which python-zeroconf's browser stays silent."""
    a = harness.make("a", {"up": "10"})
    b = harness.make("b")
    async with trio.open_nursery() as nursery:
        await start_all(nursery, [a, b])
        await b.sees(a, up="10")
        for up in ("20", "10", "20"):
            await trio.sleep(harness.record_flush_delay)
            a.discovery.update_fields({"up": up})
            await b.sees(a, up=up)
        nursery.cancel_scope.cancel()


async def test_fields_updated_before_serving_are_advertised(harness: Harness):
    a = harness.make("a", {"up": "10"})
    b = harness.make("b")
    a.discovery.update_fields({"up": "90"})
    async with trio.open_nursery() as nursery:
        await start_all(nursery, [a, b])
        await b.sees(a, up="90")
        assert [e.fields["up"] for e in b.events if isinstance(e, PeerSeen) and e.node_id == a.node_id] == ["90"]
        nursery.cancel_scope.cancel()


async def test_update_fields_rejects_bad_values_and_keeps_the_old_ones(harness: Harness):
    a = harness.make("a", {"up": "10"})
    for bad in ({"up": "101"}, {"id": "someone-else"}, {"port": "1"}, {"v": "x"}):
        with pytest.raises(ValueError):
            a.discovery.update_fields(bad)
    assert a.discovery.fields["up"] == "10"  # type: ignore[attr-defined]


async def test_stopping_sends_peer_gone_and_restarting_peer_seen(harness: Harness):
    a = harness.make("a")
    b = harness.make("b")
    async with trio.open_nursery() as nursery:
        await start_all(nursery, [a, b])
        await b.sees(a)
        await a.stop()
        await b.wait_until(lambda r: PeerGone(a.node_id, a.address) in r.events, f"{a.node_id} is gone")
        assert a.node_id not in b.view()

        again = Recorder(a.discovery, a.node_id, a.address)
        await again.start(nursery)
        await b.wait_until(
            lambda r: isinstance(r.events[-1], PeerSeen) and a.node_id in r.view(), f"{a.node_id} is back"
        )
        nursery.cancel_scope.cancel()


async def test_malformed_adverts_are_ignored_and_browsing_goes_on(harness: Harness, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO, logger="meshnode")
    a = harness.make("a")
    bad = {
        unique_id("bad-up"): {"v": "1", "port": "5683", "up": "999"},
        unique_id("bad-missing-id"): {"v": "1", "port": "5683"},
        unique_id("bad-other-id"): {"id": "impostor", "v": "1", "port": "5683"},
        unique_id("bad-version"): {"v": "1.0", "port": "5683"},
    }
    adverts = [
        (name, {"id": name, **fields} if "missing" not in name and "other" not in name else fields)
        for name, fields in bad.items()
    ]
    late = unique_id("good-late")
    async with trio.open_nursery() as nursery:
        await start_all(nursery, [a])
        async with harness.raw_adverts([*adverts, (late, {"id": late, "v": "1", "port": "5683", "up": "5"})]) as raws:
            await a.wait_until(lambda r: late in r.view(), f"it sees {late}")

            def warned(name: str) -> bool:
                return any(rec.levelno == logging.WARNING and name in rec.getMessage() for rec in caplog.records)

            with trio.fail_after(TIMEOUT):
                while not all(warned(name) for name in bad):
                    await trio.sleep(0.05)
            assert not [e for e in a.events if e.node_id in bad or e.node_id == "impostor"]

            # A good peer that turns bad keeps its last good advertisement.
            await raws[-1].update({"id": late, "v": "1", "port": "5683", "up": "-3"})
            with trio.fail_after(TIMEOUT):
                while not any(
                    "up='-3'" in rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING
                ):
                    await trio.sleep(0.05)
            await raws[-1].update({"id": late, "v": "1", "port": "5683", "up": "6"})
            await a.wait_until(lambda r: r.view().get(late) is not None and r.view()[late].fields["up"] == "6", "up=6")
            assert [e.fields["up"] for e in a.events if isinstance(e, PeerSeen) and e.node_id == late] == ["5", "6"]

            # And a new node is still discovered after all that.
            b = harness.make("b")
            await b.start(nursery)
            await a.sees(b)
        nursery.cancel_scope.cancel()


async def test_shutdown_leaves_no_tasks_or_sockets(harness: Harness):
    before = harness.resources()
    a = harness.make("a")
    b = harness.make("b")
    async with trio.open_nursery() as nursery:
        await start_all(nursery, [a, b])
        await a.sees(b)
        await b.sees(a)
        await a.stop()
        await b.stop()
    assert harness.resources() == before


async def test_serving_twice_at_once_is_refused(harness: Harness):
    a = harness.make("a")
    async with trio.open_nursery() as nursery:
        await a.start(nursery)
        send, _ = trio.open_memory_channel[DiscoveryEvent](0)
        with pytest.raises(RuntimeError, match="already serving"):
            await a.discovery.serve(send)
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------
# In-memory hub: neighbours, virtual time


async def test_hub_neighbours_give_each_node_its_topology(autojump_clock):
    hub = MemoryDiscoveryHub({"a": ["b"], "b": ["a", "c"], "c": ["b"]})
    recorders = [Recorder(hub.discovery(n, f"{n}:5683"), n, f"{n}:5683") for n in "abc"]
    a, b, c = recorders
    async with trio.open_nursery() as nursery:
        await start_all(nursery, recorders)
        await trio.testing.wait_all_tasks_blocked()
        assert set(a.view()) == {"b"} and set(b.view()) == {"a", "c"} and set(c.view()) == {"b"}

        hub.set_neighbours({"a": ["b", "c"], "b": ["a"], "c": ["a"]})
        await trio.testing.wait_all_tasks_blocked()
        assert set(a.view()) == {"b", "c"} and set(b.view()) == {"a"} and set(c.view()) == {"a"}
        assert b.events[-1] == PeerGone("c", "c:5683")
        nursery.cancel_scope.cancel()


async def test_hub_delivers_at_the_virtual_time_of_the_change(autojump_clock):
    hub = MemoryDiscoveryHub()
    a = Recorder(hub.discovery("a", "a:5683", {"up": "1"}), "a", "a:5683")
    b = Recorder(hub.discovery("b", "b:5683"), "b", "b:5683")
    times: list[float] = []
    async with trio.open_nursery() as nursery:
        await b.start(nursery)
        await trio.sleep(10)
        await a.start(nursery)
        await b.sees(a)
        times.append(trio.current_time())
        await trio.sleep(5)
        a.discovery.update_fields({"up": "2"})
        await b.sees(a, up="2")
        times.append(trio.current_time())
        await trio.sleep(5)
        await a.stop()
        await b.wait_until(lambda r: "a" not in r.view(), "a is gone")
        times.append(trio.current_time())
        nursery.cancel_scope.cancel()
    assert times == [10.0, 15.0, 20.0]


async def test_hub_refuses_a_second_node_with_the_same_id():
    hub = MemoryDiscoveryHub()
    a = Recorder(hub.discovery("a", "a:1"), "a", "a:1")
    twin = Recorder(hub.discovery("a", "a2:1"), "a", "a2:1")
    b = Recorder(hub.discovery("b", "b:1"), "b", "b:1")
    async with trio.open_nursery() as nursery:
        await start_all(nursery, [a, b])
        with pytest.raises(DiscoveryFailed):
            await twin.start(nursery)
        await trio.testing.wait_all_tasks_blocked()
        assert b.view()["a"].address == "a:1" and not any(isinstance(e, PeerGone) for e in b.events)
        nursery.cancel_scope.cancel()


def test_hub_discovery_validates_its_arguments():
    hub = MemoryDiscoveryHub()
    with pytest.raises(ValueError):
        hub.discovery("a", "no-port")
    with pytest.raises(ValueError):
        hub.discovery("a", "a:1", {"up": "x"})
    with pytest.raises(ValueError):
        hub.discovery("a", "a:1", {"port": "2"})
    assert hub.discovery("a", "a:1", {"up": "3"}).fields == {"id": "a", "v": "1", "port": "1", "up": "3"}


# --------------------------------------------------------------------------
# mDNS specifics


@pytest.mark.parametrize("bind", ["0.0.0.0", "::1", "224.0.0.251", "localhost", ""])
def test_mdns_needs_a_unicast_ipv4_bind_address(bind):
    with pytest.raises(ValueError):
        MdnsDiscovery("n1", bind, 5683, {})


def test_mdns_rejects_bad_own_fields():
    with pytest.raises(ValueError):
        MdnsDiscovery("n1", "127.0.0.2", 5683, {"up": "101"})
    with pytest.raises(ValueError):
        MdnsDiscovery("x" * 64, "127.0.0.2", 5683, {})


async def test_mdns_needs_the_trio_asyncio_loop():
    send, _ = trio.open_memory_channel[DiscoveryEvent](0)
    with pytest.raises(RuntimeError, match="open_loop"):
        await MdnsDiscovery("n1", "127.0.0.2", 5683).serve(send)


async def test_mdns_on_an_address_we_do_not_have_fails_cleanly():
    send, _ = trio.open_memory_channel[DiscoveryEvent](0)
    before = socket_fds()
    async with trio_asyncio.open_loop():
        with pytest.raises(DiscoveryFailed, match="198.51.100.7") as info:
            await MdnsDiscovery("n1", "198.51.100.7", 5683).serve(send)  # TEST-NET-2, never local
    assert isinstance(info.value.__cause__, OSError)
    assert socket_fds() == before


async def test_mdns_refuses_a_node_id_already_on_the_link(loopback_multicast):
    node_id = unique_id("twin")
    async with trio_asyncio.open_loop():
        first = Recorder(MdnsDiscovery(node_id, loopback_address(), 5683), node_id, "")
        second = MdnsDiscovery(node_id, loopback_address(), 5683)
        send, _ = trio.open_memory_channel[DiscoveryEvent](0)
        async with trio.open_nursery() as nursery:
            await first.start(nursery)
            with trio.fail_after(TIMEOUT), pytest.raises(DiscoveryFailed, match="already advertised"):
                await second.serve(send)
            nursery.cancel_scope.cancel()


async def test_mdns_ignores_a_txt_record_that_is_not_utf8(loopback_multicast, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="meshnode")
    async with trio_asyncio.open_loop() as loop:
        harness = MdnsHarness(loop)
        a = harness.make("a")
        name = unique_id("bad-bytes")
        good = unique_id("good")
        async with trio.open_nursery() as nursery:
            await a.start(nursery)
            adverts: list[tuple[str, dict[str, Any]]] = [
                (name, {"id": name, "v": "1", "port": "5683", "up": b"\xff\xfe"}),
                (good, {"id": good, "v": "1", "port": "5683"}),
            ]
            async with harness.raw_adverts(adverts):
                await a.wait_until(lambda r: good in r.view(), f"it sees {good}")
                with trio.fail_after(TIMEOUT):
                    while not any(name in rec.getMessage() and "UTF-8" in rec.getMessage() for rec in caplog.records):
                        await trio.sleep(0.05)
                assert name not in a.view()
            nursery.cancel_scope.cancel()


def test_check_multicast_on_loopback():
    check_multicast(loopback_address(), timeout=5)


# --------------------------------------------------------------------------
# mDNS between processes: what a multi-process run on one machine relies on

CHILD = r"""
import json, os, sys
import trio, trio_asyncio
from meshnode._discovery import PeerSeen
from meshnode._mdns import MdnsDiscovery

def emit(**record):
    print(json.dumps(record), flush=True)

async def main(node_id, bind, port, up):
    discovery = MdnsDiscovery(node_id, bind, int(port), {"up": up})
    send, receive = trio.open_memory_channel(0)
    async with trio_asyncio.open_loop():
        async with trio.open_nursery() as nursery:
            async def report():
                async for event in receive:
                    emit(kind=type(event).__name__, node_id=event.node_id, address=event.address,
                         fields=dict(event.fields) if isinstance(event, PeerSeen) else None)
            nursery.start_soon(report)
            await nursery.start(discovery.serve, send)
            emit(kind="started")
            buffer = b""
            async with trio.lowlevel.FdStream(os.dup(0)) as commands:
                async for chunk in commands:
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        verb, _, arg = line.decode().partition(" ")
                        if verb == "up":
                            discovery.update_fields({"up": arg})
                        elif verb == "quit":
                            nursery.cancel_scope.cancel()
            nursery.cancel_scope.cancel()
    emit(kind="stopped")

trio.run(main, *sys.argv[1:])
"""


class Child:
    """One process running MdnsDiscovery, driven over stdin, reporting JSON lines."""

    def __init__(self, node_id: str, bind: str, port: int, up: str) -> None:
        self.node_id, self.bind, self.port, self.up = node_id, bind, port, up
        self.address = f"{bind}:{port}"
        self.records: list[dict[str, Any]] = []
        self.stderr = b""
        self._changed = trio.Event()
        self.process: trio.Process | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.process = await trio.lowlevel.open_process(
            [sys.executable, "-c", CHILD, self.node_id, self.bind, str(self.port), self.up],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=REPO,
        )
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_stderr)
                task_status.started()
                await self._read_stdout()
            await self.process.wait()
        finally:
            if self.process.returncode is None:
                self.process.kill()
                with trio.CancelScope(shield=True):
                    await self.process.wait()

    async def _read_stdout(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        buffer = b""
        async for chunk in self.process.stdout:
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                self.records.append(json.loads(line))
                self._changed.set()
                self._changed = trio.Event()

    async def _read_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.stderr += chunk

    async def command(self, line: str) -> None:
        assert self.process is not None and self.process.stdin is not None
        await self.process.stdin.send_all(line.encode() + b"\n")

    def view(self) -> dict[str, dict[str, Any]]:
        peers: dict[str, dict[str, Any]] = {}
        for record in self.records:
            if record["kind"] == "PeerSeen":
                peers[record["node_id"]] = record
            elif record["kind"] == "PeerGone":
                peers.pop(record["node_id"], None)
        return peers

    async def wait_until(self, predicate: Callable[[Child], bool], what: str) -> None:
        try:
            with trio.fail_after(TIMEOUT):
                while not predicate(self):
                    await self._changed.wait()
        except trio.TooSlowError:
            pytest.fail(f"{self.node_id}: timed out waiting until {what}; got {self.records}; stderr {self.stderr!r}")


@pytest.mark.slow
async def test_mdns_across_processes(loopback_multicast):
    children = [Child(unique_id(n), loopback_address(), 5683, up) for n, up in (("p", "10"), ("q", "20"), ("r", "30"))]
    p, q, r = children
    async with trio.open_nursery() as nursery:
        for child in children:
            await nursery.start(child.run)

        def sees(*others: Child, **fields: str) -> Callable[[Child], bool]:
            def ok(me: Child) -> bool:
                view = me.view()
                return all(
                    o.node_id in view and all(view[o.node_id]["fields"].get(k) == v for k, v in fields.items())
                    for o in others
                )

            return ok

        for child in children:
            others = [o for o in children if o is not child]
            await child.wait_until(sees(*others), "it sees the other two")
            for other in others:
                assert child.view()[other.node_id] == {
                    "kind": "PeerSeen",
                    "node_id": other.node_id,
                    "address": other.address,
                    "fields": {"id": other.node_id, "v": "1", "port": "5683", "up": other.up},
                }
            assert not [rec for rec in child.records if rec.get("node_id") == child.node_id]

        await p.command("up 77")
        await q.wait_until(sees(p, up="77"), "p's new uplink score")
        await r.wait_until(sees(p, up="77"), "p's new uplink score")

        await r.command("quit")
        for child in (p, q):
            await child.wait_until(lambda c: r.node_id not in c.view(), "r is gone")
            assert {"kind": "PeerGone", "node_id": r.node_id, "address": r.address, "fields": None} in child.records

        await p.command("quit")
        await q.command("quit")
    for child in children:
        assert child.process is not None and child.process.returncode == 0, child.stderr
        assert child.records[-1] == {"kind": "stopped"}
        assert b"Traceback" not in child.stderr, child.stderr.decode()
