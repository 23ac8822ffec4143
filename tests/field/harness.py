"""The field harness: an enrolled site of real `meshnode` processes, chargers, faults, and an honest audit.

How a site runs, and so how this runs (docs/field.md has the why of each choice):

- `meshnode site init` and `meshnode enroll` make the site's keys and each
  node's data dir, with the real command line;
- each node is `meshnode run --data-dir DIR --bind 10.78.0.K` in its own network
  namespace on one bridge (`netns.Network`): default ports (CoAP 5683, HTTP
  8080), mDNS discovery, no static peers, no test flags; the two uplink nodes
  add `--cloud-url http://10.78.200.1:8700`, the only host that has a route to
  the cloud;
- the cloud is `meshnode cloud --db sqlite:///... --bind 10.78.200.1 --site SITE`
  (default port) in a namespace of its own;
- each node has a charger (a thread in the node's namespace) that starts,
  meters and stops sessions through the node's HTTP API, retrying a stop until
  the node has it, and writes down what it sent and what was acknowledged;
- a node or cloud process that exits without the harness killing it is
  recorded (exit code, the end of its log) and started again after two
  seconds, as systemd's `Restart=on-failure` would: the exit is a failure of the
  run, the restart lets the run go on checking everything else.

The audit compares the ledger with what the chargers saw, not with what the
nodes hold: every acknowledged event in the ledger once, every ledger row a
charging attempt some charger really made, the billed energy one of the
readings that charger sent (the stop reading when the stop landed), no
conflict, one receipt per session and the same one on every node.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import json
import os
import random
import re
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from meshnode._apiauth import DataDirTokens

from . import netns
from .netns import CLOUD_ADDRESS, Network

REPO = Path(__file__).resolve().parents[2]
CLOUD_PORT = 8700  # the service's default, never passed on the command line
NODE_HTTP_PORT = 8080  # the node's default
CLOUD_URL = f"http://{CLOUD_ADDRESS}:{CLOUD_PORT}"
RESTART_AFTER_CRASH_S = 2.0
READY_TIMEOUT_S = 90.0
HTTP_TIMEOUT_S = 10.0


class FieldFailure(Exception):
    """The run could not go on (the site did not come up, a command failed); the message says why."""


_NODE_DIRS: dict[str, Path] = {}
"""Each enrolled node's address -> its data dir, whose api.token the clients present."""


def _client() -> httpx.Client:
    # No keep-alive: a node killed and restarted must not leave the client a dead connection.
    # Enrolled nodes want their operator token on every /v1 request (docs/security.md).
    return httpx.Client(
        timeout=HTTP_TIMEOUT_S,
        limits=httpx.Limits(max_keepalive_connections=0),
        auth=DataDirTokens(dict(_NODE_DIRS)),
    )


# --- processes -----------------------------------------------------------------------------


class Proc:
    """One `meshnode` child process in a namespace, restartable on the same data.

    stdout (the ready line) goes to NAME.out, stderr (the log) is appended to
    NAME.log across restarts, each start marked. `PR_SET_PDEATHSIG` (through
    `setpriv`) takes the child down if the harness dies; children are spawned
    from the main thread only, since the signal follows the thread that forked.
    """

    def __init__(self, name: str, namespace: str, argv: list[str], workdir: Path, clock: Callable[[], float]) -> None:
        self.name, self.namespace, self.argv, self.workdir = name, namespace, argv, workdir
        self.clock = clock
        self.log_path = workdir / f"{name}.log"
        self.out_path = workdir / f"{name}.out"
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.started_at = 0.0
        self.ready = False
        self.ready_info: dict[str, Any] = {}
        self.held_down = True  # the harness killed or stopped it (or has not started it)
        self.crashes: list[dict[str, Any]] = []
        self.restart_at: float | None = None
        self.kills = 0
        self.ready_after_s: list[float] = []  # start to ready line, per start
        self.absent: list[list[float | None]] = []  # [killed or exited, ready again] (for the receipt figures)
        self.cpu_s = 0.0  # user + system CPU of its runs that the harness ended (a crashed run is gone from /proc)

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def spawn(self) -> None:
        assert threading.current_thread() is threading.main_thread(), "spawn children from the main thread"
        assert not self.running
        self.starts += 1
        with open(self.log_path, "a") as log:
            log.write(f"==== field harness: start #{self.starts} at t={self.clock():.1f}s\n")
        self.out_path.write_bytes(b"")
        args = [
            "ip",
            "netns",
            "exec",
            self.namespace,
            "setpriv",
            "--pdeathsig",
            "KILL",
            "--",
            sys.executable,
            "-m",
            "meshnode.cli",
            *self.argv,
        ]
        with open(self.log_path, "ab") as log, open(self.out_path, "wb") as out:
            self.popen = subprocess.Popen(args, stdout=out, stderr=log, stdin=subprocess.DEVNULL, cwd=REPO)
        self.started_at = self.clock()
        self.ready = False
        self.held_down = False
        self.restart_at = None

    def check_ready(self) -> bool:
        if not self.ready and self.running:
            text = self.out_path.read_text(errors="replace")
            if text.endswith("\n"):
                info = json.loads(text.splitlines()[0])
                if info.get("ready") is True:
                    self.ready, self.ready_info = True, info
                    self.ready_after_s.append(round(self.clock() - self.started_at, 1))
                    if self.absent and self.absent[-1][1] is None:
                        self.absent[-1][1] = self.clock()
        return self.ready

    def _account_cpu(self) -> None:
        assert self.popen is not None
        try:
            fields = Path(f"/proc/{self.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
            self.cpu_s += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass

    def kill(self) -> None:
        """SIGKILL (a power cut); the harness expects this exit."""
        self.held_down = True
        self.restart_at = None
        if self.running:
            assert self.popen is not None
            self._account_cpu()
            self.popen.kill()
            self.popen.wait()
            self.kills += 1
            self.absent.append([self.clock(), None])
        self.ready = False

    def terminate(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait; the exit code, or None if it had to be killed."""
        self.held_down = True
        if not self.running:
            return self.popen.returncode if self.popen is not None else None
        assert self.popen is not None
        self._account_cpu()
        self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            return None

    def unexpected_exit(self) -> int | None:
        """The exit code if the process ended by itself since the last check (recorded once)."""
        if self.held_down or self.popen is None or self.popen.poll() is None:
            return None
        code = self.popen.returncode
        self.held_down = True
        self.absent.append([self.clock(), None])
        tail, exception = last_error(self.log_path)
        self.crashes.append(
            {
                "process": self.name,
                "code": code,
                "t": round(self.clock(), 1),
                "start": self.starts,
                "uptime_s": round(self.clock() - self.started_at, 1),
                "exception": exception,
                "log_tail": tail,
            }
        )
        return code

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])


EXCEPTION_LINE = re.compile(r"^[\s|+]*((?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|ExceptionGroup|Exit)\b.*)$")


def last_error(log_path: Path, lines: int = 100) -> tuple[str, str]:
    """The end of a log (where a crashed process left its traceback) and its last exception line."""
    try:
        text = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return "", ""
    tail = text[-lines:]
    found = [m.group(1) for m in map(EXCEPTION_LINE.match, tail) if m]
    return "\n".join(tail), (found[-1] if found else (tail[-1] if tail else ""))


def log_summary(log_path: Path) -> dict[str, Any]:
    """What a reader of a log wants first: tracebacks, ERROR and WARNING counts, the commonest of each."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    warnings: Counter[str] = Counter()
    exceptions: Counter[str] = Counter()
    for line in lines:
        if " WARNING " in line:
            warnings[" ".join(line.split(" WARNING ", 1)[1].split()[:8])] += 1
        elif (m := EXCEPTION_LINE.match(line)) and not line[:4].isdigit():
            exceptions[m.group(1)[:160]] += 1
    return {
        "lines": len(lines),
        "tracebacks": sum("Traceback (most recent call last)" in line for line in lines),
        "errors": sum(" ERROR " in line or " CRITICAL " in line for line in lines),
        "warnings": sum(warnings.values()),
        "top_warnings": warnings.most_common(3),
        "exceptions": exceptions.most_common(5),
    }


# --- chargers ------------------------------------------------------------------------------


@dataclass
class Attempt:
    """One charging session as its charger saw it."""

    node: str
    charger: str
    id_token: str
    start_meter: int
    session_id: str | None = None  # known once the start was acknowledged
    acked_events: dict[str, int | None] = field(default_factory=dict)  # event id -> meter reading
    sent: list[int] = field(default_factory=list)  # every reading sent (start, meters, stop)
    acked_readings: list[int] = field(default_factory=list)
    stop_reading: int | None = None
    stop_acked_at: float | None = None
    stop_landed: bool = False  # a 201, or a 409 saying an earlier, unanswered stop had landed


class Charger(threading.Thread):
    """A charger on one node: sessions of a few meter readings each, through the node's API.

    Runs in the node's namespace. A request that gets no answer (the node is
    down, the answer is lost) is not retried except the stop, which is retried
    until the node has it (or `stop_deadline_s` passes), as a charger must end
    its transaction. Readings are cumulative, so a lost meter reading loses no
    energy. Each start uses a new id token, so every ledger row can be traced
    to one start attempt.
    """

    def __init__(
        self, node: str, namespace: str, url: str, seed: int, clock: Callable[[], float], stop_deadline_s: float = 90.0
    ) -> None:
        super().__init__(daemon=True, name=f"charger-{node}")
        self.node, self.namespace, self.url = node, namespace, url
        self.rng = random.Random(f"{seed}:{node}")
        self.clock = clock
        self.stop_deadline_s = stop_deadline_s
        self.attempts: list[Attempt] = []
        self.outcomes: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.refusals: list[str] = []
        self.finish = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            netns.enter(self.namespace)
            with _client() as http:
                self._loop(http)
        except BaseException as exc:  # noqa: BLE001  (surfaced by the harness's tick)
            self.error = exc

    def _post(self, http: httpx.Client, path: str, body: dict[str, Any], what: str) -> httpx.Response | None:
        started = time.monotonic()
        try:
            r = http.post(self.url + path, json=body)
        except httpx.HTTPError as exc:
            self.outcomes[f"{what}: no answer ({type(exc).__name__})"] += 1
            return None
        self.latencies.append(time.monotonic() - started)
        self.outcomes[f"{what}: {r.status_code}"] += 1
        if r.status_code != 201:
            self.refusals.append(f"t={self.clock():.1f} {self.node} {what}: {r.status_code} {r.text[:200]}")
        return r

    def _loop(self, http: httpx.Client) -> None:
        meter = self.rng.randrange(0, 1_000_000)
        n = 0
        while not self.finish.is_set():
            n += 1
            a = Attempt(self.node, f"{self.node}-cp1", f"FLD-{self.node}-{n}", meter)
            self.attempts.append(a)
            a.sent.append(meter)
            r = self._post(
                http,
                "/v1/sessions",
                {"charger": a.charger, "connector": 1, "id_token": a.id_token, "meter_wh": meter},
                "start",
            )
            if r is None or r.status_code != 201:
                self.finish.wait(1.0)
                meter += 1  # a new attempt reads a new register value
                continue
            body = r.json()
            a.session_id = body["session_id"]
            for e in body.get("events", []):
                a.acked_events[e["event_id"]] = e.get("meter_wh")
            a.acked_readings.append(meter)
            path = f"/v1/sessions/{a.session_id}/events"
            for _ in range(self.rng.randint(2, 5)):
                if self.finish.wait(self.rng.uniform(0.6, 1.4)):
                    break
                meter += self.rng.randrange(50, 400)
                a.sent.append(meter)
                r = self._post(http, path, {"type": "meter", "meter_wh": meter}, "meter")
                if r is not None and r.status_code == 201:
                    a.acked_events[r.json()["event"]["event_id"]] = meter
                    a.acked_readings.append(meter)
            meter += self.rng.randrange(0, 60)
            self._stop_session(http, a, path, meter)
            self.finish.wait(self.rng.uniform(0.5, 2.0))

    def _stop_session(self, http: httpx.Client, a: Attempt, path: str, meter: int) -> None:
        a.stop_reading = meter
        a.sent.append(meter)
        deadline = time.monotonic() + self.stop_deadline_s
        while time.monotonic() < deadline:
            r = self._post(http, path, {"type": "stop", "meter_wh": meter}, "stop")
            if r is not None and r.status_code == 201:
                a.acked_events[r.json()["event"]["event_id"]] = meter
                a.acked_readings.append(meter)
                a.stop_landed, a.stop_acked_at = True, self.clock()
                return
            if r is not None and r.status_code == 409 and ("completed" in r.text or "reconciled" in r.text):
                a.stop_landed = True  # an earlier attempt landed; its answer was lost
                a.stop_acked_at = self.clock()
                return
            time.sleep(0.5)


# --- watching the nodes ----------------------------------------------------------------------


class Monitor(threading.Thread):
    """Polls one node's status and sessions from inside its namespace.

    Keeps the latest answers with the time they were taken, and the first time
    each session was seen reconciled on this node (for the receipt spread).
    """

    def __init__(
        self,
        node: str,
        namespace: str,
        url: str,
        clock: Callable[[], float],
        status_every: float = 1.0,
        sessions_every: float = 2.0,
    ) -> None:
        super().__init__(daemon=True, name=f"monitor-{node}")
        self.node, self.namespace, self.url, self.clock = node, namespace, url, clock
        self.status_every, self.sessions_every = status_every, sessions_every
        self.status: dict[str, Any] | None = None
        self.status_at = -1.0
        self.sessions: dict[str, dict[str, Any]] | None = None
        self.sessions_at = -1.0
        self.reconciled_at: dict[str, float] = {}
        self.leaders: list[tuple[float, str | None]] = []
        self.latencies: dict[str, list[float]] = {"status": [], "sessions": []}
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            netns.enter(self.namespace)
            with _client() as http:
                next_sessions = 0.0
                while not self.halt.is_set():
                    self._status(http)
                    if time.monotonic() >= next_sessions:
                        self._sessions(http)
                        next_sessions = time.monotonic() + self.sessions_every
                    self.halt.wait(self.status_every)
        except BaseException as exc:  # noqa: BLE001  (surfaced by the harness's tick)
            self.error = exc

    def _status(self, http: httpx.Client) -> None:
        t = self.clock()
        try:
            r = http.get(self.url + "/v1/status")
            r.raise_for_status()
            self.status, self.status_at = r.json(), t
            self.latencies["status"].append(self.clock() - t)
        except (httpx.HTTPError, ValueError):
            self.status = None
            return
        leader = self.status.get("leader")
        if not self.leaders or self.leaders[-1][1] != leader:
            self.leaders.append((t, leader))

    def _sessions(self, http: httpx.Client) -> None:
        t = self.clock()
        try:
            r = http.get(self.url + "/v1/sessions")
            r.raise_for_status()
            sessions = {s["session_id"]: s for s in r.json()["sessions"]}
        except (httpx.HTTPError, ValueError, KeyError):
            return
        self.latencies["sessions"].append(self.clock() - t)
        self.sessions, self.sessions_at = sessions, t
        for sid, s in sessions.items():
            if s.get("state") == "reconciled":
                self.reconciled_at.setdefault(sid, t)


# --- the scenario ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """A fault at `at` seconds into the fault phase, undone `duration` seconds later.

    kind: "kill" (SIGKILL, restart on the same data dir), "isolate" (the host's
    LAN link down), "cloud" (SIGKILL the cloud, restart on the same database),
    "uplink" (cut an uplink, restore, cut, restore: two flaps in `duration`).
    target: "leader" (whoever most nodes follow), "other" (a node that is
    neither the leader nor an uplink node), or a node name.
    """

    at: float
    kind: str
    duration: float
    target: str = ""


def short_schedule() -> tuple[list[Fault], float]:
    """The short run's faults (about 45 s under loss), and when the heal comes."""
    return [
        Fault(3, "kill", 6, "leader"),
        Fault(11, "kill", 6, "other"),
        Fault(19, "isolate", 15, "other"),
        Fault(22, "cloud", 8),
        Fault(33, "uplink", 8, "leader"),
    ], 45.0


def seeded_schedule(seed: int, duration: float) -> tuple[list[Fault], float]:
    """Faults for a long run: every kind once per round of about 90 s, at seeded times; heal at `duration`.

    Within a round each fault starts at a random time and may overlap others
    (the leader killed while the cloud is down is a case worth having).
    """
    rng = random.Random(seed)
    rounds = max(1, int(duration // 90))
    span = duration / rounds
    faults: list[Fault] = []
    for r in range(rounds):
        base = r * span
        plan = [
            ("kill", rng.uniform(3, 10), "leader"),
            ("kill", rng.uniform(3, 10), "other"),
            ("isolate", min(30.0, span / 3), "other"),
            ("cloud", rng.uniform(5, 15), ""),
            ("uplink", rng.uniform(6, 12), "leader"),
        ]
        for kind, dur, target in plan:
            start = base + rng.uniform(2, max(2.5, span - dur - 2))
            faults.append(Fault(round(start, 1), kind, round(dur, 1), target))
    faults.sort(key=lambda f: f.at)
    return faults, duration


@dataclass
class Settings:
    nodes: int = 6
    uplinks: int = 2
    loss: int = 30
    seed: int = 1
    faults: list[Fault] = field(default_factory=list)
    heal_at: float = 45.0
    converge_timeout: float = 180.0
    mesh_timeout: float = 90.0
    warmup: float = 5.0
    stable_leader_samples: int = 3
    status_every: float = 1.0  # monitors: GET /v1/status
    sessions_every: float = 3.0  # monitors: GET /v1/sessions (bounds the receipt figures' resolution)


class FieldRun:
    """One field run: build the site, run the scenario, audit. `run()` returns the report (a dict).

    Everything it creates (namespaces, processes, threads) is removed by `close()`,
    which `run()` calls on every exit path.
    """

    def __init__(self, settings: Settings, workdir: Path, progress: Callable[[str], None] = lambda s: None) -> None:
        self.s = settings
        self.workdir = workdir
        self.say = progress
        self.t0 = time.monotonic()
        self.names = [f"n{i}" for i in range(1, settings.nodes + 1)]
        self.uplink_names = self.names[: settings.uplinks]
        self.net = Network(self.names, self.uplink_names)
        self.rng = random.Random(f"field:{settings.seed}")
        self.nodes: dict[str, Proc] = {}
        self.cloud: Proc | None = None
        self.chargers: dict[str, Charger] = {}
        self.monitors: dict[str, Monitor] = {}
        self.timeline: list[str] = []
        self.anomalies: list[str] = []
        self.faulted: dict[str, str] = {}  # node -> what is being done to it
        self.isolated_at: dict[str, list[list[float | None]]] = {}  # node -> [isolated, rejoined]
        self.heal_t: float | None = None
        self.converged_t: float | None = None
        self.converge_why = ""
        self.stop_codes: dict[str, int | None] = {}
        self.chargers_done_t = float("inf")

    def clock(self) -> float:
        return time.monotonic() - self.t0

    def mark(self, what: str) -> None:
        line = f"t={self.clock():6.1f}s ({time.strftime('%H:%M:%S')}) {what}"  # wall time: to find it in the logs
        self.timeline.append(line)
        self.say(line)

    def url(self, node: str) -> str:
        return f"http://{self.net.address(node)}:{NODE_HTTP_PORT}"

    # -- set-up --

    def _meshnode(self, *commands: list[str]) -> None:
        """Run `meshnode` commands (at once: each costs a Python start-up); any failure stops the run."""
        running = [
            (
                argv,
                subprocess.Popen(
                    [sys.executable, "-m", "meshnode.cli", *argv],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    cwd=REPO,
                ),
            )
            for argv in commands
        ]
        for argv, proc in running:
            _, err = proc.communicate(timeout=120)
            if proc.returncode != 0:
                raise FieldFailure(f"meshnode {' '.join(argv)} failed: {err.strip()}")

    def setup(self) -> None:
        removed = netns.remove_leftovers()
        if removed:
            self.mark(f"removed leftovers of a killed run: {removed}")
        self.net.build()
        site = self.workdir / "site"
        self._meshnode(["site", "init", "--site", str(site), "--name", "field"])
        self._meshnode(
            *[
                ["enroll", "--node-id", name, "--data-dir", str(self.workdir / name), "--site", str(site)]
                for name in self.names
            ]
        )
        (self.workdir / "cloud").mkdir()
        _NODE_DIRS[CLOUD_ADDRESS] = self.workdir / "cloud"  # the cloud's api.token sits beside its key
        self.cloud = Proc(
            "cloud",
            self.net.cloud_ns,
            [
                "cloud",
                "--db",
                f"sqlite:///{self.workdir / 'cloud' / 'cloud.db'}",
                "--bind",
                CLOUD_ADDRESS,
                "--site",
                str(site),
            ],
            self.workdir,
            self.clock,
        )
        for name in self.names:
            _NODE_DIRS[self.net.address(name)] = self.workdir / name
            argv = ["run", "--data-dir", str(self.workdir / name), "--bind", self.net.address(name)]
            if name in self.uplink_names:
                argv += ["--cloud-url", CLOUD_URL]
            self.nodes[name] = Proc(name, self.net.ns(name), argv, self.workdir, self.clock)
        self.mark(
            f"network built ({self.net.tag}), site enrolled: {len(self.names)} nodes, uplinks {self.uplink_names}"
        )
        for p in [self.cloud, *self.nodes.values()]:
            p.spawn()
        self._wait(lambda: all(p.check_ready() for p in self.procs()), READY_TIMEOUT_S, "every process to be ready")
        self.mark("all processes ready")
        for name in self.names:
            m = self.monitors[name] = Monitor(
                name, self.net.ns(name), self.url(name), self.clock, self.s.status_every, self.s.sessions_every
            )
            m.start()
        self._wait(
            self._mesh_formed, self.s.mesh_timeout, "the mesh to form (every node sees every other alive, one leader)"
        )
        self.mark(f"mesh formed, leader {self.current_leader()}")

    def procs(self) -> list[Proc]:
        return [p for p in [self.cloud, *self.nodes.values()] if p is not None]

    def _mesh_formed(self) -> bool:
        for name, m in self.monitors.items():
            st = m.status
            if st is None:
                return False
            alive = {p["node_id"] for p in st["peers"] if p["state"] == "alive"}
            if alive < set(self.names) - {name}:
                return False
        return self.agreed_leader() is not None

    # -- the loop: faults on schedule, processes watched --

    def tick(self) -> None:
        """Record and restart processes that exited on their own; check ready deadlines."""
        now = self.clock()
        for p in self.procs():
            code = p.unexpected_exit()
            if code is not None:
                self.mark(
                    f"{p.name} EXITED by itself with code {code} (restarting in {RESTART_AFTER_CRASH_S:g} s): "
                    f"{p.crashes[-1]['exception']}"
                )
                p.restart_at = now + RESTART_AFTER_CRASH_S
                self.faulted.setdefault(p.name, "crashed")  # no fault is aimed at it until it is back
            if p.restart_at is not None and now >= p.restart_at and not p.running:
                p.spawn()
                if self.faulted.get(p.name) == "crashed":
                    del self.faulted[p.name]
            if p.running and not p.ready and not p.check_ready() and now - p.started_at > READY_TIMEOUT_S:
                self.anomalies.append(f"{p.name} not ready {READY_TIMEOUT_S:g} s after start #{p.starts}")
                p.started_at = now  # report once per period
        threads: list[Charger | Monitor] = [*self.chargers.values(), *self.monitors.values()]
        for t in threads:
            if t.error is not None:
                raise FieldFailure(f"{t.name} failed: {t.error!r}") from t.error

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = self.clock() + timeout
        while not predicate():
            self.tick()
            if self.clock() > deadline:
                raise FieldFailure(f"timed out after {timeout:g} s waiting for {what}\n{self.diagnostics()}")
            time.sleep(0.25)

    def sleep_until(self, t: float) -> None:
        while self.clock() < t:
            self.tick()
            time.sleep(min(0.25, max(0.0, t - self.clock())))

    def agreed_leader(self) -> str | None:
        leaders = {m.status.get("leader") if m.status else "?" for m in self.monitors.values()}
        return leaders.pop() if len(leaders) == 1 and None not in leaders and "?" not in leaders else None

    def current_leader(self) -> str | None:
        votes = Counter(m.status.get("leader") for m in self.monitors.values() if m.status and m.status.get("leader"))
        return votes.most_common(1)[0][0] if votes else None

    def _pick(self, target: str) -> str | None:
        free = [n for n in self.names if n not in self.faulted]
        if target == "leader":
            leader = self.current_leader()
            return leader if leader in free else None
        if target == "other":
            leader = self.current_leader()
            choices = [n for n in free if n != leader and n not in self.uplink_names]
            return self.rng.choice(choices) if choices else None
        return target if target in free else None

    def run_faults(self) -> None:
        """Loss on, the faults at their times (each undone after its duration), then the heal.

        A fault whose target is not available (the leader is down, every other
        node is already under a fault) is tried again every 2 s, five times,
        then skipped; the timeline says so.
        """
        fault_t0 = self.clock()
        heal_at = fault_t0 + self.s.heal_at
        self.net.set_loss(self.s.loss)
        self.mark(f"loss {self.s.loss} % on the LAN")
        order = itertools.count()
        events: list[tuple[float, int, Any]] = [(fault_t0 + f.at, next(order), (f, 0)) for f in self.s.faults]
        heapq.heapify(events)
        while events and events[0][0] <= heal_at:
            t, _, what = heapq.heappop(events)
            self.sleep_until(t)
            if callable(what):
                what()
                continue
            f, tries = what
            undos = self._start_fault(f)
            if undos is None:
                if tries < 5:
                    heapq.heappush(events, (self.clock() + 2.0, next(order), (f, tries + 1)))
                else:
                    self.mark(f"skipped {f.kind} of {f.target or 'the cloud'}: no eligible target for 10 s")
                continue
            for dt, fn in undos:
                heapq.heappush(events, (self.clock() + dt, next(order), fn))
        self.sleep_until(heal_at)
        for _, _, what in sorted(events, key=lambda e: (e[0], e[1])):
            if callable(what):
                what()
            else:
                self.mark(f"skipped {what[0].kind} of {what[0].target or 'the cloud'}: the heal came first")
        self.heal()

    def _start_fault(self, f: Fault) -> list[tuple[float, Callable[[], None]]] | None:
        """Start a fault; returns what undoes it and when, or None if its target is not available now."""
        if f.kind == "cloud":
            assert self.cloud is not None
            if "cloud" in self.faulted:
                return None
            self.faulted["cloud"] = "killed"
            self.cloud.kill()
            self.mark(f"cloud SIGKILLed for {f.duration:g} s")
            return [(f.duration, self._restart_cloud)]
        picked = self._pick(f.target)
        if f.kind == "uplink" and picked not in self.uplink_names:
            # No agreed leader (the cloud was just down, say): flap an uplink all the same.
            picked = next((n for n in self.uplink_names if n not in self.faulted), None)
        if picked is None:
            return None
        node: str = picked
        if f.kind == "kill":
            self.faulted[node] = "killed"
            self.nodes[node].kill()
            self.mark(f"{node} ({f.target}) SIGKILLed for {f.duration:g} s")
            return [(f.duration, lambda: self._restart(node))]
        if f.kind == "isolate":
            self.faulted[node] = "isolated"
            self.net.isolate(node)
            self.isolated_at.setdefault(node, []).append([self.clock(), None])
            self.mark(f"{node} ({f.target}) isolated for {f.duration:g} s")
            return [(f.duration, lambda: self._rejoin(node))]
        if f.kind == "uplink":
            self.faulted[node] = "uplink flapping"
            q = f.duration / 4
            self.net.cut_uplink(node)
            self.mark(f"{node}'s uplink cut (flapping: {q:.1f} s down, up, down, up)")
            return [
                (q, lambda: self.net.restore_uplink(node)),
                (2 * q, lambda: self.net.cut_uplink(node)),
                (3 * q, lambda: self._uplink_back(node)),
            ]
        raise ValueError(f"unknown fault kind {f.kind!r}")

    def _restart(self, node: str) -> None:
        self.nodes[node].spawn()
        self.faulted.pop(node, None)
        self.mark(f"{node} restarted on its data dir")

    def _restart_cloud(self) -> None:
        assert self.cloud is not None
        self.cloud.spawn()
        self.faulted.pop("cloud", None)
        self.mark("cloud restarted on its database")

    def _rejoin(self, node: str) -> None:
        self.net.rejoin(node)
        self._rejoined(node)
        self.faulted.pop(node, None)
        self.mark(f"{node} rejoined the LAN")

    def _uplink_back(self, node: str) -> None:
        self.net.restore_uplink(node)
        self.faulted.pop(node, None)
        self.mark(f"{node}'s uplink restored")

    def _rejoined(self, node: str) -> None:
        for window in self.isolated_at.get(node, []):
            if window[1] is None:
                window[1] = self.clock()

    def heal(self) -> None:
        for node in self.net.isolated:
            self._rejoined(node)
        self.net.heal()
        for name, what in list(self.faulted.items()):
            if what == "killed":
                self._restart(name) if name != "cloud" else self._restart_cloud()
        self.faulted.clear()
        self.heal_t = self.clock()
        self.mark("HEAL: no loss, every link up, every process running")

    # -- convergence --

    def _converged(self, ledger: dict[str, dict[str, Any]] | None) -> bool:
        assert self.heal_t is not None
        views = {}
        for name, m in self.monitors.items():
            if m.sessions is None or m.sessions_at < self.heal_t or m.status is None or m.status_at < self.heal_t:
                self.converge_why = f"{name}: no answer since the heal"
                return False
            views[name] = m.sessions
        first_name, first = next(iter(views.items()))
        for name, view in views.items():
            if view.keys() != first.keys():
                diff = sorted(view.keys() ^ first.keys())
                self.converge_why = f"{name} holds {len(view)} sessions, {first_name} {len(first)} ({len(diff)} differ)"
                return False
            differ = [s for s in first if view[s]["heads"] != first[s]["heads"]]
            if differ:
                self.converge_why = f"{name} and {first_name} hold other versions of {len(differ)} sessions"
                return False
        completed = [s for s, v in first.items() if v["state"] == "completed"]
        if completed:
            self.converge_why = f"{len(completed)} sessions completed but without a receipt on the nodes"
            return False
        if ledger is None:
            self.converge_why = "the cloud's ledger does not answer"
            return False
        if ledger.keys() != first.keys():
            self.converge_why = f"ledger and nodes differ on {len(ledger.keys() ^ first.keys())} sessions"
            return False
        for sid, v in first.items():
            row = ledger[sid]
            if (row["state"], row["energy_wh"]) != (v["state"], v["energy_wh"]):
                self.converge_why = (
                    f"{sid}: ledger {row['state']} {row['energy_wh']} Wh, nodes {v['state']} {v['energy_wh']}"
                )
                return False
        leader = self.agreed_leader()
        if leader is None:
            self.converge_why = f"no agreed leader: {self.leaders_now()}"
            return False
        recent = [m.leaders[-1] for m in self.monitors.values()]
        if any(t > self.clock() - self.s.stable_leader_samples for t, _ in recent):
            self.converge_why = f"leader {leader} agreed only just now"
            return False
        return True

    def leaders_now(self) -> dict[str, str | None]:
        return {n: (m.status.get("leader") if m.status else "(no answer)") for n, m in self.monitors.items()}

    def ledger_rows(self) -> dict[str, dict[str, Any]] | None:
        def get() -> list[dict[str, Any]]:
            with _client() as http:
                r = http.get(CLOUD_URL + "/v1/sessions")
                r.raise_for_status()
                return r.json()["sessions"]

        try:
            rows = netns.call_in(self.net.cloud_ns, get, timeout=30)
        except (httpx.HTTPError, TimeoutError, ValueError):
            return None
        return {r["session_id"]: r for r in rows}

    def wait_converged(self) -> None:
        assert self.heal_t is not None
        deadline = self.heal_t + self.s.converge_timeout
        next_ledger = 0.0
        ledger = None
        while self.clock() < deadline:
            self.tick()
            if self.clock() >= next_ledger:
                ledger = self.ledger_rows()
                next_ledger = self.clock() + 2.0
            if self._converged(ledger):
                self.converged_t = self.clock()
                self.mark(
                    f"converged {self.converged_t - self.heal_t:.1f} s after the heal, leader {self.agreed_leader()}"
                )
                return
            time.sleep(0.5)
        self.mark(f"NOT converged {self.s.converge_timeout:g} s after the heal: {self.converge_why}")

    # -- the whole run --

    def run(self) -> dict[str, Any]:
        try:
            self.setup()
            for name in self.names:
                c = self.chargers[name] = Charger(name, self.net.ns(name), self.url(name), self.s.seed, self.clock)
                c.start()
            self.mark("chargers started")
            self.sleep_until(self.clock() + self.s.warmup)
            self.run_faults()
            for c in self.chargers.values():
                c.finish.set()
            for c in self.chargers.values():
                while c.is_alive():
                    self.tick()
                    c.join(0.25)
            self.chargers_done_t = self.clock()
            self.mark("chargers done (every session they started is stopped, or its stop given up)")
            self.wait_converged()
            report = self.report()
            self.stop_cleanly()
            unclean = {n: c for n, c in self.stop_codes.items() if c != 0}
            if unclean:
                report["failures"].append(
                    f"processes that did not stop cleanly on SIGTERM "
                    f"(exit code; None: still running after 20 s, killed): {unclean}"
                )
            report["clean_stop_codes"] = self.stop_codes
            # How busy everything was: a starved node answers late whatever its code does.
            report["cpu_s"] = {p.name: round(p.cpu_s, 1) for p in self.procs()}
            usage = resource.getrusage(resource.RUSAGE_SELF)
            report["cpu_s"]["harness"] = round(usage.ru_utime + usage.ru_stime, 1)
            report["load_average"] = os.getloadavg()
            report["passed"] = not report["failures"]
            report["wall_s"] = round(self.clock(), 1)
            return report
        finally:
            self.close()

    def stop_cleanly(self) -> None:
        """SIGTERM every process (nodes first): each must exit with status 0."""
        for m in self.monitors.values():
            m.halt.set()
        for p in [*self.nodes.values(), self.cloud]:
            if p is not None and p.running:
                self.stop_codes[p.name] = p.terminate()

    def close(self) -> None:
        for m in self.monitors.values():
            m.halt.set()
        for c in self.chargers.values():
            c.finish.set()
        for p in self.procs():
            p.kill()
        self.net.destroy()

    # -- the audit --

    def report(self) -> dict[str, Any]:
        """What happened, against what was promised. `failures` lists every broken guarantee."""
        failures: list[str] = []
        attempts = [a for c in self.chargers.values() for a in c.attempts]
        acked = [a for a in attempts if a.session_id is not None]
        rows = self.ledger_rows()
        if rows is None:
            failures.append("the cloud's ledger did not answer at the end")
            rows = {}

        def all_details(ids: list[str]) -> dict[str, Any]:
            with _client() as http:
                out = {}
                for sid in ids:
                    r = http.get(f"{CLOUD_URL}/v1/sessions/{sid}")
                    out[sid] = r.json() if r.status_code == 200 else None
                return out

        def cloud_get(path: str) -> Any:
            with _client() as http:
                r = http.get(CLOUD_URL + path)
                r.raise_for_status()
                return r.json()

        details: dict[str, Any] = {}
        stats: dict[str, Any] = {}
        conflicts: list[Any] = []
        try:
            details = netns.call_in(self.net.cloud_ns, all_details, sorted(rows), timeout=300)
            stats = netns.call_in(self.net.cloud_ns, cloud_get, "/v1/stats")
            conflicts = netns.call_in(self.net.cloud_ns, cloud_get, "/v1/conflicts")["conflicts"]
        except (httpx.HTTPError, TimeoutError) as exc:
            failures.append(f"the cloud did not answer the audit: {exc!r}")

        since_heal = self.clock() - (self.heal_t or 0)
        ledger = audit_ledger(attempts, rows, details, stats, conflicts)
        # Only answers taken after the last acknowledgement say whether a node holds it.
        fresh = {
            n: m.sessions
            for n, m in self.monitors.items()
            if m.sessions is not None and m.sessions_at >= self.chargers_done_t
        }
        nodes = audit_nodes(acked, fresh, rows)
        silent = sorted(set(self.monitors) - set(fresh))
        if silent:
            failures.append(f"nodes that did not answer GET /v1/sessions after the chargers finished: {silent}")
        failures += [
            f"{f} (checked {since_heal:.0f} s after the heal)" if "acknowledged" in f or "receipt" in f else f
            for f in ledger.failures
        ]
        if self.converged_t is None:
            failures.append(
                f"the nodes did not converge within {self.s.converge_timeout:g} s of the heal: {self.converge_why}"
            )
        failures += nodes
        reconciled = sum(1 for r in rows.values() if r["state"] == "reconciled")

        # Processes.
        exits = [c for p in self.procs() for c in p.crashes]
        if exits:
            failures.append(
                f"{len(exits)} processes exited by themselves: "
                + "; ".join(f"{e['process']} code {e['code']} at t={e['t']}: {e['exception']}" for e in exits)
            )
        failures += self.anomalies

        # Figures.
        stops = {a.session_id: a.stop_acked_at for a in acked if a.session_id and a.stop_acked_at is not None}
        absent = {
            name: [(w[0] or 0.0, w[1]) for w in self.nodes[name].absent + self.isolated_at.get(name, [])]
            for name in self.names
        }
        receipts = receipt_figures(
            {name: m.reconciled_at for name, m in self.monitors.items()}, list(rows), stops, absent, self.clock()
        )
        latencies = sorted(x for c in self.chargers.values() for x in c.latencies)
        outcomes: Counter[str] = Counter()
        for c in self.chargers.values():
            outcomes.update(c.outcomes)
        leader_changes = {n: (m.status or {}).get("leader_changes") for n, m in self.monitors.items()}
        return {
            "passed": not failures,
            "failures": failures,
            "seed": self.s.seed,
            "nodes": self.s.nodes,
            "uplinks": self.uplink_names,
            "loss_percent": self.s.loss,
            "faults": [dataclasses.asdict(f) for f in self.s.faults],
            "charging_attempts": len(attempts),
            "acknowledged_sessions": len(acked),
            "acknowledged_events": sum(len(a.acked_events) for a in acked),
            "stopped_sessions": sum(a.stop_landed for a in acked),
            "ledger_rows": len(rows),
            "ledger_events": sum(len(d["events"]) for d in details.values() if d),
            "ledger_reconciled": reconciled,
            **ledger.figures(),
            "node_exits": len(exits),
            "exits": exits,
            "converged": self.converged_t is not None,
            "converge_after_heal_s": round(self.converged_t - self.heal_t, 1)
            if self.converged_t is not None and self.heal_t is not None
            else None,
            "converge_blocker": None if self.converged_t is not None else self.converge_why,
            "leader_after_heal": self.agreed_leader(),
            "leaders_at_end": self.leaders_now(),
            "leader_changes": leader_changes,
            **receipts,
            "api": {
                "outcomes": dict(sorted(outcomes.items())),
                "latency_s": _percentiles(latencies),
                "refusals": [r for c in self.chargers.values() for r in c.refusals][:20],
            },
            "ready_after_start_s": {p.name: p.ready_after_s for p in self.procs()},
            "monitor_latency_s": {
                kind: _percentiles(x for m in self.monitors.values() for x in m.latencies[kind])
                for kind in ("status", "sessions")
            },
            "logs": {p.name: log_summary(p.log_path) for p in self.procs()},
            "timeline": self.timeline,
            "workdir": str(self.workdir),
            "wall_s": round(self.clock(), 1),
        }

    def diagnostics(self, lines: int = 40) -> str:
        """Status of every node and the end of every log, for a failure message."""
        out = ["timeline:", *self.timeline, "", f"leaders: {self.leaders_now()}"]
        for name, m in self.monitors.items():
            st = m.status or {}
            brief = {
                k: st.get(k)
                for k in (
                    "leader",
                    "uplink_score",
                    "sync_state",
                    "documents",
                    "documents_not_everywhere",
                    "incarnation",
                )
            }
            peers = {p["node_id"]: p["state"] for p in st.get("peers", [])}
            out.append(f"{name}: {brief} peers {peers} forwarder {st.get('forwarder')}")
        for p in self.procs():
            out.append(f"==== {p.log_path} (starts {p.starts}, exits by itself {len(p.crashes)}), last {lines} lines:")
            out.append(p.log_tail(lines))
        return "\n".join(out)


# --- the audit, without I/O (tests/field/test_audit.py feeds it made-up ledgers) ---------------


@dataclass
class LedgerAudit:
    """The ledger against the chargers' notes. Each list names the sessions or events concerned."""

    lost_sessions: list[str] = field(default_factory=list)
    lost_events: list[str] = field(default_factory=list)
    billed_twice: list[str] = field(default_factory=list)
    duplicate_events: list[str] = field(default_factory=list)
    unexpected_rows: list[str] = field(default_factory=list)
    energy_mismatches: list[str] = field(default_factory=list)
    unknown_readings: list[str] = field(default_factory=list)
    not_reconciled: list[str] = field(default_factory=list)
    unbilled_events: list[str] = field(default_factory=list)
    conflicts: list[Any] = field(default_factory=list)
    unacknowledged_starts_in_ledger: list[str] = field(default_factory=list)
    stats_mismatch: str = ""

    @property
    def failures(self) -> list[str]:
        out = []
        for what, items in (
            ("acknowledged sessions are not in the ledger", self.lost_sessions),
            ("acknowledged events are not billed in the ledger", self.lost_events),
            ("charging attempts billed as more than one session", self.billed_twice),
            ("events listed twice in the ledger", self.duplicate_events),
            ("ledger rows no charger started", self.unexpected_rows),
            ("energy mismatches", self.energy_mismatches),
            ("ledger readings no charger sent", self.unknown_readings),
            ("stopped sessions without a receipt in the ledger", self.not_reconciled),
            ("events the ledger holds but does not bill", self.unbilled_events),
            ("conflicts filed by the cloud", self.conflicts),
        ):
            if items:
                out.append(f"{len(items)} {what}: {items[:10]}")
        if self.stats_mismatch:
            out.append(self.stats_mismatch)
        return out

    def figures(self) -> dict[str, int]:
        return {
            "unacknowledged_starts_in_ledger": len(self.unacknowledged_starts_in_ledger),
            "lost_sessions": len(self.lost_sessions),
            "lost_events": len(self.lost_events),
            "billed_twice": len(self.billed_twice) + len(self.duplicate_events),
            "unexpected_ledger_rows": len(self.unexpected_rows),
            "energy_mismatches": len(self.energy_mismatches),
            "conflicts": len(self.conflicts),
        }


def audit_ledger(
    attempts: list[Attempt],
    rows: dict[str, dict[str, Any]],
    details: dict[str, Any],
    stats: dict[str, Any],
    conflicts: list[Any],
) -> LedgerAudit:
    """Check the cloud's ledger against what the chargers sent and what the nodes acknowledged.

    Args:
        attempts: every charging attempt of every charger (acknowledged or not).
        rows: the ledger's rows by session id (`GET /v1/sessions`).
        details: `GET /v1/sessions/{id}` by session id (row, events with status, conflicts).
        stats, conflicts: `GET /v1/stats`, `GET /v1/conflicts`.

    A row is traced to its attempt by (charger, id token): every attempt has its
    own token, so two rows for one attempt are a double billing, and a row no
    attempt explains was never started by a charger. An attempt whose start was
    never acknowledged may be in the ledger (the node committed it, the answer
    was lost) or not: nothing is promised for it, and it is only counted.
    """
    out = LedgerAudit(conflicts=list(conflicts))
    by_attempt = {(a.charger, a.id_token): a for a in attempts}
    rows_of: dict[tuple[str, str], list[str]] = defaultdict(list)
    for sid, ledger_row in rows.items():
        key = (ledger_row.get("charger"), ledger_row.get("id_token"))
        if key in by_attempt:
            rows_of[key].append(sid)  # type: ignore[index]
        else:
            out.unexpected_rows.append(sid)
    for key, sids in rows_of.items():
        a = by_attempt[key]
        if len(sids) > 1:
            out.billed_twice.append(f"{a.id_token}: {sorted(s[:8] for s in sids)}")
        elif a.session_id is None:
            out.unacknowledged_starts_in_ledger.append(sids[0])
        elif sids[0] != a.session_id:
            out.billed_twice.append(f"{a.id_token}: billed as {sids[0][:8]}, acknowledged as {a.session_id[:8]}")
    for a in attempts:
        if a.session_id is None:
            continue
        sid = a.session_id
        row, d = rows.get(sid), details.get(sid)
        if row is None:
            out.lost_sessions.append(sid)
            continue
        if d is None:
            out.lost_events += [f"{sid[:8]}:{e[:8]}" for e in a.acked_events]
            continue
        ids = [e["event_id"] for e in d["events"]]
        out.duplicate_events += [f"{sid[:8]}:{e[:8]}" for e, n in Counter(ids).items() if n > 1]
        billed = {e["event_id"] for e in d["events"] if e["status"] == "ok"}
        out.lost_events += [f"{sid[:8]}:{e[:8]}" for e in a.acked_events if e not in billed]
        out.unbilled_events += [
            f"{sid[:8]}:{e['event_id'][:8]} {e['status']}" for e in d["events"] if e["status"] != "ok"
        ]
        readings = {e["meter_wh"] for e in d["events"] if e.get("meter_wh") is not None}
        stray = readings - set(a.sent)
        if stray:
            out.unknown_readings.append(f"{sid[:8]}: {sorted(stray)} never sent by {a.charger}")
        if a.stop_landed:
            assert a.stop_reading is not None
            want = a.stop_reading - a.start_meter
            if row["energy_wh"] != want:
                out.energy_mismatches.append(f"{sid[:8]} ({a.node}): ledger {row['energy_wh']} Wh, metered {want} Wh")
            if row["state"] != "reconciled":
                out.not_reconciled.append(f"{sid[:8]} ({a.node}) is {row['state']} in the ledger")
        else:
            # The stop never landed: the energy is that of some reading sent, at least the last acknowledged.
            floor = max(a.acked_readings) - a.start_meter
            if row["energy_wh"] not in {r - a.start_meter for r in a.sent} or row["energy_wh"] < floor:
                out.energy_mismatches.append(
                    f"{sid[:8]} ({a.node}, stop never landed): ledger {row['energy_wh']} Wh, "
                    f"acknowledged at least {floor} Wh"
                )
    reconciled = sum(1 for r in rows.values() if r["state"] == "reconciled")
    if stats and (stats.get("sessions"), stats.get("receipts")) != (len(rows), reconciled):
        out.stats_mismatch = (
            f"cloud stats say {stats.get('sessions')} sessions, {stats.get('receipts')} receipts; "
            f"the ledger lists {len(rows)} rows, {reconciled} reconciled"
        )
    return out


def audit_nodes(
    acked: list[Attempt], views: dict[str, dict[str, dict[str, Any]]], rows: dict[str, dict[str, Any]]
) -> list[str]:
    """Every node holds every acknowledged event, and the ledger's receipt for each reconciled session.

    The node that acknowledged an event is checked on its own first: an event
    missing there was not durable (a 201 promises it is fsynced), which no
    later sync can excuse.
    """
    missing, receipts, not_durable = [], [], []
    for a in acked:
        assert a.session_id is not None
        own = views.get(a.node)
        if own is None:
            continue
        s = own.get(a.session_id)
        if s is None or set(a.acked_events) - {e["event_id"] for e in s["events"]}:
            not_durable.append(f"{a.session_id[:8]} on {a.node}")
    for name, view in views.items():
        for a in acked:
            assert a.session_id is not None
            s = view.get(a.session_id)
            if s is None:
                missing.append(f"{a.session_id[:8]} on {name}")
            elif set(a.acked_events) - {e["event_id"] for e in s["events"]}:
                missing.append(f"{a.session_id[:8]}'s events on {name}")
        for sid, row in rows.items():
            if row["state"] != "reconciled":
                continue
            held = view.get(sid)
            got = (held.get("receipt") if held else None) or {}
            if (got.get("issued_ts"), got.get("energy_wh")) != (row["receipt_ts"], row["energy_wh"]):
                receipts.append(f"{sid[:8]} on {name}")
    out = []
    if not_durable:
        out.append(
            f"{len(not_durable)} sessions lost acknowledged events on the node that acknowledged them "
            f"(not durable): {not_durable[:10]}"
        )
    if missing:
        out.append(f"{len(missing)} acknowledged sessions or events missing on nodes at the end: {missing[:10]}")
    if receipts:
        out.append(f"{len(receipts)} receipts on nodes differ from the ledger's, or are missing: {receipts[:10]}")
    return out


def receipt_figures(
    seen: dict[str, dict[str, float]],
    sessions: list[str],
    stops: dict[str, float],
    absent: dict[str, list[tuple[float, float | None]]],
    now: float,
) -> dict[str, Any]:
    """How long receipts took to reach every node, and why the slow ones were slow.

    `seen`: node -> session -> when its monitor first saw the session reconciled;
    `stops`: when each session's stop was acknowledged; `absent`: per node, the
    windows it could not hear the mesh (killed or exited until ready again,
    isolated until it rejoined; an open window lasts until `now`).

    Besides the spread (first node to last) and stop-to-every-node over all
    sessions, the same figures over the sessions whose receipt window met no
    absent node (`..._all_present_s`): what the mesh takes under loss alone. The
    ten slowest sessions list the last node and whether it was absent meanwhile.
    """
    spreads, stop_to_all, spreads_present, stop_present = [], [], [], []
    slowest: list[tuple[float, dict[str, Any]]] = []

    def was_absent(node: str, start: float, end: float) -> bool:
        return any(a < end and (b if b is not None else now) > start for a, b in absent.get(node, []))

    for sid in sessions:
        times = {node: got.get(sid) for node, got in seen.items()}
        if not times or None in times.values():
            continue
        at = {node: t for node, t in times.items() if t is not None}
        first, last = min(at.values()), max(at.values())
        last_node = max(at, key=lambda n: at[n])
        stop = stops.get(sid)
        start = stop if stop is not None else first
        present = not any(was_absent(node, start, last) for node in at)
        spreads.append(last - first)
        if present:
            spreads_present.append(last - first)
        if stop is not None:
            stop_to_all.append(last - stop)
            if present:
                stop_present.append(last - stop)
        slowest.append(
            (
                last - start,
                {
                    "session": sid[:8],
                    "stop_t": None if stop is None else round(stop, 1),
                    "first": f"{min(at, key=lambda n: at[n])} at {first:.1f}",
                    "last": f"{last_node} at {last:.1f}",
                    "absent_meanwhile": sorted(node for node in at if was_absent(node, start, last)),
                },
            )
        )
    slowest.sort(key=lambda x: -x[0])
    return {
        "receipt_spread_s": _percentiles(spreads),
        "stop_to_receipt_on_every_node_s": _percentiles(stop_to_all),
        "receipt_spread_all_present_s": _percentiles(spreads_present),
        "stop_to_receipt_all_present_s": _percentiles(stop_present),
        "receipt_slowest": [entry for _, entry in slowest[:10]],
    }


def _percentiles(values: Iterable[float]) -> dict[str, float | int | None]:
    v = sorted(values)
    if not v:
        return {"n": 0, "p50": None, "p95": None, "max": None}
    return {
        "n": len(v),
        "p50": round(statistics.median(v), 2),
        "p95": round(v[min(len(v) - 1, round(0.95 * (len(v) - 1)))], 2),
        "max": round(v[-1], 2),
    }


def run_field(settings: Settings, workdir: Path, progress: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run one field scenario in `workdir` (logs stay there) and return the report."""
    problem = netns.missing_requirements()
    if problem:
        raise FieldFailure(problem)
    env_path = os.environ.get("PYTHONPATH", "")
    if str(REPO) not in env_path.split(os.pathsep) and not _imports_from_repo():
        raise FieldFailure(f"meshnode does not import from {REPO}; set PYTHONPATH={REPO}")
    return FieldRun(settings, workdir, progress).run()


def _imports_from_repo() -> bool:
    r = subprocess.run(
        [sys.executable, "-c", "import meshnode; print(meshnode.__file__)"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )
    return r.stdout.strip().startswith(str(REPO))
