"""An engine process's PostgreSQL connections are bounded by its pool, however many threads it
serves (``db_pool_size``, ``CITIZENCARD_DB_POOL_SIZE``): at most twice the pool, the hot path's
included. A thread that finds every pooled connection busy waits for one instead of opening
another; past the pool's timeout the work fails as "database unavailable" (HTTP 503), never by
running the server out of connections.

Before, the pool allowed as many overflow connections again and closed each one when it was
returned: two engine processes of 32 cashier threads started and stopped thousands of backends
in ten seconds and ran PostgreSQL out of connections ("too many clients already")."""

from __future__ import annotations

import threading
import time

import psycopg
import pytest
from sqlalchemy import exc as sa_exc, func, select

from ledger.db import is_database_unavailable, make_engine
from settlement.schema import settlements
from tests.test_settlement_concurrency import at_once
from tests.test_settlement_flows import CLINIC, make_world

pytestmark = pytest.mark.pg


class ConnectionWatch:
    """Counts, on a connection of its own, the backends connected to the database (its own
    excluded) until stopped; ``peak`` is the most seen at once."""

    def __init__(self, url: str) -> None:
        self.url = url.replace("postgresql+psycopg://", "postgresql://")
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.is_set():
                n = conn.execute("SELECT count(*) FROM pg_stat_activity "
                                 "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchone()[0]
                self.peak = max(self.peak, n)
                self.samples += 1
                time.sleep(0.002)

    def __enter__(self) -> "ConnectionWatch":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.mark.parametrize("group_commit", [False, True], ids=["direct", "group_commit"])
def test_an_engine_process_holds_at_most_twice_its_pool_however_many_cashiers(pg_url, tmp_path, group_commit):
    """24 cashiers at once (half paying by card) on an engine pooling 2 connections: every
    visit settles, the trial balance balances, and the server never sees more than 4
    connections from the engine (before: up to 6, and a new backend per checkout above 2)."""
    with make_world(pg_url, tmp_path, group_commit=group_commit, db_pool_size=2) as w:
        people = [w.add_person(personal_fen=20_000, wallet_fen=50_000) for _ in range(24)]
        bills = [w.bill(("A", "120.00", "1"), ("B", "42.52", "2"), ("C", "18.30", "1"), offset=i) for i in range(24)]

        def cashier(i: int):
            def go():
                return [w.settle(people[i], bills[i], method="card" if i % 2 else "cash")
                        for _ in range(3)]
            return go

        with ConnectionWatch(pg_url) as watch:
            results = at_once([cashier(i) for i in range(24)])
        assert [r for kind, r in results if kind == "error"] == []
        docs = [doc for _, batch in results for doc in batch]
        assert len(docs) == 72 and all(doc["replayed"] is False for doc in docs)
        with w.c.engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(settlements)
                               .where(settlements.c.fixmedins_code == CLINIC.org_code)) == 72
        assert w.ledger.trial_balance().balanced
        assert watch.samples > 10
        assert 1 <= watch.peak <= 4, watch.peak


def test_a_pool_busy_past_its_timeout_is_database_unavailable_and_opens_nothing(pg_url):
    """Every pooled connection held: the next checkout waits the pool's timeout and raises
    ``TimeoutError``, which counts as "database unavailable" (a 503 over HTTP); the server saw
    no second connection."""
    engine = make_engine(pg_url, pool_size=1, pool_timeout_s=0.2)
    try:
        with ConnectionWatch(pg_url) as watch, engine.connect() as held:
            held.exec_driver_sql("SELECT 1")
            t0 = time.monotonic()
            with pytest.raises(sa_exc.TimeoutError) as caught:
                engine.connect()
            waited = time.monotonic() - t0
        assert 0.15 <= waited < 5
        assert is_database_unavailable(caught.value)
        assert watch.peak == 1
    finally:
        engine.dispose()


def test_a_borrowed_connection_checks_its_prepared_statements_again(pg_url):
    """Every hot connection busy, the hot path borrows a pooled one, which SQLAlchemy uses in
    between: after an error and a ROLLBACK there, psycopg drops every prepared statement
    (DEALLOCATE ALL). The next borrow checks them again instead of failing with "prepared
    statement does not exist" (26000) — seen once in a 64-cashier benchmark run, where the
    bounded pool made borrowing common."""
    from sqlalchemy import text

    from ledger.store_pg import HotPool, ensure_prepared, execute, hot_connection

    engine = make_engine(pg_url, pool_size=1)
    pool = HotPool.of(engine)
    held = pool.get()  # the only hot connection: the hot path now borrows the pooled one
    statements = {"pool_probe_v1": "PREPARE pool_probe_v1 (int) AS SELECT $1 + 1"}
    try:
        for _ in range(2):
            with hot_connection(engine) as (raw, info, _begin):
                ensure_prepared(raw, info, statements)
                assert execute(raw, "EXECUTE pool_probe_v1(1)")[-1].get_value(0, 0) == b"2"
            with engine.connect() as conn:  # SQLAlchemy's own use: an error, then ROLLBACK
                for i in range(6):  # often enough for psycopg to prepare it itself
                    conn.execute(text("SELECT CAST(:x AS int) + 0"), {"x": i}).scalar()
                with pytest.raises(sa_exc.DataError):
                    conn.execute(text("SELECT 1/0")).scalar()
                conn.rollback()
    finally:
        pool.put(held)
        engine.dispose()
