"""Double-entry ledger: the truth of every fen.

Accounts, journal entries of linked transfers, two-phase (pending / posted / voided / expired)
transfers, idempotency, reversals, balances as of any instant and a hash chain over the journal.
The semantics are TigerBeetle's; the rules, their result codes and the order in which they are
checked are in ``ledger.model``.

* ``ledger.model`` — specs, outcomes, result enums and check orders (pure);
* ``ledger.machine`` — the state machine deciding a batch against locked balances (pure);
* ``ledger.store`` — :class:`~ledger.store.Ledger`, the public face: writes, reads, sweeper,
  seals, ``verify``;
* ``ledger.store_pg`` / ``ledger.store_sqlite`` — how a batch is read and written on each
  database (two round trips on PostgreSQL, the single writer on SQLite);
* ``ledger.groupcommit`` — :class:`~ledger.groupcommit.GroupCommitter`, many callers per
  transaction, pipelined on PostgreSQL;
* ``ledger.db`` — engines, write transactions and the retry policy; ``ledger.schema`` — tables;
  ``ledger.money`` — integer fen.

This package imports no sibling package.
"""
