"""Ledger tables (SQLAlchemy Core). Created by the Alembic revision ``0001_ledger`` (keep in step).

History is append-only: ``ledger_entries``, ``ledger_transfers``, ``ledger_reversals`` and
``ledger_seals`` are only ever inserted into. The mutable state is the balance columns of
``ledger_accounts`` (one UPDATE per account per batch) and ``ledger_pending.state`` /
``resolved_by`` (a pending transfer's single resolution, guarded by ``state = 1``); both are
derivable from the transfers and :meth:`ledger.store.Ledger.verify` recomputes them.

There are no FOREIGN KEY constraints between the journal tables: they are written only by the
ledger's batch path, which resolves every reference before it writes, and never updated or
deleted; on PostgreSQL the referential-integrity triggers cost about a quarter of the server
time of a batch (three per transfer). :meth:`ledger.store.Ledger.verify` checks every
reference instead (transfer → entry, accounts, pending transfer; pending row → transfers;
reversal → entries).

Amounts are BIGINT minor units (fen); timestamps are BIGINT microseconds since the Unix epoch
(UTC). Keys are the clients' idempotency keys; the only rows without a key are the ones the
ledger writes itself when a pending transfer times out (entry ``kind = 'expiry'``, transfer
flags ``VOID_PENDING | EXPIRED`` = 12), so no client key can ever collide with them.
"""

from __future__ import annotations

from sqlalchemy import (BigInteger, CheckConstraint, Column, Index, Integer, MetaData,
                        SmallInteger, String, Table, Text, text)

metadata = MetaData()

ID = BigInteger().with_variant(Integer, "sqlite")  # SQLite: INTEGER PRIMARY KEY is the rowid

#: PostgreSQL storage parameter of the tables updated in place (set by the migration): room on
#: each page keeps balance and state updates heap-only (HOT), so they never touch an index.
FILLFACTOR_UPDATED_TABLES = 70

accounts = Table(
    "ledger_accounts", metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),
    Column("code", Integer, nullable=False),
    Column("ledger", Integer, nullable=False),
    Column("currency", String(3), nullable=False),
    Column("flags", Integer, nullable=False),
    Column("credit_limit", BigInteger, nullable=False),
    Column("debits_pending", BigInteger, nullable=False),
    Column("debits_posted", BigInteger, nullable=False),
    Column("credits_pending", BigInteger, nullable=False),
    Column("credits_posted", BigInteger, nullable=False),
    Column("created_ts", BigInteger, nullable=False),
    CheckConstraint("debits_pending >= 0 AND debits_posted >= 0 AND credits_pending >= 0 "
                    "AND credits_posted >= 0", name="ck_ledger_accounts_balances_nonnegative"),
)

entries = Table(
    "ledger_entries", metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column("key", String(128), nullable=True, unique=True),
    Column("content_hash", String(64), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("reverses_entry_id", BigInteger, nullable=True),
    Column("metadata", Text, nullable=False),
    Column("ts", BigInteger, nullable=False),
    CheckConstraint("key IS NOT NULL OR kind = 'expiry'", name="ck_ledger_entries_key"),
)

transfers = Table(
    "ledger_transfers", metadata,
    Column("id", ID, primary_key=True, autoincrement=True),
    Column("key", String(160), nullable=True, unique=True),
    Column("entry_id", BigInteger, nullable=False),
    Column("debit_account_id", BigInteger, nullable=False),
    Column("credit_account_id", BigInteger, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("flags", SmallInteger, nullable=False),
    Column("pending_id", BigInteger, nullable=True),
    Column("timeout_s", Integer, nullable=False),
    Column("code", Integer, nullable=False),
    Column("ts", BigInteger, nullable=False),
    CheckConstraint("amount >= 0", name="ck_ledger_transfers_amount_nonnegative"),
    CheckConstraint("key IS NOT NULL OR flags = 12", name="ck_ledger_transfers_key"),
)
Index("ix_ledger_transfers_debit", transfers.c.debit_account_id, transfers.c.id)
Index("ix_ledger_transfers_credit", transfers.c.credit_account_id, transfers.c.id)
Index("ix_ledger_transfers_entry", transfers.c.entry_id)
_RESOLVING = text("pending_id IS NOT NULL")
Index("ix_ledger_transfers_pending", transfers.c.pending_id,
      postgresql_where=_RESOLVING, sqlite_where=_RESOLVING)

#: One row per pending transfer: its accounts and amount (copied from the transfer so that the
#: expiry checks read one narrow table), its state and the transfer that resolved it.
pending = Table(
    "ledger_pending", metadata,
    Column("transfer_id", BigInteger, primary_key=True),
    Column("debit_account_id", BigInteger, nullable=False),
    Column("credit_account_id", BigInteger, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("state", SmallInteger, nullable=False),
    Column("expires_ts", BigInteger, nullable=True),
    Column("resolved_by", BigInteger, nullable=True),
)
_OPEN = text("state = 1")
Index("ix_ledger_pending_open_expiry", pending.c.expires_ts,
      postgresql_where=_OPEN, sqlite_where=_OPEN)
Index("ix_ledger_pending_open_debit", pending.c.debit_account_id, pending.c.expires_ts,
      postgresql_where=_OPEN, sqlite_where=_OPEN)
Index("ix_ledger_pending_open_credit", pending.c.credit_account_id, pending.c.expires_ts,
      postgresql_where=_OPEN, sqlite_where=_OPEN)

reversals = Table(
    "ledger_reversals", metadata,
    Column("entry_id", BigInteger, primary_key=True),
    Column("reversal_entry_id", BigInteger, nullable=False, unique=True),
)

seals = Table(
    "ledger_seals", metadata,
    Column("seq", ID, primary_key=True, autoincrement=False),
    Column("first_transfer_id", BigInteger, nullable=False),
    Column("last_transfer_id", BigInteger, nullable=False),
    Column("transfer_count", BigInteger, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Column("sealed_ts", BigInteger, nullable=False),
)
