"""The node as the local OCPP-J central system (CSMS) for the chargers pointed at it.

- `_server.py`: the WebSocket server (``/ocpp/{charge_point_id}``, subprotocols
  ``ocpp1.6`` / ``ocpp2.0.1``), HTTP Basic authentication at the upgrade, frame and
  rate limits, and `OcppServer.call` for commands to a charger. It does not import the
  `ocpp` library.
- `_handler.py`: `OcppHandler`, the base of the version handlers (the library's
  ChargePoint): the CALLERROR rules, the local list sync.
- `_bridge.py`: `OcppBridge`, the one path from any OCPP version into the session
  documents (through `meshnode.services.SessionService`): authorisation, start /
  meter / stop exactly once under offline replay, mesh-unique transaction ids,
  charger and connector states.
- `_v16.py`: OCPP 1.6J Core + Local Auth List Management (translation only).
- `_v201.py`: OCPP 2.0.1.
- `_remote.py`: remote commands (start/stop/network profile) carried to the node a
  charger is connected to; `install_remote_commands(node)` (the node) and
  `remote_command_routes(node)` (the HTTP API) are its public entry points.

`serve_ocpp(node, bind, port, ssl_context=...)` is what `meshnode run --ocpp-port`
starts (`tls_context` for `--ocpp-certfile/--ocpp-keyfile`, Security Profile 2); it sets
``node.ocpp`` to the `OcppServer`, which the HTTP API reads for `/v1/status` and which
remote commands use (`OcppServer.call`, `V16Commands`, `V201Commands`). docs/ocpp.md tells how to
point a charger at its node and what is stored.

A new version plugs in with one line in `_server.py`, ``register_version("ocpp2.0.1",
"._v201:V201Handler")``: the handler by name, so its module and the library's classes for
that version are imported when the first charger of that version connects (an idle node
holds none of them). The handler subclasses `OcppHandler` (CALLERROR rules, schema codes)
and the library's ChargePoint of that version, implements its two local list calls, and
translates into `OcppBridge` calls (`transaction_ref=` for a charger-chosen transaction id).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

import trio

from ._bridge import (
    AuthStatus,
    ChargerState,
    HeldMessages,
    OcppBridge,
    Reading,
    StartResult,
    content_key,
    derive_transaction_id,
)

# The central system itself (the WebSocket server) is imported on first use: by `open_server`,
# or when one of its names is read from this package. A node run with `--ocpp-port 0` never
# loads it. A version's handler, and with it the `ocpp` library's message classes and schema
# validation, is imported when the first charger of that version connects (`VERSIONS`).
if TYPE_CHECKING:
    from ._handler import OcppHandler
    from ._server import (
        DEFAULT_PORT,
        VERSIONS,
        ChargerContext,
        ChargerNotConnected,
        OcppServer,
        RateLimit,
        register_version,
        reraise_sole_oserror,
    )
    from ._v16 import V16Commands
    from ._v201 import V201Commands

_SERVER_NAMES = frozenset(
    {
        "DEFAULT_PORT",
        "VERSIONS",
        "ChargerContext",
        "ChargerNotConnected",
        "OcppServer",
        "RateLimit",
        "register_version",
        "reraise_sole_oserror",
    }
)


_LAZY = {**dict.fromkeys(_SERVER_NAMES, "._server"), "OcppHandler": "._handler", "V16Commands": "._v16"}
_LAZY["V201Commands"] = "._v201"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module, __name__), name)


# Remote start/stop wherever in the mesh a charger is connected: the node installs the
# `/m/ocpp/command` route (`install_remote_commands`), the HTTP API adds its routes.
from ._remote import CommandError, RemoteCommands  # noqa: E402
from ._remote import http_routes as remote_command_routes  # noqa: E402
from ._remote import install as install_remote_commands  # noqa: E402


def open_server(node: Any, *, ssl_context: ssl.SSLContext | None = None) -> OcppServer:
    """An `OcppServer` wired to a node's session and site-config services (not serving yet)."""
    from ._server import OcppServer

    bridge = OcppBridge(node.sessions, wall_clock=lambda: node.wall_clock())
    return OcppServer(bridge, node.site_config, ssl_context=ssl_context)


def tls_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """The server side of OCPP Security Profile 2: TLS 1.2 or newer with the node's certificate.

    Raises:
        OSError / ssl.SSLError: the files cannot be read or do not match.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    return context


async def serve_ocpp(
    node: Any,
    bind: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None = None,
    task_status: trio.TaskStatus[OcppServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve OCPP for `node` on ``bind:port`` until cancelled; `task_status` gets the server.

    The server is also set as ``node.ocpp`` so the HTTP API (`/v1/status`) and remote
    commands find it. Needs the trio-asyncio loop `meshnode run` opens.
    """
    from ._server import reraise_sole_oserror

    server = open_server(node, ssl_context=ssl_context)
    node.ocpp = server
    # Documents arriving by replication may be the sessions of held 1.6 messages (bridge rule 6).
    listeners = getattr(node, "change_listeners", None)
    if listeners is not None:
        listeners.append(server.bridge.document_changed)
    try:
        with reraise_sole_oserror():  # a port in use: one OSError, as the CLI reports it
            async with trio.open_nursery() as nursery:
                await nursery.start(server.bridge.serve_held)
                await nursery.start(server.serve, bind, port)
                task_status.started(server)
    finally:
        node.ocpp = None
        if listeners is not None:
            listeners.remove(server.bridge.document_changed)


__all__ = [
    "DEFAULT_PORT",
    "VERSIONS",
    "AuthStatus",
    "ChargerContext",
    "ChargerNotConnected",
    "ChargerState",
    "CommandError",
    "HeldMessages",
    "OcppBridge",
    "OcppHandler",
    "OcppServer",
    "RateLimit",
    "RemoteCommands",
    "Reading",
    "StartResult",
    "V16Commands",
    "V201Commands",
    "content_key",
    "derive_transaction_id",
    "install_remote_commands",
    "open_server",
    "register_version",
    "remote_command_routes",
    "serve_ocpp",
    "tls_context",
]
