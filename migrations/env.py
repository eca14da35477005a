"""Alembic environment for slaq.

The connection comes, in order of preference, from ``config.attributes["connection"]`` (what
:func:`slaq.platform.db.migrate` passes), ``SLAQ_DATABASE_URL`` (the ``alembic`` CLI), or the
``sqlalchemy.url`` option.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from slaq.platform.db import make_engine, normalize_url
from slaq.platform.models import Base

config = context.config
target_metadata = Base.metadata

# Only the CLI has an ini file; programmatic runs keep the application's logging as it is.
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    return normalize_url(os.environ.get("SLAQ_DATABASE_URL") or config.get_main_option(
        "sqlalchemy.url"))


def _configure(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      compare_type=True, compare_server_default=True)


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    with make_engine(_url()).connect() as connection:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
