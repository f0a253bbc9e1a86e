"""Reads (balances as of an instant, statements with running balances, the trial balance,
entries), expiry (at read time, in batches, by the sweeper, visible in history), the hash
chain and ``verify``, and hooks — on SQLite and PostgreSQL."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from sqlalchemy import text

from ledger.model import (LEDGER_MEMO, AccountFlags, AccountKind, EntryResult, TransferFlags, TransferResult)

sys.path.insert(0, str(Path(__file__).parent))
from test_ledger_support import World, module_engine  # noqa: E402,F401  (fixture)

P, POST, VOID = TransferFlags.PENDING, TransferFlags.POST_PENDING, TransferFlags.VOID_PENDING
S = 1_000_000  # µs per second


@pytest.fixture
def w(module_engine):
    world = World(module_engine)
    world.standard()
    return world


def test_balance_as_of_any_instant(w):
    t0 = w.clock.t
    w.fund("wallet", 1000)
    w.clock.advance_s(10)
    hold = w.key("h")
    assert w.submit(w.t("wallet", "merchant", 300, key=hold, flags=P, timeout_s=60)).ok
    w.clock.advance_s(10)
    assert w.submit(w.t("wallet", "merchant", 100)).ok
    w.clock.advance_s(10)
    assert w.submit(w.t("", "", 200, flags=POST, pending_key=hold)).ok
    w.clock.advance_s(10)
    short = w.key("h")
    assert w.submit(w.t("wallet", "merchant", 50, key=short, flags=P, timeout_s=5)).ok  # expires at t0+45 s

    def at(seconds: float):
        b = w.ledger.balance(w.n("wallet"), as_of_us=t0 + int(seconds * S))
        return b.debits_pending, b.debits_posted, b.credits_posted

    assert at(-1) == (0, 0, 0)
    assert at(5) == (0, 0, 1000)
    assert at(15) == (300, 0, 1000)
    assert at(25) == (300, 100, 1000)
    assert at(35) == (0, 300, 1000)
    assert at(44) == (50, 300, 1000)
    assert at(46) == (0, 300, 1000)  # timed out, though nothing has voided it yet
    w.clock.advance_s(60)
    assert w.ledger.expire_pending() == 1
    assert at(44) == (50, 300, 1000) and at(46) == (0, 300, 1000)  # history is unchanged by the sweep
    now = w.balance("wallet")
    assert (now.debits_pending, now.debits_posted, now.available) == (0, 300, 700)


def test_expiry_at_read_time_in_batches_and_by_the_sweeper_shows_in_history(w):
    w.fund("wallet", 1000)
    a, b = w.key("a"), w.key("b")
    assert w.submit(w.t("wallet", "merchant", 400, key=a, flags=P, timeout_s=5)).ok
    assert w.submit(w.t("bank", "wallet2", 100, key=b, flags=P, timeout_s=5)).ok
    assert w.balance("wallet").available == 600
    w.clock.advance_s(6)
    # read time: released at once, before anything is written
    assert w.balance("wallet").available == 1000
    stored = {x.name: x for x in w.ledger.trial_balance().accounts}
    assert stored[w.n("wallet")].debits_pending == 400
    # a batch touching the wallet voids its expired hold (and may now spend the money)
    assert w.submit(w.t("wallet", "merchant", 1000)).ok
    lines = w.ledger.statement(w.n("wallet"))
    expiry = [ln for ln in lines if ln.flags & TransferFlags.EXPIRED]
    assert len(expiry) == 1 and expiry[0].pending_key == a and expiry[0].kind == "expiry"
    assert expiry[0].debit_fen == 400 and expiry[0].balance_fen == 1000  # a void moves no posted money
    # posting it now is refused
    out = w.submit(w.t("", "", 0, flags=POST, pending_key=a))
    assert out.transfer_result is TransferResult.PENDING_TRANSFER_EXPIRED
    # the sweeper voids the other one (the bank hold), exactly once
    assert w.ledger.expire_pending() == 1
    assert w.ledger.expire_pending() == 0
    assert any(ln.flags & TransferFlags.EXPIRED for ln in w.ledger.statement(w.n("bank")))
    assert w.submit(w.t("", "", 0, flags=VOID, pending_key=b)).transfer_result is TransferResult.PENDING_TRANSFER_EXPIRED
    assert w.ledger.verify() == []


def test_statement_pages_with_running_balance(w):
    w.fund("wallet", 10_000)
    hold = w.key("h")
    for i in range(12):
        assert w.submit(w.t("wallet", "merchant", 10 + i)).ok
    assert w.submit(w.t("wallet", "merchant", 500, key=hold, flags=P)).ok
    assert w.submit(w.t("", "", 0, flags=VOID, pending_key=hold)).ok
    for i in range(8):
        assert w.submit(w.t("merchant", "wallet", 5)).ok
    full = w.ledger.statement(w.n("wallet"), limit=1000)
    assert len(full) == 1 + 12 + 2 + 8
    pages, after = [], 0
    while True:
        page = w.ledger.statement(w.n("wallet"), after_id=after, limit=7)
        if not page:
            break
        pages += page
        after = page[-1].transfer_id
    assert pages == full
    assert full[-1].balance_fen == w.balance("wallet").net_posted == 10_000 - sum(10 + i for i in range(12)) + 40
    pending_lines = [ln for ln in full if ln.flags & (P | VOID)]
    assert len(pending_lines) == 2
    for prev, ln in zip(full, full[1:]):
        if ln.flags & (P | VOID):
            assert ln.balance_fen == prev.balance_fen
    assert full[0].counterparty == w.n("bank") and full[0].credit_fen == 10_000
    with pytest.raises(KeyError):
        w.ledger.statement(w.n("nobody"))


def test_trial_balance_per_ledger_and_entry_view(w):
    w.accounts(("ytd_in", AccountKind.MEMO, AccountFlags.NONE, 0, LEDGER_MEMO),
               ("ytd_out", AccountKind.MEMO, AccountFlags.NONE, 0, LEDGER_MEMO))
    key = w.key("settle")
    out = w.submit(w.t("bank", "wallet", 700), w.t("ytd_out", "ytd_in", 5), key=key, kind="settlement",
                   metadata={"setl_id": "S1", "psn_cash_pay": "7.00", "中文": True})
    assert out.ok
    tb = w.ledger.trial_balance()
    assert tb.balanced and tb.debits_fen[LEDGER_MEMO] == tb.credits_fen[LEDGER_MEMO]
    view = w.ledger.entry(key)
    assert view.kind == "settlement" and view.metadata == {"setl_id": "S1", "psn_cash_pay": "7.00", "中文": True}
    assert [t["amount_fen"] for t in view.transfers] == [700, 5]
    assert view.transfers[0]["debit"] == w.n("bank") and view.transfers[0]["id"] == out.transfer_ids[0]
    rev = w.submit(w.t("wallet", "bank", 700), w.t("ytd_in", "ytd_out", 5), reverses=key)
    assert rev.ok
    assert w.ledger.entry(key).reversed_by_key == rev.key
    assert w.ledger.entry(rev.key).reverses_key == key
    assert w.ledger.entry(w.key("none")) is None
    with pytest.raises(KeyError):
        w.ledger.balance(w.n("nobody"))


def test_seal_and_verify_detect_edited_history(w):
    engine = w.ledger.engine
    for i in range(5):
        w.fund("wallet", 100 + i)
    assert w.ledger.seal() >= 5
    assert w.ledger.seal() == 0
    w.fund("wallet", 1)
    assert w.ledger.seal() == 1
    assert w.ledger.verify() == []
    tid = w.submit(w.t("wallet", "merchant", 50)).transfer_ids[0]
    assert w.ledger.seal() == 1
    try:
        with engine.begin() as conn:  # someone edits a sealed transfer
            conn.execute(text("UPDATE ledger_transfers SET amount = amount + 1 WHERE id = :i"), {"i": tid})
        problems = w.ledger.verify()
        assert any("history was edited" in p for p in problems), problems
        assert any(w.n("wallet") in p for p in problems), problems  # and the balance no longer matches
    finally:
        with engine.begin() as conn:
            conn.execute(text("UPDATE ledger_transfers SET amount = amount - 1 WHERE id = :i"), {"i": tid})
    assert w.ledger.verify() == []
    try:
        with engine.begin() as conn:  # someone edits a balance
            conn.execute(text("UPDATE ledger_accounts SET credits_posted = credits_posted + 5 WHERE name = :n"),
                         {"n": w.n("merchant")})
        problems = w.ledger.verify()
        assert any(w.n("merchant") in p for p in problems) and any("trial balance" in p for p in problems)
    finally:
        with engine.begin() as conn:
            conn.execute(text("UPDATE ledger_accounts SET credits_posted = credits_posted - 5 WHERE name = :n"),
                         {"n": w.n("merchant")})
    assert w.ledger.verify() == []


def test_hooks_run_once_in_the_same_transaction(w):
    engine = w.ledger.engine
    table = "hook_log_" + w.ns.replace("-", "_").replace(":", "")
    with engine.begin() as conn:
        conn.execute(text(f"CREATE TABLE {table} (entry_id BIGINT NOT NULL, entry_key TEXT NOT NULL)"))
    calls = []

    def hook(conn, outcome):
        calls.append(outcome.key)
        conn.execute(text(f"INSERT INTO {table} VALUES (:i, :k)"), {"i": outcome.entry_id, "k": outcome.key})

    def rows():
        with engine.connect() as conn:
            return conn.execute(text(f"SELECT entry_key FROM {table}")).scalars().all()

    w.fund("wallet", 100)
    entry = w.entry(w.t("wallet", "merchant", 60))
    assert w.ledger.submit(entry, hook=hook).ok
    assert w.ledger.submit(entry, hook=hook).replayed       # not on a replay
    assert not w.ledger.submit(w.entry(w.t("wallet", "merchant", 60)), hook=hook).ok  # nor on a failure
    assert calls == [entry.key] and rows() == [entry.key]

    def bad_hook(conn, outcome):
        conn.execute(text(f"INSERT INTO {table} VALUES (:i, :k)"), {"i": outcome.entry_id, "k": outcome.key})
        raise RuntimeError("the service could not record it")

    doomed = w.entry(w.t("wallet", "merchant", 10))
    with pytest.raises(RuntimeError):
        w.ledger.submit(doomed, hook=bad_hook)
    assert w.ledger.entry(doomed.key) is None and rows() == [entry.key]  # rolled back together
    assert w.balance("wallet").available == 40
    # mixed batch: hooks only for the entries that posted
    outs = w.ledger.submit_many([w.entry(w.t("wallet", "merchant", 30)), w.entry(w.t("wallet", "merchant", 30))],
                                [hook, hook])
    assert [o.ok for o in outs] == [True, False] and len(rows()) == 2
    assert w.ledger.verify() == []


def test_submit_many_is_sequential_within_a_batch(w):
    w.fund("wallet", 100)
    first = w.entry(w.t("wallet", "merchant", 80))
    outs = w.ledger.submit_many([
        first,
        w.entry(w.t("wallet", "merchant", 30)),          # fails: 20 left
        w.entry(w.t("merchant", "wallet", 10)),          # succeeds
        w.entry(w.t("wallet", "merchant", 30)),          # succeeds: 30 left
        first,                                           # replay within the batch
    ])
    assert [o.result for o in outs] == [EntryResult.OK, EntryResult.TRANSFER_FAILED, EntryResult.OK,
                                        EntryResult.OK, EntryResult.OK]
    assert outs[4].replayed and outs[4].entry_id == outs[0].entry_id
    assert w.balance("wallet").net_posted == 0
    with pytest.raises(ValueError):
        w.ledger.submit_many([first], hooks=[])


@pytest.mark.pg
def test_seal_waits_for_a_writer_that_drew_lower_ids(pg_url):
    """A batch that drew transfer ids and has not committed yet holds back the seal, so its
    rows can never land inside a range that is already sealed."""
    import threading

    import migrations
    from ledger.db import make_engine
    from ledger.machine import prepare

    engine = make_engine(pg_url)
    migrations.upgrade(engine)
    try:
        w = World(engine)
        w.standard()
        early = w.ledger.speculate([prepare(w.entry(w.t("bank", "wallet", 7)))], {})  # ids drawn, open
        assert early is not None
        late = w.submit(w.t("merchant", "wallet2", 8))                               # higher ids, committed
        assert late.transfer_ids[0] > max(early.snap.transfer_ids)
        sealed = []
        sealer = threading.Thread(target=lambda: sealed.append(w.ledger.seal()))
        sealer.start()
        sealer.join(0.5)
        assert sealer.is_alive()  # waiting for the open batch
        outcomes = w.ledger.commit_speculation(early)
        sealer.join(30)
        assert outcomes[0].ok and sealed and sealed[0] >= 2
        assert w.ledger.seal() == 0 and w.ledger.verify() == []
    finally:
        engine.dispose()
