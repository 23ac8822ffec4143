"""Benchmark: what an idle node costs — memory, CPU, start-up.

Real `meshnode run --insecure --no-mdns` processes on loopback (addresses from
`--base-address`, default 127.0.14.10 upwards), data dirs in a temporary directory:

1. **Idle RSS, no sessions**: one node, no peers; after it is ready and has idled
   `--settle` seconds, its VmRSS (and /proc/PID/smaps_rollup: anonymous versus
   file-backed pages). Once as `meshnode run` starts by default (`empty`: the OCPP
   central system on), once with `--ocpp-port 0` (`ocpp_off`: a node without chargers).
2. **Start-up and idle RSS with `--sessions` sessions** (default 1,000): that node is
   given the sessions over its HTTP API (each created, then one meter reading), then
   stopped and started again on the same data dir. Start-up = spawn to the ready line
   (the store loaded, every document read), in wall seconds and in CPU seconds of the
   node process. RSS is measured after the restart, so it
   is what a node that holds those sessions costs, not the garbage of writing them.
3. **Idle CPU per node in a `--mesh`-node mesh** (default 10, every node given every
   other as `--peer`): once every node sees all others as live direct peers, user +
   system CPU time of each process (/proc/PID/stat) over `--idle-seconds`, as a
   percentage of one core; the mean, max and each node.
4. **Import cost** (`imports_mb`): a fresh interpreter imports the node's modules one by
   one and records the RSS each adds — what the resident memory of an idle node is made of
   (`total`) — then, under `on_demand`, what a node imports only when it is used (httpx for
   an uplink, the `ocpp` library for a charger, prometheus_client at the first scrape).

The node's own packages (crdt, uplink, meshnode) are byte-compiled first where they are
imported from, as `pip install` does (`--no-compile`: not): a tree run with
PYTHONDONTWRITEBYTECODE=1 has no .pyc, and every node process then compiles the source at
start-up, ~2 MB more RSS (the compiler's garbage) and ~0.5 s more start-up than an install.

Each measurement comes `--settle` seconds (default 20) after its node(s) are ready: an idle
node's anti-entropy backs off from 1 s to 8 s over its first quiet exchanges, about 15 s;
this measures the idle state, not the way in.

Goals (issue 9): idle RSS <= 50 MB, <= 80 MB with 1,000 sessions, idle CPU <= 1 % of a
core per node. Prints one JSON object on stdout; progress on stderr. Every process
started is stopped at the end, also on error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mesh  # the node processes are started as bench/mesh.py does

log = mesh.log


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError(f"no VmRSS for {pid}")


def smaps_mb(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if (
                len(parts) == 3
                and parts[2] == "kB"
                and parts[0].rstrip(":") in ("Rss", "Anonymous", "Shared_Clean", "Private_Clean", "Private_Dirty")
            ):
                out[parts[0].rstrip(":")] = round(int(parts[1]) / 1024, 1)
    return out


def node_args(args: argparse.Namespace, base_address: str, extra: tuple[str, ...]) -> SimpleNamespace:
    return SimpleNamespace(
        base_address=base_address, coap_port=args.coap_port, http_port=args.http_port,
        node_log_level="warning", startup_timeout=args.startup_timeout, node_extra_args=extra,
    )  # fmt: skip


def start(
    n: int, args: argparse.Namespace, directory: str, base_address: str | None = None, extra: tuple[str, ...] = ()
) -> list[mesh.NodeProc]:
    return mesh.start_nodes(n, node_args(args, base_address or args.base_address, extra), directory)


async def add_sessions(node: mesh.NodeProc, count: int, concurrency: int) -> tuple[float, int]:
    """Create `count` sessions with one meter reading each; returns (seconds, retried requests).

    A request whose connection closed before an answer came is sent again (at most twice):
    on a loaded machine the node's server at times saw the client go away while it read a
    body (starlette's ClientDisconnect, nothing applied) and the client saw the server go
    away; without the retry one such request ended the whole benchmark.
    """
    started = time.perf_counter()
    jobs = iter(range(count))
    retries = 0
    async with httpx.AsyncClient(timeout=60.0, trust_env=False) as client:

        async def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
            nonlocal retries
            for _ in range(2):
                try:
                    r = await client.post(url, json=body)
                    break
                except (httpx.RemoteProtocolError, httpx.ReadError):  # closed or reset before the answer
                    retries += 1
            else:
                r = await client.post(url, json=body)
            r.raise_for_status()
            return r.json()  # type: ignore[no-any-return]

        async def worker() -> None:
            for i in jobs:
                created = await post(
                    f"{node.http}/v1/sessions",
                    {"charger": f"cp-{i % 50}", "connector": 1 + i % 2, "id_token": f"tag-{i}", "meter_wh": 0},
                )
                await post(
                    f"{node.http}/v1/sessions/{created['session_id']}/events", {"type": "meter", "meter_wh": 1000 + i}
                )

        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
    return time.perf_counter() - started, retries


@contextlib.contextmanager
def idle_node(
    args: argparse.Namespace, directory: str, out: dict[str, Any], case: str, extra: tuple[str, ...] = ()
) -> Iterator[mesh.NodeProc]:
    """One node started on `directory` (with `extra` flags): its start-up time (wall, and the CPU the
    process used until ready: the wall figure depends on the machine's load, the CPU one hardly),
    then, after `--settle` idle seconds, its RSS and smaps, into `out` as `startup_s_<case>`,
    `startup_cpu_s_<case>`, `idle_rss_mb_<case>`, `idle_smaps_mb_<case>`."""
    t0 = time.perf_counter()
    nodes = start(1, args, directory, extra=extra)
    try:
        out[f"startup_s_{case}"] = round(time.perf_counter() - t0, 2)
        out[f"startup_cpu_s_{case}"] = round(mesh.cpu_seconds(nodes[0].proc.pid), 2)
        time.sleep(args.settle)
        out[f"idle_rss_mb_{case}"] = rss_mb(nodes[0].proc.pid)
        out[f"idle_smaps_mb_{case}"] = smaps_mb(nodes[0].proc.pid)
        log(f"  {out[f'idle_rss_mb_{case}']} MB, start-up {out[f'startup_s_{case}']} s")
        yield nodes[0]
    finally:
        mesh.stop_nodes(nodes)


def one_node(args: argparse.Namespace, directory: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    log("one node, no sessions")
    with idle_node(args, directory, out, "empty") as node:
        log(f"  adding {args.sessions} sessions")
        out["sessions"] = args.sessions
        seconds, retries = trio.run(add_sessions, node, args.sessions, args.concurrency)
        out["add_sessions_s"], out["add_sessions_retried_requests"] = round(seconds, 2), retries
    log("  restarting on the same data dir")
    with idle_node(args, directory, out, "with_sessions"):
        pass
    log("one node, no sessions, OCPP off (--ocpp-port 0: a node no charger connects to)")
    os.makedirs(os.path.join(directory, "ocpp-off"))
    with idle_node(args, os.path.join(directory, "ocpp-off"), out, "ocpp_off", ("--ocpp-port", "0")):
        pass
    return out


def idle_mesh(args: argparse.Namespace, directory: str) -> dict[str, Any]:
    log(f"{args.mesh}-node mesh")
    base = args.base_address.rsplit(".", 1)
    nodes = start(args.mesh, args, directory, f"{base[0]}.{int(base[1]) + 20}")
    try:

        async def formed() -> float:
            async with httpx.AsyncClient(timeout=10.0, trust_env=False) as client:
                return await mesh.wait_for_mesh(client, nodes, args.startup_timeout)

        formed_s = trio.run(formed)
        time.sleep(args.settle)
        before = {n.index: mesh.cpu_seconds(n.proc.pid) for n in nodes}
        t0 = time.monotonic()
        time.sleep(args.idle_seconds)
        elapsed = time.monotonic() - t0
        mesh.check_alive(nodes)
        pct = [round(100 * (mesh.cpu_seconds(n.proc.pid) - before[n.index]) / elapsed, 2) for n in nodes]
        rss = [rss_mb(n.proc.pid) for n in nodes]
    finally:
        mesh.stop_nodes(nodes)
    log(f"  idle CPU per node: mean {sum(pct) / len(pct):.2f} % of a core")
    return {
        "mesh_nodes": args.mesh, "mesh_formed_s": round(formed_s, 2), "idle_seconds": round(elapsed, 1),
        "idle_cpu_pct_mean": round(sum(pct) / len(pct), 2), "idle_cpu_pct_max": max(pct), "idle_cpu_pct": pct,
        "mesh_rss_mb_mean": round(sum(rss) / len(rss), 1),
    }  # fmt: skip


IMPORTS = [
    "trio",
    "nacl.signing",
    "cbor2",
    "automerge.core",
    "crdt",
    "uplink",
    "trio_asyncio",
    "aiocoap",
    "zeroconf",
    "starlette.applications",
    "hypercorn.trio",
    "websockets.asyncio.server",
    "meshnode",
    "meshnode._coap",
    "meshnode._mdns",
    "meshnode._security",
    "meshnode._api",
    "meshnode.ocpp",
    "meshnode.ocpp._server",
    "meshnode.cli",
]
"""What an idle node imports (`meshnode run` with OCPP and mDNS on, as by default; the nodes measured
above run with `--no-mdns`, without zeroconf), in that order."""

ON_DEMAND = ["httpx", "ocpp.v16", "ocpp.v201", "prometheus_client"]
"""Imported only when used, after `IMPORTS` here: httpx with an uplink (`--cloud`; it loads
click, rich and pygments too when they are installed), the `ocpp` library with a version's
first charger (`meshnode.ocpp._server.register_version`), and with it jsonschema (the library
validates messages with it; the node's settings no longer need it, `meshnode/_config.py`), and
prometheus_client at the first scrape of `/metrics` (`meshnode/_metrics.py`)."""


def compile_node_packages() -> list[str]:
    """Byte-compile crdt, uplink and meshnode where this interpreter imports them from (as
    `pip install` does), so the nodes measured load .pyc files rather than compile the source."""
    import compileall
    import importlib.util

    compiled = []
    for name in ("crdt", "uplink", "meshnode"):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        directory = os.path.dirname(spec.origin)
        if not compileall.compile_dir(directory, quiet=1):
            raise SystemExit(f"cannot byte-compile {directory}")
        compiled.append(directory)
    return compiled


def import_costs() -> dict[str, Any]:
    code = f"""
import importlib, json
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
out = {{"python": round(rss(), 1)}}
for name in {IMPORTS!r}:
    before = rss()
    importlib.import_module(name)
    out[name] = round(rss() - before, 1)
out["total"] = round(rss(), 1)
out["on_demand"] = {{}}
for name in {ON_DEMAND!r}:
    before = rss()
    importlib.import_module(name)
    out["on_demand"][name] = round(rss() - before, 1)
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=1000, help="sessions for the second measurement (default 1000)")
    p.add_argument("--concurrency", type=int, default=16, help="concurrent HTTP clients adding sessions")
    p.add_argument("--mesh", type=int, default=10, help="nodes in the idle mesh (default 10; 0 skips it)")
    p.add_argument("--idle-seconds", type=float, default=20.0, help="CPU measurement window (default 20)")
    p.add_argument("--settle", type=float, default=20.0, help="idle seconds before each measurement (default 20)")
    p.add_argument(
        "--no-compile", action="store_true", help="do not byte-compile the node's packages first (see above)"
    )
    mesh.add_node_arguments(p, base_address="127.0.14.10", startup_timeout=120.0)
    args = p.parse_args()
    result: dict[str, Any] = {
        "bench": "footprint",
        "goals": {"idle_rss_mb_empty": 50, "idle_rss_mb_with_sessions": 80, "idle_cpu_pct_per_node": 1.0},
        "compiled": [] if args.no_compile else compile_node_packages(),
    }
    result["imports_mb"] = import_costs()
    with tempfile.TemporaryDirectory(prefix="meshnode-footprint-") as directory:
        for sub in ("one", "mesh"):
            os.makedirs(os.path.join(directory, sub))
        result.update(one_node(args, os.path.join(directory, "one")))
        if args.mesh:
            result.update(idle_mesh(args, os.path.join(directory, "mesh")))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
