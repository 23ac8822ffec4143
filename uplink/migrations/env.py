"""Alembic's environment for the cloud ledger: run by `uplink.migrations`, never by hand.

`uplink.migrations.upgrade` / `downgrade` open the connection, begin the
transaction and (on PostgreSQL) take the migration lock, then hand the
connection in `config.attributes["connection"]`; this file only runs the
revisions on it, inside that transaction.
"""

from alembic import context

if context.is_offline_mode():
    raise RuntimeError(
        "the ledger's first revisions look at what the database already holds, so they run online only: "
        "`meshnode cloud migrate --db URL`"
    )

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the ledger's migrations through uplink.migrations (`meshnode cloud migrate`)")

context.configure(connection=connection, target_metadata=None)
with context.begin_transaction():
    context.run_migrations()
