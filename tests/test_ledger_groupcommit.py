"""The group committer: one transaction for many callers, one bad entry fails alone, errors
reach only their caller, close() drains the queue, asyncio use, background maintenance."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest

from ledger.groupcommit import CommitterClosedError, GroupCommitter
from ledger.model import EntryResult, TransferFlags, TransferResult

sys.path.insert(0, str(Path(__file__).parent))
from test_ledger_support import World, module_engine  # noqa: E402,F401  (fixture)


@pytest.fixture
def w(module_engine):
    world = World(module_engine)
    world.standard()
    return world


def _together(n: int, work) -> list:
    barrier = threading.Barrier(n)
    out: list = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = work(i)
        except BaseException as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_callers_share_one_transaction_and_a_bad_entry_fails_alone(w):
    w.fund("wallet", 100)
    # a long gathering window so that the six callers land in one batch
    with GroupCommitter(w.ledger, wait_ms_max=2000, linger_ms=500, committers=1) as gc:
        entries = [w.entry(w.t("bank", "merchant", 10)) for _ in range(5)] + [w.entry(w.t("wallet", "merchant", 500))]
        outs = _together(6, lambda i: gc.submit(entries[i]))
        assert gc.batches == 1 and gc.entries == 6
    assert [o.ok for o in outs] == [True] * 5 + [False]
    assert outs[5].transfer_result is TransferResult.EXCEEDS_CREDITS
    assert len({o.timestamp_us for o in outs[:5]}) == 1  # the same transaction
    assert w.balance("merchant").credits_posted == 50


def test_a_hook_error_reaches_only_its_caller(w):
    def bad(conn, outcome):
        raise RuntimeError("boom")

    with GroupCommitter(w.ledger, wait_ms_max=2000, linger_ms=500, committers=1) as gc:
        entries = [w.entry(w.t("bank", "merchant", 1)) for _ in range(4)]
        outs = _together(4, lambda i: gc.submit(entries[i], hook=bad if i == 2 else None))
    assert isinstance(outs[2], RuntimeError)
    assert all(o.ok for i, o in enumerate(outs) if i != 2)
    assert w.ledger.entry(entries[2].key) is None
    assert w.balance("merchant").credits_posted == 3


def test_invalid_entries_are_answered_without_the_database(w):
    with GroupCommitter(w.ledger) as gc:
        assert gc.submit(w.entry(key="")).result is EntryResult.KEY_MUST_NOT_BE_EMPTY
        assert gc.batches == 0


def test_close_drains_the_queue_and_refuses_new_entries(w):
    gc = GroupCommitter(w.ledger, wait_ms_max=50, linger_ms=50)
    outs = _together(8, lambda i: gc.submit(w.entry(w.t("bank", "merchant", 1))))
    gc.close()
    assert all(o.ok for o in outs)
    with pytest.raises(CommitterClosedError):
        gc.submit(w.entry(w.t("bank", "merchant", 1)))
    assert w.balance("merchant").credits_posted == 8


def test_usable_from_asyncio(w):
    async def main():
        with GroupCommitter(w.ledger) as gc:
            direct = await asyncio.gather(*[gc.submit_async(w.entry(w.t("bank", "merchant", 1))) for _ in range(20)])
            via_thread = await anyio.to_thread.run_sync(gc.submit, w.entry(w.t("bank", "merchant", 1)))
            return direct, via_thread

    direct, via_thread = asyncio.run(main())
    assert all(o.ok for o in direct) and via_thread.ok
    assert w.balance("merchant").credits_posted == 21


def test_background_sweeper_and_sealer(w):
    w.fund("wallet", 100)
    hold = w.key("h")
    assert w.submit(w.t("wallet", "merchant", 60, key=hold, flags=TransferFlags.PENDING, timeout_s=1)).ok
    w.clock.advance_s(2)
    with GroupCommitter(w.ledger, expire_interval_s=0.02, seal_interval_s=0.02):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if any(ln.flags & TransferFlags.EXPIRED for ln in w.ledger.statement(w.n("wallet"))):
                break
            time.sleep(0.02)
    assert any(ln.flags & TransferFlags.EXPIRED for ln in w.ledger.statement(w.n("wallet")))
    assert w.ledger.seal() == 0 or w.ledger.verify() == []
    assert w.ledger.verify() == []


@pytest.mark.pg
def test_pipelined_batches_fall_back_when_someone_else_moves_their_balances(pg_url):
    """Batches are planned on top of the ones still being written (PostgreSQL); when another
    writer changes a balance meanwhile, the check under the lock fails and the batch is applied
    again with locks: the results stay exactly right."""
    import migrations
    from ledger.db import make_engine

    engine = make_engine(pg_url)
    migrations.upgrade(engine)
    try:
        w = World(engine)
        w.standard()
        w.fund("wallet", 1_000_000)
        stop = threading.Event()

        def interfere() -> None:  # direct submits on the same accounts, outside the committer
            while not stop.is_set():
                assert w.submit(w.t("bank", "merchant", 1)).ok

        other = threading.Thread(target=interfere)
        with GroupCommitter(w.ledger, committers=2) as gc:
            other.start()
            try:
                outs = _together(32, lambda i: [gc.submit(w.entry(w.t("wallet", "merchant", 10))) for _ in range(15)])
            finally:
                stop.set()
                other.join()
            # every batch went the pipelined way: written as planned, or re-applied with locks
            assert gc.pipelined and gc.speculated + gc.fallbacks == gc.batches > 0
        assert all(o.ok for batch in outs for o in batch)
        assert w.balance("wallet").debits_posted == 32 * 15 * 10
        merchant = w.balance("merchant").credits_posted
        assert merchant == 32 * 15 * 10 + w.balance("bank").debits_posted - 1_000_000
        assert w.ledger.verify() == []
    finally:
        engine.dispose()


def test_hooks_run_once_in_the_batch_transaction(w):
    from sqlalchemy import text

    engine = w.ledger.engine
    table = "gc_hook_" + w.ns.replace("-", "_").replace(":", "")
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {table} (entry_key TEXT NOT NULL)"))

    def hook(conn, outcome):
        conn.execute(text(f"INSERT INTO {table} VALUES (:k)"), {"k": outcome.key})

    w.fund("wallet", 10)
    with GroupCommitter(w.ledger) as gc:
        entries = [w.entry(w.t("bank", "merchant", 1)) for _ in range(24)] + [w.entry(w.t("wallet", "merchant", 99))]
        outs = _together(25, lambda i: gc.submit(entries[i], hook=hook))
        again = gc.submit(entries[0], hook=hook)  # a replay: no second row
        if gc.pipelined:
            assert gc.speculated >= 1  # hooks ride the pipelined path too
    assert [o.ok for o in outs] == [True] * 24 + [False] and again.replayed
    with engine.connect() as conn:
        keys = sorted(conn.execute(text(f"SELECT entry_key FROM {table}")).scalars())
    assert keys == sorted(e.key for e in entries[:24])
    assert w.ledger.verify() == []


def test_a_row_a_hook_cannot_insert_fails_its_entry_at_once_and_alone(w):
    """A hook's row that hits a unique key (a row a concurrent request wrote first) is not
    retried — the same inputs would meet the same row — and, in a batch, fails only its entry:
    the others of the batch commit."""
    from sqlalchemy import Column, MetaData, Table, Text, text

    from ledger.db import is_unique_violation
    from ledger.store import InsertRows

    engine = w.ledger.engine
    table = Table("gc_rows_" + w.ns.replace("-", "_").replace(":", ""), MetaData(), Column("k", Text, primary_key=True))
    table.create(engine)
    with engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {table.name} VALUES ('taken')"))
    sent: list[str] = []

    class Counted(InsertRows):
        __slots__ = ()

        @classmethod
        def pg_sql(cls, hooks):
            sent.extend(r["k"] for h in hooks for r in h.rows)
            return super().pg_sql(hooks)

        @classmethod
        def run_sa(cls, conn, hooks):
            sent.extend(r["k"] for h in hooks for r in h.rows)
            super().run_sa(conn, hooks)

    with pytest.raises(Exception) as caught:
        w.ledger.submit(w.entry(w.t("bank", "merchant", 1)), Counted(table, [{"k": "taken"}]))
    assert is_unique_violation(caught.value)
    assert sent == ["taken"]  # tried once, not retried with backoff

    sent.clear()
    with GroupCommitter(w.ledger, wait_ms_max=2000, linger_ms=500, committers=1) as gc:
        keys = ["a", "b", "taken", "c"]
        outs = _together(4, lambda i: gc.submit(w.entry(w.t("bank", "merchant", 1)), Counted(table, [{"k": keys[i]}])))
    assert sum(isinstance(o, Exception) and is_unique_violation(o) for o in outs) == 1
    assert sum(not isinstance(o, Exception) and o.ok for o in outs) == 3
    assert sent.count("taken") <= 3  # the batch once (maybe twice, speculation then locks), then alone
    with engine.connect() as conn:
        assert sorted(conn.execute(text(f"SELECT k FROM {table.name}")).scalars()) == ["a", "b", "c", "taken"]
    assert w.ledger.verify() == []
