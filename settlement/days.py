"""The engine's business day (账务日期): what every settlement, payment and recharge is booked to.

A business day is opened when the first transaction needs one — the local date (Asia/Shanghai)
of the engine's clock, or the day after the last closed one if that is later — and stays open
until finance closes it (day end, 日切). Closing a day opens the next one on demand, so a
second replay on the same database books to a fresh day instead of mixing with a closed one.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, func, insert, select, update

from ledger.db import run_with_retry
from ledger.errors import Conflict
from settlement.schema import business_days

LOCAL_TZ = ZoneInfo("Asia/Shanghai")


#: How long a process trusts the open day it read before reading it again: another engine
#: process on the same database may close it (day end), and what is booked after that must go
#: to the next day.
OPEN_DAY_RECHECK_S = 1.0


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
        return dt.datetime.fromtimestamp(self.clock_us() / 1_000_000, LOCAL_TZ).date()

    def current(self) -> dt.date:
        """The open business date, opening one if none is open (re-read when the last read is
        older than ``recheck_s``, so a day closed by another process is noticed)."""
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

    def status(self, day: dt.date) -> tuple[str, dict | None]:
        """("open" | "closed" | "unknown", the stored report or None)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(business_days).where(business_days.c.business_date == day)).first()
        if row is None:
            return "unknown", None
        return row.status, (json.loads(row.report) if row.report else None)

    def close(self, day: dt.date, report: dict) -> None:
        """Mark ``day`` closed with its report. Raises Conflict when it is not the open day."""
        def work(conn) -> None:
            done = conn.execute(update(business_days).where(business_days.c.business_date == day,
                                                            business_days.c.status == "open")
                                .values(status="closed", closed_ts=self.clock_us(),
                                        report=json.dumps(report, sort_keys=True))).rowcount
            if done != 1:
                raise Conflict("business_day_not_open", f"business day {day} is not open")
        run_with_retry(self.engine, work)
        self._cached = None

    def forget(self) -> None:
        """Drop the cached open day (after another process closed it)."""
        self._cached = None
