"""Concurrent settlements on PostgreSQL (real row locks, many connections): the deductible and the
annual cap apply exactly once when visits of one person are settled at the same moment, a
duplicated submission settles once, and a cancellation racing a refund lets exactly one win.

Each race starts its threads at a barrier. The serial order the database chose is read back
from the ledger (entry ids ascend in commit order), and the splits are replayed in that order
with the pure rules: the accumulators and every returned split must equal that serial replay.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from functools import partial

import pytest
from sqlalchemy import func, select

from ledger.errors import Conflict, DomainError
from settlement import chart
from settlement.schema import settlements
from settlement.split import PersonState, split_visit
from tests.test_settlement_flows import (ANNUAL_CAP_FEN, CLINIC, DEDUCTIBLE_FEN, World, amounts, info_of,
                                         make_world, remaining_lines, same_nets)

pytestmark = pytest.mark.pg


def at_once(calls) -> list[tuple[str, object]]:
    """Run the callables in threads released together; ``("ok", result)`` or ``("error", exc)``."""
    barrier = threading.Barrier(len(calls))

    def run(fn):
        barrier.wait()
        try:
            return "ok", fn()
        except Exception as exc:  # every outcome is inspected by the test
            return "error", exc

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


@pytest.fixture(params=[False, True], ids=["direct", "group_commit"])
def world(request, pg_url, tmp_path):
    with make_world(pg_url, tmp_path, group_commit=request.param) as w:
        yield w


def entry_key(v: dict) -> str:
    return f"setl:{CLINIC.org_code}:{v['mdtrt_id']}:{v['chrg_bchno']}"


def settle_or_retry(world: World, v: dict) -> dict:
    """Settle as a terminal would: ``settlement_contended`` means "retry with the same msgid"."""
    for _ in range(10):
        try:
            return world.svc.settle(CLINIC, v)
        except Conflict as exc:
            if exc.code != "settlement_contended":
                raise
    raise AssertionError("still contended after 10 retries")


@pytest.mark.parametrize("visits", [2, 10])
def test_visits_of_one_person_at_the_same_moment_apply_the_deductible_and_the_cap_once(world, visits):
    p = world.add_person(personal_fen=30_000)
    # Two visits cross the deductible between them; ten also reach the annual cap.
    if visits == 2:
        bills = [world.bill(("A", "200.00", "2"), ("C", "10.00", "1"), offset=0),
                 world.bill(("A", "310.00", "1"), ("B", "42.52", "3"), offset=1)]
    else:
        bills = [world.bill(("A", f"{900 + 97 * i}.{i:02d}", "2"), ("B", "42.52", str(1 + i)),
                            ("C", "45.80", "1"), offset=i) for i in range(visits)]
    reqs = [world.visit(p, b) for b in bills]
    contended = []

    def settle(v):
        def go():
            try:
                return world.svc.settle(CLINIC, v)
            except Conflict as exc:
                if exc.code != "settlement_contended":
                    raise
                contended.append(v["msgid"])
                return settle_or_retry(world, v)
        return go

    results = at_once([settle(v) for v in reqs])
    errors = [r for kind, r in results if kind == "error"]
    assert errors == []
    docs = {doc["msgid"]: doc for _, doc in results}
    assert all(doc["replayed"] is False for doc in docs.values())
    # The order the database serialised them in, and a serial replay of the same bills in it.
    # A settlement that moved nothing at all (cap reached, deductible used, account empty,
    # paid in cash) has no ledger entry and changes no state: it goes last.
    entries = [world.ledger.entry(entry_key(v)) for v in reqs]
    order = sorted(range(visits), key=lambda i: (entries[i] is None, entries[i].id if entries[i] else i))
    state = PersonState(personal_account_balance_fen=30_000)
    for i in order:
        expected = split_visit(world.policy, state, bills[i].lines)
        assert info_of(docs[reqs[i]["msgid"]]) == amounts(expected.setlinfo), f"visit {i}"
        state = expected.state_after
    got = world.figures(p)
    assert got["dedc"] == state.deductible_used_ytd_fen and got["hifp"] == state.fund_paid_ytd_fen
    assert got["personal"] == state.personal_account_balance_fen >= 0
    infos = [doc["setlinfo"] for doc in docs.values()]
    in_scope = sum(x["inscp_scp_amt"] for x in infos)
    assert sum(x["act_pay_dedc"] for x in infos) == min(DEDUCTIBLE_FEN, in_scope) == got["dedc"]
    assert sum(x["hifp_pay"] for x in infos) == got["hifp"] <= ANNUAL_CAP_FEN
    assert sum(x["acct_pay"] for x in infos) == 30_000 - got["personal"]
    if visits == 10:
        assert got["hifp"] == ANNUAL_CAP_FEN  # the cap was reached, and not passed
    assert world.ledger.trial_balance().balanced


@pytest.mark.parametrize("method", ["cash", "card"])
def test_concurrent_duplicates_of_one_settlement_settle_once(world, method):
    p = world.add_person(personal_fen=10_000, wallet_fen=200_000)
    bill = world.bill(("A", "320.00", "2"), ("B", "42.52", "4"), ("C", "45.80", "2"))
    v = world.visit(p, bill, method=method)
    if method == "card":  # the terminal presents the card once and resends the same request
        due = world.svc.presettle(CLINIC, v)["setlinfo"]["psn_cash_pay"]
        assert due > 0
        v["payment"] = world.card_payment(p, due)
    before = world.figures(p)
    results = at_once([lambda: world.svc.settle(CLINIC, dict(v))] * 10)
    errors = [r for kind, r in results if kind == "error"]
    assert errors == [], [f"{type(e).__name__}: {e}" for e in errors]
    docs = [doc for _, doc in results]
    assert len({doc["setl_id"] for doc in docs}) == 1
    assert sorted(doc["replayed"] for doc in docs) == [False] + [True] * 9
    assert len({str(doc["setlinfo"]) for doc in docs}) == 1
    with world.c.engine.connect() as conn:
        rows = conn.scalar(select(func.count()).select_from(settlements)
                           .where(settlements.c.mdtrt_id == v["mdtrt_id"]))
    assert rows == 1
    entry = world.ledger.entry(entry_key(v))
    assert entry is not None and entry.metadata["setl_id"] == docs[0]["setl_id"]
    info = docs[0]["setlinfo"]
    after = world.figures(p)
    assert after["payable"] - before["payable"] == info["medfee_sumamt"] - (
        info["psn_cash_pay"] if method == "cash" else 0)  # the money moved exactly once
    assert after["dedc"] - before["dedc"] == info["act_pay_dedc"]
    assert before["wallet"] - after["wallet"] == (info["psn_cash_pay"] if method == "card" else 0)


def test_a_cancellation_racing_a_refund_lets_exactly_one_win(world):
    p = world.add_person(personal_fen=50_000, wallet_fen=400_000)
    for round_ in range(4):
        bill = world.bill(("A", "210.00", "3"), ("B", "42.52", "4"), offset=round_)
        before = world.figures(p)
        orig = world.settle(p, bill, method="card")
        cmsg, rmsg = world.msgid(world.next()), world.msgid(world.next())
        returns = [{"feedetl_sn": "1", "cnt": "1"}]
        calls = {"cancel": partial(world.svc.cancel, CLINIC, orig["setl_id"], {"msgid": cmsg}),
                 "refund": partial(world.svc.refund, CLINIC, orig["setl_id"], {"msgid": rmsg, "returns": returns})}
        names = ["cancel", "refund"] if round_ % 2 == 0 else ["refund", "cancel"]  # who starts first varies
        results = dict(zip(names, at_once([calls[n] for n in names]), strict=True))
        ok = [name for name, (kind, _) in results.items() if kind == "ok"]
        assert len(ok) == 1, results
        loser = "refund" if ok == ["cancel"] else "cancel"
        exc = results[loser][1]
        assert isinstance(exc, Conflict) and exc.code == "already_cancelled", repr(exc)
        after = world.figures(p)
        with world.c.engine.connect() as conn:
            rows = conn.execute(select(settlements).where(settlements.c.original_setl_id == orig["setl_id"])).all()
        if ok == ["cancel"]:
            assert after == before  # everything restored
            assert [r.kind for r in rows] == ["cancellation"]
        else:
            doc = results["refund"][1]
            o = orig["setlinfo"]
            without = PersonState(deductible_used_ytd_fen=before["dedc"], fund_paid_ytd_fen=before["hifp"],
                                  personal_account_balance_fen=before["personal"])
            new = split_visit(world.policy, without, remaining_lines(bill.lines, {"1": Decimal(1)}))
            assert info_of(doc) == amounts(new.setlinfo)
            assert after["pooled"] == before["pooled"] - new.setlinfo.hifp_pay
            assert doc["refund"]["hifp_pay"] == o["hifp_pay"] - new.setlinfo.hifp_pay
            assert after["dedc"] == before["dedc"] + new.setlinfo.act_pay_dedc
            assert sorted(r.kind for r in rows) == ["cancellation", "settlement"]
        # The winner's repeat replays; the loser's repeat is refused again.
        assert calls[ok[0]]()["replayed"] is True
        with pytest.raises(Conflict):
            calls[loser]()
    assert world.ledger.trial_balance().balanced


def test_duplicate_cancellations_racing_cancel_once(world):
    p = world.add_person(personal_fen=5_000, wallet_fen=100_000)
    before = world.snapshot()
    orig = world.settle(p, world.bill(("A", "150.00", "2"), ("C", "45.80", "1")), method="card")
    cmsg = world.msgid(world.next())
    same = at_once([lambda: world.svc.cancel(CLINIC, orig["setl_id"], {"msgid": cmsg})] * 5)
    assert all(kind == "ok" for kind, _ in same), [repr(r) for kind, r in same if kind == "error"]
    assert len({doc["setl_id"] for _, doc in same}) == 1
    assert sorted(doc["replayed"] for _, doc in same) == [False] + [True] * 4
    assert same_nets(before, world.snapshot()) == []  # restored, once
    # Different msgids racing: one cancellation, the others refused.
    orig2 = world.settle(p, world.bill(("A", "150.00", "1")), method="card")
    msgs = [world.msgid(world.next()) for _ in range(5)]
    results = at_once([lambda m=m: world.svc.cancel(CLINIC, orig2["setl_id"], {"msgid": m}) for m in msgs])
    ok = [r for kind, r in results if kind == "ok"]
    refused = [r for kind, r in results if kind == "error"]
    assert len(ok) == 1 and all(isinstance(e, DomainError) and e.code == "already_cancelled" for e in refused)
    assert orig2["setlinfo"]["psn_cash_pay"] > 0
    assert world.net(chart.wallet_account(p.pan)) == 100_000  # both paid back, each exactly once


def test_one_cryptogram_presented_for_several_visits_at_once_pays_once(world, monkeypatch):
    """A card's ATC is accepted in the transaction that posts the payment: when one ARQC is
    replayed for other visits at the same moment, every copy passes the read-time ATC check,
    yet exactly one posts; the others are refused ``atc_replayed`` and move nothing."""
    import settlement.service

    monkeypatch.setattr(settlement.service, "DUPLICATE_WAIT_S", 0.2)  # no copy of the same visit is in flight
    people = [world.add_person(personal_fen=0, wallet_fen=100_000) for _ in range(2)]
    p = people[0]
    bill = world.bill(("C", "45.80", "1"))
    visits = [world.visit(p, bill, method="card") for _ in range(6)]
    payment = world.card_payment(p, 4_580)
    for v in visits:
        v["payment"] = payment
    results = at_once([partial(world.svc.settle, CLINIC, v) for v in visits])
    ok = [r for kind, r in results if kind == "ok"]
    refused = [r for kind, r in results if kind == "error"]
    assert len(ok) == 1, [repr(r) for r in refused]
    assert all(isinstance(e, DomainError) and e.code == "atc_replayed" for e in refused), [repr(e) for e in refused]
    assert world.net(chart.wallet_account(p.pan)) == 100_000 - 4_580
    assert world.c.cards.card(p.pan).last_atc == payment["atc"]
    with world.c.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(settlements)).scalar() == 1
    # The card goes on: its next cryptogram pays, and a visit of another person settles alongside.
    nxt = world.visit(p, bill, method="card")
    nxt["payment"] = world.card_payment(p, 4_580)
    other = world.visit(people[1], bill, method="card")
    other["payment"] = world.card_payment(people[1], 4_580)
    both = at_once([partial(world.svc.settle, CLINIC, nxt), partial(world.svc.settle, CLINIC, other)])
    assert [kind for kind, _ in both] == ["ok", "ok"], both
    assert world.ledger.trial_balance().balanced


def test_a_declined_card_payment_still_spends_its_counter(world):
    """Declined for funds: nothing posts, yet the ATC is spent, so the cryptogram cannot pay later."""
    p = world.add_person(personal_fen=0, wallet_fen=1_000)
    v = world.visit(p, world.bill(("C", "45.80", "1")), method="card")
    v["payment"] = world.card_payment(p, 4_580)
    with pytest.raises(DomainError) as exc:
        world.svc.settle(CLINIC, v)
    assert exc.value.code == "insufficient_funds"
    assert world.c.cards.card(p.pan).last_atc == v["payment"]["atc"]
    world.recharge(p, 10_000)
    again = dict(v, msgid=world.msgid(world.next()))
    with pytest.raises(DomainError) as exc:
        world.svc.settle(CLINIC, again)
    assert exc.value.code == "atc_replayed"
    assert world.net(chart.wallet_account(p.pan)) == 11_000
