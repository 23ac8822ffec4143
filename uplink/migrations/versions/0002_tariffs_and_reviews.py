"""Tariffs and operator reviews: four ledger columns, the site_configs and reviews tables.

Revision ID: 0002
Revises: 0001

What releases before migrations added to the first schema, one change at a
time: a hand-written `ALTER TABLE ledger ADD COLUMN` on open for the review
flag and the tariff that priced a session, and `CREATE TABLE IF NOT EXISTS`
for the site configs (signed tariffs) and the operator's review decisions.
Like 0001 it adds only what is missing, because a database made before
migrations may hold any of it already (see 0001's note); a database that 0001
created holds none of it. The columns are nullable, so existing rows keep
their values and read NULL in the new columns, as they did before.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

LEDGER_COLUMNS = (
    ("review", sa.Text),
    ("tariff_id", sa.Text),
    ("tariff_version", sa.BigInteger),
    ("pricing", sa.Text),
)


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    present = {column["name"] for column in inspector.get_columns("ledger")}
    for name, kind in LEDGER_COLUMNS:
        if name not in present:
            op.add_column("ledger", sa.Column(name, kind, nullable=True))
    tables = set(inspector.get_table_names())
    if "site_configs" not in tables:
        op.create_table(
            "site_configs",
            sa.Column("site", sa.Text, primary_key=True),
            sa.Column("data", sa.LargeBinary, nullable=False),
            sa.Column("updated", sa.BigInteger, nullable=False),
        )
    if "reviews" not in tables:
        # One row per decision, never updated: the latest row is the standing one.
        op.create_table(
            "reviews",
            sa.Column("session_id", sa.Text, nullable=False),
            sa.Column("decision", sa.Text, nullable=False),
            sa.Column("reviewer", sa.Text, nullable=False),
            sa.Column("note", sa.Text, nullable=False),
            sa.Column("decided_ts", sa.BigInteger, nullable=False),
        )
    if "reviews_session" not in {index["name"] for index in sa.inspect(op.get_bind()).get_indexes("reviews")}:
        op.create_index("reviews_session", "reviews", ["session_id", "decided_ts"])


def downgrade() -> None:
    op.drop_index("reviews_session", table_name="reviews")
    op.drop_table("reviews")
    op.drop_table("site_configs")
    # SQLite drops a column by copying the table (alembic's batch mode); PostgreSQL alters it.
    with op.batch_alter_table("ledger") as batch:
        for name, _kind in reversed(LEDGER_COLUMNS):
            batch.drop_column(name)
