"""The cloud ledger's schema, as alembic migrations written with SQLAlchemy Core.

The revisions are in `versions/` (shipped in the wheel as package data); one
set of revisions serves SQLite and PostgreSQL, because SQLAlchemy's types and
alembic's operations render each dialect's DDL (`LargeBinary` is BLOB on one
and BYTEA on the other; dropping a column on SQLite copies the table).

`Ledger(db_url)` (so `meshnode cloud` on start) brings the database to the
newest revision before serving; `meshnode cloud migrate` does only that and
exits. Upgrading is safe when several cloud processes start at once on one
database:

- PostgreSQL: the upgrade runs in one transaction (PostgreSQL's DDL is
  transactional) on its own connection, and first takes a transaction-level
  advisory lock (`MIGRATION_LOCK`): a second process waits there, then finds
  the revision already at the head and does nothing. Waiting is bounded by
  `lock_timeout` (`LOCK_TIMEOUT_S`).
- SQLite: the upgrade runs in one `BEGIN IMMEDIATE` transaction on the
  ledger's own connection (an in-memory database exists only on it), which
  holds the file's write lock against every other process until COMMIT.

A process that finds the database already at the head reads one row and runs
no DDL, so a database user without DDL rights can serve once an operator has
migrated with a privileged one.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from .._ledger import lock_id

SCRIPT_LOCATION = os.path.dirname(os.path.abspath(__file__))

# The PostgreSQL advisory lock a migration holds: hashed like the ledger's
# `lock_keys` (sessions and devices), from a key none of them is; a collision
# would only make one start wait for one reconciliation.
MIGRATION_LOCK = lock_id("meshnode ledger migrations")
# How long a starting process waits for another one's migration (or for the
# tables it alters to be free) before it gives up with an error; systemd restarts it.
LOCK_TIMEOUT_S = 120
# alembic's `op` and `context` are module-wide proxies: one migration at a time in a process
# (two ledgers opened at once by two threads); other processes are kept out by `_locked`.
_IN_PROCESS = threading.Lock()
_in_memory_head: sqlite3.Connection | None = None  # see upgrade_in_memory
# An execution option of this module's SQLite engine: begin a plain (deferred) transaction.
_READ_ONLY = "ledger_read_only"


@dataclass(frozen=True)
class Migrated:
    """What an upgrade or downgrade did: the revision before and after (None: no schema yet)."""

    before: str | None
    after: str | None

    @property
    def changed(self) -> bool:
        return self.before != self.after


def config() -> Config:
    """Alembic's configuration for these revisions (no alembic.ini: nothing for an operator to keep in step)."""
    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    return cfg


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(config())  # reads every revision file: once per process


def head() -> str:
    """The newest revision this release knows."""
    found = _scripts().get_current_head()
    assert found is not None, "the ledger has revisions"
    return found


def history() -> list[tuple[str, str]]:
    """Every revision, oldest first: (id, first line of its description)."""
    return [(s.revision, (s.doc or "").strip()) for s in reversed(list(_scripts().walk_revisions()))]


def sqlite_engine(conn: sqlite3.Connection) -> sa.Engine:
    """An engine over an open sqlite3 connection (autocommit, `isolation_level=None`).

    It reuses that one connection (an in-memory database exists only there) and
    never closes it; its transactions begin with `BEGIN IMMEDIATE`, which takes
    the file's write lock at once (SQLAlchemy's recipe for pysqlite's own
    transaction handling, which is off here).
    """
    if conn.isolation_level is not None:
        raise ValueError("the ledger's SQLite connection runs with isolation_level=None")
    engine = sa.create_engine("sqlite://", creator=lambda: conn, poolclass=sa.pool.StaticPool)

    @sa.event.listens_for(engine, "begin")
    def _begin(connection: sa.Connection) -> None:
        read_only = connection.get_execution_options().get(_READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def postgresql_engine(connect: Callable[[], Any]) -> sa.Engine:
    """An engine whose one connection comes from `connect()` (a psycopg 3 connection, not autocommit)."""
    return sa.create_engine("postgresql+psycopg://", creator=connect, poolclass=sa.pool.NullPool)


def current(engine: sa.Engine) -> str | None:
    """The database's revision (None: made before migrations, or empty)."""
    with engine.connect() as connection:
        connection.execution_options(**{_READ_ONLY: True})  # SQLite: no write lock just to read
        return MigrationContext.configure(connection).get_current_revision()


@contextmanager
def _locked(engine: sa.Engine) -> Iterator[sa.Connection]:
    """One transaction that no other process's migration runs beside (see the module's note)."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT_S}s'")
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        yield connection


def upgrade(engine: sa.Engine, revision: str = "head") -> Migrated:
    """Bring the database up to `revision` (default: the newest), under the lock; a no-op when it is there."""
    target = head() if revision == "head" else revision
    before = current(engine)
    if before == target:  # the usual start: nothing to change, no lock, no DDL
        return Migrated(before, before)
    with _IN_PROCESS:
        return _upgrade_locked(engine, revision)


def _upgrade_locked(engine: sa.Engine, revision: str) -> Migrated:
    with _locked(engine) as connection:
        before = MigrationContext.configure(connection).get_current_revision()  # again, under the lock
        cfg = config()
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)
        after = MigrationContext.configure(connection).get_current_revision()
    return Migrated(before, after)


def upgrade_in_memory(conn: sqlite3.Connection) -> Migrated:
    """Give a new in-memory SQLite database the newest schema: a copy (SQLite's backup) of one
    this process migrated to the head with `upgrade` the first time, so the simulator's and
    the tests' many short-lived ledgers do not each run every revision."""
    global _in_memory_head
    with _IN_PROCESS:
        if _in_memory_head is None:
            template = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            _upgrade_locked(sqlite_engine(template), "head")
            _in_memory_head = template
        _in_memory_head.backup(conn)
    return Migrated(None, head())


def downgrade(engine: sa.Engine, revision: str) -> Migrated:
    """Take the database back to `revision` ("base": no tables), under the lock. Drops what later revisions added."""
    with _IN_PROCESS, _locked(engine) as connection:
        before = MigrationContext.configure(connection).get_current_revision()
        cfg = config()
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, revision)
        after = MigrationContext.configure(connection).get_current_revision()
    return Migrated(before, after)


__all__ = [
    "LOCK_TIMEOUT_S",
    "MIGRATION_LOCK",
    "SCRIPT_LOCATION",
    "Migrated",
    "config",
    "current",
    "downgrade",
    "head",
    "history",
    "postgresql_engine",
    "sqlite_engine",
    "upgrade",
    "upgrade_in_memory",
]
