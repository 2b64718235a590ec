"""Alembic environment: the engine or connection comes from token_exchange.db."""
from alembic import context

from token_exchange.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online():
    connection = config.attributes.get("connection")
    if connection is None:
        from token_exchange.db import make_engine
        from token_exchange.settings import Settings
        engine = config.attributes.get("engine") or make_engine(Settings.from_env().database_url)
        with engine.begin() as connection:
            _run(connection)
    else:
        _run(connection)


def _run(connection):
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=True, compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
