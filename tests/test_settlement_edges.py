"""Edge cases of the settlement flows (found by trying to break them), on SQLite and PostgreSQL:

* a partial refund never takes money from the patient: when the remaining lines, re-split on
  today's accumulators, would cost more than the whole bill did, it is refused;
* an admission has one final settlement: a second final one is refused (the admission would be
  counted twice), interim ones are not, and after cancelling the final one it can be made again;
* visit ids may not contain ':' (the separator of the settlement's ledger key);
* a message id is unique per clinic even when different visits send it at the same moment;
* a replayed card settlement, and the query by msgid, carry the ARPC of the first answer;
* a cancelled visit settled again under a new msgid is refused (not answered with the
  cancelled settlement); under its own msgid it is the lost answer and replays;
* ids that no id can be (a NUL) are "not found", never a database error;
* NHSA 2204 codes that are not strings are refused;
* a card payment pre-settled at 0 fen that now has something to pay is an amount mismatch;
* a business day closed by another process is noticed within ``OPEN_DAY_RECHECK_S``;
* a card's transaction date (EMV 9A, the terminal's calendar) is checked against the engine
  clock's local date, not the business date, which runs ahead of the calendar once days are
  closed early (settlements and merchant payments alike);
* a card (or virtual card) blocked after its cryptogram was checked pays nothing: its counter is
  accepted, with the card's status, in the transaction that posts the payment.
"""

from __future__ import annotations

import datetime as dt
import threading
from functools import partial

import pytest

from ledger.errors import Conflict, DomainError, Invalid, NotFound, Rejected
from settlement import chart
from settlement.days import BusinessDays
from settlement.service import TerminalContext
from tests.test_settlement_flows import CLINIC, make_world, nothing_moved

MERCHANT = TerminalContext("TM000001", "M00000000009", "merchant")


def card_request(world, p, where: str, method: str = "card", *, merchant_fen: int = 300,
                 qr_atc: int = 900) -> tuple[dict, object]:
    """``(request, send)``: a request that person ``p``'s card pays ``where`` — at the
    merchant, a payment of ``merchant_fen``; at the clinic, the settlement of a 45.80-yuan
    class C visit (4580 fen from the wallet) — by ``method``: a fresh ARQC of the card
    ("card") or a QR code of the virtual card with counter ``qr_atc`` ("qr");
    ``send(request)`` submits it."""
    import random

    from simulators.cards import VirtualCardApp

    def payment_for(amount_fen: int, ctx) -> dict:
        if method == "card":
            return world.card_payment(p, amount_fen, ctx)
        app = VirtualCardApp(issuer_mk=world.c.keys.issuer_mk, pan=p.pan, psn="01", atc=qr_atc)
        return {"method": "qr", "payload": app.make_qr(world.clock() // 1_000_000, random.Random(qr_atc))}

    if where == "merchant":
        return ({"msgid": f"P{world.next():012d}", "amount_fen": merchant_fen,
                 "payment": payment_for(merchant_fen, MERCHANT)}, partial(world.c.wallet.pay, MERCHANT))
    payment = payment_for(4_580, CLINIC)
    req = world.visit(p, world.bill(("C", "45.80", "1")), method=payment["method"])
    req["payment"] = payment
    return req, partial(world.svc.settle, CLINIC)


@pytest.fixture
def world(db_url, tmp_path):
    with make_world(db_url, tmp_path) as w:
        yield w


def test_a_refund_that_would_charge_the_patient_more_is_refused(world):
    p = world.add_person(personal_fen=0, wallet_fen=300_000)
    a = world.settle(p, world.bill(("A", "600.00", "1")))  # takes the whole deductible
    assert a["setlinfo"]["act_pay_dedc"] > 0
    b = world.settle(p, world.bill(("A", "10.00", "10")), method="card")
    world.svc.cancel(CLINIC, a["setl_id"], {"msgid": world.msgid(world.next())})  # frees the deductible
    snap = world.pending_free_snapshot()
    with pytest.raises(Conflict) as exc:
        world.svc.refund(CLINIC, b["setl_id"], {"msgid": world.msgid(world.next()),
                                                "returns": [{"feedetl_sn": "1", "cnt": "1"}]})
    assert exc.value.code == "refund_would_charge_more"
    assert nothing_moved(snap, world.pending_free_snapshot())
    assert world.svc.get(CLINIC, b["setl_id"])["status"] == "settled"


def test_an_admission_has_one_final_settlement(world):
    p = world.add_person(personal_fen=0)
    year = world.year()
    mdtrt = f"ADM{world.next():08d}"
    bill = world.bill(("A", "600.00", "2"))
    interim = world.settle(p, bill, med_type="21", mdtrt_id=mdtrt, chrg_bchno="1", mid_setl_flag="1")
    final = world.settle(p, bill, med_type="21", mdtrt_id=mdtrt, chrg_bchno="2", mid_setl_flag="0")
    assert world.accum("admissions", p, year) == 1
    snap = world.pending_free_snapshot()
    with pytest.raises(Conflict) as exc:
        world.settle(p, bill, med_type="21", mdtrt_id=mdtrt, chrg_bchno="3", mid_setl_flag="0")
    assert exc.value.code == "admission_already_settled"
    assert nothing_moved(snap, world.pending_free_snapshot())
    # an interim batch after the discharge settlement is refused too (and so is its pre-settlement):
    # the discharge settlement closed the admission
    for op in ("settle", "presettle"):
        with pytest.raises(Conflict) as exc:
            v = world.visit(p, bill, med_type="21", mdtrt_id=mdtrt, chrg_bchno="4", mid_setl_flag="1")
            getattr(world.svc, op)(CLINIC, v)
        assert exc.value.code == "admission_already_settled" and "cancel the final settlement" in str(exc.value)
    # so is cancelling or refunding an interim batch of it: the final holds the admission's
    # deductible, which undoing a batch would leave to be borne again (a tester's F1, F2)
    with pytest.raises(Conflict) as exc:
        world.svc.cancel(CLINIC, interim["setl_id"], {"msgid": world.msgid(world.next())})
    assert exc.value.code == "admission_already_settled" and "cancel an interim batch" in str(exc.value)
    with pytest.raises(Conflict) as exc:
        world.svc.refund(CLINIC, interim["setl_id"], {"msgid": world.msgid(world.next()),
                                                      "returns": [{"feedetl_sn": "1", "cnt": "1"}]})
    assert exc.value.code == "admission_already_settled" and "refund an interim batch" in str(exc.value)
    assert nothing_moved(snap, world.pending_free_snapshot())
    assert world.accum("admissions", p, year) == 1
    # after the final settlement is cancelled, the admission can be closed again — once
    world.svc.cancel(CLINIC, final["setl_id"], {"msgid": world.msgid(world.next())})
    assert world.accum("admissions", p, year) == 0
    world.settle(p, bill, med_type="21", mdtrt_id=mdtrt, chrg_bchno="5", mid_setl_flag="0")
    assert world.accum("admissions", p, year) == 1
    # a second admission is the second of the year
    world.settle(p, bill, med_type="21", mdtrt_id=f"ADM{world.next():08d}", chrg_bchno="1")
    assert world.accum("admissions", p, year) == 2
    assert interim["setlinfo"]["act_pay_dedc"] > 0


@pytest.mark.parametrize("field", ["mdtrt_id", "chrg_bchno"])
def test_visit_ids_may_not_contain_the_key_separator(world, field):
    p = world.add_person()
    v = world.visit(p, world.bill(("A", "10.00", "1")))
    v[field] = "V:1"
    with pytest.raises(Invalid) as exc:
        world.svc.settle(CLINIC, v)
    assert exc.value.extra["field"] == field


def test_a_replayed_card_answer_and_the_msgid_query_carry_the_arpc(world):
    p = world.add_person(personal_fen=0, wallet_fen=100_000)
    first = world.settle(p, world.bill(("C", "45.80", "1")), method="card")
    arpc = first["payment"]["arpc"]
    assert len(arpc) == 16 and first["status"] == "settled"
    again = world.svc.settle(CLINIC, world.last_visit)
    assert again["replayed"] is True and again["payment"]["arpc"] == arpc
    assert world.svc.query_by_msgid(CLINIC, world.last_visit["msgid"])["payment"]["arpc"] == arpc


def test_a_cancelled_visit_settled_again_under_a_new_msgid_is_refused(world):
    p = world.add_person()
    first = world.settle(p, world.bill(("A", "75.00", "2")))
    v = dict(world.last_visit)
    world.svc.cancel(CLINIC, first["setl_id"], {"msgid": world.msgid(world.next())})
    with pytest.raises(Conflict) as exc:
        world.svc.settle(CLINIC, dict(v, msgid=world.msgid(world.next())))
    assert exc.value.code == "settlement_undone"
    lost = world.svc.settle(CLINIC, v)  # its own msgid: the answer the terminal lost
    assert lost["replayed"] is True and lost["status"] == "cancelled" and lost["setl_id"] == first["setl_id"]


@pytest.mark.parametrize("bad", ["\x00", "a\x00b", "\x07"])
def test_ids_no_id_can_be_are_not_found(world, bad):
    with pytest.raises(NotFound):
        world.svc.query_by_msgid(CLINIC, bad)
    with pytest.raises(NotFound):
        world.svc.get(CLINIC, bad)
    with pytest.raises(NotFound):
        world.svc.cancel(CLINIC, bad, {"msgid": world.msgid(world.next())})
    with pytest.raises(NotFound):
        world.c.cards.card(bad)
    p = world.add_person(personal_fen=0, wallet_fen=10_000)
    v = world.visit(p, world.bill(("C", "45.80", "1")), method="card")
    v["payment"] = dict(world.card_payment(p, 4_580), pan=p.pan + bad)
    with pytest.raises(NotFound):
        world.svc.settle(CLINIC, v)


@pytest.mark.parametrize("code", [["X"], {"a": 1}, 12])
def test_2204_codes_must_be_strings(world, code):
    p = world.add_person()
    v = world.visit(p, world.bill(("A", "10.00", "1")))
    del v["lines"]
    v["feedetail"] = [{"feedetl_sn": "1", "med_list_codg": code, "pric": "10.00", "cnt": "1"}]
    with pytest.raises(Invalid) as exc:
        world.svc.settle(CLINIC, v)
    assert "must be a string" in str(exc.value)


def test_a_card_payment_presettled_at_zero_that_now_owes_is_an_amount_mismatch(world):
    p = world.add_person(personal_fen=50_000, wallet_fen=100_000)
    v = world.visit(p, world.bill(("A", "20.00", "1")), method="card")
    assert world.svc.presettle(CLINIC, v)["setlinfo"]["psn_cash_pay"] == 0  # the account pays it all
    world.settle(p, world.bill(("A", "600.00", "1")))  # meanwhile the account is emptied
    v["payment"] = {"method": "card", "pan": p.pan}
    with pytest.raises(Rejected) as exc:
        world.svc.settle(CLINIC, v)
    assert exc.value.code == "amount_mismatch" and exc.value.status == 409
    assert exc.value.extra["amount_due_fen"] > 0


def test_a_day_closed_by_another_process_is_noticed(world):
    other = BusinessDays(world.c.engine, world.clock, recheck_s=0.0)   # "another engine process"
    mine = BusinessDays(world.c.engine, world.clock, recheck_s=0.05)
    day = mine.current()
    assert other.begin_close() == day
    other.close(day, {"closed_by": "test"})
    assert mine.current() == day  # trusted for recheck_s
    threading.Event().wait(0.06)
    assert mine.current() == day + dt.timedelta(days=1)


@pytest.mark.pg
def test_one_msgid_for_different_visits_at_once_settles_one(pg_url, tmp_path):
    from tests.test_settlement_concurrency import at_once

    for group_commit in (False, True):
        with make_world(pg_url, tmp_path / str(group_commit), group_commit=group_commit) as w:
            p = w.add_person()
            bill = w.bill(("A", "30.00", "1"))
            msgid = w.msgid(w.next())
            visits = [dict(w.visit(p, bill), msgid=msgid) for _ in range(5)]
            results = at_once([partial(w.svc.settle, CLINIC, v) for v in visits])
            ok = [r for kind, r in results if kind == "ok"]
            refused = [r for kind, r in results if kind == "error"]
            assert len(ok) == 1, [repr(r) for r in refused]
            assert all(isinstance(e, DomainError) and e.code == "msgid_reused" for e in refused), refused
            assert w.svc.query_by_msgid(CLINIC, msgid)["mdtrt_id"] == ok[0]["mdtrt_id"]
            assert w.ledger.trial_balance().balanced


@pytest.mark.parametrize("atc", [1.5, True, "7"])
def test_an_atc_must_be_a_json_integer(world, atc):
    p = world.add_person(personal_fen=0, wallet_fen=10_000)
    v = world.visit(p, world.bill(("C", "45.80", "1")), method="card")
    v["payment"] = dict(world.card_payment(p, 4_580), atc=atc)
    with pytest.raises(Invalid) as exc:
        world.svc.settle(CLINIC, v)
    assert exc.value.code == "card_auth_malformed"


@pytest.mark.parametrize("payment", [[], "", 0, "cash"])
def test_a_payment_that_is_not_an_object_is_refused(world, payment):
    p = world.add_person()
    v = dict(world.visit(p, world.bill(("A", "10.00", "1"))), payment=payment)
    with pytest.raises(Invalid) as exc:
        world.svc.settle(CLINIC, v)
    assert exc.value.code == "payment_method_unknown"


def test_a_refund_that_would_take_more_from_the_personal_account_is_refused(world):
    p = world.add_person(personal_fen=300_000)
    world.settle(p, world.bill(("A", "600.00", "1")))
    a = world.svc.query_by_msgid(CLINIC, world.last_visit["msgid"])
    b = world.settle(p, world.bill(("A", "10.00", "10")))
    assert b["setlinfo"]["psn_cash_pay"] == 0 and b["setlinfo"]["acct_pay"] > 0
    world.svc.cancel(CLINIC, a["setl_id"], {"msgid": world.msgid(world.next())})
    snap = world.pending_free_snapshot()
    with pytest.raises(Conflict) as exc:
        world.svc.refund(CLINIC, b["setl_id"], {"msgid": world.msgid(world.next()),
                                                "returns": [{"feedetl_sn": "1", "cnt": "1"}]})
    assert exc.value.code == "refund_would_charge_more" and "personal account" in str(exc.value)
    assert nothing_moved(snap, world.pending_free_snapshot())


@pytest.mark.parametrize("field", ["name", "hilist_code", "feedetl_sn"])
@pytest.mark.parametrize("bad", ["\ud800", "a\x00b"])
def test_line_text_must_be_printable(world, field, bad):
    p = world.add_person()
    v = world.visit(p, world.bill(("A", "10.00", "1")))
    v["lines"][0][field] = bad
    snap = world.pending_free_snapshot()
    with pytest.raises(Invalid):
        world.svc.settle(CLINIC, v)
    with pytest.raises(Invalid):
        world.svc.presettle(CLINIC, v)
    assert nothing_moved(snap, world.pending_free_snapshot())


def test_a_lone_surrogate_in_a_payment_is_invalid_not_a_crash(world):
    from settlement.service import fingerprint

    with pytest.raises(Invalid) as exc:
        fingerprint({"pan": "62\ud800"})
    assert exc.value.code == "text_invalid"


def test_an_answer_with_text_utf8_cannot_carry_is_still_delivered():
    import json

    from api.app import json_bytes

    assert json.loads(json_bytes({"name": "a\ud800b", "x": "中"})) == {"name": "a\ud800b", "x": "中"}
    assert json_bytes({"x": "中"}) == '{"x": "中"}'.encode()


def test_a_card_is_dated_by_the_calendar_not_the_business_day(world):
    days = world.c.days
    for _ in range(2):  # two days closed early: the business day runs two days ahead
        days.close(days.begin_close(), {"closed_by": "test"})
    today = world.c.days.local_date()
    assert days.current() == today + dt.timedelta(days=2)
    p = world.add_person(personal_fen=0, wallet_fen=100_000)

    v = world.visit(p, world.bill(("C", "45.80", "1")), method="card")
    v["payment"] = world.card_payment(p, 4_580, day=today)  # the terminal's own date
    doc = world.svc.settle(CLINIC, v)
    assert doc["business_date"] == (today + dt.timedelta(days=2)).isoformat()
    assert doc["payment"]["wallet_pay_fen"] == 4_580
    paid = world.c.wallet.pay(MERCHANT, {"msgid": f"P{world.next():012d}", "amount_fen": 300,
                                         "payment": world.card_payment(p, 300, MERCHANT, day=today)})
    assert paid["amount_fen"] == 300

    far = today + dt.timedelta(days=2)  # the business date, but two days from the calendar
    v = world.visit(p, world.bill(("C", "12.00", "1")), method="card")
    v["payment"] = world.card_payment(p, 1_200, day=far)
    with pytest.raises(Rejected) as exc:
        world.svc.settle(CLINIC, v)
    assert exc.value.code == "card_txn_date_invalid"
    with pytest.raises(Rejected) as exc:
        world.c.wallet.pay(MERCHANT, {"msgid": f"P{world.next():012d}", "amount_fen": 300,
                                      "payment": world.card_payment(p, 300, MERCHANT, day=far)})
    assert exc.value.code == "card_txn_date_invalid"


def test_a_card_presented_for_nothing_due_from_its_wallet_must_be_active_and_the_persons(world):
    """The personal account covers the visit, so the card's wallet pays nothing: the card (or
    the QR code) presented is still checked. A blocked (lost) card, another person's card or an
    unreadable QR code is refused, nothing moves."""
    p = world.add_person(personal_fen=5_000_000)
    other = world.add_person(personal_fen=0)
    bill = world.bill(("A", "20.00", "1"))
    v = world.visit(p, bill, method="card")
    assert world.svc.presettle(CLINIC, v)["setlinfo"]["psn_cash_pay"] == 0
    world.c.cards.set_status(p.pan, "blocked")
    snap = world.pending_free_snapshot()
    for pan, code in ((p.pan, "card_blocked"), (other.pan, "card_holder_mismatch")):
        with pytest.raises(Rejected) as exc:
            world.svc.settle(CLINIC, dict(v, payment={"method": "card", "pan": pan}))
        assert exc.value.code == code
    with pytest.raises(NotFound) as missing:
        world.svc.settle(CLINIC, dict(v, payment={"method": "card", "pan": "6200000000000000"}))
    assert missing.value.code == "card_not_found"
    assert nothing_moved(snap, world.pending_free_snapshot())
    # a QR code presented so is read (not spent: nothing is authorised) and checked alike
    import random

    from simulators.cards import VirtualCardApp

    def qr(pan: str) -> dict:
        app = VirtualCardApp(issuer_mk=world.c.keys.issuer_mk, pan=pan, psn="01", atc=700)
        return {"method": "qr", "payload": app.make_qr(world.clock() // 1_000_000, random.Random(2))}

    for payment, code in ((qr(p.pan), "card_blocked"), (qr(other.pan), "card_holder_mismatch"),
                          ({"method": "qr", "payload": "garbage"}, "qr_payload_malformed")):
        with pytest.raises(DomainError) as exc:
            world.svc.settle(CLINIC, dict(v, payment=payment))
        assert exc.value.code == code
    assert nothing_moved(snap, world.pending_free_snapshot())
    world.c.cards.set_status(p.pan, "active")
    doc = world.svc.settle(CLINIC, dict(v, payment={"method": "card", "pan": p.pan}))
    assert doc["setlinfo"]["acct_pay"] > 0 and doc["setlinfo"]["psn_cash_pay"] == 0


def test_an_interim_batch_cancelled_while_the_final_is_settled_is_refused(world, monkeypatch):
    """Cancel of an interim batch racing with the admission's final settlement: the cancel
    read "no final yet", the final commits before the cancel's entry; the entry's assertion
    (adm_final still 0) fails and the cancel is refused, nothing moved by it."""
    p = world.add_person(personal_fen=0)
    mdtrt = f"ADM{world.next():08d}"
    bill = world.bill(("A", "600.00", "2"))
    interim = world.settle(p, bill, med_type="21", mdtrt_id=mdtrt, chrg_bchno="1", mid_setl_flag="1")
    svc = world.svc
    real = svc._post
    raced: list = []

    def final_first(entry, hook):
        if entry.kind == "reversal" and not raced:
            raced.append(world.settle(p, bill, med_type="21", mdtrt_id=mdtrt, chrg_bchno="2", mid_setl_flag="0"))
        return real(entry, hook)

    monkeypatch.setattr(svc, "_post", final_first)
    with pytest.raises(Conflict) as exc:
        svc.cancel(CLINIC, interim["setl_id"], {"msgid": world.msgid(world.next())})
    assert exc.value.code == "admission_already_settled" and raced
    assert svc.get(CLINIC, interim["setl_id"])["status"] == "settled"
    assert world.accum("admissions", p, world.year()) == 1


def two_admissions(world, person, units: str) -> tuple[dict, dict]:
    """Two admissions of ``person`` closed by final settlements of ``units`` × 300 yuan (class
    A); the second bears the reduced deductible of a second admission of the year."""
    first, second = (world.settle(person, world.bill(("A", "300.00", units)), med_type="21",
                                  mdtrt_id=f"ADM{world.next():08d}", chrg_bchno="1") for _ in range(2))
    assert second["setlinfo"]["act_pay_dedc"] < first["setlinfo"]["act_pay_dedc"]
    return first, second


def return_one_unit(world, settlement: dict) -> dict:
    """A partial refund of one unit of ``settlement``'s first line."""
    return world.svc.refund(CLINIC, settlement["setl_id"], {"msgid": world.msgid(world.next()),
                                                            "returns": [{"feedetl_sn": "1", "cnt": "1"}]})

def test_a_partial_refund_of_a_final_settlement_keeps_its_admission_of_the_year(world):
    """The first admission of the year is refunded in part after a second one closed: its
    remaining lines are re-split as the first admission (full deductible), not as the second
    (which the count of admissions closed by now would say, and whose deductible is reduced):
    the refund equals the difference of two settlements of that first admission."""
    from settlement.split import PersonState, parse_bill_lines, split_visit

    p = world.add_person(personal_fen=0)
    first, second = two_admissions(world, p, "4")
    refund = return_one_unit(world, first)
    policy = world.c.settlements.policies.find("310", False, CLINIC.hospital_tier, "21", world.svc.insu_year())
    line = {k: v for k, v in first["lines"][0].items() if v is not None and k in (
        "feedetl_sn", "hilist_code", "name", "chrgitm_lv", "pric", "selfpay_prop", "pric_uplmt_amt")}
    remaining = parse_bill_lines([dict(line, cnt="3")])  # 4 billed, 1 returned
    fresh = split_visit(policy, PersonState(fund_paid_ytd_fen=second["setlinfo"]["hifp_pay"]), remaining)
    assert refund["setlinfo"]["act_pay_dedc"] == fresh.setlinfo.act_pay_dedc == first["setlinfo"]["act_pay_dedc"]
    assert refund["setlinfo"]["hifp_pay"] == fresh.setlinfo.hifp_pay


def final_settled_before_the_rows(world, monkeypatch, person, mdtrt: str) -> list:
    """Make the admission ``mdtrt``'s final settlement commit right before the next rows that
    move no money are written (between their read and their write); returns the list that
    receives that final settlement's document."""
    svc = world.svc
    real = svc._insert_rows
    raced: list = []

    def final_first(rows, guards=()):
        if not raced:
            raced.append(world.settle(person, world.bill(("A", "600.00", "2")), med_type="21", mdtrt_id=mdtrt,
                                      chrg_bchno="9", mid_setl_flag="0"))
        return real(rows, guards)

    monkeypatch.setattr(svc, "_insert_rows", final_first)
    return raced


@pytest.mark.parametrize("undo", [False, True])
def test_an_interim_batch_that_moves_no_money_races_the_final_and_is_refused(world, monkeypatch, undo):
    """A wholly self-paid interim batch paid in cash moves no money, so no entry asserts the
    admission's state: its row's transaction holds the admission FOR SHARE instead (AdmissionOpen).
    The final settled between its read and its write refuses it (settling it, or cancelling
    one settled before); nothing of it is written."""
    p = world.add_person(personal_fen=0)
    mdtrt = f"ADM{world.next():08d}"
    self_paid = world.bill(("C", "80.00", "1"))
    earlier = world.settle(p, self_paid, med_type="21", mdtrt_id=mdtrt, chrg_bchno="1", mid_setl_flag="1")
    assert earlier["setlinfo"]["fund_pay_sumamt"] == 0 and earlier["setlinfo"]["psn_cash_pay"] > 0
    svc = world.svc
    raced = final_settled_before_the_rows(world, monkeypatch, p, mdtrt)
    with pytest.raises(Conflict) as exc:
        if undo:
            svc.cancel(CLINIC, earlier["setl_id"], {"msgid": world.msgid(world.next())})
        else:
            svc.settle(CLINIC, world.visit(p, self_paid, med_type="21", mdtrt_id=mdtrt, chrg_bchno="2",
                                           mid_setl_flag="1"))
    assert exc.value.code == "admission_already_settled" and raced
    assert svc.get(CLINIC, earlier["setl_id"])["status"] == "settled"


def test_a_person_is_registered_with_a_sex_code_and_the_birth_date_of_their_identity_number(world):
    """The catalogue's sex and age restrictions are decided on gend and brdy: a sex code outside
    GB/T 2261.1, a sex or birth date other than the identity number's, and an identity number
    born after today are refused (a tester got 'the person is -4' from a future brdy)."""
    import random

    from card.identity import birth_date_of, synthetic_sfz

    certno = synthetic_sfz(random.Random(3), "330302", dt.date(1990, 2, 3), sex="F")
    person = dict(psn_no="330399990000001", certno=certno, psn_name="测试", insutype="310", retired=False)
    for gend, code in (("M", "gend_invalid"), ("1", "gend_mismatch")):
        with pytest.raises(Invalid) as exc:
            world.c.cards.register_citizen(**person, gend=gend, brdy=birth_date_of(certno))
        assert exc.value.code == code
    unborn = synthetic_sfz(random.Random(4), "330302", world.c.cards.local_date() + dt.timedelta(days=1))
    with pytest.raises(Invalid) as exc:
        world.c.cards.register_citizen(**dict(person, certno=unborn), gend="0", brdy=birth_date_of(unborn))
    assert exc.value.code == "certno_invalid"
    for brdy in (dt.date(2030, 1, 1), dt.date(1990, 2, 4)):
        with pytest.raises(Invalid) as exc:
            world.c.cards.register_citizen(**person, gend="2", brdy=brdy)
        assert exc.value.code == "brdy_mismatch" and "1990-02-03" in exc.value.detail
    assert world.c.cards.register_citizen(**person, gend="2", brdy=dt.date(1990, 2, 3))


def test_every_partial_refund_of_a_final_keeps_its_admission_of_the_year(world):
    """A refund's re-split of a final settlement is refunded again after a later admission
    closed: it is still the first admission (its entry carries admission_no), so the second
    refund is the difference of two settlements of the first admission (a reviewer's F1: the
    second refund was re-split as the 2nd admission and the fund overpaid)."""
    p = world.add_person(personal_fen=0)
    first, _second = two_admissions(world, p, "8")
    once = return_one_unit(world, first)
    twice = return_one_unit(world, once)
    deductible = first["setlinfo"]["act_pay_dedc"]
    assert once["setlinfo"]["act_pay_dedc"] == twice["setlinfo"]["act_pay_dedc"] == deductible
    assert twice["setlinfo"]["medfee_sumamt"] == 180_000  # 8 units billed, 2 returned


def test_a_cash_only_refund_of_an_interim_batch_racing_the_final_is_refused(world, monkeypatch):
    """A refund of a wholly self-paid interim batch moves no money: its rows are written under
    AdmissionOpen, so a final settled between its read and its write refuses it."""
    p = world.add_person(personal_fen=0)
    mdtrt = f"ADM{world.next():08d}"
    interim = world.settle(p, world.bill(("C", "50.00", "4")), med_type="21", mdtrt_id=mdtrt, chrg_bchno="1",
                           mid_setl_flag="1")
    svc = world.svc
    raced = final_settled_before_the_rows(world, monkeypatch, p, mdtrt)
    with pytest.raises(Conflict) as exc:
        svc.refund(CLINIC, interim["setl_id"], {"msgid": world.msgid(world.next()),
                                                "returns": [{"feedetl_sn": "1", "cnt": "1"}]})
    assert exc.value.code == "admission_already_settled" and raced
    assert svc.get(CLINIC, interim["setl_id"])["status"] == "settled"


@pytest.mark.parametrize("where", ["merchant", "clinic"])
@pytest.mark.parametrize("method", ["card", "qr"])
def test_a_card_blocked_after_its_cryptogram_was_checked_pays_nothing(world, monkeypatch, method, where):
    """The card is blocked (lost, reported by phone) between the cryptogram check and the
    posting: the counter's compare-and-set in the posting transaction finds it blocked, so
    nothing moves, no payment or settlement row is written and the answer is ``card_blocked``.
    Before, a merchant payment (and any QR payment) spent the counter in a transaction of its
    own first, and the posting after it paid from the blocked card."""
    from sqlalchemy import func, select

    from settlement.schema import payments, settlements

    p = world.add_person(personal_fen=0, wallet_fen=100_000)
    cards = world.c.cards
    real_authorise = cards.authorise

    def authorise_then_blocked(*args, **kwargs):
        auth = real_authorise(*args, **kwargs)
        cards.set_status(p.pan, "blocked")  # committed while the request is between the two steps
        return auth

    req, send = card_request(world, p, where, method)
    snap = world.pending_free_snapshot()
    monkeypatch.setattr(cards, "authorise", authorise_then_blocked)
    with pytest.raises(Rejected) as exc:
        send(dict(req))
    assert exc.value.code == "card_blocked"
    assert nothing_moved(snap, world.pending_free_snapshot())
    # The refusal is this message's answer, kept: sent again once the card is unblocked, the
    # same message is refused the same way and never pays (reviewer, session 6).
    monkeypatch.undo()
    cards.set_status(p.pan, "active")
    with pytest.raises(Rejected) as again:
        send(dict(req))
    assert again.value.code == "card_blocked"
    # ... and its cryptogram was used up with the refusal: under another message it pays nothing
    if where == "merchant":
        other = dict(req, msgid=f"P{world.next():012d}")
    else:
        other = dict(world.visit(p, world.bill(("C", "45.80", "1")), method=method), payment=req["payment"])
    with pytest.raises(Rejected) as replayed:
        send(other)
    assert replayed.value.code == "atc_replayed"
    assert nothing_moved(snap, world.pending_free_snapshot())
    with world.c.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(payments)) == 0
        assert conn.scalar(select(func.count()).select_from(settlements)) == 0


@pytest.mark.parametrize("where", ["merchant", "clinic"])
@pytest.mark.parametrize("method", ["card", "qr"])
def test_a_payment_failed_by_the_database_after_the_card_authorised_completes_when_sent_again(
        world, monkeypatch, method, where):
    """The database fails (503 over HTTP) after the card or QR code authorised the payment and
    before anything was posted: the terminal's query by msgid finds nothing, and the same
    request sent again — same cryptogram, same QR code — pays, once. Before, the counter was
    spent on its own after the failure and the resend answered atc_replayed (reviewer, session 6)."""
    import psycopg

    from ledger.db import is_database_unavailable

    p = world.add_person(personal_fen=0, wallet_fen=100_000)
    service = world.c.wallet if where == "merchant" else world.svc
    real_submit = service.submit
    failures = []

    def submit_fails_once(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return real_submit(*args, **kwargs)

    req, send = card_request(world, p, where, method, qr_atc=950)
    amount = req["amount_fen"] if where == "merchant" else 4_580
    monkeypatch.setattr(service, "submit", submit_fails_once)
    snap = world.pending_free_snapshot()
    with pytest.raises(Exception) as first:
        send(dict(req))
    assert is_database_unavailable(first.value) and failures == [1]
    assert nothing_moved(snap, world.pending_free_snapshot())
    if where == "clinic":
        with pytest.raises(NotFound):
            world.svc.query_by_msgid(CLINIC, req["msgid"])
    done = send(dict(req))
    assert done["replayed"] is False
    again = send(dict(req))
    assert again["replayed"] is True
    assert world.net(chart.wallet_account(p.pan)) == 100_000 - amount  # paid once


def test_a_merchant_msgid_sent_again_with_another_persons_qr_code_is_another_request(world):
    """A QR payment's request is who pays (the card the code names) as well as how much: the
    same msgid with another person's code is a conflict, never the first payment replayed
    (which would let the merchant hand the goods over unpaid) and never a charge to the other."""
    import random

    from simulators.cards import VirtualCardApp

    a = world.add_person(personal_fen=0, wallet_fen=10_000)
    b = world.add_person(personal_fen=0, wallet_fen=10_000)

    def qr(person, atc: int) -> dict:
        app = VirtualCardApp(issuer_mk=world.c.keys.issuer_mk, pan=person.pan, psn="01", atc=atc)
        return {"method": "qr", "payload": app.make_qr(world.clock() // 1_000_000, random.Random(atc))}

    msgid = f"P{world.next():012d}"
    first = world.c.wallet.pay(MERCHANT, {"msgid": msgid, "amount_fen": 500, "payment": qr(a, 60)})
    assert first["pan"] == a.pan
    with pytest.raises(Conflict) as exc:
        world.c.wallet.pay(MERCHANT, {"msgid": msgid, "amount_fen": 500, "payment": qr(b, 61)})
    assert exc.value.code == "exists_with_different_content"
    assert world.c.wallet.pay(MERCHANT, {"msgid": msgid, "amount_fen": 500, "payment": qr(a, 62)})["replayed"] is True
    assert world.net(chart.wallet_account(a.pan)) == 9_500 and world.net(chart.wallet_account(b.pan)) == 10_000
    with pytest.raises(Invalid) as bad:
        world.c.wallet.pay(MERCHANT, {"msgid": f"P{world.next():012d}", "amount_fen": 500,
                                      "payment": {"method": "qr", "payload": "garbage"}})
    assert bad.value.code == "qr_payload_malformed"


def test_a_refund_or_cancellation_sent_again_answers_exactly_its_first_answer(world):
    """The cashier who lost the answer to a partial refund learns from the resend (or the query
    by msgid) what each payer gets back, as the first answer said; the same msgid with other
    ``returns`` is another request (``msgid_reused``, nothing moves), never the first refund
    replayed; a cancellation's first answer and its replay agree, ``status`` included
    (reviewer, session 6: the replay had no ``refund``, the cancellation's first ``status`` was
    missing)."""
    p = world.add_person(personal_fen=20_000, wallet_fen=0)
    a = world.settle(p, world.bill(("A", "120.00", "3"), ("B", "42.52", "2"), ("C", "18.30", "1")))
    msgid = world.msgid(world.next())
    first = world.svc.refund(CLINIC, a["setl_id"], {"msgid": msgid, "returns": [{"feedetl_sn": "1", "cnt": "1"}]})
    assert first["status"] == "settled" and first["replayed"] is False
    assert first["refund"]["medfee_sumamt"] == 12_000 and sum(first["refund"].values()) > 0
    again = world.svc.refund(CLINIC, a["setl_id"], {"msgid": msgid, "returns": [{"feedetl_sn": "1", "cnt": "1"}]})
    assert again == dict(first, replayed=True)
    for same in (1, "1.0", "1.00"):  # the same number of units, written otherwise: the same request
        assert world.svc.refund(CLINIC, a["setl_id"], {"msgid": msgid, "returns": [
            {"feedetl_sn": "1", "cnt": same}]}) == again
    assert world.svc.query_by_msgid(CLINIC, msgid) == again
    assert world.svc.get(CLINIC, first["setl_id"]) == again
    snap = world.pending_free_snapshot()
    for other in ([{"feedetl_sn": "1", "cnt": "2"}], [{"feedetl_sn": "2", "cnt": "1"}]):
        with pytest.raises(Conflict) as exc:
            world.svc.refund(CLINIC, a["setl_id"], {"msgid": msgid, "returns": other})
        assert exc.value.code == "msgid_reused"
    with pytest.raises(Conflict) as exc:  # a cancellation under the refund's msgid: another request too
        world.svc.cancel(CLINIC, a["setl_id"], {"msgid": msgid})
    assert exc.value.code == "msgid_reused"
    assert nothing_moved(snap, world.pending_free_snapshot())

    b = world.settle(p, world.bill(("A", "20.00", "1")))
    cancel_msgid = world.msgid(world.next())
    cancelled = world.svc.cancel(CLINIC, b["setl_id"], {"msgid": cancel_msgid})
    assert cancelled["status"] == "cancellation" and cancelled["replayed"] is False
    assert world.svc.cancel(CLINIC, b["setl_id"], {"msgid": cancel_msgid}) == dict(cancelled, replayed=True)
    assert world.svc.query_by_msgid(CLINIC, cancel_msgid) == dict(cancelled, replayed=True)



@pytest.mark.parametrize("where", ["merchant", "clinic"])
def test_a_refusal_that_could_not_be_recorded_is_answered_503_and_decided_again(world, monkeypatch, where):
    """The card authorised the payment, the wallet cannot pay it, and the database fails while
    the refusal is being recorded: the answer is 503 ``database_unavailable`` (the outcome is
    not kept), never the 402 a terminal takes as final while the same message could still pay
    later; the same message sent again is refused and its refusal kept (reviewer, session 6)."""
    import psycopg

    from ledger.errors import Unavailable

    p = world.add_person(personal_fen=0, wallet_fen=1_000)
    ledger = world.c.ledger
    real_run_hooks = ledger.run_hooks

    def fails(*_args, **_kwargs):
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    req, send = card_request(world, p, where, merchant_fen=5_000)
    snap = world.pending_free_snapshot()
    monkeypatch.setattr(ledger, "run_hooks", fails)
    with pytest.raises(Unavailable) as first:
        send(dict(req))
    assert (first.value.code, first.value.status) == ("database_unavailable", 503)
    assert "insufficient_funds" in first.value.detail
    monkeypatch.setattr(ledger, "run_hooks", real_run_hooks)
    for _ in range(2):  # decided again, then answered from the kept refusal
        with pytest.raises(Rejected) as again:
            send(dict(req))
        assert (again.value.code, again.value.status) == ("insufficient_funds", 402)
    assert nothing_moved(snap, world.pending_free_snapshot())


def test_refunds_under_msgids_alike_but_for_their_last_characters_both_refund(world):
    """A refund's cancellation half carries an engine-derived msgid, unique per refund: two
    40-character msgids that share their first 38 characters are two refunds (before, both
    cancellation halves were named by the first 38 characters + "~C" and the second refund was
    refused ``msgid_reused``); such an internal msgid is no terminal's, and the query by msgid
    does not find it (reviewer, session 6)."""
    p = world.add_person(personal_fen=20_000)
    docs = [world.settle(p, world.bill(("A", "20.00", "3"))) for _ in range(2)]
    firsts = []
    for doc, tail in zip(docs, ("AA", "BB")):
        msgid = "X" * 38 + tail
        refund = world.svc.refund(CLINIC, doc["setl_id"], {"msgid": msgid, "returns": [{"feedetl_sn": "1", "cnt": "1"}]})
        assert refund["msgid"] == msgid and refund["replayed"] is False and refund["refund"]["medfee_sumamt"] == 2_000
        firsts.append(refund)
    with world.c.engine.connect() as conn:
        from sqlalchemy import select

        from settlement.schema import settlements
        internal = conn.execute(select(settlements.c.msgid).where(settlements.c.kind == "cancellation")).scalars().all()
    assert len(internal) == 2 and all(m.startswith("~") for m in internal)
    for m in internal:
        with pytest.raises(NotFound):
            world.svc.query_by_msgid(CLINIC, m)



@pytest.mark.parametrize("where", ["merchant", "clinic"])
def test_a_card_blocked_while_its_refusal_is_recorded_keeps_the_refusal(world, monkeypatch, where):
    """The wallet cannot pay and the card is blocked between the refused posting and the
    recording of the refusal: the refusal is still kept with the counter used up (whatever the
    card's status), so once the card is unblocked and the wallet recharged the same message
    is refused the same and never pays (third review, session 6: it paid)."""
    p = world.add_person(personal_fen=0, wallet_fen=1_000)
    service = world.c.wallet if where == "merchant" else world.svc
    real_submit = service.submit

    def submit_then_block(*args, **kwargs):
        outcome = real_submit(*args, **kwargs)
        world.c.cards.set_status(p.pan, "blocked")
        return outcome

    req, send = card_request(world, p, where, merchant_fen=4_580)
    monkeypatch.setattr(service, "submit", submit_then_block)
    with pytest.raises(Rejected) as first:
        send(dict(req))
    assert (first.value.code, first.value.status) == ("insufficient_funds", 402)
    monkeypatch.undo()
    world.c.cards.set_status(p.pan, "active")
    world.recharge(p, 10_000)  # the wallet could pay now: the kept refusal still answers
    snap = world.pending_free_snapshot()
    with pytest.raises(Rejected) as again:
        send(dict(req))
    assert (again.value.code, again.value.status) == ("insufficient_funds", 402)
    assert nothing_moved(snap, world.pending_free_snapshot())


@pytest.mark.parametrize("where", ["merchant", "clinic"])
def test_a_blocked_cards_refusal_that_could_not_be_recorded_is_answered_503(world, monkeypatch, where):
    """The card is blocked while its payment is in flight and the refusal cannot be recorded
    (the database failing): 503 ``database_unavailable``, not a final ``card_blocked`` that
    the same message could contradict later (third review, session 6)."""
    import psycopg

    from ledger.errors import Unavailable

    p = world.add_person(personal_fen=0, wallet_fen=100_000)
    cards, ledger = world.c.cards, world.c.ledger
    real_authorise = cards.authorise

    def authorise_then_blocked(*args, **kwargs):
        auth = real_authorise(*args, **kwargs)
        cards.set_status(p.pan, "blocked")
        return auth

    def fails(*_args, **_kwargs):
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    req, send = card_request(world, p, where)
    snap = world.pending_free_snapshot()
    monkeypatch.setattr(cards, "authorise", authorise_then_blocked)
    monkeypatch.setattr(ledger, "run_hooks", fails)
    with pytest.raises(Unavailable) as first:
        send(dict(req))
    assert (first.value.code, first.value.status) == ("database_unavailable", 503)
    assert "card_blocked" in first.value.detail
    assert nothing_moved(snap, world.pending_free_snapshot())
