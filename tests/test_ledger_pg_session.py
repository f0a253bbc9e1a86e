"""The PostgreSQL hot path's sessions: prepared statements that disappear, connections the
server kills, and the shared pool left usable for everyone else (marker pg)."""

from __future__ import annotations

import sys
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

import migrations
from ledger.db import make_engine
from ledger.store_pg import HotPool

sys.path.insert(0, str(Path(__file__).parent))
from test_ledger_support import World  # noqa: E402

pytestmark = pytest.mark.pg


@pytest.fixture
def world(pg_url):
    engine = make_engine(pg_url, pool_size=4)
    migrations.upgrade(engine)
    w = World(engine)
    w.standard()
    yield w
    engine.dispose()


def _hot_connections(engine) -> list:
    pool = HotPool.of(engine)
    return [held.raw for held in list(pool._idle)]


def test_statements_dropped_by_deallocate_all_are_prepared_again(world):
    world.fund("wallet", 100)
    for raw in _hot_connections(world.ledger.engine):
        raw.execute("DEALLOCATE ALL")
    assert world.submit(world.t("wallet", "merchant", 10)).ok
    assert world.balance("merchant").credits_posted == 10


def test_connections_killed_by_the_server_are_replaced(world, pg_admin_url):
    world.fund("wallet", 100)
    pids = [raw.info.backend_pid for raw in _hot_connections(world.ledger.engine)]
    assert pids
    with psycopg.connect(pg_admin_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as admin:
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert world.submit(world.t("wallet", "merchant", 10)).ok  # retried on a fresh connection
    assert world.ledger.verify() == []


def test_the_shared_pool_is_left_as_other_code_expects(world):
    world.fund("wallet", 100)
    calls = []

    def hook(conn, outcome):  # runs on a pooled SQLAlchemy connection, inside the transaction
        calls.append(conn.execute(text("SELECT 1")).scalar())

    assert world.ledger.submit(world.entry(world.t("wallet", "merchant", 1)), hook=hook).ok
    assert calls == [1]
    with world.ledger.engine.connect() as conn:  # ordinary connections: no autocommit, no leftovers
        assert conn.connection.driver_connection.autocommit is False
        assert conn.execute(text("SHOW enable_seqscan")).scalar() == "on"
        conn.execute(text("SELECT 1"))
        conn.rollback()


@pytest.mark.pg
def test_a_connection_killed_mid_transaction_is_retried_by_run_with_retry(pg_url):
    """The server ends the session in the middle of a write transaction (an administrator's
    pg_terminate_backend, a failover): the work is retried on a new connection, never reported
    as SQLAlchemy's PendingRollbackError (which would hide the lost connection)."""
    from ledger.db import run_with_retry

    engine = make_engine(pg_url)
    calls = []

    def work(conn):
        calls.append(conn.scalar(text("SELECT pg_backend_pid()")))
        if len(calls) == 1:
            with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", (calls[0],))
        return conn.scalar(text("SELECT 42"))

    try:
        assert run_with_retry(engine, work) == 42
        assert len(calls) == 2 and calls[0] != calls[1]
    finally:
        engine.dispose()
