"""`meshnode`: the command line of the mesh node.

    meshnode run [--config FILE] [--node-id ID] [--data-dir DIR] [--bind ADDRESS]
                 [--coap-port N] [--http-port N] [--peer HOST:PORT ...] [--no-mdns]
    meshnode status [--http URL] [--json]
    meshnode cloud [--db URL] [--bind ADDRESS] [--port N]
    meshnode demo [--nodes N] [--duration SECONDS] [--json] [--seed N] [--chargers N] [--keep] ...
    meshnode replica-demo [--replicas N] [--sessions N] [--seed N]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import secrets
import signal
import sys
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
    "peer": [],
    "no_mdns": False,
    "site": "default",
    "log_level": "info",
    "cloud_url": None,
    "retention": 3600.0,
    "probe_interval": 5.0,
}


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
        "(TOML, same names without the dashes, e.g. coap_port = 5683, peer = [\"10.0.0.2:5683\"]).",
    )
    run.add_argument("--config", metavar="FILE", help="TOML file with the settings below")
    run.add_argument("--node-id", help="this node's id (default: kept in the data dir, made up on first start)")
    run.add_argument("--data-dir", help="where the store and the node key live (default ./meshnode-data)")
    run.add_argument("--bind", metavar="ADDRESS", help="address for CoAP, mDNS and HTTP (default 127.0.0.1)")
    run.add_argument("--coap-port", type=int, help="CoAP UDP port (default 5683)")
    run.add_argument("--http-port", type=int, help="local HTTP API port (default 8080)")
    run.add_argument("--peer", action="append", metavar="HOST:PORT",
                     help="a static peer, in addition to mDNS (repeatable)")
    run.add_argument("--no-mdns", action="store_true", default=None, help="do not use mDNS; static peers only")
    run.add_argument("--site", help="site name written into new sessions (default 'default')")
    run.add_argument("--cloud-url", metavar="URL",
                     help="the cloud reconciliation service (e.g. https://cloud.example:8700); "
                     "a node without one never leads")
    run.add_argument("--retention", type=float, metavar="SECONDS",
                     help="how long a reconciled session stays in active gossip (default 3600)")
    run.add_argument("--probe-interval", type=float, metavar="SECONDS",
                     help="how often the uplink to the cloud is probed (default 5)")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="default info")

    status = sub.add_parser("status", help="show a node's status: peers, documents, sync state")
    status.add_argument("--http", default="http://127.0.0.1:8080", metavar="URL",
                        help="the node's HTTP API (default http://127.0.0.1:8080)")
    status.add_argument("--json", action="store_true", help="print the raw JSON")

    cloud = sub.add_parser(
        "cloud",
        help="run the reference cloud reconciliation service",
        description="Run the cloud reconciliation service: it receives the mesh's session documents from "
        "the elected leader, verifies and folds them, keeps a ledger with one row per session, and writes "
        "a signed receipt back into each completed session.",
    )
    cloud.add_argument("--db", default="sqlite:///cloud.db", metavar="URL",
                       help="sqlite:///PATH (default sqlite:///cloud.db) or postgresql://USER@HOST/DB")
    cloud.add_argument("--bind", default="127.0.0.1", metavar="ADDRESS", help="default 127.0.0.1")
    cloud.add_argument("--port", type=int, default=8700, help="default 8700")
    cloud.add_argument("--key", metavar="FILE", help="the cloud's signing key (created on first start; "
                       "default: next to the SQLite file, or ./cloud.key)")
    cloud.add_argument("--certfile", metavar="FILE", help="TLS certificate (serve HTTPS)")
    cloud.add_argument("--keyfile", metavar="FILE", help="TLS private key")
    cloud.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")

    demo = sub.add_parser(
        "demo",
        help="run a cloud and a mesh of nodes on this machine, cut the leader's uplink, report",
        description="Start the cloud service and a mesh of nodes on loopback, two of them with an uplink; "
        "simulated chargers start, meter and stop sessions on every node; midway the leader's uplink is cut so "
        "the other uplink node takes over. Ends with a report (sessions, ledger, duplicates, lost, conflicts, "
        "stop-to-receipt time, bytes, leader changes). Exit status 0 only when nothing was lost or duplicated.",
    )
    from ._demo import add_arguments as add_demo_arguments

    add_demo_arguments(demo)

    replica = sub.add_parser("replica-demo", help="three in-process replicas record sessions and converge by sync")
    replica.add_argument("--replicas", type=int, default=3, help="number of replicas (default 3)")
    replica.add_argument("--sessions", type=int, default=4, help="sessions started on each replica (default 4)")
    replica.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    return parser


class ConfigError(Exception):
    """The user's settings cannot be used; the message says what to change."""


def resolve_run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the TOML file, then flags. Raises ConfigError."""
    settings = dict(RUN_DEFAULTS)
    if args.config:
        try:
            with open(args.config, "rb") as f:
                loaded = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read --config {args.config}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"--config {args.config} is not valid TOML: {exc}") from exc
        if "peers" in loaded and "peer" not in loaded:
            loaded["peer"] = loaded.pop("peers")
        if "mdns" in loaded:
            loaded["no_mdns"] = not loaded.pop("mdns")
        unknown = sorted(set(loaded) - set(RUN_DEFAULTS))
        if unknown:
            raise ConfigError(f"--config {args.config}: unknown settings {unknown}; known: {sorted(RUN_DEFAULTS)}")
        settings.update(loaded)
    for key in RUN_DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    for key in ("coap_port", "http_port"):
        if not isinstance(settings[key], int) or not 0 < settings[key] < 65536:
            raise ConfigError(f"{key.replace('_', '-')} must be a port number from 1 to 65535")
    for key in ("retention", "probe_interval"):
        if not isinstance(settings[key], int | float) or settings[key] <= 0:
            raise ConfigError(f"{key.replace('_', '-')} must be a positive number of seconds")
    url = settings["cloud_url"]
    if url is not None and (not isinstance(url, str) or not url.startswith(("http://", "https://"))):
        raise ConfigError(f"cloud-url must be an http:// or https:// URL, got {url!r}")
    if isinstance(settings["peer"], str):
        settings["peer"] = [settings["peer"]]
    from ._discovery import parse_peer_address

    try:
        settings["peer"] = [parse_peer_address(p) for p in settings["peer"]]
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return settings


def node_id_for(data_dir: Path, requested: str | None) -> str:
    """The node id: as requested, else the one kept in the data dir, else a new one."""
    path = data_dir / "node_id"
    if requested:
        return requested
    if path.exists():
        return path.read_text().strip()
    node_id = f"node-{secrets.token_hex(3)}"
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

    data_dir = Path(settings["data_dir"])
    node_id = node_id_for(data_dir, settings["node_id"])
    async with trio_asyncio.open_loop():
        async with open_coap_transport(settings["bind"], settings["coap_port"]) as transport:
            discoveries: list[Any] = []
            if settings["peer"]:
                discoveries.append(StaticDiscovery(settings["peer"]))
            if not settings["no_mdns"]:
                from ._mdns import MdnsDiscovery

                discoveries.append(MdnsDiscovery(node_id, settings["bind"], settings["coap_port"], {}))
            node = Node(
                NodeConfig(node_id=node_id, data_dir=data_dir, site=settings["site"],
                           cloud_url=settings["cloud_url"], retention=float(settings["retention"]),
                           probe_interval=float(settings["probe_interval"])),
                transport=transport,
                discovery=discoveries,
            )
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async with trio.open_nursery() as nursery:
                    await nursery.start(node.serve)
                    await nursery.start(serve_api, node, settings["bind"], settings["http_port"])
                    print(json.dumps({
                        "ready": True, "node_id": node_id, "coap": transport.address,
                        "http": f"http://{settings['bind']}:{settings['http_port']}",
                        "mdns": not settings["no_mdns"], "peers": settings["peer"],
                    }), flush=True)
                    async for signum in signals:
                        logging.getLogger("meshnode").info("signal %d: stopping", signum)
                        nursery.cancel_scope.cancel()
                        break


def run_cloud(args: argparse.Namespace) -> int:
    """`meshnode cloud`: serve until SIGINT/SIGTERM."""
    import trio

    from uplink import LedgerError, serve_cloud

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)

    async def main() -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:
                urls = await nursery.start(functools.partial(
                    serve_cloud, args.db, args.bind, args.port, key_path=args.key,
                    certfile=args.certfile, keyfile=args.keyfile))
                print(json.dumps({"ready": True, "urls": urls, "db": args.db}), flush=True)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    try:
        trio.run(main)
    except (OSError, LedgerError) as exc:
        print(f"meshnode cloud: {exc}", file=sys.stderr)
        return 1
    return 0


def show_status(url: str, as_json: bool) -> int:
    import httpx

    try:
        response = httpx.get(url.rstrip("/") + "/v1/status", timeout=5.0)
        response.raise_for_status()
        status = response.json()
    except httpx.HTTPError as exc:
        print(f"meshnode status: cannot read {url}/v1/status: {exc}. Is the node running "
              "(meshnode run), and is --http its API address?", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(status, indent=2))
        return 0
    print(f"node {status['node_id']}  documents {status['documents']}  "
          f"not everywhere {status['documents_not_everywhere']}  sync {status['sync_state']}")
    print(f"leader {status.get('leader') or '-'}  uplink score {status.get('uplink_score', 0)}  "
          f"cloud {status.get('cloud_url') or '-'}")
    fwd = status.get("forwarder")
    if fwd:
        print(f"forwarder: {fwd['batches']} batches, {fwd['bytes_sent']} bytes sent, "
              f"{fwd['failures']} failures, {fwd['documents_waiting']} documents waiting")
    peers = status.get("peers", [])
    if not peers:
        print("no peers known yet")
        return 0
    print(f"{'peer':<20} {'address':<22} {'state':<8} {'uplink':>6} {'last seen':>9}")
    for p in peers:
        mark = " (leader)" if p["node_id"] == status.get("leader") else ""
        print(f"{p['node_id']:<20} {p['address']:<22} {p['state']:<8} {p.get('uplink_score', 0):>6} "
              f"{p['last_seen_s']:>8.1f}s{mark}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "run":
        try:
            settings = resolve_run_settings(args)
        except ConfigError as exc:
            parser.error(str(exc))
        logging.basicConfig(
            level=settings["log_level"].upper(),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        import trio

        try:
            trio.run(run_node, settings)
        except OSError as exc:
            print(f"meshnode run: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "cloud":
        return run_cloud(args)
    if args.command == "status":
        return show_status(args.http, args.json)
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
