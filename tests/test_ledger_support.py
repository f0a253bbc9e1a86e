"""Shared helpers for the ledger tests (no tests here): databases that live for a whole test
module, a fake clock, and a tiny "world" that namespaces accounts and keys per test so that
many tests can share one database.

Import from the test modules: ``from test_ledger_support import …``.
"""

from __future__ import annotations

import itertools
import uuid

import pytest

import migrations
from ledger.db import make_engine
from ledger.model import (AccountFlags, AccountKind, AccountResult, AccountSpec, EntrySpec, TransferFlags,
                          TransferSpec)
from ledger.store import Ledger

WALLET = AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS
EPOCH_US = 1_800_000_000_000_000  # a fixed instant (2027-01-15) for fake clocks


class FakeClock:
    """A settable clock in µs for ``Ledger(clock_us=...)``."""

    def __init__(self, start_us: int = EPOCH_US) -> None:
        self.t = start_us

    def __call__(self) -> int:
        return self.t

    def advance_s(self, seconds: float) -> None:
        self.t += int(seconds * 1_000_000)


def _create_pg_database(request) -> tuple[str, str, str]:
    import psycopg

    admin = request.getfixturevalue("pg_admin_url")
    name = f"cc_ledger_{uuid.uuid4().hex[:12]}"
    plain = admin.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'create database "{name}"')
    return admin.rsplit("/", 1)[0] + "/" + name, plain, name


def _drop_pg_database(plain: str, name: str) -> None:
    import psycopg

    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture(scope="module", params=["sqlite", pytest.param("pg", marks=pytest.mark.pg)])
def module_engine(request, tmp_path_factory):
    """A migrated engine shared by the tests of one module: a SQLite file, or a fresh
    PostgreSQL database (skipped or failed like ``pg_url`` when PostgreSQL is down)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.db'}"
        cleanup = None
    else:
        url, plain, name = _create_pg_database(request)
        cleanup = (plain, name)
    engine = make_engine(url)
    migrations.upgrade(engine)
    yield engine
    engine.dispose()
    if cleanup:
        _drop_pg_database(*cleanup)


_namespaces = itertools.count()


class World:
    """Accounts and keys under a unique prefix, on a ledger with a fake clock."""

    def __init__(self, engine, clock: FakeClock | None = None) -> None:
        self.ns = f"t{next(_namespaces)}-{uuid.uuid4().hex[:6]}:"
        self.clock = clock or FakeClock()
        self.ledger = Ledger(engine, clock_us=self.clock)
        self._keys = itertools.count()

    def n(self, name: str) -> str:
        """The namespaced account name."""
        return self.ns + name

    def key(self, hint: str = "k") -> str:
        return f"{self.ns}{hint}{next(self._keys)}"

    def accounts(self, *specs: tuple) -> None:
        """(name, kind[, flags[, credit_limit[, ledger]]]) tuples; all must be created."""
        out = []
        for spec in specs:
            name, kind, *rest = spec
            flags = rest[0] if len(rest) > 0 else AccountFlags.NONE
            limit = rest[1] if len(rest) > 1 else 0
            ledger_no = rest[2] if len(rest) > 2 else 1
            out.append(AccountSpec(self.n(name), kind, flags=flags, credit_limit_fen=limit, ledger=ledger_no))
        results = self.ledger.create_accounts(out)
        assert results == [AccountResult.OK] * len(out), results

    def standard(self) -> None:
        """bank (asset), wallet (must not go negative), merchant, other wallet, fund."""
        self.accounts(("bank", AccountKind.ASSET), ("wallet", AccountKind.LIABILITY, WALLET),
                      ("merchant", AccountKind.LIABILITY), ("wallet2", AccountKind.LIABILITY, WALLET),
                      ("fund", AccountKind.FUND, WALLET))

    def t(self, debit: str, credit: str, amount: int, *, key: str | None = None, flags=TransferFlags.NONE,
          pending_key: str = "", timeout_s: int = 0, code: int = 0) -> TransferSpec:
        """A transfer between namespaced accounts ("" stays empty)."""
        return TransferSpec(self.key("t") if key is None else key, self.n(debit) if debit else "", self.n(credit) if credit else "",
                            amount, flags, pending_key, timeout_s, code)

    def entry(self, *transfers: TransferSpec, key: str | None = None, **kw) -> EntrySpec:
        return EntrySpec(self.key("e") if key is None else key, tuple(transfers), **kw)

    def submit(self, *transfers: TransferSpec, key: str | None = None, **kw):
        return self.ledger.submit(self.entry(*transfers, key=key, **kw))

    def fund(self, name: str, amount: int, source: str = "bank") -> None:
        out = self.submit(self.t(source, name, amount))
        assert out.ok, out

    def balance(self, name: str):
        return self.ledger.balance(self.n(name))
