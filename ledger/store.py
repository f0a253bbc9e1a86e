"""The ledger on a SQL database: batches of journal entries, each batch one transaction.

:meth:`Ledger.submit_many` is the one write path (``submit`` is a batch of one; the group
committer in ``ledger.groupcommit`` gathers many callers' entries into one batch). A batch:

1. is prepared without I/O: stateless rules, canonical metadata, content hash
   (:func:`ledger.machine.prepare`);
2. loads under the account locks what it can touch (:class:`ledger.store_pg.PgStore`: every
   touched account locked once, ascending id order, one statement; SQLite: the single writer
   lock of ``BEGIN IMMEDIATE``);
3. is decided entry by entry in order by the pure state machine (:func:`ledger.machine.plan_batch`)
   — one bad entry fails alone, with the transfer and the rule that failed;
4. is written in bulk with one balance update per touched account, in the same transaction as
   the idempotency keys; hooks run in that transaction after the postings.

Deadlocks, serialization failures, lost connections and unique violations from a concurrent
duplicate roll the batch back and retry it with the same keys (bounded by ``retries_max``), so
a concurrent duplicate posts once and the other caller gets the replay.

Reads (balances now or as of an instant, statements with running balances, the trial balance,
entries), the expiry sweeper, the hash-chain seals and :meth:`Ledger.verify` live here too.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import orjson
from sqlalchemy import Connection, Engine, insert, select, text

from ledger import schema as s
from ledger.db import is_ledger_key_violation, is_sqlite, run_with_retry
from ledger.machine import (F_EXPIRED_VOID, F_NONE, F_PENDING, F_POST, F_VOID, S_EXPIRED, S_PENDING,
                            S_POSTED, S_VOIDED, Prepared, finish, is_valid_key, plan_batch, prepare)
from ledger.model import (INT32_MAX, KEY_LENGTH_MAX, TRANSFER_KEY_LENGTH_MAX, AccountFlags, AccountKind,
                          AccountResult, AccountSpec, Balance, EntryOutcome, EntrySpec, TransferFlags)
from ledger.money import AMOUNT_FEN_MAX, CURRENCY_EXPONENTS
from ledger.store_pg import (BEGIN_BARE, BEGIN_SHARED, PG_IDLE, BalanceCheck, HotPool, PgStore, ensure_prepared,
                             execute as pg_execute, hook_refusal, seal_watermark, text_literal)
from ledger.store_sqlite import SqliteStore

BATCH_ENTRIES_MAX = 4096
SQL_IN_CHUNK_MAX = 500
STATEMENT_LINES_MAX = 1000
SEAL_TRANSFERS_MAX = 50_000   #: transfers hashed into one seal row
EXPIRE_HOLDS_MAX = 1000       #: expired holds gathered per sweeper transaction
GENESIS_HASH = "0" * 64

EntryHook = Callable[[Connection, EntryOutcome], None]


def wall_clock_us() -> int:
    """Microseconds since the Unix epoch (UTC), from the system clock."""
    return time.time_ns() // 1000


@dataclass(frozen=True, slots=True)
class StatementLine:
    """One transfer on an account statement with the running posted balance (normal side).

    Pending and void lines (and ``EXPIRED`` voids the ledger wrote when a hold timed out) are
    listed with their flags and do not move the posted balance; ``pending_key`` names the
    pending transfer a post or void resolves."""

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
    pending_key: str = ""


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
    """Double-entry ledger over an SQLAlchemy Engine (SQLite or PostgreSQL), TigerBeetle's
    semantics (see ``ledger.model`` for the rules and their order).

    Thread-safe: each call uses its own connection and transaction. ``clock_us`` gives the
    ledger's time (µs since the epoch); it is made monotonic per instance. ``retries_max``
    bounds the attempts of one batch on deadlock, serialization failure, lost connection or a
    concurrent duplicate.
    """

    def __init__(self, engine: Engine, *, clock_us: Callable[[], int] = wall_clock_us,
                 retries_max: int = 8) -> None:
        assert retries_max >= 1
        self.engine = engine
        self._clock_us = clock_us
        self._last_ts = 0
        self._ts_lock = threading.Lock()
        self.retries_max = retries_max
        self._sqlite = is_sqlite(engine)
        self._store: PgStore | SqliteStore = SqliteStore() if self._sqlite else PgStore()

    # ------------------------------------------------------------------ clock
    def now_us(self) -> int:
        """The ledger's monotonic clock in µs."""
        with self._ts_lock:
            ts = max(self._clock_us(), self._last_ts + 1)
            self._last_ts = ts
            return ts

    # ------------------------------------------------------------------ accounts
    def create_accounts(self, specs: Sequence[AccountSpec]) -> list[AccountResult]:
        """Create accounts, idempotently by name (TigerBeetle ``create_accounts``).

        Returns one :class:`AccountResult` per spec, in order, checked in
        ``ACCOUNT_CHECK_ORDER``: an identical existing account (or an identical earlier spec in
        the same call) is ``EXISTS``; one with other attributes is ``EXISTS_WITH_DIFFERENT_*``
        and nothing changes. All new accounts are created in one transaction.
        """
        results: list[AccountResult | None] = [_static_account_result(spec) for spec in specs]

        def work(conn: Connection) -> list[AccountResult]:
            out = list(results)
            names = list({sp.name for sp, r in zip(specs, out) if r is None})
            existing: dict[str, AccountSpec] = {}
            for chunk in _chunks(names):
                for row in conn.execute(select(s.accounts).where(s.accounts.c.name.in_(chunk))):
                    existing[row.name] = AccountSpec(row.name, AccountKind(row.kind), row.code, row.ledger,
                                                     row.currency, AccountFlags(row.flags), row.credit_limit)
            new_rows = []
            now = self.now_us()
            for i, spec in enumerate(specs):
                if out[i] is not None:
                    continue
                other = existing.get(spec.name)
                if other is not None:
                    out[i] = _compare_account(other, spec)
                    continue
                existing[spec.name] = spec
                new_rows.append(dict(name=spec.name, kind=spec.kind.value, code=spec.code,
                                     ledger=spec.ledger, currency=spec.currency, flags=int(spec.flags),
                                     credit_limit=spec.credit_limit_fen, debits_pending=0,
                                     debits_posted=0, credits_pending=0, credits_posted=0,
                                     created_ts=now))
                out[i] = AccountResult.OK
            if new_rows:
                raced = _insert_absent_accounts(conn, new_rows)
                if raced:  # created by a concurrent transaction since we looked: compare with theirs
                    theirs = {}
                    for row in conn.execute(select(s.accounts).where(s.accounts.c.name.in_(sorted(raced)))):
                        theirs[row.name] = AccountSpec(row.name, AccountKind(row.kind), row.code, row.ledger,
                                                       row.currency, AccountFlags(row.flags), row.credit_limit)
                    for i, spec in enumerate(specs):
                        if results[i] is None and spec.name in theirs:
                            out[i] = _compare_account(theirs[spec.name], spec)
            return out  # type: ignore[return-value]

        if all(r is not None for r in results):
            return results  # type: ignore[return-value]
        return run_with_retry(self.engine, work, retries_max=self.retries_max)

    # ------------------------------------------------------------------ writes
    def submit(self, entry: EntrySpec, hook: EntryHook | None = None) -> EntryOutcome:
        """Submit one journal entry; see :meth:`submit_many`."""
        return self.submit_many([entry], [hook])[0]

    def submit_many(self, entries: Sequence[EntrySpec],
                    hooks: Sequence[EntryHook | None] | None = None) -> list[EntryOutcome]:
        """Apply a batch of journal entries in one database transaction (group commit).

        Each entry succeeds or fails on its own, evaluated in order against the balances left
        by the entries before it (a failing entry posts nothing and does not fail its
        neighbours). Returns one :class:`EntryOutcome` per entry, in order; rules and their
        order are in ``ledger.model``. ``hooks[i]``, when given, is called as
        ``hook(conn, outcome)`` inside the same database transaction right after the batch's
        postings when entry ``i`` was newly posted (never on a replay or a failure), so that a
        service can write its own record atomically with them; it must only write rows, do no
        network I/O, and must not raise for business reasons (raising rolls back the batch).
        ``hooks[i]`` may also be a tuple of hooks; :class:`BatchedHook` ones (such as
        :class:`InsertRows`) are merged across the batch and sent with its write.

        Raises ``ValueError`` for more than ``BATCH_ENTRIES_MAX`` entries or mismatched hooks,
        ``TypeError`` for a non-int amount or non-JSON metadata; database errors other than
        retryable ones propagate (and nothing of the batch is written).
        """
        if len(entries) > BATCH_ENTRIES_MAX:
            raise ValueError(f"batch of {len(entries)} entries exceeds {BATCH_ENTRIES_MAX}")
        if hooks is not None and len(hooks) != len(entries):
            raise ValueError("hooks must match entries one to one")
        return self.submit_prepared([prepare(e) for e in entries], hooks)

    def run_hooks(self, hooks: Sequence["BatchedHook"]) -> None:
        """Do the work of ``hooks`` (:class:`BatchedHook` leaves, merged as in a batch) in a
        transaction of their own, without a journal entry: for a service's row that moves no
        money but must be written under the same guards as those that do. On PostgreSQL one
        message (``BEGIN; …; COMMIT``) on a hot connection; on SQLite one write transaction.

        Raises :class:`ledger.db.HookRefused` when a hook refuses, the driver's unique violation
        (see :func:`ledger.db.is_unique_violation`) when a row exists; retryable failures are
        retried (same inputs); nothing is written when it raises."""
        merged = _merged(hooks)
        if self._sqlite:
            def work(conn: Connection) -> None:
                for group in merged:
                    type(group[0]).run_sa(conn, group)

            run_with_retry(self.engine, work, retries_max=self.retries_max, retry_on_unique=False)
            return

        def work_pg(raw, _conn, begin: str) -> None:
            sql = _merged_sql(merged, raw, self._store.session_info())
            try:
                pg_execute(raw, f"{begin}{sql}COMMIT")
            except Exception as exc:
                refused = hook_refusal(exc)
                if refused is not None:
                    raise refused from exc
                raise

        self._store.run(self.engine, work_pg, self.retries_max, with_sa=False, retry_on_unique=False)

    def submit_prepared(self, batch: Sequence[Prepared],
                        hooks: Sequence[EntryHook | None] | None = None, *,
                        placed: "Speculation | None" = None) -> list[EntryOutcome]:
        """:meth:`submit_many` for entries already passed through :func:`ledger.machine.prepare`
        (the group committer prepares in its callers' threads). ``placed``: the speculation of
        this very batch whose write was refused (PostgreSQL): the batch is decided again with
        locks but keeps the place in history the speculation had — its ids and its time — so
        that batches decided after it, on its plan, still come after it."""
        if all(p.failure is not None for p in batch):
            return [p.failure for p in batch]  # type: ignore[misc]
        return self._run_batch(batch, hooks, placed=placed)[0]

    def _run_batch(self, batch: Sequence[Prepared], hooks: Sequence[EntryHook | None] | None,
                   extra_ids: Sequence[int] = (), *, placed: "Speculation | None" = None
                   ) -> tuple[list[EntryOutcome], int]:
        """Run a batch in one transaction, retried as a whole; returns the outcomes and how
        many expired holds were voided on the way. ``extra_ids`` are more accounts to lock
        (the sweeper's); ``placed`` see :meth:`submit_prepared`."""
        lookups = _lookups(batch, extra_ids)
        if not any(h is not None for h in hooks or ()):
            hooks = None

        def decide(snap) -> tuple:
            plan = plan_batch(batch, snap)
            run_hooks = hooks is not None and any(
                h is not None and type(r) is tuple and r[0] == "new" for h, r in zip(hooks, plan.results))
            return plan, run_hooks

        if self._sqlite:
            def work_sqlite(conn: Connection):
                plan, run_hooks = decide(self._store.load(conn, self.now_us(), *lookups))
                ids = self._store.persist(conn, plan, commit=False) if plan.writes else ([], [])
                outcomes = finish(batch, plan, *ids)
                if run_hooks:
                    _call_hooks(conn, None, hooks, plan, outcomes)
                return outcomes, plan.expired_count

            return run_with_retry(self.engine, work_sqlite, retries_max=self.retries_max,
                                  retry_on_unique=is_ledger_key_violation)

        n_entries = len(lookups[3])
        n_transfers = sum(len(p.spec.transfers) for p in batch if p.failure is None)

        def work_pg(raw, conn: Connection | None, begin: str):
            if placed is None:
                snap = self._store.begin_and_load(raw, begin, self.now_us(), *lookups, n_entries, n_transfers)
            else:  # the speculation's time, ids drawn for it (enough: it saw the same holds expire)
                snap = self._store.begin_and_load(raw, begin, placed.snap.now_us, *lookups, 0, 0)
                snap.entry_ids, snap.transfer_ids = placed.snap.entry_ids, placed.snap.transfer_ids
            plan, run_hooks = decide(snap)
            # Merged row inserts ride in the write's message when no other hook needs a turn.
            inline = run_hooks and not _needs_sa(hooks)
            then_sql = _batched_sql(hooks, plan, raw, self._store.session_info()) if inline else ""
            if plan.writes:
                ids = self._store.persist(raw, plan, snap, commit=not run_hooks or inline, then_sql=then_sql)
            else:
                pg_execute(raw, "COMMIT")  # nothing to write: release the locks
                ids = ([], [])
            outcomes = finish(batch, plan, *ids)
            if run_hooks and not inline:
                _call_hooks(conn, raw, hooks, plan, outcomes)
                pg_execute(raw, "COMMIT")
            return outcomes, plan.expired_count

        return self._store.run(self.engine, work_pg, self.retries_max, with_sa=_needs_sa(hooks))

    # ------------------------------------------------------------------ pipelined (group commit)
    def speculate(self, batch: Sequence[Prepared], overlay: dict[int, tuple],
                  hooks: Sequence[EntryHook | None] | None = None) -> "Speculation | None":
        """PostgreSQL only, for :class:`ledger.groupcommit.GroupCommitter`: open a transaction,
        read what the batch touches *without* locking it, and decide the batch on top of
        ``overlay`` (account id -> balances planned by batches still being written). Returns
        None when no connection of the hot pool is free (the caller then uses the locking
        path). The decision is only valid once :meth:`commit_speculation` has locked every
        account it read and found the balances it assumed. With ``hooks`` the transaction runs
        on a pooled SQLAlchemy connection, which the hooks receive."""
        if self._sqlite:
            return None
        if not any(h is not None for h in hooks or ()):
            hooks = None
        conn = held = pool = None
        if _needs_sa(hooks):
            conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            raw, info, begin = conn.connection.driver_connection, conn.connection.info, BEGIN_SHARED
        else:
            pool = HotPool.of(self.engine)
            held = pool.get()
            if held is None:
                return None
            raw, info, begin = held.raw, held.info, BEGIN_BARE
        spec = Speculation(batch, None, None, {}, raw, held, pool, conn, hooks, info)
        try:
            lookups = _lookups(batch, ())
            n_transfers = sum(len(p.spec.transfers) for p in batch if p.failure is None)
            for attempt in (1, 2):
                self._store._ensure_prepared(raw, info)
                try:
                    snap = self._store.begin_and_load(raw, begin, self.now_us(), *lookups, len(lookups[3]),
                                                      n_transfers, lock=False)
                    break
                except Exception as exc:  # statements dropped by psycopg's DEALLOCATE ALL: once more
                    if getattr(exc, "sqlstate", None) != "26000" or attempt == 2:
                        raise
                    _rollback_quietly(raw)
                    info.pop("ledger_prepared", None)
            for acc_id, acc in snap.by_id.items():
                planned = overlay.get(acc_id)
                if planned is not None:
                    acc.dp, acc.dpo, acc.cp, acc.cpo = planned
            expected = {acc_id: (a.dp, a.dpo, a.cp, a.cpo) for acc_id, a in snap.by_id.items()}
            spec.plan = plan = plan_batch(batch, snap)
            if plan.unverifiable:  # a refusal the write could not check: decide it again, locked
                spec.release(failed=True)
                return None
            spec.expected = BalanceCheck(expected, plan.exact, plan.slack,
                                         plan.absent_entry_keys, plan.absent_transfer_keys)
            spec.snap = snap
            return spec
        except BaseException:
            spec.release(failed=True)
            raise

    def commit_speculation(self, spec: "Speculation") -> list[EntryOutcome]:
        """Lock every account the speculation read (one statement, ascending id order), check
        that their balances are the ones it assumed, write it, run its hooks and commit — one
        round trip without hooks. Raises :class:`ledger.db.StaleReadError` (balances moved, a
        pending transfer already resolved), the unique violation of a concurrent duplicate, or
        what a hook raised: nothing is written then, and the caller applies the batch again on
        the locking path."""
        raw, plan = spec.raw, spec.plan
        failed = True
        try:
            run_hooks = spec.hooks is not None and any(
                h is not None and type(r) is tuple and r[0] == "new" for h, r in zip(spec.hooks, plan.results))
            inline = run_hooks and not _needs_sa(spec.hooks)  # one message: write, inserts, COMMIT
            if plan.writes:
                ids = self._store.persist(raw, plan, spec.snap, commit=not run_hooks or inline,
                                          check=spec.expected,
                                          then_sql=_batched_sql(spec.hooks, plan, raw, spec.info) if inline else "")
            else:
                self._store.check_and_commit(raw, spec.expected)
                ids = ([], [])
            outcomes = finish(spec.batch, plan, *ids)
            if run_hooks and not inline:
                _call_hooks(spec.conn, raw, spec.hooks, plan, outcomes)
                pg_execute(raw, "COMMIT")
            failed = False
            return outcomes
        finally:
            spec.release(failed=failed)

    def expire_pending(self) -> int:
        """The sweeper: void every pending transfer whose timeout has passed, writing an
        ``expiry`` entry with a ``VOID_PENDING | EXPIRED`` transfer for each (history shows when
        the hold was released). Works in transactions of at most ``EXPIRE_HOLDS_MAX`` holds'
        accounts. Returns how many holds were expired. Holds past their timeout are also
        ignored by balance reads and voided by any batch that touches their accounts."""
        total = 0
        while True:
            now = self.now_us()
            with self.engine.connect() as conn:
                rows = conn.execute(text(
                    "SELECT debit_account_id, credit_account_id FROM ledger_pending "
                    "WHERE state = 1 AND expires_ts <= :now ORDER BY expires_ts LIMIT :n"),
                    {"now": now, "n": EXPIRE_HOLDS_MAX}).all()
            if not rows:
                return total
            ids = sorted({x for r in rows for x in r})
            count = self._run_batch([], None, extra_ids=ids)[1]
            total += count
            if count == 0:  # someone else released them meanwhile
                return total

    # ------------------------------------------------------------------ reads
    def balance(self, name: str, *, as_of_us: int | None = None) -> Balance:
        """Balances of one account now (holds past their timeout already released, whether or
        not the sweeper has run), or as of an instant (µs since the epoch): posted amounts of
        transfers at or before it, and holds open at it (created at or before, not resolved
        and not timed out by then).

        Raises ``KeyError`` for an unknown account.
        """
        return self.balances([name], as_of_us=as_of_us)[name]

    def balances(self, names: Sequence[str], *, as_of_us: int | None = None) -> dict[str, Balance]:
        """Balances of several accounts by name (see :meth:`balance`); ``KeyError`` names the
        first unknown account."""
        now = self.now_us()
        with self.engine.connect() as conn:
            if as_of_us is None:
                out = self.balances_on(conn, names, now)
            else:
                out = {}
                for r in self._account_rows(conn, names, now):
                    out[r.name] = Balance(r.name, AccountKind(r.kind), *_balance_as_of(conn, r.id, as_of_us))
        for n in names:
            if n not in out:
                raise KeyError(f"unknown account {n!r}")
        return out

    @staticmethod
    def _account_rows(conn: Connection, names: Sequence[str], now_us: int) -> list:
        rows = []
        for chunk in _chunks(list(dict.fromkeys(names))):
            rows += conn.execute(text(
                "SELECT a.id, a.name, a.kind, a.debits_pending, a.debits_posted, a.credits_pending, "
                "a.credits_posted, "
                " (SELECT coalesce(sum(p.amount), 0) FROM ledger_pending p WHERE p.state = 1 "
                "   AND p.expires_ts <= :now AND p.debit_account_id = a.id), "
                " (SELECT coalesce(sum(p.amount), 0) FROM ledger_pending p WHERE p.state = 1 "
                "   AND p.expires_ts <= :now AND p.credit_account_id = a.id) "
                "FROM ledger_accounts a WHERE a.name IN :names").bindparams(
                    _expanding("names")), {"now": now_us, "names": chunk}).all()
        return rows

    @classmethod
    def balances_on(cls, conn: Connection, names: Sequence[str], now_us: int) -> dict[str, Balance]:
        """Current balances of the accounts of ``names`` that exist, read on ``conn`` (the
        caller's connection and transaction); pending holds past their timeout at ``now_us``
        (µs) no longer count. Unknown names are left out."""
        return {r.name: Balance(r.name, AccountKind(r.kind), r.debits_pending - int(r[7]), r.debits_posted,
                                r.credits_pending - int(r[8]), r.credits_posted)
                for r in cls._account_rows(conn, names, now_us)}

    def statement(self, name: str, *, after_id: int = 0, limit: int = 100) -> list[StatementLine]:
        """An account's transfers with id greater than ``after_id`` (paging: pass the last
        line's ``transfer_id``), oldest first, at most ``limit`` (clamped to 1..1000), each with
        the running posted balance on the account's normal side. Raises ``KeyError`` for an
        unknown account."""
        limit = max(1, min(int(limit), STATEMENT_LINES_MAX))
        with self.engine.connect() as conn:
            acc = conn.execute(text("SELECT id, kind FROM ledger_accounts WHERE name = :n"), {"n": name}).first()
            if acc is None:
                raise KeyError(f"unknown account {name!r}")
            acc_id, kind = acc.id, AccountKind(acc.kind)
            dpo = cpo = 0
            if after_id > 0:
                dpo, cpo = conn.execute(text(
                    "SELECT coalesce(sum(CASE WHEN debit_account_id = :a THEN amount ELSE 0 END), 0), "
                    "coalesce(sum(CASE WHEN credit_account_id = :a THEN amount ELSE 0 END), 0) "
                    "FROM ledger_transfers WHERE (debit_account_id = :a OR credit_account_id = :a) "
                    "AND id <= :after AND flags IN (0, 2)"), {"a": acc_id, "after": after_id}).one()
            running = int(cpo) - int(dpo) if kind.credit_normal else int(dpo) - int(cpo)
            side = ("SELECT * FROM (SELECT id, key, entry_id, debit_account_id, credit_account_id, amount, "
                    "flags, ts, pending_id, {other} AS other_id FROM ledger_transfers "
                    "WHERE {me} = :a AND id > :after ORDER BY id LIMIT :n) AS {alias}")
            rows = conn.execute(text(
                "SELECT x.id, x.key, x.debit_account_id, x.amount, x.flags, x.ts, e.key AS entry_key, e.kind, "
                "o.name AS other_name, pt.key AS pending_key FROM ("
                + side.format(other="credit_account_id", me="debit_account_id", alias="d")
                + " UNION ALL "
                + side.format(other="debit_account_id", me="credit_account_id", alias="c")
                + ") AS x JOIN ledger_entries e ON e.id = x.entry_id "
                "JOIN ledger_accounts o ON o.id = x.other_id "
                "LEFT JOIN ledger_transfers pt ON pt.id = x.pending_id "
                "ORDER BY x.id LIMIT :n"), {"a": acc_id, "after": after_id, "n": limit}).all()
        lines = []
        for r in rows:
            flags = TransferFlags(r.flags)
            is_debit = r.debit_account_id == acc_id
            if r.flags == F_NONE or r.flags == F_POST:
                running += -r.amount if (is_debit == kind.credit_normal) else r.amount
            lines.append(StatementLine(r.id, r.key or "", r.entry_key or "", r.kind, r.ts, r.other_name,
                                       r.amount if is_debit else 0, 0 if is_debit else r.amount, flags,
                                       running, r.pending_key or ""))
        return lines

    def trial_balance(self) -> TrialBalance:
        """All posted debits and credits per ledger number, and every account's stored
        balances (holds past their timeout included until voided)."""
        debits: dict[int, int] = {}
        credits: dict[int, int] = {}
        balances = []
        with self.engine.connect() as conn:
            for r in conn.execute(text(
                    "SELECT name, kind, ledger, debits_pending, debits_posted, credits_pending, credits_posted "
                    "FROM ledger_accounts ORDER BY id")):
                debits[r.ledger] = debits.get(r.ledger, 0) + r.debits_posted
                credits[r.ledger] = credits.get(r.ledger, 0) + r.credits_posted
                balances.append(Balance(r.name, AccountKind(r.kind), r.debits_pending, r.debits_posted,
                                        r.credits_pending, r.credits_posted))
        return TrialBalance(debits, credits, balances)

    def entry(self, key: str) -> EntryView | None:
        """The stored entry with this key and its transfers (account names resolved), or None.
        Transfers are dicts with id, key, debit, credit, amount_fen, flags, code, pending_key."""
        if not is_valid_key(key, KEY_LENGTH_MAX):
            return None
        with self.engine.connect() as conn:
            row = conn.execute(text(
                "SELECT e.id, e.key, e.kind, e.ts, e.metadata, r.key AS reverses_key, "
                "(SELECT x.key FROM ledger_reversals v JOIN ledger_entries x ON x.id = v.reversal_entry_id "
                " WHERE v.entry_id = e.id) AS reversed_by_key "
                "FROM ledger_entries e LEFT JOIN ledger_entries r ON r.id = e.reverses_entry_id "
                "WHERE e.key = :k"), {"k": key}).first()
            if row is None:
                return None
            trs = conn.execute(text(
                "SELECT t.id, t.key, d.name AS debit, c.name AS credit, t.amount, t.flags, t.code, "
                "pt.key AS pending_key FROM ledger_transfers t "
                "JOIN ledger_accounts d ON d.id = t.debit_account_id "
                "JOIN ledger_accounts c ON c.id = t.credit_account_id "
                "LEFT JOIN ledger_transfers pt ON pt.id = t.pending_id "
                "WHERE t.entry_id = :e ORDER BY t.id"), {"e": row.id}).all()
        return EntryView(row.id, row.key, row.kind, row.ts, json.loads(row.metadata), row.reverses_key or "",
                         row.reversed_by_key or "",
                         [dict(id=x.id, key=x.key, debit=x.debit, credit=x.credit, amount_fen=x.amount,
                               flags=int(x.flags), code=x.code, pending_key=x.pending_key or "") for x in trs])

    # ------------------------------------------------------------------ audit chain
    def seal(self) -> int:
        """Seal every transfer not yet sealed into the hash chain, off the hot path.

        Each seal row covers a run of at most ``SEAL_TRANSFERS_MAX`` transfers in id order; its
        hash is SHA-256 over the previous seal's hash and the canonical rows of its transfers
        (:func:`chain_rows`, :func:`seal_hash`). On PostgreSQL ids are allocated by concurrent
        transactions, so sealing stops at a watermark below which every writer has finished
        (:func:`ledger.store_pg.seal_watermark`, which never blocks a writer); on SQLite the
        single writer commits in id order.
        Returns the number of transfers sealed.
        """
        if self._sqlite:
            watermark = None
        else:
            watermark = seal_watermark(self.engine)
        total = 0
        while True:
            def work(conn: Connection) -> int:
                last = conn.execute(select(s.seals).order_by(s.seals.c.seq.desc()).limit(1)).first()
                after = last.last_transfer_id if last else 0
                prev = last.hash if last else GENESIS_HASH
                rows = chain_rows(conn, after, watermark, SEAL_TRANSFERS_MAX)
                if not rows:
                    return 0
                conn.execute(insert(s.seals).values(
                    seq=(last.seq + 1) if last else 1, first_transfer_id=rows[0][0],
                    last_transfer_id=rows[-1][0], transfer_count=len(rows), prev_hash=prev,
                    hash=seal_hash(prev, rows), sealed_ts=self.now_us()))
                return len(rows)

            count = run_with_retry(self.engine, work, retries_max=self.retries_max)
            total += count
            if count < SEAL_TRANSFERS_MAX:
                return total

    def verify(self) -> list[str]:
        """Recompute every account's balances from the transfers, check every pending
        transfer's single resolution, the trial balance per ledger and the hash chain.

        Returns human-readable problems (empty when everything agrees); ``citizencard ledger
        verify`` exits non-zero when the list is not empty. Reads only; safe while writing
        (it reads one snapshot on PostgreSQL's REPEATABLE READ, and SQLite's read transaction).
        """
        problems: list[str] = []
        with self.engine.connect() as conn:
            if not self._sqlite:
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                self._verify_balances(conn, problems)
                self._verify_pending(conn, problems)
                self._verify_references(conn, problems)
                self._verify_chain(conn, problems)
        return problems

    def _verify_references(self, conn: Connection, problems: list[str]) -> None:
        """What foreign keys would check (the journal tables have none, see ``ledger.schema``)."""
        checks = (
            ("transfer {} belongs to no entry",
             "SELECT t.id FROM ledger_transfers t LEFT JOIN ledger_entries e ON e.id = t.entry_id "
             "WHERE e.id IS NULL"),
            ("entry {} has no transfers",
             "SELECT e.id FROM ledger_entries e WHERE NOT EXISTS "
             "(SELECT 1 FROM ledger_transfers t WHERE t.entry_id = e.id)"),
            ("pending row {} has no transfer",
             "SELECT p.transfer_id FROM ledger_pending p LEFT JOIN ledger_transfers t ON t.id = p.transfer_id "
             "WHERE t.id IS NULL"),
            ("reversal of entry {} does not match its entries",
             "SELECT r.entry_id FROM ledger_reversals r LEFT JOIN ledger_entries a ON a.id = r.entry_id "
             "LEFT JOIN ledger_entries b ON b.id = r.reversal_entry_id "
             "WHERE a.id IS NULL OR b.id IS NULL OR b.reverses_entry_id IS DISTINCT FROM r.entry_id"),
            ("entry {} is a reversal without a reversal row",
             "SELECT e.id FROM ledger_entries e WHERE e.reverses_entry_id IS NOT NULL AND NOT EXISTS "
             "(SELECT 1 FROM ledger_reversals r WHERE r.reversal_entry_id = e.id)"),
        )
        for message, sql in checks:
            for (ref,) in conn.execute(text(sql + " ORDER BY 1 LIMIT 20")):
                problems.append(message.format(ref))

    def _verify_balances(self, conn: Connection, problems: list[str]) -> None:
        computed: dict[int, list[int]] = {}

        def add(rows, slot: int) -> None:
            for acc_id, amount in rows:
                computed.setdefault(acc_id, [0, 0, 0, 0])[slot] += int(amount)

        add(conn.execute(text("SELECT debit_account_id, sum(amount) FROM ledger_transfers WHERE flags IN (0, 2) "
                              "GROUP BY debit_account_id")), 1)
        add(conn.execute(text("SELECT credit_account_id, sum(amount) FROM ledger_transfers WHERE flags IN (0, 2) "
                              "GROUP BY credit_account_id")), 3)
        # Held: pending transfers that no transfer resolves (the transfers alone decide).
        unresolved = ("FROM ledger_transfers t WHERE t.flags = 1 AND NOT EXISTS "
                      "(SELECT 1 FROM ledger_transfers r WHERE r.pending_id = t.id)")
        add(conn.execute(text(f"SELECT t.debit_account_id, sum(t.amount) {unresolved} GROUP BY t.debit_account_id")), 0)
        add(conn.execute(text(f"SELECT t.credit_account_id, sum(t.amount) {unresolved} GROUP BY t.credit_account_id")), 2)
        debits: dict[int, int] = {}
        credits: dict[int, int] = {}
        for r in conn.execute(text("SELECT id, name, ledger, flags, credit_limit, debits_pending, debits_posted, "
                                   "credits_pending, credits_posted FROM ledger_accounts ORDER BY id")):
            want = (r.debits_pending, r.debits_posted, r.credits_pending, r.credits_posted)
            got = tuple(computed.pop(r.id, [0, 0, 0, 0]))
            if got != want:
                problems.append(f"account {r.name}: stored (debits_pending, debits_posted, credits_pending, "
                                f"credits_posted) = {want} but the transfers give {got}")
            if r.flags & AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS and \
                    r.debits_pending + r.debits_posted > r.credits_posted + r.credit_limit:
                problems.append(f"account {r.name}: debits exceed credits despite its flag")
            if r.flags & AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS and \
                    r.credits_pending + r.credits_posted > r.debits_posted + r.credit_limit:
                problems.append(f"account {r.name}: credits exceed debits despite its flag")
            debits[r.ledger] = debits.get(r.ledger, 0) + r.debits_posted
            credits[r.ledger] = credits.get(r.ledger, 0) + r.credits_posted
        for acc_id in computed:
            problems.append(f"transfers name account id {acc_id}, which does not exist")
        for ledger_no in sorted(set(debits) | set(credits)):
            if debits.get(ledger_no, 0) != credits.get(ledger_no, 0):
                problems.append(f"trial balance of ledger {ledger_no}: debits {debits.get(ledger_no, 0)} "
                                f"!= credits {credits.get(ledger_no, 0)}")

    def _verify_pending(self, conn: Connection, problems: list[str]) -> None:
        expected_state = {F_POST: S_POSTED, F_VOID: S_VOIDED, F_EXPIRED_VOID: S_EXPIRED}
        resolutions: dict[int, list[tuple[int, int, int]]] = {}
        for rid, pid, flags, amount in conn.execute(text(
                "SELECT id, pending_id, flags, amount FROM ledger_transfers WHERE pending_id IS NOT NULL")):
            resolutions.setdefault(pid, []).append((rid, flags, amount))
        pending_rows = {r.transfer_id: r for r in conn.execute(text(
            "SELECT p.transfer_id, p.state, p.resolved_by, p.amount, p.debit_account_id, p.credit_account_id, "
            "t.key, t.flags, t.amount AS t_amount, t.debit_account_id AS t_d, t.credit_account_id AS t_c "
            "FROM ledger_pending p JOIN ledger_transfers t ON t.id = p.transfer_id"))}
        count = conn.execute(text("SELECT count(*) FROM ledger_transfers WHERE flags = 1")).scalar_one()
        if count != len(pending_rows):
            problems.append(f"{count} pending transfers but {len(pending_rows)} pending rows")
        for tid, p in pending_rows.items():
            label = f"pending transfer {p.key!r}"
            if p.flags != F_PENDING or (p.amount, p.debit_account_id, p.credit_account_id) != (p.t_amount, p.t_d, p.t_c):
                problems.append(f"{label}: pending row does not match its transfer")
            res = resolutions.pop(tid, [])
            if len(res) > 1:
                problems.append(f"{label}: resolved {len(res)} times")
            if p.state == S_PENDING:
                if res:
                    problems.append(f"{label}: marked pending but resolved by transfer {res[0][0]}")
                continue
            if not res:
                problems.append(f"{label}: marked resolved (state {p.state}) but no transfer resolves it")
                continue
            rid, flags, amount = res[0]
            if p.resolved_by != rid or expected_state.get(flags) != p.state:
                problems.append(f"{label}: state {p.state} / resolved_by {p.resolved_by} disagree with "
                                f"transfer {rid} (flags {flags})")
            if amount > p.amount:
                problems.append(f"{label}: resolved for {amount}, more than the {p.amount} held")
        for pid, res in resolutions.items():
            problems.append(f"transfer {res[0][0]} resolves transfer {pid}, which is not a pending transfer")

    def _verify_chain(self, conn: Connection, problems: list[str]) -> None:
        prev, after = GENESIS_HASH, 0
        for seal in conn.execute(select(s.seals).order_by(s.seals.c.seq)).all():
            if seal.prev_hash != prev:
                problems.append(f"seal {seal.seq}: its previous hash does not chain to seal {seal.seq - 1}")
            rows = chain_rows(conn, after, seal.last_transfer_id, None)
            if (len(rows) != seal.transfer_count or not rows or rows[0][0] != seal.first_transfer_id
                    or seal_hash(seal.prev_hash, rows) != seal.hash):
                problems.append(f"seal {seal.seq}: transfers {seal.first_transfer_id}..{seal.last_transfer_id} "
                                "do not match their hash (history was edited)")
            prev, after = seal.hash, seal.last_transfer_id


# ---------------------------------------------------------------------- helpers
def _lookups(batch: Sequence[Prepared], extra_ids: Sequence[int]) -> tuple:
    """What a batch must read: (names, extra account ids, pending keys, entry keys, transfer
    keys, reversal keys), only values the database can hold (anything else is not found)."""
    names: dict[str, None] = {}
    pending_keys: dict[str, None] = {}
    entry_keys: dict[str, None] = {}
    transfer_keys: list[str] = []
    reverse_keys: dict[str, None] = {}
    for p in batch:
        if p.failure is not None:
            continue
        spec = p.spec
        entry_keys[spec.key] = None
        if spec.reverses and is_valid_key(spec.reverses, KEY_LENGTH_MAX):
            reverse_keys[spec.reverses] = None
        for t in spec.transfers:
            names[t.debit] = None
            names[t.credit] = None
            if t.pending_key:
                pending_keys[t.pending_key] = None
            transfer_keys.append(t.key)
        for a in spec.assertions:
            names[a.account] = None
    names_ok = [n for n in names if n and is_valid_key(n, KEY_LENGTH_MAX)]
    pkeys_ok = [k for k in pending_keys if is_valid_key(k, TRANSFER_KEY_LENGTH_MAX)]
    tkeys_ok = [k for k in transfer_keys if is_valid_key(k, TRANSFER_KEY_LENGTH_MAX)]
    return names_ok, list(extra_ids), pkeys_ok, list(entry_keys), tkeys_ok, list(reverse_keys)


@dataclass(slots=True)
class Speculation:
    """A batch decided on an unlocked read (see :meth:`Ledger.speculate`); it holds its
    connection and open transaction until :meth:`Ledger.commit_speculation`."""

    batch: Sequence[Prepared]
    plan: object
    snap: object
    expected: object            #: what the decisions read of the balances (store_pg.BalanceCheck)
    raw: object                 #: the psycopg connection
    held: object                #: from the hot pool (no hooks) …
    pool: object
    conn: object                #: … or a pooled SQLAlchemy connection (hooks)
    hooks: object
    info: dict                  #: the connection's per-session info (statements it prepared)

    def planned_balances(self) -> dict[int, tuple]:
        """Balances of the accounts the batch changes, once it is written."""
        by_id = self.snap.by_id
        return {acc_id: (by_id[acc_id].dp, by_id[acc_id].dpo, by_id[acc_id].cp, by_id[acc_id].cpo)
                for acc_id in self.plan.deltas}

    def release(self, *, failed: bool) -> None:
        """Roll back what is left open (after a failure) and give the connection back."""
        if failed:
            _rollback_quietly(self.raw)
        if self.conn is not None:
            self.conn.close()
        else:
            self.pool.put(self.held)


def _rollback_quietly(raw) -> None:
    try:
        if not raw.closed and raw.pgconn.transaction_status != PG_IDLE:
            pg_execute(raw, "ROLLBACK")
    except Exception:  # the connection is dropped by the pool when it is broken
        pass


class BatchedHook:
    """An entry hook whose work for a whole batch is one piece (for example one multi-row
    INSERT), run in the batch's transaction for the entries newly posted by it (never on a
    replay or a refusal). Hooks of one batch with the same class and :attr:`merge_key` are
    merged, after the batch's plain hooks. On PostgreSQL :meth:`pg_sql` gives the statements,
    sent in the batch's write message right before its COMMIT (no SQLAlchemy connection, no
    extra round trip); elsewhere :meth:`run_sa` runs them on the batch's SQLAlchemy connection.

    A merged piece may refuse: its PostgreSQL statement raises an error whose message holds
    :data:`ledger.db.HOOK_REFUSED` (``CAST('ledger hook refused: …' AS int)``), or
    :meth:`run_sa` raises :class:`ledger.db.HookRefused`. The batch is then rolled back and, in
    the group committer, applied again entry by entry, so only the entry whose hook refused gets
    :class:`~ledger.db.HookRefused` (never retried: it is not a transient failure).
    """

    __slots__ = ()
    #: statements (name -> ``PREPARE name (…) AS …``) that :meth:`pg_sql` EXECUTEs; the ledger
    #: prepares them on a connection before it first sends the hook's work there
    pg_prepared: dict[str, str] = {}

    @property
    def merge_key(self):  # pragma: no cover - overridden
        raise NotImplementedError

    @classmethod
    def pg_sql(cls, hooks: list) -> str:  # pragma: no cover - overridden
        """PostgreSQL statements (each ending in ``; ``) doing the work of ``hooks``."""
        raise NotImplementedError

    @classmethod
    def run_sa(cls, conn: Connection, hooks: list) -> None:  # pragma: no cover - overridden
        """Do the work of ``hooks`` on an SQLAlchemy connection (SQLite)."""
        raise NotImplementedError

    def __call__(self, conn, _outcome) -> None:
        type(self).run_sa(conn, [self])


class InsertRows(BatchedHook):
    """An entry hook that inserts ``rows`` (dicts of every column's value) into ``table`` (an
    SQLAlchemy Table) in the entry's transaction. The InsertRows of one batch are merged per
    table into ONE multi-row INSERT: on PostgreSQL ``INSERT … SELECT * FROM
    json_populate_recordset(…)`` in the batch's write message, on SQLite one executemany. A
    failing insert (a unique violation) rolls back the whole batch, as any hook raising does.

    Column values: str, int (within 64 bits: beyond, ``TypeError`` at once), bool, None,
    ``datetime.date`` / ``datetime`` (ISO text), finite floats. They are encoded here (orjson),
    in the caller's thread."""

    __slots__ = ("table", "rows", "doc")

    def __init__(self, table, rows: list[dict]) -> None:
        self.table = table
        self.rows = rows
        # Encoded here, in the caller's thread, not in the committer's (which is serial):
        # the elements of a JSON array, without the brackets.
        self.doc = orjson.dumps(rows, default=_json_value,
                                option=orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_NON_STR_KEYS).decode()[1:-1]

    @property
    def merge_key(self):
        return self.table.name

    @classmethod
    def pg_sql(cls, hooks: list) -> str:
        docs = [h.doc for h in hooks if h.doc]
        if not docs:
            return ""
        name = hooks[0].table.name
        return (f'INSERT INTO "{name}" SELECT * FROM json_populate_recordset(NULL::"{name}", '
                f'{text_literal("[" + ",".join(docs) + "]")}); ')

    @classmethod
    def run_sa(cls, conn: Connection, hooks: list) -> None:
        rows = [row for h in hooks for row in h.rows]
        if rows:
            conn.execute(insert(hooks[0].table), rows)


def _leaves(hook) -> tuple:
    """An entry's hook as a tuple of hooks (an entry may carry a tuple of them)."""
    if hook is None:
        return ()
    return tuple(hook) if isinstance(hook, (tuple, list)) else (hook,)


def _needs_sa(hooks) -> bool:
    """True when a hook that is not a :class:`BatchedHook` needs an SQLAlchemy connection."""
    return hooks is not None and any(not isinstance(leaf, BatchedHook) for h in hooks for leaf in _leaves(h))


def _json_value(value):
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not a column value InsertRows can send")


def _new(r) -> bool:
    return type(r) is tuple and r[0] == "new"


def _merged(leaves) -> list[list]:
    """:class:`BatchedHook` leaves grouped by (class, merge_key), groups in order of first
    appearance: each group is one piece of work."""
    groups: dict = {}
    for leaf in leaves:
        groups.setdefault((type(leaf), leaf.merge_key), []).append(leaf)
    return list(groups.values())


def _batched_groups(hooks, plan) -> list[list]:
    """The :class:`BatchedHook` leaves of the newly posted entries, merged (:func:`_merged`)."""
    return _merged(leaf for hook, r in zip(hooks, plan.results) if hook is not None and _new(r)
                   for leaf in _leaves(hook) if isinstance(leaf, BatchedHook))


def _merged_sql(groups: list[list], raw, info: dict) -> str:
    """Merged :class:`BatchedHook` work as PostgreSQL statements (empty when there is none).
    Prepares on ``raw`` (once per session, remembered in ``info``) the statements the hooks'
    classes declare in ``pg_prepared``."""
    for group in groups:
        if type(group[0]).pg_prepared:
            ensure_prepared(raw, info, type(group[0]).pg_prepared)
    return "".join(type(group[0]).pg_sql(group) for group in groups)


def _batched_sql(hooks, plan, raw, info: dict) -> str:
    """The merged :class:`BatchedHook` work of a batch, to send in the batch's write message."""
    return _merged_sql(_batched_groups(hooks, plan), raw, info)


def _call_hooks(conn, raw, hooks, plan, outcomes: list[EntryOutcome]) -> None:
    """Run the hooks of the newly posted entries: plain ones in order on ``conn`` (SQLAlchemy),
    then the merged :class:`BatchedHook` work — on ``raw`` (psycopg, PostgreSQL) when given."""
    for hook, r, outcome in zip(hooks, plan.results, outcomes):
        if hook is not None and _new(r):
            for leaf in _leaves(hook):
                if not isinstance(leaf, BatchedHook):
                    leaf(conn, outcome)
    if raw is None:
        for group in _batched_groups(hooks, plan):
            type(group[0]).run_sa(conn, group)
        return
    sql = _batched_sql(hooks, plan, raw, conn.connection.info)
    if sql:
        try:
            pg_execute(raw, sql)
        except Exception as exc:
            refused = hook_refusal(exc)
            if refused is not None:
                raise refused from exc
            raise


def _expanding(name: str):
    from sqlalchemy import bindparam
    return bindparam(name, expanding=True)


def _insert_absent_accounts(conn: Connection, rows: list[dict]) -> set[str]:
    """Insert the account ``rows`` whose names are still free (``ON CONFLICT (name) DO NOTHING``)
    and return the names that a concurrent transaction took first. A plain INSERT would fail
    the whole transaction on such a race (it was retried; and psycopg logged a warning for the
    aborted executemany pipeline each time)."""
    if is_sqlite(conn.engine):
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    created: set[str] = set()
    for chunk in _chunks(rows):
        stmt = (dialect_insert(s.accounts).values(chunk)
                .on_conflict_do_nothing(index_elements=[s.accounts.c.name]).returning(s.accounts.c.name))
        created.update(conn.execute(stmt).scalars())
    return {r["name"] for r in rows} - created


def _chunks(items: list, size: int = SQL_IN_CHUNK_MAX):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _static_account_result(spec: AccountSpec) -> AccountResult | None:
    """The first stateless account rule that fails (``ACCOUNT_CHECK_ORDER``), or None."""
    if not isinstance(spec.kind, AccountKind):
        raise TypeError(f"account {spec.name!r}: kind must be an AccountKind")
    for value in (spec.credit_limit_fen, spec.code, spec.ledger):
        if type(value) is not int:
            raise TypeError(f"account {spec.name!r}: credit_limit_fen, code and ledger must be int")
    if not spec.name:
        return AccountResult.NAME_MUST_NOT_BE_EMPTY
    if len(spec.name) > KEY_LENGTH_MAX:
        return AccountResult.NAME_TOO_LONG
    if not spec.name.isprintable():
        return AccountResult.NAME_MUST_BE_PRINTABLE
    if (spec.flags & AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS
            and spec.flags & AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS) or int(spec.flags) & ~3:
        return AccountResult.FLAGS_ARE_MUTUALLY_EXCLUSIVE
    if spec.credit_limit_fen < 0:
        return AccountResult.CREDIT_LIMIT_MUST_NOT_BE_NEGATIVE
    if spec.credit_limit_fen > AMOUNT_FEN_MAX:
        return AccountResult.CREDIT_LIMIT_TOO_LARGE
    if spec.currency not in CURRENCY_EXPONENTS:
        return AccountResult.UNKNOWN_CURRENCY
    if not 1 <= spec.ledger <= INT32_MAX:
        return AccountResult.LEDGER_OUT_OF_RANGE
    if not 0 <= spec.code <= INT32_MAX:
        return AccountResult.CODE_OUT_OF_RANGE
    return None


def _compare_account(row: AccountSpec, spec: AccountSpec) -> AccountResult:
    if row.kind != spec.kind:
        return AccountResult.EXISTS_WITH_DIFFERENT_KIND
    if row.code != spec.code:
        return AccountResult.EXISTS_WITH_DIFFERENT_CODE
    if row.ledger != spec.ledger:
        return AccountResult.EXISTS_WITH_DIFFERENT_LEDGER
    if row.currency != spec.currency:
        return AccountResult.EXISTS_WITH_DIFFERENT_CURRENCY
    if int(row.flags) != int(spec.flags):
        return AccountResult.EXISTS_WITH_DIFFERENT_FLAGS
    if row.credit_limit_fen != spec.credit_limit_fen:
        return AccountResult.EXISTS_WITH_DIFFERENT_CREDIT_LIMIT
    return AccountResult.EXISTS


def _balance_as_of(conn: Connection, account_id: int, as_of_us: int) -> tuple[int, int, int, int]:
    """(debits_pending, debits_posted, credits_pending, credits_posted) as of an instant."""
    dpo, cpo = conn.execute(text(
        "SELECT coalesce(sum(CASE WHEN debit_account_id = :a THEN amount ELSE 0 END), 0), "
        "coalesce(sum(CASE WHEN credit_account_id = :a THEN amount ELSE 0 END), 0) "
        "FROM ledger_transfers WHERE (debit_account_id = :a OR credit_account_id = :a) "
        "AND ts <= :t AND flags IN (0, 2)"), {"a": account_id, "t": as_of_us}).one()
    dp, cp = conn.execute(text(
        "SELECT coalesce(sum(CASE WHEN p.debit_account_id = :a THEN p.amount ELSE 0 END), 0), "
        "coalesce(sum(CASE WHEN p.credit_account_id = :a THEN p.amount ELSE 0 END), 0) "
        "FROM ledger_pending p JOIN ledger_transfers t ON t.id = p.transfer_id "
        "LEFT JOIN ledger_transfers r ON r.id = p.resolved_by "
        "WHERE (p.debit_account_id = :a OR p.credit_account_id = :a) AND t.ts <= :t "
        "AND (r.id IS NULL OR r.ts > :t) AND (p.expires_ts IS NULL OR p.expires_ts > :t)"),
        {"a": account_id, "t": as_of_us}).one()
    return int(dp), int(dpo), int(cp), int(cpo)


def chain_rows(conn: Connection, after_id: int, upto_id: int | None, limit: int | None) -> list[tuple]:
    """The canonical rows of the transfers with ``after_id < id <= upto_id`` in id order: the
    transfer's columns, its entry's key, kind and content hash, and the SHA-256 of its entry's
    metadata (so editing any of them breaks the seal)."""
    q = ("SELECT t.id, t.key, t.entry_id, e.key, e.kind, e.content_hash, e.metadata, t.debit_account_id, "
         "t.credit_account_id, t.amount, t.flags, t.pending_id, t.timeout_s, t.code, t.ts "
         "FROM ledger_transfers t JOIN ledger_entries e ON e.id = t.entry_id WHERE t.id > :after")
    params: dict = {"after": after_id}
    if upto_id is not None:
        q += " AND t.id <= :upto"
        params["upto"] = upto_id
    q += " ORDER BY t.id"
    if limit is not None:
        q += " LIMIT :n"
        params["n"] = limit
    out = []
    for r in conn.execute(text(q), params):
        row = list(r)
        row[6] = hashlib.sha256(row[6].encode()).hexdigest()
        out.append(tuple(row))
    return out


def seal_hash(prev_hash: str, rows: list[tuple]) -> str:
    """SHA-256 (hex) over ``prev_hash`` and each row's compact JSON followed by a newline."""
    h = hashlib.sha256(prev_hash.encode())
    for row in rows:
        h.update(json.dumps(list(row), separators=(",", ":"), ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()
