"""The first release's schema: documents, ledger, events, conflicts, devices, stats.

Revision ID: 0001
Revises: (none)

Adopts a database made before the ledger had migrations: such a database has
no `alembic_version` table, so the upgrade starts here, and this revision (like
0002) creates only the tables and indexes that are missing and leaves the ones
present as they are, rows and all. A new database gets them all. Revisions
after 0002 run on databases that these two brought to a known shape, so they
are plain changes (no "if missing").

The column types are the ones the hand-written DDL of earlier releases used
(TEXT, BIGINT, INTEGER, and BLOB on SQLite / BYTEA on PostgreSQL through
`LargeBinary`), so a database made either way has the same schema.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _missing_tables() -> set[str]:
    present = set(sa.inspect(op.get_bind()).get_table_names())
    return {"documents", "ledger", "events", "conflicts", "devices", "stats"} - present


def _create_index(name: str, table: str, columns: list[str]) -> None:
    if name not in {index["name"] for index in sa.inspect(op.get_bind()).get_indexes(table)}:
        op.create_index(name, table, columns)


def upgrade() -> None:
    missing = _missing_tables()
    if "documents" in missing:
        op.create_table(
            "documents",
            sa.Column("session_id", sa.Text, primary_key=True),
            sa.Column("data", sa.LargeBinary, nullable=False),
            sa.Column("heads_hash", sa.LargeBinary, nullable=False),
            sa.Column("updated", sa.BigInteger, nullable=False),
        )
    if "ledger" in missing:
        op.create_table(
            "ledger",
            sa.Column("session_id", sa.Text, primary_key=True),
            sa.Column("site", sa.Text, nullable=False),
            sa.Column("charger", sa.Text, nullable=False),
            sa.Column("connector", sa.BigInteger, nullable=False),
            sa.Column("id_token", sa.Text, nullable=False),
            sa.Column("start_ts", sa.BigInteger),
            sa.Column("stop_ts", sa.BigInteger),
            sa.Column("energy_wh", sa.BigInteger, nullable=False),
            sa.Column("cost_cents", sa.BigInteger),
            sa.Column("currency", sa.Text),
            sa.Column("state", sa.Text, nullable=False),
            sa.Column("conflicts", sa.BigInteger, nullable=False),
            sa.Column("receipt_heads", sa.Text),
            sa.Column("receipt", sa.LargeBinary),
            sa.Column("receipt_ts", sa.BigInteger),
            sa.Column("first_seen", sa.BigInteger, nullable=False),
            sa.Column("updated", sa.BigInteger, nullable=False),
        )
    if "events" in missing:
        # No UNIQUE (device_id, seq): a fork is two rows in one slot (see uplink/_ledger.py).
        op.create_table(
            "events",
            sa.Column("event_id", sa.Text, primary_key=True),
            sa.Column("device_id", sa.Text, nullable=False),
            sa.Column("seq", sa.BigInteger, nullable=False),
            sa.Column("session_id", sa.Text, nullable=False),
            sa.Column("type", sa.Text, nullable=False),
            sa.Column("ts", sa.BigInteger, nullable=False),
            sa.Column("meter_wh", sa.BigInteger),
            sa.Column("chain_hash", sa.LargeBinary, nullable=False),
            sa.Column("prev", sa.LargeBinary, nullable=False),
            sa.Column("data", sa.LargeBinary, nullable=False),
            sa.Column("status", sa.Text, nullable=False),
            sa.Column("applied", sa.Integer, nullable=False, server_default=sa.text("0")),
            sa.Column("first_seen", sa.BigInteger, nullable=False),
        )
    _create_index("events_slot", "events", ["device_id", "seq"])
    _create_index("events_session", "events", ["session_id"])
    if "conflicts" in missing:
        op.create_table(
            "conflicts",
            sa.Column("session_id", sa.Text, nullable=False),
            sa.Column("event_id", sa.Text, nullable=False),
            sa.Column("kind", sa.Text, nullable=False),
            sa.Column("detail", sa.Text, nullable=False),
            sa.Column("first_seen", sa.BigInteger, nullable=False),
            sa.UniqueConstraint("session_id", "event_id", "kind"),
        )
    if "devices" in missing:
        op.create_table(
            "devices",
            sa.Column("device_id", sa.Text, primary_key=True),
            sa.Column("public_key", sa.LargeBinary, nullable=False),
            sa.Column("first_session", sa.Text, nullable=False),
            sa.Column("first_seen", sa.BigInteger, nullable=False),
        )
    if "stats" in missing:
        op.create_table(
            "stats",
            sa.Column("name", sa.Text, primary_key=True),
            sa.Column("value", sa.BigInteger, nullable=False),
        )


def downgrade() -> None:
    for table in ("stats", "devices", "conflicts", "events", "ledger", "documents"):
        op.drop_table(table)
