"""Several `meshnode cloud` processes on one PostgreSQL database keep exactly-once.

Two real cloud processes (127.0.19.1 and 127.0.19.2) share one real PostgreSQL
database (`tests/pg.py`). Four leaders upload the same completed sessions at
once, split and overlapping across the two instances, with uplink's
`CloudClient` like a forwarder does. Afterwards:

- the ledger holds exactly one row per session, with a receipt;
- across both instances' logs, each session's receipt was issued exactly once
  (`issued receipt for session ...`), and the issuance counter agrees;
- every leader's copy of every session ends with the ledger's receipt.

Without serialising reconciliation across instances in the database, both
instances reconcile the same session at once: each issues a receipt (the ledger
keeps whichever commits last), or the two transactions deadlock on each other's
event rows and a leader gets a 503.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import trio
from automerge.core import Document

from crdt import EventSigner, Replica, read_session
from uplink import CloudClient, CloudSyncRequest
from uplink._cloud import verify_receipt

from .pg import pg_server, pg_url  # noqa: F401  (fixtures)
from .procs import free_port
from .test_cloud import completed
from .test_e2e_uplink import CloudProcess

pytestmark = pytest.mark.timeout(300)

HOSTS = ("127.0.19.1", "127.0.19.2")
SESSIONS = 60
CLOUD = "cloud"


def build(count: int) -> dict[str, Document]:
    signers = [EventSigner(f"charger-{d}", nacl.signing.SigningKey(bytes([d + 1]) * 32)) for d in range(4)]
    docs = {}
    for k in range(count):
        sid = f"multi-{k:03d}"
        docs[sid] = completed(sid, signers[k % len(signers)], ts=1000 + 10 * k)
    return docs


class Lockstep:
    """Leaders that send their k-th request together (each waits up to 2 s for the others),
    so two instances reconcile the same sessions at the same moment, not one after the other."""

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.arrived: dict[int, int] = {}
        self.events: dict[int, trio.Event] = {}

    async def wait(self, step: int) -> None:
        event = self.events.setdefault(step, trio.Event())
        self.arrived[step] = self.arrived.get(step, 0) + 1
        if self.arrived[step] >= self.parties:
            event.set()
        with trio.move_on_after(2.0):
            await event.wait()


async def leader(
    url: str, node_id: str, docs: dict[str, Document], batch: int, lockstep: Lockstep | None = None
) -> None:
    """Upload like a leader's forwarder: sync rounds per batch (in the order of `docs`) until
    nothing is left to send."""
    step = 0
    replica = Replica(docs)
    client = CloudClient(url)
    try:
        ids = list(docs)  # in the order given
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            for _round in range(20):
                msgs = {d: m for d in chunk if (m := replica.generate(CLOUD, d)) is not None}
                if not msgs:
                    break
                if lockstep is not None:
                    step += 1
                    await lockstep.wait(step)
                reply, _size = await client.sync(CloudSyncRequest(node_id, "field", msgs), timeout=60.0)
                assert not reply.errors, f"{node_id}: the cloud refused {reply.errors}"
                for d, msg in reply.msgs.items():
                    replica.receive(CLOUD, d, msg)
            else:
                raise AssertionError(f"{node_id}: a batch did not settle within 20 rounds")
    finally:
        await client.aclose()


def ledger_rows(url: str) -> list[dict[str, Any]]:
    import psycopg

    with psycopg.connect(url) as conn:
        cur = conn.execute("SELECT session_id, receipt FROM ledger ORDER BY session_id")
        return [{"session_id": s, "receipt": bytes(r) if r is not None else None} for s, r in cur.fetchall()]


def issued_in(log: Path) -> list[str]:
    return re.findall(r"issued receipt for session '([^']+)'", log.read_text())


async def test_two_instances_on_one_postgresql_issue_one_receipt_per_session(pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    key = tmp_path / "cloud.key"
    clouds = [
        CloudProcess(host, free_port(host), pg_url, key, tmp_path / f"cloud-{i}.log") for i, host in enumerate(HOSTS)
    ]
    clouds[0].start()  # the first creates the schema and the key; the second finds both
    clouds[1].start()
    try:
        docs = build(SESSIONS)
        ids = sorted(docs)
        half = len(ids) // 2

        def share(selected: list[str]) -> dict[str, Document]:
            return {d: Document.load(docs[d].save()) for d in selected}

        together = Lockstep(2)
        uploads = [  # (instance, leader, its sessions, lockstep): every session goes to both instances
            (0, "leader-a", share(ids), together),
            (1, "leader-b", share(ids), together),
            # Overlapping halves, crossed, last session first (they meet the others half-way).
            (1, "leader-c", share(list(reversed(ids[: half + 10]))), None),
            (0, "leader-d", share(list(reversed(ids[half - 10 :]))), None),
        ]
        async with trio.open_nursery() as nursery:
            for instance, node, mine, lockstep in uploads:
                nursery.start_soon(leader, clouds[instance].url, node, mine, 5, lockstep)

        rows = ledger_rows(pg_url)
        assert [r["session_id"] for r in rows] == ids, "one ledger row per session"
        assert all(r["receipt"] is not None for r in rows)
        receipts = {r["session_id"]: r["receipt"] for r in rows}
        issued = [s for cloud in clouds for s in issued_in(cloud.log_path)]
        twice = sorted({s for s in issued if issued.count(s) > 1})
        assert not twice, f"{len(twice)} sessions got more than one receipt, e.g. {twice[:5]}"
        assert sorted(issued) == ids, "every session's receipt was issued once, by one of the instances"
        for cloud in clouds:
            stats = cloud.get("/v1/stats")
            assert stats["sessions"] == SESSIONS and stats["receipts"] == SESSIONS, stats
        for _instance, node, mine, _lockstep in uploads:
            for d, doc in mine.items():
                got = read_session(doc).receipt
                assert got is not None and got == receipts[d], f"{node} ended without the ledger's receipt for {d}"
                verify_receipt(got)
    finally:
        for cloud in clouds:
            cloud.kill()


START_HOSTS = ("127.0.14.1", "127.0.14.2")


def test_two_instances_starting_at_once_on_a_new_postgresql_migrate_it_once(pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    """Two `meshnode cloud` processes start on an empty database at the same moment: both are
    inside their schema upgrade at once (the test holds the migration lock until both wait on
    it), one migrates, the other finds the schema done, and both serve on their first start
    (no retry: a start that failed is a failure here)."""
    import subprocess
    import sys
    import time

    import psycopg

    from uplink import load_or_create_cloud_key, migrations

    from .test_e2e_uplink import REPO, _ready_line

    key = tmp_path / "cloud.key"
    load_or_create_cloud_key(key)  # the key is shared; this test is about the schema
    clouds = [
        CloudProcess(host, free_port(host), pg_url, key, tmp_path / f"start-{i}.log")
        for i, host in enumerate(START_HOSTS)
    ]

    def waiting(conn: psycopg.Connection[Any]) -> int:
        query = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        row = conn.execute(query).fetchone()
        return int(row[0]) if row else 0

    with psycopg.connect(pg_url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (migrations.MIGRATION_LOCK,))
        try:
            for cloud in clouds:
                command = [sys.executable, "-m", "meshnode.cli", "cloud", "--db", pg_url]
                command += ["--bind", cloud.host, "--port", str(cloud.port), "--key", str(key)]
                with open(cloud.log_path, "a") as log:
                    cloud.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO)
            deadline = time.monotonic() + 90
            while waiting(holder) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert waiting(holder) == 2, "both instances wait for the migration lock"
            holder.execute("SELECT pg_advisory_unlock(%s)", (migrations.MIGRATION_LOCK,))
            for cloud in clouds:
                assert cloud.proc is not None
                line = _ready_line(cloud.proc, 90)
                assert line, f"{cloud.host} did not start; log:\n{cloud.log_path.read_text()[-3000:]}"
            migrated = [
                cloud.host
                for cloud in clouds
                if "database schema migrated from revision none to 0002" in cloud.log_path.read_text()
            ]
            assert len(migrated) == 1, migrated
            for cloud in clouds:
                assert cloud.get("/v1/stats")["sessions"] == 0
        finally:
            for cloud in clouds:
                cloud.kill()
