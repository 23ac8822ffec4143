"""Install files for running a node as a systemd service (docs/service.md).

    python -m meshnode.service unit       the unit, ExecStart pointing at this install's `meshnode`
    python -m meshnode.service sysusers   the sysusers.d entry for the dedicated `meshnode` user
    python -m meshnode.service config     an example /etc/meshnode/meshnode.toml

The files ship inside the package (`meshnode/data/`), so a node installed from the wheel has
them without the source tree.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib import resources
from pathlib import Path

UNIT_EXEC = "/opt/meshnode/bin/meshnode"
"""The `meshnode` path written in the packaged unit; `unit()` replaces it with the real one."""

FILES = {"unit": "meshnode.service", "sysusers": "meshnode.sysusers", "config": "meshnode.toml"}


def packaged(name: str) -> str:
    """The text of a packaged file: one of FILES' values."""
    return resources.files("meshnode.data").joinpath(name).read_text(encoding="utf-8")


def meshnode_executable() -> str:
    """The `meshnode` script of the running install (beside this Python), else the one on PATH."""
    beside = Path(sys.executable).parent / "meshnode"
    if beside.exists():
        return str(beside)
    found = shutil.which("meshnode")
    if found is None:
        raise SystemExit("no `meshnode` executable beside this Python or on PATH: install the package first")
    return found


def unit(executable: str | None = None) -> str:
    """The service unit, its ExecStart naming `executable` (default: this install's `meshnode`)."""
    path = executable or meshnode_executable()
    if any(ch.isspace() for ch in path):
        raise SystemExit(f"the meshnode path {path!r} contains whitespace; install it under a plain path")
    return packaged(FILES["unit"]).replace(UNIT_EXEC, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meshnode.service",
        description="Print a file for installing the node as a systemd service (docs/service.md).",
    )
    parser.add_argument("file", choices=sorted(FILES), help="unit, sysusers entry, or example config")
    parser.add_argument("--exec", dest="executable", help="the meshnode path for ExecStart (default: this install's)")
    args = parser.parse_args(argv)
    text = unit(args.executable) if args.file == "unit" else packaged(FILES[args.file])
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
