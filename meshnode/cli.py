"""`meshnode`: the command line of the mesh node.

meshnode run [--config FILE] [--node-id ID] [--data-dir DIR] [--bind ADDRESS]
             [--coap-port N] [--http-port N] [--peer HOST:PORT ...] [--no-mdns]
meshnode status [--http URL] [--json]
meshnode cloud [migrate] [--db URL] [--bind ADDRESS] [--port N]
meshnode demo [--nodes N] [--duration SECONDS] [--json] [--seed N] [--chargers N] [--keep] ...
meshnode replica-demo [--replicas N] [--sessions N] [--seed N]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from . import __version__

RUN_DEFAULTS: dict[str, Any] = {
    "node_id": None,
    "data_dir": "meshnode-data",
    "bind": "127.0.0.1",
    "coap_port": 5683,
    "http_port": 8080,
    "ocpp_port": 9000,
    "ocpp_certfile": None,
    "ocpp_keyfile": None,
    "peer": [],
    "no_mdns": False,
    "site": "default",
    "log_level": "info",
    "log_format": "text",
    "cloud_url": None,
    "retention": 3600.0,
    "probe_interval": 5.0,
    "insecure": False,
    "unknown_token_policy": "accept_limited",
    "unknown_token_max_wh": None,
    "unknown_token_max_minutes": None,
    "max_power_kw": 350.0,
    "connector_max_power_kw": {},
}


def _arguments_when_parsed(parser: argparse.ArgumentParser, module: str) -> None:
    """Have `module`'s ``add_arguments(parser)`` add a subcommand's flags just before `parser`
    parses (argparse gives a subcommand's arguments to its parser's ``parse_known_args``)."""
    parse = parser.parse_known_args

    def parse_known_args(args: Any = None, namespace: Any = None) -> Any:
        del parser.parse_known_args  # once: the flags are there from now on
        importlib.import_module(module, __package__).add_arguments(parser)
        return parse(args, namespace)

    parser.parse_known_args = parse_known_args  # type: ignore[method-assign]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshnode",
        description="Offline-first mesh node for EV chargers: records charging sessions as signed "
        "Automerge documents and replicates them to its neighbours over CoAP.",
    )
    parser.add_argument("--version", action="version", version=f"meshnode {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a mesh node",
        description="Run a mesh node until SIGINT or SIGTERM. Flags override the --config file "
        '(TOML, same names without the dashes, e.g. coap_port = 5683, peer = ["10.0.0.2:5683"]).',
    )
    run.add_argument("--config", metavar="FILE", help="TOML file with the settings below")
    run.add_argument("--node-id", help="this node's id (default: kept in the data dir, made up on first start)")
    run.add_argument("--data-dir", help="where the store and the node key live (default ./meshnode-data)")
    run.add_argument("--bind", metavar="ADDRESS", help="address for CoAP, mDNS and HTTP (default 127.0.0.1)")
    run.add_argument("--coap-port", type=int, help="CoAP UDP port (default 5683)")
    run.add_argument("--http-port", type=int, help="local HTTP API port (default 8080)")
    run.add_argument(
        "--ocpp-port",
        type=int,
        help="OCPP-J WebSocket port for chargers: ws://BIND:PORT/ocpp/ID (default 9000; 0 = off)",
    )
    run.add_argument(
        "--ocpp-certfile", metavar="FILE", help="TLS certificate: chargers connect with wss:// (Profile 2)"
    )
    run.add_argument("--ocpp-keyfile", metavar="FILE", help="its private key")
    run.add_argument(
        "--peer", action="append", metavar="HOST:PORT", help="a static peer, in addition to mDNS (repeatable)"
    )
    run.add_argument("--no-mdns", action="store_true", default=None, help="do not use mDNS; static peers only")
    run.add_argument(
        "--site-name",
        "--site",
        dest="site",
        metavar="NAME",
        help="site name written into new sessions of an --insecure node (default 'default'); an enrolled "
        "node takes it from its certificate. Not a folder: `enroll` and `cloud` take the site's folder",
    )
    run.add_argument(
        "--cloud-url",
        metavar="URL",
        help="the cloud reconciliation service (e.g. https://cloud.example:8700); a node without one never leads",
    )
    run.add_argument(
        "--retention",
        type=float,
        metavar="SECONDS",
        help="how long a reconciled session stays in active gossip (default 3600)",
    )
    run.add_argument(
        "--probe-interval",
        type=float,
        metavar="SECONDS",
        help="how often the uplink to the cloud is probed (default 5)",
    )
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")
    run.add_argument("--log-format", choices=["text", "json"], help="json: one JSON object per line (default text)")
    run.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="run without enrolment: mesh traffic unauthenticated and unencrypted (labs only)",
    )
    run.add_argument(
        "--unknown-token-policy",
        choices=["refuse", "accept_limited"],
        help="offline policy for an id token that is not on the site's lists "
        "(default accept_limited: start, with the limits below, flagged for review)",
    )
    run.add_argument("--unknown-token-max-wh", type=int, metavar="WH", help="energy cap for such sessions")
    run.add_argument("--unknown-token-max-minutes", type=int, metavar="MIN", help="time cap for such sessions")
    run.add_argument(
        "--max-power-kw",
        type=float,
        metavar="KW",
        help="the most a connector delivers (default 350); a meter reading that rises faster is refused "
        "and, from a peer, filed as a conflict, never billed. Per connector: connector_max_power_kw in --config",
    )

    site = sub.add_parser(
        "site",
        help="create and manage a site: keys, revocations, network key",
        description="Create and manage a site: its keys (site init), the cloud's public key (site cloud-key), "
        "revocations (site revoke) and the network key (site rotate-network-key). Runs where the site's "
        "folder with site.key is kept (offline).",
    )
    site_sub = site.add_subparsers(dest="site_command", metavar="SITE_COMMAND")
    site_init = site_sub.add_parser(
        "init",
        help="create a site: site key, network key (in --site DIR)",
        description="Create a site in --site DIR: site.key (keep it offline), site.pub, network.key, site.toml.",
    )
    site_init.add_argument("--site", default=".", metavar="DIR", help="where the site's files go (default .)")
    site_init.add_argument("--name", help="the site's name (default: the folder's name)")
    site_revoke = site_sub.add_parser(
        "revoke",
        help="revoke a node; the entry travels in the site config",
        description="Revoke a node (every certificate issued to it so far) or one certificate. The signed entry "
        "is kept in SITE/entries/ (a cloud given that folder follows it), printed in hex, and with --http "
        "handed to a node, from which it spreads through the mesh.",
    )
    site_revoke.add_argument("--site", default=".", metavar="DIR", help="the site's folder (default .)")
    who = site_revoke.add_mutually_exclusive_group(required=True)
    who.add_argument("--node-id", help="revoke every certificate of this node issued so far")
    who.add_argument("--serial", help="revoke one certificate")
    site_revoke.add_argument("--reason", default="", help="a note kept in the entry (e.g. 'stolen')")
    site_revoke.add_argument(
        "--http",
        metavar="URL",
        help="hand the entry to this node's API (it spreads from there), or to the cloud's (--token: its api.token)",
    )
    _add_token_options(site_revoke)
    site_rotate = site_sub.add_parser(
        "rotate-network-key",
        help="make a new network key and grant it to every node",
        description="Make a new network key and a grant that gives it to every enrolled node whose certificate "
        "is neither revoked nor expired; hand the grant to one node (--http) and it spreads.",
    )
    site_rotate.add_argument("--site", default=".", metavar="DIR", help="the site's folder (default .)")
    site_rotate.add_argument(
        "--activate-in", type=float, default=600.0, metavar="SECONDS", help="nodes seal with it from then (default 600)"
    )
    site_rotate.add_argument(
        "--retire-after",
        type=float,
        default=7 * 86400.0,
        metavar="SECONDS",
        help="the old keys stop opening this long after activation (default 7 days)",
    )
    site_rotate.add_argument("--http", metavar="URL", help="hand the grant to this node's API")
    _add_token_options(site_rotate)
    site_cloud = site_sub.add_parser(
        "cloud-key",
        help="put the cloud's public key into the site (SITE/cloud.pub), for enrolment",
        description="Write the cloud's public key into SITE/cloud.pub (32 raw bytes), so that `meshnode enroll` "
        "gives it to nodes, which then check driver tokens and id-token lists offline. Give the cloud's key "
        "file (--cloud-key), or the hex the cloud shows (GET /v1/issuer, or --issuer HEX).",
    )
    site_cloud.add_argument("--site", default=".", metavar="DIR", help="the site's folder (default .)")
    source = site_cloud.add_mutually_exclusive_group(required=True)
    source.add_argument("--cloud-key", metavar="FILE", help="the cloud's signing key file (meshnode cloud --key)")
    source.add_argument("--issuer", metavar="HEX", help="the cloud's public key in hex (GET CLOUD/v1/issuer)")
    from ._operator import add_tariff_arguments

    _add_token_options(add_tariff_arguments(site_sub))

    enroll = sub.add_parser(
        "enroll",
        help="enrol a node: its key and a certificate signed by the site key",
        description="Enrol a node: make (or keep) its device key in DIR, certify it with the site key, and give "
        "DIR what the node needs (node.cert, site.pub, network.key, cloud.pub if the site has it). Run it "
        "where the site's folder is; then copy DIR to the node. Enrolling again renews the certificate; a "
        "wiped node enrolled again gets a new key and a new event chain.",
    )
    enroll.add_argument("--node-id", required=True, help="the node's id (its name in the mesh)")
    enroll.add_argument("--data-dir", required=True, metavar="DIR", help="the node's data dir (made if missing)")
    enroll.add_argument("--site", default=".", metavar="DIR", help="the site's folder (default .)")
    enroll.add_argument(
        "--role",
        action="append",
        choices=["charger", "gateway", "operator"],
        help="roles in the certificate (default charger)",
    )
    enroll.add_argument("--valid-days", type=float, default=365.0, help="certificate validity (default 365)")

    token = sub.add_parser(
        "token",
        help="driver tokens and id-token list entries, signed with the cloud key",
        description="Driver tokens (token issue) and allowed/revoked id-token entries (token list), signed with "
        "the cloud's key; nodes check them offline with the site's cloud.pub.",
    )
    token_sub = token.add_subparsers(dest="token_command", metavar="TOKEN_COMMAND")
    issue = token_sub.add_parser(
        "issue",
        help="print a driver token a node can check offline",
        description="Print a driver token (mdt1....) for an id token, with optional limits; a charger passes it "
        'as "driver_token" in POST /v1/sessions.',
    )
    issue.add_argument("--cloud-key", required=True, metavar="FILE", help="the cloud's signing key file")
    issue.add_argument("--token-id", required=True, help="the driver's id token (RFID, app id)")
    issue.add_argument("--max-wh", type=int, help="energy limit of sessions started with it")
    issue.add_argument("--max-minutes", type=int, help="time limit of sessions started with it")
    issue.add_argument("--valid-days", type=float, default=30.0, help="validity (default 30)")
    listing = token_sub.add_parser(
        "list",
        help="allow or revoke an id token on the site's offline list",
        description="Sign an allowed (or, with --revoke, revoked) entry for an id token; with --http hand it to "
        "a node (its operator token is needed: --token or --data-dir), from which it spreads.",
    )
    listing.add_argument("--cloud-key", required=True, metavar="FILE", help="the cloud's signing key file")
    listing.add_argument("--token-id", required=True, help="the driver's id token")
    listing.add_argument("--revoke", action="store_true", help="revoke instead of allow")
    listing.add_argument("--http", metavar="URL", help="hand the entry to this node's API")
    _add_token_options(listing)

    charger = sub.add_parser("charger", help="register OCPP charge points on an enrolled site")
    charger_sub = charger.add_subparsers(dest="charger_command", metavar="COMMAND")
    charger_add = charger_sub.add_parser(
        "add", help="register a charge point; prints its password (HTTP Basic, user = the id) once"
    )
    charger_add.add_argument("--site", default=".", metavar="DIR", help="the site's folder, with site.key (default .)")
    charger_add.add_argument("--id", required=True, metavar="CP-ID", help="the charge point id (as in its OCPP URL)")
    charger_add.add_argument("--http", metavar="URL", help="hand the registration to this node's API")
    _add_token_options(charger_add)

    status = sub.add_parser(
        "status",
        help="show a node's status: peers, documents, sync state",
        description="Show a node's status from its HTTP API. An enrolled node wants a token: run this on the "
        "node's host with --data-dir (it reads api-read.token there), or pass --token.",
    )
    status.add_argument(
        "--http",
        default="http://127.0.0.1:8080",
        metavar="URL",
        help="the node's HTTP API (default http://127.0.0.1:8080)",
    )
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    _add_token_options(status)

    cloud = sub.add_parser(
        "cloud",
        help="run the reference cloud reconciliation service",
        description="Run the cloud reconciliation service: it receives the mesh's session documents from "
        "the elected leader, verifies and folds them, keeps a ledger with one row per session, and writes "
        "a signed receipt back into each completed session.",
    )
    cloud.add_argument(
        "action",
        nargs="?",
        choices=["serve", "migrate"],
        default="serve",
        help="serve (the default; it first brings the database schema to this release, which is safe with "
        "several instances starting at once), or migrate: only bring the schema up to date, then exit",
    )
    cloud.add_argument(
        "--db",
        default="sqlite:///cloud.db",
        metavar="URL",
        help="sqlite:///PATH (default sqlite:///cloud.db) or postgresql://USER@HOST/DB",
    )
    cloud.add_argument("--bind", default="127.0.0.1", metavar="ADDRESS", help="default 127.0.0.1")
    cloud.add_argument("--port", type=int, default=8700, help="default 8700")
    cloud.add_argument(
        "--key",
        metavar="FILE",
        help="the cloud's signing key (created on first start; default: next to the SQLite file, or ./cloud.key)",
    )
    cloud.add_argument("--certfile", metavar="FILE", help="TLS certificate (serve HTTPS)")
    cloud.add_argument("--keyfile", metavar="FILE", help="TLS private key")
    cloud.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default="info", help="default info"
    )
    cloud.add_argument("--log-format", choices=["text", "json"], default="text", help="json: one object per line")
    cloud.add_argument(
        "--ocpi-token",
        metavar="TOKEN",
        help="serve the OCPI 2.2.1 CPO export (cdrs, sessions, tariffs) under /ocpi to clients presenting this "
        "token (or set MESHNODE_OCPI_TOKEN, which stays out of the process list); without it the OCPI routes "
        "answer 404",
    )
    cloud.add_argument(
        "--site",
        metavar="DIR",
        help="the site's folder (site.pub, entries/; never site.key): sync only from its certified, unrevoked "
        "devices, bill only their events. Without it the cloud is open (labs): anyone may sync, and keys "
        "that devices declare are trusted on first use. With it every other route but the health probe, the "
        "issuer key and OCPI wants a token: api.token (read and write) or api-read.token (read only), kept "
        "beside the cloud's key (made on first start, 0600)",
    )

    demo = sub.add_parser(
        "demo",
        help="run a cloud and a mesh of nodes on this machine, cut the leader's uplink, report",
        description="Start the cloud service and a mesh of nodes on loopback, two of them with an uplink; "
        "simulated chargers start, meter and stop sessions on every node; midway the leader's uplink is cut so "
        "the other uplink node takes over. Ends with a report (sessions, ledger, duplicates, lost, conflicts, "
        "stop-to-receipt time, bytes, leader changes). Exit status 0 only when nothing was lost or duplicated.",
    )
    # The demo's module imports httpx (and the tools httpx brings: ~7 MB a node would hold for
    # nothing): its flags are added when `meshnode demo` is parsed, not for every command.
    _arguments_when_parsed(demo, "._demo")

    replica = sub.add_parser("replica-demo", help="three in-process replicas record sessions and converge by sync")
    replica.add_argument("--replicas", type=int, default=3, help="number of replicas (default 3)")
    replica.add_argument("--sessions", type=int, default=4, help="sessions started on each replica (default 4)")
    replica.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    return parser


def _add_token_options(parser: argparse.ArgumentParser) -> None:
    """--token / --data-dir: the credential for an enrolled node's API (docs/security.md)."""
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        help="the node's API token (default: $MESHNODE_API_TOKEN, else read from --data-dir)",
    )
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        default="meshnode-data",
        help="a node data dir on this host whose api.token to use (default ./meshnode-data)",
    )


def _api_headers(args: argparse.Namespace, *, write: bool) -> dict[str, str]:
    """The Authorization header for a node's API, from --token, $MESHNODE_API_TOKEN or the data dir."""
    from ._apiauth import read_token_file

    token = getattr(args, "token", None) or os.environ.get("MESHNODE_API_TOKEN")
    if not token and getattr(args, "data_dir", None):
        data_dir = Path(args.data_dir)
        token = read_token_file(data_dir, write=write) or read_token_file(data_dir, write=True)
    return {"Authorization": f"Bearer {token}"} if token else {}


class ConfigError(Exception):
    """The user's settings cannot be used; the message says what to change."""


def resolve_run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the TOML file, then flags, each checked against the settings'
    schema (`meshnode._config`). Raises ConfigError naming the bad key."""
    from ._config import SettingsError, check, normalise_file

    settings = dict(RUN_DEFAULTS)
    try:
        if args.config:
            try:
                with open(args.config, "rb") as f:
                    loaded = tomllib.load(f)
            except OSError as exc:
                raise ConfigError(f"cannot read --config {args.config}: {exc.strerror}") from exc
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"--config {args.config} is not valid TOML: {exc}") from exc
            settings.update(normalise_file(loaded, f"--config {args.config}"))
        flags = {key: getattr(args, key) for key in RUN_DEFAULTS if getattr(args, key, None) is not None}
        check({**RUN_DEFAULTS, **flags}, "command line", flag_names=True)
        settings.update(flags)
    except SettingsError as exc:
        raise ConfigError(str(exc)) from exc
    if (settings["ocpp_certfile"] is None) != (settings["ocpp_keyfile"] is None):
        raise ConfigError("ocpp-certfile and ocpp-keyfile go together")
    from ._discovery import parse_peer_address

    try:
        settings["peer"] = [parse_peer_address(p) for p in settings["peer"]]
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return settings


def node_id_for(data_dir: Path, requested: str | None) -> str:
    """The node id: the one kept in the data dir, else as requested, else a new one; kept
    in the data dir from its first start on (a restart without --node-id keeps the name).

    Raises:
        ConfigError: --node-id differs from the id this data dir belongs to.
    """
    path = data_dir / "node_id"
    kept = path.read_text().strip() if path.exists() else None
    if kept and requested and requested != kept:
        raise ConfigError(
            f"--node-id {requested!r} does not match {data_dir}, which belongs to node {kept!r}: "
            "drop --node-id, or use another --data-dir for another node"
        )
    if kept:
        return kept
    node_id = requested or f"node-{secrets.token_hex(3)}"
    data_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(node_id + "\n")
    return node_id


async def run_node(settings: dict[str, Any]) -> None:
    """Run one node with CoAP, mDNS/static discovery and the HTTP API until a signal."""
    import trio
    import trio_asyncio

    from ._api import serve_api
    from ._coap import open_coap_transport
    from ._discovery import StaticDiscovery
    from ._node import Node, NodeConfig

    from ._security import Identity, SealedTransport, Sealer

    data_dir = Path(settings["data_dir"])
    identity = Identity.load(data_dir, node_id=settings["node_id"], now=time.time())
    if identity is None:
        if not settings["insecure"]:
            raise ConfigError(
                f"{data_dir} is not enrolled. Enrol it: meshnode enroll --node-id ID --data-dir {data_dir} "
                "--site SITE_DIR (after meshnode site init --site SITE_DIR), or run with --insecure (labs only)"
            )
        node_id = node_id_for(data_dir, settings["node_id"])
        logging.getLogger("meshnode").warning(
            "INSECURE: node %s runs without enrolment: mesh traffic is neither authenticated nor encrypted, "
            "and anyone on the network can read and write sessions",
            node_id,
        )
    else:
        node_id = identity.node_id
        settings["site"] = identity.site_name
    from ._apiauth import ApiTokens

    # An enrolled node's API takes tokens (kept in the data dir, 0600); an --insecure one is open.
    tokens = ApiTokens.load_or_create(data_dir) if identity is not None else None
    if tokens is None:
        logging.getLogger("meshnode").warning(
            "INSECURE: the HTTP API on %s:%s is open: anyone who reaches it can read and write sessions",
            settings["bind"],
            settings["http_port"],
        )
    async with trio_asyncio.open_loop():
        async with open_coap_transport(settings["bind"], settings["coap_port"]) as coap:
            sealer = None
            transport: Any = coap
            if identity is not None:
                sealer = Sealer(identity, identity.site_public_key, identity.network_key, started=time.time())
                transport = SealedTransport(coap, sealer)
            discoveries: list[Any] = []
            if settings["peer"]:
                discoveries.append(StaticDiscovery(settings["peer"]))
            if not settings["no_mdns"]:
                from ._mdns import MdnsDiscovery

                discoveries.append(MdnsDiscovery(node_id, settings["bind"], settings["coap_port"], {}))
            node = Node(
                NodeConfig(
                    node_id=node_id,
                    data_dir=data_dir,
                    site=settings["site"],
                    cloud_url=settings["cloud_url"],
                    retention=float(settings["retention"]),
                    probe_interval=float(settings["probe_interval"]),
                    unknown_token_policy=settings["unknown_token_policy"],
                    unknown_token_max_wh=settings["unknown_token_max_wh"],
                    unknown_token_max_minutes=settings["unknown_token_max_minutes"],
                ),
                transport=transport,
                discovery=discoveries,
                identity=identity,
                sealer=sealer,
            )
            if identity is not None:
                from ._sitetrust import read_chain_base

                node.chain_base = read_chain_base(data_dir)
            node.sessions.max_power_w = round(settings["max_power_kw"] * 1000)
            node.sessions.connector_max_power_w = {
                int(c): round(kw * 1000) for c, kw in settings["connector_max_power_kw"].items()
            }
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
                    await nursery.start(node.serve)
                    await nursery.start(
                        functools.partial(serve_api, tokens=tokens), node, settings["bind"], settings["http_port"]
                    )
                    ocpp_url = None
                    if settings["ocpp_port"]:
                        from .ocpp import serve_ocpp, tls_context

                        tls = None
                        if settings["ocpp_certfile"]:
                            tls = tls_context(settings["ocpp_certfile"], settings["ocpp_keyfile"])
                        ocpp = await nursery.start(
                            functools.partial(serve_ocpp, ssl_context=tls),
                            node, settings["bind"], settings["ocpp_port"],
                        )  # fmt: skip
                        ocpp_url = ocpp.url
                    print(
                        json.dumps(
                            {
                                "ready": True,
                                "node_id": node_id,
                                "coap": transport.address,
                                "http": f"http://{settings['bind']}:{settings['http_port']}",
                                "ocpp": ocpp_url,
                                "mdns": not settings["no_mdns"],
                                "peers": settings["peer"],
                                "enrolled": identity is not None,
                                "api": "token" if tokens is not None else "open",
                                **({} if tokens is not None else {"insecure": True}),
                            }
                        ),
                        flush=True,
                    )
                    async for signum in signals:
                        logging.getLogger("meshnode").info("signal %d: stopping", signum)
                        nursery.cancel_scope.cancel()
                        break


def _hand_to_node(url: str | None, entry: bytes, headers: dict[str, str] | None = None) -> int:
    """Print an entry (hex), and hand it to a node's API when asked."""
    print(entry.hex())
    if url is None:
        print(
            'hand it to any node: curl -XPOST URL/v1/site/entries -d \'{"entry": "HEX"}\' '
            "(or pass --http URL); it spreads through the mesh",
            file=sys.stderr,
        )
        return 0
    import httpx

    try:
        response = httpx.post(
            url.rstrip("/") + "/v1/site/entries", json={"entry": entry.hex()}, headers=headers, timeout=10.0
        )
    except httpx.HTTPError as exc:
        print(f"cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    if response.status_code != 201:
        print(f"{url} refused the entry: {response.text}", file=sys.stderr)
        return 1
    print(f"handed to {url}: {response.json()}", file=sys.stderr)
    return 0


def _site_cloud_key(args: argparse.Namespace) -> int:
    """`meshnode site cloud-key`: SITE/cloud.pub (32 raw bytes) from the cloud's key file or its hex."""
    from . import _security as sec

    site = sec.load_site(Path(args.site))
    if args.cloud_key:
        from uplink import CloudKeyError, load_or_create_cloud_key

        if not Path(args.cloud_key).exists():
            raise sec.LocalSecurityError(f"no cloud key at {args.cloud_key}: it is created by meshnode cloud")
        try:
            public = bytes(load_or_create_cloud_key(args.cloud_key).verify_key)
        except CloudKeyError as exc:
            raise sec.LocalSecurityError(str(exc)) from exc
    else:
        try:
            public = bytes.fromhex(args.issuer.strip())
        except ValueError as exc:
            raise sec.LocalSecurityError("--issuer must be the cloud's public key in hex (64 characters)") from exc
        if len(public) != 32:
            raise sec.LocalSecurityError(f"--issuer must be 32 bytes (64 hex characters), got {len(public)} bytes")
    assert site.path is not None
    sec._write_file(site.path / sec.CLOUD_PUB, public, secret=False)
    print(f"wrote {site.path / sec.CLOUD_PUB} (cloud {public.hex()}); nodes enrolled from now on get it")
    return 0


def run_security_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`meshnode site ...`, `meshnode enroll`, `meshnode token ...`."""
    import nacl.signing

    from . import _security as sec

    now = time.time()
    if args.command == "enroll":
        from ._sitetrust import chain_base_at_enrolment, write_chain_base

        fresh = not Path(args.data_dir).exists()
        try:
            path = sec.enroll(
                Path(args.site),
                args.node_id,
                Path(args.data_dir),
                roles=tuple(args.role or ["charger"]),
                valid_for=args.valid_days * 86400,
                now=now,
            )
        except BaseException:
            if fresh and Path(args.data_dir).exists():
                shutil.rmtree(args.data_dir)  # a failed enrolment leaves no half-written data dir
            raise
        from ._apiauth import ApiTokens

        ApiTokens.load_or_create(Path(args.data_dir))  # api.token, api-read.token (0600): known before the box ships
        node_key = sec.load_or_create_node_key(Path(args.data_dir))
        base = chain_base_at_enrolment(Path(args.site), args.node_id, bytes(node_key.verify_key))
        if base:
            write_chain_base(Path(args.data_dir), base)
            print(f"{args.node_id} had another key before (a wiped node?): its new events start a new chain")
        print(
            f"enrolled {args.node_id} in {args.data_dir} (certificate {path}); "
            f"start it with: meshnode run --data-dir {args.data_dir}"
        )
        return 0
    if args.command == "site":
        if args.site_command == "init":
            site_dir = Path(args.site)
            site = sec.create_site(site_dir, args.name or site_dir.resolve().name, now=now)
            print(
                f"site {site.name!r} created in {site_dir}: keep site.key offline; "
                f"enrol nodes with: meshnode enroll --node-id ID --data-dir DIR --site {site_dir}"
            )
            return 0
        if args.site_command == "revoke":
            _, entry = sec.site_revoke(
                Path(args.site), node_id=args.node_id, serial=args.serial, now=now, reason=args.reason
            )
            return _hand_to_node(args.http, entry, _api_headers(args, write=True))
        if args.site_command == "cloud-key":
            return _site_cloud_key(args)
        if args.site_command == "tariff":
            from ._operator import make_tariff

            return _hand_to_node(args.http, make_tariff(args, now), _api_headers(args, write=True))
        if args.site_command == "rotate-network-key":
            _, grant = sec.site_rotate_network_key(
                Path(args.site), now=now, activate_in=args.activate_in, retire_previous_after=args.retire_after
            )
            return _hand_to_node(args.http, grant, _api_headers(args, write=True))
        parser.parse_args(["site", "--help"])
        return 2
    if args.command == "charger":
        if args.charger_command != "add":
            parser.parse_args(["charger", "--help"])
            return 2
        from .services.chargers import charger_entry, new_password

        password = new_password()
        entry = charger_entry(sec.load_site(Path(args.site)), args.id, password, now)
        print(f"password {password}")
        print(
            f"charge point {args.id}: set this password in the charger (OCPP Security Profile 1, HTTP Basic, "
            "user = the id); it is shown only now, the site config keeps a hash",
            file=sys.stderr,
        )
        return _hand_to_node(args.http, entry, _api_headers(args, write=True))
    if args.command == "token":
        if args.token_command not in ("issue", "list"):
            parser.parse_args(["token", "--help"])
            return 2
        from uplink import load_or_create_cloud_key

        if not Path(args.cloud_key).exists():
            raise sec.LocalSecurityError(f"no cloud key at {args.cloud_key}: it is created by meshnode cloud")
        key: nacl.signing.SigningKey = load_or_create_cloud_key(args.cloud_key)
        if args.token_command == "issue":
            print(
                sec.issue_driver_token(
                    key,
                    args.token_id,
                    max_wh=args.max_wh,
                    max_minutes=args.max_minutes,
                    not_after=now + args.valid_days * 86400,
                )
            )
            return 0
        entry = sec.signed_token_list_entry(key, args.token_id, not args.revoke, now)
        return _hand_to_node(args.http, entry, _api_headers(args, write=True))
    return 2


def run_cloud(args: argparse.Namespace) -> int:
    """`meshnode cloud`: serve until SIGINT/SIGTERM."""
    import trio

    from uplink import LedgerError, serve_cloud

    if args.db.lower().startswith("postgres") and importlib.util.find_spec("psycopg") is None:
        print("meshnode cloud: a PostgreSQL ledger needs psycopg: pip install 'meshnode[cloud]'", file=sys.stderr)
        return 1
    from uplink import OperatorConfig

    _setup_logging(args.log_level, args.log_format)
    if args.action == "migrate":
        return _cloud_migrate(args.db)
    trust: dict[str, Any] = {}
    site_keys: dict[str, list[bytes]] = {}
    if args.site:
        from ._security import read_site_name
        from ._sitetrust import SiteTrust

        # Only certified, unrevoked devices of the site may sync, and only their events count.
        site_trust = SiteTrust(Path(args.site))
        site_keys[read_site_name(Path(args.site))] = [site_trust.public_key]  # site tariffs verify with it
        trust = {
            "certify": site_trust.certify,
            "authenticate": site_trust.authenticate,
            "site_entry": site_trust.add_entry,
            "trust_document_keys": False,
        }
        # A cloud that serves a site wants the operator's token on its reads and writes (uplink/_cloudauth.py).
        from uplink import default_key_path, load_cloud_tokens

        trust["api_tokens"] = load_cloud_tokens(args.key or default_key_path(args.db))

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                urls = await nursery.start(
                    functools.partial(
                        serve_cloud,
                        args.db,
                        args.bind,
                        args.port,
                        key_path=args.key,
                        certfile=args.certfile,
                        keyfile=args.keyfile,
                        operator=OperatorConfig(
                            site_keys=site_keys, ocpi_token=args.ocpi_token or os.environ.get("MESHNODE_OCPI_TOKEN")
                        ),
                        **trust,
                    )
                )
                ready = {"ready": True, "urls": urls, "db": redact(args.db), "site": args.site}
                ready["api"] = "token" if args.site else "open"
                if args.site:
                    from uplink import cloud_token_dir, default_key_path

                    ready["tokens"] = str(cloud_token_dir(args.key or default_key_path(args.db)))
                else:
                    ready["insecure"] = (
                        "no --site: any client may sync and read the ledger, device keys are trusted on first use"
                    )
                print(json.dumps(ready), flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except (OSError, LedgerError) as exc:
        print(f"meshnode cloud: {_one_line(exc)}", file=sys.stderr)
        return 1
    return 0


def _cloud_migrate(db: str) -> int:
    """`meshnode cloud migrate`: bring the ledger's schema to this release (alembic), print what was done."""
    from uplink import Ledger, LedgerError

    try:
        ledger = Ledger(db)
    except LedgerError as exc:
        print(f"meshnode cloud migrate: {_one_line(exc)}", file=sys.stderr)
        return 1
    ledger.close()
    print(json.dumps({"db": redact(db), "from": ledger.schema.before, "to": ledger.schema.after}), flush=True)
    return 0


def show_status(url: str, as_json: bool, headers: dict[str, str] | None = None) -> int:
    import httpx

    try:
        response = httpx.get(url.rstrip("/") + "/v1/status", headers=headers, timeout=5.0)
        if response.status_code == 401:
            print(
                f"meshnode status: {url} wants a token: run on the node's host with --data-dir DIR "
                "(it reads DIR/api-read.token), or pass --token TOKEN",
                file=sys.stderr,
            )
            return 1
        response.raise_for_status()
        status = response.json()
    except httpx.HTTPError as exc:
        print(
            f"meshnode status: cannot read {url}/v1/status: {exc}. Is the node running "
            "(meshnode run), and is --http its API address?",
            file=sys.stderr,
        )
        return 1
    if as_json:
        print(json.dumps(status, indent=2))
        return 0
    print(
        f"node {status['node_id']}  documents {status['documents']}  "
        f"not everywhere {status['documents_not_everywhere']}  sync {status['sync_state']}"
    )
    print(
        f"leader {status.get('leader') or '-'}  uplink score {status.get('uplink_score', 0)}  "
        f"cloud {status.get('cloud_url') or '-'}"
    )
    if status.get("security", {}).get("api") == "open":
        print("INSECURE: this node is not enrolled; its mesh traffic and its HTTP API are open to anyone")
    fwd = status.get("forwarder")
    if fwd:
        print(
            f"forwarder: {fwd['batches']} batches, {fwd['bytes_sent']} bytes sent, "
            f"{fwd['failures']} failures, {fwd['documents_waiting']} documents waiting"
        )
    chargers = status.get("chargers")
    if chargers:
        print(f"{'charger':<20} {'ocpp':<10} {'state':<13} connectors")
        for c in chargers:
            conns = " ".join(f"{k}:{v['status']}" for k, v in sorted(c["connectors"].items()))
            state = "connected" if c["connected"] else "disconnected"
            print(f"{c['charger_id']:<20} {c['version'].removeprefix('ocpp'):<10} {state:<13} {conns or '-'}")
    peers = status.get("peers", [])
    if not peers:
        print("no peers known yet")
        return 0
    print(f"{'peer':<20} {'address':<22} {'state':<8} {'uplink':>6} {'last seen':>9}")
    for p in peers:
        mark = " (leader)" if p["node_id"] == status.get("leader") else ""
        print(
            f"{p['node_id']:<20} {p['address']:<22} {p['state']:<8} {p.get('uplink_score', 0):>6} "
            f"{p['last_seen_s']:>8.1f}s{mark}"
        )
    return 0


_SECRET_PATTERNS = (
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^:/@\s]*:)[^@\s]*@"), r"\1***@"),  # scheme://user:PASSWORD@
    (re.compile(r"(\bpassword\s*=\s*)\S+", re.IGNORECASE), r"\1***"),  # libpq key=value strings
    (re.compile(r"(\bBearer\s+)\S+"), r"\1***"),
    (re.compile(r"(\baccess_token=)[^&\s]+"), r"\1***"),
)


def redact(text: str) -> str:
    """`text` with passwords in URLs and connection strings, and API tokens, replaced by ***."""
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class _RedactingFormatter(logging.Formatter):
    """Log lines (tracebacks included) never carry a password or a token: wraps the format's own
    formatter (text or JSON) and redacts what it writes."""

    def __init__(self, inner: logging.Formatter | None) -> None:
        super().__init__()
        self._inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return redact(self._inner.format(record))


def _setup_logging(level: str, log_format: str = "text") -> None:
    """Text or JSON lines on stderr (`--log-format`), never carrying a password or a token."""
    from ._operator import setup_logging

    setup_logging(level, log_format)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_RedactingFormatter(handler.formatter))
    if level.lower() != "debug":
        # httpx logs every request at INFO: an uplink probe every 5 s is 720 lines an hour.
        logging.getLogger("httpx").setLevel(logging.WARNING)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, as trio's nurseries raise them."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _user_error(exc: BaseException) -> BaseException | None:
    """The error to show in one line when `exc` is one a user can fix (a port in use, a bad
    address or URL, an unreachable database, a missing site...), else None (a bug: traceback)."""
    from ._apiauth import TokenFileError
    from ._security import LocalSecurityError

    expected: list[type[BaseException]] = [OSError, ConfigError, LocalSecurityError, TokenFileError]
    for module, names in (("uplink._ledger", ("LedgerError",)), ("uplink._cloud", ("CloudKeyError",))):
        loaded = sys.modules.get(module)
        expected += [getattr(loaded, n) for n in names if loaded is not None]
    node = sys.modules.get("meshnode._node")
    if node is not None:
        expected.append(node.NodeError)
    leaves = [leaf for leaf in _leaves(exc) if not isinstance(leaf, KeyboardInterrupt)]
    # A wrapper raised "from" an OSError (a transport that cannot bind) is the OSError's story.
    wanted = [leaf for leaf in leaves if isinstance(leaf, tuple(expected)) or isinstance(leaf.__cause__, OSError)]
    return wanted[0] if wanted and len(wanted) == len(leaves) else None


_HINTS = {
    98: "another process (another meshnode?) listens there: pick another port, or stop it",
    99: "that address is not one of this host's: check --bind",
}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    errno = getattr(exc, "errno", None)
    if isinstance(exc, OSError) and errno in _HINTS:
        text = f"{text} ({_HINTS[errno]})"
    return redact(text)


def main(argv: list[str] | None = None) -> int:
    """The `meshnode` command. A start-up error a user can fix ends as one line on stderr
    (exit 2 for settings, 1 otherwise), however deep in trio's task groups it was raised."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _dispatch(parser, args)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        shown = _user_error(exc)
        if shown is None:
            raise
        name = " ".join(x for x in (args.command, getattr(args, "site_command", None)) if x)
        print(f"meshnode {name}: {_one_line(shown)}", file=sys.stderr)
        return 2 if isinstance(shown, ConfigError) else 1


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "run":
        settings = resolve_run_settings(args)
        _setup_logging(settings["log_level"], settings["log_format"])
        import trio

        trio.run(run_node, settings)  # errors a user can fix end as one line (main)
        return 0
    if args.command in ("site", "enroll", "token", "charger"):
        return run_security_command(parser, args)  # LocalSecurityError: one line (main)
    if args.command == "cloud":
        return run_cloud(args)
    if args.command == "status":
        return show_status(args.http, args.json, _api_headers(args, write=False))
    if args.command == "demo":
        from ._demo import run_from_args

        return run_from_args(args)
    if args.command == "replica-demo":
        from ._replica_demo import run_replica_demo

        if args.replicas < 2 or args.sessions < 1:
            parser.error("--replicas must be at least 2 and --sessions at least 1")
        return 0 if run_replica_demo(replicas=args.replicas, sessions=args.sessions, seed=args.seed) else 1
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
