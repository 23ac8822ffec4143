"""`meshsim`: run simulation scenarios (the simulator itself arrives with its own issue)."""

from __future__ import annotations

import argparse
import sys

from meshnode import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshsim",
        description="Simulate many meshnode nodes on a simulated network, reproducibly.",
    )
    parser.add_argument("--version", action="version", version=f"meshsim {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        print("\nmeshsim has no commands yet: the simulation harness is not built.", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
