"""The cloud ledger's schema migrations (alembic, `uplink/migrations/`), on SQLite and a real PostgreSQL.

- A new database gets the same schema the hand-written DDL of the releases
  before migrations made (kept here, verbatim, as the fixture).
- A database made by those releases (no `alembic_version` table) upgrades on
  open without losing a row: the last one's schema, and the first release's
  (no tariff or review columns, no site_configs or reviews tables).
- Reopening a database at the head runs no DDL; `migrate=False` refuses an old
  schema; a migration that fails leaves the database as it was; a downgrade and
  an upgrade round-trip.
- Several processes opening one database at once: one migrates, the others
  wait for it and find the schema done (PostgreSQL: an advisory lock; SQLite:
  BEGIN IMMEDIATE).
- `meshnode cloud migrate`, and the wheel carries the revisions.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from uplink import migrations
from uplink._ledger import Ledger, LedgerError, parse_db_url

from .pg import pg_server, pg_url  # noqa: F401  (fixtures)

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parent.parent

# The schema as the last release before migrations created it on open
# (uplink/_ledger.py's `_SCHEMA`, verbatim; {blob} was BLOB on SQLite, BYTEA on PostgreSQL).
LAST_DDL_BEFORE_MIGRATIONS = (
    """CREATE TABLE IF NOT EXISTS documents (
        session_id  TEXT PRIMARY KEY,
        data        {blob} NOT NULL,
        heads_hash  {blob} NOT NULL,
        updated     BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS ledger (
        session_id    TEXT PRIMARY KEY,
        site          TEXT NOT NULL,
        charger       TEXT NOT NULL,
        connector     BIGINT NOT NULL,
        id_token      TEXT NOT NULL,
        start_ts      BIGINT,
        stop_ts       BIGINT,
        energy_wh     BIGINT NOT NULL,
        cost_cents    BIGINT,
        currency      TEXT,
        state         TEXT NOT NULL,
        conflicts     BIGINT NOT NULL,
        receipt_heads TEXT,
        receipt       {blob},
        receipt_ts    BIGINT,
        review        TEXT,
        tariff_id     TEXT,
        tariff_version BIGINT,
        pricing       TEXT,
        first_seen    BIGINT NOT NULL,
        updated       BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS events (
        event_id    TEXT PRIMARY KEY,
        device_id   TEXT NOT NULL,
        seq         BIGINT NOT NULL,
        session_id  TEXT NOT NULL,
        type        TEXT NOT NULL,
        ts          BIGINT NOT NULL,
        meter_wh    BIGINT,
        chain_hash  {blob} NOT NULL,
        prev        {blob} NOT NULL,
        data        {blob} NOT NULL,
        status      TEXT NOT NULL,
        applied     INTEGER NOT NULL DEFAULT 0,
        first_seen  BIGINT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS events_slot ON events (device_id, seq)",
    "CREATE INDEX IF NOT EXISTS events_session ON events (session_id)",
    """CREATE TABLE IF NOT EXISTS conflicts (
        session_id  TEXT NOT NULL,
        event_id    TEXT NOT NULL,
        kind        TEXT NOT NULL,
        detail      TEXT NOT NULL,
        first_seen  BIGINT NOT NULL,
        UNIQUE (session_id, event_id, kind))""",
    """CREATE TABLE IF NOT EXISTS devices (
        device_id     TEXT PRIMARY KEY,
        public_key    {blob} NOT NULL,
        first_session TEXT NOT NULL,
        first_seen    BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS site_configs (
        site        TEXT PRIMARY KEY,
        data        {blob} NOT NULL,
        updated     BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS stats (
        name   TEXT PRIMARY KEY,
        value  BIGINT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS reviews (
        session_id  TEXT NOT NULL,
        decision    TEXT NOT NULL,
        reviewer    TEXT NOT NULL,
        note        TEXT NOT NULL,
        decided_ts  BIGINT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS reviews_session ON reviews (session_id, decided_ts)",
)

# The first release's schema (commit d8d95b2): the same, less what later releases added.
LATER_COLUMNS = ("review", "tariff_id", "tariff_version", "pricing")
FIRST_RELEASE_DDL = tuple(
    "\n".join(line for line in statement.split("\n") if line.split()[0] not in LATER_COLUMNS)
    for statement in LAST_DDL_BEFORE_MIGRATIONS
    if "site_configs" not in statement and "reviews" not in statement
)
assert len(FIRST_RELEASE_DDL) == 8 and all(f" {c} " not in s for s in FIRST_RELEASE_DDL for c in LATER_COLUMNS)

# A row for every table of the first release, as (table, {column: value}).
OLD_ROWS: list[tuple[str, dict[str, Any]]] = [
    ("documents", {"session_id": "s-1", "data": b"\x85o\x4a\x83doc", "heads_hash": b"\x01" * 32, "updated": 5}),
    (
        "ledger",
        {
            "session_id": "s-1", "site": "default", "charger": "c1", "connector": 1, "id_token": "T1",
            "start_ts": 1_700_000_000_000, "stop_ts": 1_700_000_600_000, "energy_wh": 7400, "cost_cents": 289,
            "currency": "EUR", "state": "reconciled", "conflicts": 0, "receipt_heads": "ab" * 32,
            "receipt": b"\xa2receipt", "receipt_ts": 1_700_000_601_000, "first_seen": 3, "updated": 5,
        },
    ),
    (
        "events",
        {
            "event_id": "e-1", "device_id": "c1", "seq": 1, "session_id": "s-1", "type": "start",
            "ts": 1_700_000_000_000, "meter_wh": 0, "chain_hash": b"\x02" * 32, "prev": b"\x00" * 32,
            "data": b"\xa1signed", "status": "ok", "applied": 1, "first_seen": 3,
        },
    ),
    (
        "conflicts",
        {"session_id": "s-1", "event_id": "e-1", "kind": "fork", "detail": "two in one slot", "first_seen": 4},
    ),
    ("devices", {"device_id": "c1", "public_key": b"\x03" * 32, "first_session": "s-1", "first_seen": 3}),
    ("stats", {"name": "syncs", "value": 12}),
]  # fmt: skip
LAST_ROWS: list[tuple[str, dict[str, Any]]] = [
    *[
        (t, {**row, "review": "offline", "tariff_id": "t-day", "tariff_version": 2, "pricing": "{}"})
        if t == "ledger"
        else (t, row)
        for t, row in OLD_ROWS
    ],
    ("site_configs", {"site": "default", "data": b"\x85oconfig", "updated": 6}),
    ("reviews", {"session_id": "s-1", "decision": "approve", "reviewer": "ops", "note": "ok", "decided_ts": 7}),
]


# --- databases ------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return str(request.getfixturevalue("pg_url"))


@contextlib.contextmanager
def raw(db_url: str) -> Iterator[Any]:
    """A plain DB-API connection in autocommit (statements written with `?`)."""
    backend, target = parse_db_url(db_url)
    if backend == "sqlite":
        conn = sqlite3.connect(target, isolation_level=None)
    else:
        import psycopg

        conn = psycopg.connect(target, autocommit=True)
    try:
        yield conn
    finally:
        conn.close()


def run(conn: Any, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if not isinstance(conn, sqlite3.Connection):
        sql = sql.replace("?", "%s")
    cursor = conn.execute(sql, params)
    if cursor.description is None:
        return []
    return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in cursor.fetchall()]


def create_old(db_url: str, ddl: tuple[str, ...], rows: list[tuple[str, dict[str, Any]]]) -> None:
    blob = "BLOB" if db_url.startswith("sqlite") else "BYTEA"
    with raw(db_url) as conn:
        for statement in ddl:
            run(conn, statement.format(blob=blob))
        for table, row in rows:
            run(
                conn,
                f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
                tuple(row.values()),
            )


def table_rows(db_url: str, table: str, columns: list[str]) -> list[tuple[Any, ...]]:
    with raw(db_url) as conn:
        return run(conn, f"SELECT {', '.join(columns)} FROM {table} ORDER BY {columns[0]}")


@contextlib.contextmanager
def engine_for(db_url: str) -> Iterator[sa.Engine]:
    backend, target = parse_db_url(db_url)
    if backend == "sqlite":
        engine = sa.create_engine(f"sqlite:///{target}", poolclass=sa.pool.NullPool)
    else:
        import psycopg

        engine = migrations.postgresql_engine(lambda: psycopg.connect(target))
    try:
        yield engine
    finally:
        engine.dispose()


def schema(db_url: str) -> dict[str, Any]:
    """Tables, columns (type, nullability, default), primary keys, unique constraints and indexes.

    A primary-key column counts as NOT NULL whatever its declaration (SQLite's old
    `TEXT PRIMARY KEY` let NULL in, PostgreSQL never does; the revisions say NOT NULL).
    """
    out: dict[str, Any] = {}
    with engine_for(db_url) as engine, engine.connect() as conn:
        inspector = sa.inspect(conn)
        for table in sorted(set(inspector.get_table_names()) - {"alembic_version"}):
            pk = inspector.get_pk_constraint(table)["constrained_columns"]
            out[table] = {
                "columns": {
                    c["name"]: (str(c["type"]).upper(), c["nullable"] and c["name"] not in pk, c["default"])
                    for c in inspector.get_columns(table)
                },
                "pk": pk,
                "unique": sorted(tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)),
                "indexes": sorted(
                    (i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in inspector.get_indexes(table)
                ),
            }
    return out


def revision(db_url: str) -> str | None:
    with engine_for(db_url) as engine:
        return migrations.current(engine)


def old_schema(db_url: str, tmp_path: Path, pg_server: Any | None = None) -> dict[str, Any]:
    """The schema the last release before migrations made, in a database of its own."""
    if db_url.startswith("sqlite"):
        other = f"sqlite:///{tmp_path / 'reference.db'}"
        create_old(other, LAST_DDL_BEFORE_MIGRATIONS, [])
        return schema(other)
    assert pg_server is not None
    other = pg_server.create_database()
    try:
        create_old(other, LAST_DDL_BEFORE_MIGRATIONS, [])
        return schema(other)
    finally:
        pg_server.drop_database(other)


def pg_of(request: pytest.FixtureRequest, db_url: str) -> Any | None:
    return None if db_url.startswith("sqlite") else request.getfixturevalue("pg_server")


# --- a new database ---------------------------------------------------------------------------


def test_revisions_are_a_single_line_ending_at_the_head() -> None:
    assert [rev for rev, _doc in migrations.history()] == ["0001", "0002"]
    assert migrations.head() == "0002"


def test_a_new_database_gets_the_schema_the_old_ddl_made(
    db_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    ledger = Ledger(db_url)
    ledger.close()
    assert (ledger.schema.before, ledger.schema.after) == (None, "0002")
    assert revision(db_url) == "0002"
    assert schema(db_url) == old_schema(db_url, tmp_path, pg_of(request, db_url))


def test_an_in_memory_sqlite_ledger_gets_the_schema_of_a_migrated_file(tmp_path: Path) -> None:
    """In-memory ledgers start as a copy of one this process migrated (no file, no other connection)."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    Ledger(url).close()
    with raw(url) as conn:
        expected = run(conn, "SELECT type, name, sql FROM sqlite_master ORDER BY name")
    ledger = Ledger("sqlite:///:memory:")
    try:
        assert ledger.schema.after == "0002"
        with ledger.read() as tx:
            got = [tuple(r.values()) for r in tx.query("SELECT type, name, sql FROM sqlite_master ORDER BY name")]
            assert got == expected and tx.query("SELECT version_num FROM alembic_version") == [{"version_num": "0002"}]
        with ledger.transaction() as tx:
            tx.add_review("s-1", "approve", "ops", "", 7)
            tx.add_stats({"syncs": 2})
        with ledger.read() as tx:
            assert tx.reviews("s-1")[0]["decision"] == "approve" and tx.stats()["syncs"] == 2
    finally:
        ledger.close()


def test_reopening_a_database_at_the_head_runs_no_ddl(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    Ledger(url).close()
    statements: list[str] = []
    real_connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = real_connect(*args, **kwargs)
        conn.set_trace_callback(statements.append)
        return conn

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sqlite3, "connect", traced)
        ledger = Ledger(url)
    ledger.close()
    assert (ledger.schema.before, ledger.schema.after, ledger.schema.changed) == ("0002", "0002", False)
    ddl = [s for s in statements if s.lstrip().split()[0].upper() in ("CREATE", "ALTER", "DROP")]
    assert statements and ddl == []
    assert not any("BEGIN IMMEDIATE" in s for s in statements), "no write lock taken when there is nothing to do"


# --- a database made before migrations --------------------------------------------------------


def test_a_database_of_the_last_release_before_migrations_upgrades_keeping_every_row(
    db_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    create_old(db_url, LAST_DDL_BEFORE_MIGRATIONS, LAST_ROWS)
    before = {t: table_rows(db_url, t, list(row)) for t, row in LAST_ROWS}
    expected = schema(db_url)
    assert revision(db_url) is None

    ledger = Ledger(db_url)
    try:
        assert (ledger.schema.before, ledger.schema.after) == (None, "0002")
        assert {t: table_rows(db_url, t, list(row)) for t, row in LAST_ROWS} == before
        assert schema(db_url) == expected  # nothing to add: only the version table is new
        with ledger.read() as tx:
            row = tx.ledger_row("s-1")
            assert row is not None and (row["review"], row["tariff_id"], row["energy_wh"]) == ("offline", "t-day", 7400)
    finally:
        ledger.close()
    assert revision(db_url) == "0002"


def test_a_database_of_the_first_release_upgrades_keeping_every_row(
    db_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    create_old(db_url, FIRST_RELEASE_DDL, OLD_ROWS)
    before = {t: table_rows(db_url, t, list(row)) for t, row in OLD_ROWS}
    old_tables = set(schema(db_url))
    assert "reviews" not in old_tables and "review" not in schema(db_url)["ledger"]["columns"]

    ledger = Ledger(db_url)
    try:
        assert (ledger.schema.before, ledger.schema.after) == (None, "0002")
        assert {t: table_rows(db_url, t, list(row)) for t, row in OLD_ROWS} == before, "a row changed"
        assert table_rows(db_url, "ledger", list(LATER_COLUMNS)) == [(None, None, None, None)]
        assert schema(db_url) == old_schema(db_url, tmp_path, pg_of(request, db_url))
        # The service's own statements work on the new columns and tables.
        with ledger.transaction() as tx:
            row = tx.ledger_row("s-1")
            assert row is not None
            tx.upsert_ledger({**row, "review": "offline", "tariff_id": "t-day", "tariff_version": 3, "pricing": "{}"})
            tx.add_review("s-1", "approve", "ops", "checked", 8)
            tx.save_site_config("default", b"config", 8)
        with ledger.read() as tx:
            row = tx.ledger_row("s-1")
            assert row is not None and (row["tariff_version"], row["energy_wh"], row["first_seen"]) == (3, 7400, 3)
            assert [r["decision"] for r in tx.reviews("s-1")] == ["approve"]
            assert tx.site_configs() == [("default", b"config")]
    finally:
        ledger.close()


def test_migrate_false_refuses_an_old_schema_and_opens_one_at_the_head(db_url: str) -> None:
    create_old(db_url, FIRST_RELEASE_DDL, OLD_ROWS)
    with pytest.raises(LedgerError, match="at revision none, this release needs 0002: run `meshnode cloud migrate"):
        Ledger(db_url, migrate=False)
    assert revision(db_url) is None and "review" not in schema(db_url)["ledger"]["columns"]  # left as it was
    Ledger(db_url).close()
    ledger = Ledger(db_url, migrate=False)
    ledger.close()
    assert ledger.schema.after == "0002"


def test_a_migration_that_fails_leaves_the_database_as_it_was(db_url: str) -> None:
    """Revision 0002 creates the index reviews_session; a `reviews` table without `decided_ts` makes it fail.

    The whole upgrade is one transaction (PostgreSQL's DDL is transactional, and
    so is SQLite's): neither 0001's version row nor 0002's new ledger columns stay.
    """
    broken = (*FIRST_RELEASE_DDL, "CREATE TABLE reviews (session_id TEXT NOT NULL)")
    create_old(db_url, broken, OLD_ROWS)
    before = schema(db_url)
    with pytest.raises(LedgerError, match="migrating the database schema failed"):
        Ledger(db_url)
    assert schema(db_url) == before
    assert revision(db_url) is None
    assert table_rows(db_url, "ledger", ["session_id", "energy_wh"]) == [("s-1", 7400)]


def test_downgrade_then_upgrade_round_trips(db_url: str) -> None:
    create_old(db_url, LAST_DDL_BEFORE_MIGRATIONS, LAST_ROWS)
    Ledger(db_url).close()
    head_schema = schema(db_url)
    with engine_for(db_url) as engine:
        assert migrations.downgrade(engine, "0001") == migrations.Migrated("0002", "0001")
    down = schema(db_url)
    assert "reviews" not in down and "site_configs" not in down
    assert not set(LATER_COLUMNS) & set(down["ledger"]["columns"])
    assert table_rows(db_url, "ledger", ["session_id", "energy_wh"]) == [("s-1", 7400)]  # the row stays
    ledger = Ledger(db_url)
    ledger.close()
    assert ledger.schema == migrations.Migrated("0001", "0002")
    assert schema(db_url) == head_schema


# --- several processes starting at once ------------------------------------------------------


# One starting instance: it opens the ledger when the file `go` appears and prints
# [before, after] (or {"error": ...}). With "unlocked" it runs without the migration
# lock, to show that the lock is what keeps starts apart.
OPENER = """
import contextlib, json, sys, time
from pathlib import Path
from uplink import migrations
from uplink._ledger import Ledger, LedgerError
url, go, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
if mode == "unlocked":
    @contextlib.contextmanager
    def unlocked(engine):
        with engine.begin() as connection:
            yield connection
    migrations._locked = unlocked
print("ready", flush=True)
while not go.exists():
    time.sleep(0.002)
try:
    ledger = Ledger(url)
    ledger.close()
    print(json.dumps([ledger.schema.before, ledger.schema.after]), flush=True)
except LedgerError as exc:
    print(json.dumps({"error": str(exc)}), flush=True)
"""


@contextlib.contextmanager
def openers(db_url: str, count: int, tmp_path: Path, mode: str = "locked") -> Iterator[tuple[Path, list[Any]]]:
    """`count` processes ready to open the ledger at once: create the yielded file to start them.
    The list fills with their results when the block ends."""
    go = tmp_path / f"go-{time.monotonic_ns()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, db_url, str(go), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )
        for _ in range(count)
    ]
    results: list[Any] = []
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", proc.stderr
        yield go, results
        for proc in procs:
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err[-3000:]
            results.append(json.loads(out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def waiting_on_advisory_locks(db_url: str) -> int:
    with raw(db_url) as conn:
        return int(
            run(
                conn,
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            )[0][0]
        )


def test_instances_starting_at_once_on_one_postgresql_migrate_it_once(pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    """The test holds the migration lock while four instances start, so all four are inside
    their upgrade at once (each found no schema); released, one migrates, three find it done."""
    import psycopg

    count = 4
    with psycopg.connect(pg_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (migrations.MIGRATION_LOCK,))
        with openers(pg_url, count, tmp_path) as (go, results):
            go.touch()
            deadline = time.monotonic() + 60
            while waiting_on_advisory_locks(pg_url) < count and time.monotonic() < deadline:
                time.sleep(0.05)
            assert waiting_on_advisory_locks(pg_url) == count, "every instance waits for the migration lock"
            holder.execute("SELECT pg_advisory_unlock(%s)", (migrations.MIGRATION_LOCK,))
    assert Counter(map(tuple, results)) == {("0002", "0002"): count - 1, (None, "0002"): 1}, results
    assert revision(pg_url) == "0002"


def test_instances_starting_at_once_without_the_lock_collide(pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    """The check that the test above can fail: without the lock, starts at once collide."""
    import psycopg

    for _attempt in range(5):
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute("DROP SCHEMA public CASCADE")
            conn.execute("CREATE SCHEMA public")
        with openers(pg_url, 4, tmp_path, mode="unlocked") as (go, results):
            go.touch()
        if any("error" in r for r in results):
            assert any("already exists" in r["error"] or "duplicate key" in r["error"] for r in results if "error" in r)
            return
    pytest.fail("four unlocked migrations at once never collided")


@pytest.mark.slow  # subprocesses
def test_processes_opening_one_sqlite_file_at_once_migrate_it_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with openers(url, 4, tmp_path) as (go, results):
        go.touch()
    assert Counter(map(tuple, results)) == {("0002", "0002"): 3, (None, "0002"): 1}, results


def test_ledgers_of_different_databases_opened_at_once_by_threads_each_get_the_whole_schema(
    tmp_path: Path,
) -> None:
    """alembic's `op` is one per process, and two databases share no lock: ledgers opened
    at once by threads of one process (a test, Dask worker threads) would interleave their
    migrations in it."""
    count, rounds = 4, 3
    failures: list[BaseException] = []

    def one(barrier: threading.Barrier, url: str) -> None:
        barrier.wait()
        try:
            ledger = Ledger(url)
            try:
                with ledger.transaction() as tx:
                    tx.add_review("s-1", "approve", "ops", "", 1)
                    tx.save_site_config("default", b"c", 1)
            finally:
                ledger.close()
        except BaseException as exc:
            failures.append(exc)

    for _round in range(rounds):
        barrier = threading.Barrier(count)
        urls = [f"sqlite:///{tmp_path / f'{_round}-{i}.db'}" for i in range(count - 1)] + ["sqlite:///:memory:"]
        threads = [threading.Thread(target=one, args=(barrier, url)) for url in urls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert not failures, failures


# --- the operator's command and the wheel -----------------------------------------------------


@pytest.mark.slow  # a subprocess
def test_meshnode_cloud_migrate_upgrades_and_exits(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cloud.db'}"
    create_old(url, FIRST_RELEASE_DDL, OLD_ROWS)
    command = [sys.executable, "-m", "meshnode.cli", "cloud", "migrate", "--db", url]
    first = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"db": url, "from": None, "to": "0002"}
    assert "Running upgrade 0001 -> 0002" in first.stderr  # alembic says what it runs, in the log
    again = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert again.returncode == 0 and json.loads(again.stdout)["from"] == "0002"
    assert table_rows(url, "ledger", ["session_id", "review"]) == [("s-1", None)]


@pytest.mark.slow  # a subprocess
def test_meshnode_cloud_migrate_reports_a_database_it_cannot_reach(tmp_path: Path) -> None:
    from .procs import free_port

    url = f"postgresql://postgres@127.0.14.1:{free_port('127.0.14.1')}/nothing"
    out = subprocess.run(
        [sys.executable, "-m", "meshnode.cli", "cloud", "migrate", "--db", url],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 1
    assert out.stderr.startswith("meshnode cloud migrate: cannot connect to PostgreSQL"), out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_the_wheel_carries_the_migrations(tmp_path: Path) -> None:
    """Built as docs/service.md says, the wheel alone migrates a ledger (env.py and revisions are in it)."""
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("meshnode-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        z.extractall(tmp_path / "unpacked")
    for name in ("env.py", "script.py.mako", "versions/0001_first_release.py", "versions/0002_tariffs_and_reviews.py"):
        assert f"uplink/migrations/{name}" in names, name
    probe = (
        "import uplink, uplink.migrations as m; from uplink._ledger import Ledger;"
        f"l = Ledger('sqlite:///{tmp_path / 'w.db'}'); print(m.__file__, l.schema.after)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        env=dict(os.environ, PYTHONPATH=str(tmp_path / "unpacked")),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == [str(tmp_path / "unpacked" / "uplink" / "migrations" / "__init__.py"), "0002"]
