"""End to end with real processes: mesh nodes, their uplinks, and the cloud reconciliation service.

Issue 4's "tests that must exist and pass", with `meshnode run` and `meshnode cloud`
as child processes on loopback (nothing in-process, nothing mocked):

1. Sessions written on several nodes reach the ledger exactly once while the
   leader is SIGKILLed (and restarted), an uplink flaps, and the cloud service
   restarts (SIGKILL and SIGTERM, same database and port).
2. Two leaders at once: a mesh partitioned into two halves, each with an uplink.
3. Forged and chain-broken events end up in the conflicts table, not in the ledger,
   whether they come in through the mesh (a fake CoAP peer) or straight to the
   cloud (a fake leader).
4. The PostgreSQL path (a real server from `tests/pg.py`): the leader's uplink
   goes silent and the cloud is SIGKILLed and restarted on the same database.

Regression tests for two defects these flows ran into (both fixed; each test
failed before its fix):

5. A node that was down while its peers received a session's receipt and then
   archived the session must still learn the receipt.
6. The cloud restarted on a database made by the previous version of its schema
   must migrate it (it used to answer every request with 503).

And one claim of docs/security.md:

7. `meshnode cloud --site` bills only devices its site certified (the real
   command's certificate check, not a stand-in).

Every uplink node reaches the cloud through its own `UplinkProxy`, which the test
cuts (loudly or silently) and restores. The partition of test 2 needs a firewall
between the halves, since gossip teaches every node every address: the test runs
its processes in a private network namespace (root only) whose policy-routing
rules make each half unreachable from the other; see `private_network`. Nodes
run with `--insecure` (tests/procs.py), so a test can act as a mesh peer.

Ground truth at the end is what the nodes hold once they have converged: the
ledger must have exactly their sessions, once each, with their energy; every
node's receipt is the ledger's, byte for byte, and the cloud issued at most one
receipt per session (its log); every event an API acknowledged must be among the
ledger's accepted events.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cbor2
import httpx
import nacl.signing
import pytest
import trio
import trio_asyncio
from automerge.core import Document

from crdt import EventSigner, Replica, add_event, new_session_doc, read_session
from meshnode._coap import open_coap_transport
from meshnode._protocol import SyncRequest, SyncResponse
from uplink._wire import CloudSyncRequest, CloudSyncResponse, compress

from .pg import pg_server, pg_url  # noqa: F401  (fixtures)
from .procs import START_TIMEOUT, NodeProcess, free_port, wait_until
from .uplink_proxy import ApiTap, UplinkProxy

REPO = Path(__file__).resolve().parent.parent
PROBE = ["--probe-interval", "1"]


# --- processes -----------------------------------------------------------------------


class CloudProcess:
    """One `meshnode cloud` child process; `start` again after a kill reuses its database and port."""

    def __init__(
        self, host: str, port: int, db: str, key: Path, log_path: Path, extra: list[str] | None = None
    ) -> None:
        self.host, self.port, self.db, self.key, self.log_path = host, port, db, key, log_path
        self.extra = list(extra or [])
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = START_TIMEOUT) -> None:
        args = [
            sys.executable,
            "-m",
            "meshnode.cli",
            "cloud",
            "--db",
            self.db,
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--key",
            str(self.key),
            *self.extra,
        ]
        log = open(self.log_path, "a")
        deadline = time.monotonic() + timeout
        while True:
            self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO)
            line = _ready_line(self.proc, timeout)
            if line:
                break
            # The port may still be held for a moment after a kill: try again.
            self.kill()
            if time.monotonic() > deadline:
                raise AssertionError(f"cloud did not start; log:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        assert json.loads(line)["ready"] is True
        self.starts += 1

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def headers(self) -> dict[str, str]:
        """The cloud's operator token, kept beside its key by a cloud with --site (none otherwise)."""
        token = self.key.parent / "api.token"
        return {"Authorization": f"Bearer {token.read_text().strip()}"} if token.exists() else {}

    def get(self, path: str, **params: str) -> Any:
        r = httpx.get(self.url + path, params=params, headers=self.headers(), timeout=10.0)
        r.raise_for_status()
        return r.json()

    def ledger(self) -> dict[str, dict[str, Any]]:
        rows = self.get("/v1/sessions")["sessions"]
        ids = [r["session_id"] for r in rows]
        assert len(ids) == len(set(ids)), f"the ledger lists a session twice: {sorted(ids)}"
        return {r["session_id"]: r for r in rows}


def _ready_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    result: dict[str, str] = {}
    reader = threading.Thread(target=lambda: result.setdefault("line", proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return result.get("line", "")


def start_all(nodes: list[NodeProcess]) -> None:
    """Start several nodes at once (each start waits for its ready line)."""
    errors: list[BaseException] = []

    def start(node: NodeProcess) -> None:
        try:
            node.start()
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


class Rig:
    """The processes and proxies of one test; everything is killed and closed at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.nodes: dict[str, NodeProcess] = {}
        self.clouds: list[CloudProcess] = []
        self.proxies: dict[str, UplinkProxy] = {}
        self.taps: dict[str, ApiTap] = {}

    def tap(self, node: NodeProcess) -> ApiTap:
        """A tap on `node`'s API (see `ApiTap`), for a writer to send its requests through."""
        t = self.taps[node.name] = ApiTap(node.host, (node.host, node.http_port))
        return t

    def cloud(self, host: str, db: str | None = None) -> CloudProcess:
        db = db or f"sqlite:///{self.tmp}/cloud.db"
        cloud = CloudProcess(host, free_port(host), db, self.tmp / "cloud.key", self.tmp / "cloud.log")
        self.clouds.append(cloud)
        cloud.start()
        return cloud

    def node(
        self,
        name: str,
        host: str,
        *,
        coap_port: int,
        http_port: int,
        peers: list[str],
        cloud: CloudProcess | None = None,
        proxy: bool = True,
    ) -> NodeProcess:
        extra = list(PROBE)
        if cloud is not None:
            url = cloud.url
            if proxy:
                p = self.proxies[name] = UplinkProxy(host, (cloud.host, cloud.port))
                url = p.url
            extra += ["--cloud-url", url]
        node = self.nodes[name] = NodeProcess(
            name, host, self.tmp / name, coap_port=coap_port, http_port=http_port, peers=peers, extra=extra
        )
        return node

    def close(self) -> None:
        for node in self.nodes.values():
            node.kill()
        for cloud in self.clouds:
            cloud.kill()
        for p in self.proxies.values():
            p.close()
        for t in self.taps.values():
            t.close()
        # Shown by pytest only when the test failed.
        for log in sorted(self.tmp.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()
            print(f"==== {log.name} (last 40 of {len(lines)} lines)")
            print("\n".join(lines[-40:]))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.close()


def status(node: NodeProcess) -> dict[str, Any]:
    return node.get("/v1/status")


def try_status(node: NodeProcess) -> dict[str, Any] | None:
    try:
        return status(node)
    except httpx.HTTPError:
        return None


def poll(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    """Like procs.wait_until, but returns the predicate's (truthy) value."""
    box: list[Any] = []

    def check() -> bool:
        value = predicate()
        if value:
            box.append(value)
            return True
        return False

    wait_until(check, timeout=timeout, interval=interval, what=what)
    return box[0]


# --- the writer ------------------------------------------------------------------------


class Writer(threading.Thread):
    """Keeps writing sessions (start, meter, meter, stop) on its nodes, round robin.

    A request that fails (a node killed or not yet back) interrupts that session;
    the writer moves on to the next node. What each node acknowledged is kept:
    `acked[session_id]` holds the event ids of every 201, `stopped` the sessions
    whose stop was acknowledged.
    """

    def __init__(
        self, nodes: list[NodeProcess], *, pause: float = 0.05, seed: int = 7, via: dict[str, str] | None = None
    ) -> None:
        super().__init__(daemon=True)
        self.nodes = nodes
        self.via = via or {}
        """Base URL to use instead of a node's own (an `ApiTap`), by node name."""
        self.pause = pause
        self.rng = random.Random(seed)
        self.acked: dict[str, set[str]] = {}
        self.origin: dict[str, str] = {}
        self.stopped: set[str] = set()
        self.interrupted: set[str] = set()
        self.failures: list[str] = []
        self.refusals: list[str] = []
        self.latencies: list[float] = []
        self.current: tuple[str, str] | None = None
        """(node, path) of the request in flight, if any."""
        self._halt = threading.Event()
        self.lock = threading.Lock()

    def stop(self) -> None:
        self._halt.set()
        self.join(30)
        assert not self.is_alive()

    def summary(self) -> str:
        lat = sorted(self.latencies) or [0.0]
        return (
            f"{len(self.acked)} sessions written, {len(self.stopped)} stopped, {len(self.interrupted)} interrupted; "
            f"failed requests {self.failures}; "
            f"API latency p50 {lat[len(lat) // 2] * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms"
        )

    def sessions_done(self) -> int:
        with self.lock:
            return len(self.stopped)

    def run(self) -> None:
        i = 0
        while not self._halt.is_set():
            node = self.nodes[i % len(self.nodes)]
            i += 1
            self._one_session(node, i)
            self._halt.wait(self.pause)

    def _post(self, node: NodeProcess, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        self.current = (node.name, path)
        started = time.monotonic()
        try:
            r = httpx.post(self.via.get(node.name, node.url) + path, json=body, timeout=10.0)
            self.latencies.append(time.monotonic() - started)
        except httpx.HTTPError as exc:
            self.current = None
            self.failures.append(f"{node.name} {path}: {type(exc).__name__}")
            return None
        self.current = None
        if r.status_code != 201:
            self.refusals.append(f"{node.name} {path}: {r.status_code} {r.text}")
            return None
        return r.json()

    def _one_session(self, node: NodeProcess, i: int) -> None:
        meter = self.rng.randrange(0, 10_000)
        created = self._post(
            node,
            "/v1/sessions",
            {"charger": f"{node.name}-c{i % 3}", "connector": i % 2 + 1, "id_token": f"TOKEN-{i}", "meter_wh": meter},
        )
        if created is None:
            return
        sid = created["session_id"]
        with self.lock:
            self.origin[sid] = node.name
            self.acked[sid] = {e["event_id"] for e in created["events"]}
        for kind in ("meter", "meter", "stop"):
            meter += self.rng.randrange(1, 3_000)
            got = self._post(node, f"/v1/sessions/{sid}/events", {"type": kind, "meter_wh": meter})
            if got is None:
                with self.lock:
                    self.interrupted.add(sid)
                return
            with self.lock:
                self.acked[sid].add(got["event"]["event_id"])
                if kind == "stop":
                    self.stopped.add(sid)


# --- convergence and the exactly-once checks --------------------------------------------------


def sessions_on(node: NodeProcess) -> dict[str, dict[str, Any]]:
    return {s["session_id"]: s for s in node.get("/v1/sessions")["sessions"]}


class Convergence:
    """A predicate for `poll`: the nodes' common sessions and the ledger, once all agree.

    Agreement: every node holds the same sessions with the same heads; no session
    is `completed` (they are all `reconciled`, i.e. carry their receipt); the
    ledger has exactly these sessions with the nodes' state and energy. `why`
    says what was still missing at the last check (for the failure message).
    """

    def __init__(self, nodes: list[NodeProcess], cloud: CloudProcess) -> None:
        self.nodes, self.cloud = nodes, cloud
        self.why = "not checked yet"

    def __call__(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]] | None:
        try:
            views = {n.name: sessions_on(n) for n in self.nodes}
            ledger = self.cloud.ledger()
        except httpx.HTTPError as exc:
            self.why = f"{type(exc).__name__}: {exc}"
            return None
        name, first = next(iter(views.items()))
        for other, view in views.items():
            if view.keys() != first.keys():
                self.why = (
                    f"{other} holds {len(view)} sessions, {name} {len(first)}: {sorted(view.keys() ^ first.keys())}"
                )
                return None
            differ = [s for s in first if view[s]["heads"] != first[s]["heads"]]
            if differ:
                self.why = f"{other} and {name} hold other versions of {differ}"
                return None
        completed = [s for s, v in first.items() if v["state"] == "completed"]
        if completed:
            self.why = f"completed, not reconciled: {completed}"
            return None
        if ledger.keys() != first.keys():
            self.why = f"ledger and nodes differ on {sorted(ledger.keys() ^ first.keys())}"
            return None
        for sid, s in first.items():
            row = ledger[sid]
            if (row["state"], row["energy_wh"]) != (s["state"], s["energy_wh"]):
                self.why = f"{sid}: ledger {row['state']} {row['energy_wh']} Wh, nodes {s['state']} {s['energy_wh']} Wh"
                return None
        return first, ledger


def converge(
    nodes: list[NodeProcess], cloud: CloudProcess, timeout: float, what: str
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    check = Convergence(nodes, cloud)
    try:
        return poll(check, timeout, what)
    except AssertionError as exc:
        statuses = [try_status(n) for n in nodes]
        brief = [
            {k: s.get(k) for k in ("node_id", "leader", "uplink_score", "forwarder", "sync_state")}
            for s in statuses
            if s
        ]
        raise AssertionError(f"{exc}: {check.why}; nodes {brief}") from None


def receipts_issued(cloud: CloudProcess) -> Counter[str]:
    """Receipts the cloud issued, per session, from its log (every start of it appends there)."""
    text = cloud.log_path.read_text(errors="replace")
    return Counter(re.findall(r"issued receipt for session '([0-9a-f]+)'", text))


def _hex(value: Any) -> Any:
    """A decoded receipt as nodes show it in JSON (bytes as hex)."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _hex(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_hex(v) for v in value]
    return value


def check_exactly_once(
    cloud: CloudProcess,
    sessions: dict[str, dict[str, Any]],
    ledger: dict[str, dict[str, Any]],
    acked: dict[str, set[str]],
    stopped: set[str],
    nodes: list[NodeProcess] = (),
) -> dict[str, int]:
    """The ledger against the nodes' sessions and what the APIs acknowledged.

    Billing once is checked where a second bill would show: one ledger row per
    session, one receipt issued per session (the cloud's log, across its
    restarts), and on every node in `nodes` the very receipt the ledger holds.
    """
    assert set(acked) <= set(sessions), "an acknowledged session is missing on the nodes"
    assert set(ledger) == set(sessions)
    for sid in stopped:
        assert sessions[sid]["state"] == "reconciled", (sid, sessions[sid]["state"])
    ledger_events = 0
    for sid, s in sessions.items():
        detail = cloud.get(f"/v1/sessions/{sid}")
        row = detail["session"]
        statuses = {e["event_id"]: e["status"] for e in detail["events"]}
        ledger_events += len(statuses)
        node_events = {e["event_id"] for e in s["events"]}
        assert set(statuses) == node_events, f"{sid}: ledger events differ from the node's"
        assert set(statuses.values()) <= {"ok"}, f"{sid}: {statuses}"
        assert acked.get(sid, set()) <= set(statuses), f"{sid}: an acknowledged event is not in the ledger"
        assert detail["conflicts"] == [], (sid, detail["conflicts"])
        assert (row["energy_wh"], row["state"], row["charger"]) == (s["energy_wh"], s["state"], s["charger"])
        if s["state"] == "reconciled":
            # The node's receipt is the ledger's (one receipt per session, signed once).
            assert s["receipt"] is not None and row["receipt"] is not None
            # Priced or not (a site without a tariff gets receipts without money), the same figures.
            assert s["receipt"]["energy_wh"] == row["energy_wh"]
            assert s["receipt"].get("cost_cents") == row["cost_cents"]
            assert s["receipt"].get("currency") == row["currency"]
            assert s["receipt"]["issued_ts"] == row["receipt_ts"]
        else:
            assert row["receipt"] is None and s["receipt"] is None
    stats = cloud.get("/v1/stats")
    completed = sum(1 for s in sessions.values() if s["state"] == "reconciled")
    assert stats["sessions"] == len(sessions)
    assert stats["receipts"] == completed
    # Rows with a receipt cannot count a second receipt for the same session: the log and the nodes can.
    issued = receipts_issued(cloud)
    assert all(n == 1 for n in issued.values()), {sid: n for sid, n in issued.items() if n > 1}
    assert set(issued) <= {sid for sid, s in sessions.items() if s["state"] == "reconciled"}, issued
    views = {n.name: sessions_on(n) for n in nodes}
    for sid, row in ledger.items():
        billed = _hex(cbor2.loads(bytes.fromhex(row["receipt"]))) if row["receipt"] is not None else None
        for name, view in views.items():
            assert view[sid]["receipt"] == billed, f"{sid}: {name} holds another receipt than the ledger"
    assert stats["events"] == ledger_events
    assert stats["conflicts"] == 0 and cloud.get("/v1/conflicts")["conflicts"] == []
    return stats


class Phases:
    """Times the phases of a test (printed; pytest shows them with -s or on failure)."""

    def __init__(self) -> None:
        self.t0 = self.last = time.monotonic()
        self.marks: list[str] = []

    def __call__(self, what: str) -> None:
        now = time.monotonic()
        self.marks.append(f"{what} {now - self.last:.1f}s")
        self.last = now

    def __str__(self) -> str:
        return f"{time.monotonic() - self.t0:.1f}s: " + ", ".join(self.marks)


def leaders(nodes: list[NodeProcess]) -> dict[str, str | None]:
    return {n.name: status(n)["leader"] for n in nodes}


# --- 1. SIGKILLed leader, flapping uplink, cloud restarts ------------------------------------


def test_sessions_reach_the_ledger_exactly_once_through_leader_kill_uplink_flaps_and_cloud_restarts(rig: Rig) -> None:
    phase = Phases()
    hosts = {f"node-{i}": f"127.0.0.{60 + i}" for i in range(1, 5)}
    cloud = rig.cloud("127.0.0.60")
    coap, http = free_port(hosts["node-1"]), free_port(hosts["node-1"])
    names = sorted(hosts)
    for name in names:
        peers = [f"{hosts[o]}:{coap}" for o in names if o != name]
        # node-1 has no uplink; the other three reach the cloud through their own proxy.
        rig.node(
            name, hosts[name], coap_port=coap, http_port=http, peers=peers, cloud=cloud if name != "node-1" else None
        )
    nodes = [rig.nodes[n] for n in names]
    start_all(nodes)
    phase("start")

    first_leader = poll(
        lambda: len(ls := set(leaders(nodes).values())) == 1 and ls.pop(), 30, "every node to follow the same leader"
    )
    assert first_leader != "node-1"  # the node without an uplink never leads
    taps = {n.name: rig.tap(n) for n in nodes}
    writer = Writer(nodes, pause=0.15, via={name: t.url for name, t in taps.items()})
    writer.start()
    poll(
        lambda: sum(r["state"] == "reconciled" for r in cloud.ledger().values()) >= 1,
        30,
        "the first session to be reconciled in the cloud",
    )
    phase("first receipts")

    # (a) SIGKILL the leader with a request of the writer in flight: the leader has handled an
    # event and answered, the answer is held in its tap, and the writer never hears it (a lost 201).
    victim = rig.nodes[first_leader]
    taps[victim.name].arm(b"/events ")
    assert taps[victim.name].wait_held(30), "the writer sent no event to the leader"
    held = poll(taps[victim.name].held_answer, 5, "the whole held answer", interval=0.01)  # headers, then body
    killed_at = time.monotonic()
    victim.kill()
    survivors = [n for n in nodes if n is not victim]
    assert held[0] == 201, held
    answer = json.loads(held[1])
    lost_201 = {"event_id": answer["event"]["event_id"], "session_id": answer["session"]["session_id"]}
    assert taps[victim.name].held_request_line.startswith(
        f"POST /v1/sessions/{lost_201['session_id']}/events ".encode()
    )
    poll(
        lambda: any(
            f.startswith(f"{victim.name} /v1/sessions/{lost_201['session_id']}/events:") for f in writer.failures
        ),
        15,
        "the writer to see its request fail",
    )
    assert lost_201["event_id"] not in writer.acked[lost_201["session_id"]]

    # (b) Flap another uplink while the mesh notices: down (loudly, then silently, then loudly)
    # until its score is 0, up until it is back.
    flapper = next(n for n in reversed(survivors) if n.name in rig.proxies)
    proxy = rig.proxies[flapper.name]
    for silent in (False, True, False):
        proxy.cut(silent=silent)
        poll(lambda: status(flapper)["uplink_score"] == 0, 15, f"{flapper.name}'s score to drop to 0 while cut")
        proxy.restore()
        poll(lambda: status(flapper)["uplink_score"] > 0, 15, f"{flapper.name}'s score to come back")
    phase("uplink flaps")
    new_leader = poll(
        lambda: (
            (ls := set(leaders(survivors).values()))
            and len(ls) == 1
            and None not in ls
            and first_leader not in ls
            and ls.pop()
        ),
        40,
        "the survivors to agree on a new leader",
    )
    failover_s = time.monotonic() - killed_at
    phase("failover")

    # (c) The cloud dies hard (SIGKILL) and comes back on the same database and port,
    # while the killed leader restarts from its store.
    cloud.kill()
    victim.start()
    assert status(victim)["incarnation"] == 2
    n_before = writer.sessions_done()
    poll(lambda: writer.sessions_done() >= n_before + 1, 30, "a session stopped while the cloud is down")
    cloud.start()
    phase("cloud SIGKILL + leader restart")
    # A receipt through the restarted cloud, then a clean stop (SIGTERM) and start.
    reconciled = {sid for sid, r in cloud.ledger().items() if r["state"] == "reconciled"}
    poll(
        lambda: len({sid for sid, r in cloud.ledger().items() if r["state"] == "reconciled"} - reconciled) >= 1,
        30,
        "a new receipt from the restarted cloud",
    )
    assert cloud.stop() == 0
    n_before = writer.sessions_done()
    poll(lambda: writer.sessions_done() >= n_before + 1, 30, "a session stopped while the cloud is down")
    cloud.start()
    phase("cloud SIGTERM")
    n_before = writer.sessions_done()
    poll(lambda: writer.sessions_done() >= n_before + 2, 30, "sessions stopped after everything is back")
    writer.stop()
    phase("writes")

    sessions, ledger = converge(
        nodes, cloud, 60, "nodes and ledger to agree on every session (all completed ones reconciled)"
    )
    phase("convergence")
    assert writer.refusals == [], writer.refusals
    check_exactly_once(cloud, sessions, ledger, writer.acked, writer.stopped, nodes)
    # The event whose 201 never reached the writer was durable: the node had it after its restart.
    lost_in = {e["event_id"]: e["status"] for e in cloud.get(f"/v1/sessions/{lost_201['session_id']}")["events"]}
    assert lost_in.get(lost_201["event_id"]) == "ok", lost_201
    assert len(writer.stopped) >= 8 and set(writer.origin.values()) == set(names)
    final = {n.name: status(n) for n in nodes}
    assert sum(s["leader_changes"] for s in final.values()) >= 2
    assert new_leader != first_leader and cloud.starts == 3
    phase("checks")
    print(
        f"failover after SIGKILL of the leader: {failover_s:.1f} s; leaders {leaders(nodes)}; "
        f"phases {phase}; {writer.summary()}"
    )


# --- 2. two leaders at once: a partitioned mesh ------------------------------------------------

CLONE_NEWNET = 0x40000000


@contextmanager
def private_network(blocked: list[tuple[str, str]]) -> Iterator[None]:
    """Run the block in a network namespace of its own, where traffic between the blocked subnets fails.

    On loopback nothing separates two addresses, so a partition needs a firewall.
    Rather than touch the machine's own network, the test's thread moves into a
    fresh network namespace (`unshare(CLONE_NEWNET)`: only the calling thread
    moves, and every child process and thread started from it is born there),
    brings its `lo` up, and adds policy-routing rules that make each blocked pair
    of subnets unreachable (a send fails at once, as with no route). The
    namespace dies with its last process; the thread returns to the original
    namespace at the end. Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and `ip`.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            pytest.fail(
                f"cannot create a network namespace for the partition ({os.strerror(err)}): "
                "this test needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN)",
                pytrace=False,
            )
        try:
            commands = [
                ["ip", "link", "set", "lo", "up"],
                # Rules must come before the `local` table, which is normally at priority 0.
                ["ip", "rule", "add", "pref", "100", "lookup", "local"],
                ["ip", "rule", "del", "pref", "0"],
            ]
            for a, b in blocked:
                commands.append(["ip", "rule", "add", "pref", "10", "from", a, "to", b, "unreachable"])
            for command in commands:
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:
                    pytest.fail(f"{' '.join(command)} failed: {result.stderr}", pytrace=False)
            yield
        finally:
            if libc.setns(original, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "cannot return to the original network namespace")
    finally:
        os.close(original)


def peers_alive(node: NodeProcess) -> set[str]:
    return {p["node_id"] for p in status(node)["peers"] if p["state"] == "alive"}


def test_two_leaders_in_a_partitioned_mesh_still_bill_each_session_once(tmp_path: Path) -> None:
    half_a, half_b = "127.1.1.0/24", "127.1.2.0/24"  # the bridge is 127.1.3.1, the cloud 127.0.0.1
    with private_network([(half_a, half_b), (half_b, half_a)]):
        rig = Rig(tmp_path)
        try:
            _partition_flow(rig)
        finally:
            rig.close()


def _partition_flow(rig: Rig) -> None:
    phase = Phases()
    cloud = rig.cloud("127.0.0.1")
    hosts = {"a-1": "127.1.1.1", "a-up": "127.1.1.2", "bridge": "127.1.3.1", "b-1": "127.1.2.1", "b-up": "127.1.2.2"}
    coap, http = free_port("127.1.1.1"), free_port("127.1.1.1")
    peers = {
        "a-1": ["a-up", "bridge"],
        "a-up": ["a-1", "bridge"],
        "b-1": ["b-up", "bridge"],
        "b-up": ["b-1", "bridge"],
        "bridge": ["a-1", "a-up", "b-1", "b-up"],
    }
    for name, host in hosts.items():
        rig.node(
            name,
            host,
            coap_port=coap,
            http_port=http,
            peers=[f"{hosts[p]}:{coap}" for p in peers[name]],
            cloud=cloud if name.endswith("-up") else None,
            proxy=False,
        )
    nodes = list(rig.nodes.values())
    a1, a_up, bridge, b1, b_up = (rig.nodes[n] for n in ("a-1", "a-up", "bridge", "b-1", "b-up"))
    half = {"a": [a1, a_up], "b": [b1, b_up]}
    start_all(nodes)
    phase("start")

    # Connected through the bridge: one leader for all five.
    first = poll(lambda: len(ls := set(leaders(nodes).values())) == 1 and ls.pop(), 30, "one leader")
    assert first in ("a-up", "b-up")
    acked: dict[str, set[str]] = {}

    def write(node: NodeProcess, sid: str | None, kind: str, meter: int) -> str:
        if sid is None:
            r = node.post("/v1/sessions", {"charger": node.name, "connector": 1, "id_token": "T", "meter_wh": meter})
            assert r.status_code == 201, r.text
            sid = r.json()["session_id"]
            acked[sid] = {e["event_id"] for e in r.json()["events"]}
        else:
            r = node.post(f"/v1/sessions/{sid}/events", {"type": kind, "meter_wh": meter})
            assert r.status_code == 201, r.text
            acked[sid].add(r.json()["event"]["event_id"])
        return sid

    s_a = write(a1, None, "start", 100)
    write(a1, s_a, "meter", 600)
    s_b = write(b1, None, "start", 2000)
    write(b1, s_b, "meter", 2700)
    # Both halves hold both sessions (through the bridge: the halves never talk directly).
    poll(
        lambda: all(holds_events(n, sid, acked[sid]) for n in nodes for sid in (s_a, s_b)),
        30,
        "both sessions on all five nodes",
    )
    phase("sessions everywhere")

    # The partition: the bridge dies. Each half elects its own leader.
    before = {n.name: status(n)["forwarder"]["batches"] for n in (a_up, b_up)}
    bridge.kill()
    cut_at = time.monotonic()
    # New events in each half, on the sessions both halves hold, and a session of each half's own.
    write(a1, s_a, "meter", 900)
    write(a1, s_a, "stop", 1300)
    write(b1, s_b, "stop", 3100)
    n_a = write(a_up, None, "start", 0)
    write(a_up, n_a, "stop", 450)
    n_b = write(b_up, None, "start", 10)
    write(b_up, n_b, "meter", 20)

    def two_leaders() -> bool:
        got = leaders(half["a"] + half["b"])
        return got == {"a-1": "a-up", "a-up": "a-up", "b-1": "b-up", "b-up": "b-up"}

    poll(two_leaders, 40, "a-up to lead half a while b-up leads half b")
    two_leaders_after = time.monotonic() - cut_at
    # The halves really cannot talk: neither half sees the other alive.
    for side, other in (("a", "b"), ("b", "a")):
        for node in half[side]:
            assert not peers_alive(node) & {n.name for n in half[other]}, (node.name, status(node)["peers"])
    phase("two leaders")

    # Both leaders forward: the same documents s_a and s_b, with each half's new events.
    poll(
        lambda: all(status(n)["forwarder"]["batches"] > before[n.name] for n in (a_up, b_up)),
        30,
        "both leaders to forward",
    )
    why: list[str] = []

    def in_ledger() -> dict[str, dict[str, Any]] | None:
        why.clear()
        ledger = cloud.ledger()
        if set(ledger) != {s_a, s_b, n_a, n_b}:
            why.append(f"ledger holds {sorted(ledger)}")
            return None
        for sid, state in ((s_a, "reconciled"), (s_b, "reconciled"), (n_a, "reconciled"), (n_b, "charging")):
            if ledger[sid]["state"] != state:
                why.append(f"{sid[:8]} is {ledger[sid]['state']}")
        # The open session's meter reading is held a few seconds by the forwarder
        # (readings batch), so wait for every acknowledged event, not just the state.
        for sid in (s_a, s_b, n_a, n_b):
            if len(cloud.get(f"/v1/sessions/{sid}")["events"]) != len(acked[sid]):
                why.append(f"{sid[:8]} has not all its events in the ledger yet")
        # Each session's receipt is back in the half that stopped it.
        for sid, node in ((s_a, a1), (s_b, b1), (n_a, a_up)):
            if node.get(f"/v1/sessions/{sid}")["state"] != "reconciled":
                why.append(f"{sid[:8]} not reconciled on {node.name}")
        return None if why else ledger

    try:
        ledger = poll(in_ledger, 30, "the ledger to hold the four sessions, the stopped ones with their receipts")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {why}; status {[status(n) for n in survivors(half)]}") from None
    assert two_leaders()  # still partitioned
    phase("ledger")
    # One row per session, with the union of both halves' events; one receipt each.
    for sid in (s_a, s_b, n_a, n_b):
        detail = cloud.get(f"/v1/sessions/{sid}")
        ledger_events = {e["event_id"]: e["status"] for e in detail["events"]}
        assert set(ledger_events) == acked[sid] and set(ledger_events.values()) == {"ok"}, (sid, ledger_events)
        assert detail["conflicts"] == []
    assert (ledger[s_a]["energy_wh"], ledger[s_b]["energy_wh"], ledger[n_a]["energy_wh"], ledger[n_b]["energy_wh"]) == (
        1200,
        1100,
        450,
        10,
    )
    stats = cloud.get("/v1/stats")
    assert (stats["sessions"], stats["receipts"], stats["conflicts"]) == (4, 3, 0)
    assert stats["events"] == sum(len(v) for v in acked.values())

    # The partition heals (the bridge comes back): every node ends with the same four sessions,
    # the same single receipt each, and the ledger does not move.
    bridge.start()
    sessions, ledger_after = converge(nodes, cloud, 40, "all five nodes and the ledger to agree")
    phase("healed")
    assert {sid: (r["energy_wh"], r["receipt"], r["receipt_ts"]) for sid, r in ledger_after.items()} == {
        sid: (r["energy_wh"], r["receipt"], r["receipt_ts"]) for sid, r in ledger.items()
    }
    check_exactly_once(cloud, sessions, ledger_after, acked, {s_a, s_b, n_a}, nodes)
    assert cloud.get("/v1/stats")["receipts"] == 3
    poll(lambda: len(set(leaders(nodes).values())) == 1, 30, "one leader again")
    print(f"two leaders {two_leaders_after:.1f} s after the bridge died; phases {phase}; stats {stats}")


def survivors(half: dict[str, list[NodeProcess]]) -> list[NodeProcess]:
    return half["a"] + half["b"]


def holds_events(node: NodeProcess, sid: str, event_ids: set[str]) -> bool:
    try:
        return event_ids <= {e["event_id"] for e in node.get(f"/v1/sessions/{sid}")["events"]}
    except httpx.HTTPError:
        return False


# --- 3. forged and chain-broken events: conflicts, not billing --------------------------------


def sync_as_peer(bind: str, target: str, docs: dict[str, Document], sender: str = "intruder-9") -> dict[str, str]:
    """Play a mesh peer over real CoAP: sync `docs` into the node at `target`. Returns its per-document errors."""

    async def main() -> dict[str, str]:
        async with trio_asyncio.open_loop():
            async with open_coap_transport(bind, free_port(bind)) as transport:
                replica, ids, errors = Replica(docs), sorted(docs), {}
                for round_ in range(12):
                    msgs = {d: replica.generate(target, d) for d in ids}
                    if round_ and all(m is None for m in msgs.values()):
                        return errors
                    request = SyncRequest(sender, msgs, tuple(ids) if round_ == 0 else ())
                    reply = SyncResponse.decode(
                        await transport.request(target, "/m/sync", request.encode(), timeout=5.0)
                    )
                    errors.update(reply.errors)
                    for d, m in reply.msgs.items():
                        replica.receive(target, d, m)
                raise AssertionError("sync with the node did not settle")

    return trio.run(main)


def sync_as_leader(
    cloud: CloudProcess, docs: dict[str, Document], node: str = "fake-leader", credential: Any = None
) -> dict[str, str]:
    """Play a site's leader: push `docs` straight to the cloud's POST /v1/sync. Returns its per-document errors.
    With a `credential` (`uplink.DeviceCredential`), requests are signed as `node` (a cloud with --site wants that)."""
    from uplink import SignedSyncRequest

    replica, ids, errors = Replica(docs), sorted(docs), {}
    with httpx.Client(base_url=cloud.url, timeout=10.0) as client:
        for round_ in range(12):
            msgs = {d: replica.generate("cloud", d) for d in ids}
            if round_ and all(m is None for m in msgs.values()):
                return errors
            reset = tuple(ids) if round_ == 0 else ()
            request = (
                SignedSyncRequest(node, "default", msgs, reset, credential=credential, ts=time.time())
                if credential is not None
                else CloudSyncRequest(node, "default", msgs, reset)
            )
            body = compress(request.encode())
            r = client.post(
                "/v1/sync", content=body, headers={"Content-Encoding": "deflate", "Content-Type": "application/cbor"}
            )
            assert r.status_code == 200, r.text
            reply = CloudSyncResponse.decode(r.content)
            errors.update(reply.errors)
            for d, m in reply.msgs.items():
                replica.receive("cloud", d, m)
    raise AssertionError("sync with the cloud did not settle")


def chain_head(doc: Document, device_id: str) -> tuple[int, bytes]:
    """(seq, chain hash) of a device's last event in a session document."""
    from crdt import Keyring, verify_event

    data = read_session(doc)
    keyring = Keyring(data.devices)
    events = [verify_event(b, keyring) for b in data.events.values()]
    last = max((e for e in events if e.record.device_id == device_id), key=lambda e: e.record.seq)
    return last.record.seq, last.chain_hash


def test_forged_and_chain_broken_events_reach_the_conflicts_table_not_the_ledger(rig: Rig) -> None:
    phase = Phases()
    cloud = rig.cloud("127.0.0.70")
    coap, http = free_port("127.0.0.71"), free_port("127.0.0.71")
    n1 = rig.node("node-1", "127.0.0.71", coap_port=coap, http_port=http, peers=[f"127.0.0.72:{coap}"])
    n2 = rig.node(
        "node-2", "127.0.0.72", coap_port=coap, http_port=http, peers=[f"127.0.0.71:{coap}"], cloud=cloud, proxy=False
    )
    start_all([n1, n2])
    poll(lambda: set(leaders([n1, n2]).values()) == {"node-2"}, 30, "node-2 to lead")
    phase("start")

    # A real session on node-1 (no uplink): its way to the cloud is the mesh, then node-2.
    r = n1.post("/v1/sessions", {"charger": "c1", "connector": 1, "id_token": "TOKEN-F", "meter_wh": 1000})
    sid = r.json()["session_id"]
    real_events = {e["event_id"] for e in r.json()["events"]}
    real_events.add(
        n1.post(f"/v1/sessions/{sid}/events", {"type": "meter", "meter_wh": 1500}).json()["event"]["event_id"]
    )

    # Forged: an event in node-1's name, signed without its key (the document pins node-1's key).
    doc = Document.load(httpx.get(f"{n1.url}/v1/sessions/{sid}/automerge", timeout=10).content)
    doc.set_actor(os.urandom(16))
    seq, prev = chain_head(doc, "node-1")
    impostor = EventSigner("node-1", nacl.signing.SigningKey(b"impostor".ljust(32, b"\0")), seq=seq, prev=prev)
    forged = impostor.sign("meter", sid, int(time.time() * 1000), meter_wh=90_000)
    add_event(doc, forged)
    # Chain-broken: a device's own session whose stop does not link to the event before it.
    rogue_sid = os.urandom(16).hex()
    rogue = EventSigner("rogue-7", nacl.signing.SigningKey(b"rogue".ljust(32, b"\0")))
    rdoc = new_session_doc(
        rogue_sid,
        site="default",
        charger="rogue",
        connector=1,
        id_token="TOKEN-R",
        tariff={"currency": "EUR", "per_kwh_cents": 39, "per_session_cents": 0},
        created_by="rogue-7",
    )
    now = int(time.time() * 1000)
    rogue_ok = set()
    for kind, meter in (("authorize", None), ("start", 0)):
        event = rogue.sign(kind, rogue_sid, now, meter_wh=meter)
        add_event(rdoc, event, public_key=rogue.public_key)
        rogue_ok.add(event.event_id)
    rogue.prev = bytes(range(32))  # the chain head is lost: the next event points nowhere
    broken = rogue.sign("stop", rogue_sid, now + 1, meter_wh=5_000)
    add_event(rdoc, broken)

    # In through the mesh: a fake peer syncs both documents into node-1 over CoAP.
    assert sync_as_peer("127.0.0.73", n1.coap, {sid: doc, rogue_sid: rdoc}) == {}
    poll(
        lambda: all(
            forged.event_id in {c["event_id"] for c in n.get(f"/v1/sessions/{sid}")["conflicts"]}
            and holds_events(n, rogue_sid, rogue_ok)
            for n in (n1, n2)
        ),
        20,
        "both nodes to hold the forged event (as a conflict) and the rogue session",
    )
    # The real charger stops its session after the forgery.
    real_events.add(
        n1.post(f"/v1/sessions/{sid}/events", {"type": "stop", "meter_wh": 2600}).json()["event"]["event_id"]
    )
    phase("through the mesh")

    def reconciled() -> bool:
        ledger = cloud.ledger()
        return (
            sid in ledger
            and rogue_sid in ledger
            and ledger[sid]["state"] == "reconciled"
            and n1.get(f"/v1/sessions/{sid}")["state"] == "reconciled"
        )

    poll(reconciled, 30, "the real session to be reconciled, and the rogue session to reach the ledger")

    # Straight to the cloud: a fake leader with a clone of node-1's key replays node-1's chain
    # slots (forks) and adds a badly signed event.
    real_key = nacl.signing.SigningKey((n1.data_dir / "node.key").read_bytes())
    clone = EventSigner("node-1", real_key)
    fork_sid = os.urandom(16).hex()
    fdoc = new_session_doc(
        fork_sid,
        site="default",
        charger="c1",
        connector=2,
        id_token="TOKEN-C",
        tariff={"currency": "EUR", "per_kwh_cents": 39, "per_session_cents": 0},
        created_by="node-1",
    )
    forks = []
    for kind, meter in (("authorize", None), ("start", 0), ("stop", 40_000)):
        event = clone.sign(kind, fork_sid, now, meter_wh=meter)
        add_event(fdoc, event, public_key=clone.public_key)
        forks.append(event.event_id)
    bad_sig = impostor.sign("meter", fork_sid, now, meter_wh=70_000)
    add_event(fdoc, bad_sig)
    assert sync_as_leader(cloud, {fork_sid: fdoc}) == {}
    phase("straight to the cloud")

    # The conflicts table lists every forged or chain-broken event; the ledger bills none of them.
    conflicts = {(c["session_id"], c["event_id"], c["kind"]) for c in cloud.get("/v1/conflicts")["conflicts"]}
    expected = {
        (sid, forged.event_id, "invalid_event"),
        (rogue_sid, broken.event_id, "broken_chain"),
        *((fork_sid, e, "fork") for e in forks),
        (fork_sid, bad_sig.event_id, "invalid_event"),
    }
    assert conflicts == expected, conflicts ^ expected
    ledger = cloud.ledger()
    assert set(ledger) == {sid, rogue_sid, fork_sid}
    real = cloud.get(f"/v1/sessions/{sid}")
    assert {e["event_id"] for e in real["events"]} == real_events  # the forged event is not among them
    assert (ledger[sid]["energy_wh"], ledger[sid]["state"], ledger[sid]["conflicts"]) == (1600, "reconciled", 1)
    assert n1.get(f"/v1/sessions/{sid}")["receipt"]["energy_wh"] == 1600
    assert (ledger[rogue_sid]["energy_wh"], ledger[rogue_sid]["state"], ledger[rogue_sid]["receipt"]) == (
        0,
        "charging",
        None,
    )
    statuses = {e["event_id"]: e["status"] for e in cloud.get(f"/v1/sessions/{rogue_sid}")["events"]}
    assert statuses == {**dict.fromkeys(rogue_ok, "ok"), broken.event_id: "broken_chain"}
    assert (ledger[fork_sid]["energy_wh"], ledger[fork_sid]["state"], ledger[fork_sid]["receipt"]) == (0, "idle", None)
    stats = cloud.get("/v1/stats")
    assert (stats["sessions"], stats["receipts"], stats["conflicts"]) == (3, 1, len(expected))
    # The nodes agree with the ledger on the real session, and keep serving.
    for n in (n1, n2):
        s = n.get(f"/v1/sessions/{sid}")
        assert (s["energy_wh"], s["state"]) == (1600, "reconciled")
        assert n.get(f"/v1/sessions/{rogue_sid}")["energy_wh"] == 0
    print(f"phases {phase}")


# --- 4. the PostgreSQL path --------------------------------------------------------------------


def test_postgresql_ledger_exactly_once_through_uplink_loss_and_cloud_sigkill(rig: Rig, pg_url: str) -> None:
    phase = Phases()
    cloud = rig.cloud("127.0.0.80", db=pg_url)
    hosts = {"pg-1": "127.0.0.81", "pg-2": "127.0.0.82", "pg-3": "127.0.0.83"}
    coap, http = free_port(hosts["pg-1"]), free_port(hosts["pg-1"])
    for name, host in hosts.items():
        rig.node(
            name,
            host,
            coap_port=coap,
            http_port=http,
            peers=[f"{h}:{coap}" for o, h in hosts.items() if o != name],
            cloud=cloud if name != "pg-1" else None,
        )
    nodes = list(rig.nodes.values())
    start_all(nodes)
    first = poll(lambda: len(ls := set(leaders(nodes).values())) == 1 and ls.pop(), 30, "one leader")
    assert first in ("pg-2", "pg-3")
    other = "pg-2" if first == "pg-3" else "pg-3"
    writer = Writer(nodes, pause=0.1)
    writer.start()
    poll(
        lambda: sum(r["state"] == "reconciled" for r in cloud.ledger().values()) >= 2,
        30,
        "the first receipts from the PostgreSQL-backed cloud",
    )
    phase("start")

    # The leader's uplink goes silent (a blackhole, not an error): the other uplink node takes over.
    rig.proxies[first].cut(silent=True)
    poll(lambda: set(leaders(nodes).values()) == {other}, 20, f"{other} to take over")
    phase("uplink lost")
    reconciled = {sid for sid, r in cloud.ledger().items() if r["state"] == "reconciled"}
    poll(
        lambda: len({sid for sid, r in cloud.ledger().items() if r["state"] == "reconciled"} - reconciled) >= 1,
        30,
        "a receipt through the new leader",
    )
    # The cloud dies hard and restarts on the same database; the old leader's uplink returns.
    cloud.kill()
    n_before = writer.sessions_done()
    poll(lambda: writer.sessions_done() >= n_before + 1, 30, "a session stopped while the cloud is down")
    cloud.start()
    rig.proxies[first].restore()
    n_before = writer.sessions_done()
    poll(lambda: writer.sessions_done() >= n_before + 2, 30, "sessions stopped after the cloud is back")
    writer.stop()
    phase("cloud SIGKILL")

    sessions, ledger = converge(nodes, cloud, 60, "nodes and the PostgreSQL ledger to agree")
    phase("convergence")
    assert writer.refusals == [] and writer.failures == []
    check_exactly_once(cloud, sessions, ledger, writer.acked, writer.stopped, nodes)
    assert len(writer.stopped) >= 4 and set(writer.origin.values()) == set(hosts)
    print(f"sessions {len(sessions)}; phases {phase}; {writer.summary()}")


# --- 5. a receipt reaches a node that was away while its peers retired the session ----------------


def test_receipt_reaches_a_node_that_was_down_while_its_peers_archived_the_session(rig: Rig) -> None:
    """Issue 4, "back in the mesh": the receipt reaches every node, then each retires the session.

    node-1 (no uplink) stops a session and is SIGKILLed before the receipt comes
    back; node-2 (the leader) gets the receipt and, after the retention period
    (1 s here), archives the session. When node-1 returns it still holds the
    session `completed`, without its receipt: it must still learn the receipt
    (and then archive the session too).
    """
    cloud = rig.cloud("127.0.0.75")
    coap, http = free_port("127.0.0.76"), free_port("127.0.0.76")
    n1 = rig.node("node-1", "127.0.0.76", coap_port=coap, http_port=http, peers=[f"127.0.0.77:{coap}"])
    n2 = rig.node("node-2", "127.0.0.77", coap_port=coap, http_port=http, peers=[f"127.0.0.76:{coap}"], cloud=cloud)
    for n in (n1, n2):
        n.extra += ["--retention", "1"]
    start_all([n1, n2])
    poll(lambda: set(leaders([n1, n2]).values()) == {"node-2"}, 30, "node-2 to lead")
    uplink = rig.proxies["node-2"]
    uplink.cut()  # keeps the receipt away until node-1 is down
    poll(lambda: status(n2)["leader"] is None, 15, "node-2 to stop leading without its uplink")

    sid = n1.post("/v1/sessions", {"charger": "c1", "connector": 1, "id_token": "T", "meter_wh": 0}).json()[
        "session_id"
    ]
    assert n1.post(f"/v1/sessions/{sid}/events", {"type": "stop", "meter_wh": 800}).status_code == 201
    poll(lambda: n2.get(f"/v1/sessions/{sid}")["state"] == "completed", 15, "node-2 to hold the stopped session")
    n1.kill()
    uplink.restore()
    poll(lambda: cloud.ledger().get(sid, {}).get("state") == "reconciled", 30, "the receipt in the ledger")
    poll(lambda: status(n2)["archived"] == 1, 15, "node-2 to archive the reconciled session")

    n1.start()

    def learned_receipt() -> bool:
        # A node archives a session only once it holds its receipt (`Node._retire`), and
        # with a 1 s retention it may do so between two polls: then the session answers 404
        # and the archive count says it was reconciled here.
        if status(n1)["archived"] == 1:
            return True
        return bool(n1.get(f"/v1/sessions/{sid}")["state"] == "reconciled")

    try:
        poll(learned_receipt, 15, "node-1 to learn the receipt of its own session")
    except AssertionError as exc:
        s1, st1, st2 = n1.get(f"/v1/sessions/{sid}"), status(n1), status(n2)
        raise AssertionError(
            f"{exc}: node-1 holds {sid} {s1['state']}, receipt {s1['receipt']}; node-1 sync_state "
            f"{st1['sync_state']} documents_not_everywhere {st1['documents_not_everywhere']}; "
            f"node-2 archived {st2['archived']} documents {st2['documents']}"
        ) from None
    poll(lambda: status(n1)["archived"] == 1, 15, "node-1 to archive it as well")


# --- 6. the cloud restarts on a database an earlier version created -----------------------------


def test_cloud_restarted_on_a_database_of_the_previous_schema_migrates_it(rig: Rig) -> None:
    """A restart of the cloud service is also how it is upgraded: same database, newer code.

    The database here is what the service created before the ledger gained its
    `review` column (commit 7b025b4), with a session billed by that version. The
    new service brings the schema up to date on start (`uplink/migrations`): it
    starts, keeps the old row, and writes the new column. (Serving 503 "no such
    column: review" on every request, what happened before the migration existed,
    stalls every site's forwarding; refusing to start would need an operator.)
    """
    import sqlite3

    from .test_migrations import LAST_DDL_BEFORE_MIGRATIONS as _SCHEMA

    db = rig.tmp / "old.db"
    with sqlite3.connect(db) as conn:
        for statement in _SCHEMA:
            conn.execute(statement.replace("        review        TEXT,\n", "").format(blob="BLOB"))
        conn.execute(
            "INSERT INTO ledger (session_id, site, charger, connector, id_token, energy_wh, state, conflicts, "
            "first_seen, updated) VALUES ('old-session', 'default', 'c0', 1, 'T0', 1234, 'charging', 0, 1, 1)"
        )
    with sqlite3.connect(db) as conn:
        assert "review" not in {row[1] for row in conn.execute("PRAGMA table_info(ledger)")}
    cloud = CloudProcess(
        "127.0.0.78", free_port("127.0.0.78"), f"sqlite:///{db}", rig.tmp / "cloud.key", rig.tmp / "cloud.log"
    )
    rig.clouds.append(cloud)
    cloud.start()  # it must start: no refusal, no 503s
    with sqlite3.connect(db) as conn:
        assert "review" in {row[1] for row in conn.execute("PRAGMA table_info(ledger)")}, "the schema was not migrated"
    old = cloud.ledger()["old-session"]
    assert (old["energy_wh"], old["state"], old["review"]) == (1234, "charging", None)  # kept as it was

    signer = EventSigner("charger-9", nacl.signing.SigningKey(b"charger-9".ljust(32, b"\0")))
    sid = os.urandom(16).hex()
    doc = new_session_doc(
        sid,
        site="default",
        charger="c9",
        connector=1,
        id_token="T",
        tariff={"currency": "EUR", "per_kwh_cents": 39},
        created_by="charger-9",
    )
    add_event(
        doc,
        signer.sign("authorize", sid, 1_700_000_000_000, data={"auth": "offline", "review": True}),
        public_key=signer.public_key,
    )
    for kind, meter in (("start", 0), ("stop", 1000)):
        add_event(doc, signer.sign(kind, sid, 1_700_000_000_000, meter_wh=meter), public_key=signer.public_key)
    assert sync_as_leader(cloud, {sid: doc}) == {}
    row = cloud.ledger()[sid]
    assert (row["state"], row["energy_wh"], row["review"]) == ("reconciled", 1000, "offline")  # the new column works
    assert cloud.get("/v1/stats")["sessions"] == 2


# --- 7. `meshnode cloud --site`: only devices certified by that site are billed ------------------


def test_cloud_with_site_bills_only_devices_certified_by_its_site(rig: Rig) -> None:
    """The real `meshnode cloud --site DIR` (its own certificate check, not a stand-in)."""
    from meshnode._security import create_site, enroll, load_or_create_node_key

    now = time.time()
    ours, theirs = rig.tmp / "site", rig.tmp / "other-site"
    create_site(ours, "field-a", now=now)
    create_site(theirs, "field-b", now=now)
    dirs = {"charger-1": rig.tmp / "charger-1", "charger-9": rig.tmp / "charger-9"}
    enroll(ours, "charger-1", dirs["charger-1"], now=now)
    enroll(theirs, "charger-9", dirs["charger-9"], now=now)  # a stranger: a genuine certificate, another site
    keys = {name: load_or_create_node_key(d) for name, d in dirs.items()}
    certs = {name: (d / "node.cert").read_bytes() for name, d in dirs.items()}
    raw = nacl.signing.SigningKey(b"charger-7".ljust(32, b"\0"))

    cloud = CloudProcess(
        "127.0.16.10",
        free_port("127.0.16.10"),
        f"sqlite:///{rig.tmp}/cloud.db",
        rig.tmp / "cloud.key",
        rig.tmp / "cloud.log",
        extra=["--site", str(ours)],
    )
    rig.clouds.append(cloud)
    cloud.start()

    def session(device: str, key: nacl.signing.SigningKey, declared: bytes) -> tuple[str, Document]:
        sid = os.urandom(16).hex()
        signer = EventSigner(device, key)
        doc = new_session_doc(
            sid,
            site="field-a",
            charger=device,
            connector=1,
            id_token="T",
            tariff={"currency": "EUR", "per_kwh_cents": 39},
            created_by=device,
        )
        for kind, meter in (("authorize", None), ("start", 0), ("stop", 2_000)):
            add_event(doc, signer.sign(kind, sid, 1_700_000_000_000, meter_wh=meter), public_key=declared)
        return sid, doc

    enrolled = session("charger-1", keys["charger-1"], certs["charger-1"])
    stranger = session("charger-9", keys["charger-9"], certs["charger-9"])
    raw_key = session("charger-7", raw, bytes(raw.verify_key))  # a key declared without a certificate
    borrowed = session("charger-5", keys["charger-1"], certs["charger-1"])  # our site's certificate, another id
    docs = dict([enrolled, stranger, raw_key, borrowed])
    from uplink import DeviceCredential

    gateway = DeviceCredential(keys["charger-1"], certs["charger-1"])  # the site's own device forwards
    assert sync_as_leader(cloud, docs, node="charger-1", credential=gateway) == {}

    ledger = cloud.ledger()
    assert set(ledger) == set(docs)
    assert (ledger[enrolled[0]]["state"], ledger[enrolled[0]]["energy_wh"]) == ("reconciled", 2_000)
    assert ledger[enrolled[0]]["receipt"] is not None and ledger[enrolled[0]]["conflicts"] == 0
    for sid, _ in (stranger, raw_key, borrowed):
        row = ledger[sid]
        assert (row["state"], row["energy_wh"], row["receipt"]) == ("idle", 0, None), (sid, row)
        detail = cloud.get(f"/v1/sessions/{sid}")
        assert detail["events"] == []  # nothing verified, nothing stored as billable
        assert {c["kind"] for c in detail["conflicts"]} == {"invalid_event"} and len(detail["conflicts"]) == 3
        assert all("unknown_key" in c["detail"] for c in detail["conflicts"])
    assert cloud.get("/v1/stats")["receipts"] == 1
