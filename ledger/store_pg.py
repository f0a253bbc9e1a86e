"""PostgreSQL storage for the ledger state machine: a batch in two round trips.

A batch is exactly two messages to the server, each a server-side prepared statement run
through the simple-query protocol (psycopg costs tens of µs of Python per call, so the hot path
makes as few driver calls as possible and no per-row ones):

1. ``BEGIN; SELECT pg_current_xact_id(); EXECUTE ledger_read_…(…)`` (statements are planned
   once per connection, index access only, see ``_PLANNER``) — ONE statement that locks every account the batch
   touches (the accounts it names, those of the pending transfers it resolves and of the expired
   holds on them) with ``SELECT … ORDER BY id FOR UPDATE`` (ascending id order: two batches
   never deadlock on accounts) and returns, as JSON, the locked balances, the existing entries
   with the batch's keys (idempotency), the transfers with its transfer and pending keys, the
   open holds past their timeout on its accounts, reversal targets, and it draws the ids of the
   rows to insert from the tables' sequences;
2. ``EXECUTE ledger_write_…(…); COMMIT`` — ONE statement of data-modifying CTEs that inserts
   every entry, transfer, pending row and reversal (multi-row, from arrays, ids already known),
   resolves pending transfers and updates each touched account once (``UPDATE … FROM
   unnest(…)``). When hooks must run in the transaction, COMMIT is sent after them instead.

Each statement comes in a lean variant (plain transfers: what nearly every batch is) and a full
one (pending transfers, posts, voids, expiries, reversals): the executor start-up of the full
plan costs about twice the lean one on this kind of hardware.

Statement 1 reads everything but the locked account rows from its snapshot. So that this
snapshot includes what the writers it waits for commit, the locks are taken first, by a
statement of its own in the same message (``ledger_prelock_…``, the same accounts in the same
order): statement 1 then starts after they were granted (READ COMMITTED: one snapshot per
statement), and a refusal decided on its holds, keys or reversals is the serial order's. Every
decision is also re-checked by the database when written: a duplicate entry, transfer key or
reversal hits a unique index (the batch is retried and then replays or reports), and a pending
transfer is resolved only ``WHERE state = 1`` with the count checked inside statement 2 (the
guard aborts the transaction, so the pipelined COMMIT cannot commit, and the batch is retried) —
which still matters for accounts statement 1 locks beyond the first statement's (a hold that
expired in between).

Ids come from the tables' sequences after the transaction took its transaction id;
:func:`seal_watermark` relies on that to seal the hash chain only below ids whose transactions
have all finished, without ever blocking a writer.

The group committer pipelines batches (:meth:`ledger.store.Ledger.speculate`): statement 1 is
then run without ``FOR UPDATE`` (``ledger_peek_…``), and the write message starts with
``ledger_lock_check_…``, which locks every account the batch read — once, ascending id order, one
statement — and aborts unless what the batch's decisions read of their balances still holds
(:class:`BalanceCheck`: exact balances where a decision read them exactly, limit headroom where
a passed check needed it, nothing where no decision looked), then ``ledger_keys_free_…``, a
statement of its own (a snapshot taken after those locks were granted), which aborts if a key
a refused entry found free was taken meanwhile.
"""

from __future__ import annotations

import collections
import contextlib
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence

import orjson
from psycopg import errors as pg_errors, generators, pq
from sqlalchemy import Engine, event

from ledger.db import (HOOK_REFUSED, RETRY_SLEEP_S_MAX, HookRefused, StaleReadError, is_ledger_key_violation,
                       is_retryable)
from ledger.machine import (Account, Hold, Plan, ReversalTarget, Snapshot, StoredEntry, F_NONE, F_PENDING,
                            F_POST, S_PENDING)

VERSION = "v5"  #: bump when a statement changes (connections prepare each name once)
GUARD = "ledger guard failed: "
#: Plan each statement once per connection (generic plan), and plan it index-only: every lookup
#: of the hot path has an index, and a plan chosen while a table was small must not turn into a
#: sequential scan of millions of rows per transaction later.
_PLANNER = ("plan_cache_mode = force_generic_plan", "enable_seqscan = off")
#: A writer takes its transaction id before it draws any row id: :func:`seal_watermark` relies on
#: it (every id drawn belongs to a transaction the sealer can see and wait for).
_BEGIN_BARE = BEGIN_BARE = "BEGIN; SELECT pg_current_xact_id(); "
#: on a connection shared with other code the planner settings last for the transaction only;
#: the hot pool's own connections carry them for the session (see :class:`HotPool`)
_BEGIN = BEGIN_SHARED = "BEGIN; " + "".join(f"SET LOCAL {x}; " for x in _PLANNER) + _BEGIN_BARE[len("BEGIN; "):]
_IDLE = PG_IDLE = pq.TransactionStatus.IDLE
_FATAL = pq.ExecStatus.FATAL_ERROR
_loads = orjson.loads  # bigint columns and sums of them: within 64 bits


def _accounts_ctes(pending_param: str | None) -> str:
    """``base`` (accounts named by $1, given by $2, and of the pending transfers keyed by
    ``pending_param``) and ``ex`` (holds on them past their timeout at $3): the CTEs from which
    statement 1 and the locking path's first statement work out the accounts to lock."""
    pending_base = f"""
    UNION SELECT t.debit_account_id FROM ledger_transfers t WHERE t.key = ANY({pending_param})
    UNION SELECT t.credit_account_id FROM ledger_transfers t WHERE t.key = ANY({pending_param})""" \
        if pending_param else ""
    return f"""base AS (
    SELECT a.id FROM ledger_accounts a WHERE a.name = ANY($1)
    UNION SELECT unnest($2){pending_base}
),
ex AS MATERIALIZED (
    SELECT p.transfer_id, p.debit_account_id, p.credit_account_id, p.amount, p.expires_ts
    FROM ledger_pending p
    WHERE p.state = 1 AND p.expires_ts <= $3
      AND (p.debit_account_id IN (SELECT id FROM base) OR p.credit_account_id IN (SELECT id FROM base))
)"""


def _read_sql(full: bool, lock: bool = True) -> str:
    """Statement 1. Parameters: $1 names, $2 more account ids, $3 now (µs), $4 entry keys,
    $5 transfer keys (and pending keys), $6 entries and $7 transfers to draw ids for; ``full``
    adds $8 pending keys and $9 keys of entries to reverse. Without ``lock`` the accounts are
    only read (the group committer's speculative read, validated by :data:`LOCK_CAS_SQL`)."""
    name = f"ledger_{'read' if lock else 'peek'}_{'full' if full else 'simple'}_{VERSION}"
    lock_clause = "\n    FOR UPDATE OF a" if lock else ""
    types = "text[], bigint[], bigint, text[], text[], int, int" + (", text[], text[]" if full else "")
    reversals = """,
  (SELECT json_agg(json_build_array(e.key, e.id, e.reverses_entry_id IS NOT NULL,
                   EXISTS (SELECT 1 FROM ledger_reversals r WHERE r.entry_id = e.id),
                   t.debit_account_id, t.credit_account_id, t.amount, t.flags))
   FROM ledger_entries e LEFT JOIN ledger_transfers t ON t.entry_id = e.id WHERE e.key = ANY($9))""" if full else ""
    return f"""
PREPARE {name} ({types}) AS
WITH {_accounts_ctes("$8" if full else None)},
locked AS MATERIALIZED (
    SELECT a.id, a.name, a.kind, a.ledger, a.flags, a.credit_limit,
           a.debits_pending, a.debits_posted, a.credits_pending, a.credits_posted
    FROM ledger_accounts a
    WHERE a.id = ANY(ARRAY(SELECT id FROM base UNION SELECT debit_account_id FROM ex
                           UNION SELECT credit_account_id FROM ex))
    ORDER BY a.id{lock_clause}
)
SELECT
  (SELECT json_agg(json_build_array(id, name, kind, ledger, flags, credit_limit, debits_pending,
                                    debits_posted, credits_pending, credits_posted)) FROM locked),
  (SELECT json_agg(json_build_array(e.key, e.id, e.content_hash, e.ts,
                   ARRAY(SELECT t.id FROM ledger_transfers t WHERE t.entry_id = e.id ORDER BY t.id)))
   FROM ledger_entries e WHERE e.key = ANY($4)),
  (SELECT json_agg(json_build_array(t.key, t.id, t.entry_id, t.debit_account_id, t.credit_account_id,
                                    t.amount, t.flags, p.state, p.expires_ts))
   FROM ledger_transfers t LEFT JOIN ledger_pending p ON p.transfer_id = t.id WHERE t.key = ANY($5)),
  (SELECT json_agg(json_build_array(ex.transfer_id, t.key, ex.debit_account_id, ex.credit_account_id,
                                    ex.amount, ex.expires_ts) ORDER BY ex.transfer_id)
   FROM ex JOIN ledger_transfers t ON t.id = ex.transfer_id),
  (SELECT array_agg(nextval('{{entries_seq}}')) FROM generate_series(1, $6 + (SELECT count(*) FROM ex)))::text,
  (SELECT array_agg(nextval('{{transfers_seq}}')) FROM generate_series(1, $7 + (SELECT count(*) FROM ex)))::text
  {reversals}
"""


def _write_sql(full: bool) -> str:
    """Statement 2: the plan's rows with their ids; the guard aborts on a stale read."""
    name = f"ledger_write_{'full' if full else 'simple'}_{VERSION}"
    params = [("ts", "bigint"), ("n_acc", "int"),
              ("e_id", "bigint[]"), ("e_key", "text[]"), ("e_hash", "text[]"), ("e_kind", "text[]"),
              ("e_meta", "text[]"),
              ("t_id", "bigint[]"), ("t_key", "text[]"), ("t_entry", "bigint[]"), ("t_d", "bigint[]"),
              ("t_c", "bigint[]"), ("t_amount", "bigint[]"), ("t_flags", "int[]"), ("t_timeout", "int[]"),
              ("t_code", "int[]"),
              ("a_id", "bigint[]"), ("a_dp", "bigint[]"), ("a_dpo", "bigint[]"), ("a_cp", "bigint[]"),
              ("a_cpo", "bigint[]")]
    if full:
        params += [("n_upd", "int"), ("e_rev", "bigint[]"), ("t_pid", "bigint[]"),
                   ("p_tid", "bigint[]"), ("p_d", "bigint[]"), ("p_c", "bigint[]"), ("p_amount", "bigint[]"),
                   ("p_state", "int[]"), ("p_expires", "bigint[]"), ("p_by", "bigint[]"),
                   ("u_tid", "bigint[]"), ("u_state", "int[]"), ("u_by", "bigint[]"),
                   ("r_entry", "bigint[]"), ("r_by", "bigint[]")]
    P = {n: f"${i + 1}" for i, (n, _) in enumerate(params)}
    rev = "x.rev" if full else "NULL::bigint"
    rev_arg = f", {P['e_rev']}" if full else ""
    rev_col = ", rev" if full else ""
    pid = "x.pid" if full else "NULL::bigint"
    pid_arg = f", {P['t_pid']}" if full else ""
    pid_col = ", pid" if full else ""
    sql = f"""
PREPARE {name} ({", ".join(t for _, t in params)}) AS
WITH
ins_e AS (
    INSERT INTO ledger_entries (id, key, content_hash, kind, reverses_entry_id, metadata, ts)
    SELECT x.id, x.key, x.h, x.kind, {rev}, x.meta, {P["ts"]}
    FROM unnest({P["e_id"]}, {P["e_key"]}, {P["e_hash"]}, {P["e_kind"]}, {P["e_meta"]}{rev_arg})
         AS x(id, key, h, kind, meta{rev_col})
),
ins_t AS (
    INSERT INTO ledger_transfers (id, key, entry_id, debit_account_id, credit_account_id, amount, flags,
                                  pending_id, timeout_s, code, ts)
    SELECT x.id, x.key, x.e, x.d, x.c, x.amount, x.flags, {pid}, x.timeout_s, x.code, {P["ts"]}
    FROM unnest({P["t_id"]}, {P["t_key"]}, {P["t_entry"]}, {P["t_d"]}, {P["t_c"]}, {P["t_amount"]},
                {P["t_flags"]}, {P["t_timeout"]}, {P["t_code"]}{pid_arg})
         AS x(id, key, e, d, c, amount, flags, timeout_s, code{pid_col})
),"""
    if full:
        sql += f"""
ins_p AS (
    INSERT INTO ledger_pending (transfer_id, debit_account_id, credit_account_id, amount, state,
                                expires_ts, resolved_by)
    SELECT * FROM unnest({P["p_tid"]}, {P["p_d"]}, {P["p_c"]}, {P["p_amount"]}, {P["p_state"]},
                         {P["p_expires"]}, {P["p_by"]})
),
upd_p AS (
    UPDATE ledger_pending p SET state = x.state, resolved_by = x.by
    FROM unnest({P["u_tid"]}, {P["u_state"]}, {P["u_by"]}) AS x(tid, state, by)
    WHERE p.transfer_id = x.tid AND p.transfer_id = ANY({P["u_tid"]}) AND p.state = 1
    RETURNING 1
),
ins_r AS (
    INSERT INTO ledger_reversals (entry_id, reversal_entry_id)
    SELECT * FROM unnest({P["r_entry"]}, {P["r_by"]})
),"""
    sql += f"""
upd_a AS (
    UPDATE ledger_accounts a
    SET debits_pending = a.debits_pending + x.dp, debits_posted = a.debits_posted + x.dpo,
        credits_pending = a.credits_pending + x.cp, credits_posted = a.credits_posted + x.cpo
    FROM unnest({P["a_id"]}, {P["a_dp"]}, {P["a_dpo"]}, {P["a_cp"]}, {P["a_cpo"]}) AS x(id, dp, dpo, cp, cpo)
    WHERE a.id = x.id AND a.id = ANY({P["a_id"]})
    RETURNING 1
)
SELECT CASE WHEN (SELECT count(*) FROM upd_a) = {P["n_acc"]}"""
    if full:
        sql += f""" AND (SELECT count(*) FROM upd_p) = {P["n_upd"]}"""
    sql += f"""
            THEN 0
            -- the guard: abort the transaction (so the COMMIT sent with this statement cannot
            -- commit) when an account row was missing or a pending transfer no longer open
            ELSE ('{GUARD}' || (SELECT count(*) FROM upd_a){" || '/' || (SELECT count(*) FROM upd_p)" if full else ""})::int
       END
"""
    return sql


def _prelock_sql(full: bool) -> str:
    """Sent before statement 1 on the locking path, in the same message: lock the accounts
    statement 1 will lock (the same set: named, given, the pending transfers' and the expired
    holds' accounts; ascending id order). Under READ COMMITTED statement 1 then takes its
    snapshot after every lock it needs was granted, so what it reads besides the locked rows —
    holds, keys, reversals — includes what the writers it waited for committed, and a refusal
    decided on it is the serial order's. Parameters: $1 names, $2 more account ids, $3 now (µs);
    ``full`` adds $4 pending keys."""
    name = f"ledger_prelock_{'full' if full else 'simple'}_{VERSION}"
    types = "text[], bigint[], bigint" + (", text[]" if full else "")
    return f"""
PREPARE {name} ({types}) AS
WITH {_accounts_ctes("$4" if full else None)},
locked AS MATERIALIZED (
    SELECT a.id FROM ledger_accounts a
    WHERE a.id = ANY(ARRAY(SELECT id FROM base UNION SELECT debit_account_id FROM ex
                           UNION SELECT credit_account_id FROM ex))
    ORDER BY a.id
    FOR UPDATE OF a
)
SELECT count(*) FROM locked
"""


PRELOCK_SIMPLE, PRELOCK_FULL = f"ledger_prelock_simple_{VERSION}", f"ledger_prelock_full_{VERSION}"
LOCK_CAS = f"ledger_lock_check_{VERSION}"
#: The speculative write's first statement: lock every account the batch read (once, ascending
#: id order) and check what its decisions read of them (:class:`BalanceCheck`): the exact
#: balances of some, a floor under the limit-side headroom of others, nothing of the rest.
LOCK_CAS_SQL = f"""
PREPARE {LOCK_CAS} (bigint[], bigint[], bigint[], bigint[], bigint[], bigint[], bigint[]) AS
WITH locked AS MATERIALIZED (
    SELECT a.id, a.debits_pending, a.debits_posted, a.credits_pending, a.credits_posted
    FROM ledger_accounts a WHERE a.id = ANY($1)
    ORDER BY a.id
    FOR UPDATE OF a
),
differ AS (
    SELECT count(*) AS n FROM locked l
    JOIN unnest($1, $2, $3, $4, $5, $6, $7) AS x(id, dp, dpo, cp, cpo, fd, fc) ON x.id = l.id
    WHERE (x.dp IS NOT NULL AND (l.debits_pending, l.debits_posted, l.credits_pending, l.credits_posted)
                                IS DISTINCT FROM (x.dp, x.dpo, x.cp, x.cpo))
       OR l.credits_posted - l.debits_pending - l.debits_posted < x.fd
       OR l.debits_posted - l.credits_pending - l.credits_posted < x.fc
)
SELECT CASE WHEN (SELECT count(*) FROM locked) = cardinality($1) AND (SELECT n FROM differ) = 0 THEN 0
            -- what the batch was decided on moved: abort, the batch is applied again with locks
            ELSE ('{GUARD}balances moved ' || (SELECT n FROM differ))::int END
"""
KEYS_FREE = f"ledger_keys_free_{VERSION}"
#: Sent right after :data:`LOCK_CAS_SQL` (a statement of its own, so under READ COMMITTED it
#: reads after the locks were granted, seeing what the writers it waited for committed): the
#: keys a refused entry found free are still free.
KEYS_FREE_SQL = f"""
PREPARE {KEYS_FREE} (text[], text[]) AS
SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM ledger_entries e WHERE e.key = ANY($1))
             AND NOT EXISTS (SELECT 1 FROM ledger_transfers t WHERE t.key = ANY($2)) THEN 0
            -- (a sub-select, so that the planner cannot fold the failing cast into a constant)
            ELSE ('{GUARD}a key a refused entry found free was taken: '
                  || (SELECT count(*) FROM ledger_entries e WHERE e.key = ANY($1)))::int END
"""

READ_SIMPLE, READ_FULL = f"ledger_read_simple_{VERSION}", f"ledger_read_full_{VERSION}"
PEEK_SIMPLE, PEEK_FULL = f"ledger_peek_simple_{VERSION}", f"ledger_peek_full_{VERSION}"
WRITE_SIMPLE, WRITE_FULL = f"ledger_write_simple_{VERSION}", f"ledger_write_full_{VERSION}"
STATEMENTS = {READ_SIMPLE: _read_sql(False), READ_FULL: _read_sql(True),
              PEEK_SIMPLE: _read_sql(False, lock=False), PEEK_FULL: _read_sql(True, lock=False),
              PRELOCK_SIMPLE: _prelock_sql(False), PRELOCK_FULL: _prelock_sql(True),
              LOCK_CAS: LOCK_CAS_SQL, KEYS_FREE: KEYS_FREE_SQL,
              WRITE_SIMPLE: _write_sql(False), WRITE_FULL: _write_sql(True)}

SEQUENCES_SQL = ("SELECT pg_get_serial_sequence('ledger_entries', 'id'), "
                 "pg_get_serial_sequence('ledger_transfers', 'id'), current_setting('standard_conforming_strings')")


# ------------------------------------------------------------------------------ literals
def text_array(items) -> str:
    """An SQL string literal holding a PostgreSQL text[] literal (None -> NULL), every element
    quoted. One pass over the joined text when nothing needs escaping (keys and names never
    do: they are printable and, in practice, free of quotes and backslashes)."""
    if not items:
        return "'{}'"
    try:
        joined = '","'.join(items)
    except TypeError:  # a None inside
        return _text_array_slow(items)
    if joined.count('"') != 2 * (len(items) - 1) or "\\" in joined or "'" in joined:
        return _text_array_slow(items)  # a quote, backslash or apostrophe inside an element
    return "'{\"" + joined + "\"}'"


def _text_array_slow(items) -> str:
    parts = []
    for s in items:
        if s is None:
            parts.append("NULL")
        else:
            parts.append('"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"')
    return "'{" + ",".join(parts).replace("'", "''") + "}'"


def int_array(items) -> str:
    """An SQL string literal holding an integer array literal (None -> NULL)."""
    return "'{" + ",".join(["NULL" if v is None else str(int(v)) for v in items]) + "}'"


def _ints(items) -> str:  # no None inside; every item an int already
    return "'{" + ",".join(map(str, items)) + "}'"


def _id_list(text_value: bytes | None) -> list[int]:
    if not text_value or text_value == b"{}":
        return []
    return [int(x) for x in text_value[1:-1].split(b",")]


def execute(raw, sql: str) -> list:
    """Send ``sql`` (one or more statements, simple-query protocol) on the psycopg connection
    ``raw`` and return libpq results, raising the psycopg error of the first failure.

    Goes below psycopg's cursors: no per-call cursor and row machinery, and — important — not
    through psycopg's prepared-statement manager, which answers any ROLLBACK it sees with
    ``DEALLOCATE ALL`` and would drop the ledger's prepared statements."""
    pgconn = raw.pgconn
    pgconn.send_query(sql.encode())
    results = raw.wait(generators.execute(pgconn))
    for res in results:
        if res.status == _FATAL:
            raise pg_errors.error_from_result(res, encoding="utf-8")
    return results


def text_literal(value: str) -> str:
    """An SQL string literal for ``value`` (``standard_conforming_strings = on``, which the
    ledger checks on its first connection). Raises ``ValueError`` for a NUL character, which a
    PostgreSQL text value cannot hold."""
    if "\x00" in value:
        raise ValueError("a NUL character cannot be sent as text")
    return "'" + value.replace("'", "''") + "'"


@contextlib.contextmanager
def hot_connection(engine: Engine) -> Iterator[tuple]:
    """``(raw, info, begin)``: a psycopg connection in autocommit mode for statements sent with
    :func:`execute` — from the engine's :class:`HotPool`, or borrowed from the engine's pool when
    every hot connection is busy — its per-session ``info`` dict (to remember which statements
    it has prepared, see :func:`ensure_prepared`), and the text that starts a ledger transaction
    on it (the hot ones carry the planner settings for the session, a borrowed one per
    transaction). A connection left broken or in a transaction is dropped, never reused. A
    borrowed connection's record of prepared statements is forgotten first (SQLAlchemy's use
    of it may have dropped them), so :func:`ensure_prepared` checks them again."""
    pool = HotPool.of(engine)
    held = pool.get()
    if held is not None:
        try:
            yield held.raw, held.info, _BEGIN_BARE
        finally:
            pool.put(held)
        return
    fairy = engine.raw_connection()
    try:
        raw = fairy.driver_connection
        raw.autocommit = True
        # Used by SQLAlchemy since we last had it, the connection may have lost our prepared
        # statements: psycopg answers a ROLLBACK after an error with DEALLOCATE ALL. Check them
        # again (one query, only on this path: every hot connection busy).
        forget_all_prepared(fairy.info)
        try:
            yield raw, fairy.info, _BEGIN
        finally:
            if not raw.closed and raw.pgconn.transaction_status == _IDLE:
                raw.autocommit = False
            else:
                fairy.invalidate()
    finally:
        fairy.close()


def ensure_prepared(raw, info: dict, statements: dict[str, str]) -> None:
    """PREPARE each of ``statements`` (name -> ``PREPARE name (…) AS …`` text) that this session
    lacks; remembered in ``info`` so that a session checks once. Call :func:`forget_prepared`
    when a statement turns out missing (SQLSTATE 26000: a ``DISCARD ALL`` dropped it)."""
    tag = "prepared:" + ",".join(statements)
    if info.get(tag):
        return
    names = ", ".join(text_literal(n) for n in statements)
    res = execute(raw, f"SELECT name FROM pg_prepared_statements WHERE name IN ({names})")[0]
    present = {res.get_value(i, 0).decode() for i in range(res.ntuples)}
    for name, sql in statements.items():
        if name not in present:
            execute(raw, sql)
    info[tag] = True


def hook_refusal(exc: BaseException) -> HookRefused | None:
    """The :class:`HookRefused` that a PostgreSQL error carries (its message holds
    :data:`HOOK_REFUSED`, raised by a batched hook's guard), or None for any other error."""
    text = str(exc)
    if HOOK_REFUSED not in text:
        return None
    return HookRefused(text.split(HOOK_REFUSED, 1)[1].split('"')[0])


def forget_prepared(info: dict, statements: dict[str, str]) -> None:
    """Make the next :func:`ensure_prepared` of ``statements`` on this session check again."""
    info.pop("prepared:" + ",".join(statements), None)


def forget_all_prepared(info: dict) -> None:
    """Forget every statement this session was known to have prepared (the ledger's and those
    of :func:`ensure_prepared`): after a ``DISCARD ALL`` they are gone."""
    info.pop("ledger_prepared", None)
    for key in [k for k in info if isinstance(k, str) and k.startswith("prepared:")]:
        info.pop(key, None)


def run_prepared(engine: Engine, statements: dict[str, str], sql: str, *, idempotent: bool = True) -> list:
    """Send ``sql`` (which EXECUTEs some of ``statements``) on a hot connection in autocommit
    mode and return the libpq results. Retries once when a prepared statement had vanished
    (26000: nothing ran) and, when ``idempotent``, when the connection was lost; other errors
    propagate."""
    for attempt in (1, 2):
        try:
            with hot_connection(engine) as (raw, info, _begin):
                ensure_prepared(raw, info, statements)
                try:
                    return execute(raw, sql)
                except Exception as exc:
                    if getattr(exc, "sqlstate", None) == "26000":
                        forget_prepared(info, statements)
                    raise
        except Exception as exc:
            lost = is_retryable(exc) or isinstance(exc, pg_errors.OperationalError)
            if attempt == 2 or not (getattr(exc, "sqlstate", None) == "26000" or (idempotent and lost)):
                raise
    raise AssertionError("unreachable")  # pragma: no cover


class PgStore:
    """Runs batches on PostgreSQL (see the module docstring)."""

    def __init__(self) -> None:
        self._statements: dict[str, str] | None = None
        self._local = threading.local()

    def _ensure_prepared(self, raw, info: dict) -> None:
        if info.get("ledger_prepared") == VERSION:
            return
        if self._statements is None:
            res = execute(raw, SEQUENCES_SQL)[0]
            entries_seq, transfers_seq, conforming = (res.get_value(0, i).decode() for i in range(3))
            if conforming != "on":
                raise RuntimeError("the ledger needs standard_conforming_strings = on")
            self._statements = {name: sql.replace("{entries_seq}", entries_seq).replace("{transfers_seq}", transfers_seq)
                                for name, sql in STATEMENTS.items()}
        names = ", ".join(f"'{n}'" for n in self._statements)
        res = execute(raw, f"SELECT name FROM pg_prepared_statements WHERE name IN ({names})")[0]
        present = {res.get_value(i, 0).decode() for i in range(res.ntuples)}
        for name, sql in self._statements.items():
            if name not in present:
                execute(raw, sql)
        info["ledger_prepared"] = VERSION

    def run(self, engine: Engine, work: Callable, retries_max: int, *, with_sa: bool,
            retry_on_unique: bool = True):
        """Call ``work(raw, sa_conn, begin)`` on a connection in autocommit mode (the statements
        carry BEGIN / COMMIT themselves; ``begin`` is the text that starts the transaction on
        that connection); retry retryable errors with the same inputs, at most ``retries_max``
        attempts (a unique violation on a ledger table too — a concurrent duplicate key, which
        the retry replays — unless ``retry_on_unique`` is false; one on a hook's table fails at
        once, so that the group committer isolates its entry without backing off). ``with_sa`` gives
        ``work`` an SQLAlchemy Connection on the same database
        session (for hooks); otherwise ``sa_conn`` is None and the connection comes from the
        engine's :class:`HotPool` (or, when all of those are busy, from the engine's pool)."""
        attempt = 0
        while True:
            try:
                if with_sa:
                    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                        raw = conn.connection.driver_connection
                        return self._in_session(raw, conn.connection.info, work, conn, _BEGIN)
                with hot_connection(engine) as (raw, info, begin):
                    return self._in_session(raw, info, work, None, begin)
            except Exception as exc:
                attempt += 1
                if isinstance(exc, _Missing) and attempt < retries_max:
                    continue
                retryable = is_retryable(exc) or (retry_on_unique and is_ledger_key_violation(exc))
                if attempt >= retries_max or not retryable:
                    raise
                time.sleep(min(0.002 * (2 ** attempt), RETRY_SLEEP_S_MAX))

    def session_info(self) -> dict:
        """The per-session ``info`` dict of the connection the calling thread's ``work`` runs on
        (inside :meth:`run`), e.g. for :func:`ensure_prepared`."""
        return self._local.info

    def _in_session(self, raw, info: dict, work: Callable, sa_conn, begin: str):
        self._ensure_prepared(raw, info)
        self._local.info = info
        try:
            return work(raw, sa_conn, begin)
        except Exception as exc:
            if not raw.closed and raw.pgconn.transaction_status != _IDLE:
                try:
                    execute(raw, "ROLLBACK")
                except Exception:
                    pass
            sqlstate = getattr(exc, "sqlstate", None)
            if sqlstate == "26000":  # prepared statement vanished (DISCARD ALL): prepare again
                forget_all_prepared(info)
                raise _Missing() from exc
            if GUARD in str(exc):
                raise StaleReadError(str(exc)) from exc
            raise

    # -------------------------------------------------------------- statement 1
    def begin_and_load(self, raw, begin: str, now_us: int, names: Sequence[str], ids: Sequence[int],
                       pending_keys: Sequence[str], entry_keys: Sequence[str], transfer_keys: Sequence[str],
                       reverse_keys: Sequence[str], n_entries: int, n_transfers: int, *,
                       lock: bool = True) -> Snapshot:
        """``begin`` (the transaction start from :meth:`run`) and statement 1: lock and read
        everything the batch can touch and draw ids for up to ``n_entries`` entries and
        ``n_transfers`` transfers (plus expiries)."""
        full = bool(pending_keys or reverse_keys)
        tkeys = list(transfer_keys)
        if full:
            tkeys += pending_keys
        args = (f"{text_array(names)}, {_ints(ids)}, {now_us}, {text_array(entry_keys)}, {text_array(tkeys)}, "
                f"{n_entries}, {n_transfers}")
        if full:
            args += f", {text_array(pending_keys)}, {text_array(reverse_keys)}"
        statement = (READ_FULL if full else READ_SIMPLE) if lock else (PEEK_FULL if full else PEEK_SIMPLE)
        prelock = ""
        if lock:
            prelock = (f"EXECUTE {PRELOCK_FULL if full else PRELOCK_SIMPLE}({text_array(names)}, {_ints(ids)}, "
                       f"{now_us}{', ' + text_array(pending_keys) if full else ''}); ")
        res = execute(raw, f"{begin}{prelock}EXECUTE {statement}({args})")[-1]
        j_accounts, j_entries, j_transfers, j_expired = (
            None if (v := res.get_value(0, i)) is None else _loads(v) for i in range(4))
        accounts: dict[str, Account] = {}
        by_id: dict[int, Account] = {}
        for r in j_accounts or ():
            a = Account(*r)
            accounts[a.name] = a
            by_id[a.id] = a
        entries = {}
        for key, eid, h, ts, tids in j_entries or ():
            entries[key] = StoredEntry(eid, h, ts, tuple(tids))
        holds: dict[str, Hold] = {}
        transfer_key_entries: dict[str, int] = {}
        if j_transfers:
            pset = set(pending_keys)
            for key, tid, entry_id, d, c, amount, flags, state, expires in j_transfers:
                transfer_key_entries[key] = entry_id
                if key in pset:
                    is_pending = flags == F_PENDING and state is not None
                    if is_pending and (d not in by_id or c not in by_id):  # cannot happen: one snapshot
                        raise StaleReadError(f"pending transfer {key!r} is on accounts that are not locked")
                    holds[key] = Hold(key, tid, d, c, amount, is_pending, state or 0, expires)
        expired = []
        for tid, key, d, c, amount, expires in j_expired or ():
            if d in by_id and c in by_id:
                hold = holds.get(key)
                if hold is None or hold.id != tid:
                    hold = Hold(key, tid, d, c, amount, True, S_PENDING, expires)
                expired.append(hold)
        targets: dict[str, ReversalTarget] = {}
        if full:
            for key, eid, is_rev, is_reversed, d, c, amount, flags in _loads(res.get_value(0, 6) or b"[]"):
                tgt = targets.get(key)
                if tgt is None:
                    tgt = targets[key] = ReversalTarget(eid, is_rev, is_reversed, [])
                if flags is not None and (flags == F_NONE or flags == F_POST):
                    tgt.legs.append((d, c, amount))
        snap = Snapshot(now_us, accounts, by_id, holds, entries, transfer_key_entries, targets, expired)
        snap.entry_ids = _id_list(res.get_value(0, 4))
        snap.transfer_ids = _id_list(res.get_value(0, 5))
        return snap

    def check_and_commit(self, raw, check: "BalanceCheck") -> None:
        """A speculation that writes nothing still checks what it read before it answers."""
        try:
            execute(raw, _check_sql(check) + "COMMIT")
        except Exception as exc:
            if GUARD in str(exc):
                raise StaleReadError(str(exc)) from exc
            raise

    # -------------------------------------------------------------- statement 2
    def persist(self, raw, plan: Plan, snap: Snapshot, *, commit: bool,
                check: "BalanceCheck | None" = None, then_sql: str = "") -> tuple[list[int], list[int]]:
        """Statement 2 (with ``COMMIT`` when ``commit``); returns entry and transfer ids in plan
        order. With ``check`` (what the plan's decisions read, :class:`BalanceCheck`), the accounts
        are first locked and checked in the same message (:data:`LOCK_CAS_SQL`). ``then_sql``
        (statements ending in ``; ``, e.g. the batch's merged row inserts) runs after the write,
        before the COMMIT, in the same message. A failed guard raises :class:`StaleReadError`."""
        es, ts, holds, ups, revs = plan.entries, plan.transfers, plan.new_holds, plan.hold_updates, plan.reversals
        eids, tids = snap.entry_ids, snap.transfer_ids
        assert len(eids) >= len(es) and len(tids) >= len(ts), "ids drawn for fewer rows than planned"
        deltas = plan.deltas
        dv = deltas.values()
        args = [
            str(plan.now_us), str(len(deltas)),
            _ints(eids[:len(es)]), text_array([e[0] for e in es]), text_array([e[1] for e in es]),
            text_array([e[2] for e in es]), text_array([e[5] for e in es]),
            _ints(tids[:len(ts)]), text_array([t[1] for t in ts]), _ints([eids[t[0]] for t in ts]),
            _ints([t[2] for t in ts]), _ints([t[3] for t in ts]), _ints([t[4] for t in ts]),
            _ints([t[5] for t in ts]), _ints([t[8] for t in ts]), _ints([t[9] for t in ts]),
            _ints(deltas.keys()), _ints([d[0] for d in dv]), _ints([d[1] for d in dv]),
            _ints([d[2] for d in dv]), _ints([d[3] for d in dv]),
        ]
        full = bool(holds or ups or revs)
        if full:
            args += [
                str(len(ups)),
                int_array([e[3] if e[4] is None else eids[e[4]] for e in es]),
                int_array([t[6] if t[7] is None else tids[t[7]] for t in ts]),
                _ints([tids[h.transfer_ord] for h in holds]), _ints([h.debit_id for h in holds]),
                _ints([h.credit_id for h in holds]), _ints([h.amount for h in holds]),
                _ints([h.state for h in holds]), int_array([h.expires_ts for h in holds]),
                int_array([None if h.resolved_ord is None else tids[h.resolved_ord] for h in holds]),
                _ints([u[0] for u in ups]), _ints([u[1] for u in ups]), _ints([tids[u[2]] for u in ups]),
                _ints([r[0] if r[1] is None else eids[r[1]] for r in revs]), _ints([eids[r[2]] for r in revs]),
            ]
        cas = _check_sql(check) if check is not None else ""
        try:
            execute(raw, f"{cas}EXECUTE {WRITE_FULL if full else WRITE_SIMPLE}({', '.join(args)}); "
                         f"{then_sql}{'COMMIT' if commit else ''}")
        except Exception as exc:
            if GUARD in str(exc) or _drove_a_balance_negative(exc):
                raise StaleReadError(str(exc)) from exc
            refused = hook_refusal(exc)
            if refused is not None:
                raise refused from exc
            raise
        return eids[:len(es)], tids[:len(ts)]


def _drove_a_balance_negative(exc: BaseException) -> bool:
    """The write broke ``ck_ledger_accounts_balances_nonnegative``. A plan never takes a locked
    balance below zero, so the plan was made on a stale read: a hold it resolves was resolved
    meanwhile by a transaction the write waited for (the speculative read takes no locks; on the
    locking path, statement 1 may still lock an account beyond the first statement's, a hold on
    it having expired in between), and the account update ran before the hold guard could count.
    Retried like any stale read; the retry sees the hold resolved and answers so."""
    return getattr(exc, "sqlstate", None) == "23514" and "ck_ledger_accounts_balances_nonnegative" in str(exc)


class _Held:
    __slots__ = ("raw", "info")

    def __init__(self, raw) -> None:
        self.raw = raw
        self.info: dict = {}

    def close(self) -> None:
        try:
            self.raw.close()
        except Exception:  # pragma: no cover - best effort on a broken connection
            pass


class HotPool:
    """Connections the ledger's hot path keeps in autocommit mode, one small set per Engine.

    They are created through the engine (its connect arguments and events apply), then
    detached from its pool, so a batch skips the pool's checkout and return and the autocommit
    switch each way, and the planner settings are set once per session instead of per
    transaction. At most the engine pool's ``size()`` of them exist; beyond that a batch
    borrows an ordinary pooled connection. A connection that is closed, broken or left in a
    transaction is dropped (the batch that saw it fail is retried on another). Closed when the
    engine is disposed.
    """

    _pools: "weakref.WeakKeyDictionary[Engine, HotPool]" = weakref.WeakKeyDictionary()
    _pools_lock = threading.Lock()

    def __init__(self, engine: Engine) -> None:
        self._engine_ref = weakref.ref(engine)
        self._idle: collections.deque[_Held] = collections.deque()
        self._lock = threading.Lock()
        self._count = 0
        self._size_max = max(1, engine.pool.size()) if hasattr(engine.pool, "size") else 4
        self._generation = 0

    @classmethod
    def of(cls, engine: Engine) -> "HotPool":
        pool = cls._pools.get(engine)
        if pool is None:
            with cls._pools_lock:
                pool = cls._pools.get(engine)
                if pool is None:
                    pool = cls._pools[engine] = HotPool(engine)
                    event.listen(engine, "engine_disposed", lambda _engine: pool.close())
        return pool

    def get(self) -> "_Held | None":
        try:
            return self._idle.pop()
        except IndexError:
            pass
        with self._lock:
            if self._count >= self._size_max:
                return None
            self._count += 1
        try:
            engine = self._engine_ref()
            fairy = engine.raw_connection()
            raw = fairy.driver_connection
            fairy.detach()  # ours now: the engine's pool forgets it
            held = _Held(raw)
            raw.autocommit = True
            execute(raw, "".join(f"SET {x}; " for x in _PLANNER))
            held.info["generation"] = self._generation
            return held
        except BaseException:
            with self._lock:
                self._count -= 1
            raise

    def put(self, held: "_Held") -> None:
        raw = held.raw
        if (not raw.closed and not raw.broken and raw.pgconn.transaction_status == _IDLE
                and held.info.get("generation") == self._generation):
            self._idle.append(held)
            return
        with self._lock:
            self._count -= 1
        held.close()

    def close(self) -> None:
        with self._lock:
            self._generation += 1
            idle, self._idle = list(self._idle), collections.deque()
            self._count -= len(idle)
        for held in idle:
            held.close()


class BalanceCheck:
    """What a speculative batch's decisions read of its accounts' balances, checked under lock
    before it is written (TigerBeetle-style commutative updates: a balance nobody's decision
    read may be moved by anyone meanwhile, the batch's ``x = x + delta`` updates stay right).

    Built from the balances the batch assumed (``expected``: account id -> (dp, dpo, cp, cpo))
    and its plan (:attr:`ledger.machine.Plan.exact`, :attr:`~ledger.machine.Plan.slack`):

    * exact — an account named by a balance assertion, or on which an entry was refused for
      its limit: all four balances must be the ones assumed;
    * floor — a limited account a limit check passed on (in an accepted entry, or in a refused
      one before the account that refused it): its limit-side headroom
      (``credits_posted - debits_pending - debits_posted`` for debits-must-not-exceed-credits,
      the mirror for the other flag) may have moved, but not down by more than the smallest
      slack those checks left, so each acceptance still holds on the balances found;
    * nothing — every other account (a clinic's payable, a memo contra): locked, not compared;
    * and the keys a refused entry found free (its entry key, its transfers' keys) must still be
      free: stored meanwhile by another writer, they would have made that entry a conflict.
      (A refusal decided on anything else — a hold's or a reversal target's state, something
      not found — is not speculated at all: :attr:`ledger.machine.Plan.unverifiable`.)

    So two engine processes settling through one pooled fund no longer refuse each other's
    speculative batches on every commit."""

    __slots__ = ("ids", "exact", "floor_d", "floor_c", "absent_entry_keys", "absent_transfer_keys")

    def __init__(self, expected: dict[int, tuple], exact: set[int], slack: dict[int, list],
                 absent_entry_keys: Sequence[str] = (), absent_transfer_keys: Sequence[str] = ()) -> None:
        self.absent_entry_keys = list(absent_entry_keys)
        self.absent_transfer_keys = list(absent_transfer_keys)
        self.ids = list(expected)
        self.exact = [expected[i] if i in exact else None for i in self.ids]
        self.floor_d: list[int | None] = []
        self.floor_c: list[int | None] = []
        for acc_id in self.ids:
            least = None if acc_id in exact else slack.get(acc_id)
            if least is None:
                self.floor_d.append(None)
                self.floor_c.append(None)
                continue
            dp, dpo, cp, cpo = expected[acc_id]
            self.floor_d.append(None if least[0] is None else cpo - dp - dpo - least[0])
            self.floor_c.append(None if least[1] is None else dpo - cp - cpo - least[1])


def _check_sql(check: BalanceCheck) -> str:
    ex = check.exact
    cols = [int_array([None if b is None else b[k] for b in ex]) for k in range(4)]
    sql = (f"EXECUTE {LOCK_CAS}({_ints(check.ids)}, {', '.join(cols)}, "
           f"{int_array(check.floor_d)}, {int_array(check.floor_c)}); ")
    if check.absent_entry_keys or check.absent_transfer_keys:
        sql += (f"EXECUTE {KEYS_FREE}({text_array(check.absent_entry_keys)}, "
                f"{text_array(check.absent_transfer_keys)}); ")
    return sql


class _Missing(Exception):
    """A prepared statement was missing on the connection; prepare again and retry."""


def seal_watermark(engine: Engine, wait_s_max: float = 30.0) -> int:
    """The highest transfer id below which no transaction can still insert a transfer, found
    without blocking writers: read the id sequence's last value, then a snapshot, and wait until
    every transaction in progress in that snapshot has finished. Each writer takes its
    transaction id before it draws row ids (``BEGIN_BARE``), so any id up to that last value
    belongs to a transaction that has finished by then (committed, or rolled back and never to
    appear). Raises ``TimeoutError`` after ``wait_s_max`` (a transaction left open)."""
    from sqlalchemy import text

    with engine.connect() as conn:
        seq = conn.execute(text("SELECT pg_get_serial_sequence('ledger_transfers', 'id')")).scalar_one()
        last, called = conn.execute(text(f"SELECT last_value, is_called FROM {seq}")).one()
        conn.commit()
        snapshot = conn.execute(text("SELECT pg_current_snapshot()::text")).scalar_one()
        conn.commit()
        deadline = time.monotonic() + wait_s_max
        while conn.execute(text(
                "SELECT count(*) FROM pg_snapshot_xip(CAST(:s AS pg_snapshot)) AS x "
                "WHERE pg_xact_status(x) = 'in progress'"), {"s": snapshot}).scalar_one():
            conn.commit()
            if time.monotonic() > deadline:
                raise TimeoutError("a transaction stayed open: the hash chain is sealed later")
            time.sleep(0.005)
        conn.commit()
    return int(last) if called else 0
