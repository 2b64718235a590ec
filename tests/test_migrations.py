"""The schema is made only by Alembic, and the migrations make exactly the models' schema."""
from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from token_exchange import db
from token_exchange.models import Base


def _diff(engine):
    with engine.connect() as conn:
        return compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)


def test_migrations_produce_exactly_the_models_schema(db_url):
    engine = db.make_engine(db_url)
    db.upgrade(engine)
    assert db.is_current(engine)
    assert _diff(engine) == []
    engine.dispose()


def test_migrations_downgrade_to_nothing_and_upgrade_again(db_url):
    engine = db.make_engine(db_url)
    db.upgrade(engine)
    db.downgrade(engine, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    db.upgrade(engine)
    assert _diff(engine) == []
    engine.dispose()


def test_plain_postgresql_url_picks_the_installed_driver():
    assert db.normalize_url("postgresql://u@h/d").startswith("postgresql+psycopg://")
    assert db.normalize_url("sqlite:///x.db") == "sqlite:///x.db"
