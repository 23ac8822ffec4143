"""`meshnode`: the command line of the mesh node."""

from __future__ import annotations

import argparse
import sys

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshnode",
        description="Offline-first mesh node for EV chargers: records charging sessions as signed "
        "Automerge documents and replicates them to its neighbours.",
    )
    parser.add_argument("--version", action="version", version=f"meshnode {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the demonstration end to end and print the converged sessions")
    demo.add_argument("--replicas", type=int, default=3, help="number of replicas (default 3)")
    demo.add_argument("--sessions", type=int, default=4, help="sessions started on each replica (default 4)")
    demo.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "demo":
        from ._replica_demo import run_replica_demo

        if args.replicas < 2 or args.sessions < 1:
            parser.error("--replicas must be at least 2 and --sessions at least 1")
        return 0 if run_replica_demo(replicas=args.replicas, sessions=args.sessions, seed=args.seed) else 1
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
