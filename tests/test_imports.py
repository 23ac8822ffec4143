"""What a node loads: `pip install meshnode` is the node alone.

The node's import path (`meshnode run`) must not pull in the reference cloud
service, its database driver or the simulator's libraries; the simulator and a
PostgreSQL cloud, when their extra is missing, say which extra to install. Each
check runs in a fresh interpreter, since this test process has imported
everything already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

# What `meshnode run` imports, down to the transport, discovery, security and API.
NODE_IMPORTS = """
import meshnode, meshnode.cli
from meshnode._api import serve_api
from meshnode._coap import open_coap_transport
from meshnode._mdns import MdnsDiscovery
from meshnode._node import Node, NodeConfig
from meshnode._security import Identity, SealedTransport, Sealer
"""

NOT_FOR_A_NODE = (
    "uplink._cloud", "uplink._ledger", "psycopg", "sqlalchemy", "alembic", "matplotlib", "numpy", "networkx", "sim",
    # An HTTP client only with an uplink (`uplink.CloudClient`) or in tools (`uplink.DataDirTokens`):
    # httpx loads the command-line tools it brings when they are installed (rich, click, pygments).
    "httpx", "uplink._tokenauth", "rich", "click", "pygments",
)  # fmt: skip


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, timeout=120, env=os.environ.copy(), check=False,
    )  # fmt: skip


def test_the_node_import_path_loads_no_cloud_service_database_driver_or_simulator() -> None:
    proc = run_python(
        NODE_IMPORTS
        + f"""
import json, sys
print(json.dumps(sorted(m for m in sys.modules if m in {NOT_FOR_A_NODE!r} or m.split(".")[0] in {NOT_FOR_A_NODE!r})))
"""
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


# What `meshnode run` does before it serves: it builds the whole command line (every
# subcommand's flags but the demo's, added when `meshnode demo` is parsed), then imports the
# node, its transport, its API and (on by default) the OCPP central system.
NODE_STARTUP = (
    NODE_IMPORTS
    + """
meshnode.cli.build_parser().parse_args(["run", "--insecure", "--no-mdns"])
import meshnode.ocpp
"""
)

# What a node never runs: besides the cloud and the simulator, the demo (its module and its
# simulated chargers, an OCPP client on websockets) and the in-process replica demo; and what it
# loads only when a charger connects: the `ocpp` library and a version's handler (and the
# jsonschema it validates with; the node's settings are checked without it); and what it loads
# only at the first scrape of /metrics: prometheus_client.
NOT_AT_NODE_STARTUP = (
    *NOT_FOR_A_NODE,
    "meshnode._demo",
    "meshnode._chargepoints",
    "meshnode._replica_demo",
    "websockets.asyncio.client",
    "ocpp",
    "meshnode.ocpp._handler",
    "meshnode.ocpp._v16",
    "meshnode.ocpp._v201",
    "jsonschema",
    "prometheus_client",
)


def test_a_node_starting_up_loads_none_of_what_only_the_demo_cloud_or_simulator_run() -> None:
    proc = run_python(
        NODE_STARTUP
        + f"""
import json, sys
print(json.dumps(sorted(m for m in sys.modules if m in {NOT_AT_NODE_STARTUP!r} or m.split(".")[0] in {NOT_FOR_A_NODE!r})))
"""
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_the_demos_flags_are_there_when_meshnode_demo_is_parsed() -> None:
    proc = run_python("""
import sys
from meshnode.cli import build_parser
args = build_parser().parse_args(["demo", "--nodes", "3", "--no-cut"])
print(args.nodes, args.no_cut, args.duration > 0, "meshnode._demo" in sys.modules)
""")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["3", "True", "True", "True"]


def test_a_node_without_ocpp_loads_no_ocpp_library_nor_websocket_server() -> None:
    # `--ocpp-port 0`: the API's remote-command routes and the node's /m/ocpp/command route
    # are still there (a charger may be connected to another node); the central system is not.
    proc = run_python(
        NODE_IMPORTS
        + """
meshnode.cli.build_parser().parse_args(["run", "--insecure", "--ocpp-port", "0"])
from meshnode.ocpp import install_remote_commands, remote_command_routes
import json, sys
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("ocpp", "websockets") or m.startswith("meshnode.ocpp._v") or m == "meshnode.ocpp._server")))
"""
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_the_ocpp_central_system_loads_a_version_and_the_ocpp_library_only_for_a_charger_of_that_version() -> None:
    # An idle node serving OCPP holds the WebSocket server, not the `ocpp` library (~4 MB of
    # message classes and schemas): a version's handler is imported when one of its chargers
    # connects, and only that version's.
    proc = run_python("""
import sys
import trio, trio_asyncio
import meshnode.ocpp as ocpp
from meshnode.ocpp import VERSIONS, ChargerContext, OcppServer
from tests.test_ocpp_bridge import Rig
from tests.fuzz_targets import FrameSink

def loaded():
    return sorted({m.split(".")[0] if m.split(".")[0] == "ocpp" else m for m in sys.modules
                   if m.split(".")[0] == "ocpp" or m.startswith("meshnode.ocpp._")})

rig = Rig()
server = OcppServer(rig.bridge, rig.site_config)
async def serve():
    async with trio_asyncio.open_loop():
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, "127.0.0.1", 0)
            print(sorted(VERSIONS), loaded())
            VERSIONS["ocpp1.6"]("CP-1", FrameSink(), ChargerContext(rig.bridge, server, None))
            print(loaded())
            nursery.cancel_scope.cancel()
trio.run(serve)
print(ocpp.OcppServer.__module__, ocpp.OcppHandler.__module__, ocpp.V16Commands.__module__, ocpp.V201Commands.__module__)
""")
    assert proc.returncode == 0, proc.stderr
    served, connected, names = proc.stdout.splitlines()
    assert (
        served == "['ocpp1.6', 'ocpp2.0.1'] ['meshnode.ocpp._bridge', 'meshnode.ocpp._remote', 'meshnode.ocpp._server']"
    )
    assert connected == (
        "['meshnode.ocpp._bridge', 'meshnode.ocpp._handler', 'meshnode.ocpp._remote', 'meshnode.ocpp._server', "
        "'meshnode.ocpp._v16', 'ocpp']"
    )
    assert names.split() == [
        "meshnode.ocpp._server",
        "meshnode.ocpp._handler",
        "meshnode.ocpp._v16",
        "meshnode.ocpp._v201",
    ]


def test_the_cloud_names_are_still_exported_by_uplink() -> None:
    proc = run_python("""
import sys, uplink
assert "uplink._cloud" not in sys.modules
from uplink import LedgerError, serve_cloud, CloudService
assert "uplink._cloud" in sys.modules
assert set(uplink.__all__) >= {"serve_cloud", "Ledger", "LedgerError", "Forwarder"}
print(serve_cloud.__module__, LedgerError.__module__)
""")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["uplink._cloud", "uplink._ledger"]


def test_importing_crdt_provokes_no_rust_panic() -> None:
    # A panic at import time (to learn pyo3's exception type) cost ~50 MB of RSS.
    proc = run_python("""
import crdt
print(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
""")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # Rust prints every panic to stderr
    assert int(proc.stdout) < 45_000, f"import crdt: {proc.stdout.strip()} kB RSS"


def test_a_rust_panic_from_automerge_is_recognised_as_an_engine_error() -> None:
    # The poisoned sync state that check_sync_message now refuses up front: fed
    # straight to Automerge, its next generate_sync_message panics.
    proc = run_python("""
import os
os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
from automerge.core import ROOT, Document, Message, ScalarType, SyncState
from crdt._sync import _is_engine_error
doc = Document()
with doc.transaction() as tx:
    tx.put(ROOT, "x", ScalarType.Int, 1)
state = SyncState()
doc.receive_sync_message(state, Message.decode(bytes.fromhex("42000001000301000100")))
try:
    doc.generate_sync_message(state)
except BaseException as exc:
    print(type(exc).__name__, isinstance(exc, Exception), _is_engine_error(exc))
print(_is_engine_error(KeyboardInterrupt()), _is_engine_error(ValueError()))
""")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["PanicException", "False", "True", "False", "True"]


def test_the_simulator_without_its_extra_says_which_extra_to_install() -> None:
    proc = run_python("""
import sys
sys.modules["networkx"] = None  # as if `pip install meshnode` without [sim]
sys.argv = ["meshsim", "--help"]
from sim.cli import main
""")
    assert proc.returncode == 1
    assert "pip install 'meshnode[sim]'" in proc.stderr.splitlines()[-1]


def test_a_postgresql_cloud_without_its_extra_says_which_extra_to_install(tmp_path: Path) -> None:
    key = tmp_path / "cloud.key"
    proc = run_python(f"""
import sys
sys.modules["psycopg"] = None  # as if `pip install meshnode` without [cloud]
from meshnode.cli import main
sys.exit(main(["cloud", "--db", "postgresql://localhost/ledger", "--port", "0", "--key", {str(key)!r}]))
""")
    assert proc.returncode == 1
    assert not key.exists()
    assert proc.stderr.strip() == "meshnode cloud: a PostgreSQL ledger needs psycopg: pip install 'meshnode[cloud]'"
