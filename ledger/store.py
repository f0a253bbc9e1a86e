"""The ledger state machine on a SQL database: batches of journal entries in one transaction.

:meth:`Ledger.submit_many` is the one write path. A batch (many entries from many callers:
group commit) runs in a single database transaction:

1. statically validate each entry (keys, sizes, flags) — no I/O;
2. read the pending transfers it resolves and any expired holds on its accounts, to learn every
   account it will touch;
3. lock those accounts once, in ascending id order, in one ``SELECT … FOR UPDATE`` (SQLite:
   ``BEGIN IMMEDIATE`` holds the single writer lock instead);
4. void the expired holds on the locked accounts (the ledger's clock voids them: history shows a
   transfer flagged ``EXPIRED``), read existing idempotency keys and reversal targets;
5. evaluate each entry in order against the in-memory balances: a failing entry is reported
   with the failing transfer and its rule, and leaves no trace; the others go on;
6. insert entries and transfers in bulk and update each touched account's balance once.

Deadlocks, serialization failures and unique violations from a concurrent duplicate retry the
whole batch with the same keys (bounded), so a concurrent duplicate posts once and replays.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

from sqlalchemy import Connection, Engine, and_, bindparam, func, insert, or_, select, update

from ledger import schema as s
from ledger.db import is_sqlite, run_with_retry
from ledger.model import (KEY_LENGTH_MAX, TIMEOUT_S_MAX, TRANSFERS_PER_ENTRY_MAX, AccountFlags,
                          AccountKind, AccountResult, AccountSpec, Balance, EntryOutcome,
                          EntryResult, EntrySpec, PendingState, TransferFlags, TransferResult,
                          TransferSpec)
from ledger.money import AMOUNT_FEN_MAX, CURRENCY_EXPONENTS

BALANCE_MAX = 2**63 - 1
BATCH_ENTRIES_MAX = 4096
SQL_IN_CHUNK_MAX = 500


EntryHook = Callable[[Connection, EntryOutcome], None]


def wall_clock_us() -> int:
    """Microseconds since the Unix epoch (UTC), from the system clock."""
    return time.time_ns() // 1000


@dataclass(slots=True)
class _Account:
    id: int
    name: str
    kind: AccountKind
    ledger: int
    flags: int
    credit_limit: int
    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0
    dirty: bool = False


@dataclass(slots=True)
class _Pending:
    id: int
    key: str
    debit_id: int
    credit_id: int
    amount: int
    state: PendingState
    expires_ts: int | None


@dataclass(frozen=True, slots=True)
class StatementLine:
    """One transfer on an account statement with the running posted balance (normal side)."""

    transfer_id: int
    transfer_key: str
    entry_key: str
    kind: str
    ts_us: int
    counterparty: str
    debit_fen: int
    credit_fen: int
    flags: TransferFlags
    balance_fen: int


@dataclass(frozen=True, slots=True)
class TrialBalance:
    """Sum of all posted debits and credits per ledger; they must be equal (double entry)."""

    debits_fen: dict[int, int]
    credits_fen: dict[int, int]
    accounts: list[Balance] = field(default_factory=list)

    @property
    def balanced(self) -> bool:
        return all(self.debits_fen.get(k, 0) == self.credits_fen.get(k, 0)
                   for k in set(self.debits_fen) | set(self.credits_fen))


@dataclass(frozen=True, slots=True)
class EntryView:
    """A stored journal entry and its transfers (names resolved)."""

    id: int
    key: str
    kind: str
    ts_us: int
    metadata: dict
    reverses_key: str
    reversed_by_key: str
    transfers: list[dict]


class Ledger:
    """Double-entry ledger over an SQLAlchemy Engine (SQLite or PostgreSQL).

    Thread-safe: each call uses its own connection and transaction. ``clock_us`` gives the
    ledger's time (µs since the epoch); it is made monotonic per instance.
    """

    def __init__(self, engine: Engine, *, clock_us: Callable[[], int] = wall_clock_us,
                 retries_max: int = 8) -> None:
        self.engine = engine
        self._clock_us = clock_us
        self._last_ts = 0
        self._ts_lock = threading.Lock()
        self.retries_max = retries_max
        self._name_cache: dict[str, tuple[int, str, int, int, int]] = {}

    # ------------------------------------------------------------------ clock and names
    def now_us(self) -> int:
        """The ledger's monotonic clock in µs."""
        with self._ts_lock:
            ts = max(self._clock_us(), self._last_ts + 1)
            self._last_ts = ts
            return ts

    def _resolve(self, conn: Connection, names: Iterable[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        missing = []
        for name in names:
            if not name:
                continue
            hit = self._name_cache.get(name)
            if hit is not None:
                found[name] = hit[0]
            else:
                missing.append(name)
        for chunk in _chunks(missing):
            rows = conn.execute(select(s.accounts.c.id, s.accounts.c.name, s.accounts.c.kind,
                                       s.accounts.c.ledger, s.accounts.c.flags,
                                       s.accounts.c.credit_limit)
                                .where(s.accounts.c.name.in_(chunk))).all()
            for row in rows:
                self._name_cache[row.name] = (row.id, row.kind, row.ledger, row.flags, row.credit_limit)
                found[row.name] = row.id
        return found

    # ------------------------------------------------------------------ accounts
    def create_accounts(self, specs: Sequence[AccountSpec]) -> list[AccountResult]:
        """Create accounts, idempotently by name: an identical existing account is ``EXISTS``;
        an existing one with other attributes is ``EXISTS_WITH_DIFFERENT_*`` (nothing changes).

        Returns one result per spec, in order. All valid new accounts are created in one
        transaction.
        """
        results: list[AccountResult | None] = [None] * len(specs)
        for i, spec in enumerate(specs):
            if not spec.name or len(spec.name) > KEY_LENGTH_MAX:
                results[i] = AccountResult.NAME_MUST_NOT_BE_EMPTY
            elif (spec.flags & AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS
                  and spec.flags & AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS):
                results[i] = AccountResult.FLAGS_ARE_MUTUALLY_EXCLUSIVE
            elif spec.credit_limit_fen < 0 or spec.credit_limit_fen > AMOUNT_FEN_MAX:
                results[i] = AccountResult.CREDIT_LIMIT_MUST_NOT_BE_NEGATIVE
            elif spec.currency not in CURRENCY_EXPONENTS:
                results[i] = AccountResult.UNKNOWN_CURRENCY

        def work(conn: Connection) -> list[AccountResult]:
            out = list(results)
            names = [sp.name for sp, r in zip(specs, out) if r is None]
            existing = {}
            for chunk in _chunks(names):
                for row in conn.execute(select(s.accounts).where(s.accounts.c.name.in_(chunk))):
                    existing[row.name] = row
            new_rows = []
            seen: dict[str, AccountSpec] = {}
            now = self.now_us()
            for i, spec in enumerate(specs):
                if out[i] is not None:
                    continue
                row = existing.get(spec.name)
                if row is None and spec.name in seen:
                    other = seen[spec.name]
                    out[i] = AccountResult.EXISTS if other == spec else AccountResult.EXISTS_WITH_DIFFERENT_FLAGS
                    continue
                if row is not None:
                    out[i] = _compare_account(row, spec)
                    continue
                seen[spec.name] = spec
                new_rows.append(dict(name=spec.name, kind=spec.kind.value, code=spec.code,
                                     ledger=spec.ledger, currency=spec.currency, flags=int(spec.flags),
                                     credit_limit=spec.credit_limit_fen, debits_pending=0,
                                     debits_posted=0, credits_pending=0, credits_posted=0,
                                     created_ts=now))
                out[i] = AccountResult.OK
            if new_rows:
                conn.execute(insert(s.accounts), new_rows)
            return out  # type: ignore[return-value]

        return run_with_retry(self.engine, work, retries_max=self.retries_max)

    # ------------------------------------------------------------------ writes
    def submit(self, entry: EntrySpec, hook: "EntryHook | None" = None) -> EntryOutcome:
        """Submit one journal entry; see :meth:`submit_many`."""
        return self.submit_many([entry], [hook])[0]

    def submit_many(self, entries: Sequence[EntrySpec],
                    hooks: "Sequence[EntryHook | None] | None" = None) -> list[EntryOutcome]:
        """Apply a batch of journal entries in one database transaction (group commit).

        Each entry succeeds or fails on its own (a failing entry posts nothing and does not
        fail its neighbours). Returns one :class:`EntryOutcome` per entry, in order.
        ``hooks[i]``, when given, is called as ``hook(conn, outcome)`` inside the same database
        transaction right after entry ``i`` is newly posted (never on a replay or a failure), so
        that a service can write its own record atomically with the postings; it must only
        insert rows and must not raise for business reasons.
        Raises ``ValueError`` for a batch larger than ``BATCH_ENTRIES_MAX``; database errors
        other than retryable ones propagate (and nothing of the batch is written).
        """
        if len(entries) > BATCH_ENTRIES_MAX:
            raise ValueError(f"batch of {len(entries)} entries exceeds {BATCH_ENTRIES_MAX}")
        static = [_static_check(e) for e in entries]
        hooks = list(hooks) if hooks is not None else [None] * len(entries)
        if len(hooks) != len(entries):
            raise ValueError("hooks must match entries one to one")
        return run_with_retry(self.engine, lambda conn: self._apply_batch(conn, entries, static, hooks),
                              retries_max=self.retries_max)

    def _apply_batch(self, conn: Connection, entries: Sequence[EntrySpec],
                     static: list[EntryOutcome | None], hooks: list) -> list[EntryOutcome]:
        now = self.now_us()
        live = [i for i, o in enumerate(static) if o is None]
        outcomes: list[EntryOutcome | None] = list(static)
        if not live:
            return outcomes  # type: ignore[return-value]

        # Existing entries (idempotency) — replays need no locks.
        keys = list({entries[i].key for i in live})
        existing: dict[str, tuple[int, str, int]] = {}
        for chunk in _chunks(keys):
            for row in conn.execute(select(s.entries.c.id, s.entries.c.key, s.entries.c.content_hash,
                                           s.entries.c.ts).where(s.entries.c.key.in_(chunk))):
                existing[row.key] = (row.id, row.content_hash, row.ts)
        hashes = {i: entries[i].content_hash() for i in live}
        replay_ids = [existing[entries[i].key][0] for i in live if entries[i].key in existing]
        transfer_ids_by_entry: dict[int, list[int]] = {}
        for chunk in _chunks(replay_ids):
            for row in conn.execute(select(s.transfers.c.id, s.transfers.c.entry_id)
                                    .where(s.transfers.c.entry_id.in_(chunk)).order_by(s.transfers.c.id)):
                transfer_ids_by_entry.setdefault(row.entry_id, []).append(row.id)
        todo = []
        for i in live:
            e = entries[i]
            if e.key in existing:
                eid, h, ts = existing[e.key]
                if h == hashes[i]:
                    outcomes[i] = EntryOutcome(e.key, EntryResult.OK, eid,
                                               tuple(transfer_ids_by_entry.get(eid, ())), ts, replayed=True)
                else:
                    outcomes[i] = EntryOutcome(e.key, EntryResult.EXISTS_WITH_DIFFERENT_CONTENT,
                                               detail="the key was used for an entry with other content")
            else:
                todo.append(i)
        if not todo:
            return outcomes  # type: ignore[return-value]

        # Pending transfers referenced by post/void, and every account name.
        pending_keys = {t.pending_key for i in todo for t in entries[i].transfers if t.pending_key}
        names = {n for i in todo for t in entries[i].transfers for n in (t.debit, t.credit) if n}
        names |= {a.account for i in todo for a in entries[i].assertions}
        ids = self._resolve(conn, names)
        pendings = self._load_pendings(conn, pending_keys)
        lock_ids = set(ids.values()) | {p.debit_id for p in pendings.values()} | {p.credit_id for p in pendings.values()}
        expired = self._expired_pendings(conn, lock_ids, now)
        lock_ids |= {p.debit_id for p in expired} | {p.credit_id for p in expired}

        accounts = self._lock_accounts(conn, sorted(lock_ids))
        # Re-read under the locks: resolutions happen only under both accounts' locks.
        pendings = self._load_pendings(conn, pending_keys)
        expired = [p for p in self._expired_pendings(conn, set(accounts), now)
                   if p.debit_id in accounts and p.credit_id in accounts]
        new_entries: list[dict] = []
        new_transfers: list[dict] = []
        pending_updates: list[dict] = []
        new_pendings: list[dict] = []
        new_reversals: list[tuple[int, str]] = []  # (batch entry index, reversed key)

        for p in expired:  # the ledger's clock voids expired holds
            a, b = accounts[p.debit_id], accounts[p.credit_id]
            a.debits_pending -= p.amount
            b.credits_pending -= p.amount
            a.dirty = b.dirty = True
            key = f"expire:{p.key}"[:160]
            new_entries.append(dict(key=f"expire:{p.id}", content_hash="", kind="expiry",
                                    reverses_entry_id=None, metadata="{}", ts=now))
            new_transfers.append(dict(_entry=len(new_entries) - 1, key=key, debit_account_id=p.debit_id,
                                      credit_account_id=p.credit_id, amount=p.amount,
                                      flags=int(TransferFlags.VOID_PENDING | TransferFlags.EXPIRED),
                                      pending_id=p.id, timeout_s=0, code=0, ts=now))
            pending_updates.append(dict(_tid=p.id, _state=int(PendingState.EXPIRED),
                                        _by=len(new_transfers) - 1))
            pendings.pop(p.key, None)
            p.state = PendingState.EXPIRED
            pendings[p.key] = p

        # Transfer keys already used by other entries, and reversal targets.
        tkeys = [t.key for i in todo for t in entries[i].transfers]
        used_tkeys: set[str] = set()
        for chunk in _chunks(tkeys):
            used_tkeys |= set(conn.scalars(select(s.transfers.c.key).where(s.transfers.c.key.in_(chunk))))
        rev_keys = {entries[i].reverses for i in todo if entries[i].reverses}
        rev_targets: dict[str, tuple[int, str, bool]] = {}  # key -> (id, kind, already reversed)
        for chunk in _chunks(list(rev_keys)):
            rows = conn.execute(select(s.entries.c.id, s.entries.c.key, s.entries.c.kind,
                                       s.entries.c.reverses_entry_id, s.reversals.c.reversal_entry_id)
                                .select_from(s.entries.outerjoin(s.reversals, s.reversals.c.entry_id == s.entries.c.id))
                                .where(s.entries.c.key.in_(chunk)))
            for row in rows:
                rev_targets[row.key] = (row.id, "reversal" if row.reverses_entry_id else row.kind,
                                        row.reversal_entry_id is not None)

        batch_keys: dict[str, int] = {}
        batch_tkeys: set[str] = set()
        batch_reversed: set[str] = set()
        for i in todo:
            e = entries[i]
            if e.key in batch_keys:  # duplicate inside this batch: replay or conflict later
                first = batch_keys[e.key]
                outcomes[i] = ("dup", first)  # type: ignore[assignment]
                continue
            outcome, staged = self._evaluate(e, ids, accounts, pendings, used_tkeys | batch_tkeys,
                                             rev_targets, batch_reversed, now)
            if outcome is not None:
                outcomes[i] = outcome
                continue
            batch_keys[e.key] = i
            # Apply the staged effects.
            for acc_id, (dp, dpo, cp, cpo) in staged["deltas"].items():
                a = accounts[acc_id]
                a.debits_pending += dp
                a.debits_posted += dpo
                a.credits_pending += cp
                a.credits_posted += cpo
                a.dirty = True
            entry_index = len(new_entries)
            new_entries.append(dict(key=e.key, content_hash=hashes[i], kind=e.kind,
                                    reverses_entry_id=rev_targets[e.reverses][0] if e.reverses else None,
                                    metadata=json.dumps(e.metadata, sort_keys=True, ensure_ascii=False),
                                    ts=now, _batch_index=i))
            if e.reverses:
                batch_reversed.add(e.reverses)
                new_reversals.append((entry_index, e.reverses))
            for t, row in zip(e.transfers, staged["rows"]):
                batch_tkeys.add(t.key)
                new_transfers.append(dict(_entry=entry_index, key=t.key, ts=now, **row))
                tindex = len(new_transfers) - 1
                if t.flags & TransferFlags.PENDING:
                    new_pendings.append(dict(_t=tindex, state=int(PendingState.PENDING),
                                             expires_ts=now + t.timeout_s * 1_000_000 if t.timeout_s else None))
                    pendings[t.key] = _Pending(-1 - tindex, t.key, row["debit_account_id"],
                                               row["credit_account_id"], row["amount"], PendingState.PENDING,
                                               None)
                elif t.flags & (TransferFlags.POST_PENDING | TransferFlags.VOID_PENDING):
                    p = pendings[t.pending_key]
                    state = PendingState.POSTED if t.flags & TransferFlags.POST_PENDING else PendingState.VOIDED
                    pending_updates.append(dict(_tid=p.id, _state=int(state), _by=tindex))
                    p.state = state

        # Persist: entries, transfers, pendings, reversals, balances.
        if new_entries:
            entry_ids = _insert_returning_ids(conn, s.entries, [
                {k: v for k, v in r.items() if not k.startswith("_")} for r in new_entries])
            for r, eid in zip(new_entries, entry_ids):
                r["_id"] = eid
            trows = []
            for r in new_transfers:
                row = {k: v for k, v in r.items() if not k.startswith("_")}
                row["entry_id"] = new_entries[r["_entry"]]["_id"]
                trows.append(row)
            # Pending ids referenced inside this batch are negative placeholders: resolve in order.
            transfer_ids: list[int] = []
            if trows:
                placeholder = any(row["pending_id"] is not None and row["pending_id"] < 0 for row in trows)
                if placeholder:
                    for row in trows:
                        if row["pending_id"] is not None and row["pending_id"] < 0:
                            row["pending_id"] = transfer_ids[-1 - row["pending_id"]]
                        transfer_ids.extend(_insert_returning_ids(conn, s.transfers, [row]))
                else:
                    transfer_ids = _insert_returning_ids(conn, s.transfers, trows)
            for r, tid in zip(new_transfers, transfer_ids):
                r["_id"] = tid
            if new_pendings:
                conn.execute(insert(s.pending), [dict(transfer_id=new_transfers[p["_t"]]["_id"],
                                                      state=p["state"], expires_ts=p["expires_ts"],
                                                      resolved_by=None) for p in new_pendings])
            if pending_updates:
                rows = []
                for u in pending_updates:
                    tid = u["_tid"] if u["_tid"] >= 0 else new_transfers[-1 - u["_tid"]]["_id"]
                    rows.append(dict(b_tid=tid, b_state=u["_state"], b_by=new_transfers[u["_by"]]["_id"]))
                conn.execute(update(s.pending).where(s.pending.c.transfer_id == bindparam("b_tid"))
                             .values(state=bindparam("b_state"), resolved_by=bindparam("b_by")), rows)
            if new_reversals:
                conn.execute(insert(s.reversals), [dict(entry_id=rev_targets[k][0],
                                                        reversal_entry_id=new_entries[ei]["_id"])
                                                   for ei, k in new_reversals])
            dirty = [a for a in accounts.values() if a.dirty]
            if dirty:
                conn.execute(update(s.accounts).where(s.accounts.c.id == bindparam("b_id")).values(
                    debits_pending=bindparam("b_dp"), debits_posted=bindparam("b_dpo"),
                    credits_pending=bindparam("b_cp"), credits_posted=bindparam("b_cpo")),
                    [dict(b_id=a.id, b_dp=a.debits_pending, b_dpo=a.debits_posted,
                          b_cp=a.credits_pending, b_cpo=a.credits_posted) for a in dirty])
            by_entry: dict[int, list[int]] = {}
            for r in new_transfers:
                by_entry.setdefault(r["_entry"], []).append(r["_id"])
            for ei, r in enumerate(new_entries):
                if "_batch_index" in r:
                    bi = r["_batch_index"]
                    outcomes[bi] = EntryOutcome(r["key"], EntryResult.OK, r["_id"],
                                                tuple(by_entry.get(ei, ())), now)
                    if hooks[bi] is not None:
                        hooks[bi](conn, outcomes[bi])
        # Duplicates inside the batch: replay of the first, or a conflict.
        for i, o in enumerate(outcomes):
            if isinstance(o, tuple):
                first = outcomes[o[1]]
                assert isinstance(first, EntryOutcome)
                if hashes[i] != hashes[o[1]]:
                    outcomes[i] = EntryOutcome(entries[i].key, EntryResult.EXISTS_WITH_DIFFERENT_CONTENT,
                                               detail="the key was used for an entry with other content")
                else:
                    outcomes[i] = replace(first, replayed=True) if first.ok else first
        return outcomes  # type: ignore[return-value]

    def _evaluate(self, e: EntrySpec, ids: dict[str, int], accounts: dict[int, _Account],
                  pendings: dict[str, _Pending], used_tkeys: set[str],
                  rev_targets: dict[str, tuple[int, str, bool]], batch_reversed: set[str],
                  now: int) -> tuple[EntryOutcome | None, dict]:
        """Check one entry against the locked state; return (failure, {}) or (None, staged)."""
        if e.reverses:
            target = rev_targets.get(e.reverses)
            if target is None:
                return EntryOutcome(e.key, EntryResult.REVERSAL_TARGET_NOT_FOUND,
                                    detail=f"no entry with key {e.reverses!r}"), {}
            if target[2] or e.reverses in batch_reversed:
                return EntryOutcome(e.key, EntryResult.ALREADY_REVERSED,
                                    detail=f"entry {e.reverses!r} was already reversed"), {}
            if target[1] in ("reversal", "expiry"):
                return EntryOutcome(e.key, EntryResult.REVERSAL_MUST_NOT_BE_REVERSED,
                                    detail=f"entry {e.reverses!r} is itself a reversal"), {}
        for a in e.assertions:
            acc_id = ids.get(a.account)
            acc = accounts.get(acc_id) if acc_id is not None else None
            actual = (acc.credits_posted - acc.debits_posted) if acc else None
            if actual != a.expected_fen:
                return EntryOutcome(e.key, EntryResult.BALANCE_ASSERTION_FAILED,
                                    detail=f"{a.account}: expected {a.expected_fen}, found {actual}"), {}

        def fail(index: int, result: TransferResult, detail: str) -> tuple[EntryOutcome, dict]:
            return EntryOutcome(e.key, EntryResult.TRANSFER_FAILED, failed_index=index,
                                transfer_result=result, detail=f"transfer {index}: {result.name.lower()}"
                                + (f" ({detail})" if detail else "")), {}

        deltas: dict[int, list[int]] = {}
        rows: list[dict] = []
        seen_keys: set[str] = set()
        touched_pending: set[str] = set()
        for index, t in enumerate(e.transfers):
            if t.key in used_tkeys or t.key in seen_keys:
                return fail(index, TransferResult.KEY_EXISTS_IN_ANOTHER_ENTRY, t.key)
            seen_keys.add(t.key)
            resolving = bool(t.flags & (TransferFlags.POST_PENDING | TransferFlags.VOID_PENDING))
            if resolving:
                p = pendings.get(t.pending_key)
                if p is None:
                    return fail(index, TransferResult.PENDING_TRANSFER_NOT_FOUND, t.pending_key)
                if p.state is PendingState.POSTED:
                    return fail(index, TransferResult.PENDING_TRANSFER_ALREADY_POSTED, t.pending_key)
                if p.state is PendingState.VOIDED:
                    return fail(index, TransferResult.PENDING_TRANSFER_ALREADY_VOIDED, t.pending_key)
                if p.state is PendingState.EXPIRED or (p.expires_ts is not None and p.expires_ts <= now):
                    return fail(index, TransferResult.PENDING_TRANSFER_EXPIRED, t.pending_key)
                if t.pending_key in touched_pending:
                    return fail(index, TransferResult.PENDING_TRANSFER_ALREADY_POSTED, t.pending_key)
                if t.debit and ids.get(t.debit) != p.debit_id:
                    return fail(index, TransferResult.PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT, t.debit)
                if t.credit and ids.get(t.credit) != p.credit_id:
                    return fail(index, TransferResult.PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT, t.credit)
                if t.amount_fen > p.amount:
                    return fail(index, TransferResult.EXCEEDS_PENDING_TRANSFER_AMOUNT,
                                f"{t.amount_fen} > {p.amount}")
                touched_pending.add(t.pending_key)
                debit_id, credit_id = p.debit_id, p.credit_id
                posted = 0
                if t.flags & TransferFlags.POST_PENDING:
                    posted = t.amount_fen or p.amount
                _add(deltas, debit_id, 0, -p.amount)
                _add(deltas, credit_id, 2, -p.amount)
                if posted:
                    _add(deltas, debit_id, 1, posted)
                    _add(deltas, credit_id, 3, posted)
                rows.append(dict(debit_account_id=debit_id, credit_account_id=credit_id,
                                 amount=posted if t.flags & TransferFlags.POST_PENDING else p.amount,
                                 flags=int(t.flags), pending_id=p.id, timeout_s=0, code=t.code))
                continue
            debit_id = ids.get(t.debit)
            credit_id = ids.get(t.credit)
            if t.debit == t.credit:
                return fail(index, TransferResult.ACCOUNTS_MUST_BE_DIFFERENT, t.debit)
            if debit_id is None:
                return fail(index, TransferResult.DEBIT_ACCOUNT_NOT_FOUND, t.debit)
            if credit_id is None:
                return fail(index, TransferResult.CREDIT_ACCOUNT_NOT_FOUND, t.credit)
            if accounts[debit_id].ledger != accounts[credit_id].ledger:
                return fail(index, TransferResult.ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER,
                            f"{t.debit} / {t.credit}")
            pending_flag = bool(t.flags & TransferFlags.PENDING)
            _add(deltas, debit_id, 0 if pending_flag else 1, t.amount_fen)
            _add(deltas, credit_id, 2 if pending_flag else 3, t.amount_fen)
            rows.append(dict(debit_account_id=debit_id, credit_account_id=credit_id, amount=t.amount_fen,
                             flags=int(t.flags), pending_id=None, timeout_s=t.timeout_s, code=t.code))
        # Limits on each account's net change within the entry (pending holds count).
        first_index: dict[int, int] = {}
        for index, row in enumerate(rows):
            first_index.setdefault(row["debit_account_id"], index)
            first_index.setdefault(row["credit_account_id"], index)
        for acc_id, (dp, dpo, cp, cpo) in deltas.items():
            a = accounts[acc_id]
            new = (a.debits_pending + dp, a.debits_posted + dpo, a.credits_pending + cp, a.credits_posted + cpo)
            if max(new) > BALANCE_MAX or new[0] + new[1] > BALANCE_MAX or new[2] + new[3] > BALANCE_MAX:
                return fail(first_index[acc_id], TransferResult.OVERFLOWS_BALANCE, a.name)
            debits, credits = new[0] + new[1], new[3]
            if a.flags & AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS and (dp + dpo - cpo) > 0 \
                    and debits > credits + a.credit_limit:
                return fail(first_index[acc_id], TransferResult.EXCEEDS_CREDITS,
                            f"{a.name}: available {credits + a.credit_limit - a.debits_pending - a.debits_posted}")
            credits_all, debits_posted = new[2] + new[3], new[1]
            if a.flags & AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS and (cp + cpo - dpo) > 0 \
                    and credits_all > debits_posted + a.credit_limit:
                return fail(first_index[acc_id], TransferResult.EXCEEDS_DEBITS, a.name)
        return None, {"deltas": deltas, "rows": rows}

    def _load_pendings(self, conn: Connection, keys: set[str]) -> dict[str, _Pending]:
        out: dict[str, _Pending] = {}
        t, p = s.transfers, s.pending
        for chunk in _chunks(list(keys)):
            rows = conn.execute(select(t.c.id, t.c.key, t.c.debit_account_id, t.c.credit_account_id,
                                       t.c.amount, p.c.state, p.c.expires_ts)
                                .select_from(t.join(p, p.c.transfer_id == t.c.id)).where(t.c.key.in_(chunk)))
            for r in rows:
                out[r.key] = _Pending(r.id, r.key, r.debit_account_id, r.credit_account_id, r.amount,
                                      PendingState(r.state), r.expires_ts)
        return out

    def _expired_pendings(self, conn: Connection, account_ids: set[int], now: int) -> list[_Pending]:
        if not account_ids:
            return []
        t, p = s.transfers, s.pending
        out: list[_Pending] = []
        for chunk in _chunks(sorted(account_ids)):
            rows = conn.execute(select(t.c.id, t.c.key, t.c.debit_account_id, t.c.credit_account_id,
                                       t.c.amount, p.c.expires_ts)
                                .select_from(p.join(t, p.c.transfer_id == t.c.id))
                                .where(p.c.state == int(PendingState.PENDING), p.c.expires_ts <= now,
                                       or_(t.c.debit_account_id.in_(chunk), t.c.credit_account_id.in_(chunk))))
            out.extend(_Pending(r.id, r.key, r.debit_account_id, r.credit_account_id, r.amount,
                                PendingState.PENDING, r.expires_ts) for r in rows)
        unique = {x.id: x for x in out}
        return [unique[k] for k in sorted(unique)]

    def _lock_accounts(self, conn: Connection, ids: list[int]) -> dict[int, _Account]:
        out: dict[int, _Account] = {}
        a = s.accounts
        for chunk in _chunks(ids):
            q = (select(a.c.id, a.c.name, a.c.kind, a.c.ledger, a.c.flags, a.c.credit_limit,
                        a.c.debits_pending, a.c.debits_posted, a.c.credits_pending, a.c.credits_posted)
                 .where(a.c.id.in_(chunk)).order_by(a.c.id))
            if not is_sqlite(self.engine):
                q = q.with_for_update()
            for r in conn.execute(q):
                out[r.id] = _Account(r.id, r.name, AccountKind(r.kind), r.ledger, r.flags, r.credit_limit,
                                     r.debits_pending, r.debits_posted, r.credits_pending, r.credits_posted)
        return out

    def expire_pending(self) -> int:
        """Sweeper: void every pending transfer whose timeout has passed. Returns the count."""
        with self.engine.connect() as conn:
            t, p = s.transfers, s.pending
            ids = set()
            for r in conn.execute(select(t.c.debit_account_id, t.c.credit_account_id)
                                  .select_from(p.join(t, p.c.transfer_id == t.c.id))
                                  .where(p.c.state == int(PendingState.PENDING), p.c.expires_ts <= self.now_us())):
                ids |= {r.debit_account_id, r.credit_account_id}
        if not ids:
            return 0
        names = []
        with self.engine.connect() as conn:
            names = list(conn.scalars(select(s.accounts.c.name).where(s.accounts.c.id.in_(list(ids)))))
        count = 0

        def work(conn: Connection) -> int:
            now = self.now_us()
            accounts = self._lock_accounts(conn, sorted(ids))
            expired = [x for x in self._expired_pendings(conn, set(accounts), now)
                       if x.debit_id in accounts and x.credit_id in accounts]
            for x in expired:
                e_id = _insert_returning_ids(conn, s.entries, [dict(
                    key=f"expire:{x.id}", content_hash="", kind="expiry", reverses_entry_id=None,
                    metadata="{}", ts=now)])[0]
                t_id = _insert_returning_ids(conn, s.transfers, [dict(
                    key=f"expire:{x.key}"[:160], entry_id=e_id, debit_account_id=x.debit_id,
                    credit_account_id=x.credit_id, amount=x.amount,
                    flags=int(TransferFlags.VOID_PENDING | TransferFlags.EXPIRED), pending_id=x.id,
                    timeout_s=0, code=0, ts=now)])[0]
                conn.execute(update(s.pending).where(s.pending.c.transfer_id == x.id)
                             .values(state=int(PendingState.EXPIRED), resolved_by=t_id))
                accounts[x.debit_id].debits_pending -= x.amount
                accounts[x.credit_id].credits_pending -= x.amount
                accounts[x.debit_id].dirty = accounts[x.credit_id].dirty = True
            for acc in accounts.values():
                if acc.dirty:
                    conn.execute(update(s.accounts).where(s.accounts.c.id == acc.id).values(
                        debits_pending=acc.debits_pending, credits_pending=acc.credits_pending))
            return len(expired)

        del names
        count = run_with_retry(self.engine, work, retries_max=self.retries_max)
        return count

    # ------------------------------------------------------------------ reads
    def balance(self, name: str, *, as_of_us: int | None = None) -> Balance:
        """Balances of one account now (expired holds already released), or posted balances
        as of an instant (µs since the epoch; pending then counts holds open at that instant).

        Raises ``KeyError`` for an unknown account.
        """
        return self.balances([name], as_of_us=as_of_us)[name]

    def balances(self, names: Sequence[str], *, as_of_us: int | None = None) -> dict[str, Balance]:
        """Balances of several accounts by name (see :meth:`balance`)."""
        a, t, p = s.accounts, s.transfers, s.pending
        out: dict[str, Balance] = {}
        with self.engine.connect() as conn:
            rows = []
            for chunk in _chunks(list(names)):
                rows += conn.execute(select(a).where(a.c.name.in_(chunk))).all()
            found = {r.name for r in rows}
            missing = [n for n in names if n not in found]
            if missing:
                raise KeyError(f"unknown account {missing[0]!r}")
            if as_of_us is None:
                now = self.now_us()
                for r in rows:
                    released_d = conn.scalar(select(func.coalesce(func.sum(t.c.amount), 0))
                                             .select_from(p.join(t, p.c.transfer_id == t.c.id))
                                             .where(p.c.state == int(PendingState.PENDING),
                                                    p.c.expires_ts <= now, t.c.debit_account_id == r.id))
                    released_c = conn.scalar(select(func.coalesce(func.sum(t.c.amount), 0))
                                             .select_from(p.join(t, p.c.transfer_id == t.c.id))
                                             .where(p.c.state == int(PendingState.PENDING),
                                                    p.c.expires_ts <= now, t.c.credit_account_id == r.id))
                    out[r.name] = Balance(r.name, AccountKind(r.kind), r.debits_pending - int(released_d),
                                          r.debits_posted, r.credits_pending - int(released_c), r.credits_posted)
                return out
            for r in rows:
                out[r.name] = Balance(r.name, AccountKind(r.kind), *_recompute(conn, r.id, as_of_us))
        return out

    def statement(self, name: str, *, after_id: int = 0, limit: int = 100) -> list[StatementLine]:
        """An account's transfers after transfer id ``after_id`` (paging), oldest first, at most
        ``limit`` (≤ 1000), each with the running posted balance on the account's normal side.
        Pending, void and expiry transfers are listed with their flags and do not move the
        posted balance. Raises ``KeyError`` for an unknown account."""
        limit = max(1, min(limit, 1000))
        a, t, e = s.accounts, s.transfers, s.entries
        with self.engine.connect() as conn:
            acc = conn.execute(select(a.c.id, a.c.kind).where(a.c.name == name)).first()
            if acc is None:
                raise KeyError(f"unknown account {name!r}")
            kind = AccountKind(acc.kind)
            _, dpo, _, cpo = _recompute(conn, acc.id, None, before_transfer_id=after_id + 1)
            running = cpo - dpo if kind.credit_normal else dpo - cpo
            other = a.alias("other")
            rows = conn.execute(
                select(t.c.id, t.c.key, t.c.debit_account_id, t.c.credit_account_id, t.c.amount, t.c.flags,
                       t.c.ts, e.c.key.label("entry_key"), e.c.kind, other.c.name.label("other_name"))
                .select_from(t.join(e, e.c.id == t.c.entry_id).join(
                    other, other.c.id == _case_other(t, acc.id)))
                .where(or_(t.c.debit_account_id == acc.id, t.c.credit_account_id == acc.id), t.c.id > after_id)
                .order_by(t.c.id).limit(limit)).all()
        lines = []
        for r in rows:
            flags = TransferFlags(r.flags)
            moves = not (flags & (TransferFlags.PENDING | TransferFlags.VOID_PENDING))
            is_debit = r.debit_account_id == acc.id
            if moves:
                sign = -1 if (is_debit == kind.credit_normal) else 1
                running += sign * r.amount
            lines.append(StatementLine(r.id, r.key, r.entry_key, r.kind, r.ts, r.other_name,
                                       r.amount if is_debit else 0, 0 if is_debit else r.amount, flags, running))
        return lines

    def trial_balance(self) -> TrialBalance:
        """All posted debits and credits per ledger, and every account's balances."""
        a = s.accounts
        debits: dict[int, int] = {}
        credits: dict[int, int] = {}
        balances = []
        with self.engine.connect() as conn:
            for r in conn.execute(select(a).order_by(a.c.id)):
                debits[r.ledger] = debits.get(r.ledger, 0) + r.debits_posted
                credits[r.ledger] = credits.get(r.ledger, 0) + r.credits_posted
                balances.append(Balance(r.name, AccountKind(r.kind), r.debits_pending, r.debits_posted,
                                        r.credits_pending, r.credits_posted))
        return TrialBalance(debits, credits, balances)

    def entry(self, key: str) -> EntryView | None:
        """The stored entry with this key and its transfers, or None."""
        e, t, a, rv = s.entries, s.transfers, s.accounts, s.reversals
        with self.engine.connect() as conn:
            row = conn.execute(select(e).where(e.c.key == key)).first()
            if row is None:
                return None
            reverses_key = ""
            if row.reverses_entry_id:
                reverses_key = conn.scalar(select(e.c.key).where(e.c.id == row.reverses_entry_id)) or ""
            rev_by = conn.scalar(select(e.c.key).select_from(rv.join(e, e.c.id == rv.c.reversal_entry_id))
                                 .where(rv.c.entry_id == row.id)) or ""
            d, c = a.alias("d"), a.alias("c")
            trs = conn.execute(select(t.c.id, t.c.key, d.c.name.label("debit"), c.c.name.label("credit"),
                                      t.c.amount, t.c.flags, t.c.code)
                               .select_from(t.join(d, d.c.id == t.c.debit_account_id)
                                            .join(c, c.c.id == t.c.credit_account_id))
                               .where(t.c.entry_id == row.id).order_by(t.c.id)).all()
        return EntryView(row.id, row.key, row.kind, row.ts, json.loads(row.metadata), reverses_key, rev_by,
                         [dict(id=x.id, key=x.key, debit=x.debit, credit=x.credit, amount_fen=x.amount,
                               flags=int(x.flags), code=x.code) for x in trs])

    # ------------------------------------------------------------------ audit chain
    def seal(self) -> int:
        """Seal every unsealed transfer into the hash chain (off the hot path). Returns the
        number of transfers sealed. Each seal's hash is SHA-256 over the previous hash and the
        canonical rows of its transfers (see :func:`_seal_hash`)."""
        def work(conn: Connection) -> int:
            last = conn.execute(select(s.seals).order_by(s.seals.c.seq.desc()).limit(1)).first()
            after = last.last_transfer_id if last else 0
            prev = last.hash if last else "0" * 64
            rows = _chain_rows(conn, after, None)
            if not rows:
                return 0
            conn.execute(insert(s.seals).values(seq=(last.seq + 1) if last else 1,
                                                first_transfer_id=rows[0][0], last_transfer_id=rows[-1][0],
                                                transfer_count=len(rows), prev_hash=prev,
                                                hash=_seal_hash(prev, rows), sealed_ts=self.now_us()))
            return len(rows)
        return run_with_retry(self.engine, work, retries_max=self.retries_max)

    def verify(self) -> list[str]:
        """Recompute every account's balances from the transfers and check the hash chain.

        Returns a list of human-readable problems (empty when everything agrees)."""
        problems: list[str] = []
        a = s.accounts
        with self.engine.connect() as conn:
            for r in conn.execute(select(a).order_by(a.c.id)):
                got = _recompute(conn, r.id, None)
                want = (r.debits_pending, r.debits_posted, r.credits_pending, r.credits_posted)
                if got != want:
                    problems.append(f"account {r.name}: stored {want} but transfers give {got}")
            prev = "0" * 64
            after = 0
            for seal in conn.execute(select(s.seals).order_by(s.seals.c.seq)):
                if seal.prev_hash != prev:
                    problems.append(f"seal {seal.seq}: previous hash does not chain")
                rows = _chain_rows(conn, after, seal.last_transfer_id)
                if len(rows) != seal.transfer_count or _seal_hash(seal.prev_hash, rows) != seal.hash:
                    problems.append(f"seal {seal.seq}: transfers {seal.first_transfer_id}..{seal.last_transfer_id}"
                                    " do not match their hash (history was edited)")
                prev, after = seal.hash, seal.last_transfer_id
            tb_d = conn.scalar(select(func.coalesce(func.sum(a.c.debits_posted), 0)))
            tb_c = conn.scalar(select(func.coalesce(func.sum(a.c.credits_posted), 0)))
            if tb_d != tb_c:
                problems.append(f"trial balance: debits {tb_d} != credits {tb_c}")
        return problems


# ---------------------------------------------------------------------- helpers
def _chunks(items: list, size: int = SQL_IN_CHUNK_MAX):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _add(deltas: dict[int, list[int]], acc_id: int, slot: int, amount: int) -> None:
    d = deltas.setdefault(acc_id, [0, 0, 0, 0])
    d[slot] += amount


def _insert_returning_ids(conn: Connection, table, rows: list[dict]) -> list[int]:
    if not rows:
        return []
    result = conn.execute(insert(table).returning(table.c.id, sort_by_parameter_order=True), rows)
    return [r[0] for r in result]


def _case_other(t, account_id: int):
    from sqlalchemy import case
    return case((t.c.debit_account_id == account_id, t.c.credit_account_id), else_=t.c.debit_account_id)


def _recompute(conn: Connection, account_id: int, as_of_us: int | None, *,
               before_transfer_id: int | None = None) -> tuple[int, int, int, int]:
    """(debits_pending, debits_posted, credits_pending, credits_posted) from the transfers."""
    t, p = s.transfers, s.pending
    r = t.alias("r")
    out = []
    for side in (t.c.debit_account_id, t.c.credit_account_id):
        cond = [side == account_id]
        if as_of_us is not None:
            cond.append(t.c.ts <= as_of_us)
        if before_transfer_id is not None:
            cond.append(t.c.id < before_transfer_id)
        posted_flags = or_(t.c.flags == int(TransferFlags.NONE), t.c.flags == int(TransferFlags.POST_PENDING))
        posted = conn.scalar(select(func.coalesce(func.sum(t.c.amount), 0)).where(and_(*cond), posted_flags))
        held = conn.scalar(select(func.coalesce(func.sum(t.c.amount), 0)).where(
            and_(*cond), t.c.flags == int(TransferFlags.PENDING)))
        res_cond = [r.c.pending_id == t.c.id]
        if as_of_us is not None:
            res_cond.append(r.c.ts <= as_of_us)
        if before_transfer_id is not None:
            res_cond.append(r.c.id < before_transfer_id)
        released = conn.scalar(select(func.coalesce(func.sum(t.c.amount), 0)).where(
            and_(*cond), t.c.flags == int(TransferFlags.PENDING),
            select(r.c.id).where(*res_cond).exists()))
        out.append((int(held) - int(released), int(posted)))
    (dp, dpo), (cp, cpo) = out
    return dp, dpo, cp, cpo


def _chain_rows(conn: Connection, after_id: int, upto_id: int | None) -> list[tuple]:
    t, e = s.transfers, s.entries
    q = (select(t.c.id, t.c.key, e.c.key, t.c.debit_account_id, t.c.credit_account_id, t.c.amount,
                t.c.flags, t.c.pending_id, t.c.ts)
         .select_from(t.join(e, e.c.id == t.c.entry_id)).where(t.c.id > after_id).order_by(t.c.id))
    if upto_id is not None:
        q = q.where(t.c.id <= upto_id)
    return [tuple(r) for r in conn.execute(q)]


def _seal_hash(prev_hash: str, rows: list[tuple]) -> str:
    h = hashlib.sha256(prev_hash.encode())
    for row in rows:
        h.update(json.dumps(list(row), separators=(",", ":")).encode())
        h.update(b"\n")
    return h.hexdigest()


def _compare_account(row, spec: AccountSpec) -> AccountResult:
    if row.kind != spec.kind.value:
        return AccountResult.EXISTS_WITH_DIFFERENT_KIND
    if row.code != spec.code:
        return AccountResult.EXISTS_WITH_DIFFERENT_CODE
    if row.ledger != spec.ledger:
        return AccountResult.EXISTS_WITH_DIFFERENT_LEDGER
    if row.flags != int(spec.flags):
        return AccountResult.EXISTS_WITH_DIFFERENT_FLAGS
    if row.credit_limit != spec.credit_limit_fen:
        return AccountResult.EXISTS_WITH_DIFFERENT_CREDIT_LIMIT
    return AccountResult.EXISTS


def _static_check(e: EntrySpec) -> EntryOutcome | None:
    """Checks that need no state, in the documented order; None when the entry may proceed."""
    if not e.key:
        return EntryOutcome(e.key, EntryResult.KEY_MUST_NOT_BE_EMPTY)
    if len(e.key) > KEY_LENGTH_MAX:
        return EntryOutcome(e.key, EntryResult.KEY_TOO_LONG)
    if not e.transfers:
        return EntryOutcome(e.key, EntryResult.TRANSFERS_MUST_NOT_BE_EMPTY)
    if len(e.transfers) > TRANSFERS_PER_ENTRY_MAX:
        return EntryOutcome(e.key, EntryResult.TOO_MANY_TRANSFERS)
    for index, t in enumerate(e.transfers):
        result = _static_transfer(t)
        if result is not TransferResult.OK:
            return EntryOutcome(e.key, EntryResult.TRANSFER_FAILED, failed_index=index, transfer_result=result,
                                detail=f"transfer {index}: {result.name.lower()}")
    return None


def _static_transfer(t: TransferSpec) -> TransferResult:
    if not t.key:
        return TransferResult.KEY_MUST_NOT_BE_EMPTY
    if len(t.key) > 160:
        return TransferResult.KEY_TOO_LONG
    kinds = [f for f in (TransferFlags.PENDING, TransferFlags.POST_PENDING, TransferFlags.VOID_PENDING)
             if t.flags & f]
    if len(kinds) > 1 or t.flags & TransferFlags.EXPIRED:
        return TransferResult.FLAGS_ARE_MUTUALLY_EXCLUSIVE
    resolving = bool(t.flags & (TransferFlags.POST_PENDING | TransferFlags.VOID_PENDING))
    if resolving and not t.pending_key:
        return TransferResult.PENDING_KEY_REQUIRED
    if not resolving and t.pending_key:
        return TransferResult.PENDING_KEY_MUST_BE_EMPTY
    if t.timeout_s and not t.flags & TransferFlags.PENDING:
        return TransferResult.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER
    if t.timeout_s < 0 or t.timeout_s > TIMEOUT_S_MAX:
        return TransferResult.TIMEOUT_TOO_LARGE
    if t.amount_fen < 0:
        return TransferResult.AMOUNT_MUST_NOT_BE_NEGATIVE
    if t.amount_fen == 0 and not resolving:
        return TransferResult.AMOUNT_MUST_BE_POSITIVE
    if t.amount_fen > AMOUNT_FEN_MAX:
        return TransferResult.AMOUNT_TOO_LARGE
    return TransferResult.OK
