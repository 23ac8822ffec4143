"""Benchmark: end-to-end replication latency and CoAP traffic of a real mesh on loopback.

For each mesh size (default 3, 5 and 10 nodes) this starts that many real
`meshnode run` processes, each bound to its own loopback address (127.0.0.10,
127.0.0.11, ...) with the same CoAP and HTTP ports, `--no-mdns`, and every other
node given as `--peer`; data dirs live in a temporary directory. Then:

1. waits until every node sees every other one as a live direct peer;
2. creates one session on node 0 and waits until every node holds it;
3. idle phase: nothing is written and nothing is polled for `--idle-seconds`;
   the `transport` counters of every node's GET /v1/status give the background
   (gossip and anti-entropy) traffic;
4. measured phase: `--events` meter events, one at a time. Each is POSTed to a
   node (`--writer random`: a node picked at random, every node holds the
   session by then; `--writer node0`: always node 0); the time the 201 arrives
   is recorded, then every other node's GET /v1/sessions/{id} is polled
   concurrently (every `--poll-interval`, default 5 ms) until the event's id is
   in "events". Latency = time the last node showed it - time of the 201. The
   next event is only written once the previous one is everywhere.

CoAP requests and bytes per event are the delta of the counters summed over all
nodes across the measured phase (plus a short settle pause after the last event),
divided by the number of events. Requests are counted once, by the sender
(`requests_sent`); bytes are payload bytes counted once, by whoever sends them
(`bytes_sent` = request payloads sent + response payloads answered; CoAP headers
and block-wise overhead excluded). The background traffic of the phase is
included; a figure net of the idle rate is reported beside it.

All node processes are stopped at the end, also on error or Ctrl-C. Prints one
JSON object on stdout; progress on stderr.

Wall-clock latency on loopback is mostly CPU: ten nodes, the benchmark and its
polling share the machine's cores with whatever else runs. Every result carries
`host` (cores, load average before and after, the CPU pressure over the measured
phase, the autogroup and nice the run had) so that a figure is read with the
load it was taken under. The nodes run in the benchmark's session (a process
group of their own, so Ctrl-C reaches only the benchmark), hence in its
autogroup: with the kernel's autogroup scheduling
(`/proc/sys/kernel/sched_autogroup_enabled`) the whole run is one scheduling
group that competes with other sessions as one, whatever `nice` says inside it.
`--autogroup-nice N` makes the run a session of its own (or fails if it cannot:
then start it with `setsid`) and sets that group's nice (as bench/field.py).

`--sim` runs the same workload in the simulator instead (`sim.Simulation`: the
node's real code, `MockClock`, a full mesh with `--sim-latency` one way, no
loss): virtual time, so the figures are what the protocol makes an event wait,
with no CPU in them; messages are counted as in bench/glomers.py (requests and
responses; a one-way push counts once).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio
from _host import host_report, host_snapshot, own_autogroup  # bench/_host.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTERS = ("requests_sent", "requests_received", "bytes_sent", "bytes_received", "errors")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- processes --------------------------------------------------------------------


def _meshnode_command() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "meshnode")
    if os.path.exists(exe):
        return [exe]
    venv = os.path.join(ROOT, ".venv", "bin", "meshnode")
    if os.path.exists(venv):
        return [venv]
    return [sys.executable, "-m", "meshnode.cli"]


def _die_with_parent() -> None:
    """In the child: get SIGKILL if the benchmark itself dies without cleaning up (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


@dataclass
class NodeProc:
    index: int
    node_id: str
    host: str
    http: str
    log_path: str
    proc: subprocess.Popen[bytes]
    ready: dict[str, Any] = field(default_factory=dict)

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""


def start_nodes(n: int, args: argparse.Namespace, directory: str) -> list[NodeProc]:
    """Start n nodes; return once every one has printed its ready line."""
    base = [int(x) for x in args.base_address.split(".")]
    hosts = [".".join(map(str, base[:3] + [base[3] + i])) for i in range(n)]
    if base[3] + n - 1 > 254:
        raise SystemExit(f"--base-address {args.base_address} leaves no room for {n} nodes")
    nodes: list[NodeProc] = []
    try:
        for i, host in enumerate(hosts):
            node_id = f"bench-{i}"
            cmd = _meshnode_command() + [
                "run",
                "--insecure",
                "--node-id",
                node_id,
                "--data-dir",
                os.path.join(directory, node_id),
                "--bind",
                host,
                "--coap-port",
                str(args.coap_port),
                "--http-port",
                str(args.http_port),
                "--no-mdns",
                "--log-level",
                args.node_log_level,
                *getattr(args, "node_extra_args", ()),
            ]
            for j, other in enumerate(hosts):
                if j != i:
                    cmd += ["--peer", f"{other}:{args.coap_port}"]
            log_path = os.path.join(directory, f"{node_id}.log")
            with open(log_path, "wb") as err:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=err,
                    cwd=directory,
                    # A process group of its own: Ctrl-C reaches only us (we stop the nodes
                    # ourselves). The same session: the nodes share our autogroup (see above).
                    process_group=0,
                    preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                )
            nodes.append(NodeProc(i, node_id, host, f"http://{host}:{args.http_port}", log_path, proc))
        deadline = time.monotonic() + args.startup_timeout
        for node in nodes:
            node.ready = _read_ready(node, deadline)
        return nodes
    except BaseException:
        stop_nodes(nodes)
        raise


def _read_ready(node: NodeProc, deadline: float) -> dict[str, Any]:
    assert node.proc.stdout is not None
    fd = node.proc.stdout.fileno()
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"node {node.node_id} printed no ready line in time; its log:\n{node.log_tail()}")
        readable, _, _ = select.select([fd], [], [], min(left, 0.5))
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(
                    f"node {node.node_id} exited (code {node.proc.wait()}) before it was ready; "
                    f"its log:\n{node.log_tail()}"
                )
            buf += chunk
    line = buf.split(b"\n", 1)[0]
    ready = json.loads(line)
    if not ready.get("ready"):
        raise RuntimeError(f"node {node.node_id} printed {line!r} instead of a ready line")
    return ready


def stop_nodes(nodes: list[NodeProc]) -> None:
    """SIGTERM every node we started, wait a little, SIGKILL what is left."""
    for node in nodes:
        if node.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                node.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5.0
    for node in nodes:
        try:
            node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log(f"  node {node.node_id} did not stop on SIGTERM: killing it")
            with contextlib.suppress(ProcessLookupError):
                node.proc.kill()
            node.proc.wait()
        if node.proc.stdout is not None:
            node.proc.stdout.close()


TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def nodes_cpu(nodes: list[NodeProc]) -> float:
    return sum(cpu_seconds(n.proc.pid) for n in nodes)


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def check_alive(nodes: list[NodeProc]) -> None:
    for node in nodes:
        code = node.proc.poll()
        if code is not None:
            raise RuntimeError(f"node {node.node_id} exited with code {code}; its log:\n{node.log_tail()}")


# --- measurement --------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summary_ms(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None, "min": None, "mean": None}
    ms = [v * 1000 for v in values]
    return {
        "p50": round(percentile(ms, 0.5), 2),
        "p95": round(percentile(ms, 0.95), 2),
        "max": round(max(ms), 2),
        "min": round(min(ms), 2),
        "mean": round(statistics.fmean(ms), 2),
    }


async def get(client: httpx.AsyncClient, url: str, attempts: int = 3) -> httpx.Response:
    """A GET, sent again (up to `attempts` in all) when its connection breaks: on a
    loaded machine a node closes or resets kept-alive connections between polls
    (RemoteProtocolError, ReadError); a node that died is caught by `check_alive`."""
    for attempt in range(attempts):
        try:
            return await client.get(url)
        except (httpx.RemoteProtocolError, httpx.ReadError):
            if attempt == attempts - 1:
                raise
            await trio.sleep(0.05)
    raise AssertionError("unreachable")


async def get_json(client: httpx.AsyncClient, url: str) -> Any:
    response = await get(client, url)
    response.raise_for_status()
    return response.json()


async def statuses(client: httpx.AsyncClient, nodes: list[NodeProc]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{} for _ in nodes]

    async def one(node: NodeProc) -> None:
        out[node.index] = await get_json(client, f"{node.http}/v1/status")

    async with trio.open_nursery() as nursery:
        for node in nodes:
            nursery.start_soon(one, node)
    return out


def transport_sum(snapshot: list[dict[str, Any]]) -> dict[str, int]:
    return {c: sum(s["transport"][c] for s in snapshot) for c in COUNTERS}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {c: after[c] - before[c] for c in COUNTERS}


async def wait_for_mesh(client: httpx.AsyncClient, nodes: list[NodeProc], timeout: float) -> float:
    """Until every node lists every other as an alive, direct peer. Returns seconds waited."""
    start = time.perf_counter()
    want = {n.node_id for n in nodes}
    last: list[dict[str, Any]] = []
    with trio.move_on_after(timeout):
        while True:
            check_alive(nodes)
            last = await statuses(client, nodes)
            if all(
                {p["node_id"] for p in s["peers"] if p["state"] == "alive" and p.get("direct")} >= want - {s["node_id"]}
                for s in last
            ):
                return time.perf_counter() - start
            await trio.sleep(0.1)
    seen = {
        s.get("node_id"): sorted((p["node_id"], p["state"], p.get("direct")) for p in s.get("peers", [])) for s in last
    }
    raise RuntimeError(f"mesh did not form within {timeout} s; peers each node saw: {seen}")


async def wait_for_session(client: httpx.AsyncClient, nodes: list[NodeProc], session_id: str, timeout: float) -> float:
    start = time.perf_counter()
    missing = set(range(len(nodes)))
    with trio.move_on_after(timeout):
        while missing:
            check_alive(nodes)
            for i in sorted(missing):
                r = await get(client, f"{nodes[i].http}/v1/sessions/{session_id}")
                if r.status_code == 200:
                    missing.discard(i)
            if missing:
                await trio.sleep(0.02)
        return time.perf_counter() - start
    raise RuntimeError(f"session {session_id} did not reach nodes {sorted(missing)} within {timeout} s")


@dataclass
class EventResult:
    writer: int
    post_s: float
    latency_s: float | None  # None: not everywhere within the timeout
    per_node_s: dict[int, float]
    conflicts_on: list[int]
    poll_rtts: list[float]


async def one_event(
    client: httpx.AsyncClient,
    nodes: list[NodeProc],
    session_id: str,
    writer: int,
    meter_wh: int,
    poll_interval: float,
    timeout: float,
) -> EventResult:
    t_post = time.perf_counter()
    r = await client.post(
        f"{nodes[writer].http}/v1/sessions/{session_id}/events", json={"type": "meter", "meter_wh": meter_wh}
    )
    t_201 = time.perf_counter()
    if r.status_code != 201:
        raise RuntimeError(f"POST event to node {writer} answered {r.status_code}: {r.text}")
    event_id = r.json()["event"]["event_id"]
    arrived: dict[int, float] = {}
    conflicts_on: list[int] = []
    rtts: list[float] = []

    async def poll(i: int) -> None:
        while True:
            sent = time.perf_counter()
            resp = await get(client, f"{nodes[i].http}/v1/sessions/{session_id}")
            now = time.perf_counter()
            rtts.append(now - sent)
            if resp.status_code == 200:
                body = resp.json()
                if any(e.get("event_id") == event_id for e in body.get("events", [])):
                    arrived[i] = now - t_201
                    return
                if any(c.get("event_id") == event_id for c in body.get("conflicts", [])):
                    conflicts_on.append(i)  # held, but folded as a conflict: report, keep waiting
            await trio.sleep(poll_interval)

    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:
            for node in nodes:
                if node.index != writer:
                    nursery.start_soon(poll, node.index)
    everywhere = len(arrived) == len(nodes) - 1
    return EventResult(
        writer,
        t_201 - t_post,
        max(arrived.values(), default=0.0) if everywhere else None,
        arrived,
        sorted(set(conflicts_on)),
        rtts,
    )


async def measure(nodes: list[NodeProc], args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    n = len(nodes)
    limits = httpx.Limits(max_connections=4 * n + 10, max_keepalive_connections=4 * n + 10)
    async with httpx.AsyncClient(timeout=10.0, limits=limits, trust_env=False) as client:
        formed_s = await wait_for_mesh(client, nodes, args.startup_timeout)
        log(f"  mesh formed {formed_s:.2f} s after all nodes were ready")

        r = await client.post(
            f"{nodes[0].http}/v1/sessions",
            json={"charger": "bench-charger", "connector": 1, "id_token": "bench-token", "meter_wh": 0},
        )
        if r.status_code != 201:
            raise RuntimeError(f"POST /v1/sessions on node 0 answered {r.status_code}: {r.text}")
        session_id = r.json()["session_id"]
        session_s = await wait_for_session(client, nodes, session_id, args.event_timeout)
        log(f"  session {session_id} on every node after {session_s * 1000:.0f} ms")
        await trio.sleep(args.settle)

        # Idle: nothing written, nothing polled.
        idle_before, t0 = transport_sum(await statuses(client, nodes)), time.perf_counter()
        idle_cpu0 = nodes_cpu(nodes)
        await trio.sleep(args.idle_seconds)
        idle_cpu = nodes_cpu(nodes) - idle_cpu0
        idle_after, t1 = transport_sum(await statuses(client, nodes)), time.perf_counter()
        idle = delta(idle_before, idle_after)
        idle_s = t1 - t0
        idle_req_rate = idle["requests_sent"] / idle_s  # whole mesh, per second
        idle_byte_rate = idle["bytes_sent"] / idle_s
        log(f"  idle: {idle_req_rate / n:.2f} CoAP requests/s per node, {idle_byte_rate / n:.0f} B/s per node")

        # Measured phase.
        results: list[EventResult] = []
        before, p0 = transport_sum(await statuses(client, nodes)), time.perf_counter()
        cpu0, own0 = nodes_cpu(nodes), own_cpu()
        host0 = host_snapshot()
        consecutive_missing = 0
        for k in range(args.events):
            check_alive(nodes)
            writer = rng.randrange(n) if args.writer == "random" else 0
            res = await one_event(
                client, nodes, session_id, writer, 1000 + 10 * (k + 1), args.poll_interval, args.event_timeout
            )
            results.append(res)
            if res.latency_s is None:
                consecutive_missing += 1
                log(
                    f"  event {k}: written on node {writer}, NOT everywhere after {args.event_timeout} s "
                    f"(arrived on {sorted(res.per_node_s)})"
                )
                if consecutive_missing >= 3:
                    log("  three events in a row did not arrive everywhere: stopping this size")
                    break
            else:
                consecutive_missing = 0
            if (k + 1) % 25 == 0:
                done = [x.latency_s for x in results if x.latency_s is not None]
                log(f"  {k + 1}/{args.events} events, p50 so far {percentile(done, 0.5) * 1000:.1f} ms")
        await trio.sleep(args.settle)  # let the trailing sync rounds of the last event finish
        cpu, own = nodes_cpu(nodes) - cpu0, own_cpu() - own0
        after, p1 = transport_sum(await statuses(client, nodes)), time.perf_counter()
        host = host_report(host0, host_snapshot(), p1 - p0)
        final = await statuses(client, nodes)

    phase = delta(before, after)
    phase_s = p1 - p0
    written = len(results)
    latencies = [x.latency_s for x in results if x.latency_s is not None]
    per_node_latency = [v for x in results for v in x.per_node_s.values()]
    net_requests = phase["requests_sent"] - idle_req_rate * phase_s
    net_bytes = phase["bytes_sent"] - idle_byte_rate * phase_s
    return {
        "nodes": n,
        "events": written,
        "events_everywhere": len(latencies),
        "writer": args.writer,
        "latency_ms": summary_ms(latencies),
        "per_node_arrival_ms": summary_ms(per_node_latency),
        "latency_p50_ms_by_quarter": [
            summary_ms(
                [x.latency_s for x in results[q * written // 4 : (q + 1) * written // 4] if x.latency_s is not None]
            )["p50"]
            for q in range(4)
        ],
        "post_201_ms": summary_ms([x.post_s for x in results]),
        "coap_requests_per_event": round(phase["requests_sent"] / max(written, 1), 2),
        "coap_bytes_per_event": round(phase["bytes_sent"] / max(written, 1), 1),
        "coap_requests_per_event_net_of_idle": round(net_requests / max(written, 1), 2),
        "coap_bytes_per_event_net_of_idle": round(net_bytes / max(written, 1), 1),
        "coap_errors_in_phase": phase["errors"],
        "node_cpu_s_per_event": round(cpu / max(written, 1), 3),
        "node_cpu_s_per_event_net_of_idle": round((cpu - idle_cpu / idle_s * phase_s) / max(written, 1), 3),
        "bench_cpu_s_per_event": round(own / max(written, 1), 3),
        "idle_cpu_pct_per_node": round(100 * idle_cpu / idle_s / n, 2),
        "idle_requests_per_node_per_s": round(idle_req_rate / n, 2),
        "idle_bytes_per_node_per_s": round(idle_byte_rate / n, 1),
        "idle_seconds": round(idle_s, 2),
        "idle_transport_delta": idle,
        "phase_seconds": round(phase_s, 2),
        "phase_transport_delta": phase,
        "http_polls": sum(len(x.poll_rtts) for x in results),
        "http_poll_round_trip_ms": summary_ms([t for x in results for t in x.poll_rtts]),
        "events_seen_as_conflict": sum(1 for x in results if x.conflicts_on),
        "mesh_formed_s": round(formed_s, 2),
        "session_everywhere_ms": round(session_s * 1000, 1),
        "host": host,
        "final_sync_state": {s["node_id"]: s["sync_state"] for s in final},
        "final_counters": {s["node_id"]: s["counters"] for s in final},
    }


# --- the same workload in the simulator (virtual time) -------------------------------------


def _holds(node: Any, session_id: str, event_id: str) -> bool:
    from automerge.core import ROOT

    doc = node.replica.docs.get(session_id)
    if doc is None:
        return False
    events = doc.get(ROOT, "events")
    return events is not None and doc.get(events[1], event_id) is not None


def run_size_sim(n: int, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    """The measurement above on `n` simulated nodes: real `Node` code, virtual time.

    The simulator's nodes boot within the first second; once each holds every
    other as a verified neighbour, node 0 creates the session, then idle, then
    the events one at a time (a writer, the event, every other node polled every
    `--sim-poll` of virtual time until it holds the event)."""
    sys.path.insert(0, ROOT)
    from sim import Simulation, parse_scenario

    per_event = max(1.0, args.event_timeout / 10) + args.sim_think
    duration = 5.0 + 3 * args.settle + args.idle_seconds + args.events * per_event
    raw: dict[str, Any] = {
        "name": f"mesh{n}",
        "description": "bench/mesh.py --sim",
        "duration": duration,
        "drain": 0,
        "sample_interval": duration,
        "topology": {"kind": "full", "nodes": n},
        "network": {"latency": args.sim_latency, "loss": 0.0, "bandwidth_kbps": 1_000_000},
    }
    for item in args.sim_set:
        key, _, value = item.partition("=")
        section, _, name = key.rpartition(".")
        try:
            parsed: Any = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        (raw.setdefault(section, {}) if section else raw)[name] = parsed
    scenario = parse_scenario(raw)
    out: dict[str, Any] = {}

    async def workload(sim: Simulation) -> None:
        assert sim.net is not None
        slots = [sim.slots[i] for i in sim.ids]
        while not all(s.node is not None and len(s.node.neighbours) == n - 1 for s in slots):
            await trio.sleep(0.01)
        formed = trio.current_time()
        nodes = [s.node for s in slots]
        created = await nodes[0].create_session("bench-charger", 1, "bench-token", meter_wh=0)
        sid = created["session_id"]
        t0 = trio.current_time()
        while not all(sid in node.replica.docs for node in nodes):
            await trio.sleep(args.sim_poll)
        session_s = trio.current_time() - t0
        await trio.sleep(args.settle)
        m0 = sim.net.total.messages
        await trio.sleep(args.idle_seconds)
        idle_messages = sim.net.total.messages - m0
        before, by_resource = sim.net.total.messages, dict(sim.net.by_resource)
        p0 = trio.current_time()
        latencies: list[float] = []
        per_node: list[float] = []
        slowest: list[tuple[float, int, int, float | None]] = []
        last_write: dict[int, float] = {}
        for k in range(args.events):
            writer = rng.randrange(n) if args.writer == "random" else 0
            got = await nodes[writer].record_event(sid, "meter", 1000 + 10 * (k + 1))
            acked = trio.current_time()
            since = acked - last_write[writer] if writer in last_write else None
            last_write[writer] = acked
            missing = {i for i in range(n) if i != writer}
            with trio.move_on_after(args.event_timeout):
                while missing:
                    for i in sorted(missing):
                        if _holds(nodes[i], sid, got["event_id"]):
                            missing.discard(i)
                            per_node.append(trio.current_time() - acked)
                    if missing:
                        await trio.sleep(args.sim_poll)
            if missing:
                log(f"  event {k}: written on node {writer}, NOT everywhere after {args.event_timeout} s")
            else:
                latencies.append(trio.current_time() - acked)
                slowest.append((latencies[-1], k, writer, since))
            await trio.sleep(args.sim_think)
        await trio.sleep(args.settle)
        phase_s = trio.current_time() - p0
        messages = sim.net.total.messages - before
        idle_rate = idle_messages / args.idle_seconds
        out.update(
            {
                "nodes": n,
                "virtual_time": True,
                "latency_one_way_s": args.sim_latency,
                "think_s": args.sim_think,
                "events": args.events,
                "events_everywhere": len(latencies),
                "writer": args.writer,
                "latency_ms": summary_ms(latencies),
                "per_node_arrival_ms": summary_ms(per_node),
                "events_over_100_ms": sum(1 for x in latencies if x > 0.1),
                "slowest_events": [
                    {
                        "event": k,
                        "writer": w,
                        "latency_ms": round(x * 1000, 1),
                        "since_writers_previous_ms": None if since is None else round(since * 1000, 1),
                    }
                    for x, k, w, since in sorted(slowest, reverse=True)[:8]
                ],
                "messages_per_event": round(messages / args.events, 2),
                "messages_per_event_net_of_idle": round((messages - idle_rate * phase_s) / args.events, 2),
                "messages_by_resource_per_event": {
                    r: round((c - by_resource.get(r, 0)) / args.events, 2)
                    for r, c in sorted(sim.net.by_resource.items())
                    if c != by_resource.get(r, 0)
                },
                "idle_messages_per_node_per_s": round(idle_rate / n, 2),
                "mesh_formed_s": round(formed, 3),
                "session_everywhere_ms": round(session_s * 1000, 1),
                "phase_seconds": round(phase_s, 3),
            }
        )

    started = time.perf_counter()
    Simulation(scenario, args.seed, checks=[(0.0, workload)]).run()
    if not out:
        raise RuntimeError(f"the simulated workload did not finish within {duration:g} virtual s")
    out["wall_s"] = round(time.perf_counter() - started, 1)
    return out


def run_size(n: int, args: argparse.Namespace, rng: random.Random) -> dict[str, Any]:
    directory = tempfile.mkdtemp(prefix=f"meshbench-{n}-", dir=os.environ.get("BENCH_DIR"))
    nodes: list[NodeProc] = []
    ok = False
    try:
        log(f"{n} nodes: starting (data and logs in {directory})")
        nodes = start_nodes(n, args, directory)
        result = trio.run(measure, nodes, args, rng)
        check_alive(nodes)
        ok = True
        return result
    finally:
        stop_nodes(nodes)
        for node in nodes:
            if node.proc.returncode not in (0, None):
                log(f"  node {node.node_id} exit code {node.proc.returncode}")
        if ok and not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            log(f"  node logs kept in {directory}")


def add_node_arguments(p: argparse.ArgumentParser, *, base_address: str, startup_timeout: float) -> None:
    """Where the node processes listen and how long they may take to start (also bench/footprint.py's)."""
    p.add_argument(
        "--base-address",
        default=base_address,
        help=f"address of node 0; node i binds the address + i (default {base_address})",
    )
    p.add_argument("--coap-port", type=int, default=25683, help="CoAP UDP port of every node (default 25683)")
    p.add_argument("--http-port", type=int, default=28080, help="HTTP port of every node (default 28080)")
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=startup_timeout,
        help=f"seconds for the nodes to start and the mesh to form (default {startup_timeout:g})",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(
        description="Replication latency and CoAP traffic per event of a real meshnode mesh on loopback. "
        "Prints one JSON object on stdout, progress on stderr.",
    )
    p.add_argument(
        "--sizes",
        default=env("BENCH_MESH_SIZES", "3,5,10"),
        help="comma-separated mesh sizes (env BENCH_MESH_SIZES; default 3,5,10)",
    )
    p.add_argument(
        "--events",
        type=int,
        default=int(env("BENCH_MESH_EVENTS", "100")),
        help="events per size, written one at a time (env BENCH_MESH_EVENTS; default 100)",
    )
    p.add_argument(
        "--writer",
        choices=["random", "node0"],
        default=env("BENCH_MESH_WRITER", "random"),
        help="which node each event is POSTed to (default random: any node, all hold the session)",
    )
    add_node_arguments(p, base_address="127.0.0.10", startup_timeout=30.0)
    p.add_argument("--poll-interval", type=float, default=0.005, help="seconds between polls of a node (default 0.005)")
    p.add_argument(
        "--event-timeout",
        type=float,
        default=15.0,
        help="give up on an event not everywhere after this many seconds (default 15)",
    )
    p.add_argument("--idle-seconds", type=float, default=3.0, help="length of the idle measurement (default 3)")
    p.add_argument(
        "--settle", type=float, default=0.5, help="pause before the idle phase and after the last event (default 0.5 s)"
    )
    p.add_argument("--seed", type=int, default=1, help="seed for the choice of writer (default 1)")
    p.add_argument(
        "--node-log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="--log-level of the nodes (their stderr goes to a log file in the temp dir)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dir (data dirs, node logs) after a success")
    p.add_argument(
        "--autogroup-nice",
        type=int,
        default=None,
        help="run as a session (autogroup) of its own with this nice, e.g. 0 (see the module docstring)",
    )
    p.add_argument("--sim", action="store_true", help="run the workload in the simulator (virtual time) instead")
    p.add_argument(
        "--sim-latency", type=float, default=0.0005, help="--sim: one-way link latency in seconds (default 0.0005)"
    )
    p.add_argument(
        "--sim-think",
        type=float,
        default=0.03,
        help="--sim: virtual seconds from an event being everywhere to the next write, the real run's HTTP "
        "round trips and polling (default 0.03; 0 writes back to back, far faster than any real client)",
    )
    p.add_argument("--sim-poll", type=float, default=0.001, help="--sim: virtual seconds between polls (default 0.001)")
    p.add_argument(
        "--sim-set",
        action="append",
        default=[],
        help="--sim: scenario override, e.g. node.push_interval=0.2 (dotted key, JSON value)",
    )
    args = p.parse_args(argv)
    try:
        args.sizes = [int(s) for s in str(args.sizes).split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes must be comma-separated integers, got {args.sizes!r}")
    if not args.sizes or min(args.sizes) < 2:
        p.error("every mesh size must be at least 2")
    if args.events < 1:
        p.error("--events must be at least 1")
    return args


SIM_NOTES = [
    "--sim: the workload of the real run in the simulator (sim.Simulation: the node's real code under "
    "trio's MockClock, a full mesh, every link the given one-way latency, no loss, in-memory stores). "
    "Virtual time: handling a message costs no time, so latency_ms is what the protocol makes an event "
    "wait (links, push budget, timers) and nothing of the CPU the real run spends.",
    "latency_ms: from the return of record_event on the writer until the last other node holds the "
    "event (polled every --sim-poll virtual seconds); the next event is written --sim-think seconds "
    "later (the real run spends that on its POST and its polls: phase_seconds / events there is the "
    "cycle of one event, latency included). messages_per_event: simulated network messages "
    "over the measured phase (requests and responses; a one-way push counts once, as bench/glomers.py), "
    "divided by the events; the background exchanges of the phase are included, *_net_of_idle subtracts "
    "the idle rate.",
]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.autogroup_nice is not None:
        own_autogroup(args.autogroup_nice, "bench/mesh.py")
    rng = random.Random(args.seed)
    results = []
    for n in args.sizes:
        results.append(run_size_sim(n, args, rng) if args.sim else run_size(n, args, rng))
        r = results[-1]
        traffic = (
            f"{r['messages_per_event']} messages per event (virtual time)"
            if args.sim
            else f"{r['coap_requests_per_event']} CoAP requests and {r['coap_bytes_per_event']} B per event"
        )
        log(f"{n} nodes: latency p50 {r['latency_ms']['p50']} ms, p95 {r['latency_ms']['p95']} ms; {traffic}")
    if args.sim:
        print(json.dumps({"benchmark": "mesh", "mode": "sim", "results": results, "notes": SIM_NOTES}, indent=2))
        return 0
    writer = (
        "each event is POSTed to a node chosen at random (seeded) among all nodes; every node holds the session by then"
        if args.writer == "random"
        else "every event is POSTed to node 0"
    )
    notes = [
        f"Real `meshnode run` processes on loopback, one per address from {args.base_address} up, CoAP port "
        f"{args.coap_port}, HTTP port {args.http_port}, --no-mdns, every node a static --peer of every other; "
        "fresh data dirs per size; one session created on node 0 before measuring.",
        f"Writer: {writer}. Events are written one at a time: the next is written only after the previous "
        "one is visible on every node, so latencies do not overlap.",
        "latency_ms: from the 201 of the POST (as received by the benchmark) until the last other node's "
        "GET /v1/sessions/{id} lists the event_id in 'events'. per_node_arrival_ms: the same for each "
        "(event, other node) pair. latency_p50_ms_by_quarter: p50 of the first, second, third and last quarter "
        "of the events, to show drift as the session document grows. Percentiles by linear interpolation "
        "between closest ranks.",
        f"Polling: every other node is polled concurrently every {args.poll_interval * 1000:g} ms (httpx.AsyncClient "
        "under trio, one client process). The polling adds its own load (each poll folds and serialises the "
        "whole session, which grows with every event) and resolution (poll interval plus one HTTP round "
        "trip, see http_poll_round_trip_ms: a poll is sent poll-interval after the previous reply), so the latencies "
        "are upper bounds by up to about one poll round trip plus the interval; a push may even land before the "
        "201 reaches the benchmark. All nodes and the benchmark share this machine's CPUs "
        f"({os.cpu_count()} reported), so larger meshes also compete for CPU.",
        "coap_requests_per_event: delta of requests_sent summed over all nodes (each request counted once, by "
        "its sender) over the measured phase, divided by the events written. coap_bytes_per_event: the same "
        "with bytes_sent (request payloads sent + response payloads answered, i.e. each payload byte once; "
        "application payload only, CoAP headers and block-wise overhead excluded). Both include the background "
        f"gossip of the phase and a {args.settle:g} s settle pause after the last event; the *_net_of_idle "
        "figures subtract the idle rate times the phase duration (an estimate: gossip during writes also "
        "finds differing digests and syncs, so background and event traffic are not independent).",
        f"idle_requests_per_node_per_s: requests_sent summed over all nodes during {args.idle_seconds:g} s with "
        "nothing written and nothing polled, divided by nodes and seconds (protocol v2: one /m/state "
        "heads-hash exchange per node per second with piggybacked membership records).",
        "The *_transport_delta fields hold the raw summed deltas of all five transport counters.",
        "host: what the measured phase competed with (cores, load average before and after it, the share of "
        "its wall time some runnable task waited for a CPU, the benchmark's nice and autogroup; the nodes "
        "share the benchmark's session, hence its autogroup). Read latencies with it: on a loaded machine "
        "they are mostly waiting for a CPU; --sim gives the protocol's own share.",
        "node_cpu_s_per_event: user + system CPU seconds of all node processes (/proc/PID/stat) over the "
        "measured phase, divided by the events written; it includes answering the benchmark's polls (each "
        "folds and serialises the session) and the background of the phase (*_net_of_idle subtracts the idle "
        "rate). bench_cpu_s_per_event: the benchmark's own CPU (HTTP client, polling). idle_cpu_pct_per_node: "
        "CPU of the idle phase as a percentage of one core, per node. Latency that CPU figures cannot explain "
        "is waiting (timers, slots, scheduling on a busy machine).",
    ]
    print(json.dumps({"benchmark": "mesh", "results": results, "notes": notes}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
