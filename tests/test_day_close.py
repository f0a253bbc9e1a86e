"""The day close and the bookings exclude each other (SQLite and PostgreSQL).

A booking checks, in its own transaction, that its business day is still open; the close moves
the day to ``closing`` (waiting for the bookings in flight) before it reads the day's rows. So
every row of a closed day is in its report and in its clearing, no row lands on a day after its
close read it, and a booking that raced the close is made, transparently, on the next day.
Covered: a booking to a day that another process closed is refused and retried onto the next
day (settlement by card, cash settlement, cancellation, refund, recharge, merchant payment); a
close that stopped half-way (day left ``closing``) is finished by closing again, without a
second clearing; and many threads settling, cancelling, paying and recharging while another
thread closes the day: the report and the clearing equal the day's rows read afterwards, and
no request fails.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select

from ledger.db import HookRefused, write_connection
from settlement import chart
from settlement.days import BusinessDays, guard_open, is_day_closed
from settlement.schema import business_days, payments, recharges, settlements
from settlement.service import TerminalContext
from tests.test_settlement_flows import CHANNEL, CLINIC, make_world

MERCHANT = TerminalContext("TM000001", "M00000000009", "merchant")


@pytest.fixture
def world(db_url, tmp_path):
    with make_world(db_url, tmp_path) as w:
        yield w


def close_elsewhere(world) -> dt.date:
    """Close the open day from "another engine process" (its own BusinessDays); the world's
    own BusinessDays keeps trusting its cached day."""
    other = BusinessDays(world.c.engine, world.clock, recheck_s=0.0)
    day = other.begin_close()
    other.close(day, {"closed_by": "test"})
    return day


def rows_of(engine, day: dt.date) -> dict:
    """Every settlement, payment and recharge row booked to ``day``."""
    with engine.connect() as conn:
        return {"settlements": conn.execute(select(settlements).where(settlements.c.business_date == day)).all(),
                "payments": conn.execute(select(payments).where(payments.c.business_date == day)).all(),
                "recharges": conn.execute(select(recharges).where(recharges.c.business_date == day)).all()}


def owed_by_rows(rows: dict) -> dict[str, int]:
    """What the rows put on each payable / channel receivable (fen): the clearing they owe."""
    out: dict[str, int] = defaultdict(int)
    for r in rows["settlements"]:
        info = json.loads(r.setlinfo)
        sign = 1 if r.kind == "settlement" else -1
        out[chart.clinic_payable(r.fixmedins_code)] += sign * (info["hifp_pay"] + info["hifmi_pay"]
                                                                + r.acct_pay + r.wallet_pay)
    for r in rows["payments"]:
        out[chart.merchant_payable(r.org_code)] += r.amount_fen
    for r in rows["recharges"]:
        out[chart.channel_clearing(r.channel)] += r.amount_fen
    return {k: v for k, v in out.items() if v}


def assert_report_is_the_rows(report: dict, rows: dict, out_dir=None) -> None:
    """The report's totals (and, when written, its 3202 detail file) are exactly the rows."""
    settled = [r for r in rows["settlements"] if r.kind == "settlement"]
    undone = [r for r in rows["settlements"] if r.kind != "settlement"]
    s = report["settlements"]
    assert (s["count"], s["cancellations"]) == (len(settled), len(undone))
    for f in ("medfee_sumamt", "fund_pay_sumamt", "acct_pay", "psn_cash_pay", "wallet_pay"):
        assert s[f] == sum(getattr(r, f) for r in settled) - sum(getattr(r, f) for r in undone), f
    for name in ("payments", "recharges"):
        assert report[name] == {"count": len(rows[name]), "amount_fen": sum(r.amount_fen for r in rows[name])}
    if out_dir is not None:
        with open(out_dir / "settlements_3202.csv", newline="") as f:
            listed = {line["setl_id"] for line in csv.DictReader(f)}
        assert listed == {r.setl_id for r in rows["settlements"]}
    cleared = {c["account"]: c["amount_fen"] for c in report["clearing"]}
    assert cleared == owed_by_rows(rows)
    assert all(c["result"] == "ok" for c in report["clearing"])
    assert {d["kind"] for d in report["discrepancies"]} <= {"batch_not_closed"}, report["discrepancies"]


# ---------------------------------------------------------------------- refused and retried
def test_the_guard_refuses_a_day_that_is_not_open(world):
    day = world.c.days.current()
    with write_connection(world.c.engine) as conn:
        guard_open(conn, [day])  # open: passes
    close_elsewhere(world)
    with pytest.raises(HookRefused) as exc, write_connection(world.c.engine) as conn:
        guard_open(conn, [day])
    assert is_day_closed(exc.value) and day.isoformat() in str(exc.value)
    assert not is_day_closed(HookRefused("card counter already used"))


def test_bookings_to_a_day_closed_meanwhile_go_to_the_next_day(world):
    world.c.days.recheck_s = 3600.0  # this process trusts its cached day: only a refusal tells it
    p = world.add_person(personal_fen=0, wallet_fen=100_000)
    q = world.add_person(personal_fen=0, wallet_fen=100_000)
    first = world.settle(p, world.bill(("C", "45.80", "1")))
    day = close_elsewhere(world)
    nxt = day + dt.timedelta(days=1)
    assert world.c.days.current() == day  # still cached

    by_card = world.settle(q, world.bill(("C", "12.00", "1")), method="card")
    assert by_card["business_date"] == nxt.isoformat() and by_card["payment"]["wallet_pay_fen"] == 1_200
    assert world.c.cards.card(q.pan).last_atc == world.last_visit["payment"]["atc"]  # accepted once
    assert world.c.days.current() == nxt

    for booking in ("settle_cash", "cancel", "recharge", "pay"):
        closed = close_elsewhere(world)  # the day this process has cached
        nxt = closed + dt.timedelta(days=1)
        if booking == "settle_cash":
            doc = world.settle(p, world.bill(("C", "10.00", "1")))
        elif booking == "cancel":
            doc = world.svc.cancel(CLINIC, first["setl_id"], {"msgid": world.msgid(world.next())})
        elif booking == "recharge":
            doc = world.c.wallet.recharge(CHANNEL, {"msgid": f"R{world.next():012d}", "pan": p.pan,
                                                    "amount_fen": 500})
        else:
            doc = world.c.wallet.pay(MERCHANT, {"msgid": f"P{world.next():012d}", "amount_fen": 300,
                                                "payment": world.card_payment(p, 300, MERCHANT)})
        assert doc["business_date"] == nxt.isoformat(), (booking, doc)
        assert not doc["replayed"]
        assert world.c.days.status(closed)[0] == "closed"
    assert world.ledger.trial_balance().balanced


def test_a_refund_racing_the_close_goes_to_the_next_day(world):
    world.c.days.recheck_s = 3600.0
    p = world.add_person(personal_fen=0)
    orig = world.settle(p, world.bill(("C", "10.00", "3")))
    day = close_elsewhere(world)
    doc = world.svc.refund(CLINIC, orig["setl_id"], {"msgid": world.msgid(world.next()),
                                                     "returns": [{"feedetl_sn": "1", "cnt": "1"}]})
    assert doc["business_date"] == (day + dt.timedelta(days=1)).isoformat()
    assert doc["refund"]["psn_cash_pay"] == 1_000
    rows = rows_of(world.c.engine, day + dt.timedelta(days=1))["settlements"]
    assert sorted(r.kind for r in rows) == ["cancellation", "settlement"]


def test_a_replay_after_the_retry_returns_the_first_answer(world):
    world.c.days.recheck_s = 3600.0
    p = world.add_person(personal_fen=0)
    day = close_elsewhere(world)
    v = world.visit(p, world.bill(("C", "10.00", "1")))
    doc = world.svc.settle(CLINIC, v)
    again = world.svc.settle(CLINIC, v)
    assert again["replayed"] and again["setl_id"] == doc["setl_id"]
    assert again["business_date"] == doc["business_date"] == (day + dt.timedelta(days=1)).isoformat()


# ---------------------------------------------------------------------- a close that stopped
def test_a_close_that_stopped_half_way_is_finished_by_closing_again(world, tmp_path, monkeypatch):
    p = world.add_person(personal_fen=20_000, wallet_fen=50_000)
    world.settle(p, world.bill(("A", "30.00", "1"), ("C", "12.00", "1")))
    world.settle(p, world.bill(("C", "8.00", "1")), method="card")
    day = world.c.days.current()
    closer = world.c.closer

    def crash() -> int:
        raise RuntimeError("the close stopped here")

    monkeypatch.setattr(closer.ledger, "seal", crash)  # after the clearing was posted
    with pytest.raises(RuntimeError):
        closer.close_day(tmp_path / "first")
    monkeypatch.undo()
    assert world.c.days.status(day)[0] == "closing"
    # The next day is open for business meanwhile, and its money is not the stuck day's.
    world.c.days.forget()
    late = world.settle(p, world.bill(("C", "7.00", "1")))
    assert late["business_date"] == (day + dt.timedelta(days=1)).isoformat()
    bank_before = world.net(chart.BANK_CENTRE)

    report = closer.close_day(tmp_path / "again")
    assert report["business_date"] == day.isoformat()
    assert world.c.days.status(day)[0] == "closed"
    assert all(c["replayed"] for c in report["clearing"]) and report["clearing"]
    assert world.net(chart.BANK_CENTRE) == bank_before  # nothing cleared twice
    assert_report_is_the_rows(report, rows_of(world.c.engine, day), tmp_path / "again")

    nxt = closer.close_day(tmp_path / "next")
    assert nxt["business_date"] == late["business_date"]
    assert_report_is_the_rows(nxt, rows_of(world.c.engine, day + dt.timedelta(days=1)), tmp_path / "next")
    assert world.net(chart.clinic_payable(CLINIC.org_code)) == 0


# ---------------------------------------------------------------------- bookings racing the close
def race_the_close(world, tmp_path, workers: int, cycles_after: int) -> None:
    """``workers`` threads each settle (cash and card), cancel, recharge and pay for their own
    person, in a loop, while the main thread closes the day once some work is done; each worker
    goes on for ``cycles_after`` cycles after the close returned. Then both days are checked
    against their rows, and the next day is closed and checked too."""
    people = [world.add_person(personal_fen=5_000, wallet_fen=200_000) for _ in range(workers)]
    day = world.c.days.current()
    started = threading.Semaphore(0)
    closed = threading.Event()
    errors: list[BaseException] = []

    def work(p) -> int:
        done = after = 0
        last = None
        try:
            while after < cycles_after:
                step = done % 5
                if step == 0:
                    world.recharge(p, 1_000)
                elif step == 1:
                    last = world.settle(p, world.bill(("A", "20.00", "1"), ("C", "5.00", "1")))
                elif step == 2:
                    world.settle(p, world.bill(("C", "9.00", "1")), method="card")
                elif step == 3:
                    world.c.wallet.pay(MERCHANT, {"msgid": f"{p.psn_no[-8:]}{done:06d}", "amount_fen": 100,
                                                  "payment": world.card_payment(p, 100, MERCHANT)})
                else:
                    world.svc.cancel(CLINIC, last["setl_id"], {"msgid": world.msgid(world.next())})
                done += 1
                if done == 5:
                    started.release()
                if closed.is_set() and step == 4:
                    after += 1
        except BaseException as exc:  # every failure is reported by the test
            errors.append(exc)
            started.release()
        return done

    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(work, p) for p in people]
        for _ in range(workers):
            started.acquire()
        report = world.c.closer.close_day(tmp_path / "day1")
        closed.set()
        for f in futures:
            f.result()
    assert not errors, [repr(e) for e in errors]
    assert report["business_date"] == day.isoformat()
    assert world.c.days.status(day)[0] == "closed"
    rows = rows_of(world.c.engine, day)
    assert rows["settlements"] and rows["payments"]
    assert_report_is_the_rows(report, rows, tmp_path / "day1")
    nxt_day = day + dt.timedelta(days=1)
    assert rows_of(world.c.engine, nxt_day)["settlements"]  # the work went on during and after the close

    world.c.days.forget()
    nxt = world.c.closer.close_day(tmp_path / "day2")
    assert nxt["business_date"] == nxt_day.isoformat()
    assert_report_is_the_rows(nxt, rows_of(world.c.engine, nxt_day), tmp_path / "day2")
    for name in (chart.clinic_payable(CLINIC.org_code), chart.merchant_payable(MERCHANT.org_code),
                 chart.channel_clearing(CHANNEL.org_code)):
        assert world.net(name) == 0, name  # both days cleared to the fen, nothing twice
    assert world.ledger.trial_balance().balanced
    assert world.ledger.verify() == []


@pytest.mark.pg
@pytest.mark.parametrize("group_commit", [False, True], ids=["direct", "group_commit"])
def test_bookings_racing_the_close_on_postgresql(pg_url, tmp_path, group_commit):
    with make_world(pg_url, tmp_path, group_commit=group_commit) as w:
        race_the_close(w, tmp_path, workers=8, cycles_after=3)


def test_bookings_racing_the_close_on_sqlite(sqlite_url, tmp_path):
    with make_world(sqlite_url, tmp_path) as w:
        race_the_close(w, tmp_path, workers=4, cycles_after=2)


# ---------------------------------------------------------------------- opening the next day
def test_engines_that_all_find_no_open_day_open_the_same_one(world):
    """Right after a close moved the day to ``closing``, every engine process finds no open day
    at once; they must all open the SAME next day (one open day at most, revision 0004), not
    one each (a booking on a second open day would fail its card date check, or escape the
    next close)."""
    engines = [BusinessDays(world.c.engine, world.clock, recheck_s=0.0) for _ in range(8)]
    for _round in range(5):
        closing = engines[0].begin_close()
        barrier = threading.Barrier(len(engines))

        def open_next(days: BusinessDays) -> dt.date:
            barrier.wait()
            return days.current()

        with ThreadPoolExecutor(len(engines)) as pool:
            opened = set(pool.map(open_next, engines))
        engines[0].close(closing, {"closed_by": "test"})
        assert opened == {closing + dt.timedelta(days=1)}
        with world.c.engine.connect() as conn:
            states = conn.execute(select(business_days.c.status)).scalars().all()
        assert states.count("open") == 1 and "closing" not in states


def test_a_clinic_owing_the_centre_after_its_cancellations_is_collected_from(world, tmp_path):
    """A day on which a clinic's cancellations of earlier settlements exceed its new ones ends
    with the clinic owing the centre: the clearing collects it (a negative amount, the transfer
    the other way), so the clinic's payable stands at zero after every close."""
    p = world.add_person(personal_fen=0)
    doc = world.settle(p, world.bill(("A", "3000.00", "1")))  # past the deductible: the fund pays
    paid = world.net(chart.clinic_payable(CLINIC.org_code))
    assert paid > 0
    first = world.c.closer.close_day(tmp_path / "first")
    assert {c["account"]: c["amount_fen"] for c in first["clearing"]}[chart.clinic_payable(CLINIC.org_code)] == paid
    world.svc.cancel(CLINIC, doc["setl_id"], {"msgid": world.msgid(world.next())})
    bank_before = world.net(chart.BANK_CENTRE)
    second = world.c.closer.close_day(tmp_path / "second")
    cleared = {c["account"]: c for c in second["clearing"]}[chart.clinic_payable(CLINIC.org_code)]
    assert cleared["amount_fen"] == -paid and cleared["result"] == "ok"
    assert world.net(chart.clinic_payable(CLINIC.org_code)) == 0
    assert world.net(chart.BANK_CENTRE) == bank_before + paid  # the centre's bank account got it back
    assert_report_is_the_rows(second, rows_of(world.c.engine, dt.date.fromisoformat(second["business_date"])),
                              tmp_path / "second")


def test_two_closes_of_one_day_both_answer_with_its_report(world, tmp_path, monkeypatch):
    """A second close (another process) finds the day ``closing`` and finishes it while the first
    is still at work; the first then answers with the report the second stored, and the clearing
    was posted once."""
    from ledger.store import Ledger
    from terminals.close import DayCloser

    p = world.add_person(personal_fen=0)
    world.settle(p, world.bill(("A", "3000.00", "1")))
    first = world.c.closer
    ledger2 = Ledger(world.c.engine, clock_us=world.clock)
    second = DayCloser(world.c.engine, ledger2, ledger2.submit, BusinessDays(world.c.engine, world.clock, recheck_s=0.0),
                       first.accounts, world.clock)
    answers = {}
    seal = first.ledger.seal

    def the_other_close_runs_now():  # after the first close posted its clearing
        monkeypatch.setattr(first.ledger, "seal", seal)
        answers["second"] = second.close_day(tmp_path / "second")
        return seal()

    monkeypatch.setattr(first.ledger, "seal", the_other_close_runs_now)
    bank_before = world.net(chart.BANK_CENTRE)
    answers["first"] = first.close_day(tmp_path / "first")
    day = dt.date.fromisoformat(answers["first"]["business_date"])
    assert answers["second"]["business_date"] == day.isoformat()
    assert answers["first"] == answers["second"]  # the report stored by the close that finished
    assert world.c.days.status(day) == ("closed", answers["second"])
    paid = -(world.net(chart.BANK_CENTRE) - bank_before)
    assert paid == sum(c["amount_fen"] for c in answers["second"]["clearing"]) > 0  # cleared once


# ---------------------------------------------------------------------- finance closing a given day
def test_closing_a_business_day_again_answers_with_its_stored_report_and_opens_nothing(world, tmp_path):
    """``close_business_day`` (behind ``citizencard close-day``): the open day is closed once;
    closing it again, by date or by default when no day is open, answers with the report it
    stored, moving no money and opening no day; a day never opened is refused."""
    from ledger.errors import Invalid

    closer = world.c.closer
    with pytest.raises(Invalid) as exc:
        closer.close_business_day()
    assert exc.value.code == "business_day_none"
    p = world.add_person(personal_fen=0)
    world.settle(p, world.bill(("A", "3000.00", "1")))
    day = world.c.days.current()
    done = closer.close_business_day()
    assert (done["report"]["business_date"], done["replayed"], done["finished_first"]) == (day.isoformat(), False, [])
    closer.write_day_report(done["report"], tmp_path / "written")
    assert_report_is_the_rows(done["report"], rows_of(world.c.engine, day), tmp_path / "written")
    bank = world.net(chart.BANK_CENTRE)
    for again in (closer.close_business_day(day), closer.close_business_day()):
        assert again == {"report": done["report"], "replayed": True, "finished_first": []}
    assert world.net(chart.BANK_CENTRE) == bank
    with world.c.engine.connect() as conn:
        assert conn.execute(select(business_days.c.status)).scalars().all() == ["closed"]  # no day opened
    for never in (day + dt.timedelta(days=1), dt.date(2000, 1, 1)):
        with pytest.raises(Invalid) as exc:
            closer.close_business_day(never)
        assert exc.value.code == "business_day_unknown" and never.isoformat() in exc.value.detail


def test_a_day_given_to_close_is_the_one_closed(world):
    """A close of a given day never closes another one in its place: when that day was closed
    meanwhile, :meth:`BusinessDays.begin_close` refuses instead of opening and closing the next."""
    from ledger.errors import Conflict

    p = world.add_person(personal_fen=0)
    world.settle(p, world.bill(("C", "10.00", "1")))
    day = close_elsewhere(world)
    with pytest.raises(Conflict) as exc:
        world.c.days.begin_close(day)
    assert exc.value.code == "business_day_not_open"
    with world.c.engine.connect() as conn:
        assert conn.execute(select(business_days.c.status)).scalars().all() == ["closed"]
    assert world.c.closer.close_business_day(day)["report"] == {"closed_by": "test"}  # its stored report


def test_a_day_left_closing_is_finished_before_the_day_given(world, tmp_path, monkeypatch):
    p = world.add_person(personal_fen=0)
    world.settle(p, world.bill(("A", "3000.00", "1")))
    stuck = world.c.days.current()

    def crash() -> int:
        raise RuntimeError("the close stopped here")

    monkeypatch.setattr(world.c.closer.ledger, "seal", crash)
    with pytest.raises(RuntimeError):
        world.c.closer.close_day()
    monkeypatch.undo()
    world.c.days.forget()
    world.settle(p, world.bill(("A", "2000.00", "1")))
    nxt = world.c.days.current()
    assert nxt == stuck + dt.timedelta(days=1)
    done = world.c.closer.close_business_day(nxt)
    assert [r["business_date"] for r in done["finished_first"]] == [stuck.isoformat()]
    assert done["report"]["business_date"] == nxt.isoformat() and not done["replayed"]
    for day, report in ((stuck, done["finished_first"][0]), (nxt, done["report"])):
        assert world.c.days.status(day) == ("closed", report)
        assert_report_is_the_rows(report, rows_of(world.c.engine, day))
    assert world.net(chart.clinic_payable(CLINIC.org_code)) == 0  # each day cleared once
