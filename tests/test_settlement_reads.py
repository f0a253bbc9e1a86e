"""The settlement's one-round-trip read (``settlement.reads``) and the merged row hook
(``ledger.store.InsertRows``), on SQLite and PostgreSQL.

* ``load_context`` returns exactly what the separate reads return: the idempotency verdict
  (by entry key and by msgid), the person, the balances of the accounts named (expired holds no
  longer count), the card; unknown persons, cards and accounts come back as None / absent.
* On PostgreSQL its prepared statement finds the visit through the unique entry-key index even
  when planned on an empty table with a generic plan (a plan made while the table was small once
  used the msgid index's clinic prefix and read every row of the clinic per settlement).
* ``InsertRows`` hooks of one batch are merged into one INSERT; the rows land exactly when
  their entries post (never on a replay or a refusal); a failing insert rolls back the batch,
  and the group committer isolates the culprit so the other entries still post.
"""

from __future__ import annotations

import datetime as dt
import threading

import pytest
from sqlalchemy import Column, Date, Integer, MetaData, String, Table, func, select

from ledger.model import AccountFlags, AccountKind, AccountSpec, EntrySpec, TransferFlags, TransferSpec
from ledger.store import InsertRows, Ledger
from settlement.reads import load_context, usable_pan
from settlement.schema import settlements
from settlement.service import settlement_key
from tests.test_settlement_flows import CLINIC, OTHER_CLINIC, make_world


@pytest.fixture
def world(db_url, tmp_path):
    with make_world(db_url, tmp_path) as w:
        yield w


def _context(w, visit: dict, ctx=CLINIC, *, names=(), pan=None):
    from settlement.service import SettlementService

    v = SettlementService.parse_visit(w.svc, visit)
    return load_context(w.c.engine, org_code=ctx.org_code, entry_key=settlement_key(ctx.org_code, v), msgid=v.msgid,
                        psn_no=v.psn_no, account_names=list(names), now_us=w.clock(), pan=pan)


def test_context_matches_the_separate_reads(world):
    w = world
    person = w.add_person(personal_fen=12_345, wallet_fen=50_000)
    bill = w.bill(("A", "30.00", "2"))
    visit = w.visit(person, bill)
    from settlement import chart
    names = [chart.personal_account(person.psn_no), chart.wallet_account(person.pan), "no:such:account"]

    before = _context(w, visit, names=names, pan=person.pan)
    assert before.taken is False
    citizen = w.c.cards.citizen(person.psn_no)
    assert (before.citizen.psn_no, before.citizen.insutype, before.citizen.retired) == (
        person.psn_no, citizen.insutype, citizen.retired)
    expected = w.ledger.balances(names[:2])
    assert before.balances == expected
    assert "no:such:account" not in before.balances
    card = w.c.cards.card(person.pan)
    assert (before.card.pan, before.card.psn_no, before.card.pan_seq, before.card.status, before.card.last_atc) == (
        card.pan, card.psn_no, card.pan_seq, card.status, card.last_atc)

    w.svc.settle(CLINIC, visit)
    after = _context(w, visit, names=names)
    assert after.taken is True            # by the visit's entry key
    assert after.card is None              # not asked for
    assert after.balances[names[0]].available == 12_345 - w.svc.query_by_msgid(CLINIC, visit["msgid"])[
        "setlinfo"]["acct_pay"]
    other_visit = dict(visit, mdtrt_id="OTHER0001", chrg_bchno="1")
    assert _context(w, other_visit).taken is True                   # the msgid is used at this clinic
    assert _context(w, other_visit, OTHER_CLINIC).taken is False    # but not at another one
    fresh = dict(other_visit, msgid=visit["msgid"] + "X")
    assert _context(w, fresh).taken is False


def test_context_of_unknown_person_and_card(world):
    w = world
    person = w.add_person()
    visit = dict(w.visit(person, w.bill(("A", "1.00", "1"))), psn_no="330399999999999")
    sc = _context(w, visit, pan="6200000000000000000")
    assert sc.citizen is None and sc.card is None and sc.balances == {} and sc.taken is False


def test_context_ignores_expired_holds(world):
    w = world
    spec = AccountSpec("wallet:hold-test", AccountKind.LIABILITY, flags=AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
    w.ledger.create_accounts([spec, AccountSpec("bank:hold-test", AccountKind.ASSET)])
    w.ledger.submit(EntrySpec("fund-hold", (TransferSpec("fund-hold/0", "bank:hold-test", "wallet:hold-test", 1000),)))
    w.ledger.submit(EntrySpec("hold", (TransferSpec("hold/0", "wallet:hold-test", "bank:hold-test", 300,
                                                    flags=TransferFlags.PENDING, timeout_s=60),)))
    person = w.add_person()
    visit = w.visit(person, w.bill(("A", "1.00", "1")))
    held = _context(w, visit, names=["wallet:hold-test"]).balances["wallet:hold-test"]
    assert (held.debits_pending, held.available) == (300, 700)
    w.clock.tick(61)
    released = _context(w, visit, names=["wallet:hold-test"]).balances["wallet:hold-test"]
    assert released == w.ledger.balances(["wallet:hold-test"])["wallet:hold-test"]
    assert (released.debits_pending, released.available) == (0, 1000)


@pytest.mark.parametrize("pan, ok", [("6212345678901234", True), ("1", True), ("", False), (None, False),
                                     ("62123456789012345678", False), ("62'; --", False), ("٦٢١٢", False),
                                     (6212345678901234, False)])
def test_usable_pan(pan, ok):
    assert usable_pan(pan) == (pan if ok else None)


def test_ids_with_quotes_are_sent_as_literals(world):
    """Ids reach PostgreSQL as SQL literals: a quote in them is data, never syntax."""
    w = world
    person = w.add_person()
    visit = dict(w.visit(person, w.bill(("A", "2.00", "1"))), mdtrt_id="MD'); DROP TABLE settlements; --",
                 chrg_bchno="b'1", msgid="m''x")
    doc = w.svc.settle(CLINIC, visit)
    assert _context(w, visit).taken is True
    assert w.svc.settle(CLINIC, visit)["setl_id"] == doc["setl_id"]
    assert w.svc.settle(CLINIC, visit)["replayed"] is True


@pytest.mark.pg
def test_visit_lookup_plan_uses_the_entry_key_index(pg_url, tmp_path):
    """A generic plan made on an empty table (as the hot connections make it) must look the
    visit up by the unique entry key, not scan a clinic's rows through another index."""
    import psycopg

    from settlement.reads import _STATEMENT, _STATEMENTS

    with make_world(pg_url, tmp_path):
        pass  # migrated
    with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute("SET plan_cache_mode = force_generic_plan")
        conn.execute("SET enable_seqscan = off")
        conn.execute(_STATEMENTS[_STATEMENT])
        plan = "\n".join(r[0] for r in conn.execute(
            f"EXPLAIN EXECUTE {_STATEMENT}('H1', 'setl:H1:M:B', 'm', 'p', '{{a}}', 1, 'x')"))
    first = plan.split("InitPlan 2")[0]
    assert "settlements_entry_key_key" in first, plan
    assert "Filter" not in first, plan


# ------------------------------------------------------------------------------ InsertRows
_meta = MetaData()
_notes = Table("insert_rows_notes", _meta, Column("id", String(40), primary_key=True),
               Column("day", Date, nullable=False), Column("n", Integer, nullable=False),
               Column("text", String(80), nullable=False))


@pytest.fixture
def ledger_with_notes(db_url):
    from ledger.db import make_engine

    import migrations

    engine = make_engine(db_url)
    migrations.upgrade(engine)
    ledger = Ledger(engine)
    _meta.create_all(engine)
    ledger.create_accounts([AccountSpec("bank:a", AccountKind.ASSET),
                            AccountSpec("wallet:a", AccountKind.LIABILITY,
                                        flags=AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)])
    yield ledger
    engine.dispose()


def _note(i: int, text: str = "note") -> dict:
    return {"id": f"N{i}", "day": dt.date(2026, 12, 1), "n": i, "text": text}


def _rows(ledger) -> list[tuple]:
    with ledger.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(select(_notes).order_by(_notes.c.n))]


def test_insert_rows_are_merged_and_follow_their_entries(ledger_with_notes):
    ledger = ledger_with_notes
    entries = [EntrySpec(f"e{i}", (TransferSpec(f"e{i}/0", "bank:a", "wallet:a", 100),)) for i in range(4)]
    refused = EntrySpec("too-much", (TransferSpec("too-much/0", "wallet:a", "bank:a", 10**9),))
    hooks = [InsertRows(_notes, [_note(0, "it's quoted \"twice\" \\ 中文")]), InsertRows(_notes, [_note(1), _note(2)]),
             None, InsertRows(_notes, [_note(3)])]
    outcomes = ledger.submit_many(entries + [refused], hooks + [InsertRows(_notes, [_note(9)])])
    assert [o.ok for o in outcomes] == [True, True, True, True, False]
    rows = _rows(ledger)
    assert [r[2] for r in rows] == [0, 1, 2, 3]     # entry 2 had no hook; the refused entry's row is absent
    assert rows[0][3] == "it's quoted \"twice\" \\ 中文" and rows[0][1] == dt.date(2026, 12, 1)
    # a replay posts nothing and inserts nothing
    again = ledger.submit_many(entries[:1], [InsertRows(_notes, [_note(5)])])
    assert again[0].replayed and [r[2] for r in _rows(ledger)] == [0, 1, 2, 3]


def test_a_failing_insert_rolls_back_its_batch_and_the_committer_isolates_it(ledger_with_notes):
    from ledger.groupcommit import GroupCommitter

    ledger = ledger_with_notes
    ledger.submit(EntrySpec("first", (TransferSpec("first/0", "bank:a", "wallet:a", 1),)),
                  InsertRows(_notes, [_note(1)]))
    with pytest.raises(Exception):  # the same primary key again: the whole batch rolls back
        ledger.submit_many([EntrySpec("dup", (TransferSpec("dup/0", "bank:a", "wallet:a", 1),)),
                            EntrySpec("fine", (TransferSpec("fine/0", "bank:a", "wallet:a", 1),))],
                           [InsertRows(_notes, [_note(1)]), InsertRows(_notes, [_note(2)])])
    assert ledger.entry("dup") is None and ledger.entry("fine") is None
    with GroupCommitter(ledger, wait_ms_max=50, linger_ms=50) as committer:
        results: dict[str, object] = {}
        barrier = threading.Barrier(4)

        def go(key: str, note: dict) -> None:
            barrier.wait()
            try:
                results[key] = committer.submit(EntrySpec(key, (TransferSpec(f"{key}/0", "bank:a", "wallet:a", 1),)),
                                                InsertRows(_notes, [note]))
            except Exception as exc:
                results[key] = exc

        threads = [threading.Thread(target=go, args=(f"g{i}", _note(1) if i == 0 else _note(10 + i)))
                   for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert isinstance(results["g0"], Exception)
    assert all(results[f"g{i}"].ok for i in (1, 2, 3))
    assert ledger.entry("g0") is None
    with ledger.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(_notes)).scalar() == 4
