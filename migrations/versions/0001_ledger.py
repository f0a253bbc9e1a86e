"""Ledger: accounts, journal entries, transfers, pending states, reversals, seals.

Kept in step with ``ledger/schema.py`` (tests compare the two).

Revision ID: 0001_ledger
Revises:
"""
import sqlalchemy as sa
from alembic import op

revision = "0001_ledger"
down_revision = None
branch_labels = None
depends_on = None

ID = sa.BigInteger().with_variant(sa.Integer, "sqlite")
OPEN = sa.text("state = 1")


def upgrade() -> None:
    op.create_table(
        "ledger_accounts",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(128), nullable=False, unique=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("code", sa.Integer, nullable=False),
        sa.Column("ledger", sa.Integer, nullable=False),
        sa.Column("currency", sa.String(3), nullable=False),
        sa.Column("flags", sa.Integer, nullable=False),
        sa.Column("credit_limit", sa.BigInteger, nullable=False),
        sa.Column("debits_pending", sa.BigInteger, nullable=False),
        sa.Column("debits_posted", sa.BigInteger, nullable=False),
        sa.Column("credits_pending", sa.BigInteger, nullable=False),
        sa.Column("credits_posted", sa.BigInteger, nullable=False),
        sa.Column("created_ts", sa.BigInteger, nullable=False),
        sa.CheckConstraint("debits_pending >= 0 AND debits_posted >= 0 AND credits_pending >= 0 "
                           "AND credits_posted >= 0", name="ck_ledger_accounts_balances_nonnegative"),
    )
    op.create_table(
        "ledger_entries",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(128), nullable=True, unique=True),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("reverses_entry_id", sa.BigInteger, nullable=True),
        sa.Column("metadata", sa.Text, nullable=False),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.CheckConstraint("key IS NOT NULL OR kind = 'expiry'", name="ck_ledger_entries_key"),
    )
    op.create_table(
        "ledger_transfers",
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        sa.Column("key", sa.String(160), nullable=True, unique=True),
        sa.Column("entry_id", sa.BigInteger, nullable=False),
        sa.Column("debit_account_id", sa.BigInteger, nullable=False),
        sa.Column("credit_account_id", sa.BigInteger, nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("flags", sa.SmallInteger, nullable=False),
        sa.Column("pending_id", sa.BigInteger, nullable=True),
        sa.Column("timeout_s", sa.Integer, nullable=False),
        sa.Column("code", sa.Integer, nullable=False),
        sa.Column("ts", sa.BigInteger, nullable=False),
        sa.CheckConstraint("amount >= 0", name="ck_ledger_transfers_amount_nonnegative"),
        sa.CheckConstraint("key IS NOT NULL OR flags = 12", name="ck_ledger_transfers_key"),
    )
    op.create_index("ix_ledger_transfers_debit", "ledger_transfers", ["debit_account_id", "id"])
    op.create_index("ix_ledger_transfers_credit", "ledger_transfers", ["credit_account_id", "id"])
    op.create_index("ix_ledger_transfers_entry", "ledger_transfers", ["entry_id"])
    resolving = sa.text("pending_id IS NOT NULL")
    op.create_index("ix_ledger_transfers_pending", "ledger_transfers", ["pending_id"],
                    postgresql_where=resolving, sqlite_where=resolving)
    op.create_table(
        "ledger_pending",
        sa.Column("transfer_id", sa.BigInteger, primary_key=True),
        sa.Column("debit_account_id", sa.BigInteger, nullable=False),
        sa.Column("credit_account_id", sa.BigInteger, nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("state", sa.SmallInteger, nullable=False),
        sa.Column("expires_ts", sa.BigInteger, nullable=True),
        sa.Column("resolved_by", sa.BigInteger, nullable=True),
    )
    op.create_index("ix_ledger_pending_open_expiry", "ledger_pending", ["expires_ts"],
                    postgresql_where=OPEN, sqlite_where=OPEN)
    op.create_index("ix_ledger_pending_open_debit", "ledger_pending", ["debit_account_id", "expires_ts"],
                    postgresql_where=OPEN, sqlite_where=OPEN)
    op.create_index("ix_ledger_pending_open_credit", "ledger_pending", ["credit_account_id", "expires_ts"],
                    postgresql_where=OPEN, sqlite_where=OPEN)
    if op.get_bind().dialect.name == "postgresql":
        # The two tables updated in place: leave room on each page so that balance and state
        # updates stay heap-only (HOT) and never touch the indexes.
        op.execute("ALTER TABLE ledger_accounts SET (fillfactor = 70)")
        op.execute("ALTER TABLE ledger_pending SET (fillfactor = 70)")
    op.create_table(
        "ledger_reversals",
        sa.Column("entry_id", sa.BigInteger, primary_key=True),
        sa.Column("reversal_entry_id", sa.BigInteger,
                  nullable=False, unique=True),
    )
    op.create_table(
        "ledger_seals",
        sa.Column("seq", ID, primary_key=True, autoincrement=False),
        sa.Column("first_transfer_id", sa.BigInteger, nullable=False),
        sa.Column("last_transfer_id", sa.BigInteger, nullable=False),
        sa.Column("transfer_count", sa.BigInteger, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("sealed_ts", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    for name in ("ledger_seals", "ledger_reversals", "ledger_pending", "ledger_transfers",
                 "ledger_entries", "ledger_accounts"):
        op.drop_table(name)
