"""The Alembic revision 0001_ledger and ``ledger/schema.py`` describe the same tables."""

from __future__ import annotations

import migrations
import pytest
from sqlalchemy import inspect

from ledger import schema
from ledger.db import make_engine


def _shape(columns) -> dict:
    return {c["name"]: (c["nullable"], type(c["type"]).__name__) for c in columns}


def test_migration_matches_schema_module(db_url):
    engine = make_engine(db_url)
    migrations.upgrade(engine)
    migrations.upgrade(engine)  # idempotent
    try:
        insp = inspect(engine)
        for table in schema.metadata.sorted_tables:
            reflected = _shape(insp.get_columns(table.name))
            declared = {c.name: (c.nullable, type(c.type.dialect_impl(engine.dialect)).__name__)
                        for c in table.columns}
            assert set(reflected) == set(declared), table.name
            for name, (nullable, _) in declared.items():
                assert reflected[name][0] == nullable, (table.name, name)
            indexes = {ix["name"]: tuple(ix["column_names"]) for ix in insp.get_indexes(table.name)}
            for ix in table.indexes:
                assert indexes.get(ix.name) == tuple(c.name for c in ix.columns), (table.name, ix.name)
            assert insp.get_foreign_keys(table.name) == []  # see ledger.schema: checked by verify()
        if engine.dialect.name == "postgresql":
            with engine.connect() as conn:
                options = dict(conn.exec_driver_sql(
                    "SELECT relname, reloptions::text FROM pg_class WHERE relname IN "
                    "('ledger_accounts', 'ledger_pending')").all())
            assert all(f"fillfactor={schema.FILLFACTOR_UPDATED_TABLES}" in v for v in options.values()), options
    finally:
        engine.dispose()


def test_array_literals_quote_every_element_exactly():
    """The fast path of the PostgreSQL array literal builder agrees with the careful one."""
    import random

    from ledger.store_pg import _text_array_slow, int_array, text_array

    rng = random.Random(5)
    alphabet = ['a', 'b', '"', "\\", "'", ",", "{", "}", " ", "中", "\n"]
    for _ in range(2000):
        items = ["".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 5))) for _ in range(rng.randrange(0, 4))]
        if rng.random() < 0.2:
            items.append(None)
        expected = _text_array_slow(items) if items else "'{}'"
        assert text_array(items) == expected, items
    assert int_array([1, None, -3]) == "'{1,NULL,-3}'"


@pytest.mark.pg
def test_array_literals_round_trip_through_postgresql(pg_url):
    import psycopg

    from ledger.store_pg import text_array

    items = ['plain', 'with "quote"', "back\\slash", "it's", "{braces},", "", "中文", None]
    with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        assert conn.execute(f"SELECT {text_array(items)}::text[]").fetchone()[0] == items
