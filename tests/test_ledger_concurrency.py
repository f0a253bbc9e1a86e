"""Concurrency on real PostgreSQL (marker pg) and on SQLite: direct ``Ledger.submit`` from many
threads and the same workloads through the group committer.

* 10 concurrent debits of 200 on a balance of 1000: exactly 5 succeed, never below zero;
* concurrent credits lose nothing;
* 200 opposing transfers between two accounts finish without a deadlock error;
* concurrent duplicates of one entry post once; every caller gets the same entry back.
"""

from __future__ import annotations

import random
import sys
import threading
from pathlib import Path

import pytest

import migrations
from ledger.db import make_engine
from ledger.groupcommit import GroupCommitter
from ledger.model import EntryResult, EntrySpec, TransferResult, TransferSpec

sys.path.insert(0, str(Path(__file__).parent))
from test_ledger_support import World  # noqa: E402

THREADS = 10


@pytest.fixture
def world(db_url):
    engine = make_engine(db_url, pool_size=12)
    migrations.upgrade(engine)
    w = World(engine)
    w.standard()
    yield w
    engine.dispose()


@pytest.fixture(params=["direct", "group_commit"])
def submit(request, world):
    """``submit(entry)`` straight to the ledger, or through a group committer."""
    if request.param == "direct":
        yield world.ledger.submit
        return
    committer = GroupCommitter(world.ledger, batch_entries_max=64, wait_ms_max=2.0)
    yield committer.submit
    committer.close()


def _race(n: int, work) -> list:
    """Run ``work(i)`` in ``n`` threads released together; return results in order."""
    barrier = threading.Barrier(n)
    results: list = [None] * n
    errors: list = []

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


def test_ten_debits_of_200_on_1000_exactly_five_succeed(world, submit):
    world.fund("wallet", 1000)
    lowest = []
    stop = threading.Event()

    def watch() -> None:  # the balance is never seen below zero while the race runs
        while not stop.is_set():
            lowest.append(world.balance("wallet").available)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        outs = _race(THREADS, lambda i: submit(world.entry(world.t("wallet", "merchant", 200))))
    finally:
        stop.set()
        watcher.join()
    assert sum(o.ok for o in outs) == 5
    assert all(o.transfer_result is TransferResult.EXCEEDS_CREDITS for o in outs if not o.ok)
    b = world.balance("wallet")
    assert (b.credits_posted, b.debits_posted, b.available) == (1000, 1000, 0)
    assert min(lowest) >= 0
    assert world.balance("merchant").net_posted == 1000
    assert world.ledger.verify() == []


def test_concurrent_pending_holds_count_against_the_limit(world, submit):
    world.fund("wallet", 1000)
    outs = _race(THREADS, lambda i: submit(world.entry(world.t("wallet", "merchant", 300, flags=1))))
    assert sum(o.ok for o in outs) == 3
    b = world.balance("wallet")
    assert (b.debits_pending, b.available) == (900, 100)
    assert world.ledger.verify() == []


def test_concurrent_credits_lose_nothing(world, submit):
    rng = random.Random(7)
    amounts = [[rng.randrange(1, 10_000) for _ in range(20)] for _ in range(THREADS)]

    def credit(i: int) -> list:
        return [submit(world.entry(world.t("bank", "wallet", a))) for a in amounts[i]]

    outs = _race(THREADS, credit)
    assert all(o.ok for batch in outs for o in batch)
    total = sum(map(sum, amounts))
    assert world.balance("wallet").credits_posted == total
    assert world.balance("bank").debits_posted == total
    assert world.ledger.trial_balance().balanced and world.ledger.verify() == []


def test_two_hundred_opposing_transfers_finish_without_deadlock(world, submit):
    world.fund("wallet", 100_000)
    world.fund("wallet2", 100_000)
    per_thread = 200 // THREADS

    def shuttle(i: int) -> list:
        pair = ("wallet", "wallet2") if i % 2 else ("wallet2", "wallet")
        return [submit(world.entry(world.t(*pair, 10 + i))) for _ in range(per_thread)]

    outs = _race(THREADS, shuttle)
    assert all(o.ok for batch in outs for o in batch)
    moved = sum((10 + i) * per_thread * (1 if i % 2 else -1) for i in range(THREADS))
    assert world.balance("wallet").net_posted == 100_000 - moved
    assert world.balance("wallet2").net_posted == 100_000 + moved
    assert world.ledger.verify() == []


def test_concurrent_duplicates_post_once(world, submit):
    world.fund("wallet", 1000)
    entry = world.entry(world.t("wallet", "merchant", 700), world.t("bank", "merchant", 1))
    outs = _race(THREADS, lambda i: submit(entry))
    assert all(o.ok for o in outs)
    assert sum(not o.replayed for o in outs) == 1
    assert len({(o.entry_id, o.transfer_ids) for o in outs}) == 1
    assert world.balance("merchant").credits_posted == 701
    assert world.balance("wallet").debits_posted == 700
    # a duplicate with other content is a conflict, also under concurrency
    other = EntrySpec(entry.key, (TransferSpec(world.key(), world.n("bank"), world.n("merchant"), 5),))
    outs = _race(4, lambda i: submit(other))
    assert all(o.result is EntryResult.EXISTS_WITH_DIFFERENT_CONTENT for o in outs)
    assert world.ledger.verify() == []


def test_concurrent_post_and_void_of_one_hold_resolve_it_once(world, submit):
    """Posts and voids of one hold raced: one resolves it, the others are told it already was
    (never an error: a waiter's plan made on the hold's older state is a stale read, retried).
    Several rounds, since one round often serialises by chance."""
    world.fund("wallet", 10_000)
    for _round in range(8):
        hold = world.key("hold")
        assert world.submit(world.t("wallet", "merchant", 400, key=hold, flags=1)).ok

        def resolve(i: int):
            flags = 2 if i % 2 else 4  # post or void
            return submit(world.entry(world.t("", "", 0, flags=flags, pending_key=hold)))

        outs = _race(THREADS, resolve)
        assert sum(o.ok for o in outs) == 1
        assert {o.transfer_result for o in outs if not o.ok} <= {TransferResult.PENDING_TRANSFER_ALREADY_POSTED,
                                                                 TransferResult.PENDING_TRANSFER_ALREADY_VOIDED}
        assert world.balance("wallet").debits_pending == 0
    assert world.ledger.verify() == []


def test_concurrent_account_creation_creates_each_once(world, caplog):
    """Threads creating the same new accounts at once: each name is created by exactly one of
    them (OK), the others are told it exists (EXISTS), or that it exists with other attributes;
    nothing is retried as an error and no driver warning is logged (a plain INSERT used to abort
    the transaction on such a race, and psycopg warned about the aborted pipeline)."""
    from ledger.model import AccountKind, AccountResult, AccountSpec

    caplog.set_level("WARNING")
    names: list[str] = []

    def create(i: int):
        kind = AccountKind.ASSET if i == THREADS - 1 else AccountKind.LIABILITY  # the last one differs
        return world.ledger.create_accounts([AccountSpec(n, kind) for n in names])

    for _round in range(3):  # several rounds: one round often serialises by chance
        names = [world.n(f"race{_round}-{i}") for i in range(20)]
        outs = _race(THREADS, create)
        for j in range(len(names)):
            *alike, odd = [out[j] for out in outs]
            assert sum(r is AccountResult.OK for r in [*alike, odd]) == 1, (alike, odd)
            if odd is AccountResult.OK:  # the odd one created it: the others differ from it
                assert set(alike) == {AccountResult.EXISTS_WITH_DIFFERENT_KIND}, alike
            else:
                assert odd is AccountResult.EXISTS_WITH_DIFFERENT_KIND
                assert set(alike) <= {AccountResult.OK, AccountResult.EXISTS}, alike
    assert not [r for r in caplog.records if r.name.startswith("psycopg")], caplog.records


@pytest.mark.pg
def test_account_created_meanwhile_is_compared_not_failed(pg_url):
    """Deterministic form of the race on PostgreSQL: another transaction inserts the account
    after ``create_accounts`` looked (uncommitted, then committed while our INSERT waits on it):
    the answer compares with the row it created, and the call does not fail."""
    import psycopg

    from ledger.model import AccountKind, AccountResult, AccountSpec

    engine = make_engine(pg_url, pool_size=4)
    migrations.upgrade(engine)
    w = World(engine)
    plain = pg_url.replace("postgresql+psycopg://", "postgresql://")
    for theirs_kind, expected in ((AccountKind.LIABILITY, AccountResult.EXISTS),
                                  (AccountKind.ASSET, AccountResult.EXISTS_WITH_DIFFERENT_KIND)):
        name = w.n(f"meanwhile-{theirs_kind.value}")
        other = psycopg.connect(plain)
        try:
            other.execute("INSERT INTO ledger_accounts (name, kind, code, ledger, currency, flags, credit_limit, "
                          "debits_pending, debits_posted, credits_pending, credits_posted, created_ts) "
                          "VALUES (%s, %s, 0, 1, 'CNY', 0, 0, 0, 0, 0, 0, 0)", (name, theirs_kind.value))
            out: list = []
            caller = threading.Thread(target=lambda: out.append(
                w.ledger.create_accounts([AccountSpec(name, AccountKind.LIABILITY)])))
            caller.start()
            caller.join(1.0)
            assert caller.is_alive()  # its INSERT waits on the other transaction's row
            other.commit()
            caller.join(30)
        finally:
            other.close()
        assert out == [[expected]]
    engine.dispose()
