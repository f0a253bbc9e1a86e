"""Shared fixtures: real services (PostgreSQL, Redis) with skip-or-fail semantics.

On a machine without a service, tests that need it are skipped with the reason printed; under
``CI=true`` a missing service is a failure, never a skip (the project's contract).
Service addresses come from ``CITIZENCARD_TEST_PG`` (default ``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``)
and ``CITIZENCARD_TEST_REDIS`` (default ``redis://127.0.0.1:6379/15``).
"""

from __future__ import annotations

import os
import uuid

import pytest

PG_ADMIN_URL = os.environ.get(
    "CITIZENCARD_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("CITIZENCARD_TEST_REDIS", "redis://127.0.0.1:6379/15")
IN_CI = os.environ.get("CI", "").lower() == "true"


def service_missing(what: str, reason: str) -> None:
    """Skip (locally) or fail (under CI=true) because a service is not reachable."""
    message = f"{what} not reachable: {reason}"
    if IN_CI:
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    """URL of a PostgreSQL database we may create databases from; skips/fails when down."""
    import psycopg

    plain = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    try:
        with psycopg.connect(plain, connect_timeout=3) as conn:
            conn.execute("select 1")
    except Exception as exc:  # any connection failure means "service missing"
        service_missing("PostgreSQL", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return PG_ADMIN_URL


@pytest.fixture
def pg_url(pg_admin_url: str):
    """A fresh, empty PostgreSQL database for one test; dropped afterwards."""
    import psycopg

    name = f"cc_test_{uuid.uuid4().hex[:12]}"
    plain = pg_admin_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    base = pg_admin_url.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """A fresh SQLite database file for one test."""
    return f"sqlite:///{tmp_path / 'ledger.db'}"


@pytest.fixture(params=["sqlite", pytest.param("pg", marks=pytest.mark.pg)])
def db_url(request) -> str:
    """The same test on both backends: a fresh SQLite file and a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def redis_url() -> str:
    """URL of a real Redis (database 15, flushed before the test); skips/fails when down."""
    import redis

    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
        client.ping()
        client.flushdb()
        client.close()
    except Exception as exc:
        service_missing("Redis", str(exc))
    return REDIS_URL
