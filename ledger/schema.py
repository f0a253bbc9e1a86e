"""Ledger tables (SQLAlchemy Core). Created by the Alembic revision ``0001_ledger``.

History is append-only: ``ledger_entries``, ``ledger_transfers``, ``ledger_reversals`` and
``ledger_seals`` are only ever inserted into. The mutable state is the balance columns of
``ledger_accounts`` (one UPDATE per account per batch) and ``ledger_pending.state`` (a pending
transfer's single resolution), both derivable from the transfers (``citizencard ledger verify``).
Amounts are BIGINT minor units; timestamps are BIGINT microseconds since the Unix epoch (UTC).
"""

from __future__ import annotations

from sqlalchemy import (BigInteger, CheckConstraint, Column, ForeignKey, Index, Integer, MetaData,
                        SmallInteger, String, Table, Text)

metadata = MetaData()

accounts = Table(
    "ledger_accounts", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
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
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("key", String(128), nullable=False, unique=True),
    Column("content_hash", String(64), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("reverses_entry_id", BigInteger, ForeignKey("ledger_entries.id"), nullable=True),
    Column("metadata", Text, nullable=False),
    Column("ts", BigInteger, nullable=False),
)

transfers = Table(
    "ledger_transfers", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("key", String(160), nullable=False, unique=True),
    Column("entry_id", BigInteger, ForeignKey("ledger_entries.id"), nullable=False),
    Column("debit_account_id", BigInteger, ForeignKey("ledger_accounts.id"), nullable=False),
    Column("credit_account_id", BigInteger, ForeignKey("ledger_accounts.id"), nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("flags", SmallInteger, nullable=False),
    Column("pending_id", BigInteger, ForeignKey("ledger_transfers.id"), nullable=True),
    Column("timeout_s", Integer, nullable=False),
    Column("code", Integer, nullable=False),
    Column("ts", BigInteger, nullable=False),
    CheckConstraint("amount >= 0", name="ck_ledger_transfers_amount_nonnegative"),
)
Index("ix_ledger_transfers_debit", transfers.c.debit_account_id, transfers.c.id)
Index("ix_ledger_transfers_credit", transfers.c.credit_account_id, transfers.c.id)
Index("ix_ledger_transfers_entry", transfers.c.entry_id)

pending = Table(
    "ledger_pending", metadata,
    Column("transfer_id", BigInteger, ForeignKey("ledger_transfers.id"), primary_key=True),
    Column("state", SmallInteger, nullable=False),
    Column("expires_ts", BigInteger, nullable=True),
    Column("resolved_by", BigInteger, ForeignKey("ledger_transfers.id"), nullable=True),
)
Index("ix_ledger_pending_open", pending.c.state, pending.c.expires_ts)

reversals = Table(
    "ledger_reversals", metadata,
    Column("entry_id", BigInteger, ForeignKey("ledger_entries.id"), primary_key=True),
    Column("reversal_entry_id", BigInteger, ForeignKey("ledger_entries.id"), nullable=False, unique=True),
)

seals = Table(
    "ledger_seals", metadata,
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False),
    Column("first_transfer_id", BigInteger, nullable=False),
    Column("last_transfer_id", BigInteger, nullable=False),
    Column("transfer_count", BigInteger, nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Column("sealed_ts", BigInteger, nullable=False),
)
