"""The cloud's database layer: one small class over SQLite or PostgreSQL.

The reconciliation service (`_cloud.py`) decides; this module only stores and
fetches rows. Both back ends run the same SQL text: statements are written with
`?` placeholders and SQL that SQLite (>= 3.24) and PostgreSQL both accept
(`ON CONFLICT ... DO NOTHING / DO UPDATE`, `excluded.`); the only difference —
the placeholder style — is handled in `_Dialect`, in one place.

Tables (made and changed by the alembic revisions in `uplink/migrations/`,
which `Ledger(db_url)` applies on open: see that package's note):

- `documents`: the saved Automerge document of every session (`session_id` PK).
- `ledger`: exactly one row per session (`session_id` PK): what is billed.
- `events`: every distinct verified event the cloud has seen (`event_id` PK),
  with its place in its device's chain and its `status`: `ok` (billed),
  `late` (arrived after the session's receipt: valid, not billed), `fork`,
  `broken_chain` (refused by the cross-session chain check). There is
  deliberately no UNIQUE(device_id, seq): a fork is two rows in one slot, and
  the service detects it in code and keeps both.
- `conflicts`: UNIQUE(session_id, event_id, kind), so data sent again adds nothing.
- `devices`: the first public key each device declared (trust on first use).
- `site_configs`: each site's site-config document (its signed tariffs), by site.
- `stats`: named counters.
- `reviews`: an operator's decisions (`approve` / `reject`) on sessions flagged for
  review, one row per decision, never updated: the latest row is the standing one.

Concurrency: one connection guarded by one lock. Every call is blocking and
meant to run in a worker thread (`trio.to_thread.run_sync`); a transaction holds
the lock from BEGIN to COMMIT, so transactions of this process never interleave
and the service's cross-session chain checks see a consistent table.

Several service processes on one PostgreSQL database: a transaction first takes
`lock_keys` (advisory transaction locks, one per session and device it touches,
in one global order), so two processes never reconcile the same session or
device at once; on SQLite, `BEGIN IMMEDIATE` already serialises every writer of
the file. Each process keeps documents in memory and merges what another one
stored (`document_heads`, `document`) inside the locked transaction.

Durability: SQLite runs in WAL mode with `synchronous=FULL`, so COMMIT returns
after the data reached the disk; PostgreSQL commits durably by default.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from .migrations import Migrated

log = logging.getLogger(__name__)


SQLITE_OPEN_WAIT_S = 120.0
"""How long opening a SQLite ledger waits for another process's lock (its migration)."""


class LedgerError(Exception):
    """The database failed or is unreachable: our failure, never the client's."""


class LedgerUrlError(LedgerError):
    """The database URL is not one this service understands (a configuration error)."""


@dataclass(frozen=True)
class _Dialect:
    name: str

    def sql(self, text: str) -> str:
        """Adapt a statement written with `?` placeholders (no statement has a literal '?')."""
        return text if self.name == "sqlite" else text.replace("?", "%s")


_SQLITE = _Dialect("sqlite")
_POSTGRES = _Dialect("postgresql")

LEDGER_COLUMNS = (
    "session_id", "site", "charger", "connector", "id_token", "start_ts", "stop_ts", "energy_wh",
    "cost_cents", "currency", "state", "conflicts", "receipt_heads", "receipt", "receipt_ts",
    "review", "tariff_id", "tariff_version", "pricing", "first_seen", "updated",
)  # fmt: skip
EVENT_COLUMNS = (
    "event_id", "device_id", "seq", "session_id", "type", "ts", "meter_wh", "chain_hash", "prev",
    "data", "status", "first_seen",
)  # fmt: skip


def parse_db_url(db_url: str) -> tuple[str, str]:
    """Split a database URL into (back end, target).

    `sqlite:///relative/path.db`, `sqlite:////absolute/path.db` and
    `sqlite:///:memory:` give ("sqlite", path); `postgresql://...` and
    `postgres://...` give ("postgresql", the URL as libpq takes it).

    Raises:
        LedgerUrlError: any other scheme, or an SQLite URL without a path.
    """
    scheme = urlsplit(db_url).scheme.lower()
    if scheme == "sqlite":
        prefix = "sqlite:///"
        if not db_url.lower().startswith(prefix) or len(db_url) == len(prefix):
            raise LedgerUrlError(f"an SQLite URL is sqlite:///path.db (or sqlite:////abs/path.db), got {db_url!r}")
        return "sqlite", db_url[len(prefix) :]
    if scheme in ("postgresql", "postgres"):
        return "postgresql", db_url
    raise LedgerUrlError(f"database URL must start with sqlite:/// or postgresql://, got {db_url!r}")


class Ledger:
    """The cloud's database: documents, ledger rows, events, conflicts, devices, stats.

    Blocking; call it from a worker thread. Use `read()` for a consistent set of
    queries and `transaction()` for writes; both hold the connection's lock.
    """

    def __init__(self, db_url: str, *, migrate: bool = True) -> None:
        backend, target = parse_db_url(db_url)
        self.backend = backend
        self._lock = threading.Lock()
        self._dialect = _SQLITE if backend == "sqlite" else _POSTGRES
        self._errors: tuple[type[BaseException], ...]
        if backend == "sqlite":
            self._errors = (sqlite3.Error,)
            try:
                if target != ":memory:":
                    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
                # While it opens and migrates, a ledger waits for the file's lock as long as a
                # PostgreSQL instance waits for the migration lock: another process may hold
                # it for the whole upgrade (WAL conversion included); then 5 s per statement.
                self._conn: Any = sqlite3.connect(
                    target, check_same_thread=False, isolation_level=None, timeout=SQLITE_OPEN_WAIT_S
                )
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=FULL")
            except (sqlite3.Error, OSError) as exc:
                raise LedgerError(f"cannot open SQLite database {target!r}: {exc}") from exc
        else:
            import psycopg  # optional back end: imported only when a PostgreSQL URL is used

            self._errors = (psycopg.Error,)
            try:
                self._conn = psycopg.connect(target, autocommit=True, connect_timeout=10)
                # Bounded statements: the service shields its transactions from
                # cancellation, so none may hang for ever on a stuck server.
                self._conn.execute("SET statement_timeout = 30000")
            except psycopg.Error as exc:
                raise LedgerError(f"cannot connect to PostgreSQL: {exc}") from exc
        try:
            self.schema: Migrated = self._migrate(target, migrate)
            if backend == "sqlite":
                self._conn.execute("PRAGMA busy_timeout=5000")
        except BaseException:
            self._conn.close()
            raise

    def _migrate(self, target: str, migrate: bool) -> Migrated:
        """Bring the schema to this release's revision (`uplink.migrations`), or with
        `migrate=False` only check that it is there. Returns what was done (`Migrated`)."""
        try:
            import alembic.util
            import sqlalchemy.exc

            from . import migrations
        except ImportError as exc:
            raise LedgerError(
                f"the cloud's ledger needs alembic and SQLAlchemy for its schema migrations ({exc}): "
                "pip install 'meshnode[cloud]'"
            ) from exc
        if self.backend == "sqlite":
            engine = migrations.sqlite_engine(self._conn)  # the ledger's own connection, left open
        else:
            import psycopg

            engine = migrations.postgresql_engine(lambda: psycopg.connect(target, connect_timeout=10))
        errors: tuple[type[BaseException], ...] = (
            sqlalchemy.exc.SQLAlchemyError,
            alembic.util.CommandError,
            *self._errors,
        )
        try:
            if migrate and target == ":memory:" and self.backend == "sqlite":
                done = migrations.upgrade_in_memory(self._conn)
            elif migrate:
                done = migrations.upgrade(engine)
            else:
                revision = migrations.current(engine)
                done = migrations.Migrated(revision, revision)
                if done.after != migrations.head():
                    raise LedgerError(
                        f"the database schema is at revision {done.after or 'none'}, this release needs "
                        f"{migrations.head()}: run `meshnode cloud migrate --db URL`"
                    )
        except errors as exc:
            raise LedgerError(f"migrating the database schema failed: {exc}") from exc
        finally:
            if self.backend != "sqlite":
                engine.dispose()
        if done.changed:
            log.info("database schema migrated from revision %s to %s", done.before or "none", done.after)
        return done

    def close(self) -> None:
        with self._lock:
            try:
                self._conn.close()
            except self._errors as exc:
                raise LedgerError(f"closing the database failed: {exc}") from exc

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """One write transaction: COMMIT when the block ends, ROLLBACK if it raises.

        Database errors become LedgerError; other exceptions (bugs, or the
        caller's own refusals) roll back and propagate unchanged.
        """
        with self._lock:
            tx = Tx(self._conn, self._dialect, self._errors)
            tx.execute("BEGIN IMMEDIATE" if self.backend == "sqlite" else "BEGIN")
            try:
                yield tx
                tx.execute("COMMIT")
            except BaseException:
                try:
                    self._conn.execute("ROLLBACK")
                except self._errors:
                    pass  # the transaction is already gone (connection lost): nothing to undo
                raise

    @contextmanager
    def read(self) -> Iterator[Tx]:
        """Queries under the lock, outside any explicit transaction."""
        with self._lock:
            yield Tx(self._conn, self._dialect, self._errors)

    def ping(self) -> None:
        """Raise LedgerError unless the database answers a query."""
        with self.read() as tx:
            tx.query("SELECT 1 AS one")


class Tx:
    """The queries and writes the service needs, on a connection whose lock is held."""

    def __init__(self, conn: Any, dialect: _Dialect, errors: tuple[type[BaseException], ...]) -> None:
        self._conn = conn
        self._dialect = dialect
        self._errors = errors

    # --- plumbing ----------------------------------------------------------------

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        try:
            self._conn.execute(self._dialect.sql(sql), tuple(params))
        except self._errors as exc:
            raise LedgerError(f"database statement failed: {exc}") from exc

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = [tuple(r) for r in rows]
        if not rows:
            return
        try:
            self._conn.cursor().executemany(self._dialect.sql(sql), rows)
        except self._errors as exc:
            raise LedgerError(f"database statement failed: {exc}") from exc

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        try:
            cursor = self._conn.execute(self._dialect.sql(sql), tuple(params))
            names = [d[0] for d in cursor.description]
            return [{n: _plain(v) for n, v in zip(names, row, strict=True)} for row in cursor.fetchall()]
        except self._errors as exc:
            raise LedgerError(f"database query failed: {exc}") from exc

    def _in(self, values: Sequence[Any]) -> str:
        return ", ".join("?" for _ in values)

    # --- several processes on one database ------------------------------------------

    def lock_keys(self, keys: Iterable[str]) -> None:
        """Hold these keys until the transaction ends, against every other process.

        PostgreSQL: `pg_advisory_xact_lock` on a 64-bit hash of each key, taken
        in ascending order (every transaction takes all its keys first, in the
        same order, so two never wait on each other in a cycle; a hash collision
        only serialises a little more). SQLite: nothing to do, `BEGIN IMMEDIATE`
        already holds the whole file.
        """
        if self._dialect.name != "postgresql":
            return
        locks = sorted({lock_id(k) for k in keys})
        if locks:
            # One statement: unnest yields the sorted array in order, and the locks are
            # taken row by row in that order (one round trip instead of one per key).
            self.execute("SELECT pg_advisory_xact_lock(k) FROM unnest(?::bigint[]) AS k", (locks,))

    def document_heads(self, session_ids: Iterable[str]) -> dict[str, bytes]:
        """The stored `heads_hash` of these sessions' documents (those stored)."""
        ids = sorted(set(session_ids))
        out: dict[str, bytes] = {}
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            rows = self.query(
                f"SELECT session_id, heads_hash FROM documents WHERE session_id IN ({self._in(part)})", part
            )
            out.update((r["session_id"], r["heads_hash"]) for r in rows)
        return out

    # --- documents ---------------------------------------------------------------

    def documents(self) -> list[tuple[str, bytes]]:
        rows = self.query("SELECT session_id, data FROM documents ORDER BY session_id")
        return [(r["session_id"], r["data"]) for r in rows]

    def document(self, session_id: str) -> bytes | None:
        rows = self.query("SELECT data FROM documents WHERE session_id = ?", (session_id,))
        return rows[0]["data"] if rows else None

    def save_document(self, session_id: str, data: bytes, heads_hash: bytes, now: int) -> None:
        self.execute(
            "INSERT INTO documents (session_id, data, heads_hash, updated) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (session_id) DO UPDATE SET data = excluded.data, "
            "heads_hash = excluded.heads_hash, updated = excluded.updated",
            (session_id, data, heads_hash, now),
        )

    # --- site configs (one Automerge document per site: its signed tariffs) -------

    def site_configs(self) -> list[tuple[str, bytes]]:
        return [(r["site"], r["data"]) for r in self.query("SELECT site, data FROM site_configs ORDER BY site")]

    def save_site_config(self, site: str, data: bytes, now: int) -> None:
        self.execute(
            "INSERT INTO site_configs (site, data, updated) VALUES (?, ?, ?) "
            "ON CONFLICT (site) DO UPDATE SET data = excluded.data, updated = excluded.updated",
            (site, data, now),
        )

    def unpriced(self, session_ids: Iterable[str]) -> list[str]:
        """Of these sessions, those whose ledger row has no price and no receipt yet."""
        ids = sorted(set(session_ids))
        if not ids:
            return []
        rows = self.query(
            f"SELECT session_id FROM ledger WHERE session_id IN ({self._in(ids)}) "
            "AND cost_cents IS NULL AND receipt IS NULL",
            ids,
        )
        return [r["session_id"] for r in rows]

    def unpriced_of_site(self, site: str, limit: int) -> list[str]:
        """A site's completed sessions that have no price (receipted or not), oldest start first."""
        rows = self.query(
            "SELECT session_id FROM ledger WHERE site = ? AND cost_cents IS NULL "
            "AND state IN ('completed', 'reconciled') ORDER BY start_ts, session_id LIMIT ?",
            (site, int(limit)),
        )
        return [r["session_id"] for r in rows]

    # --- devices -----------------------------------------------------------------

    def device_keys(self, device_ids: Iterable[str]) -> dict[str, bytes]:
        ids = sorted(set(device_ids))
        if not ids:
            return {}
        rows = self.query(f"SELECT device_id, public_key FROM devices WHERE device_id IN ({self._in(ids)})", ids)
        return {r["device_id"]: r["public_key"] for r in rows}

    def pin_devices(self, keys: Mapping[str, bytes], session_id: str, now: int) -> None:
        self.executemany(
            "INSERT INTO devices (device_id, public_key, first_session, first_seen) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (device_id) DO NOTHING",
            [(d, k, session_id, now) for d, k in sorted(keys.items())],
        )

    # --- events ------------------------------------------------------------------

    def event_status(self, event_ids: Iterable[str]) -> dict[str, str]:
        ids = sorted(set(event_ids))
        out: dict[str, str] = {}
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            rows = self.query(f"SELECT event_id, status FROM events WHERE event_id IN ({self._in(part)})", part)
            out.update((r["event_id"], r["status"]) for r in rows)
        return out

    def events_at(self, slots: Iterable[tuple[str, int]]) -> list[dict[str, Any]]:
        """Every stored event in the given (device_id, seq) slots, whatever its status."""
        # One seq range per device (a session's events are consecutive in their
        # device's chain), all devices in one statement, filtered here to the slots asked for.
        wanted = set(slots)
        ranges: dict[str, tuple[int, int]] = {}
        for device_id, seq in wanted:
            low, high = ranges.get(device_id, (seq, seq))
            ranges[device_id] = (min(low, seq), max(high, seq))
        devices = sorted(ranges.items())
        out: list[dict[str, Any]] = []
        for start in range(0, len(devices), 150):
            part = devices[start : start + 150]
            where = " OR ".join("(device_id = ? AND seq BETWEEN ? AND ?)" for _ in part)
            rows = self.query(
                f"SELECT event_id, device_id, seq, session_id, chain_hash, prev, status FROM events WHERE {where}",
                [v for device_id, (low, high) in part for v in (device_id, low, high)],
            )
            out.extend(r for r in rows if (r["device_id"], r["seq"]) in wanted)
        out.sort(key=lambda r: (r["device_id"], r["seq"], r["event_id"]))
        return out

    def insert_events(self, rows: Iterable[Mapping[str, Any]]) -> None:
        cols = ", ".join(EVENT_COLUMNS)
        self.executemany(
            f"INSERT INTO events ({cols}) VALUES ({self._in(EVENT_COLUMNS)}) ON CONFLICT (event_id) DO NOTHING",
            [[row[c] for c in EVENT_COLUMNS] for row in rows],
        )

    def session_events(self, session_id: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT event_id, device_id, seq, type, ts, meter_wh, data, status, applied, first_seen "
            "FROM events WHERE session_id = ? ORDER BY ts, device_id, seq, event_id",
            (session_id,),
        )

    def mark_applied(self, session_id: str, applied: Iterable[str]) -> None:
        ids = sorted(set(applied))
        if not ids or len(ids) > 500:
            self.execute("UPDATE events SET applied = 0 WHERE session_id = ?", (session_id,))
            self.executemany("UPDATE events SET applied = 1 WHERE event_id = ?", [(e,) for e in ids])
            return
        self.execute(  # one statement: this session's applied events 1, the rest 0
            f"UPDATE events SET applied = CASE WHEN event_id IN ({self._in(ids)}) THEN 1 ELSE 0 END "
            "WHERE session_id = ?",
            (*ids, session_id),
        )

    # --- a batch of sessions at once (the ingest path, `_ingest.py`) -------------

    def _chunks(self, values: Iterable[Any], size: int = 500) -> Iterator[list[Any]]:
        ordered = sorted(set(values))
        for start in range(0, len(ordered), size):
            yield ordered[start : start + size]

    def ledger_rows_of(self, session_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The ledger rows of these sessions (those that have one), by session id."""
        out: dict[str, dict[str, Any]] = {}
        for part in self._chunks(session_ids):
            rows = self.query(
                f"SELECT {', '.join(LEDGER_COLUMNS)} FROM ledger WHERE session_id IN ({self._in(part)})", part
            )
            out.update((r["session_id"], r) for r in rows)
        return out

    def events_of(self, session_ids: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        """The stored events of these sessions: event_id, status, applied and data, by session id."""
        out: dict[str, list[dict[str, Any]]] = {}
        for part in self._chunks(session_ids):
            rows = self.query(
                f"SELECT session_id, event_id, status, applied, data FROM events WHERE session_id IN ({self._in(part)}) "
                "ORDER BY session_id, event_id",
                part,
            )
            for r in rows:
                out.setdefault(r["session_id"], []).append(r)
        return out

    def pin_devices_of(self, rows: Iterable[tuple[str, bytes, str, int]]) -> None:
        """Pin (device_id, public_key, first_session, now); a device pinned before keeps its key."""
        self.executemany(
            "INSERT INTO devices (device_id, public_key, first_session, first_seen) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (device_id) DO NOTHING",
            rows,
        )

    def insert_event_rows(self, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        """Insert events given as rows of `columns` (a subset of the table's); known ids are left alone."""
        self.executemany(
            f"INSERT INTO events ({', '.join(columns)}) VALUES ({self._in(columns)}) ON CONFLICT (event_id) DO NOTHING",
            rows,
        )

    def set_applied(self, rows: Iterable[tuple[int, str]]) -> None:
        """Set (applied, event_id): whether the billing fold used each event."""
        self.executemany("UPDATE events SET applied = ? WHERE event_id = ?", rows)

    def conflict_counts(self, session_ids: Iterable[str]) -> dict[str, int]:
        """How many conflicts each of these sessions has (sessions with none are left out)."""
        out: dict[str, int] = {}
        for part in self._chunks(session_ids):
            rows = self.query(
                f"SELECT session_id, count(*) AS n FROM conflicts WHERE session_id IN ({self._in(part)}) "
                "GROUP BY session_id",
                part,
            )
            out.update((r["session_id"], int(r["n"])) for r in rows)
        return out

    def upsert_ledger_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """`upsert_ledger` for many rows in one statement."""
        cols = ", ".join(LEDGER_COLUMNS)
        updates = ", ".join(f"{c} = excluded.{c}" for c in LEDGER_COLUMNS if c not in ("session_id", "first_seen"))
        self.executemany(
            f"INSERT INTO ledger ({cols}) VALUES ({self._in(LEDGER_COLUMNS)}) "
            f"ON CONFLICT (session_id) DO UPDATE SET {updates}",
            [[row[c] for c in LEDGER_COLUMNS] for row in rows],
        )

    def save_documents(self, rows: Iterable[tuple[str, bytes, bytes, int]]) -> None:
        """`save_document` for many (session_id, data, heads_hash, now) in one statement."""
        self.executemany(
            "INSERT INTO documents (session_id, data, heads_hash, updated) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (session_id) DO UPDATE SET data = excluded.data, "
            "heads_hash = excluded.heads_hash, updated = excluded.updated",
            rows,
        )

    # --- conflicts ---------------------------------------------------------------

    def add_conflicts(self, rows: Iterable[tuple[str, str, str, str]], now: int) -> None:
        """Record (session_id, event_id, kind, detail) conflicts; known ones are left as they are."""
        self.executemany(
            "INSERT INTO conflicts (session_id, event_id, kind, detail, first_seen) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (session_id, event_id, kind) DO NOTHING",
            [(*row, now) for row in rows],
        )

    def conflicts(self, session_id: str | None = None) -> list[dict[str, Any]]:
        where, params = ("WHERE session_id = ?", (session_id,)) if session_id is not None else ("", ())
        return self.query(
            f"SELECT session_id, event_id, kind, detail, first_seen FROM conflicts {where} "
            "ORDER BY session_id, first_seen, kind, event_id",
            params,
        )

    def conflict_count(self, session_id: str) -> int:
        return int(self.query("SELECT count(*) AS n FROM conflicts WHERE session_id = ?", (session_id,))[0]["n"])

    # --- ledger ------------------------------------------------------------------

    def ledger_row(self, session_id: str) -> dict[str, Any] | None:
        rows = self.query(f"SELECT {', '.join(LEDGER_COLUMNS)} FROM ledger WHERE session_id = ?", (session_id,))
        return rows[0] if rows else None

    def ledger_rows(self, site: str | None = None) -> list[dict[str, Any]]:
        where, params = ("WHERE site = ?", (site,)) if site is not None else ("", ())
        return self.query(f"SELECT {', '.join(LEDGER_COLUMNS)} FROM ledger {where} ORDER BY session_id", params)

    def upsert_ledger(self, row: Mapping[str, Any]) -> None:
        """Insert or update a session's row; `first_seen` keeps its first value."""
        cols = ", ".join(LEDGER_COLUMNS)
        updates = ", ".join(f"{c} = excluded.{c}" for c in LEDGER_COLUMNS if c not in ("session_id", "first_seen"))
        self.execute(
            f"INSERT INTO ledger ({cols}) VALUES ({self._in(LEDGER_COLUMNS)}) "
            f"ON CONFLICT (session_id) DO UPDATE SET {updates}",
            [row[c] for c in LEDGER_COLUMNS],
        )

    # --- reviews (the operator's decisions on flagged sessions) -------------------

    def add_review(self, session_id: str, decision: str, reviewer: str, note: str, now: int) -> None:
        """Record one decision; earlier ones stay (the history is the audit trail)."""
        self.execute(
            "INSERT INTO reviews (session_id, decision, reviewer, note, decided_ts) VALUES (?, ?, ?, ?, ?)",
            (session_id, decision, reviewer, note, now),
        )

    def reviews(self, session_id: str | None = None) -> list[dict[str, Any]]:
        """Decisions, oldest first (of one session, or all)."""
        where, params = ("WHERE session_id = ?", (session_id,)) if session_id is not None else ("", ())
        return self.query(
            f"SELECT session_id, decision, reviewer, note, decided_ts FROM reviews {where} "
            "ORDER BY decided_ts, session_id, decision",
            params,
        )

    # --- stats -------------------------------------------------------------------

    def add_stats(self, deltas: Mapping[str, int]) -> None:
        self.executemany(
            "INSERT INTO stats (name, value) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET value = stats.value + excluded.value",
            [(name, int(v)) for name, v in sorted(deltas.items()) if v],
        )

    def stats(self) -> dict[str, int]:
        counters = {r["name"]: int(r["value"]) for r in self.query("SELECT name, value FROM stats")}
        counts = self.query(
            "SELECT (SELECT count(*) FROM ledger) AS sessions, "
            "(SELECT count(*) FROM events) AS events, "
            "(SELECT count(*) FROM conflicts) AS conflicts, "
            "(SELECT count(*) FROM ledger WHERE receipt IS NOT NULL) AS receipts"
        )[0]
        return {**counters, **{k: int(v) for k, v in counts.items()}}


def lock_id(key: str) -> int:
    """A signed 64-bit number for a lock key (PostgreSQL's advisory lock space)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big", signed=True)


def _plain(value: Any) -> Any:
    """Byte strings come back as bytes from both drivers (PostgreSQL may hand out memoryview)."""
    return bytes(value) if isinstance(value, memoryview | bytearray) else value
