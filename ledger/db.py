"""Database engines for the ledger and everything beside it: SQLite (embedded) and PostgreSQL.

SQLite runs in WAL mode with one writer: write transactions start with ``BEGIN IMMEDIATE`` (so
two writers never deadlock on a lock upgrade) and reads with a deferred ``BEGIN``; ask for a
write transaction with :func:`write_connection`. PostgreSQL runs at READ COMMITTED; writers lock
the accounts they touch with one ``SELECT … ORDER BY id FOR UPDATE`` (ascending id order).

Pooled PostgreSQL connections are pinged only when they have been idle for more than
``POOL_PING_IDLE_S`` (a round trip per checkout would cost the ledger's hot path a third of its
round trips); a connection that breaks while in use is invalidated and the work retried by
:func:`run_with_retry`.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, exc as sa_exc
from sqlalchemy.exc import DBAPIError

T = TypeVar("T")

#: PostgreSQL SQLSTATEs worth retrying with the same ids: serialization_failure, deadlock_detected,
#: and the connection lost (admin_shutdown, crash_shutdown, cannot_connect_now; class 08): the
#: retry runs on a new connection, and replays if the lost transaction had committed after all.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01", "57P01", "57P02", "57P03"})
UNIQUE_VIOLATION = "23505"
RETRIES_MAX = 8
RETRY_SLEEP_S_MAX = 0.2
POOL_PING_IDLE_S = 5.0
#: Pooled PostgreSQL connections per engine process (``CITIZENCARD_DB_POOL_SIZE``); the hot
#: path's own set (:class:`ledger.store_pg.HotPool`) holds at most as many again.
POOL_SIZE = 16
#: Longest a thread waits for a pooled connection when all are in use, in seconds; past it the
#: work fails as "database unavailable" (HTTP 503), never by opening one more connection.
POOL_TIMEOUT_S = 10.0


#: The marker of a :class:`HookRefused` raised from SQL (``CAST('ledger hook refused: …' AS int)``).
HOOK_REFUSED = "ledger hook refused: "


class HookRefused(Exception):
    """A batched entry hook refused its work (for example a card counter that was already
    used): the entry's batch was rolled back; the group committer applies the others again, so
    only the entry whose hook refused gets this. Not transient: never retried."""


class StaleReadError(Exception):
    """Raised inside a write transaction when what was read before the locks no longer matches
    what is under them (for example a pending transfer created concurrently whose accounts are
    not locked): the transaction is rolled back and retried with the same ids."""


def normalise_url(url: str) -> str:
    """Accept ``postgresql://`` and ``postgres://`` and use the psycopg 3 driver for them."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def make_engine(url: str, *, pool_size: int = POOL_SIZE, pool_timeout_s: float = POOL_TIMEOUT_S) -> Engine:
    """Create an Engine for ``url`` (``sqlite:///path`` or ``postgresql://…``).

    SQLite: WAL, ``synchronous=FULL``, foreign keys on, 30 s busy timeout, driver autocommit off
    so that SQLAlchemy's ``begin`` event emits our own BEGIN (deferred or IMMEDIATE).
    PostgreSQL: a pool of ``pool_size`` psycopg 3 connections and no overflow: a thread that
    finds every connection in use waits for one (at most ``pool_timeout_s`` seconds, then
    ``sqlalchemy.exc.TimeoutError``, which :func:`is_database_unavailable` counts as transient).
    An engine process therefore holds at most ``2 * pool_size`` connections, the hot path's
    included, however many threads it serves — size ``pool_size`` so that every engine process
    fits in the server's ``max_connections``. Overflow connections would be closed each time
    they are returned: under more concurrent threads than the pool, every checkout above it
    started and stopped a backend (milliseconds each), and two engine processes of 32 threads
    ran the server out of connections ("too many clients") in the settlement benchmark.
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
    engine = create_engine(url, pool_size=pool_size, max_overflow=0, pool_timeout=pool_timeout_s,
                           pool_pre_ping=False)

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn, record, _proxy) -> None:  # pragma: no cover - driver callback
        now = time.monotonic()
        last = record.info.get("last_used_s", now)
        record.info["last_used_s"] = now
        if now - last > POOL_PING_IDLE_S or dbapi_conn.closed or dbapi_conn.broken:
            try:
                dbapi_conn.execute("SELECT 1")
                dbapi_conn.rollback()
            except Exception as exc:  # the pool then replaces the connection and tries again
                raise sa_exc.DisconnectionError(str(exc)) from exc

    return engine


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


def _driver_error(exc: BaseException) -> BaseException:
    return exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc


def is_retryable(exc: BaseException) -> bool:
    """A deadlock or serialization failure (PostgreSQL), a busy database (SQLite), a stale read,
    or a connection lost in use. Accepts SQLAlchemy-wrapped and raw driver exceptions."""
    if isinstance(exc, StaleReadError):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    orig = _driver_error(exc)
    sqlstate = getattr(orig, "sqlstate", None) or ""
    if sqlstate in RETRYABLE_SQLSTATES or sqlstate.startswith("08"):
        return True
    if isinstance(orig, sqlite3.OperationalError) and "database is locked" in str(orig):
        return True
    return _is_psycopg_disconnect(orig)


def _is_psycopg_disconnect(orig: BaseException) -> bool:
    try:
        import psycopg
    except ImportError:  # pragma: no cover
        return False
    return isinstance(orig, psycopg.OperationalError) and getattr(orig, "sqlstate", None) is None


def is_unique_violation(exc: BaseException) -> bool:
    """A unique-key violation: a concurrent writer inserted the same idempotency key first."""
    orig = _driver_error(exc)
    return getattr(orig, "sqlstate", None) == UNIQUE_VIOLATION or (
        isinstance(orig, sqlite3.IntegrityError) and "UNIQUE constraint failed" in str(orig))


def is_database_unavailable(exc: BaseException) -> bool:
    """The database could not be reached, dropped the connection, or stayed busy or contended
    past the retries (a driver ``OperationalError``, a lost connection, a deadlock or
    serialization failure retried to the limit): a transient condition, not a defect. Whether
    a write it interrupted took effect is unknown (a COMMIT may have been lost on the way
    back). A pool with every connection in use past its timeout counts too (the work never
    reached the database)."""
    if is_retryable(exc) or isinstance(exc, sa_exc.TimeoutError):
        return True
    orig = _driver_error(exc)
    if isinstance(orig, sqlite3.OperationalError):
        return True
    try:
        import psycopg
    except ImportError:  # pragma: no cover
        return False
    return isinstance(orig, psycopg.OperationalError)


def is_ledger_key_violation(exc: BaseException) -> bool:
    """A unique violation on one of the ledger's own tables (an entry, transfer or reversal key
    a concurrent writer committed first: a retry reads it and replays). A unique violation on
    another table — a row a hook inserts in the batch's transaction, such as a settlement whose
    msgid a concurrent request took — is not cured by retrying the same inputs."""
    if not is_unique_violation(exc):
        return False
    orig = _driver_error(exc)
    diag = getattr(orig, "diag", None)
    table = getattr(diag, "table_name", None) if diag is not None else None
    if table is None:  # SQLite: "UNIQUE constraint failed: ledger_entries.key"
        table = str(orig).rsplit("UNIQUE constraint failed:", 1)[-1].strip()
    return table.startswith("ledger_")


def _is_database_error(exc: BaseException) -> bool:
    if isinstance(exc, (DBAPIError, StaleReadError, sqlite3.Error)):
        return True
    try:
        import psycopg
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, psycopg.Error)


def run_with_retry(engine: Engine, work: Callable[[Connection], T], *, retries_max: int = RETRIES_MAX,
                   retry_on_unique: bool | Callable[[BaseException], bool] = True) -> T:
    """Run ``work(conn)`` in a write transaction; retry it (same inputs, same ids) on deadlock,
    serialization failure, busy database, stale read, lost connection or — when
    ``retry_on_unique`` — a unique violation caused by a concurrent duplicate (the retry then
    sees the committed row and replays); ``retry_on_unique`` may be a predicate choosing which
    unique violations (e.g. :func:`is_ledger_key_violation`). Backs off 4, 8, 16 … ms (at most
    0.2 s) between tries.

    Raises the last error after ``retries_max`` attempts; other errors propagate at once (the
    transaction is rolled back).
    """
    attempt = 0
    while True:
        try:
            with write_connection(engine) as conn:
                try:
                    return work(conn)
                except BaseException as exc:
                    # The hot path talks to the driver directly: make sure a broken connection
                    # is not handed back to the pool. (Once SQLAlchemy has invalidated it
                    # itself, even asking for it raises: the original error is the one to keep.)
                    if not conn.invalidated:
                        try:
                            raw = getattr(conn.connection, "driver_connection", None)
                        except Exception:
                            raw = None
                        if getattr(raw, "broken", False):
                            conn.invalidate(exc if isinstance(exc, Exception) else None)
                    raise
        except Exception as exc:
            if not _is_database_error(exc):
                raise
            attempt += 1
            unique = retry_on_unique(exc) if callable(retry_on_unique) else retry_on_unique and is_unique_violation(exc)
            retryable = is_retryable(exc) or unique
            if not retryable or attempt >= retries_max:
                raise
            time.sleep(min(0.002 * (2 ** attempt), RETRY_SLEEP_S_MAX))
