"""Double-entry ledger: the truth of every fen.

Accounts, journal entries of linked transfers, two-phase (pending / posted / voided) transfers,
idempotency, balances as of any instant and a hash chain over the journal. The semantics follow
TigerBeetle's model (see ``ledger.model``); storage is SQLAlchemy Core on SQLite or PostgreSQL
(``ledger.store``). This package imports no sibling package.
"""
