"""The engine's business day (账务日期): what every settlement, payment and recharge is booked to.

A business day is opened when the first transaction needs one — the local date (Asia/Shanghai)
of the engine's clock, or the day after the last closed one if that is later — and stays open
until finance closes it (day end, 日切). Closing a day opens the next one on demand, so a
second replay on the same database books to a fresh day instead of mixing with a closed one.

A day goes ``open`` -> ``closing`` -> ``closed``. Every transaction that books a row to a day
checks, in that same transaction, that the day is still ``open`` (:class:`DayOpen`, a ledger
hook; :func:`guard_open` for a plain write) and on PostgreSQL holds a ``FOR SHARE`` lock on the
day's row until it commits. The close first moves the day to ``closing`` in a transaction of
its own (:meth:`BusinessDays.begin_close`): that UPDATE waits for the bookings holding the lock,
and no booking can take the day after it commits, so the close then reads every row of the day
and no more. While a day is ``closing`` the next one is open for business. A booking refused
because its day is no longer open is refused with :data:`DAY_CLOSED`; the services then forget
the cached day and book again on the open one.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Connection, Engine, func, insert, select, update

from card.service import local_date
from ledger.db import HOOK_REFUSED, HookRefused, run_with_retry
from ledger.errors import Conflict
from ledger.store import BatchedHook
from settlement.schema import business_days

T = TypeVar("T")


#: How long a process trusts the open day it read before reading it again: another engine
#: process on the same database may close it (day end), and what is booked after that must go
#: to the next day.
OPEN_DAY_RECHECK_S = 1.0
#: The reason a :class:`HookRefused` carries when the business day of a booking is no longer
#: open (it is closing or closed): book it again on the open day.
DAY_CLOSED = "business_day_closed"


def is_day_closed(exc: BaseException) -> bool:
    """True for the :class:`HookRefused` of :class:`DayOpen` / :func:`guard_open` (the booking's
    business day is no longer open); False for any other refusal (a card counter used, …)."""
    return isinstance(exc, HookRefused) and str(exc).startswith(DAY_CLOSED)


def guard_open(conn: Connection, days: list[dt.date]) -> None:
    """In the caller's write transaction on ``conn``: check that every date of ``days`` is the
    ``open`` business day and, on PostgreSQL, lock its row ``FOR SHARE`` until the transaction
    ends (so the close's move to ``closing`` waits for it). Raises :class:`HookRefused`
    (:data:`DAY_CLOSED`) otherwise. On SQLite the single writer lock already excludes the close."""
    wanted = sorted(set(days))
    found = set(conn.scalars(select(business_days.c.business_date)
                             .where(business_days.c.business_date.in_(wanted), business_days.c.status == "open")
                             .with_for_update(read=True)))
    missing = [d for d in wanted if d not in found]
    if missing:
        raise HookRefused(f"{DAY_CLOSED} {', '.join(d.isoformat() for d in missing)}")


class DayOpen(BatchedHook):
    """A ledger hook for an entry that books a row to business day ``business_date``: in the
    batch's own transaction it checks that the day is still ``open`` and holds its row
    ``FOR SHARE`` until the batch commits (merged per batch: one statement for every date in
    it). Refuses (:class:`HookRefused`, reason :data:`DAY_CLOSED`) when the day is closing or
    closed; the group committer then applies the batch's entries one by one, so only the
    entries of that day are refused."""

    __slots__ = ("business_date",)

    def __init__(self, business_date: dt.date) -> None:
        self.business_date = business_date

    merge_key = "business_days"
    pg_prepared = {"business_day_open_v1": f"""
PREPARE business_day_open_v1 (date[]) AS
WITH d AS MATERIALIZED (
    SELECT b.business_date FROM business_days b
    WHERE b.business_date = ANY($1) AND b.status = 'open'
    FOR SHARE
)
SELECT CASE WHEN (SELECT count(*) FROM d) = cardinality($1) THEN 0
            ELSE CAST('{HOOK_REFUSED}{DAY_CLOSED} ' || array_to_string(ARRAY(
                SELECT x FROM unnest($1) AS x WHERE x NOT IN (SELECT business_date FROM d)), ',') AS int)
       END
"""}

    @classmethod
    def pg_sql(cls, hooks: list) -> str:
        days = sorted({h.business_date.isoformat() for h in hooks})
        return f"EXECUTE business_day_open_v1('{{{','.join(days)}}}'); "

    @classmethod
    def run_sa(cls, conn, hooks: list) -> None:
        guard_open(conn, [h.business_date for h in hooks])


class BusinessDays:
    """Open/close of business days on one database; ``clock_us`` is the engine clock. The open
    day is read at most once per ``recheck_s`` seconds (monotonic time) per process."""

    def __init__(self, engine: Engine, clock_us: Callable[[], int], *,
                 recheck_s: float = OPEN_DAY_RECHECK_S) -> None:
        self.engine = engine
        self.clock_us = clock_us
        self.recheck_s = recheck_s
        self._cached: dt.date | None = None
        self._read_at = 0.0

    def local_date(self) -> dt.date:
        """Today's local date in Asia/Shanghai by the engine clock."""
        return local_date(self.clock_us())

    def current(self) -> dt.date:
        """The open business date, opening one if none is open (re-read when the last read is
        older than ``recheck_s``, so a day closed by another process is noticed). While a day is
        ``closing`` none is open, so the next one opens: cashiers are not held up by a close."""
        now = time.monotonic()
        if self._cached is not None and now - self._read_at < self.recheck_s:
            return self._cached

        def work(conn) -> dt.date:
            open_day = conn.scalar(select(business_days.c.business_date)
                                   .where(business_days.c.status == "open"))
            if open_day is not None:
                return open_day
            last = conn.scalar(select(func.max(business_days.c.business_date)))
            day = self.local_date()
            if last is not None and last >= day:
                day = last + dt.timedelta(days=1)
            conn.execute(insert(business_days).values(business_date=day, status="open",
                                                      opened_ts=self.clock_us()))
            return day

        self._cached = run_with_retry(self.engine, work)
        self._read_at = now
        return self._cached

    def open_day(self) -> dt.date | None:
        """The open business date as stored now, or None when none is open (opens nothing)."""
        with self.engine.connect() as conn:
            return conn.scalar(select(business_days.c.business_date).where(business_days.c.status == "open"))

    def status(self, day: dt.date) -> tuple[str, dict | None]:
        """("open" | "closing" | "closed" | "unknown", the stored report or None)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(business_days).where(business_days.c.business_date == day)).first()
        if row is None:
            return "unknown", None
        return row.status, (json.loads(row.report) if row.report else None)

    def begin_close(self, day: dt.date | None = None) -> dt.date:
        """Start the close of a day and return its date: a day left ``closing`` by a close that
        did not finish (the oldest: it must be finished before a later day's clearing is worked
        out), else the open day (opened now if none is), or ``day`` when given, moved from
        ``open`` to ``closing`` in a transaction of its own. On PostgreSQL that UPDATE waits for
        the bookings holding the day's row ``FOR SHARE``; once it commits no booking can take
        the day (:class:`DayOpen`), so every row of the day is committed and final. Raises
        Conflict ``business_day_not_open`` when ``day`` is given and is neither open nor
        closing (closed, or never opened): no other day is closed in its place."""
        for _attempt in range(3):
            stuck = self.closing_day()
            if stuck is not None:
                return stuck
            target = self.current() if day is None else day

            def work(conn) -> int:
                return conn.execute(update(business_days).where(business_days.c.business_date == target,
                                                                business_days.c.status == "open")
                                    .values(status="closing")).rowcount

            done = run_with_retry(self.engine, work)
            self.forget()
            if done == 1:
                return target
            if day is not None:
                status, _report = self.status(day)
                if status != "closing":  # closing: another close began it meanwhile; finish it
                    raise Conflict("business_day_not_open", f"business day {day} is {status}, not open")
        raise Conflict("business_day_not_open", "the open business day kept changing; close again")

    def closing_day(self) -> dt.date | None:
        """The oldest day left ``closing`` (a close that began and has not finished), or None."""
        with self.engine.connect() as conn:
            return conn.scalar(select(func.min(business_days.c.business_date))
                               .where(business_days.c.status == "closing"))

    def last_closed(self) -> dt.date | None:
        """The latest closed business date, or None when no day was ever closed."""
        with self.engine.connect() as conn:
            return conn.scalar(select(func.max(business_days.c.business_date))
                               .where(business_days.c.status == "closed"))

    def close(self, day: dt.date, report: dict) -> None:
        """Mark ``day`` closed with its report (after :meth:`begin_close`). Raises Conflict
        ``business_day_not_closing`` when it is not closing (not begun, or closed already)."""
        def work(conn) -> None:
            done = conn.execute(update(business_days).where(business_days.c.business_date == day,
                                                            business_days.c.status == "closing")
                                .values(status="closed", closed_ts=self.clock_us(),
                                        report=json.dumps(report, sort_keys=True))).rowcount
            if done != 1:
                raise Conflict("business_day_not_closing", f"business day {day} is not closing")
        run_with_retry(self.engine, work)
        self._cached = None

    def forget(self) -> None:
        """Drop the cached open day (after another process closed it, or a booking to it was
        refused with :data:`DAY_CLOSED`): the next :meth:`current` reads it again."""
        self._cached = None


#: How many times a booking refused because its day closed meanwhile is booked again.
DAY_ATTEMPTS_MAX = 4


def book_on_open_day(days: BusinessDays, book: Callable[[dt.date], T]) -> T:
    """Call ``book(business_date)`` with the open business day and return what it returns.
    When the booking is refused because that day is no longer open (:func:`is_day_closed`:
    another process began its close meanwhile), forget the cached day and book again on the day
    open now, at most ``DAY_ATTEMPTS_MAX`` times in all; then Conflict ``business_day_closed``
    (retry with the same msgid). Any other error or refusal propagates. ``book`` must write
    nothing when refused (its rows go in the refused transaction)."""
    for _attempt in range(DAY_ATTEMPTS_MAX):
        try:
            return book(days.current())
        except HookRefused as exc:
            if not is_day_closed(exc):
                raise
            days.forget()
    raise Conflict("business_day_closed", "the business day kept closing under this booking; "
                   "retry with the same msgid")
