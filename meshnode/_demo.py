"""`meshnode demo`: a whole charging site on this machine, its uplink cut midway, and a report.

What runs (all on loopback, static peers and no mDNS, so it works on any Linux
machine, with or without multicast or a network):

- the reference cloud service, a `meshnode cloud` process with SQLite in a
  temporary directory;
- N `meshnode run` processes (default 5), node i bound to 127.0.0.(base + i),
  all on the same CoAP and HTTP ports, every other node given as `--peer`,
  `--probe-interval 1` so that a change of uplink is seen within seconds;
- only two of the nodes have an uplink. Their `--cloud-url` points not at the
  cloud but at an `UplinkProxy` in this process: a TCP relay that the demo can
  unplug like the 4G router of a charger (close its listener so new connections
  are refused, reset the live ones) and plug back in;
- simulated chargers that speak OCPP to their node, the `ocpp` library's own
  charge points (`meshnode._chargepoints`), OCPP 2.0.1 and 1.6J mixed, each
  registered on the site with a password: a session starts (TransactionEvent
  Started / StartTransaction), reports its cumulative meter about every second
  (Updated / MeterValues), and stops after a few seconds (Ended /
  StopTransaction); randomness is seeded. When the charging phase ends, the
  sessions still open are stopped by the operator through *another* node's API
  (`POST /v1/sessions/{id}/stop`): the node holding the charger's connection
  sends it the remote stop over the mesh;
- halfway through, the demo cuts the uplink of the current leader, so the other
  uplink node must take over (seen in `leader` of every node's `GET /v1/status`),
  and plugs it back in once the takeover has been seen.

After the charging phase it stops the open sessions, waits (bounded) until
every stopped session is `reconciled` on the node that recorded it and in the
cloud ledger, and reports what a site operator would want to know: sessions
started, sessions in the ledger, duplicates, lost sessions, conflicts, time
from a stop to its receipt, bytes sent to the cloud against the raw signed
events, and leader changes. The exit status is 0 only when nothing was lost,
duplicated or billed wrongly.

Why real processes and a proxy rather than the simulator: the demo is the
proof, on the user's own machine, that the shipped code (CoAP, HTTP, SQLite,
the election, the forwarder, the cloud) delivers every session exactly once
when the uplink moves. A proxy cuts one node's path to the cloud without
touching the cloud, which is what happens on a real site.
"""

from __future__ import annotations


import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import cbor2
import httpx
import trio
import trio_asyncio
from automerge.core import Document
from trio_asyncio import aio_as_trio

from crdt import read_session

from ._operator import make_tariff, parse_tariff_args
from ._security import create_site, enroll
from .services.chargers import charger_entry, new_password

if TYPE_CHECKING:
    from ._chargepoints import SimChargePoint

DEFAULT_NODES = 5
DEMO_TARIFF = ["--id", "demo", "--currency", "EUR", "--energy", "0.39", "--time", "0.60"]
"""The site tariff the demo signs at start (`meshnode site tariff` arguments, valid from
then on): EUR 0.39 per kWh and 0.60 per hour of charging."""
DEFAULT_DURATION = 40.0
DEFAULT_CHARGERS = 2
DEFAULT_DRAIN_TIMEOUT = 60.0
DEFAULT_BASE_ADDRESS = "127.0.0.20"
UPLINK_NODES = 2
PROBE_INTERVAL = 1.0
RECEIPT_POLL_INTERVAL = 0.25
STATUS_POLL_INTERVAL = 0.5
PROGRESS_INTERVAL = 2.0
STARTUP_TIMEOUT = 30.0
MESH_TIMEOUT = 30.0
TAKEOVER_TIMEOUT = 20.0
SESSION_SECONDS = (3.0, 8.0)
IDLE_SECONDS = (0.5, 2.0)
METER_STEP_WH = (50, 400)
CHARGER_STOP_TIMEOUT = 15.0
"""Seconds a charger has to end its transaction after accepting a remote stop."""


class DemoError(Exception):
    """The demo cannot go on; the message says what went wrong and what to try."""


# --- the uplink a demo can unplug --------------------------------------------------------


@dataclass(eq=False)  # kept in a set by identity
class _Relay:
    client: trio.SocketStream
    scope: trio.CancelScope
    reset: bool = False


class UplinkProxy:
    """A TCP relay in front of the cloud that can be unplugged and plugged back in.

    A node's `--cloud-url` points at it. `cut()` is the 4G router losing power:
    the listener closes (new connections are refused) and every live connection
    is reset (RST, not a polite FIN), so the node's probe and forwarder fail at
    once, as they would on a real site. `restore()` listens again on the same
    port. Bytes relayed each way are counted (HTTP headers and probes included).

    Args:
        target_host, target_port: where the cloud listens.
        host: the address to listen on; `port` 0 picks a free one at the first start.
    """

    def __init__(self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.target_host, self.target_port = target_host, target_port
        self.host, self.port = host, port
        self.up = False
        self.bytes_to_cloud = 0
        self.bytes_from_cloud = 0
        self.connections = 0
        self.cuts = 0
        self._nursery: trio.Nursery | None = None
        self._listener: trio.socket.SocketType | None = None
        self._accept_scope: trio.CancelScope | None = None
        self._relays: set[_Relay] = set()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def bind(self) -> int:
        """Reserve the listening port before `serve` (so node processes can be told it early)."""
        if self.port == 0:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((self.host, 0))
                self.port = s.getsockname()[1]
        return self.port

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Relay until cancelled; reports the port through `task_status`."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                self._listen()
                task_status.started(self.port)
                await trio.sleep_forever()
            finally:
                self.cut(count=False)
                self._nursery = None

    def cut(self, *, count: bool = True) -> None:
        """Unplug: refuse new connections and reset the live ones."""
        if count and self.up:
            self.cuts += 1
        self.up = False
        if self._accept_scope is not None:
            self._accept_scope.cancel()
            self._accept_scope = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        for relay in list(self._relays):
            relay.reset = True
            relay.scope.cancel()

    def restore(self) -> None:
        """Plug back in: listen again on the same port."""
        if not self.up:
            self._listen()

    def _listen(self) -> None:
        if self._nursery is None:
            raise RuntimeError("UplinkProxy.restore() needs serve() to be running")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise DemoError(f"the uplink proxy cannot listen on {self.host}:{self.port}: {exc}") from exc
        self.port = sock.getsockname()[1]
        listener = trio.socket.from_stdlib_socket(sock)
        scope = trio.CancelScope()
        self._listener, self._accept_scope, self.up = listener, scope, True
        self._nursery.start_soon(self._accept_loop, listener, scope)

    async def _accept_loop(self, listener: trio.socket.SocketType, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                try:
                    conn, _ = await listener.accept()
                except (OSError, trio.ClosedResourceError):
                    return
                assert self._nursery is not None  # set for as long as serve() runs
                self._nursery.start_soon(self._relay, trio.SocketStream(conn))

    async def _relay(self, client: trio.SocketStream) -> None:
        relay = _Relay(client, trio.CancelScope())
        self._relays.add(relay)
        self.connections += 1
        upstream: trio.SocketStream | None = None
        try:
            with relay.scope:
                upstream = await trio.open_tcp_stream(self.target_host, self.target_port)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, relay, client, upstream, True)
                    nursery.start_soon(self._pump, relay, upstream, client, False)
        except OSError:
            pass  # the cloud itself is unreachable: the client sees its connection close
        finally:
            self._relays.discard(relay)
            if relay.reset:
                with contextlib.suppress(OSError):
                    client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.socket.close()
            if upstream is not None:
                upstream.socket.close()

    async def _pump(self, relay: _Relay, src: trio.SocketStream, dst: trio.SocketStream, to_cloud: bool) -> None:
        try:
            while True:
                data = await src.receive_some(65536)
                if not data:
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        await dst.send_eof()
                    return
                if to_cloud:
                    self.bytes_to_cloud += len(data)
                else:
                    self.bytes_from_cloud += len(data)
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            relay.scope.cancel()  # one side broke: tear the pair down


# --- processes ------------------------------------------------------------------------------


def _load_libc() -> Any:
    """libc, loaded in the parent: a forked child must not dlopen (another thread may hold the loader lock)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None  # not glibc: the demo's own clean-up (try/finally, signals) still applies


_LIBC = _load_libc()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the demo dies without cleaning up."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Child:
    """One process the demo started (cloud or node)."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    ready: dict[str, Any] = field(default_factory=dict)

    def log_tail(self, lines: int = 12) -> str:
        try:
            return "".join(self.log_path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
        except OSError:
            return ""


def spawn_meshnode(name: str, args: list[str], workdir: Path) -> Child:
    """Start `python -m meshnode.cli ARGS` in its own session (Ctrl-C reaches only the demo)."""
    log_path = workdir / f"{name}.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshnode.cli", *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_file, cwd=workdir,
            start_new_session=True,
            preexec_fn=_die_with_parent if _LIBC is not None else None,
        )  # fmt: skip
    return Child(name, proc, log_path)


def read_ready_line(child: Child, deadline: float) -> dict[str, Any]:
    """Wait for the child's one JSON "ready" line on stdout (blocking; run in a thread)."""
    import select

    assert child.proc.stdout is not None
    fd = child.proc.stdout.fileno()
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DemoError(f"{child.name} did not start within {STARTUP_TIMEOUT:g} s; its log:\n{child.log_tail()}")
        readable, _, _ = select.select([fd], [], [], min(left, 0.5))
        if readable:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise DemoError(
                    f"{child.name} exited with code {child.proc.wait()} before it was ready; its log:\n"
                    f"{child.log_tail()}"
                )
            buf += chunk
    line = buf.split(b"\n", 1)[0]
    try:
        ready = json.loads(line)
    except ValueError:
        ready = None
    if not isinstance(ready, dict) or ready.get("ready") is not True:
        raise DemoError(f"{child.name} printed {line[:200]!r} instead of its ready line")
    return ready


def stop_children(children: Iterable[Child], timeout: float = 5.0) -> None:
    """SIGTERM each child, wait up to `timeout` in total, then SIGKILL what is left."""
    children = list(children)
    for child in children:
        if child.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()
            child.proc.wait()
        if child.proc.stdout is not None:
            child.proc.stdout.close()


def _can_bind(host: str, port: int, kind: int) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def common_free_port(hosts: Sequence[str], kind: int, avoid: Iterable[int] = ()) -> int:
    """A port number free for `kind` (TCP or UDP) on every host right now."""
    avoid = set(avoid)
    for _ in range(200):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        if port not in avoid and all(_can_bind(h, port, kind) for h in hosts):
            return port
    raise DemoError(f"found no port free on all of {', '.join(hosts)}; is something holding many ports?")


def loopback_hosts(base: str, count: int) -> list[str]:
    """`count` consecutive loopback addresses from `base`; checks that this machine routes them."""
    try:
        parts = [int(p) for p in base.split(".")]
    except ValueError:
        parts = []
    if len(parts) != 4 or parts[0] != 127 or not all(0 <= p <= 255 for p in parts):
        raise DemoError(f"--base-address must be an IPv4 loopback address like 127.0.0.20, got {base!r}")
    if parts[3] < 1 or parts[3] + count - 1 > 254:
        raise DemoError(f"--base-address {base} leaves no room for {count} nodes (last octet 1 to {255 - count})")
    hosts = [f"127.{parts[1]}.{parts[2]}.{parts[3] + i}" for i in range(count)]
    for host in hosts:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.bind((host, 0))
            except OSError as exc:
                raise DemoError(
                    f"cannot bind {host} ({exc.strerror}): the demo gives each node its own loopback address. "
                    "Linux routes all of 127.0.0.0/8 to loopback; elsewhere add aliases "
                    f"(macOS: sudo ifconfig lo0 alias {host} up)"
                ) from exc
    return hosts


# --- what the demo records ------------------------------------------------------------------


@dataclass
class SessionRecord:
    """One session as the simulated charger saw it. Times are trio (monotonic) seconds."""

    session_id: str
    node: int
    charger: str
    started_at: float
    start_meter: int
    acked_events: list[str] = field(default_factory=list)
    stop_meter: int | None = None
    stopped_at: float | None = None
    """When the stop's 201 arrived; None until then (or when the stop's answer was lost)."""
    stopped: bool = False
    reconciled_at: float | None = None
    """When the charger's node first showed the session `reconciled` (polled)."""

    @property
    def receipt_latency(self) -> float | None:
        if self.stopped_at is None or self.reconciled_at is None:
            return None
        return max(0.0, self.reconciled_at - self.stopped_at)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    s = sorted(values)
    if not s:
        return None
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


@dataclass
class LedgerCheck:
    """The cloud ledger and every node's copy compared with what the chargers were told (201s).

    `failures` says, for people, everything that breaks the promise "every
    session billed exactly once, for what was metered"; empty when it held.
    """

    in_ledger: int
    duplicates: int
    lost: list[str]
    lost_events: int
    unexpected: list[str]
    energy_mismatches: list[str]
    reconciled: int
    duplicate_rows: int = 0
    receipt_conflicts: list[str] = field(default_factory=list)
    """Sessions for which the ledger and the nodes show more than one receipt (billed twice)."""
    unexpected_on_nodes: list[str] = field(default_factory=list)
    """Sessions some node holds that no charger started (a start retried after a lost 201)."""
    conflicts: int = 0
    receipts_beyond_rows: int = 0

    @property
    def failures(self) -> list[str]:
        out = []
        if self.lost:
            out.append(
                f"{len(self.lost)} sessions lost ({self.lost_events} acknowledged events not billed): "
                + ", ".join(self.lost[:5])
            )
        if self.duplicate_rows or self.receipts_beyond_rows:
            out.append(f"{self.duplicate_rows + self.receipts_beyond_rows} duplicate ledger rows or receipts")
        if self.receipt_conflicts:
            out.append(
                f"{len(self.receipt_conflicts)} sessions with more than one receipt (ledger and nodes): "
                + ", ".join(self.receipt_conflicts[:5])
            )
        if self.unexpected:
            out.append(
                f"{len(self.unexpected)} ledger sessions no charger started (billed without a start the "
                "charger knows of, e.g. a start retried after a lost answer): " + ", ".join(self.unexpected[:5])
            )
        extra_on_nodes = sorted(set(self.unexpected_on_nodes) - set(self.unexpected))
        if extra_on_nodes:
            out.append(
                f"{len(extra_on_nodes)} sessions on the nodes no charger started: " + ", ".join(extra_on_nodes[:5])
            )
        if self.energy_mismatches:
            out.append(
                f"{len(self.energy_mismatches)} sessions billed for other energy than metered: "
                + ", ".join(self.energy_mismatches[:5])
            )
        if self.conflicts:
            out.append(f"{self.conflicts} conflicts in the cloud (forged, forked or late events, foreign receipts)")
        return out


def receipt_identity(receipt: Any) -> tuple[Any, ...] | None:
    """What tells two receipts apart: amount, time and signature (a node's JSON or the ledger's hex CBOR).

    Nodes show a receipt as JSON (bytes as hex); the ledger row carries the
    receipt's canonical CBOR as hex. Anything unreadable is its own identity,
    so it can only count as different.
    """
    if receipt is None:
        return None
    if isinstance(receipt, str):
        try:
            receipt = cbor2.loads(bytes.fromhex(receipt))
        except (ValueError, cbor2.CBORDecodeError):
            return ("unreadable", receipt)
    if not isinstance(receipt, Mapping):
        return ("unreadable", repr(receipt))
    sig = receipt.get("sig")
    sig = sig.hex() if isinstance(sig, bytes) else sig
    return (
        receipt.get("session_id"),
        receipt.get("energy_wh"),
        receipt.get("cost_cents"),
        receipt.get("issued_ts"),
        sig,
    )


def receipts_issued(log_path: Path) -> Counter[str]:
    """Receipts the cloud issued, per session, as its log (at level info) says."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return Counter()
    return Counter(re.findall(r"issued receipt for session '([^']+)'", text))


def check_ledger(
    sessions: Sequence[SessionRecord],
    rows: Sequence[Mapping[str, Any]],
    cloud_events: Mapping[str, Sequence[Mapping[str, Any]]],
    stats: Mapping[str, int],
    node_views: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
    conflicts: Sequence[Mapping[str, Any]] = (),
    issued: Mapping[str, int] | None = None,
) -> LedgerCheck:
    """Compare the ledger, and every node's copy of the sessions, with what the chargers were told.

    `node_views` maps a node's name to its sessions by id (`GET /v1/sessions`).
    A session is billed twice when any of these differ from "once":

    - rows: ledger rows per session id (the primary key should make more than
      one impossible; the demo counts anyway), and `stats["receipts"]` over the
      rows that carry a receipt;
    - receipts: the distinct receipts of a session seen by the ledger and by
      every node, and `issued`, the receipts the cloud says it issued per
      session (its log): a second receipt anywhere is a second bill;
    - sessions no charger started, in the ledger or on any node (a start whose
      201 was lost and that the charger retried leaves one);
    - energy: a reconciled row, and every receipt a node holds, against stop -
      start meter as the charger metered it;
    - conflicts: any conflict the cloud filed (none belong in an honest run).

    - lost: a started session with no ledger row, a stopped one whose row is
      not `reconciled`, or one an acknowledged event of which the cloud does not
      hold as billed (`ok`). `lost_events` counts those events.
    """
    node_views = node_views or {}
    per_id = Counter(str(r["session_id"]) for r in rows)
    by_id = {str(r["session_id"]): r for r in rows}
    duplicate_rows = sum(n - 1 for n in per_id.values() if n > 1)
    with_receipt = sum(1 for r in rows if r.get("receipt") is not None)
    receipts_beyond_rows = max(0, int(stats.get("receipts", 0)) - with_receipt)
    started = {s.session_id: s for s in sessions}
    lost: list[str] = []
    lost_events = 0
    mismatches: list[str] = []
    receipt_conflicts: list[str] = []
    reconciled = 0
    for sid, rec in sorted(started.items()):
        row = by_id.get(sid)
        metered = rec.stop_meter - rec.start_meter if rec.stopped and rec.stop_meter is not None else None
        receipts = [r for r in rows if str(r["session_id"]) == sid] + [
            {"receipt": view[sid].get("receipt")} for view in node_views.values() if sid in view
        ]
        identities = {i for r in receipts if (i := receipt_identity(r.get("receipt"))) is not None}
        if len(identities) > 1 or (issued or {}).get(sid, 0) > 1:
            receipt_conflicts.append(sid)
        if metered is not None and any(i[1] != metered for i in identities if i[0] != "unreadable"):
            mismatches.append(sid)
        if row is None:
            lost.append(sid)
            lost_events += len(rec.acked_events)
            continue
        billed = {str(e["event_id"]) for e in cloud_events.get(sid, ()) if e.get("status") == "ok"}
        missing = [e for e in rec.acked_events if e not in billed]
        lost_events += len(missing)
        if row.get("state") == "reconciled":
            reconciled += 1
        if missing or (rec.stopped and row.get("state") != "reconciled"):
            lost.append(sid)
        elif metered is not None and row.get("energy_wh") != metered and sid not in mismatches:
            mismatches.append(sid)
    unexpected = sorted(set(per_id) - set(started))
    on_nodes = sorted(({sid for view in node_views.values() for sid in view} | set(issued or {})) - set(started))
    return LedgerCheck(
        in_ledger=len(set(per_id) & set(started)),
        duplicates=duplicate_rows + receipts_beyond_rows + len(receipt_conflicts) + len(set(unexpected) | set(on_nodes)),
        lost=lost, lost_events=lost_events, unexpected=unexpected, energy_mismatches=sorted(mismatches),
        reconciled=reconciled, duplicate_rows=duplicate_rows, receipt_conflicts=receipt_conflicts,
        unexpected_on_nodes=on_nodes, conflicts=len(conflicts), receipts_beyond_rows=receipts_beyond_rows,
    )  # fmt: skip


def billing_summary(sessions: Sequence[SessionRecord], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What the ledger billed for the demo's sessions: energy, money per currency, the
    tariffs used, and how many completed sessions no tariff priced."""
    started = {s.session_id for s in sessions}
    mine = [r for r in rows if str(r["session_id"]) in started]
    money: Counter[str] = Counter()
    tariffs: Counter[str] = Counter()
    unpriced = 0
    for row in mine:
        if row.get("cost_cents") is None or row.get("currency") is None:
            unpriced += row.get("state") in ("completed", "reconciled")
            continue
        money[str(row["currency"])] += int(row["cost_cents"])
        tariffs[f"{row.get('tariff_id')} v{row.get('tariff_version')}"] += 1
    return {
        "energy_wh": sum(int(r.get("energy_wh") or 0) for r in mine),
        "cents": dict(money),
        "tariffs": dict(tariffs),
        "priced": sum(tariffs.values()),
        "unpriced": unpriced,
    }


def _billed_text(b: Mapping[str, Any]) -> str:
    money = ", ".join(f"{cur} {cents / 100:.2f}" for cur, cents in sorted((b.get("cents") or {}).items())) or "nothing"
    tariffs = ", ".join(f"{n} x {t}" for t, n in sorted((b.get("tariffs") or {}).items())) or "no tariff"
    return (
        f"{(b.get('energy_wh') or 0) / 1000:.3f} kWh for {money} ({b.get('priced', 0)} sessions priced: {tariffs}; "
        f"{b.get('unpriced', 0)} unpriced)"
    )


def agreed_leader(leaders: Sequence[str | None]) -> str | None:
    """The leader every node names, or None while they disagree (or some are unknown)."""
    if not leaders or any(x is None for x in leaders) or len(set(leaders)) != 1:
        return None
    return leaders[0]


# --- the demo -----------------------------------------------------------------------------


@dataclass
class DemoSettings:
    nodes: int = DEFAULT_NODES
    duration: float = DEFAULT_DURATION
    seed: int = 1
    chargers: int = DEFAULT_CHARGERS
    """Simulated chargers per node (each runs one session at a time)."""
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT
    base_address: str = DEFAULT_BASE_ADDRESS
    cut: bool = True


class Demo:
    """One demo run: owns the child processes, the proxies and the charger tasks.

    `run` is the trio main; `children` is kept here so the caller can stop them
    whatever happened inside trio (an error, Ctrl-C).
    """

    def __init__(self, settings: DemoSettings, workdir: Path, progress: Callable[[str], None]) -> None:
        self.s = settings
        self.workdir = workdir
        self.say = progress
        self.rng = random.Random(settings.seed)
        self.children: list[Child] = []
        self.names = [f"node-{i + 1}" for i in range(settings.nodes)]
        self.uplink_nodes = sorted(self.rng.sample(range(settings.nodes), UPLINK_NODES))
        self.proxies: dict[int, UplinkProxy] = {}
        self.hosts: list[str] = []
        self.node_urls: list[str] = []
        self.cloud_url = ""
        self.sessions: list[SessionRecord] = []
        self.request_errors: Counter[str] = Counter()
        self.stops_unacknowledged = 0
        self.ocpp_urls: list[str] = []
        self.passwords: dict[str, str] = {}
        self.charge_points: list[SimChargePoint] = []
        self.open_transactions: dict[str, tuple[SimChargePoint, Any]] = {}
        self.remote_stops = 0
        self.charger_entries: list[bytes] = []
        self.tariff_entry = b""
        self.statuses: list[dict[str, Any] | None] = []
        self.ledger_rows = 0
        self.leader: str | None = None
        self.leader_history: list[tuple[float, str]] = []
        self.leader_changes = 0
        self.cut_info: dict[str, Any] = {}
        self.t0 = 0.0
        self._stopping = trio.Event()
        self._client: httpx.AsyncClient | None = None

    # -- elapsed time and logging --

    def elapsed(self) -> float:
        return trio.current_time() - self.t0

    # -- start-up --

    def launch(self) -> None:
        """Pick addresses and ports, start the cloud and the nodes (no threads exist yet).

        Processes are started before trio starts any worker thread: the children
        set PR_SET_PDEATHSIG in `preexec_fn`, which is only safe without threads.
        """
        self.hosts = loopback_hosts(self.s.base_address, self.s.nodes)
        cloud_port = common_free_port(["127.0.0.1"], socket.SOCK_STREAM)
        coap_port = common_free_port(self.hosts, socket.SOCK_DGRAM)
        http_port = common_free_port(self.hosts, socket.SOCK_STREAM, avoid=[cloud_port])
        ocpp_port = common_free_port(self.hosts, socket.SOCK_STREAM, avoid=[cloud_port, http_port])
        self.cloud_url = f"http://127.0.0.1:{cloud_port}"
        for i in self.uplink_nodes:
            proxy = UplinkProxy("127.0.0.1", cloud_port)
            proxy.bind()
            self.proxies[i] = proxy
        # The real thing: a site with its keys, every node enrolled (sealed mesh
        # traffic, certified device keys), and a cloud that trusts only that site.
        site_dir = self.workdir / "site"
        site = create_site(site_dir, "demo-field", now=time.time())
        # The site's prices: signed as `meshnode site tariff --site DIR ...` signs them,
        # handed to a node with the chargers' registrations (`_register_chargers`).
        self.tariff_entry = make_tariff(parse_tariff_args(["--site", str(site_dir), *DEMO_TARIFF]), time.time())
        # Every charge point registered on the site with its password (OCPP Security Profile 1).
        for name in self.names:
            for k in range(self.s.chargers):
                charger = f"{name}-cp{k + 1}"
                self.passwords[charger] = new_password()
                self.charger_entries.append(charger_entry(site, charger, self.passwords[charger], time.time()))
        for name in self.names:
            enroll(site_dir, name, self.workdir / name, now=time.time())
        self.children.append(spawn_meshnode("cloud", [
            "cloud", "--db", f"sqlite:///{self.workdir / 'cloud.db'}", "--bind", "127.0.0.1",
            # info: the cloud logs each receipt it issues, which the report counts per session.
            "--port", str(cloud_port), "--log-level", "info", "--site", str(site_dir),
        ], self.workdir))  # fmt: skip
        for i, (name, host) in enumerate(zip(self.names, self.hosts, strict=True)):
            args = [
                "run", "--node-id", name, "--data-dir", str(self.workdir / name), "--bind", host,
                "--coap-port", str(coap_port), "--http-port", str(http_port), "--no-mdns",
                "--ocpp-port", str(ocpp_port),
                "--log-level", "warning",
            ]  # fmt: skip
            for j, other in enumerate(self.hosts):
                if j != i:
                    args += ["--peer", f"{other}:{coap_port}"]
            if i in self.proxies:
                args += ["--cloud-url", self.proxies[i].url, "--probe-interval", str(PROBE_INTERVAL)]
            self.children.append(spawn_meshnode(name, args, self.workdir))
            self.node_urls.append(f"http://{host}:{http_port}")
            self.ocpp_urls.append(f"ws://{host}:{ocpp_port}/ocpp")
        self.statuses = [None] * self.s.nodes

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        async with trio.open_nursery() as nursery:
            for child in self.children:

                async def one(child: Child = child) -> None:
                    child.ready = await trio.to_thread.run_sync(
                        read_ready_line, child, deadline, abandon_on_cancel=True
                    )

                nursery.start_soon(one)

    # -- HTTP helpers --

    def _tokens(self) -> httpx.Auth:
        """The enrolled nodes' API tokens (each node writes its own at start), and the cloud's
        (beside its key, next to its database: the work dir)."""
        from ._apiauth import DataDirTokens

        dirs = {host: self.workdir / name for name, host in zip(self.names, self.hosts, strict=True)}
        return DataDirTokens({**dirs, self.cloud_url.removeprefix("http://"): self.workdir})

    @property
    def http(self) -> httpx.AsyncClient:
        if self._client is None:
            raise RuntimeError("the demo's HTTP client exists only inside Demo.run")
        return self._client

    async def _get(self, url: str) -> Any:
        response = await self.http.get(url)
        response.raise_for_status()
        return response.json()

    async def _poll_statuses(self) -> None:
        async def one(i: int) -> None:
            try:
                self.statuses[i] = await self._get(self.node_urls[i] + "/v1/status")
            except (httpx.HTTPError, ValueError):
                self.statuses[i] = None

        async with trio.open_nursery() as nursery:
            for i in range(self.s.nodes):
                nursery.start_soon(one, i)
        self._check_alive()

    def _check_alive(self) -> None:
        for child in self.children:
            code = child.proc.poll()
            if code is not None:
                raise DemoError(f"{child.name} exited with code {code} during the demo; its log:\n{child.log_tail()}")

    def _leaders(self) -> list[str | None]:
        return [s.get("leader") if s else None for s in self.statuses]

    async def _wait_for_mesh(self) -> float:
        """Until every node sees every other alive and all name the same leader."""
        start = trio.current_time()
        with trio.move_on_after(MESH_TIMEOUT):
            while True:
                await self._poll_statuses()
                if (
                    all(
                        s is not None
                        and {p["node_id"] for p in s["peers"] if p["state"] == "alive"}
                        >= set(self.names) - {s["node_id"]}
                        for s in self.statuses
                    )
                    and agreed_leader(self._leaders()) is not None
                ):
                    return trio.current_time() - start
                await trio.sleep(0.2)
        seen = {
            name: (sorted(p["node_id"] for p in s["peers"] if p["state"] == "alive"), s.get("leader"))
            if s
            else "no answer"
            for name, s in zip(self.names, self.statuses, strict=True)
        }
        raise DemoError(
            f"the mesh did not form, or elected no leader, within {MESH_TIMEOUT:g} s; "
            f"(alive peers, leader) per node: {seen}. Rerun with --keep to keep the node logs."
        )

    # -- the simulated chargers --

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when the charging phase ends."""
        with trio.move_on_after(seconds):
            await self._stopping.wait()

    def _version(self, node: int, k: int) -> str:
        """Chargers alternate: OCPP 2.0.1 and 1.6 on every node (a mixed site)."""
        return "2.0.1" if (node + k) % 2 == 0 else "1.6"

    async def _find_session(self, node: int, charger: str, id_token: str, start_meter: int) -> dict[str, Any] | None:
        """The session a charger's start made on its node (a charger learns no session id over OCPP)."""
        for _attempt in range(20):
            try:
                listed = (await self._get(self.node_urls[node] + "/v1/sessions"))["sessions"]
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                self.request_errors[f"session lookup: {type(exc).__name__}"] += 1
                listed = []
            for s in listed:
                events = s.get("events") or []
                starts = [e for e in events if e.get("type") == "start"]
                if (
                    s.get("charger") == charger
                    and s.get("id_token") == id_token
                    and starts
                    and starts[0].get("meter_wh") == start_meter
                ):
                    return dict(s)
            await trio.sleep(0.25)
        return None

    async def _charger(self, node: int, k: int, watchers: trio.Nursery) -> None:
        """One charge point on OCPP (the `ocpp` library's): connect, then sessions until the end.

        A message is acknowledged when its CALLRESULT arrives (the node made it durable).
        A transaction message that cannot be delivered is queued by the charger and
        replayed on reconnect, as a real charger does; the demo waits (bounded) for the
        start and the stop to be acknowledged.
        """
        rng = random.Random(f"{self.s.seed}:{node}:{k}")
        charger = f"{self.names[node]}-cp{k + 1}"
        version = self._version(node, k)
        # Its own node first, then the next one (several CSMS URLs: docs/ocpp.md, failover).
        urls = [self.ocpp_urls[node], self.ocpp_urls[(node + 1) % len(self.ocpp_urls)]]
        from ._chargepoints import SimChargePoint  # late: `meshnode run` parses the demo's flags only

        cp = SimChargePoint(charger, urls, version=version, password=self.passwords[charger])
        self.charge_points.append(cp)
        meter = rng.randrange(0, 1_000_000)
        async with trio.open_nursery() as connection:
            connection.start_soon(aio_as_trio(cp.serve))
            with trio.move_on_after(STARTUP_TIMEOUT):
                await aio_as_trio(cp.wait_connected)(STARTUP_TIMEOUT)
            if not cp.connected:
                self.request_errors[f"{version} connect: no connection"] += 1
            await self._pause(rng.uniform(0.0, 1.5))
            while not self._stopping.is_set():
                id_token = f"RFID-{rng.randrange(16**6):06X}"
                tx = await aio_as_trio(cp.start)(id_token, meter, evse=1)
                if not await self._acked(cp, lambda: tx.started_acked):
                    self.request_errors[f"{version} start: not acknowledged"] += 1
                    break
                found = await self._find_session(node, charger, id_token, meter)
                if found is None:
                    self.request_errors[f"{version} start: no session on the node"] += 1
                    break
                rec = SessionRecord(found["session_id"], node, charger, trio.current_time(), meter)
                self.sessions.append(rec)
                self.open_transactions[rec.session_id] = (cp, tx)
                end = trio.current_time() + rng.uniform(*SESSION_SECONDS)
                while trio.current_time() < end and not self._stopping.is_set() and not tx.ended:
                    await self._pause(rng.uniform(0.8, 1.2))
                    if tx.ended:
                        break
                    meter += rng.randrange(*METER_STEP_WH)
                    await aio_as_trio(cp.meter)(tx, meter)
                if self._stopping.is_set() and not tx.ended:
                    # The operator stops the open sessions, through another node's API.
                    await self._remote_stop(rec, tx)
                if not tx.ended:
                    meter += rng.randrange(0, 60)
                    await aio_as_trio(cp.stop)(tx, meter)
                await self._finish(rec, cp, tx, watchers)
                meter = tx.meter
                await self._pause(rng.uniform(*IDLE_SECONDS))
            connection.cancel_scope.cancel()

    async def _acked(self, cp: SimChargePoint, done: Callable[[], bool], timeout: float = 30.0) -> bool:
        """Until `done()` (an acknowledgement arrived), bounded."""
        with trio.move_on_after(timeout):
            while not done():
                await trio.sleep(0.05)
        return done()

    async def _remote_stop(self, rec: SessionRecord, tx: Any) -> None:
        """`POST /v1/sessions/{id}/stop` on another node than the charger's: the node holding
        the charger's connection sends it the remote stop (over the mesh), and the
        charger ends the transaction with its own Ended/StopTransaction."""
        other = (rec.node + 1) % len(self.node_urls)
        try:
            response = await self.http.post(f"{self.node_urls[other]}/v1/sessions/{rec.session_id}/stop", json={})
        except httpx.HTTPError as exc:
            self.request_errors[f"remote stop: {type(exc).__name__}"] += 1
            return
        if response.status_code != 202:
            self.request_errors[f"remote stop: HTTP {response.status_code}"] += 1
            return
        self.remote_stops += 1
        with trio.move_on_after(CHARGER_STOP_TIMEOUT):
            while not tx.ended:
                await trio.sleep(0.05)

    async def _finish(self, rec: SessionRecord, cp: SimChargePoint, tx: Any, watchers: trio.Nursery) -> None:
        """After the stop: wait for its acknowledgement, then note what the node acknowledged."""
        if not await self._acked(cp, lambda: tx.stop_acked):
            self.stops_unacknowledged += 1
            return
        rec.stopped_at = trio.current_time()
        rec.stopped, rec.stop_meter = True, tx.stop_meter
        self.open_transactions.pop(rec.session_id, None)
        for attempt in range(3):  # (a kept-alive connection the node closed fails once)
            try:
                session = await self._get(f"{self.node_urls[rec.node]}/v1/sessions/{rec.session_id}")
            except (httpx.HTTPError, ValueError) as exc:
                if attempt == 2:
                    self.request_errors[f"session read: {type(exc).__name__}"] += 1
                continue
            # Every event the session holds now was acknowledged to the charger (a CALLRESULT each).
            rec.acked_events = [e["event_id"] for e in session.get("events", [])]
            break
        watchers.start_soon(self._watch_receipt, rec)

    async def _watch_receipt(self, rec: SessionRecord) -> None:
        """Poll the charger's own node until the session shows `reconciled` there."""
        url = f"{self.node_urls[rec.node]}/v1/sessions/{rec.session_id}"
        while True:
            try:
                state = (await self._get(url)).get("state")
            except (httpx.HTTPError, ValueError):
                state = None
            if state == "reconciled":
                rec.reconciled_at = trio.current_time()
                return
            await trio.sleep(RECEIPT_POLL_INTERVAL)

    # -- watching the mesh, and the operator who unplugs the router --

    async def _watch_mesh(self) -> None:
        next_progress = trio.current_time()
        while True:
            await self._poll_statuses()
            leader = agreed_leader(self._leaders())
            if leader is not None and leader != self.leader:
                if self.leader is not None:
                    self.leader_changes += 1
                    self.say(f"[{self.elapsed():5.1f}s] leader is now {leader} (was {self.leader})")
                self.leader = leader
                self.leader_history.append((round(self.elapsed(), 2), leader))
            now = trio.current_time()
            if now >= next_progress:
                next_progress = now + PROGRESS_INTERVAL
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    self.ledger_rows = int((await self._get(self.cloud_url + "/v1/stats"))["sessions"])
                self.say(self._progress_line())
            await trio.sleep(STATUS_POLL_INTERVAL)

    def _progress_line(self) -> str:
        stopped = sum(1 for s in self.sessions if s.stopped)
        reconciled = sum(1 for s in self.sessions if s.reconciled_at is not None)
        uplinks = []
        for i, proxy in self.proxies.items():
            status = self.statuses[i]
            score = status.get("uplink_score") if status else "?"
            uplinks.append(f"{self.names[i]} {'up' if proxy.up else 'CUT'} (score {score})")
        leaders = self._leaders()
        leader = agreed_leader(leaders) or "/".join(sorted({x or "-" for x in leaders}))
        return (
            f"[{self.elapsed():5.1f}s] sessions started {len(self.sessions)} stopped {stopped} "
            f"reconciled {reconciled} | ledger {self.ledger_rows} | leader {leader} | uplinks: {', '.join(uplinks)}"
        )

    async def _operator(self) -> None:
        """Halfway: unplug the leader's uplink; plug it back once another node has taken over."""
        await trio.sleep_until(self.t0 + self.s.duration / 2)
        with trio.move_on_after(10.0):
            while self.leader is None or self.leader not in {self.names[i] for i in self.proxies}:
                await trio.sleep(0.2)
        victim = next((i for i in self.proxies if self.names[i] == self.leader), None)
        if victim is None:
            self.say(f"[{self.elapsed():5.1f}s] no node with an uplink leads; nothing to cut")
            return
        cut_at = trio.current_time()
        self.proxies[victim].cut()
        self.cut_info = {"node": self.names[victim], "at_s": round(self.elapsed(), 2)}
        self.say(
            f"[{self.elapsed():5.1f}s] cutting the uplink of the leader {self.names[victim]} "
            "(its proxy refuses connections and resets live ones)"
        )
        with trio.move_on_after(TAKEOVER_TIMEOUT):
            while self.leader in (None, self.names[victim]):
                await trio.sleep(0.1)
            self.cut_info["takeover_s"] = round(trio.current_time() - cut_at, 2)
            self.cut_info["new_leader"] = self.leader
        if "new_leader" not in self.cut_info:
            self.say(f"[{self.elapsed():5.1f}s] no other node took over within {TAKEOVER_TIMEOUT:g} s")
        restore_at = max(cut_at + self.s.duration / 4, trio.current_time() + 2.0)
        await trio.sleep_until(restore_at)
        self.proxies[victim].restore()
        self.cut_info["restored_at_s"] = round(self.elapsed(), 2)
        self.say(f"[{self.elapsed():5.1f}s] uplink of {self.names[victim]} restored")

    # -- the run --

    async def run(self) -> dict[str, Any]:
        """The whole demo inside trio; returns the report."""
        wall0 = time.monotonic()
        self._stopping = trio.Event()
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=100)
        async with (
            httpx.AsyncClient(timeout=10.0, limits=limits, trust_env=False, auth=self._tokens()) as client,
            trio_asyncio.open_loop(),  # the charge points are the `ocpp` library's (asyncio)
            trio.open_nursery() as background,
        ):
            self._client = client
            for proxy in self.proxies.values():
                await background.start(proxy.serve)
            background.start_soon(self._on_signals)
            await self._wait_ready()
            uplinks = ", ".join(self.names[i] for i in self.uplink_nodes)
            self.say(
                f"cloud at {self.cloud_url}; {self.s.nodes} nodes on {self.hosts[0]}..{self.hosts[-1]}; "
                f"uplinks: {uplinks} (through cut-able proxies); data in {self.workdir}"
            )
            formed = await self._wait_for_mesh()
            await self._register_chargers()
            self.t0 = trio.current_time()
            self.leader = agreed_leader(self._leaders())
            self.leader_history.append((0.0, self.leader or "-"))
            self.say(
                f"mesh formed after {formed:.1f} s, leader {self.leader}; "
                f"{self.s.nodes * self.s.chargers} chargers charge for {self.s.duration:g} s"
            )
            background.start_soon(self._watch_mesh)
            operator_done = trio.Event()

            async def operator() -> None:
                if self.s.cut:
                    await self._operator()
                operator_done.set()

            background.start_soon(operator)
            async with trio.open_nursery() as watchers:
                async with trio.open_nursery() as chargers:
                    for node in range(self.s.nodes):
                        for k in range(self.s.chargers):
                            chargers.start_soon(self._charger, node, k, watchers)
                    await trio.sleep_until(self.t0 + self.s.duration)
                    self._stopping.set()
                    self.say(
                        f"[{self.elapsed():5.1f}s] charging phase over: stopping the open sessions, "
                        f"waiting up to {self.s.drain_timeout:g} s for every receipt"
                    )
                drained = await self._drain(operator_done)
                watchers.cancel_scope.cancel()
            try:
                report = await self._report(drained, time.monotonic() - wall0)
            except (httpx.HTTPError, KeyError, ValueError) as exc:
                raise DemoError(f"cannot read the final state from the cloud or a node: {exc!r}") from exc
            background.cancel_scope.cancel()
        return report

    async def _register_chargers(self) -> None:
        """Hand the site's tariff and the chargers' registrations (signed site entries, as
        `meshnode site tariff --http` and `meshnode charger add --http` do) to node 1; the
        mesh replicates them, and a charger whose node has not got its registration yet is
        refused (401) and tries again. The tariff goes first: sessions snapshot it."""
        url = self.node_urls[0]
        for entry in [self.tariff_entry, *self.charger_entries]:
            response = await self.http.post(url + "/v1/site/entries", json={"entry": entry.hex()})
            if response.status_code not in (200, 201):
                raise DemoError(f"{url} refused a charger registration: HTTP {response.status_code} {response.text}")

    async def _on_signals(self) -> None:
        """SIGTERM/SIGHUP end the demo like Ctrl-C, so the nodes are stopped and the temp dir removed."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
            async for _ in signals:
                raise KeyboardInterrupt

    async def _drain(self, operator_done: trio.Event) -> bool:
        """Until every stopped session is reconciled on its node and in the ledger (bounded)."""
        with trio.move_on_after(self.s.drain_timeout):
            while True:
                stopped = [s for s in self.sessions if s.stopped]
                if operator_done.is_set() and all(s.reconciled_at is not None for s in stopped):
                    try:
                        rows = (await self._get(self.cloud_url + "/v1/sessions"))["sessions"]
                    except (httpx.HTTPError, ValueError, KeyError):
                        rows = []
                    done = {r["session_id"] for r in rows if r.get("state") == "reconciled"}
                    if all(s.session_id in done for s in stopped):
                        self.say(f"[{self.elapsed():5.1f}s] every stopped session is reconciled")
                        return True
                await trio.sleep(0.5)
        self.say(f"[{self.elapsed():5.1f}s] gave up waiting after {self.s.drain_timeout:g} s")
        return False

    async def _report(self, drained: bool, wall: float) -> dict[str, Any]:
        await self._poll_statuses()
        stats = await self._get(self.cloud_url + "/v1/stats")
        rows = (await self._get(self.cloud_url + "/v1/sessions"))["sessions"]
        conflicts = (await self._get(self.cloud_url + "/v1/conflicts"))["conflicts"]
        cloud_events: dict[str, list[dict[str, Any]]] = {}
        raw_event_bytes = doc_bytes = 0
        unreadable: list[str] = []
        for rec in self.sessions:
            try:
                cloud_events[rec.session_id] = (await self._get(f"{self.cloud_url}/v1/sessions/{rec.session_id}"))[
                    "events"
                ]
            except httpx.HTTPStatusError:
                cloud_events[rec.session_id] = []
            try:
                response = await self.http.get(f"{self.node_urls[rec.node]}/v1/sessions/{rec.session_id}/automerge")
                response.raise_for_status()
                doc_bytes += len(response.content)
                events = read_session(Document.load(response.content)).events
                raw_event_bytes += sum(len(blob) for blob in events.values())
            except Exception:  # httpx errors, and Document.load raises plain Exception
                unreadable.append(rec.session_id)
        node_views: dict[str, dict[str, dict[str, Any]]] = {}
        for name, url in zip(self.names, self.node_urls, strict=True):
            listed = (await self._get(url + "/v1/sessions"))["sessions"]
            node_views[name] = {str(s["session_id"]): s for s in listed}
        issued = receipts_issued(self.workdir / "cloud.log")
        check = check_ledger(self.sessions, rows, cloud_events, stats, node_views, conflicts, issued)
        latencies = [x for s in self.sessions if (x := s.receipt_latency) is not None]
        stopped = [s for s in self.sessions if s.stopped]
        receipts_missing = [s.session_id for s in stopped if s.reconciled_at is None]
        failures = check.failures
        if receipts_missing:
            failures.append(f"{len(receipts_missing)} stopped sessions never showed their receipt on their node")
        if self.stops_unacknowledged:
            failures.append(f"{self.stops_unacknowledged} stops were never acknowledged by their node")
        if not self.sessions:
            failures.append("no session could be started")
        billing = billing_summary(self.sessions, rows)
        if billing["unpriced"]:
            failures.append(f"{billing['unpriced']} sessions unpriced in the ledger though the site signed a tariff")
        node_changes = {
            n: (s.get("leader_changes") if s else None) for n, s in zip(self.names, self.statuses, strict=True)
        }
        fwd = {n: s["forwarder"] for n, s in zip(self.names, self.statuses, strict=True) if s and s.get("forwarder")}
        return {
            "ok": not failures,
            "failures": failures,
            "nodes": self.s.nodes,
            "uplink_nodes": [self.names[i] for i in self.uplink_nodes],
            "chargers": self.s.nodes * self.s.chargers,
            "duration_s": self.s.duration,
            "seed": self.s.seed,
            "sessions_started": len(self.sessions),
            "sessions_stopped": len(stopped),
            "sessions_in_ledger": check.in_ledger,
            "sessions_reconciled_in_ledger": check.reconciled,
            "ledger_rows": len(rows),
            "unexpected_ledger_rows": len(check.unexpected),
            "unexpected_sessions_on_nodes": len(check.unexpected_on_nodes),
            "sessions_with_several_receipts": len(check.receipt_conflicts),
            "duplicates": check.duplicates,
            "lost": len(check.lost),
            "lost_events": check.lost_events,
            "events_acknowledged": sum(len(s.acked_events) for s in self.sessions),
            "energy_mismatches": len(check.energy_mismatches),
            "billing": billing,
            "conflicts": len(conflicts),
            "conflict_kinds": dict(Counter(str(c.get("kind")) for c in conflicts)),
            "receipt_latency_s": {
                "p50": _round(percentile(latencies, 0.5)),
                "p95": _round(percentile(latencies, 0.95)),
                "max": _round(max(latencies, default=None)),
                "n": len(latencies),
            },  # fmt: skip
            "receipts_missing_on_nodes": len(receipts_missing),
            "all_reconciled_in_time": drained,
            "cloud_bytes": int(stats.get("bytes_received", 0)),
            "cloud_bytes_inflated": int(stats.get("bytes_received_inflated", 0)),
            "cloud_requests": int(stats.get("requests", 0)),
            "cloud_receipts": int(stats.get("receipts", 0)),
            "cloud_receipts_issued": sum(issued.values()),
            "cloud_duplicates_rejected": int(stats.get("duplicates_rejected", 0)),
            "raw_event_bytes": raw_event_bytes,
            "cloud_bytes_per_raw_event_byte": round(int(stats.get("bytes_received", 0)) / raw_event_bytes, 3)
            if raw_event_bytes
            else None,
            "automerge_doc_bytes": doc_bytes,
            "sessions_unreadable_for_bytes": len(unreadable),
            "proxy_bytes_to_cloud": sum(p.bytes_to_cloud for p in self.proxies.values()),
            "proxy_bytes_from_cloud": sum(p.bytes_from_cloud for p in self.proxies.values()),
            "leader_changes": self.leader_changes,
            "leader_changes_source": "polled: changes of the leader that all nodes' GET /v1/status agreed on, "
            f"every {STATUS_POLL_INTERVAL:g} s",
            "leader_history": [{"t_s": t, "leader": name} for t, name in self.leader_history],
            "node_leader_changes": node_changes,
            "uplink_cut": self.cut_info,
            "forwarders": fwd,
            "chargers_by_version": dict(Counter(f"ocpp{cp.version}" for cp in self.charge_points)),
            "charger_connections": sum(cp.connections for cp in self.charge_points),
            "remote_stops": self.remote_stops,
            "request_errors": dict(self.request_errors),
            "wall_s": round(wall, 1),
        }


# --- output ----------------------------------------------------------------------------------


def format_report(r: Mapping[str, Any]) -> str:
    """The report for people: what happened, and whether the promise held."""
    lat = r["receipt_latency_s"]
    cut = r.get("uplink_cut") or {}

    def sec(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f} s"

    ratio = r.get("cloud_bytes_per_raw_event_byte")
    if cut.get("new_leader"):
        cut_text = (
            f"{cut['node']}'s uplink cut at {cut['at_s']:.1f} s; {cut['new_leader']} took over "
            f"{cut['takeover_s']:.1f} s later; uplink restored at {cut.get('restored_at_s', 0):.1f} s"
        )
    elif cut:
        cut_text = f"{cut['node']}'s uplink cut at {cut['at_s']:.1f} s; no takeover was seen"
    else:
        cut_text = "no uplink was cut"
    lines = [
        "",
        f"meshnode demo: {r['nodes']} nodes ({', '.join(r['uplink_nodes'])} with an uplink), "
        f"{r['chargers']} chargers, {r['duration_s']:g} s of charging, seed {r['seed']}",
        "",
        f"  sessions started                {r['sessions_started']}",
        f"  sessions in the cloud ledger    {r['sessions_in_ledger']}"
        f" ({r['sessions_reconciled_in_ledger']} reconciled)",
        f"  duplicates                      {r['duplicates']}",
        f"  lost                            {r['lost']} ({r['lost_events']} of {r['events_acknowledged']} "
        "acknowledged events missing)",
        f"  conflicts                       {r['conflicts']}" + (f" {r['conflict_kinds']}" if r["conflicts"] else ""),
        f"  billed                          {_billed_text(r.get('billing') or {})}",
        f"  stop -> receipt on its node     median {sec(lat['p50'])}, p95 {sec(lat['p95'])}, "
        f"max {sec(lat['max'])} ({lat['n']} sessions)",
        f"  bytes to the cloud              {r['cloud_bytes']:,} (sync bodies, deflated) against "
        f"{r['raw_event_bytes']:,} of raw signed events" + (f" ({ratio:.2f} x)" if ratio else ""),
        f"  leader changes                  {r['leader_changes']} (polled, agreed by all nodes): {cut_text}",
    ]
    versions = ", ".join(f"{n} on {v}" for v, n in sorted(r.get("chargers_by_version", {}).items()))
    lines.append(
        f"  chargers (OCPP)                 {versions or '-'}; {r.get('remote_stops', 0)} sessions stopped "
        "remotely through another node's API"
    )
    if r["request_errors"]:
        lines.append(f"  errors seen by chargers         {r['request_errors']}")
    lines.append("")
    if r["ok"]:
        lines.append(
            f"OK: every session reached the ledger exactly once and got its receipt back ({r['wall_s']:.0f} s wall)."
        )
    else:
        lines.append("FAILED:")
        lines += [f"  - {f}" for f in r["failures"]]
    return "\n".join(lines)


def run_demo(
    nodes: int = DEFAULT_NODES,
    duration: float = DEFAULT_DURATION,
    json_out: bool = False,
    seed: int = 1,
    *,
    chargers: int = DEFAULT_CHARGERS,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    base_address: str = DEFAULT_BASE_ADDRESS,
    cut: bool = True,
    keep: bool = False,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> int:
    """Run the demo; print the report (text, or one JSON object) on `out`, progress on `err`.

    Returns the exit status: 0 when nothing was lost, duplicated or billed
    wrongly and every receipt came back; 1 otherwise or on an error; 130 when
    interrupted. Processes and the temporary directory are always cleaned up
    (the directory is kept with `keep`).
    """

    out = out or sys.stdout
    err = err or sys.stderr
    if nodes < UPLINK_NODES + 1:
        raise DemoError(f"--nodes must be at least {UPLINK_NODES + 1} (two nodes have an uplink, one must not)")
    if not math.isfinite(duration) or duration < 4:
        raise DemoError("--duration must be at least 4 seconds")
    if chargers < 1:
        raise DemoError("--chargers must be at least 1")
    if not drain_timeout > 0:
        raise DemoError("--drain-timeout must be a positive number of seconds")
    loopback_hosts(base_address, nodes)  # a bad address fails here, before anything starts

    def say(line: str) -> None:
        print(line, file=err, flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="meshnode-demo-"))
    demo = Demo(DemoSettings(nodes, duration, seed, chargers, drain_timeout, base_address, cut), workdir, say)
    report: dict[str, Any] | None = None
    code = 1
    try:
        demo.launch()
        report = trio.run(demo.run)
        code = 0 if report["ok"] else 1
    except (KeyboardInterrupt, DemoError, BaseExceptionGroup) as exc:
        leaves = _leaves(exc)
        if any(isinstance(x, KeyboardInterrupt) for x in leaves):
            say("interrupted: stopping the cloud and the nodes")
            code = 130
        elif errors := [x for x in leaves if isinstance(x, DemoError)]:
            say(f"meshnode demo: {errors[0]}")
            code = 1
        else:
            raise
    finally:
        stop_children(demo.children)
        if keep:
            say(f"data dirs and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            if code == 1:
                say("(rerun with --keep to keep the nodes' logs and data dirs)")
    if report is not None:
        print(json.dumps(report) if json_out else format_report(report), file=out, flush=True)
    return code


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups: trio nurseries wrap what their tasks raise."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's flags (shared by `meshnode demo` and `python -m meshnode._demo`)."""
    parser.add_argument(
        "--nodes",
        type=int,
        default=DEFAULT_NODES,
        help=f"mesh nodes, two of them with an uplink (default {DEFAULT_NODES})",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=DEFAULT_DURATION,
        metavar="SECONDS",
        help=f"length of the charging phase (default {DEFAULT_DURATION:g})",
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--seed", type=int, default=1, help="seed of the chargers and the uplink choice (default 1)")
    parser.add_argument(
        "--chargers",
        type=int,
        default=DEFAULT_CHARGERS,
        help=f"simulated chargers per node (default {DEFAULT_CHARGERS})",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=DEFAULT_DRAIN_TIMEOUT,
        metavar="SECONDS",
        help="how long to wait for the last receipts after charging (default 60)",
    )
    parser.add_argument(
        "--base-address",
        default=DEFAULT_BASE_ADDRESS,
        help=f"loopback address of node 1; node i gets the address + i - 1 (default {DEFAULT_BASE_ADDRESS})",
    )
    parser.add_argument("--no-cut", action="store_true", help="do not cut the leader's uplink")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (data dirs, logs) afterwards")


def run_from_args(args: argparse.Namespace) -> int:
    """Run with parsed `add_arguments` flags; bad values are reported on stderr (status 2)."""
    try:
        return run_demo(
            args.nodes, args.duration, args.json, args.seed, chargers=args.chargers,
            drain_timeout=args.drain_timeout, base_address=args.base_address, cut=not args.no_cut, keep=args.keep,
        )  # fmt: skip
    except DemoError as exc:
        print(f"meshnode demo: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="meshnode demo",
        description="Run a cloud and a mesh of nodes on loopback, charge on every node, cut the leader's "
        "uplink midway, and report whether every session reached the ledger exactly once.",
    )
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
