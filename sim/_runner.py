"""The simulation: many real `meshnode.Node`s in one trio run under a MockClock.

What the simulator swaps, and nothing else (DESIGN.md, "Seams"):

- transport: one `SimNetwork` (an in-memory `MemoryNetwork` with links);
- discovery: one `MemoryDiscoveryHub` whose neighbour relation is the topology;
- uplink: a `CloudClient` per uplink node over a simulated path to the
  in-process reference cloud (`sim._cloud`);
- clock: `trio.current_time()` is virtual (`VirtualClock`, which jumps to the
  next deadline as soon as no task can run, as `MockClock(autojump_threshold=0)`),
  and the wall clock handed to nodes and cloud is ``EPOCH + virtual time``;
- store: each node's `DocStore` on a `MemoryAdapter` over a dict that outlives
  the node (its "disk"), handed in through `Node(store=...)`; the adapter does
  not block, so every store call runs in the trio thread and virtual time never
  moves while it runs. Device and store keys come in through `Node(device_key=)`
  and the store opener, derived from the seed (nothing is written to files).

Faults act on those seams only: a power loss cancels the node's scope and later
starts a new `Node` on the same disk; a wipe gives it a fresh disk first
(and a new device key, as a factory-reset charger would); a partition
cuts links in the network; an uplink outage makes its transport refuse.

Determinism: every random choice of the simulator (topology, workload, churn,
outages) comes from a `random.Random` keyed by the seed and by *what* it is for
(``f"{seed}:workload:{node}"``), never from one stream consumed in task order;
the network keys each message's fate by its content (see `sim._network`);
device keys and the cloud's key are derived from the seed; whatever is
iterated is sorted. Operations that trio might run at one instant are kept
apart: sessions retry a node that is down after a random delay, not on a
shared wake-up.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import random
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.signing
import networkx as nx
import trio

from crdt import AsyncDocStore, DocStore, MemoryAdapter, StorageKey, open_doc_store
from meshnode import MemoryDiscoveryHub
from meshnode import Node, NodeConfig, SealedTransport
from meshnode.services import ServiceError

from ._cloud import CLOUD_URL, SimCloud, SimSite, UplinkSchedule, open_sim_cloud
from ._metrics import Metrics, holds, receipt_of, rounded
from ._network import SimNetwork
from ._scenario import Dist, LinkSpec, Scenario, ScenarioError
from ._topology import build_topology, layout

log = logging.getLogger("sim")

EPOCH = 1_800_000_000.0
"""The wall-clock time (seconds since 1970) at virtual time 0."""

SAMPLE_EARLY = 1e-6

MEMBERSHIP_WARMUP_S = 60.0
"""Samples before this virtual time are left out of the membership figures (start-up)."""

BOOT_S = 1.0
"""A node starts serving up to this many seconds after it is powered (see `_boot_time`)."""

FINAL_STOP_DELAY = 2.0
"""Sessions still open when the workload ends stop this long after the faults end
(after the nodes powered up then have booted)."""


@dataclass
class NodeSlot:
    """One simulated node across its lives (restarts)."""

    node_id: str
    index: int
    address: str
    data_dir: Path
    uplink: UplinkSchedule | None = None
    uplink_latency: Dist | None = None
    node: Node | None = None
    last_node: Node | None = None
    scope: trio.CancelScope | None = None
    stopped: trio.Event | None = None
    running: bool = False
    generation: int = 0
    """Device-key generation: bumped by every wipe."""
    disk: dict[StorageKey, bytes] = field(default_factory=dict)
    """What the node's store holds: survives a power loss, replaced by a wipe."""
    starts: int = 0
    session_count: int = 0


@dataclass
class Sample:
    t: float
    values: dict[str, Any]


@dataclass
class RunResult:
    summary: dict[str, Any]
    samples: list[Sample]
    convergence_times: list[float]
    graph: nx.Graph
    positions: dict[str, tuple[float, float]]
    uplinks: list[str]
    leader: str | None
    wall_seconds: float
    events_log: list[tuple[float, str]] = field(default_factory=list)


class VirtualClock(trio.abc.Clock):
    """Virtual time that jumps to the next deadline as soon as no task can run.

    What `trio.testing.MockClock(autojump_threshold=0)` does, for less: MockClock
    reads the real clock on every `current_time()` (to scale it by its rate) and
    jumps in a pass of trio's loop of its own (an idle pass, then the jump, then a
    pass that fires the deadline); this clock is a number, and it jumps inside
    `deadline_to_sleep_time`, which trio calls only when no task is runnable, so the
    deadline fires in the same pass. Nothing in the simulator waits for
    `wait_all_tasks_blocked` (which MockClock would let go first).
    """

    def __init__(self) -> None:
        self._now = 0.0

    def start_clock(self) -> None:
        pass

    def current_time(self) -> float:
        return self._now

    def deadline_to_sleep_time(self, deadline: float) -> float:
        if deadline > self._now:
            if deadline == math.inf:
                return math.inf  # nothing will ever wake: wait for I/O (trio caps the wait)
            self._now = deadline
        return 0.0


def address_of(index: int) -> str:
    return f"10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}:5683"


def _workdir_base() -> str | None:
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


class Simulation:
    """One run of a scenario with one seed.

    Args:
        scenario: what to simulate.
        seed: the run's seed; the same scenario and seed give the same results.
        workdir: where node data directories go (a temporary one when None).
        progress: called about once per `sample_interval` of virtual time with
            (virtual seconds, end of the workload in virtual seconds, counters).
        checks: (virtual time, fn(sim)) pairs: fn runs at that virtual time,
            inside the run (tests use it to look at nodes mid-run).
    """

    def __init__(
        self,
        scenario: Scenario,
        seed: int,
        workdir: Path | None = None,
        *,
        progress: Callable[[float, float, dict[str, Any]], None] | None = None,
        checks: Sequence[tuple[float, Callable[[Simulation], Any]]] = (),
    ) -> None:
        self.scenario = scenario
        self.seed = seed
        self._workdir = workdir
        self._progress = progress
        self._checks = sorted(checks, key=lambda c: c[0])
        self.graph = build_topology(scenario.topology, random.Random(f"{seed}:topology"), scenario.base_dir)
        self.ids: list[str] = sorted(self.graph.nodes)
        known = set(self.ids)

        def check_node(node_id: str, where: str) -> None:
            if node_id not in known:
                raise ScenarioError(f"{where}: no node {node_id!r} in the topology")

        for a, b, _ in scenario.links:
            check_node(a, "network.links")
            check_node(b, "network.links")
        self.uplink_ids = self._pick(scenario.uplink_nodes, "uplink.nodes", "uplinks")
        for node_id in scenario.uplinks:
            check_node(node_id, "uplink.schedule")
        self.charger_ids = (
            self._pick(scenario.workload.chargers, "workload.chargers", "chargers") if scenario.workload else []
        )
        for crash in scenario.crashes:
            if crash.node not in ("leader", "random", "uplink"):
                check_node(crash.node, "faults.crash")
        self.join_at: dict[str, float] = {}
        for join in scenario.joins:
            check_node(join.node, "faults.join")
            self.join_at[join.node] = join.at
        self._hop_cache: dict[str, dict[str, int]] = {}
        self.metrics = Metrics(self._hops)
        self.samples: list[Sample] = []
        self.events_log: list[tuple[float, str]] = []
        self.slots: dict[str, NodeSlot] = {}
        self.net: SimNetwork | None = None
        self.hub: MemoryDiscoveryHub | None = None
        self.cloud: SimCloud | None = None
        self.site = SimSite(seed, scenario.site, EPOCH) if scenario.sealed else None
        self.clock: VirtualClock | None = None
        self._nursery: trio.Nursery | None = None
        self._open_sessions = 0
        self._leader_seen: str | None = None
        self.leader_changes = 0
        self.leaders_max = 0
        self.counters: Counter[str] = Counter()
        self.end_time = 0.0
        self.final_leader: str | None = None

    # --- set-up ----------------------------------------------------------------------

    def _pick(self, spec: Any, where: str, what: str) -> list[str]:
        if spec == "all":
            return list(self.ids)
        if isinstance(spec, int):
            if not 0 <= spec <= len(self.ids):
                raise ScenarioError(f"{where}: {spec} {what}, but the topology has {len(self.ids)} nodes")
            return sorted(random.Random(f"{self.seed}:{what}").sample(self.ids, spec))
        for node_id in spec:
            if node_id not in self.graph:
                raise ScenarioError(f"{where}: no node {node_id!r} in the topology")
        return sorted(set(spec))

    def _hops(self, origin: str) -> dict[str, int]:
        got = self._hop_cache.get(origin)
        if got is None:
            got = self._hop_cache[origin] = dict(nx.single_source_shortest_path_length(self.graph, origin))
        return got

    def _wall(self) -> float:
        return EPOCH + trio.current_time()

    def _note(self, what: str) -> None:
        t = trio.current_time()
        self.events_log.append((t, what))
        log.info("%s", what)

    # --- running -----------------------------------------------------------------------

    def run(self) -> RunResult:
        """Run the scenario to its end (blocking; one trio run with a `VirtualClock`)."""
        started = time.perf_counter()
        clock = VirtualClock()
        self.clock = clock
        if self._workdir is not None:
            self._workdir.mkdir(parents=True, exist_ok=True)
            summary = trio.run(self._main, self._workdir, clock=clock)
        else:
            with tempfile.TemporaryDirectory(prefix="meshsim-", dir=_workdir_base()) as tmp:
                summary = trio.run(self._main, Path(tmp), clock=clock)
        leader = self.final_leader
        return RunResult(
            summary=summary, samples=self.samples, convergence_times=self.metrics.convergence_times(),
            graph=self.graph, positions=layout(self.graph, self.seed), uplinks=list(self.uplink_ids),
            leader=leader, wall_seconds=time.perf_counter() - started, events_log=self.events_log,
        )  # fmt: skip

    async def _main(self, workdir: Path) -> dict[str, Any]:
        sc = self.scenario
        assert self.clock is not None
        for i, node_id in enumerate(self.ids, 1):
            self.slots[node_id] = NodeSlot(node_id, i, address_of(i), workdir / node_id)
        overrides: dict[tuple[str, str], LinkSpec] = {}
        for a, b, data in sorted(self.graph.edges(data=True)):
            if "link" in data:
                overrides[(a, b)] = data["link"]
        for a, b, spec in sc.links:
            overrides[(a, b)] = spec
        self.net = SimNetwork(
            self.seed, {s.node_id: s.address for s in self.slots.values()},
            sorted(self.graph.edges), sc.network, overrides,
        )  # fmt: skip
        adjacency = {n: frozenset(self.graph.neighbors(n)) for n in self.ids}
        self.hub = MemoryDiscoveryHub(adjacency)
        horizon = sc.duration
        for node_id in self.uplink_ids:
            uplink_spec = sc.uplinks.get(node_id, sc.uplink_default)
            slot = self.slots[node_id]
            slot.uplink = UplinkSchedule.build(uplink_spec, horizon, random.Random(f"{self.seed}:uplink:{node_id}"))
            slot.uplink_latency = uplink_spec.latency or sc.uplink_latency
        try:
            if self.uplink_ids:
                async with open_sim_cloud(self.seed, self._wall, site=self.site) as cloud:
                    self.cloud = cloud
                    return await self._simulate()
            return await self._simulate()
        finally:
            self.cloud = None

    async def _simulate(self) -> dict[str, Any]:
        sc = self.scenario
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for node_id in self.ids:
                if node_id not in self.join_at:
                    nursery.start_soon(self._start_at, self.slots[node_id], 0.0)
            for node_id, at in sorted(self.join_at.items()):
                nursery.start_soon(self._join_later, node_id, at)
            for i, crash in enumerate(sc.crashes):
                nursery.start_soon(self._crash_at, i, crash.node, crash.at, crash.down_for, crash.wipe)
            if sc.churn is not None and sc.churn.crashes_per_hour > 0:
                nursery.start_soon(self._churn)
            for i, part in enumerate(sc.partitions):
                nursery.start_soon(self._partition, i, part)
            for node_id in self.charger_ids:
                nursery.start_soon(self._charger, node_id)
            for at, fn in self._checks:
                nursery.start_soon(self._check_at, at, fn)
            nursery.start_soon(self._sampler)
            await trio.sleep_until(sc.duration)
            deadline = sc.duration + sc.drain
            while trio.current_time() < deadline and not self._settled():
                await trio.sleep(min(sc.sample_interval, deadline - trio.current_time()))
            self.end_time = trio.current_time()
            self._sample()
            summary = self._summary()
            self.final_leader = self._majority_leader()[0]
            await self._shutdown()
            nursery.cancel_scope.cancel()
        return summary

    async def _shutdown(self) -> None:
        """Stop the nodes one at a time.

        Cancelling them all at once trips a race in `MemoryDiscovery.serve`: a
        node that has closed its inbox but not yet left the hub gets a PeerGone
        from a node leaving at the same moment, and `send_nowait` raises
        BrokenResourceError (see docs/sim.md, "Known issues").
        """
        for node_id in self.ids:
            slot = self.slots[node_id]
            if slot.running and slot.scope is not None and slot.stopped is not None:
                slot.running = False
                slot.scope.cancel()
                await slot.stopped.wait()

    async def _check_at(self, at: float, fn: Callable[[Simulation], Any]) -> None:
        await trio.sleep_until(at)
        result = fn(self)
        if hasattr(result, "__await__"):
            await result

    def _settled(self) -> bool:
        if trio.current_time() < self.scenario.duration + FINAL_STOP_DELAY + 3.0:
            return False
        if self._open_sessions or self.metrics.pending_count:
            return False
        if self.cloud is not None and self.metrics.awaiting_receipts():
            return False
        return True

    # --- nodes -------------------------------------------------------------------------

    def _config(self, slot: NodeSlot) -> NodeConfig:
        return NodeConfig(
            node_id=slot.node_id, data_dir=slot.data_dir, site=self.scenario.site, seed=self.seed,
            cloud_url=CLOUD_URL if slot.uplink is not None else None, **self.scenario.node,
        )  # fmt: skip

    def _secret(self, slot: NodeSlot, name: str) -> bytes:
        """A node's secrets as a factory would provision them: the device key and
        the store's key, derived from the seed, so that signatures, hence documents,
        are the same every run. A wipe bumps the generation: new ones."""
        return hashlib.sha256(f"{self.seed}:{slot.node_id}:{name}:{slot.generation}".encode()).digest()

    def _open_store(self, slot: NodeSlot) -> AbstractAsyncContextManager[AsyncDocStore]:
        return open_doc_store(adapter=MemoryAdapter(slot.disk), key=self._secret(slot, "store.key"))

    def stored_docs(self, node_id: str) -> set[str] | None:
        """The documents on a node's disk (read as its next start would), or None for an empty disk."""
        slot = self.slots[node_id]
        if not slot.disk:
            return None
        store = DocStore(adapter=MemoryAdapter(slot.disk), key=self._secret(slot, "store.key"))
        try:
            return set(store.load_all())
        finally:
            store.close()

    async def _serve_node(
        self, slot: NodeSlot, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        assert self.net is not None and self.hub is not None
        slot.stopped = trio.Event()
        try:
            with trio.CancelScope() as scope:
                slot.scope = scope
                async with self.net.transport(slot.address) as inner_transport:
                    device_key = nacl.signing.SigningKey(self._secret(slot, "node.key"))
                    transport, identity, sealer = self._sealed(slot, inner_transport, device_key)
                    cloud = None
                    if slot.uplink is not None and self.cloud is not None:
                        assert slot.uplink_latency is not None
                        cloud = self.cloud.client(slot.node_id, slot.uplink, slot.uplink_latency)
                    node = Node(
                        self._config(slot), transport=transport,
                        discovery=self.hub.discovery(slot.node_id, slot.address),
                        wall_clock=self._wall, cloud=cloud, store=functools.partial(self._open_store, slot),
                        device_key=device_key, identity=identity, sealer=sealer,
                    )  # fmt: skip
                    node.change_listeners.append(functools.partial(self._on_change, slot))
                    async with trio.open_nursery() as inner:
                        await inner.start(node.serve)
                        slot.node = slot.last_node = node
                        slot.running = True
                        slot.starts += 1
                        self.metrics.node_up(slot.node_id, node, trio.current_time())
                        task_status.started()
                        await trio.sleep_forever()
        finally:
            if slot.running:
                slot.running = False
                self.metrics.node_down(slot.node_id, trio.current_time())
            slot.node = None
            slot.stopped.set()

    def _sealed(self, slot: NodeSlot, transport: Any, device_key: nacl.signing.SigningKey) -> tuple[Any, Any, Any]:
        """`sealed = true`: the node is enrolled in the seeded site and seals its traffic."""
        if self.site is None:
            return transport, None, None
        identity = self.site.identity(slot.node_id, device_key)
        sealer = self.site.sealer(identity, slot.starts, self._wall())
        return SealedTransport(transport, sealer, clock=self._wall), identity, sealer

    def _on_change(self, slot: NodeSlot, doc_id: str) -> None:
        if slot.running and slot.node is not None:
            self.metrics.on_change(slot.node_id, slot.node, doc_id, trio.current_time())

    def _boot_time(self, slot: NodeSlot) -> float:
        """How long this start of the node takes to boot: up to BOOT_S, keyed by node and start.

        Besides being true to life, it keeps a node's timers (its probe grid,
        its gossip rounds) off the round numbers that scenarios use for faults,
        so that no fault and no timer of a node fall on one virtual instant,
        where their order would be trio's to choose.
        """
        return random.Random(f"{self.seed}:boot:{slot.node_id}:{slot.starts}").uniform(0.0, BOOT_S)

    async def _start_at(self, slot: NodeSlot, at: float) -> None:
        await trio.sleep_until(at + self._boot_time(slot))
        if slot.running:
            return
        assert self._nursery is not None
        await self._nursery.start(self._serve_node, slot)

    async def _join_later(self, node_id: str, at: float) -> None:
        await trio.sleep_until(at)
        self._note(f"{node_id} joins")
        await self._start_at(self.slots[node_id], at)

    async def _stop_node(self, slot: NodeSlot, *, wipe: bool) -> None:
        assert slot.scope is not None and slot.stopped is not None
        slot.running = False
        self.metrics.node_down(slot.node_id, trio.current_time())
        slot.scope.cancel()
        await slot.stopped.wait()
        if wipe:
            slot.disk = {}
            slot.generation += 1

    async def crash(self, node_id: str, *, down_for: float | None, wipe: bool = False) -> bool:
        """Power loss (or wipe) of one node now; it restarts after `down_for`
        seconds, or when the workload ends if None. False if it was not running."""
        slot = self.slots[node_id]
        if not slot.running:
            return False
        self.counters["wipes" if wipe else "crashes"] += 1
        self._note(f"{node_id} {'wiped' if wipe else 'loses power'}")
        await self._stop_node(slot, wipe=wipe)
        restart = (
            self.scenario.duration if down_for is None else min(trio.current_time() + down_for, self.scenario.duration)
        )
        assert self._nursery is not None
        self._nursery.start_soon(self._restart_at, slot, max(restart, trio.current_time()))
        return True

    async def _restart_at(self, slot: NodeSlot, at: float) -> None:
        await trio.sleep_until(at)
        if slot.running:
            return
        self._note(f"{slot.node_id} powers up")
        await self._start_at(slot, at)

    def _resolve(self, which: str, rng: random.Random) -> str | None:
        running = sorted(n for n, s in self.slots.items() if s.running)
        if not running:
            return None
        if which == "leader":
            leader = self._majority_leader()[0]
            return leader if leader in running else None
        if which == "random":
            return rng.choice(running)
        if which == "uplink":
            return next((n for n in self.uplink_ids if n in running), None)
        return which

    async def _crash_at(self, i: int, which: str, at: float, down_for: float | None, wipe: bool) -> None:
        await trio.sleep_until(at)
        node_id = self._resolve(which, random.Random(f"{self.seed}:crash:{i}"))
        if node_id is None:
            self._note(f"crash #{i}: no {which} node to crash")
            return
        await self.crash(node_id, down_for=down_for, wipe=wipe)

    async def _churn(self) -> None:
        churn = self.scenario.churn
        assert churn is not None
        rng = random.Random(f"{self.seed}:churn")
        rate = churn.crashes_per_hour / 3600.0
        t = 0.0
        while True:
            t += rng.expovariate(rate)
            if t >= self.scenario.duration:
                return
            pick, down, wipe = rng.random(), churn.down_s.sample(rng.random()), rng.random() < churn.wipe_fraction
            await trio.sleep_until(t)
            running = sorted(n for n, s in self.slots.items() if s.running)
            if running:
                await self.crash(running[int(pick * len(running))], down_for=down, wipe=wipe)

    async def _partition(self, i: int, spec: Any) -> None:
        assert self.net is not None
        await trio.sleep_until(spec.at)
        groups = [list(g) for g in spec.groups]
        if spec.split == "halves":
            groups.extend(self.halves())
        self.net.partition(groups)
        self.counters["partitions"] += 1
        self._note(f"partition #{i}: {' | '.join(f'{len(g)} nodes' for g in groups)}")
        heal = self.scenario.duration if spec.heal is None else min(spec.heal, self.scenario.duration)
        await trio.sleep_until(heal)
        self.net.heal()
        self._note(f"partition #{i} healed")

    def halves(self) -> list[list[str]]:
        """The nodes split in two: by x position where the topology has positions, else by id."""
        if all("pos" in self.graph.nodes[n] for n in self.ids):
            order = sorted(self.ids, key=lambda n: (self.graph.nodes[n]["pos"][0], n))
        else:
            order = list(self.ids)
        half = len(order) // 2
        return [sorted(order[:half]), sorted(order[half:])]

    # --- the workload ------------------------------------------------------------------

    async def _charger(self, node_id: str) -> None:
        """Poisson session arrivals on one charger; each runs in a task of its own."""
        w = self.scenario.workload
        assert w is not None and self._nursery is not None
        rng = random.Random(f"{self.seed}:workload:{node_id}")
        rate = w.sessions_per_hour / 3600.0
        if rate <= 0:
            return
        free = list(range(1, w.connectors + 1))
        registers = {c: rng.randrange(0, 10_000_000) for c in free}
        t = self.join_at.get(node_id, 0.0)
        while True:
            t += rng.expovariate(rate)
            if t >= self.scenario.duration:
                return
            session_rng = random.Random(rng.getrandbits(64))
            await trio.sleep_until(t)
            slot = self.slots[node_id]
            if not free or not slot.running:
                self.counters["arrivals_missed"] += 1
                continue
            connector = free.pop(0)
            self._open_sessions += 1
            self._nursery.start_soon(self._session, slot, connector, registers, free, session_rng)

    async def _op(self, slot: NodeSlot, fn: Callable[[Node], Any]) -> Any:
        """One local API call on a node; None if the node is down or the call failed."""
        node = slot.node
        if node is None or not slot.running:
            return None
        try:
            return await fn(node)
        except ServiceError as exc:
            log.info("%s: %s", slot.node_id, exc.message)
            return None
        except Exception:
            if slot.running:
                log.exception("%s: local operation failed", slot.node_id)
            return None

    async def _session(self, slot: NodeSlot, connector: int, registers: dict[int, int], free: list[int],
                       rng: random.Random) -> None:  # fmt: skip
        w = self.scenario.workload
        assert w is not None
        try:
            start = trio.current_time()
            length = max(60.0, w.session_minutes.sample(rng.random()) * 60.0)
            power_w = w.power_kw.sample(rng.random()) * 1000.0
            # Sessions still open when the workload ends stop a little after it, each at
            # a time of its own: two stops on one node at one instant would take the
            # device's event sequence numbers in an order trio chooses.
            end = min(start + length, self.scenario.duration + FINAL_STOP_DELAY + rng.uniform(0.0, 3.0))
            slot.session_count += 1
            token = f"{slot.node_id}-{connector}-{slot.session_count}"
            meter = registers[connector]
            created = await self._op(slot, lambda n: n.create_session(slot.node_id, connector, token, meter_wh=meter))
            if created is None:
                self.counters["sessions_refused"] += 1
                return
            sid = created["session_id"]
            self.metrics.session_started(sid, slot.node_id, [e["event_id"] for e in created["events"]],
                                         trio.current_time())  # fmt: skip
            last = trio.current_time()
            next_meter = last + w.meter_interval
            while next_meter < end:
                await trio.sleep_until(next_meter)
                now = trio.current_time()
                meter += int(power_w * (now - last) / 3600.0)
                last = now
                got = await self._op(slot, lambda n: n.record_event(sid, "meter", meter))
                if got is not None:
                    self.metrics.event_recorded(sid, got["event_id"], "meter", now)
                next_meter += w.meter_interval
            await trio.sleep_until(end)
            while True:
                now = trio.current_time()
                final = meter + int(power_w * (min(now, end) - last) / 3600.0)
                got = await self._op(slot, lambda n: n.record_event(sid, "stop", final))
                if got is not None:
                    meter = final
                    self.metrics.event_recorded(sid, got["event_id"], "stop", now)
                    break
                if now >= self.scenario.duration + self.scenario.drain:
                    self.counters["stops_failed"] += 1
                    break
                # The node is down (or lost the session to a wipe): try again a
                # little later, at a time of this session's own choosing.
                await trio.sleep(rng.uniform(5.0, 15.0))
            registers[connector] = meter
        finally:
            free.append(connector)
            free.sort()
            self._open_sessions -= 1

    # --- sampling ----------------------------------------------------------------------

    def _majority_leader(self) -> tuple[str | None, int]:
        seen = Counter(s.node.leader for s in self.slots.values() if s.running and s.node is not None)
        distinct = len([leader for leader in seen if leader is not None])
        candidates = sorted(((-count, leader) for leader, count in seen.items() if leader is not None))
        return (candidates[0][1] if candidates else None), distinct

    async def _sampler(self) -> None:
        """A row every `sample_interval`, taken a microsecond before the round time it is
        labelled with: scenarios put faults on round times, and a fault and a sample at
        one instant would run in an order of trio's choosing."""
        interval = self.scenario.sample_interval
        k = 0
        while True:
            await trio.sleep_until(max(0.0, k * interval - SAMPLE_EARLY))
            self._sample(k * interval)
            k += 1

    def _sample(self, label: float | None = None) -> None:
        assert self.net is not None
        now = trio.current_time() if label is None else label
        if self.samples and self.samples[-1].t == now:
            return
        leader, _ = self._majority_leader()
        if leader is not None:
            if self._leader_seen is not None and leader != self._leader_seen:
                self._note(f"leader {self._leader_seen} -> {leader}")
            self._leader_seen = leader
        # What the nodes believed, node by node (a majority's leader hid splits and flips).
        distinct = self.metrics.sample_leaders(now)
        live_share, alive_share = self.metrics.sample_membership(trio.current_time(), len(self.samples))
        self.leader_changes = self.metrics.leaders.changes
        self.leaders_max = self.metrics.leaders.distinct_max
        cloud = self.cloud.counters if self.cloud is not None else None
        values = {
            "nodes_running": sum(1 for s in self.slots.values() if s.running),
            "messages": self.net.total.messages,
            "bytes": self.net.total.bytes,
            "lost": self.net.total.lost,
            "undeliverable": self.net.total.undeliverable,
            "cloud_requests": cloud.requests if cloud else 0,
            "cloud_bytes": (cloud.bytes_up + cloud.bytes_down) if cloud else 0,
            "events": self.metrics.counters["events"],
            "sessions": len(self.metrics.sessions),
            "changes_pending": self.metrics.pending_count,
            "receipts": sum(1 for s in self.metrics.sessions.values() if s.receipt_at is not None),
            "leader": leader or "",
            "leaders": distinct,
            "partitioned": int(self.net._group is not None),
            "members_live": round(live_share, 4),
            "members_alive": round(alive_share, 4),
        }
        self.samples.append(Sample(now, values))
        if self._progress is not None:
            self._progress(now, self.scenario.duration, values)

    # --- results -----------------------------------------------------------------------

    def _membership_summary(self) -> dict[str, Any]:
        """The failure detector's accuracy over the samples after the first minute (start-up):
        the mean and lowest share of running peers that running nodes held live, and ALIVE."""
        rows = [s.values for s in self.samples if s.t >= MEMBERSHIP_WARMUP_S and "members_live" in s.values]
        if not rows:
            return {"samples": 0}
        live = [r["members_live"] for r in rows]
        alive = [r["members_alive"] for r in rows]
        return {
            "samples": len(rows),
            "live_mean": round(sum(live) / len(live), 4),
            "live_min": min(live),
            "alive_mean": round(sum(alive) / len(alive), 4),
            "alive_min": min(alive),
        }

    def _summary(self) -> dict[str, Any]:
        assert self.net is not None
        m = self.metrics
        sc = self.scenario
        simulated = self.end_time
        events = m.counters["events"]
        accepted: set[str] = set()
        refused: set[str] = set()
        rows_per_session: Counter[str] = Counter()
        ledger_receipts: dict[str, bytes] = {}
        if self.cloud is not None:
            with self.cloud.service.ledger.read() as tx:
                for row in tx.query("SELECT event_id, status FROM events"):
                    (accepted if row["status"] in ("ok", "late") else refused).add(row["event_id"])
                for row in tx.query("SELECT session_id, receipt FROM ledger"):
                    rows_per_session[row["session_id"]] += 1
                    if row["receipt"] is not None:
                        ledger_receipts[row["session_id"]] = bytes(row["receipt"])
        # Receipts in every running node's copy, now.
        receipts = {sid: set(seen) for sid, seen in m.receipts_seen.items()}
        for sid, receipt in ledger_receipts.items():
            receipts.setdefault(sid, set()).add(receipt)
        running = {n: s.node for n, s in sorted(self.slots.items()) if s.running and s.node is not None}
        for sid in sorted(m.sessions):
            for node in running.values():
                r = receipt_of(node, sid)
                if r is not None:
                    receipts.setdefault(sid, set()).add(r)
        billed_twice = sorted(sid for sid in m.sessions if rows_per_session[sid] > 1 or len(receipts.get(sid, ())) > 1)
        not_in_cloud = sorted(e for e in m.acked if e not in accepted)
        lost = [
            e for e in not_in_cloud
            if not any(holds(node, m.acked[e], e) for node in running.values())
        ]  # fmt: skip
        nodes = len(self.ids)
        messages = self.net.total.messages
        per_node = [self.net.sent_by_node.get(n, 0) for n in self.ids]
        summary: dict[str, Any] = {
            "scenario": sc.name,
            "seed": self.seed,
            "nodes": nodes,
            "uplinks": len(self.uplink_ids),
            "chargers": len(self.charger_ids),
            "simulated_s": rounded(simulated),
            "events": events,
            "events_lost": len(lost),
            "events_not_in_cloud": len(not_in_cloud) if self.cloud is not None else None,
            "events_refused_by_cloud": len([e for e in m.acked if e in refused]),
            "sessions": len(m.sessions),
            "sessions_reconciled": sum(1 for s in m.sessions.values() if s.receipt_at is not None),
            "sessions_billed_twice": len(billed_twice),
            "sessions_missed": self.counters["arrivals_missed"] + self.counters["sessions_refused"],
            "sessions_unstopped": self.counters["stops_failed"] + self._open_sessions,
            "convergence_s": m.convergence(),
            "delay_by_hops_s": m.delay_by_hops(),
            "receipt_latency_s": m.receipt_latency(),
            "messages": messages,
            "messages_lost": self.net.total.lost,
            "messages_undeliverable": self.net.total.undeliverable,
            "bytes": self.net.total.bytes,
            "messages_per_event": rounded(messages / events, 3) if events else None,
            "messages_per_node_per_s": rounded(messages / nodes / simulated, 3) if simulated else None,
            "bytes_per_node_per_s": rounded(self.net.total.bytes / nodes / simulated, 1) if simulated else None,
            "messages_sent_per_node_per_s_max": rounded(max(per_node) / simulated, 3) if simulated else None,
            "traffic_by_resource": {
                r: {"messages": self.net.by_resource[r], "bytes": self.net.bytes_by_resource[r]}
                for r in sorted(self.net.by_resource)
            },
            "cloud": {
                "requests": self.cloud.counters.requests,
                "bytes_up": self.cloud.counters.bytes_up,
                "bytes_down": self.cloud.counters.bytes_down,
                "refused_uplink_down": self.cloud.counters.refused_down,
            }
            if self.cloud is not None
            else None,
            "membership": self._membership_summary(),
            "leader_changes": self.leader_changes,
            "leaders_at_once_max": self.leaders_max,
            "leader_split_samples": self.metrics.leaders.split_samples,
            "leader_longest_split_s": rounded(self.metrics.leaders.longest_split),
            "leader_changes_seen_by_nodes": sum(
                (s.last_node.leader_changes if s.last_node is not None else 0) for s in self.slots.values()
            ),
            "crashes": self.counters["crashes"],
            "wipes": self.counters["wipes"],
            "partitions": self.counters["partitions"],
            "node_starts": sum(s.starts for s in self.slots.values()),
        }
        if billed_twice:
            summary["sessions_billed_twice_ids"] = billed_twice[:20]
        if lost:
            summary["events_lost_ids"] = sorted(lost)[:20]
        return summary
