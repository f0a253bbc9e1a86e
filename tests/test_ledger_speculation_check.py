"""The speculative write's check (PostgreSQL): a batch decided on an unlocked read is written
only if what its decisions read of the balances still holds (``store_pg.BalanceCheck``).

A balance no decision read (a payable credited, a fund far from its limit) may be moved by
another writer meanwhile: the batch is still written, with additive updates, so two engine
processes settling through one pooled fund do not void each other's batches. A balance a
decision did read (an assertion, a limit that refused, a limit with little slack left) must not
have moved: the batch is then refused and applied again with locks. Results always equal
applying the writers one after the other."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

from ledger.db import StaleReadError, make_engine
from ledger.groupcommit import GroupCommitter
from ledger.machine import prepare
from ledger.model import BalanceAssertion, EntryResult, TransferResult

sys.path.insert(0, str(Path(__file__).parent))
from test_ledger_support import World  # noqa: E402

pytestmark = pytest.mark.pg


@pytest.fixture
def w(pg_url):
    import migrations

    engine = make_engine(pg_url)
    migrations.upgrade(engine)
    world = World(engine)
    world.standard()
    yield world
    engine.dispose()


def speculate(w: World, *entries):
    """Decide ``entries`` on an unlocked read, as the group committer does (no overlay)."""
    spec = w.ledger.speculate([prepare(e) for e in entries], {})
    assert spec is not None
    return spec


def test_a_balance_no_decision_read_may_move_meanwhile(w):
    w.fund("fund", 1_000_000)
    spec = speculate(w, w.entry(w.t("fund", "merchant", 100)), w.entry(w.t("bank", "merchant", 3)))
    # another writer (another engine process) debits the same fund and credits the same payable
    assert w.submit(w.t("fund", "merchant", 50)).ok
    assert w.submit(w.t("bank", "merchant", 7)).ok
    outcomes = w.ledger.commit_speculation(spec)
    assert [o.result for o in outcomes] == [EntryResult.OK, EntryResult.OK]
    assert w.balance("fund").debits_posted == 150
    assert w.balance("merchant").credits_posted == 160
    assert w.ledger.verify() == []


def test_an_asserted_balance_that_moved_refuses_the_write(w):
    entry = w.entry(w.t("bank", "merchant", 10), assertions=(BalanceAssertion(w.n("wallet2"), 0),))
    spec = speculate(w, entry)
    w.fund("wallet2", 5)
    with pytest.raises(StaleReadError):
        w.ledger.commit_speculation(spec)
    assert w.balance("merchant").credits_posted == 0  # nothing of it was written
    out = w.ledger.submit(entry)  # applied again with locks: the assertion now fails
    assert out.result is EntryResult.BALANCE_ASSERTION_FAILED


def test_headroom_moved_within_the_slack_keeps_the_write(w):
    w.fund("wallet", 100)
    spec = speculate(w, w.entry(w.t("wallet", "merchant", 50)))  # 50 of slack left
    assert w.submit(w.t("wallet", "merchant", 30)).ok
    assert [o.ok for o in w.ledger.commit_speculation(spec)] == [True]
    wallet = w.balance("wallet")
    assert (wallet.debits_posted, wallet.credits_posted) == (80, 100)


def test_headroom_moved_past_the_slack_refuses_the_write(w):
    w.fund("wallet", 100)
    entry = w.entry(w.t("wallet", "merchant", 80))  # 20 of slack left
    spec = speculate(w, entry)
    assert w.submit(w.t("wallet", "merchant", 30)).ok
    with pytest.raises(StaleReadError):
        w.ledger.commit_speculation(spec)
    out = w.ledger.submit(entry)
    assert out.transfer_result is TransferResult.EXCEEDS_CREDITS
    wallet = w.balance("wallet")
    assert wallet.credits_posted - wallet.debits_posted == 70  # never below zero


def test_a_limit_refusal_reads_the_balance_exactly(w):
    w.fund("wallet", 100)
    entry = w.entry(w.t("wallet", "merchant", 150))
    spec = speculate(w, entry)
    assert spec.plan.results[0].transfer_result is TransferResult.EXCEEDS_CREDITS
    w.fund("wallet", 100)  # now it would pass: the refusal must not stand
    with pytest.raises(StaleReadError):
        w.ledger.commit_speculation(spec)
    assert w.ledger.submit(entry).ok


def test_a_fund_checked_before_the_wallet_that_refused_may_move_within_its_slack(w):
    """A settlement debits the pooled fund, then a wallet that cannot pay: refused at the wallet.
    The wallet's refusal read it exactly; the fund's check before it only has to pass again.
    Another engine moving that fund meanwhile (by less than the slack) keeps the write, whose
    outcome is the same refusal, at the same transfer."""
    w.fund("fund", 1_000_000)
    w.fund("wallet", 100)
    entry = w.entry(w.t("fund", "merchant", 100), w.t("wallet", "merchant", 150))
    spec = speculate(w, entry, w.entry(w.t("bank", "merchant", 3)))
    assert w.submit(w.t("fund", "merchant", 50)).ok  # another engine settles through the fund
    refused, accepted = w.ledger.commit_speculation(spec)
    assert (refused.result, refused.failed_index, refused.transfer_result) == (
        EntryResult.TRANSFER_FAILED, 1, TransferResult.EXCEEDS_CREDITS)
    assert accepted.ok
    assert w.balance("fund").debits_posted == 50 and w.balance("merchant").credits_posted == 53
    assert w.ledger.verify() == []


def test_a_fund_moved_past_its_slack_before_a_refusal_refuses_the_write(w):
    """As above, but the other engine took so much of the fund that, applied after it, the
    entry fails on the fund first: the write is refused, and applied again with locks it
    reports the fund, as applying the two one after the other does."""
    w.fund("fund", 1_000)
    w.fund("wallet", 100)
    entry = w.entry(w.t("fund", "merchant", 900), w.t("wallet", "merchant", 150))
    spec = speculate(w, entry)
    assert spec.plan.results[0].failed_index == 1
    assert w.submit(w.t("fund", "merchant", 200)).ok
    with pytest.raises(StaleReadError):
        w.ledger.commit_speculation(spec)
    again = w.ledger.submit(entry)
    assert (again.failed_index, again.transfer_result) == (0, TransferResult.EXCEEDS_CREDITS)
    assert w.balance("fund").debits_posted == 200


def test_a_refusal_after_resolving_a_hold_is_decided_with_locks(w):
    """An entry posts a hold on the fund, then is refused at the wallet. Whether that hold is
    still pending when the batch is written, no balance comparison can tell (a batch in flight
    that posts it is already in the overlay's balances; a hold voided and another opened for
    the same amount leave them as they were): the batch is not speculated but decided with
    locks, which answer as the serial order does."""
    from ledger.model import TransferFlags

    w.fund("fund", 1_000)
    w.fund("wallet", 100)
    hold = w.t("fund", "merchant", 300, flags=TransferFlags.PENDING, timeout_s=3600)
    assert w.submit(hold).ok
    entry = w.entry(w.t("", "", 0, flags=TransferFlags.POST_PENDING, pending_key=hold.key),
                    w.t("fund", "merchant", 10), w.t("wallet", "merchant", 150))
    # batch N, in flight, posts the hold; batch N+1 is decided on N's planned balances
    overlay: dict = {}
    first = w.ledger.speculate([prepare(w.entry(w.t("", "", 0, flags=TransferFlags.POST_PENDING,
                                                    pending_key=hold.key)))], overlay)
    overlay.update(first.planned_balances())
    assert w.ledger.speculate([prepare(entry)], overlay) is None
    assert [o.ok for o in w.ledger.commit_speculation(first)] == [True]
    again = w.ledger.submit(entry)
    assert (again.failed_index, again.transfer_result) == (0, TransferResult.PENDING_TRANSFER_ALREADY_POSTED)


def test_a_key_taken_meanwhile_under_a_refusal_refuses_the_write(w):
    """An entry refused at the wallet found its key free; another engine stores an entry under
    that key meanwhile (without touching these accounts): applied after it, the entry is a
    conflict, not a refusal, so the write is refused and decided again with locks."""
    w.fund("wallet", 100)
    entry = w.entry(w.t("wallet", "merchant", 150), key=w.key("e"))
    spec = speculate(w, entry)
    assert spec.plan.results[0].transfer_result is TransferResult.EXCEEDS_CREDITS
    assert w.ledger.submit(w.entry(w.t("bank", "wallet2", 5), key=entry.key)).ok
    with pytest.raises(StaleReadError):
        w.ledger.commit_speculation(spec)
    assert w.ledger.submit(entry).result is EntryResult.EXISTS_WITH_DIFFERENT_CONTENT


def test_a_refusal_the_write_cannot_check_is_decided_with_locks(w):
    """A refusal read from something the write does not compare (a hold not found, which
    another engine may create meanwhile): the batch is not speculated but applied with locks."""
    from ledger.model import TransferFlags

    entry = w.entry(w.t("", "", 0, flags=TransferFlags.VOID_PENDING, pending_key="no-such-hold"))
    assert w.ledger.speculate([prepare(entry)], {}) is None
    with GroupCommitter(w.ledger, committers=2) as gc:
        out = gc.submit(entry)
        assert out.transfer_result is TransferResult.PENDING_TRANSFER_NOT_FOUND
        assert gc.fallbacks == 0 and gc.speculated == 0


def test_a_key_taken_by_a_writer_the_check_waited_for_refuses_the_write(w):
    """The keys a refused entry found free are checked after the account locks are granted, so
    a key stored by the very transaction the lock waited for is seen (READ COMMITTED: a
    statement of its own, a snapshot taken after the wait)."""
    w.fund("wallet", 100)
    key = w.key("e")
    refused = w.entry(w.t("wallet", "merchant", 150), key=key)
    credit = w.entry(w.t("bank", "wallet2", 100))
    spec = speculate(w, refused, credit)
    assert spec.plan.absent_entry_keys == [key]
    inside, release = threading.Event(), threading.Event()

    def hold_open(_conn, _outcome):
        inside.set()
        release.wait(10)

    other: list = []  # stores the key, and asserts wallet2 is 0: it must come before our batch
    writer = threading.Thread(target=lambda: other.append(w.ledger.submit(
        w.entry(w.t("bank", "merchant", 5), key=key, assertions=(BalanceAssertion(w.n("wallet2"), 0),)), hold_open)))
    writer.start()
    assert inside.wait(10)
    errors: list = []
    committer = threading.Thread(target=lambda: _commit_into(w, spec, errors))
    committer.start()
    _wait_for_a_lock_wait(w)
    release.set()
    writer.join(10)
    committer.join(10)
    assert other[0].ok
    assert len(errors) == 1 and isinstance(errors[0], StaleReadError)
    outcomes = w.ledger.submit_many([refused, credit])
    assert outcomes[0].result is EntryResult.EXISTS_WITH_DIFFERENT_CONTENT and outcomes[1].ok


def _commit_into(w, spec, errors: list) -> None:
    try:
        w.ledger.commit_speculation(spec)
    except Exception as exc:
        errors.append(exc)


def test_a_batch_applied_again_keeps_its_place_before_the_batches_decided_on_it(w):
    """Batch N (a credit to wallet2) fails its check and is applied again with locks; batch
    N+1, decided on N's plan, spends that credit. N keeps the ids and time it was decided with,
    so the spend comes after the credit in the history too: the wallet's statement never goes
    below zero, nor its balance as of the spend."""
    led = w.ledger
    overlay: dict = {}
    n = [prepare(w.entry(w.t("bank", "merchant", 1), assertions=(BalanceAssertion(w.n("fund"), 0),))),
         prepare(w.entry(w.t("bank", "wallet2", 100)))]
    first = led.speculate(n, overlay)
    overlay.update(first.planned_balances())
    second = led.speculate([prepare(w.entry(w.t("wallet2", "merchant", 100)))], overlay)
    w.fund("fund", 5)  # another writer moves what N's assertion read
    with pytest.raises(StaleReadError):
        led.commit_speculation(first)
    asserted, credit = led.submit_prepared(n, placed=first)  # as the group committer does
    assert not asserted.ok and credit.ok
    (spend,) = led.commit_speculation(second)
    assert spend.ok
    assert max(credit.transfer_ids) < min(spend.transfer_ids) and credit.timestamp_us <= spend.timestamp_us
    assert all(line.balance_fen >= 0 for line in led.statement(w.n("wallet2")))
    as_of = led.balance(w.n("wallet2"), as_of_us=spend.timestamp_us)
    assert as_of.credits_posted - as_of.debits_posted == 0
    assert led.verify() == []


@pytest.mark.parametrize("what", ["key", "hold"])
def test_the_locking_path_decides_refusals_on_what_the_writers_it_waited_for_committed(w, what):
    """Not speculation: the locking path (also every refused speculation's). A batch waits for a
    writer that stores the key of, or posts the hold posted by, an entry the batch then refuses
    at the wallet; the serial order reports the key or the hold, and so does the batch: it reads
    holds and keys only once its locks are granted."""
    from ledger.model import TransferFlags

    w.fund("fund", 1_000)
    w.fund("wallet", 100)
    hold = w.t("fund", "merchant", 300, flags=TransferFlags.PENDING, timeout_s=3600)
    assert w.submit(hold).ok
    key = w.key("e")
    assert_empty = (BalanceAssertion(w.n("wallet2"), 0),)  # so the other writer comes first
    if what == "key":
        refused = w.entry(w.t("wallet", "merchant", 150), key=key)
        other = w.entry(w.t("bank", "merchant", 5), key=key, assertions=assert_empty)
    else:
        refused = w.entry(w.t("", "", 0, flags=TransferFlags.POST_PENDING, pending_key=hold.key),
                          w.t("wallet", "merchant", 150))
        other = w.entry(w.t("", "", 0, flags=TransferFlags.POST_PENDING, pending_key=hold.key), assertions=assert_empty)
    credit = w.entry(w.t("bank", "wallet2", 100))
    inside, release = threading.Event(), threading.Event()

    def hold_open(_conn, _outcome):
        inside.set()
        release.wait(10)

    theirs: list = []
    writer = threading.Thread(target=lambda: theirs.append(w.ledger.submit(other, hold_open)))
    writer.start()
    assert inside.wait(10)
    ours: list = []
    batch = threading.Thread(target=lambda: ours.extend(w.ledger.submit_many([refused, credit])))
    batch.start()
    _wait_for_a_lock_wait(w)
    release.set()
    writer.join(10)
    batch.join(10)
    assert theirs[0].ok and ours[1].ok
    if what == "key":
        assert ours[0].result is EntryResult.EXISTS_WITH_DIFFERENT_CONTENT
    else:
        assert (ours[0].failed_index, ours[0].transfer_result) == (0, TransferResult.PENDING_TRANSFER_ALREADY_POSTED)
    assert w.ledger.verify() == []


def _wait_for_a_lock_wait(w) -> None:
    import psycopg

    url = w.ledger.engine.url.render_as_string(hide_password=False).replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(url, autocommit=True) as conn:
        for _ in range(500):
            if conn.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                            "AND datname = current_database()").fetchone()[0]:
                return
            time.sleep(0.01)
    raise AssertionError("nothing ever waited for the other writer's locks")


def test_two_engines_drain_one_limited_account_exactly(pg_url, w):
    """Two group committers on two engines (as two engine processes) race to spend one wallet
    and to pay into one payable: exactly what the wallet holds is spent, never more."""
    other_engine = make_engine(pg_url)
    try:
        from ledger.store import Ledger

        other = Ledger(other_engine, clock_us=w.clock)
        w.fund("wallet", 1_000)
        w.fund("fund", 10**9)
        outs: list = []
        lock = threading.Lock()

        def spend(gc: GroupCommitter, n: int) -> None:
            for _ in range(n):
                o1 = gc.submit(w.entry(w.t("wallet", "merchant", 10)))
                o2 = gc.submit(w.entry(w.t("fund", "merchant", 1)))
                with lock:
                    outs.append((o1, o2))

        with GroupCommitter(w.ledger, committers=2) as g1, GroupCommitter(other, committers=2) as g2:
            threads = [threading.Thread(target=spend, args=(g1 if i % 2 else g2, 15)) for i in range(16)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert g1.speculated + g2.speculated > 0
        assert len(outs) == 16 * 15
        spent = [o1 for o1, _ in outs if o1.ok]
        refused = [o1 for o1, _ in outs if not o1.ok]
        assert len(spent) == 100
        assert all(o.transfer_result is TransferResult.EXCEEDS_CREDITS for o in refused)
        assert all(o2.ok for _, o2 in outs)
        wallet = w.balance("wallet")
        assert (wallet.debits_posted, wallet.credits_posted) == (1_000, 1_000)
        assert w.balance("fund").debits_posted == 16 * 15
        assert w.balance("merchant").credits_posted == 1_000 + 16 * 15
        assert w.ledger.verify() == []
    finally:
        other_engine.dispose()
