"""Database engines for the ledger and everything beside it: SQLite (embedded) and PostgreSQL.

SQLite runs in WAL mode with one writer: write transactions start with ``BEGIN IMMEDIATE`` (so
two writers never deadlock on a lock upgrade) and reads with a deferred ``BEGIN``; ask for a
write transaction with :func:`write_connection`. PostgreSQL runs at READ COMMITTED; writers lock
the accounts they touch with ``SELECT … FOR UPDATE`` in ascending id order.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

T = TypeVar("T")

#: PostgreSQL SQLSTATEs worth retrying with the same ids: serialization_failure, deadlock_detected.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
RETRIES_MAX = 8


def normalise_url(url: str) -> str:
    """Accept ``postgresql://`` and ``postgres://`` and use the psycopg 3 driver for them."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    """Create an Engine for ``url`` (``sqlite:///path`` or ``postgresql://…``).

    SQLite: WAL, ``synchronous=FULL``, foreign keys on, 30 s busy timeout, driver autocommit off
    so that SQLAlchemy's ``begin`` event emits our own BEGIN (deferred or IMMEDIATE).
    """
    url = normalise_url(url)
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record) -> None:  # pragma: no cover - driver callback
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:  # pragma: no cover - driver callback
            mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


def is_sqlite(engine: Engine) -> bool:
    """True for the embedded SQLite backend."""
    return engine.dialect.name == "sqlite"


@contextlib.contextmanager
def write_connection(engine: Engine) -> Iterator[Connection]:
    """A connection inside one write transaction, committed on success, rolled back on error."""
    with engine.connect() as conn:
        if is_sqlite(engine):
            conn = conn.execution_options(sqlite_begin="IMMEDIATE")
        with conn.begin():
            yield conn


def is_retryable(exc: BaseException) -> bool:
    """A deadlock or serialization failure (PostgreSQL) or a busy database (SQLite)."""
    if isinstance(exc, DBAPIError):
        sqlstate = getattr(exc.orig, "sqlstate", None)
        if sqlstate in RETRYABLE_SQLSTATES:
            return True
        if isinstance(exc, OperationalError) and "database is locked" in str(exc.orig):
            return True
    return False


def is_unique_violation(exc: BaseException) -> bool:
    """A unique-key violation: a concurrent writer inserted the same idempotency key first."""
    return isinstance(exc, IntegrityError) and (
        getattr(exc.orig, "sqlstate", None) == "23505" or "UNIQUE constraint failed" in str(exc.orig))


def run_with_retry(engine: Engine, work: Callable[[Connection], T], *, retries_max: int = RETRIES_MAX,
                   retry_on_unique: bool = True) -> T:
    """Run ``work(conn)`` in a write transaction; retry it (same inputs, same ids) on deadlock,
    serialization failure, busy database or — when ``retry_on_unique`` — a unique violation
    caused by a concurrent duplicate (the retry then sees the committed row and replays).

    Raises the last error after ``retries_max`` attempts.
    """
    attempt = 0
    while True:
        try:
            with write_connection(engine) as conn:
                return work(conn)
        except DBAPIError as exc:
            attempt += 1
            retryable = is_retryable(exc) or (retry_on_unique and is_unique_violation(exc))
            if not retryable or attempt >= retries_max:
                raise
            time.sleep(min(0.002 * (2 ** attempt), 0.2))
