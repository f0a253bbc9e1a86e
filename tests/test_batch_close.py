"""A terminal's batch close, and how the day close re-checks it (SQLite and PostgreSQL).

A batch close compares the terminal's own counts and totals with the engine's figures for that
terminal and business day and stores the result; the day close compares every stored batch
close again with what the engine booked for that terminal and day when the day closed, so a
booking accepted after the batch close is reported as a discrepancy. A batch close is only
accepted for the open business day: a day the engine never opened (in the future, or long
before its first day) is refused, and so is a closed one.
"""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select

from ledger.errors import Conflict, Invalid
from terminals.schema import batch_closes
from tests.test_settlement_flows import CLINIC, OTHER_CLINIC, make_world


@pytest.fixture
def world(db_url, tmp_path):
    with make_world(db_url, tmp_path) as w:
        reg = w.c.registry
        for ctx in (CLINIC, OTHER_CLINIC):
            reg.add_org(code=ctx.org_code, kind="clinic", name=f"clinic {ctx.org_code}", hospital_tier=2)
            reg.enrol(terminal_id=ctx.terminal_id, org_code=ctx.org_code,
                      public_key=Ed25519PrivateKey.generate().public_key())
        yield w


def settle_cash(world, n: int, ctx=OTHER_CLINIC) -> None:
    p = world.add_person(personal_fen=0)
    for _ in range(n):
        world.settle(p, world.bill(("C", "10.00", "1")), ctx=ctx)


def engine_figures(world, ctx=OTHER_CLINIC) -> dict:
    """The batch report a terminal sends when its figures are exactly the engine's."""
    day = world.c.days.current()
    return dict(world.c.closer.computed_batch(ctx.terminal_id, day), business_date=day.isoformat())


def stored_closes(world) -> int:
    with world.c.engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(batch_closes))


def test_bookings_after_a_balanced_batch_close_are_a_discrepancy_at_the_day_close(world, tmp_path):
    settle_cash(world, 6)
    report = engine_figures(world)
    assert report["settlements"]["count"] == 6
    assert world.c.closer.close_batch(OTHER_CLINIC, report)["result"] == "balanced"
    settle_cash(world, 3)  # the same terminal goes on booking on the same business day (accepted)

    day = world.c.closer.close_day(tmp_path / "report")
    assert day["batches"] == {OTHER_CLINIC.terminal_id: "out_of_balance"}
    [found] = [d for d in day["discrepancies"] if d.get("terminal_id") == OTHER_CLINIC.terminal_id]
    assert found["kind"] == "batch_out_of_balance"
    assert "settlements.count: terminal 6 engine 9" in found["detail"]
    assert found["detail"].endswith("(the terminal booked after its batch close)")
    # The same batch close sent again still answers what was decided when it was made.
    again = world.c.closer.close_batch(OTHER_CLINIC, report)
    assert again["replayed"] and again["result"] == "balanced"


def test_a_batch_close_that_still_agrees_at_the_day_close_is_clean(world, tmp_path):
    settle_cash(world, 2)
    settle_cash(world, 1, ctx=CLINIC)
    for ctx in (CLINIC, OTHER_CLINIC):
        assert world.c.closer.close_batch(ctx, engine_figures(world, ctx))["result"] == "balanced"
    day = world.c.closer.close_day(tmp_path / "report")
    assert day["batches"] == {CLINIC.terminal_id: "balanced", OTHER_CLINIC.terminal_id: "balanced"}
    assert day["discrepancies"] == []


def test_a_batch_out_of_balance_when_closed_is_reported_with_the_day_close_figures(world, tmp_path):
    settle_cash(world, 2)
    report = engine_figures(world)
    report["settlements"] = dict(report["settlements"], count=1)
    assert world.c.closer.close_batch(OTHER_CLINIC, report)["result"] == "out_of_balance"
    day = world.c.closer.close_day(tmp_path / "report")
    assert day["batches"] == {OTHER_CLINIC.terminal_id: "out_of_balance"}
    [found] = [d for d in day["discrepancies"] if d.get("terminal_id") == OTHER_CLINIC.terminal_id]
    assert found["detail"] == "settlements.count: terminal 1 engine 2"  # nothing booked after it


@pytest.mark.parametrize("date", ["2099-01-01", "2000-01-01", "next day"])
def test_a_batch_close_for_a_day_the_engine_never_opened_is_refused(world, date):
    settle_cash(world, 1)
    open_day = world.c.days.current()
    if date == "next day":
        date = (open_day + dt.timedelta(days=1)).isoformat()
    report = dict(engine_figures(world), business_date=date)
    with pytest.raises(Invalid) as exc:
        world.c.closer.close_batch(OTHER_CLINIC, report)
    assert exc.value.code == "business_day_unknown"
    assert date in exc.value.detail and open_day.isoformat() in exc.value.detail
    assert stored_closes(world) == 0
    assert world.c.closer.close_batch(OTHER_CLINIC, engine_figures(world))["result"] == "balanced"


def test_a_batch_close_for_a_closed_day_is_refused_unless_it_was_made_before(world, tmp_path):
    settle_cash(world, 1)
    settle_cash(world, 1, ctx=CLINIC)
    made = engine_figures(world, CLINIC)
    late = engine_figures(world, OTHER_CLINIC)
    world.c.closer.close_batch(CLINIC, made)
    world.c.closer.close_day(tmp_path / "report")
    with pytest.raises(Conflict) as exc:
        world.c.closer.close_batch(OTHER_CLINIC, late)
    assert exc.value.code == "business_day_closed"
    assert world.c.closer.close_batch(CLINIC, made)["replayed"]  # the one made in time answers again


@pytest.mark.parametrize("same", [True, False])
def test_two_closes_of_one_batch_at_once_answer_the_stored_one(world, monkeypatch, same):
    """The same terminal closes the same batch twice at once (a resend): the second insert
    meets the first one's row. It answers that close again (replayed), or batch_already_closed
    when the two carried other figures; never a 500 (the unique index used to surface)."""
    settle_cash(world, 2)
    figures = engine_figures(world)
    other = dict(figures, settlements=dict(figures["settlements"], count=figures["settlements"]["count"] + 1))
    closer = world.c.closer
    real = closer.computed_batch
    calls: list = []

    def racing(terminal_id, day):
        if not calls:  # the concurrent copy stores its close between our look and our insert
            calls.append(None)
            calls[0] = closer.close_batch(OTHER_CLINIC, figures if same else other)
        return real(terminal_id, day)

    monkeypatch.setattr(closer, "computed_batch", racing)
    if same:
        answer = closer.close_batch(OTHER_CLINIC, figures)
        assert answer["replayed"] and answer["result"] == calls[0]["result"] == "balanced"
    else:
        with pytest.raises(Conflict) as exc:
            closer.close_batch(OTHER_CLINIC, figures)
        assert exc.value.code == "batch_already_closed"
    assert stored_closes(world) == 1
