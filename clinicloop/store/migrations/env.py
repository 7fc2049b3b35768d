"""Alembic environment for the store's migrations.

`Store.migrate()` passes an open connection in `config.attributes["connection"]`. From the `alembic`
command line (see `clinicloop/store/db.py`) the URL is given as `-x url=...`.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from clinicloop.store.db import Base, Store


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise SystemExit("give the store URL: alembic -c clinicloop/store/alembic.ini "
                         "-x url=sqlite:///var/clinicloop.db <command>")
    return str(url)


def _run(connection: Connection) -> None:
    # SQLite alters few things in place; batch mode rebuilds the table for the rest.
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif (shared := context.config.attributes.get("connection")) is not None:
    _run(shared)
else:
    store = Store(_url())
    with store.engine.begin() as own:
        _run(own)
    store.dispose()
