"""A throwaway PostgreSQL server for tests: `pg_server` (session) and `pg_url` (a fresh database per test).

The server is a real one (Debian's `postgresql` package): initdb into a temporary
directory, started on a free port on 127.0.0.1 with trust authentication, stopped
and removed when the session ends. PostgreSQL refuses to run as root, so under
root (CI) the binaries run as the `postgres` user the package creates, through
`runuser`, in a directory owned by that user.

Missing binaries fail the tests with the fix (`apt-get install -y postgresql`):
the PostgreSQL back end is part of what `make test` checks, never skipped.

Use it from a test module with `from .pg import pg_server, pg_url  # noqa: F401`.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

INSTALL_HINT = "install the PostgreSQL server: `apt-get install -y postgresql` (Debian/Ubuntu)"


def find_pg_bin() -> Path:
    """The directory holding initdb and pg_ctl (newest Debian version first, then PATH)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    for directory in candidates:
        if os.access(os.path.join(directory, "initdb"), os.X_OK) and os.access(
            os.path.join(directory, "pg_ctl"), os.X_OK
        ):
            return Path(directory)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    pytest.fail(f"PostgreSQL server binaries (initdb, pg_ctl) not found: {INSTALL_HINT}", pytrace=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """A PostgreSQL cluster in a temporary directory, run as a non-root user."""

    def __init__(self) -> None:
        self.bin = find_pg_bin()
        self.runas: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail(
                    f"as root, PostgreSQL runs as the 'postgres' user, which is missing: {INSTALL_HINT}", pytrace=False
                )
            self.runas = "postgres"
        # Under root the server user must be able to reach the directory: $TMPDIR may
        # sit under /root, so use /tmp, which every user can traverse.
        parent = "/tmp" if self.runas is not None and os.path.isdir("/tmp") else None
        self.dir = Path(tempfile.mkdtemp(prefix="meshnode-pg-", dir=parent))
        if self.runas is not None:
            entry = pwd.getpwnam(self.runas)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)
        os.chmod(self.dir, 0o700)
        self.data = self.dir / "data"
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if self.runas is not None:
            command = ["runuser", "-u", self.runas, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.dir)
        if result.returncode != 0:
            log = self.dir / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            output = f"{result.stdout}{result.stderr}{tail}"
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{output}")

    def start(self) -> None:
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"
        )
        options = f"-h 127.0.0.1 -p {self.port} -k {self.dir} -F -c max_connections=50"
        log = str(self.dir / "server.log")
        self._run("pg_ctl", "-D", str(self.data), "-l", log, "-o", options, "-w", "-t", "60", "start")

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", "60", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def create_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server for the whole test session."""
    server = PgServer()
    try:
        server.start()
    except BaseException:
        server.stop()
        raise
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A `postgresql://` URL of an empty database, dropped after the test."""
    url = pg_server.create_database()
    try:
        yield url
    finally:
        pg_server.drop_database(url)
