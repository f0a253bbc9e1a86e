"""Medical settlement flows at the service level (no HTTP), on SQLite and on PostgreSQL.

The services are called directly on a bootstrapped :class:`~api.bootstrap.Container` whose clock
is a :class:`FakeClock`, so that a test can stand at 23:59 on New Year's Eve in Shanghai.
Covered: pre-settlement moves nothing; settlement is idempotent by (clinic, mdtrt_id,
chrg_bchno) and a reused msgid is a conflict; the query by msgid after a lost answer;
cancellation restores every balance and accumulator exactly, once; a partial refund gives each
payer exactly its difference (computed from the state without the original); the insurance
year is the local (Asia/Shanghai) year; and a property test drives random settle / cancel /
refund sequences for one person against an independent model (``Model``: applies
``split_visit``'s ``state_after`` and reverses it), comparing accumulators and balances after
every step.

Helpers here (:class:`World`, :class:`Model`, :func:`make_world`) are also used by
``tests/test_settlement_concurrency.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import itertools
import random
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.bootstrap import Container, bootstrap
from api.settings import Settings
from card.identity import birth_date_of, synthetic_pan, synthetic_sfz
from ledger.errors import Conflict, Invalid, NotFound, Rejected
from settlement import chart
from settlement.catalogue import CatalogueItem, load_catalogue
from settlement.service import TerminalContext
from settlement.split import BillLine, PersonState, SetlInfo, split_visit
from simulators.cards import SimulatedCard
from simulators.day import ensure_catalogue

SHANGHAI = ZoneInfo("Asia/Shanghai")
UTC = dt.timezone.utc
CLINIC = TerminalContext("TC000001", "H33030200009", "clinic", 2)
OTHER_CLINIC = TerminalContext("TC000002", "H33030200010", "clinic", 2)
CHANNEL = TerminalContext("TH000001", "CH0000000009", "channel")
#: test-policy-P, employee 310, in service, tier 2, general outpatient 11 (the shared vector's row)
DEDUCTIBLE_FEN = 60_000
ANNUAL_CAP_FEN = 1_000_000
START = dt.datetime(2026, 3, 16, 9, 30, tzinfo=SHANGHAI)
FUND_SEED_FEN = 10_000_000_000


def us_of(when: dt.datetime) -> int:
    """Microseconds since the epoch of an aware datetime, exactly."""
    return (when - dt.datetime(1970, 1, 1, tzinfo=UTC)) // dt.timedelta(microseconds=1)


class FakeClock:
    """The engine's clock in tests: µs since the epoch, set and advanced by the test."""

    def __init__(self, when: dt.datetime = START) -> None:
        self.us = us_of(when)

    def set(self, when: dt.datetime) -> None:
        self.us = us_of(when)

    def tick(self, seconds: float = 1) -> None:
        self.us += int(seconds * 1_000_000)

    def __call__(self) -> int:
        return self.us


# ------------------------------------------------------------------------------ the world
@dataclass
class Person:
    psn_no: str
    card: SimulatedCard

    @property
    def pan(self) -> str:
        return self.card.pan


@dataclass(frozen=True)
class Items:
    """Catalogue items the tests bill, by class (outpatient, basic-insurance payable)."""

    a: tuple[CatalogueItem, ...]
    b: tuple[CatalogueItem, ...]
    c: tuple[CatalogueItem, ...]
    b_ceiling: tuple[CatalogueItem, ...]

    def pick(self, kind: str, i: int = 0) -> CatalogueItem:
        pool = {"A": self.a, "B": self.b, "C": self.c, "Bx": self.b_ceiling}[kind]
        return pool[i % len(pool)]


def catalogue_items(path: Path) -> Items:
    usable = [i for i in load_catalogue(path) if i.basic_insurance_payable and not i.restricts_visits]
    return Items(
        a=tuple(i for i in usable if i.chrgitm_lv == "A" and i.pric_uplmt_amt is None),
        b=tuple(i for i in usable if i.chrgitm_lv == "B" and i.pric_uplmt_amt is None and i.selfpay_prop > 0),
        c=tuple(i for i in usable if i.chrgitm_lv == "C"),
        b_ceiling=tuple(i for i in usable if i.chrgitm_lv == "B" and i.pric_uplmt_amt is not None))


def model_line(item: CatalogueItem, sn: str, pric: str, cnt: str) -> BillLine:
    """The bill line as the insurer's catalogue classifies it (written here, independently of
    the service's own classification)."""
    lv = item.chrgitm_lv
    return BillLine(feedetl_sn=sn, chrgitm_lv=lv, pric=Decimal(pric), cnt=Decimal(cnt),
                    hilist_code=item.hilist_code, name=item.name,
                    selfpay_prop=item.selfpay_prop if lv == "B" else Decimal(0),
                    pric_uplmt_amt=item.pric_uplmt_amt if lv != "C" else None)


@dataclass
class Bill:
    """A bill as the HIS sends it (``raw``) and as the model reads it (``lines``)."""

    raw: list[dict]
    lines: list[BillLine]


class World:
    """A bootstrapped engine (services called directly), its fake clock and helpers."""

    def __init__(self, container: Container, clock: FakeClock, items: Items) -> None:
        self.c = container
        self.clock = clock
        self.items = items
        self.svc = container.settlements
        self.ledger = container.ledger
        self.policy = self.svc.policies.find("310", False, 2, "11", self.svc.insu_year())
        self._n = itertools.count(1)
        self.last_visit: dict = {}
        for fund in ("310100", "330100", "390100", "390200"):
            container.wallet.contribute(key=f"seed:{fund}", bank="bank:test", account=chart.fund_account(fund),
                                        amount_fen=FUND_SEED_FEN)

    # -- ids
    def next(self) -> int:
        return next(self._n)

    def msgid(self, n: int, ctx: TerminalContext = CLINIC) -> str:
        """NHSA message id: institution code (12) + yyyyMMddHHmmss (14) + sequence (4)."""
        stamp = dt.datetime.fromtimestamp(self.clock() / 1e6, SHANGHAI).strftime("%Y%m%d%H%M%S")
        return f"{ctx.org_code}{stamp}{n:04d}"

    # -- people and money
    def add_person(self, *, personal_fen: int = 30_000, wallet_fen: int = 0, insutype: str = "310") -> Person:
        n = self.next()
        psn_no = f"3303{n:011d}{random.Random(n).randrange(10)}"
        rng = random.Random(f"person-{psn_no}")
        certno = synthetic_sfz(rng, "330302", dt.date(1950, 1, 1) + dt.timedelta(days=n), sex="M")
        self.c.cards.register_citizen(psn_no=psn_no, certno=certno, psn_name="测试", gend="1",
                                      brdy=birth_date_of(certno), insutype=insutype, retired=False)
        pan = synthetic_pan(rng)
        self.c.cards.issue_card(psn_no=psn_no, pan=pan, pan_seq="01")
        card = SimulatedCard(issuer_mk=self.c.keys.issuer_mk, pan=pan, psn="01", card_id="0" * 32,
                             card_number="000000001", ssn=certno, name="测试")
        person = Person(psn_no, card)
        if personal_fen:
            self.contribute(person, personal_fen)
        if wallet_fen:
            self.recharge(person, wallet_fen)
        return person

    def contribute(self, person: Person, amount_fen: int) -> None:
        self.c.wallet.contribute(key=f"acct:{person.psn_no}:{self.next()}", bank="bank:test",
                                 account=chart.personal_account(person.psn_no), amount_fen=amount_fen)

    def recharge(self, person: Person, amount_fen: int) -> None:
        self.c.wallet.recharge(CHANNEL, {"msgid": f"{CHANNEL.org_code}R{self.next():012d}", "pan": person.pan,
                                         "amount_fen": amount_fen})

    # -- bills and visits
    def bill(self, *spec: tuple[str, str, str], offset: int = 0) -> Bill:
        """``spec``: (class "A" / "B" / "C" / "Bx" (B with a price ceiling), unit price yuan, quantity)."""
        raw, lines = [], []
        for i, (kind, pric, cnt) in enumerate(spec, start=1):
            item = self.items.pick(kind, i + offset)
            raw.append({"feedetl_sn": str(i), "hilist_code": item.hilist_code, "name": item.name,
                        "pric": pric, "cnt": cnt})
            lines.append(model_line(item, str(i), pric, cnt))
        return Bill(raw, lines)

    def visit(self, person: Person, bill: Bill, *, n: int | None = None, ctx: TerminalContext = CLINIC,
              method: str = "cash", **extra) -> dict:
        n = self.next() if n is None else n
        doc = {"msgid": self.msgid(n, ctx), "mdtrt_id": f"MD{n:010d}", "chrg_bchno": f"{n:010d}-01",
               "psn_no": person.psn_no, "med_type": "11", "lines": [dict(x) for x in bill.raw],
               "payment": {"method": method}}
        doc.update(extra)
        return doc

    def card_payment(self, person: Person, amount_fen: int, ctx: TerminalContext = CLINIC,
                     day: dt.date | None = None) -> dict:
        """A fresh ARQC for ``amount_fen`` dated ``day`` (default: the fake clock's local date,
        as the terminal's own calendar would say)."""
        day = self.c.days.local_date() if day is None else day
        un = random.getrandbits(32).to_bytes(4, "big")
        data, arqc = person.card.generate_ac(amount_fen, ctx.terminal_id, day, un)
        return {"method": "card", "pan": person.pan, "pan_seq": person.card.psn, "atc": data.atc,
                "arqc": arqc.hex(), "un": un.hex(), "txn_date": day.isoformat(), "amount_fen": amount_fen}

    def settle(self, person: Person, bill: Bill, *, method: str = "cash", ctx: TerminalContext = CLINIC,
               **extra) -> dict:
        """Pre-settle, present the card for the cash part when paying by card, then settle."""
        v = self.visit(person, bill, ctx=ctx, method=method, **extra)
        if method == "card":
            due = self.svc.presettle(ctx, v)["setlinfo"]["psn_cash_pay"]
            v["payment"] = self.card_payment(person, due, ctx) if due else {"method": "card", "pan": person.pan}
        self.last_visit = v
        return self.svc.settle(ctx, v)

    # -- reading the ledger
    def net(self, name: str) -> int:
        """Posted balance on the account's normal side (0 for an account not created yet)."""
        try:
            return self.ledger.balance(name).net_posted
        except KeyError:
            return 0

    def year(self) -> int:
        return dt.datetime.fromtimestamp(self.clock() / 1e6, SHANGHAI).year

    def accum(self, kind: str, person: Person, year: int | None = None) -> int:
        """An accumulator of the insurance year (outpatient fund-paid ones are ``hifp_op`` /
        ``hifmi_op``: outpatient and inpatient care have separate caps)."""
        return self.net(chart.accumulator(kind, person.psn_no, self.year() if year is None else year))

    def figures(self, person: Person, year: int | None = None) -> dict[str, int]:
        """Everything an outpatient settlement of ``person`` moves, by name."""
        return {"dedc": self.accum("dedc", person, year), "hifp": self.accum("hifp_op", person, year),
                "hifmi": self.accum("hifmi_op", person, year),
                "personal": self.net(chart.personal_account(person.psn_no)),
                "wallet": self.net(chart.wallet_account(person.pan)),
                "pooled": self.net(chart.fund_account("310100")),
                "payable": self.net(chart.clinic_payable(CLINIC.org_code))}

    def snapshot(self) -> dict[str, int]:
        """Net posted balance of every account (credits - debits)."""
        return {b.name: b.credits_posted - b.debits_posted for b in self.ledger.trial_balance().accounts}

    def pending_free_snapshot(self) -> dict:
        tb = self.ledger.trial_balance()
        return {b.name: (b.debits_posted, b.credits_posted, b.debits_pending, b.credits_pending) for b in tb.accounts}


def same_nets(before: dict[str, int], after: dict[str, int]) -> list[str]:
    """Names whose net balance differs (an account missing on one side counts as 0)."""
    return sorted(n for n in set(before) | set(after) if before.get(n, 0) != after.get(n, 0))


def nothing_moved(before: dict, after: dict) -> bool:
    """Two :meth:`World.pending_free_snapshot` agree, but for empty accounts opened in between."""
    return all(after[k] == (0, 0, 0, 0) for k in set(after) - set(before)) and set(before) <= set(after) and \
        all(after[k] == v for k, v in before.items())


def info_of(doc: dict) -> dict:
    """The amounts of a settlement document's setlinfo (ids dropped)."""
    return {k: v for k, v in doc["setlinfo"].items() if k not in ("setl_id", "mdtrt_id", "psn_no")}


def amounts(info: SetlInfo) -> dict:
    return {k: v for k, v in info.to_dict().items() if k not in ("setl_id", "mdtrt_id", "psn_no")}


@contextlib.contextmanager
def make_world(db_url: str, tmp: Path, clock: FakeClock | None = None, *, group_commit: bool = False,
               **settings_extra):
    """Bootstrap an engine on ``db_url`` with a fake clock (and any other :class:`Settings`
    given by keyword); yield a :class:`World`."""
    catalogue = tmp / "catalogue.csv"
    ensure_catalogue(catalogue, seed=42)
    clock = clock or FakeClock()
    settings_ = Settings(db_url=db_url, nonce_url="memory://", keys_file=str(tmp / "keys.json"),
                         catalogue=str(catalogue), create_keys=True, group_commit=group_commit, **settings_extra)
    container = bootstrap(settings_, clock=clock)
    try:
        yield World(container, clock, catalogue_items(catalogue))
    finally:
        container.close()


@pytest.fixture
def world(db_url, tmp_path):
    with make_world(db_url, tmp_path) as w:
        yield w


# ------------------------------------------------------------------------------ the model
@dataclass
class ModelSettlement:
    setl_id: str
    lines: list[BillLine]
    info: SetlInfo
    wallet_pay: int
    method: str = "cash"
    active: bool = True


@dataclass
class Model:
    """One person's year as the rules say it should be: accumulators, balances and settlements.

    Settling applies ``split_visit(...).state_after``; cancelling reverses the original's
    figures; a partial refund re-splits the remaining lines from the state without the
    original. Money accounts are tracked as deltas from the start."""

    policy: object
    state: PersonState
    wallet: int = 0
    pooled: int = 0
    payable: int = 0
    settlements: list[ModelSettlement] = field(default_factory=list)
    #: what the run went through (to check that a fixed sequence covers what it claims)
    peak_fund_paid: int = 0
    declined: int = 0
    refunds: int = 0

    def split(self, lines: list[BillLine], state: PersonState | None = None):
        return split_visit(self.policy, state or self.state, lines)

    def apply_settle(self, setl_id: str, lines: list[BillLine], result, wallet_pay: int, method: str) -> None:
        info = result.setlinfo
        self.state = result.state_after
        self.peak_fund_paid = max(self.peak_fund_paid, self.state.fund_paid_ytd_fen)
        self.wallet -= wallet_pay
        self.pooled -= info.hifp_pay
        self.payable += info.hifp_pay + info.hifmi_pay + info.acct_pay + wallet_pay
        self.settlements.append(ModelSettlement(setl_id, lines, info, wallet_pay, method))

    def without(self, s: ModelSettlement) -> PersonState:
        """The person's state with settlement ``s`` taken out (what a cancellation leaves)."""
        i = s.info
        return dataclasses.replace(
            self.state, deductible_used_ytd_fen=self.state.deductible_used_ytd_fen - i.act_pay_dedc,
            fund_paid_ytd_fen=self.state.fund_paid_ytd_fen - i.hifp_pay,
            serious_illness_paid_ytd_fen=self.state.serious_illness_paid_ytd_fen - i.hifmi_pay,
            personal_account_balance_fen=self.state.personal_account_balance_fen + i.acct_pay)

    def apply_cancel(self, s: ModelSettlement) -> None:
        i = s.info
        self.state = self.without(s)
        self.wallet += s.wallet_pay
        self.pooled += i.hifp_pay
        self.payable -= i.hifp_pay + i.hifmi_pay + i.acct_pay + s.wallet_pay
        s.active = False

    def active(self) -> list[ModelSettlement]:
        return [s for s in self.settlements if s.active]


def remaining_lines(lines: list[BillLine], returns: dict[str, Decimal]) -> list[BillLine]:
    """The lines left after returning units (the model's own, independent of partial_refund)."""
    out = []
    for line in lines:
        cnt = line.cnt - returns.get(line.feedetl_sn, Decimal(0))
        if cnt > 0:
            out.append(dataclasses.replace(line, cnt=cnt))
    return out


# ============================================================================== tests
def test_presettlement_moves_no_money_and_changes_no_accumulator(world):
    p = world.add_person(wallet_fen=100_000)
    world.settle(p, world.bill(("A", "120.00", "2")))  # some deductible already used this year
    bill = world.bill(("A", "250.00", "2"), ("B", "88.80", "3"), ("C", "45.80", "1"))
    v = world.visit(p, bill, method="card")
    before = world.pending_free_snapshot()
    figures = world.figures(p)
    pre = world.svc.presettle(CLINIC, v)
    assert world.svc.presettle(CLINIC, v) == pre
    assert nothing_moved(before, world.pending_free_snapshot())  # at most empty accounts were opened
    assert world.figures(p) == figures
    assert pre["msgid"] == v["msgid"] and pre["policy"] == "test-policy-P" and pre["policy_verified"] is False
    info = pre["setlinfo"]
    assert info["medfee_sumamt"] == info["fund_pay_sumamt"] + info["acct_pay"] + info["psn_cash_pay"]
    assert info["act_pay_dedc"] == min(DEDUCTIBLE_FEN - figures["dedc"], info["inscp_scp_amt"])
    # The settlement that follows books exactly what was pre-settled (nothing changed between).
    v["payment"] = world.card_payment(p, info["psn_cash_pay"])
    doc = world.svc.settle(CLINIC, v)
    assert info_of(doc) == info_of(pre)
    # A pre-settlement of an unknown person or with a bad line posts nothing either.
    with pytest.raises(NotFound):
        world.svc.presettle(CLINIC, dict(v, psn_no="330399999999999"))
    with pytest.raises(Invalid):
        world.svc.presettle(CLINIC, dict(v, lines=[dict(v["lines"][0], cnt="-1")]))


def test_settlement_is_idempotent_by_clinic_visit_and_batch(world):
    p = world.add_person(wallet_fen=100_000)
    bill = world.bill(("A", "300.00", "1"), ("B", "42.52", "4"))
    v = world.visit(p, bill)
    first = world.svc.settle(CLINIC, v)
    assert first["replayed"] is False
    snap = world.pending_free_snapshot()
    again = world.svc.settle(CLINIC, v)
    assert again["replayed"] is True and again["setl_id"] == first["setl_id"]
    assert again["setlinfo"] == first["setlinfo"] and again["lines"] == first["lines"]
    # A retry under a new message id (the terminal lost the answer and renumbered) replays too.
    assert world.svc.settle(CLINIC, dict(v, msgid=world.msgid(world.next())))["setl_id"] == first["setl_id"]
    assert world.pending_free_snapshot() == snap
    entry = world.ledger.entry(f"setl:{CLINIC.org_code}:{v['mdtrt_id']}:{v['chrg_bchno']}")
    assert entry is not None and entry.metadata["setl_id"] == first["setl_id"]
    # Same (clinic, visit, batch) with another bill: a conflict, nothing posted.
    for changed in (dict(v, lines=v["lines"][:1]), dict(v, lines=[dict(v["lines"][0], cnt="2"), v["lines"][1]]),
                    dict(v, payment=world.card_payment(p, 100))):
        with pytest.raises(Conflict) as exc:
            world.svc.settle(CLINIC, changed)
        assert exc.value.code == "exists_with_different_content"
    # The msgid of this settlement reused for another visit: a conflict, nothing posted.
    other = world.visit(p, bill)
    with pytest.raises(Conflict) as exc:
        world.svc.settle(CLINIC, dict(other, msgid=v["msgid"]))
    assert exc.value.code == "msgid_reused"
    assert world.pending_free_snapshot() == snap
    # The idempotency key includes the clinic: another clinic's visit with the same ids is its own.
    elsewhere = world.svc.settle(OTHER_CLINIC, dict(v, msgid=world.msgid(world.next(), OTHER_CLINIC)))
    assert elsewhere["replayed"] is False and elsewhere["setl_id"] != first["setl_id"]
    # The same batch number of another visit is another settlement.
    assert world.svc.settle(CLINIC, dict(other))["setl_id"] not in (first["setl_id"], elsewhere["setl_id"])


def test_the_settlement_splits_on_its_own_figures_when_the_account_changed_since_presettlement(world):
    p = world.add_person(personal_fen=1_000, wallet_fen=100_000)
    v = world.visit(p, world.bill(("A", "120.00", "1"), ("C", "45.80", "1")), method="card")
    due = world.svc.presettle(CLINIC, v)["setlinfo"]["psn_cash_pay"]
    v["payment"] = world.card_payment(p, due)
    world.contribute(p, 5_000)  # the personal account changed in between
    snap = world.pending_free_snapshot()
    with pytest.raises(Rejected) as exc:
        world.svc.settle(CLINIC, v)
    assert exc.value.code == "amount_mismatch" and exc.value.status == 409
    assert exc.value.extra["amount_due_fen"] == due - 5_000
    assert nothing_moved(snap, world.pending_free_snapshot())
    v["payment"] = world.card_payment(p, due - 5_000)  # the card is presented again for the new amount
    doc = world.svc.settle(CLINIC, v)
    assert doc["setlinfo"]["acct_pay"] == 6_000 and doc["payment"]["wallet_pay_fen"] == due - 5_000


def test_a_declined_card_settlement_resent_or_queried_answers_its_decline(world, monkeypatch):
    """A card settlement the card authorised but the wallet could not pay spends the card's
    counter and records the refusal: the same message sent again (its answer was lost) gets the
    same 402 at once, never ``atc_replayed``; a query by its msgid learns the decline; the same
    msgid for another request is ``msgid_reused``; nothing moved."""
    from settlement.service import SettlementService

    p = world.add_person(personal_fen=0, wallet_fen=1_000)
    snap = world.pending_free_snapshot()
    with pytest.raises(Rejected) as first:
        world.settle(p, world.bill(("C", "45.80", "1")), method="card")
    assert first.value.code == "insufficient_funds" and first.value.status == 402
    v = world.last_visit

    def no_wait(*_args):
        raise AssertionError("a recorded decline is answered without waiting for a copy in flight")

    monkeypatch.setattr(SettlementService, "_await_duplicate", no_wait)
    with pytest.raises(Rejected) as again:
        world.svc.settle(CLINIC, v)  # the same request, the same cryptogram
    assert (again.value.code, again.value.status, again.value.detail) == ("insufficient_funds", 402,
                                                                          first.value.detail)
    with pytest.raises(Rejected) as queried:
        world.svc.query_by_msgid(CLINIC, v["msgid"])
    assert queried.value.code == "insufficient_funds" and queried.value.status == 402
    other = world.visit(p, world.bill(("C", "9.00", "1")), method="card")
    other["msgid"] = v["msgid"]
    other["payment"] = world.card_payment(p, 900)
    with pytest.raises(Conflict) as reused:
        world.svc.settle(CLINIC, other)
    assert reused.value.code == "msgid_reused"
    assert nothing_moved(snap, world.pending_free_snapshot())
    monkeypatch.undo()
    import settlement.service
    monkeypatch.setattr(settlement.service, "DUPLICATE_WAIT_S", 0.1)  # a copy in flight would have landed
    with pytest.raises(Rejected) as replayed:  # the declined cryptogram's counter is spent
        world.svc.settle(CLINIC, dict(world.visit(p, world.bill(("C", "45.80", "1")), method="card"),
                                      payment=v["payment"]))
    assert replayed.value.code == "atc_replayed"


def test_a_declining_copy_that_lost_the_race_to_a_settling_copy_answers_the_settlement(world, monkeypatch):
    """Copy A of a card settlement is refused for funds; before A records its refusal, the
    wallet is recharged and copy B of the same message settles, spending the counter. A must
    answer B's settlement (the message settled), not its own 402; no refusal is recorded."""
    import settlement.service
    from settlement import declines
    from settlement.schema import card_declines

    p = world.add_person(personal_fen=0, wallet_fen=1_000)
    v = world.visit(p, world.bill(("C", "45.80", "1")), method="card")
    due = world.svc.presettle(CLINIC, v)["setlinfo"]["psn_cash_pay"]
    v["payment"] = world.card_payment(p, due)
    real_record = declines.record
    copy_b = {}

    def b_settles_first(*args, **kwargs):
        if not copy_b:
            copy_b["doc"] = None
            world.recharge(p, 100_000)
            copy_b["doc"] = world.svc.settle(CLINIC, dict(v))
        return real_record(*args, **kwargs)

    monkeypatch.setattr(settlement.service.declines, "record", b_settles_first)
    a = world.svc.settle(CLINIC, dict(v))
    assert copy_b["doc"]["replayed"] is False and a["setl_id"] == copy_b["doc"]["setl_id"] and a["replayed"]
    assert world.svc.query_by_msgid(CLINIC, v["msgid"])["status"] == "settled"
    with world.c.engine.connect() as conn:
        assert conn.execute(select(card_declines)).all() == []


def test_a_declined_qr_settlement_resent_or_queried_answers_its_decline(world, monkeypatch):
    """A QR code is spent when it authorises; a QR settlement then refused for funds records the
    refusal too: the resend and the query answer it (not qr_code_already_used / not found)."""
    from simulators.cards import VirtualCardApp

    p = world.add_person(personal_fen=0, wallet_fen=1_000)
    app = VirtualCardApp(issuer_mk=world.c.keys.issuer_mk, pan=p.pan, psn="01", atc=500)
    v = world.visit(p, world.bill(("C", "45.80", "1")), method="qr")
    v["payment"] = {"method": "qr", "payload": app.make_qr(world.clock() // 1_000_000, random.Random(1))}
    with pytest.raises(Rejected) as first:
        world.svc.settle(CLINIC, dict(v))
    assert (first.value.code, first.value.status) == ("insufficient_funds", 402)
    with pytest.raises(Rejected) as again:
        world.svc.settle(CLINIC, dict(v))
    assert again.value.code == "insufficient_funds"
    with pytest.raises(Rejected) as queried:
        world.svc.query_by_msgid(CLINIC, v["msgid"])
    assert queried.value.code == "insufficient_funds"


def test_a_conflict_over_whose_msgid_it_is_is_not_recorded_as_a_decline(world):
    """``msgid_reused`` / ``exists_with_different_content`` belong to another request's answer:
    never recorded as this msgid's refusal (nor a transient 5xx)."""
    from ledger.errors import DomainError
    from settlement import declines

    class Unavailable(DomainError):
        status = 503

    p = world.add_person(personal_fen=0, wallet_fen=1_000)
    auth = type("Auth", (), {"pan": p.pan, "atc": 7})()
    for refusal in (Conflict("msgid_reused", "x"), Conflict("exists_with_different_content", "x"),
                    Unavailable("database_unavailable", "x")):
        assert declines.record(world.c.ledger, org_code=CLINIC.org_code, msgid="M-OWN", request_hash="h",
                               auth=auth, refusal=refusal, now_us=world.clock()) == declines.SKIPPED
    assert declines.declined(world.c.engine, CLINIC.org_code, "M-OWN", "h") is None


def test_a_card_cryptogram_replayed_for_another_visit_is_refused(world, monkeypatch):
    import settlement.service

    monkeypatch.setattr(settlement.service, "DUPLICATE_WAIT_S", 0.1)  # a copy in flight would have landed
    p = world.add_person(personal_fen=0, wallet_fen=100_000)
    first = world.settle(p, world.bill(("C", "45.80", "1")), method="card")
    payment = world.last_visit["payment"]
    other = world.visit(p, world.bill(("C", "45.80", "1")), method="card")
    snap = world.pending_free_snapshot()
    with pytest.raises(Rejected) as exc:
        world.svc.settle(CLINIC, dict(other, payment=payment))
    assert exc.value.code == "atc_replayed"
    assert nothing_moved(snap, world.pending_free_snapshot())
    assert world.svc.settle(CLINIC, world.last_visit)["setl_id"] == first["setl_id"]  # the resent original replays


def test_a_card_blocked_while_its_payment_is_in_flight_pays_nothing(world, monkeypatch):
    """The card was active when read; it is blocked before the payment commits: the counter's
    compare-and-set in the payment's own transaction refuses it, and nothing moves. The refusal
    is kept as the message's answer: the query by msgid gives it (as for any refusal after
    the card authorised)."""
    import settlement.service

    monkeypatch.setattr(settlement.service, "DUPLICATE_WAIT_S", 0.1)
    p = world.add_person(personal_fen=0, wallet_fen=100_000)
    v = world.visit(p, world.bill(("C", "45.80", "1")), method="card")
    v["payment"] = world.card_payment(p, 4_580)
    hook = world.c.cards.counter_hook

    def block_then_hook(auth):
        world.c.cards.set_status(p.pan, "blocked")
        return hook(auth)

    monkeypatch.setattr(world.c.cards, "counter_hook", block_then_hook)
    snap = world.pending_free_snapshot()
    with pytest.raises(Rejected) as exc:
        world.svc.settle(CLINIC, v)
    assert exc.value.code == "card_blocked"
    assert nothing_moved(snap, world.pending_free_snapshot())
    with pytest.raises(Rejected) as queried:
        world.svc.query_by_msgid(CLINIC, v["msgid"])
    assert queried.value.code == "card_blocked"


def test_query_by_msgid_resolves_a_lost_answer(world):
    p = world.add_person(wallet_fen=100_000)
    v = world.visit(p, world.bill(("A", "75.00", "2"), ("C", "12.00", "1")))
    # The request never arrived: the query says so, and the terminal may settle safely.
    with pytest.raises(NotFound):
        world.svc.query_by_msgid(CLINIC, v["msgid"])
    sent = world.svc.settle(CLINIC, v)  # ... and its answer was lost on the way back
    found = world.svc.query_by_msgid(CLINIC, v["msgid"])
    assert found["setl_id"] == sent["setl_id"] and found["setlinfo"] == sent["setlinfo"]
    assert found["status"] == "settled" and found["kind"] == "settlement"
    assert world.svc.get(CLINIC, sent["setl_id"])["msgid"] == v["msgid"]
    # Another clinic cannot see it.
    with pytest.raises(NotFound):
        world.svc.query_by_msgid(OTHER_CLINIC, v["msgid"])
    # A lost cancellation answer: the query by the cancellation's msgid finds it.
    cmsg = world.msgid(world.next())
    world.svc.cancel(CLINIC, sent["setl_id"], {"msgid": cmsg})
    c = world.svc.query_by_msgid(CLINIC, cmsg)
    assert c["kind"] == "cancellation" and c["original_setl_id"] == sent["setl_id"]
    assert world.svc.query_by_msgid(CLINIC, v["msgid"])["status"] == "cancelled"


@pytest.mark.parametrize("method", ["cash", "card"])
def test_cancellation_restores_every_balance_and_accumulator_exactly_once(world, method):
    p = world.add_person(personal_fen=100_000, wallet_fen=200_000)
    world.settle(p, world.bill(("A", "150.00", "2")))  # 30000 of the deductible used before
    before = world.snapshot()
    figures = world.figures(p)
    doc = world.settle(p, world.bill(("A", "400.00", "2"), ("B", "42.52", "10"), ("C", "45.80", "2")),
                       method=method)
    info = doc["setlinfo"]
    assert info["act_pay_dedc"] == DEDUCTIBLE_FEN - 30_000 and info["hifp_pay"] > 0 and info["acct_pay"] > 0
    assert (doc["payment"]["wallet_pay_fen"] > 0) == (method == "card")
    moved = world.figures(p)
    assert moved["dedc"] == DEDUCTIBLE_FEN and moved["hifp"] == figures["hifp"] + info["hifp_pay"]
    cmsg = world.msgid(world.next())
    c = world.svc.cancel(CLINIC, doc["setl_id"], {"msgid": cmsg})
    assert c["kind"] == "cancellation" and c["replayed"] is False and c["original_setl_id"] == doc["setl_id"]
    assert c["setlinfo"] == info  # the cancellation reports the amounts it reverses
    assert same_nets(before, world.snapshot()) == []  # every account, accumulators included
    assert world.figures(p) == figures
    assert world.ledger.trial_balance().balanced
    after = world.pending_free_snapshot()
    # Once: the same msgid replays the cancellation; another msgid is a conflict; nothing moves.
    again = world.svc.cancel(CLINIC, doc["setl_id"], {"msgid": cmsg})
    assert again["replayed"] is True and again["setl_id"] == c["setl_id"]
    with pytest.raises(Conflict) as exc:
        world.svc.cancel(CLINIC, doc["setl_id"], {"msgid": world.msgid(world.next())})
    assert exc.value.code == "already_cancelled"
    with pytest.raises(Conflict):
        world.svc.refund(CLINIC, doc["setl_id"], {"msgid": world.msgid(world.next()),
                                                  "returns": [{"feedetl_sn": "1", "cnt": "1"}]})
    # Re-submitting the cancelled settlement replays it: the visit is not settled again.
    replay = world.svc.settle(CLINIC, world.last_visit)
    assert replay["replayed"] is True and replay["setl_id"] == doc["setl_id"] and replay["status"] == "cancelled"
    assert world.pending_free_snapshot() == after
    # The next visit starts from the restored deductible.
    nxt = world.svc.presettle(CLINIC, world.visit(p, world.bill(("A", "400.00", "1"))))
    assert nxt["setlinfo"]["act_pay_dedc"] == DEDUCTIBLE_FEN - 30_000


def test_cancellation_refusals(world):
    p = world.add_person()
    doc = world.settle(p, world.bill(("A", "10.00", "1")))
    with pytest.raises(NotFound):
        world.svc.cancel(CLINIC, "S" + "0" * 24, {"msgid": world.msgid(world.next())})
    with pytest.raises(NotFound):  # another clinic's settlement
        world.svc.cancel(OTHER_CLINIC, doc["setl_id"], {"msgid": world.msgid(world.next(), OTHER_CLINIC)})
    with pytest.raises(Invalid):
        world.svc.cancel(CLINIC, doc["setl_id"], {})
    with pytest.raises(Conflict) as exc:  # the settlement's own msgid reused for its cancellation
        world.svc.cancel(CLINIC, doc["setl_id"], {"msgid": doc["msgid"]})
    assert exc.value.code == "msgid_reused"
    assert world.svc.get(CLINIC, doc["setl_id"])["status"] == "settled"


def refund_expectation(world: World, state_without: PersonState, remaining: list[BillLine], orig: dict):
    new = split_visit(world.policy, state_without, remaining)
    o = orig["setlinfo"]
    return new, {"hifp_pay": o["hifp_pay"] - new.setlinfo.hifp_pay, "acct_pay": o["acct_pay"] - new.setlinfo.acct_pay,
                 "psn_cash_pay": o["psn_cash_pay"] - new.setlinfo.psn_cash_pay}


def test_partial_refund_gives_each_payer_exactly_its_difference(world):
    p = world.add_person(personal_fen=60_000, wallet_fen=300_000)
    world.settle(p, world.bill(("A", "200.00", "2")))  # 40000 of the deductible used before
    bill = world.bill(("A", "300.00", "1"), ("B", "42.52", "10"), ("A", "5.61", "20"), ("C", "97.90", "2"))
    orig = world.settle(p, bill, method="card")
    o = orig["setlinfo"]
    assert o["act_pay_dedc"] == 20_000 and o["hifp_pay"] > 0 and o["acct_pay"] > 0 and o["psn_cash_pay"] > 0
    before = world.figures(p)
    # The state without the original = the state now with the original's figures taken out.
    without = PersonState(deductible_used_ytd_fen=before["dedc"] - o["act_pay_dedc"],
                          fund_paid_ytd_fen=before["hifp"] - o["hifp_pay"],
                          personal_account_balance_fen=before["personal"] + o["acct_pay"])
    returns = {"1": Decimal(1), "3": Decimal(7)}
    remaining = remaining_lines(bill.lines, returns)
    new, diff = refund_expectation(world, without, remaining, orig)
    assert diff["hifp_pay"] > 0  # the refund comes off the top: the fund's share changes too
    msg = world.msgid(world.next())
    r = world.svc.refund(CLINIC, orig["setl_id"], {"msgid": msg, "returns": [
        {"feedetl_sn": "1", "cnt": "1"}, {"feedetl_sn": "3", "cnt": "7"}]})
    assert r["kind"] == "settlement" and r["original_setl_id"] == orig["setl_id"] and r["replayed"] is False
    assert info_of(r) == amounts(new.setlinfo)
    after = world.figures(p)
    assert after["pooled"] - before["pooled"] == diff["hifp_pay"]  # the fund gets its difference back
    assert after["personal"] - before["personal"] == diff["acct_pay"]
    assert after["wallet"] - before["wallet"] == diff["psn_cash_pay"]
    assert r["refund"]["hifp_pay"] == diff["hifp_pay"] and r["refund"]["acct_pay"] == diff["acct_pay"]
    assert r["refund"]["psn_cash_pay"] == diff["psn_cash_pay"]
    assert before["payable"] - after["payable"] == sum(diff.values()) == r["refund"]["medfee_sumamt"]
    assert after["dedc"] == without.deductible_used_ytd_fen + new.setlinfo.act_pay_dedc
    assert after["hifp"] == without.fund_paid_ytd_fen + new.setlinfo.hifp_pay
    assert r["payment"]["wallet_pay_fen"] == new.setlinfo.psn_cash_pay
    assert world.ledger.trial_balance().balanced
    # A repeat with the same msgid replays; the original is no longer settled; a second refund
    # or a cancellation of the original is a conflict.
    snap = world.pending_free_snapshot()
    again = world.svc.refund(CLINIC, orig["setl_id"], {"msgid": msg, "returns": [
        {"feedetl_sn": "1", "cnt": "1"}, {"feedetl_sn": "3", "cnt": "7"}]})
    assert again["replayed"] is True and again["setl_id"] == r["setl_id"]
    assert world.svc.get(CLINIC, orig["setl_id"])["status"] == "refunded"
    assert world.svc.get(CLINIC, r["setl_id"])["status"] == "settled"
    with pytest.raises(Conflict):
        world.svc.refund(CLINIC, orig["setl_id"], {"msgid": world.msgid(world.next()),
                                                   "returns": [{"feedetl_sn": "2", "cnt": "1"}]})
    with pytest.raises(Conflict):
        world.svc.cancel(CLINIC, orig["setl_id"], {"msgid": world.msgid(world.next())})
    assert world.pending_free_snapshot() == snap


def test_partial_refund_of_an_earlier_settlement_resplits_from_the_state_without_it(world):
    p = world.add_person(personal_fen=10_000)
    first_bill = world.bill(("A", "250.00", "2"), ("B", "42.52", "5"))
    first = world.settle(p, first_bill)  # crosses the deductible
    second = world.settle(p, world.bill(("A", "500.00", "2")))  # no deductible left: the fund pays 0.70
    before = world.figures(p)
    f = first["setlinfo"]
    without = PersonState(deductible_used_ytd_fen=before["dedc"] - f["act_pay_dedc"],
                          fund_paid_ytd_fen=before["hifp"] - f["hifp_pay"],
                          personal_account_balance_fen=before["personal"] + f["acct_pay"])
    remaining = remaining_lines(first_bill.lines, {"1": Decimal(1)})
    new, diff = refund_expectation(world, without, remaining, first)
    r = world.svc.refund(CLINIC, first["setl_id"], {"msgid": world.msgid(world.next()),
                                                    "returns": [{"feedetl_sn": "1", "cnt": "1"}]})
    assert info_of(r) == amounts(new.setlinfo)
    after = world.figures(p)
    assert after["pooled"] - before["pooled"] == diff["hifp_pay"]
    assert after["personal"] - before["personal"] == diff["acct_pay"]
    assert after["dedc"] == without.deductible_used_ytd_fen + new.setlinfo.act_pay_dedc <= DEDUCTIBLE_FEN
    assert after["hifp"] == without.fund_paid_ytd_fen + new.setlinfo.hifp_pay
    assert world.svc.get(CLINIC, second["setl_id"])["status"] == "settled"


def test_a_refund_of_everything_is_a_cancellation_and_too_many_units_are_invalid(world):
    p = world.add_person(wallet_fen=100_000)
    before = world.snapshot()
    bill = world.bill(("A", "80.00", "2"), ("B", "42.52", "3"))
    doc = world.settle(p, bill, method="card")
    moved = world.pending_free_snapshot()
    for returns in ([{"feedetl_sn": "1", "cnt": "3"}],                      # more units than billed
                    [{"feedetl_sn": "9", "cnt": "1"}],                      # no such line
                    [{"feedetl_sn": "1", "cnt": "-1"}],                     # negative
                    [{"feedetl_sn": "1", "cnt": 1.5}],                      # a float
                    [{"feedetl_sn": "1", "cnt": "1"}, {"feedetl_sn": "1", "cnt": "1"}],  # twice
                    [{"feedetl_sn": "1"}], []):
        with pytest.raises(Invalid):
            world.svc.refund(CLINIC, doc["setl_id"], {"msgid": world.msgid(world.next()), "returns": returns})
    assert world.pending_free_snapshot() == moved
    msg = world.msgid(world.next())
    r = world.svc.refund(CLINIC, doc["setl_id"], {"msgid": msg, "returns": [
        {"feedetl_sn": "1", "cnt": "2"}, {"feedetl_sn": "2", "cnt": "3"}]})
    assert r["kind"] == "cancellation" and r["original_setl_id"] == doc["setl_id"]
    assert same_nets(before, world.snapshot()) == []
    assert world.svc.refund(CLINIC, doc["setl_id"], {"msgid": msg, "returns": [
        {"feedetl_sn": "1", "cnt": "2"}, {"feedetl_sn": "2", "cnt": "3"}]})["replayed"] is True
    assert world.svc.cancel(CLINIC, doc["setl_id"], {"msgid": msg})["replayed"] is True


def test_a_settlement_produced_by_a_refund_can_be_refunded_and_cancelled_in_turn(world):
    p = world.add_person(personal_fen=40_000, wallet_fen=300_000)
    before = world.snapshot()
    bill = world.bill(("A", "300.00", "2"), ("B", "42.52", "10"), ("C", "45.80", "2"))
    orig = world.settle(p, bill, method="card")
    r1 = world.svc.refund(CLINIC, orig["setl_id"], {"msgid": world.msgid(world.next()),
                                                    "returns": [{"feedetl_sn": "2", "cnt": "4"}]})
    mid = world.figures(p)
    s1 = r1["setlinfo"]
    without = PersonState(deductible_used_ytd_fen=mid["dedc"] - s1["act_pay_dedc"],
                          fund_paid_ytd_fen=mid["hifp"] - s1["hifp_pay"],
                          personal_account_balance_fen=mid["personal"] + s1["acct_pay"])
    lines1 = remaining_lines(bill.lines, {"2": Decimal(4)})
    new, diff = refund_expectation(world, without, remaining_lines(lines1, {"1": Decimal(1)}), r1)
    r2 = world.svc.refund(CLINIC, r1["setl_id"], {"msgid": world.msgid(world.next()),
                                                  "returns": [{"feedetl_sn": "1", "cnt": "1"}]})
    assert r2["original_setl_id"] == r1["setl_id"] and info_of(r2) == amounts(new.setlinfo)
    after = world.figures(p)
    assert after["pooled"] - mid["pooled"] == diff["hifp_pay"]
    assert after["personal"] - mid["personal"] == diff["acct_pay"]
    assert after["wallet"] - mid["wallet"] == diff["psn_cash_pay"]
    # Cancelling the last settlement of the chain brings everything back to before the first.
    world.svc.cancel(CLINIC, r2["setl_id"], {"msgid": world.msgid(world.next())})
    assert same_nets(before, world.snapshot()) == []
    assert [world.svc.get(CLINIC, x["setl_id"])["status"] for x in (orig, r1, r2)] == ["refunded", "refunded", "cancelled"]
    with pytest.raises(Conflict):
        world.svc.cancel(CLINIC, r1["setl_id"], {"msgid": world.msgid(world.next())})


def test_a_refund_with_the_longest_msgid_accepted(world):
    p = world.add_person()
    doc = world.settle(p, world.bill(("A", "80.00", "2"), ("B", "42.52", "3")))
    msg = "R" * 40  # text_field accepts up to 40 characters
    r = world.svc.refund(CLINIC, doc["setl_id"], {"msgid": msg, "returns": [{"feedetl_sn": "1", "cnt": "1"}]})
    assert r["msgid"] == msg and r["kind"] == "settlement"
    assert world.svc.query_by_msgid(CLINIC, msg)["setl_id"] == r["setl_id"]


def test_a_refund_of_an_interim_inpatient_settlement_stays_interim(world):
    """An interim (中途) settlement does not close the admission; neither does its refund."""
    p = world.add_person(personal_fen=0)
    bill = world.bill(("A", "600.00", "3"), ("A", "20.00", "5"))
    doc = world.settle(p, bill, med_type="21", mid_setl_flag="1")
    year = world.year()
    assert world.accum("admissions", p, year) == 0
    adm = chart.accumulator("adm_dedc", p.psn_no, doc["mdtrt_id"])
    assert world.net(adm) == doc["setlinfo"]["act_pay_dedc"] > 0
    world.svc.refund(CLINIC, doc["setl_id"], {"msgid": world.msgid(world.next()),
                                              "returns": [{"feedetl_sn": "2", "cnt": "5"}]})
    assert world.accum("admissions", p, year) == 0  # still open: no admission was closed


def test_accumulators_are_keyed_by_the_shanghai_insurance_year(world):
    p = world.add_person(personal_fen=0)
    world.clock.set(dt.datetime(2026, 12, 31, 23, 59, tzinfo=SHANGHAI))
    late = world.settle(p, world.bill(("A", "250.00", "2")))  # 50000 in scope, all deductible
    assert late["setlinfo"]["act_pay_dedc"] == 50_000 and late["setlinfo"]["hifp_pay"] == 0
    new_year = dt.datetime(2027, 1, 1, 0, 1, tzinfo=SHANGHAI)
    assert new_year.astimezone(UTC) == dt.datetime(2026, 12, 31, 16, 1, tzinfo=UTC)  # still 2026 in UTC
    world.clock.set(new_year)
    bill = world.bill(("A", "500.00", "2"))  # 100000 in scope
    pre = world.svc.presettle(CLINIC, world.visit(p, bill))
    early = world.settle(p, bill)
    # A new insurance year: the deductible starts from zero (in 2026 only 10000 would be left).
    assert pre["setlinfo"]["act_pay_dedc"] == early["setlinfo"]["act_pay_dedc"] == DEDUCTIBLE_FEN
    assert early["setlinfo"]["hifp_pay"] == 28_000  # 0.70 of 40000
    assert world.accum("dedc", p, 2026) == 50_000 and world.accum("hifp_op", p, 2026) == 0
    assert world.accum("dedc", p, 2027) == 60_000 and world.accum("hifp_op", p, 2027) == 28_000
    # Cancelling the 2026 settlement in 2027 restores the 2026 accumulators and leaves 2027's alone.
    world.svc.cancel(CLINIC, late["setl_id"], {"msgid": world.msgid(world.next())})
    assert world.accum("dedc", p, 2026) == 0 and world.accum("dedc", p, 2027) == 60_000
    # The year turns at midnight in Shanghai, eight hours before it does in UTC.
    world.clock.set(dt.datetime(2027, 12, 31, 23, 59, 59, tzinfo=SHANGHAI))
    assert world.svc.insu_year() == 2027
    world.clock.set(dt.datetime(2027, 12, 31, 16, 0, 0, tzinfo=UTC))
    assert world.svc.insu_year() == 2028


def _year_books(tmp: Path) -> str:
    """Two policy books made from test policy P, as CITIZENCARD_POLICY names them: 2026's, and
    2027's with a general-outpatient deductible of 800.00 yuan instead of 600.00."""
    text = (Path(__file__).parents[1] / "settlement" / "policies" / "test-policy-P.toml").read_text()
    assert "last_year = 2099\n" in text and "deductible_per_year_fen = 60000 " in text
    this = text.replace("last_year = 2099\n", "last_year = 2026\n")
    (tmp / "p2026.toml").write_text(this)
    (tmp / "p2027.toml").write_text(this.replace("year = 2026\n", "year = 2027\n").replace(
        "last_year = 2026\n", "last_year = 2027\n").replace("deductible_per_year_fen = 60000 ",
                                                              "deductible_per_year_fen = 80000 "))
    return f"{tmp / 'p2026.toml'},{tmp / 'p2027.toml'}"


def test_each_insurance_year_is_settled_and_refunded_by_its_own_policy_book(db_url, tmp_path):
    """Books for 2026 and 2027 loaded together: a visit of 2027 bears 2027's deductible, and a
    partial refund in 2027 of a settlement of 2026 is re-split by 2026's book (the year's
    rules, not today's). A year no loaded book covers is refused as ``policy_year_missing``
    (503: the engine lacks the book, the request is fine), and nothing moves."""
    from ledger.errors import Unavailable

    with make_world(db_url, tmp_path, policy=_year_books(tmp_path)) as world:
        p = world.add_person(personal_fen=0)
        world.clock.set(dt.datetime(2026, 12, 31, 23, 59, tzinfo=SHANGHAI))
        late = world.settle(p, world.bill(("A", "700.00", "1"), ("A", "100.00", "1")))  # 80000 in scope
        assert late["setlinfo"]["act_pay_dedc"] == 60_000 and late["setlinfo"]["hifp_pay"] == 14_000
        world.clock.set(dt.datetime(2027, 1, 1, 0, 1, tzinfo=SHANGHAI))
        early = world.settle(p, world.bill(("A", "500.00", "2")))  # 100000 in scope, 2027's book
        assert early["setlinfo"]["act_pay_dedc"] == 80_000 and early["setlinfo"]["hifp_pay"] == 14_000
        r = world.svc.refund(CLINIC, late["setl_id"], {"msgid": world.msgid(world.next()),
                                                       "returns": [{"feedetl_sn": "2", "cnt": "1"}]})
        # 70000 remain: 2026's book takes 60000 of deductible and pays 0.70 of 10000 (2027's would
        # take all 70000 and pay nothing)
        assert r["setlinfo"]["act_pay_dedc"] == 60_000 and r["setlinfo"]["hifp_pay"] == 7_000
        assert r["refund"]["hifp_pay"] == 7_000
        assert world.accum("dedc", p, 2026) == 60_000 and world.accum("hifp_op", p, 2026) == 7_000
        assert world.accum("dedc", p, 2027) == 80_000 and world.accum("hifp_op", p, 2027) == 14_000
        world.clock.set(dt.datetime(2028, 1, 1, 9, 0, tzinfo=SHANGHAI))
        snap = world.pending_free_snapshot()
        with pytest.raises(Unavailable) as exc:
            world.settle(p, world.bill(("A", "10.00", "1")))
        assert exc.value.code == "policy_year_missing" and exc.value.status == 503
        assert "insurance year 2028" in exc.value.detail and "p2026.toml (2026)" in exc.value.detail
        assert nothing_moved(snap, world.pending_free_snapshot())


def test_a_refund_in_the_new_year_resplits_against_the_original_year(world):
    p = world.add_person(personal_fen=0)
    world.clock.set(dt.datetime(2026, 12, 31, 23, 59, tzinfo=SHANGHAI))
    bill = world.bill(("A", "500.00", "2"))
    doc = world.settle(p, bill)  # 60000 deductible, fund 28000, year 2026
    world.clock.set(dt.datetime(2027, 1, 1, 0, 1, tzinfo=SHANGHAI))
    world.settle(p, world.bill(("A", "100.00", "1")))  # 10000 of 2027's deductible
    r = world.svc.refund(CLINIC, doc["setl_id"], {"msgid": world.msgid(world.next()),
                                                  "returns": [{"feedetl_sn": "1", "cnt": "1"}]})
    assert r["setlinfo"]["act_pay_dedc"] == 50_000 and r["setlinfo"]["hifp_pay"] == 0
    assert world.accum("dedc", p, 2026) == 50_000 and world.accum("hifp_op", p, 2026) == 0
    assert world.accum("dedc", p, 2027) == 10_000


# ------------------------------------------------------------------------------ the property
LINE_PRICES = ("0.415", "5.61", "42.52", "98.00", "480.00", "1999.99", "4200.00")
KINDS = ("A", "A", "B", "C", "Bx")

bill_spec = st.lists(st.tuples(st.sampled_from(KINDS), st.sampled_from(LINE_PRICES), st.integers(1, 8)),
                     min_size=1, max_size=3)
command = st.one_of(
    st.tuples(st.just("settle"), bill_spec, st.sampled_from(["cash", "card"])),
    st.tuples(st.just("settle"), bill_spec, st.sampled_from(["cash", "card"])),
    st.tuples(st.just("cancel"), st.integers(0, 20)),
    st.tuples(st.just("refund"), st.integers(0, 20), st.integers(0, 2), st.integers(1, 8)),
    st.tuples(st.just("recharge"), st.integers(1, 500_000)),
    st.tuples(st.just("contribute"), st.integers(1, 200_000)),
)
commands = st.lists(command, min_size=3, max_size=12)


def run_commands(world: World, cmds: list[tuple]) -> Model:
    """Drive the service with ``cmds`` for one fresh person and check it against the model
    after every step: accumulators, balances, the returned splits, and the caps."""
    person = world.add_person(personal_fen=30_000, wallet_fen=100_000)
    start = world.figures(person)
    model = Model(world.policy, PersonState(personal_account_balance_fen=30_000), wallet=100_000)
    year = world.year()
    for step, cmd in enumerate(cmds):
        world.clock.tick(7)
        kind = cmd[0]
        where = f"step {step} {cmd}"
        if kind == "settle":
            _, spec, method = cmd
            bill = world.bill(*[(k, pric, str(cnt)) for k, pric, cnt in spec], offset=step)
            expected = model.split(bill.lines)
            due = expected.setlinfo.psn_cash_pay
            wallet_pay = due if method == "card" else 0
            v = world.visit(person, bill, method=method)
            pre = world.svc.presettle(CLINIC, v)
            assert info_of(pre) == amounts(expected.setlinfo), where
            if method == "card":
                v["payment"] = world.card_payment(person, due) if due else {"method": "card", "pan": person.pan}
            if wallet_pay > model.wallet:
                with pytest.raises(Rejected) as exc:
                    world.svc.settle(CLINIC, v)
                assert exc.value.code == "insufficient_funds" and exc.value.status == 402, where
                model.declined += 1
            else:
                doc = world.svc.settle(CLINIC, v)
                assert info_of(doc) == amounts(expected.setlinfo), where
                assert doc["payment"]["wallet_pay_fen"] == wallet_pay, where
                model.apply_settle(doc["setl_id"], bill.lines, expected, wallet_pay, method)
        elif kind == "cancel":
            targets = model.active()
            if not targets:
                continue
            s = targets[cmd[1] % len(targets)]
            c = world.svc.cancel(CLINIC, s.setl_id, {"msgid": world.msgid(world.next())})
            assert c["kind"] == "cancellation" and c["original_setl_id"] == s.setl_id, where
            model.apply_cancel(s)
        elif kind == "refund":
            targets = model.active()
            if not targets:
                continue
            s = targets[cmd[1] % len(targets)]
            line = s.lines[cmd[2] % len(s.lines)]
            units = min(Decimal(cmd[3]), line.cnt)
            returns = {line.feedetl_sn: units}
            remaining = remaining_lines(s.lines, returns)
            req = {"msgid": world.msgid(world.next()),
                   "returns": [{"feedetl_sn": line.feedetl_sn, "cnt": str(units)}]}
            if not remaining:
                r = world.svc.refund(CLINIC, s.setl_id, req)
                assert r["kind"] == "cancellation", where
                model.apply_cancel(s)
            else:
                without = model.without(s)
                expected = model.split(remaining, without)
                new_wallet = expected.setlinfo.psn_cash_pay if s.method in ("card", "qr") else 0
                e = expected.setlinfo
                if e.psn_cash_pay > s.info.psn_cash_pay or \
                        e.psn_cash_pay + e.acct_pay > s.info.psn_cash_pay + s.info.acct_pay:
                    # the patient would pay more (freed deductible, or a fen of a ceiling's
                    # rounding): a refund never takes money from the patient; nothing moves
                    with pytest.raises(Conflict) as refused:
                        world.svc.refund(CLINIC, s.setl_id, req)
                    assert refused.value.code == "refund_would_charge_more", where
                    continue
                if model.wallet + s.wallet_pay - new_wallet < 0:
                    with pytest.raises(Rejected):
                        world.svc.refund(CLINIC, s.setl_id, req)
                    continue
                r = world.svc.refund(CLINIC, s.setl_id, req)
                assert info_of(r) == amounts(expected.setlinfo), where
                for name in ("hifp_pay", "acct_pay", "psn_cash_pay"):
                    assert r["refund"][name] == getattr(s.info, name) - getattr(expected.setlinfo, name), where
                model.apply_cancel(s)
                model.apply_settle(r["setl_id"], remaining, expected, new_wallet, s.method)
                model.refunds += 1
        elif kind == "recharge":
            world.recharge(person, cmd[1])
            model.wallet += cmd[1]
        elif kind == "contribute":
            world.contribute(person, cmd[1])
            model.state = dataclasses.replace(
                model.state, personal_account_balance_fen=model.state.personal_account_balance_fen + cmd[1])
        # After every step: the ledger agrees with the model ...
        got = world.figures(person, year)
        want = {"dedc": model.state.deductible_used_ytd_fen, "hifp": model.state.fund_paid_ytd_fen,
                "hifmi": model.state.serious_illness_paid_ytd_fen,
                "personal": model.state.personal_account_balance_fen,
                "wallet": model.wallet, "pooled": start["pooled"] + model.pooled,
                "payable": start["payable"] + model.payable}
        assert got == want, where
        # ... and the deductible and the cap applied exactly once over the year.
        active = model.active()
        assert sum(s.info.act_pay_dedc for s in active) == got["dedc"] <= DEDUCTIBLE_FEN, where
        assert sum(s.info.hifp_pay for s in active) == got["hifp"] <= ANNUAL_CAP_FEN, where
        assert got["personal"] >= 0 and got["wallet"] >= 0, where
    assert world.ledger.trial_balance().balanced
    return model


@pytest.fixture(scope="module")
def sqlite_world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("model")
    with make_world(f"sqlite:///{tmp / 'ledger.db'}", tmp) as w:
        yield w


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cmds=commands)
def test_random_settle_cancel_refund_sequences_agree_with_the_model(sqlite_world, cmds):
    run_commands(sqlite_world, cmds)


#: One fixed sequence that crosses the deductible, reaches the annual cap, is declined for
#: funds, cancels, refunds partly (also a settlement that a refund produced) and wholly.
FIXED_SEQUENCE = [
    ("settle", [("A", "98.00", 3), ("C", "42.52", 2)], "card"),
    ("settle", [("A", "480.00", 2), ("B", "42.52", 8)], "cash"),
    ("refund", 1, 0, 1),
    ("settle", [("A", "4200.00", 8), ("Bx", "480.00", 3)], "cash"),
    ("settle", [("A", "1999.99", 8)], "card"),  # declined: the wallet is short
    ("recharge", 500_000),
    ("settle", [("A", "1999.99", 8), ("B", "5.61", 4)], "cash"),  # the annual cap
    ("cancel", 0),
    ("settle", [("A", "480.00", 2)], "card"),
    ("refund", 0, 0, 8),
    ("contribute", 50_000),
    ("settle", [("A", "42.52", 5), ("B", "98.00", 2)], "card"),
    ("refund", 1, 1, 2),
]


def test_a_fixed_sequence_agrees_with_the_model(db_url, tmp_path):
    with make_world(db_url, tmp_path) as w:
        model = run_commands(w, FIXED_SEQUENCE)
    assert model.peak_fund_paid == ANNUAL_CAP_FEN and model.declined == 1 and model.refunds >= 2
    assert len(model.active()) < len(model.settlements)


def test_a_contended_card_settlement_says_to_present_the_card_again(world, monkeypatch):
    """After the card authorised a settlement whose person kept changing under it (every attempt's
    balance assertion failed), the refusal spends the counter and is recorded, so a resend answers
    the same: its message says to present the card again under a new msgid, not to retry the same
    one. A cash settlement's says to retry with the same msgid, which then settles it."""
    import settlement.service as service_module
    from ledger.model import EntryOutcome, EntryResult

    monkeypatch.setattr(service_module, "contention_backoff", lambda _attempt: None)
    submit = world.svc.submit
    monkeypatch.setattr(world.svc, "submit", lambda entry, hook=None: EntryOutcome(
        entry.key, EntryResult.BALANCE_ASSERTION_FAILED))
    p = world.add_person(personal_fen=0, wallet_fen=100_000)
    snap = world.pending_free_snapshot()
    with pytest.raises(Conflict) as card:
        world.settle(p, world.bill(("C", "45.80", "1")), method="card")
    assert card.value.code == "settlement_contended" and "present the card again, under a new msgid" in card.value.detail
    v = world.last_visit
    with pytest.raises(Conflict) as again:
        world.svc.settle(CLINIC, v)
    assert (again.value.code, again.value.detail) == ("settlement_contended", card.value.detail)
    with pytest.raises(Conflict) as cash:
        world.settle(p, world.bill(("A", "20.00", "1")), method="cash")
    assert cash.value.code == "settlement_contended" and cash.value.detail.endswith("retry with the same msgid")
    assert nothing_moved(snap, world.pending_free_snapshot())
    monkeypatch.setattr(world.svc, "submit", submit)
    assert world.svc.settle(CLINIC, world.last_visit)["replayed"] is False  # the retry settles


def test_a_partial_refund_is_refused_when_the_years_book_was_corrected_since(db_url, tmp_path):
    """A settlement split by one text of 2026's book, and the book corrected and reloaded
    (fund ratio 0.70 -> 0.95, no deductible): a partial refund would re-split the remaining
    lines by the new rules and hand the difference of rules back (the reviewer saw the
    patient get 840.00 back for 400.00 of goods); it is refused ``policy_changed``, nothing
    moves, and the cancellation — exact whatever the book — still works. With the same text
    reloaded, refunds go on."""
    text = (Path(__file__).parents[1] / "settlement" / "policies" / "test-policy-P.toml").read_text()
    book = tmp_path / "p2026.toml"
    book.write_text(text)
    with make_world(db_url, tmp_path, policy=str(book)) as world:
        p = world.add_person(personal_fen=0)
        first = world.settle(p, world.bill(("A", "400.00", "4")))
        second = world.settle(p, world.bill(("A", "100.00", "2")))
        third = world.settle(p, world.bill(("A", "50.00", "1")))
    assert 'fund_ratio = "0.70"' in text and "deductible_per_year_fen = 60000 " in text
    book.write_text(text.replace('fund_ratio = "0.70"', 'fund_ratio = "0.95"').replace(
        "deductible_per_year_fen = 60000 ", "deductible_per_year_fen = 0 "))
    with make_world(db_url, tmp_path, policy=str(book)) as world:
        snap = world.pending_free_snapshot()
        with pytest.raises(Conflict) as exc:
            world.svc.refund(CLINIC, first["setl_id"], {"msgid": "REFUND-AFTER-CORRECTION",
                                                        "returns": [{"feedetl_sn": "1", "cnt": "1"}]})
        assert exc.value.code == "policy_changed" and "p2026.toml" in exc.value.detail
        assert nothing_moved(snap, world.pending_free_snapshot())
        cancelled = world.svc.cancel(CLINIC, third["setl_id"], {"msgid": "CANCEL-AFTER-CORRECTION"})
        assert cancelled["status"] == "cancellation"
    book.write_text(text)  # the same text as when it was split: refunds go on
    with make_world(db_url, tmp_path, policy=str(book)) as world:
        refund = world.svc.refund(CLINIC, second["setl_id"], {"msgid": "REFUND-SAME-BOOK",
                                                              "returns": [{"feedetl_sn": "1", "cnt": "1"}]})
        assert refund["refund"]["medfee_sumamt"] == 10_000
