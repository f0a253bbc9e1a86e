"""SQLite storage for the ledger state machine (the embedded default).

The write transaction is ``BEGIN IMMEDIATE`` (see ``ledger.db``): SQLite has one writer at a
time, so holding the write lock *is* holding every account lock, and reads inside it are
current. Queries run on the driver connection (no per-row SQLAlchemy overhead); lists travel as
JSON arrays through ``json_each`` so each statement text is constant and stays in sqlite3's
statement cache. Ids are assigned by the writer (``max(id) + 1``), which is safe under the
single-writer lock and keeps ids in commit order (the hash chain relies on it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from sqlalchemy import Connection

from ledger.db import StaleReadError
from ledger.machine import (Account, Hold, Plan, ReversalTarget, Snapshot, StoredEntry, F_NONE, F_PENDING,
                            F_POST, S_PENDING)

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

ACCOUNTS_SQL = """
SELECT id, name, kind, ledger, flags, credit_limit, debits_pending, debits_posted, credits_pending,
       credits_posted
FROM ledger_accounts WHERE name IN (SELECT value FROM json_each(?1)) OR id IN (SELECT value FROM json_each(?2))
"""

ENTRIES_SQL = """
SELECT e.key, e.id, e.content_hash, e.ts,
       (SELECT json_group_array(t.id) FROM (SELECT id FROM ledger_transfers WHERE entry_id = e.id ORDER BY id) t)
FROM ledger_entries e WHERE e.key IN (SELECT value FROM json_each(?))
"""

TRANSFERS_SQL = """
SELECT t.key, t.id, t.entry_id, t.debit_account_id, t.credit_account_id, t.amount, t.flags,
       p.state, p.expires_ts
FROM ledger_transfers t LEFT JOIN ledger_pending p ON p.transfer_id = t.id
WHERE t.key IN (SELECT value FROM json_each(?))
"""

EXPIRED_SQL = """
SELECT p.transfer_id, t.key, p.debit_account_id, p.credit_account_id, p.amount, p.expires_ts
FROM ledger_pending p JOIN ledger_transfers t ON t.id = p.transfer_id
WHERE p.state = 1 AND p.expires_ts <= ?1
  AND (p.debit_account_id IN (SELECT value FROM json_each(?2))
       OR p.credit_account_id IN (SELECT value FROM json_each(?2)))
ORDER BY p.transfer_id
"""

REVERSAL_SQL = """
SELECT e.key, e.id, e.reverses_entry_id IS NOT NULL,
       EXISTS (SELECT 1 FROM ledger_reversals r WHERE r.entry_id = e.id),
       t.debit_account_id, t.credit_account_id, t.amount, t.flags
FROM ledger_entries e LEFT JOIN ledger_transfers t ON t.entry_id = e.id
WHERE e.key IN (SELECT value FROM json_each(?))
"""

INSERT_ENTRY = ("INSERT INTO ledger_entries (id, key, content_hash, kind, reverses_entry_id, metadata, ts) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)")
INSERT_TRANSFER = ("INSERT INTO ledger_transfers (id, key, entry_id, debit_account_id, credit_account_id, "
                   "amount, flags, pending_id, timeout_s, code, ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
INSERT_PENDING = ("INSERT INTO ledger_pending (transfer_id, debit_account_id, credit_account_id, amount, "
                  "state, expires_ts, resolved_by) VALUES (?, ?, ?, ?, ?, ?, ?)")
UPDATE_PENDING = "UPDATE ledger_pending SET state = ?, resolved_by = ? WHERE transfer_id = ? AND state = 1"
INSERT_REVERSAL = "INSERT INTO ledger_reversals (entry_id, reversal_entry_id) VALUES (?, ?)"
UPDATE_ACCOUNT = ("UPDATE ledger_accounts SET debits_pending = debits_pending + ?, "
                  "debits_posted = debits_posted + ?, credits_pending = credits_pending + ?, "
                  "credits_posted = credits_posted + ? WHERE id = ?")


class SqliteStore:
    """Loads snapshots and persists plans on the sqlite3 connection under ``BEGIN IMMEDIATE``."""

    def load(self, conn: Connection, now_us: int, names: Sequence[str], ids: Sequence[int],
             pending_keys: Sequence[str], entry_keys: Sequence[str], transfer_keys: Sequence[str],
             reverse_keys: Sequence[str]) -> Snapshot:
        raw = conn.connection.driver_connection
        holds: dict[str, Hold] = {}
        transfer_key_entries: dict[str, int] = {}
        extra_ids = list(ids)
        all_tkeys = list(transfer_keys) + list(pending_keys)
        pending_rows = []
        if all_tkeys:
            pset = set(pending_keys)
            for row in raw.execute(TRANSFERS_SQL, (_dumps(all_tkeys),)):
                transfer_key_entries[row[0]] = row[2]
                if row[0] in pset:
                    pending_rows.append(row)
                    extra_ids += (row[3], row[4])
        accounts: dict[str, Account] = {}
        by_id: dict[int, Account] = {}
        for r in raw.execute(ACCOUNTS_SQL, (_dumps(list(names)), _dumps(extra_ids))):
            a = Account(*r)
            accounts[a.name] = a
            by_id[a.id] = a
        for key, tid, _entry_id, d, c, amount, flags, state, expires in pending_rows:
            holds[key] = Hold(key, tid, d, c, amount, flags == F_PENDING and state is not None, state or 0, expires)
        expired = []
        more: list[tuple] = []
        for tid, key, d, c, amount, expires in raw.execute(EXPIRED_SQL, (now_us, _dumps(list(by_id)))):
            more.append((tid, key, d, c, amount, expires))
        missing = {x for row in more for x in (row[2], row[3]) if x not in by_id}
        if missing:  # the other side of an expired hold: load it too (we hold the write lock)
            for r in raw.execute(ACCOUNTS_SQL, ("[]", _dumps(sorted(missing)))):
                a = Account(*r)
                accounts[a.name] = a
                by_id[a.id] = a
        for tid, key, d, c, amount, expires in more:
            hold = holds.get(key)
            if hold is None or hold.id != tid:
                hold = Hold(key, tid, d, c, amount, True, S_PENDING, expires)
            expired.append(hold)
        entries = {}
        if entry_keys:
            for key, eid, h, ts, tids in raw.execute(ENTRIES_SQL, (_dumps(list(entry_keys)),)):
                entries[key] = StoredEntry(eid, h, ts, tuple(json.loads(tids)))
        targets: dict[str, ReversalTarget] = {}
        if reverse_keys:
            for key, eid, is_rev, is_reversed, d, c, amount, flags in raw.execute(
                    REVERSAL_SQL, (_dumps(list(reverse_keys)),)):
                tgt = targets.get(key)
                if tgt is None:
                    tgt = targets[key] = ReversalTarget(eid, bool(is_rev), bool(is_reversed), [])
                if flags is not None and (flags == F_NONE or flags == F_POST):
                    tgt.legs.append((d, c, amount))
        return Snapshot(now_us, accounts, by_id, holds, entries, transfer_key_entries, targets, expired)

    def persist(self, conn: Connection, plan: Plan, *, commit: bool) -> tuple[list[int], list[int]]:
        """Write the plan with ``executemany``; ids are ``max(id) + 1 …`` under the write lock.
        ``commit`` is ignored: SQLAlchemy commits the transaction."""
        raw = conn.connection.driver_connection
        e0 = raw.execute("SELECT coalesce(max(id), 0) + 1 FROM ledger_entries").fetchone()[0]
        t0 = raw.execute("SELECT coalesce(max(id), 0) + 1 FROM ledger_transfers").fetchone()[0]
        ts = plan.now_us
        entry_ids = list(range(e0, e0 + len(plan.entries)))
        transfer_ids = list(range(t0, t0 + len(plan.transfers)))
        raw.executemany(INSERT_ENTRY, [
            (entry_ids[i], e[0], e[1], e[2], e[3] if e[4] is None else entry_ids[e[4]], e[5], ts)
            for i, e in enumerate(plan.entries)])
        raw.executemany(INSERT_TRANSFER, [
            (transfer_ids[i], t[1], entry_ids[t[0]], t[2], t[3], t[4], t[5],
             t[6] if t[7] is None else transfer_ids[t[7]], t[8], t[9], ts)
            for i, t in enumerate(plan.transfers)])
        if plan.new_holds:
            raw.executemany(INSERT_PENDING, [
                (transfer_ids[h.transfer_ord], h.debit_id, h.credit_id, h.amount, h.state, h.expires_ts,
                 None if h.resolved_ord is None else transfer_ids[h.resolved_ord]) for h in plan.new_holds])
        if plan.hold_updates:
            cur = raw.executemany(UPDATE_PENDING, [(state, transfer_ids[rord], tid)
                                                   for tid, state, rord in plan.hold_updates])
            if cur.rowcount != len(plan.hold_updates):
                raise StaleReadError("a pending transfer was no longer open")
        if plan.reversals:
            raw.executemany(INSERT_REVERSAL, [(eid if eid is not None else entry_ids[eord], entry_ids[rord])
                                              for eid, eord, rord in plan.reversals])
        cur = raw.executemany(UPDATE_ACCOUNT, [(d[0], d[1], d[2], d[3], acc_id)
                                               for acc_id, d in plan.deltas.items()])
        if cur.rowcount != len(plan.deltas):
            raise StaleReadError("an account row disappeared")
        return entry_ids, transfer_ids
