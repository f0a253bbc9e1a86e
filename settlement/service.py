"""Point-of-care medical settlement (诊间结算): pre-settle, settle, cancel, partial refund, query.

Functional core, imperative shell: the service loads the person's accumulators and balances,
the pure :func:`settlement.split.split_visit` decides, the service posts one ledger entry.

* **Pre-settlement** (NHSA 2206/2303) returns the full split; it moves no money and changes no
  accumulator.
* **Settlement** (2207/2304) posts one journal entry: the pooled fund, the second tier, the
  personal account and — when the card or QR card pays — the wallet into the clinic's payable,
  plus memo legs that move the year-to-date accumulators. The entry carries balance
  assertions on the accumulators and the personal account as they were read; if a concurrent
  settlement of the same person changed them, the ledger refuses the entry and the service
  re-reads and re-splits (bounded), so the deductible and the caps apply exactly once.
  Idempotent by (clinic, ``mdtrt_id``, ``chrg_bchno``): a second submission returns the first
  settlement, marked ``replayed``; the same key with another bill is a conflict. What the
  decision needs (idempotency, the person, their accounts, the card) is read in one round trip
  (:mod:`settlement.reads`); the settlement row and the card's ATC are written by ledger hooks
  in the entry's own transaction, merged per group-commit batch.
* **Cancellation** (2208/2305) posts the exact reverse of the settlement's legs, linked to it,
  once; the accumulators come back exactly.
* **Partial refund**: one entry that reverses the original and posts the re-split of the
  remaining lines, so each payer gets back exactly its difference.
* **Query** (5203) by message id resolves a settlement whose answer was lost.
* **Catalogue restrictions**: a line whose item the visit may not claim (inpatients only, a
  minimum hospital level, one sex, an age range: :func:`restriction_unmet`) is settled wholly
  self-paid, the reason in its ``memo``.
* **Admissions**: the final (discharge) settlement closes an admission: no more batches of it,
  and no cancellation or partial refund of its interim batches, until the final is cancelled
  (:func:`admission_closed`; asserted by the entry, or held by :class:`AdmissionOpen` for a row
  that moves no money). Its entry records which admission of the year it closed
  (``admission_no``), and a partial refund re-splits it as that one.

Every row is booked to the open business day, checked in the row's own transaction
(:class:`settlement.days.DayOpen`); when that day began closing meanwhile the booking is made
again, transparently, on the day open now. A card authorisation is kept for that retry: the
cryptogram covers the amount and the terminal's transaction date, not the engine's business
day, and its counter was not spent by the refused transaction (it is accepted in the retried
one), so the card is not asked again; the date window (``card_txn_date_invalid``) is checked
against the engine clock's calendar date, never the business day.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import Connection, Engine, and_, bindparam, or_, select

from card.service import CardService, local_date, qr_pan
from ledger.db import HOOK_REFUSED, HookRefused, is_unique_violation
from ledger.errors import Conflict, DomainError, Invalid, NotFound, Rejected, Unavailable
from ledger.model import (AccountResult, BalanceAssertion, EntryOutcome, EntryResult, EntrySpec,
                          TransferResult, TransferSpec)
from ledger.store import BatchedHook, InsertRows, Ledger
from settlement import chart, declines
from settlement.catalogue import Catalogue, CatalogueItem
from settlement.days import BusinessDays, DayOpen, book_on_open_day, is_day_closed
from settlement.policy import INPATIENT_MED_TYPES, PolicyNotFound, PolicyShelf, PolicyYearMissing
from settlement.reads import CitizenRef, SettleContext, load_context, usable_pan
from settlement.schema import settlements
from settlement.split import (BillLine, PersonState, SplitInputError, parse_bill_lines, partial_refund,
                              split_visit)

ATTEMPTS_MAX = 6
ID_CHARS_MAX = 40
#: How long a resent request whose card counter (or QR code) was just used waits for the first
#: copy, still in flight, to commit so that it can replay it.
DUPLICATE_WAIT_S = 2.0
#: The accumulators and balances a split reads (``adm_dedc`` only for inpatient visits).
STATE_KEYS = ("dedc", "hifp", "hifmi", "admissions", "adm_dedc", "adm_final", "personal")
#: The settlement of a (clinic, visit, batch) and whatever row already uses the message id, in
#: one statement (one snapshot, one round trip; built once).
_SAME_VISIT_OR_MSGID = select(settlements).where(or_(
    and_(settlements.c.fixmedins_code == bindparam("b_org"), settlements.c.mdtrt_id == bindparam("b_mdtrt"),
         settlements.c.chrg_bchno == bindparam("b_batch"), settlements.c.kind == "settlement"),
    and_(settlements.c.fixmedins_code == bindparam("b_org"), settlements.c.msgid == bindparam("b_msgid"))))


@dataclass(frozen=True, slots=True)
class TerminalContext:
    """Who is asking: the verified terminal and its organisation (from the request signature)."""

    terminal_id: str
    org_code: str
    org_kind: str
    hospital_tier: int | None = None


@dataclass(frozen=True, slots=True)
class Visit:
    """A validated settlement request."""

    msgid: str
    mdtrt_id: str
    chrg_bchno: str
    psn_no: str
    med_type: str
    interim: bool
    lines: tuple[BillLine, ...]
    payment: dict
    request_hash: str


#: Ids the engine derives (a refund's charge batch, its cancellation's message id) contain this
#: character, which request ids may not, so they never collide with a terminal's own ids.
RESERVED_CHAR = "~"


class RowTaken(Exception):
    """A settlement row's unique key (clinic and msgid, or the visit) was taken by a concurrent
    request first; nothing of this request was written."""


def text_field(req: dict, name: str, *, chars_max: int = ID_CHARS_MAX, required: bool = True) -> str:
    """A short identifier field from a JSON request; Invalid naming the field otherwise."""
    value = req.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise Invalid("field_invalid", f"{name}: must be a non-empty string", field=name)
    if len(value) > chars_max or not value.isprintable():
        raise Invalid("field_invalid", f"{name}: at most {chars_max} printable characters", field=name)
    if RESERVED_CHAR in value:
        raise Invalid("field_invalid", f"{name}: {RESERVED_CHAR!r} is reserved for ids the engine derives",
                      field=name)
    return value


#: the setlinfo amounts a partial refund gives back, each as (original - re-split), fen
REFUND_FIELDS = ("medfee_sumamt", "hifp_pay", "hifmi_pay", "fund_pay_sumamt", "acct_pay", "psn_cash_pay")


def _add_refund(doc: dict, original_setlinfo: dict) -> dict:
    """Add to a partial refund's new settlement document what each payer got back:
    ``refund`` = {field: original - new, fen} over :data:`REFUND_FIELDS`."""
    doc["refund"] = {k: original_setlinfo[k] - doc["setlinfo"][k] for k in REFUND_FIELDS}
    return doc


def _cancellation_document(doc: dict) -> dict:
    """A cancellation's first answer, with the ``status`` its replay reads from its row."""
    doc["status"] = "cancellation"
    return doc


def fingerprint(doc: Any) -> str:
    """SHA-256 of the canonical JSON of a request's business content (idempotency check).
    Raises Invalid for text UTF-8 cannot carry (a lone surrogate, which JSON's ``\\ud800``
    escape can smuggle in)."""
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    try:
        return hashlib.sha256(text.encode()).hexdigest()
    except UnicodeEncodeError:
        raise Invalid("text_invalid", "the request holds text that is not valid Unicode (a lone surrogate)") from None


def await_replay(lookup: Callable[[], dict | None], wait_s: float = DUPLICATE_WAIT_S) -> dict | None:
    """Poll ``lookup`` (the replay of a request, or None) for up to ``wait_s`` seconds: used when
    a card counter or QR code turns out used, which a concurrent copy of the same request may
    have done; returns that copy's result, or None when none appears in time."""
    deadline = time.monotonic() + wait_s
    while True:
        replay = lookup()
        if replay is not None or time.monotonic() >= deadline:
            return replay
        time.sleep(0.02)


def contention_backoff(attempt: int) -> None:
    """Sleep a random few milliseconds (growing with ``attempt``) before re-reading a person's
    accounts, so that settlements that collided do not collide again in lock-step."""
    time.sleep(random.uniform(0, 0.004 * (attempt + 1)))


def refuse_refund_that_charges_more(original: dict, new) -> None:
    """A partial refund returns units, so the patient must not pay more than they did. The
    re-split of the remaining lines uses the person's accumulators as they are now; when those
    moved since (another settlement of the year was cancelled and freed the deductible, say),
    the remaining lines can cost the patient more than the whole bill did. A refund must not
    take the patient's money: neither more cash (from the card wallet without the card, or at
    the counter: ``psn_cash_pay``) nor more of their own in all (``acct_pay + psn_cash_pay``:
    the personal account is theirs too). Raises Conflict ``refund_would_charge_more`` with the
    fen; the clinic then cancels the settlement and settles the remaining lines anew, with the
    card presented. (The fund paying more because cap room was freed, or the personal account
    paying more of a smaller own part because it was topped up, leave the patient better off
    and stand.)"""
    cash = new.psn_cash_pay - original["psn_cash_pay"]
    own = cash + new.acct_pay - original["acct_pay"]
    if cash > 0 or own > 0:
        raise Conflict("refund_would_charge_more",
                       "the remaining lines, split on the person's accounts as they are now, would cost the "
                       f"patient {max(cash, own)} fen more than the whole bill did"
                       f"{' in cash or from the card' if cash > 0 else ' from the personal account'}; cancel the "
                       "settlement and settle the remaining lines anew")


#: NHSA gend (GB/T 2261.1) -> the catalogue restriction's sex; "0" unknown and "9" unstated meet
#: neither sex restriction
_SEX_OF_GEND = {"1": "M", "2": "F"}
_LEVEL_WORDS = {1: "一级", 2: "二级", 3: "三级"}


def completed_years(born: dt.date, on: dt.date) -> int:
    """Age in completed years on ``on`` (a birthday counts from its day; 29 February from 1 March
    in a common year)."""
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


def restriction_unmet(item: CatalogueItem, *, inpatient: bool, hospital_tier: int, gend: str,
                      age: int) -> str | None:
    """Why this visit does not meet ``item``'s payment restriction (限定支付范围), as the line's
    memo, or None when it meets it (or the item has none).

    Checked, in this order, from the hints the catalogue parsed from the restriction text
    (:func:`settlement.catalogue.parse_restriction`): inpatient only (限定就医方式:住院) against the
    visit's med_type; the minimum hospital level (限…级及以上医疗机构) against the clinic's tier;
    the sex (限女性 / 限男性) against the person's ``gend`` (a person of unknown sex meets neither);
    the age range (限…岁) against ``age`` in completed years on the settlement's local date.
    What the text restricts beyond these (indications, second-line use…) is the prescriber's to
    attest and is not checked here. An item outside its restriction is not paid by the funds:
    the caller makes the line wholly self-paid (class C, ``fulamt_ownpay_amt``)."""
    if item.inpatient_only and not inpatient:
        return "restriction not met: inpatients only (限定就医方式:住院); wholly self-paid"
    if item.hospital_level_min is not None and hospital_tier < item.hospital_level_min:
        return (f"restriction not met: {_LEVEL_WORDS.get(item.hospital_level_min, item.hospital_level_min)} "
                f"hospitals and above, this clinic is tier {hospital_tier}; wholly self-paid")
    if item.sex is not None and _SEX_OF_GEND.get(gend) != item.sex:
        who = "women" if item.sex == "F" else "men"
        return f"restriction not met: {who} only (限{'女' if item.sex == 'F' else '男'}性); wholly self-paid"
    if (item.age_min is not None and age < item.age_min) or (item.age_max is not None and age > item.age_max):
        span = (f"{item.age_min if item.age_min is not None else 0}–"
                f"{item.age_max if item.age_max is not None else ''}")
        return f"restriction not met: ages {span} only, the person is {age}; wholly self-paid"
    return None


ADMISSION_CLOSED = "admission_already_settled"
#: the ledger entry metadata of an admission's final settlement (and of its refunds' re-splits):
#: which admission of the insurance year it closed, 1 for the first
ADMISSION_NO = "admission_no"
#: the ledger entry metadata of a settlement (and of a refund's re-split): the digest of the
#: policy book that split it (:attr:`settlement.policy.PolicyBook.digest`)
POLICY_DIGEST = "policy"


def admission_closed(mdtrt_id: str, what: str = "settle more charges") -> Conflict:
    """The Conflict ``admission_already_settled`` for ``what`` (an action on a batch) of the
    admission ``mdtrt_id``, whose final (discharge) settlement is made. That settlement closes
    the admission (NHSA 2304 with mid_setl_flag "0") and its figures — the deductible of that
    admission above all — are the admission's whole: charges found afterwards are settled, and
    an interim batch is cancelled or refunded, by cancelling the final one first (2305)."""
    return Conflict(ADMISSION_CLOSED, f"admission {mdtrt_id} already has its final settlement; to {what} of it, "
                    "cancel the final settlement first")


def refuse_closed_admission(inpatient: bool, mdtrt_id: str, net: dict[str, int], *,
                            what: str = "settle more charges") -> None:
    """Raise :func:`admission_closed` when the admission ``mdtrt_id`` (an ``inpatient`` visit)
    has its final settlement (``net``: the state accounts' posted nets, ``adm_final`` > 0)."""
    if inpatient and net.get("adm_final", 0) > 0:
        raise admission_closed(mdtrt_id, what)


def is_interim_batch(orig, own_legs, admissions_account: str) -> bool:
    """Whether the settlement row ``orig`` is an interim batch of an admission: inpatient, and
    none of its ledger legs (``own_legs``: (debit, credit, amount)) counts the admission on the
    person's ``admissions_account`` (the final settlement's leg)."""
    return orig.med_type in INPATIENT_MED_TYPES and not any(
        credit == admissions_account for _debit, credit, _amount in own_legs)


class AdmissionOpen(BatchedHook):
    """A hook for a row that books an inpatient charge batch (or undoes one) without a ledger
    entry to assert with (nothing moves: all paid in cash at the counter): in the row's own
    transaction it holds the admission's ``adm_final`` accumulator ``FOR SHARE`` and refuses
    (:class:`HookRefused` ``admission_already_settled``) when its final settlement is made. A
    final settled concurrently either waits for this transaction (and follows it) or committed
    before it (and refuses it) — the guard the balance assertion gives an entry that moves
    money (:func:`refuse_closed_admission`)."""

    __slots__ = ("account",)

    def __init__(self, account: str) -> None:
        self.account = account

    merge_key = "admissions"
    pg_prepared = {"admission_open_v1": f"""
PREPARE admission_open_v1 (text[]) AS
WITH a AS MATERIALIZED (
    SELECT a.name, a.credits_posted - a.debits_posted AS n FROM ledger_accounts a
    WHERE a.name = ANY($1) ORDER BY a.id FOR SHARE
)
SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM a WHERE n > 0) THEN 0
            ELSE CAST('{HOOK_REFUSED}{ADMISSION_CLOSED} ' || (SELECT min(name) FROM a WHERE n > 0) AS int)
       END
"""}

    @classmethod
    def pg_sql(cls, hooks: list) -> str:
        from ledger.store_pg import text_array

        return f"EXECUTE admission_open_v1({text_array(sorted({h.account for h in hooks}))}); "

    @classmethod
    def run_sa(cls, conn, hooks: list) -> None:
        from ledger import schema as ls

        a = ls.accounts.c
        closed = conn.execute(select(a.name).where(a.name.in_(sorted({h.account for h in hooks})),
                                                   a.credits_posted - a.debits_posted > 0)).first()
        if closed is not None:
            raise HookRefused(f"{ADMISSION_CLOSED} {closed.name}")


def is_admission_closed(exc: BaseException) -> bool:
    """True for the :class:`HookRefused` of :class:`AdmissionOpen`."""
    return isinstance(exc, HookRefused) and str(exc).startswith(ADMISSION_CLOSED)


def _entry_legs(entry) -> list[tuple[str, str, int]]:
    """The legs (debit, credit, amount fen) a settlement's ledger ``entry`` posted for it — after
    the reversed legs, in a refund's entry (``legs_from``); none for no entry (nothing moved)."""
    if entry is None:
        return []
    start = int(entry.metadata.get("legs_from", 0))
    return [(t["debit"], t["credit"], t["amount_fen"]) for t in entry.transfers[start:]]


def undo_key(setl_id: str) -> str:
    """The ledger entry key of whatever undoes settlement ``setl_id`` — its cancellation or its
    partial refund. One key for both, so a settlement is undone at most once, whichever comes
    first: the ledger's unique entry key decides a race between a cancel and a refund."""
    return f"undo:{setl_id}"


def settlement_key(org_code: str, visit: "Visit") -> str:
    """The ledger entry key of the settlement of (clinic, visit, charge batch); the settlement
    row carries it too (unique), so it also finds the visit's settlement."""
    return f"setl:{org_code}:{visit.mdtrt_id}:{visit.chrg_bchno}"


def derived_id(prefix: str, key: str) -> str:
    """A stable id derived from an idempotency key (the same key always gives the same id)."""
    return prefix + hashlib.sha256(key.encode()).hexdigest()[:24].upper()


def _state_accounts(psn_no: str, year: int, mdtrt_id: str, inpatient: bool) -> dict[str, str]:
    """The accounts a split reads (``STATE_KEYS`` -> account name). Outpatient and inpatient
    care have separate annual caps, so the fund-paid accumulators are kept per care class
    (``op`` / ``ip``); the outpatient deductible is per year, the inpatient one per admission
    (``mdtrt_id``; an outpatient visit has no such account, which would otherwise be one more
    per visit). Known from the request alone, so they are read in the same round trip as the
    person (whose insurance type decides only the funds, which are not read)."""
    care = "ip" if inpatient else "op"
    names = {
        "dedc": chart.accumulator("dedc", psn_no, year),
        "hifp": chart.accumulator(f"hifp_{care}", psn_no, year),
        "hifmi": chart.accumulator(f"hifmi_{care}", psn_no, year),
        "admissions": chart.accumulator("admissions", psn_no, year),
        "personal": chart.personal_account(psn_no),
    }
    if inpatient:  # per admission: the deductible used, and whether its final settlement is made
        names["adm_dedc"] = chart.accumulator("adm_dedc", psn_no, mdtrt_id)
        names["adm_final"] = chart.accumulator("adm_final", psn_no, mdtrt_id)
    return names


class AccountCache:
    """Creates chart accounts on first use (idempotent) and remembers which exist."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.known: set[str] = set()

    def ensure(self, names: list[str]) -> None:
        """Create every account of ``names`` not yet known (by the chart's spec)."""
        missing = [n for n in dict.fromkeys(names) if n not in self.known]
        if not missing:
            return
        results = self.ledger.create_accounts([chart.spec_for(n) for n in missing])
        for name, result in zip(missing, results):
            if result not in (AccountResult.OK, AccountResult.EXISTS):
                raise Conflict("account_conflict", f"{name}: {result.name.lower()}")
            self.known.add(name)


class SettlementService:
    """Medical settlement over the ledger. ``submit(entry, hook)`` posts one entry (the ledger
    itself or a group committer); ``clock_us`` is the engine's clock (µs since the epoch)."""

    def __init__(self, engine: Engine, ledger: Ledger, submit: Callable[..., EntryOutcome],
                 cards: CardService, policies: PolicyShelf, catalogue: Catalogue, days: BusinessDays,
                 accounts: AccountCache, clock_us: Callable[[], int]) -> None:
        self.engine = engine
        self.ledger = ledger
        self.submit = submit
        self.cards = cards
        self.policies = policies
        self.catalogue = catalogue
        self.days = days
        self.accounts = accounts
        self.clock_us = clock_us

    # ------------------------------------------------------------------ parsing
    def parse_visit(self, req: dict) -> Visit:
        """Validate a 2206/2207 request body. Raises Invalid naming the bad field."""
        if not isinstance(req, dict):
            raise Invalid("body_invalid", "the request body must be a JSON object")
        msgid = text_field(req, "msgid")
        mdtrt_id = text_field(req, "mdtrt_id")
        chrg_bchno = text_field(req, "chrg_bchno")
        for name, value in (("mdtrt_id", mdtrt_id), ("chrg_bchno", chrg_bchno)):
            if ":" in value:  # the separator of the settlement's ledger key (settlement_key)
                raise Invalid("field_invalid", f"{name}: ':' is not allowed in a visit id", field=name)
        psn_no = text_field(req, "psn_no", chars_max=32)
        med_type = text_field(req, "med_type", chars_max=4)
        interim = req.get("mid_setl_flag", "0")
        if interim not in ("0", "1"):
            raise Invalid("field_invalid", "mid_setl_flag: must be '0' or '1'", field="mid_setl_flag")
        raw_lines = req.get("lines")
        if raw_lines is None and "feedetail" in req:
            raw_lines = self.from_2204(req["feedetail"])
        if not isinstance(raw_lines, list) or not raw_lines:
            raise Invalid("field_invalid", "lines: must be a non-empty list of fee lines", field="lines")
        lines = self.classify(raw_lines)
        payment = req.get("payment")
        if payment is None:
            payment = {"method": "cash"}
        if not isinstance(payment, dict) or payment.get("method") not in ("cash", "card", "qr"):
            raise Invalid("payment_method_unknown", "payment.method must be 'cash', 'card' or 'qr'",
                          field="payment.method")
        business = dict(mdtrt_id=mdtrt_id, chrg_bchno=chrg_bchno, psn_no=psn_no, med_type=med_type,
                        mid_setl_flag=interim, method=payment["method"],
                        lines=[[x.feedetl_sn, x.hilist_code, str(x.pric), str(x.cnt), x.chrgitm_lv] for x in lines])
        return Visit(msgid, mdtrt_id, chrg_bchno, psn_no, med_type, interim == "1", tuple(lines), payment,
                     fingerprint(business))

    @staticmethod
    def from_2204(feedetail) -> list[dict]:
        """Fee details in the NHSA 2204 field names (``med_list_codg``, decimal yuan strings,
        ``chrgitm_lv`` "01"/"02"/"03", optional ``det_item_fee_sumamt`` checked against
        pric × cnt) as request lines. Raises Invalid naming the line and field."""
        from settlement.nhsa import parse_fee_details

        if isinstance(feedetail, list):  # the class comes from the catalogue; unknown codes are self-paid
            feedetail = [dict({"chrgitm_lv": "03"}, **x) if isinstance(x, dict) else x for x in feedetail]
        try:
            lines = parse_fee_details(feedetail, where="feedetail")
        except SplitInputError as exc:
            raise Invalid("line_invalid", str(exc)) from None
        return [{"feedetl_sn": x.feedetl_sn, "hilist_code": x.hilist_code, "name": x.name, "pric": str(x.pric),
                 "cnt": str(x.cnt), "chrgitm_lv": x.chrgitm_lv} for x in lines]

    def classify(self, raw_lines: list) -> list[BillLine]:
        """Turn request lines into BillLines classified by the insurer's catalogue.

        A line whose ``hilist_code`` is in the catalogue takes its class, first self-pay ratio
        and price ceiling from it (the catalogue is authoritative). A code outside the
        catalogue is wholly self-paid (class C). A ``chrgitm_lv`` given by the HIS must be A, B
        or C. Raises Invalid naming the line and field (negative quantity, unknown class,
        amount overflow, floats)."""
        prepared = []
        for i, raw in enumerate(raw_lines):
            if not isinstance(raw, dict):
                raise Invalid("line_invalid", f"lines[{i}]: must be an object", field=f"lines[{i}]")
            given = raw.get("chrgitm_lv")
            if given is not None and given not in ("A", "B", "C"):
                raise Invalid("line_invalid", f"lines[{i}].chrgitm_lv: {given!r} is not a charge item class "
                              "(A, B or C)", field=f"lines[{i}].chrgitm_lv")
            line = {k: raw[k] for k in ("feedetl_sn", "hilist_code", "name", "pric", "cnt") if k in raw}
            for k in ("feedetl_sn", "hilist_code", "name"):
                if isinstance(line.get(k), str) and not line[k].isprintable():  # NUL, control, lone surrogate
                    raise Invalid("line_invalid", f"lines[{i}].{k}: must be printable text", field=f"lines[{i}].{k}")
            code = raw.get("hilist_code") or ""
            if not isinstance(code, str):
                raise Invalid("line_invalid", f"lines[{i}].hilist_code: must be a string", field=f"lines[{i}].hilist_code")
            if code and code in self.catalogue:
                item = self.catalogue.get(code)
                line["chrgitm_lv"] = item.chrgitm_lv
                if item.chrgitm_lv == "B":
                    line["selfpay_prop"] = str(item.selfpay_prop)
                if item.pric_uplmt_amt is not None and item.chrgitm_lv != "C":
                    line["pric_uplmt_amt"] = str(item.pric_uplmt_amt)
                if not item.basic_insurance_payable:
                    line["chrgitm_lv"] = "C"
                    line.pop("selfpay_prop", None)
                    line.pop("pric_uplmt_amt", None)
            else:
                line["chrgitm_lv"] = "C"
            prepared.append(line)
        try:
            return parse_bill_lines(prepared, where="lines")
        except SplitInputError as exc:
            raise Invalid("line_invalid", str(exc)) from None

    # ------------------------------------------------------------------ state
    def _policy(self, ctx: TerminalContext, citizen, med_type: str, year: int):
        """The policy of the person's insurance type, the clinic's tier and the visit type, in
        the book of insurance ``year`` (the visit's; for a refund, the refunded settlement's).
        Raises Unavailable ``policy_year_missing`` (503: the engine lacks that year's book, the
        request is fine), Invalid ``policy_not_found``, Rejected ``terminal_not_a_clinic``."""
        if ctx.org_kind != "clinic" or ctx.hospital_tier is None:
            raise Rejected("terminal_not_a_clinic", f"terminal {ctx.terminal_id} does not belong to a clinic")
        try:
            return self.policies.find(citizen.insutype, bool(citizen.retired), ctx.hospital_tier, med_type, year)
        except PolicyYearMissing as exc:
            raise Unavailable("policy_year_missing", str(exc)) from None
        except PolicyNotFound as exc:
            raise Invalid("policy_not_found", str(exc), field="med_type") from None

    def insu_year(self) -> int:
        """Insurance year of now: the calendar year of the local date (Asia/Shanghai)."""
        return self.local_date().year

    def local_date(self) -> dt.date:
        """The engine clock's date in Asia/Shanghai."""
        return local_date(self.clock_us())

    def _restricted(self, visit: Visit, ctx: TerminalContext, citizen: CitizenRef, policy) -> Visit:
        """``visit`` with each catalogue line whose payment restriction this visit does not meet
        (:func:`restriction_unmet`) made wholly self-paid: class C, the reason in its ``memo``.
        The request hash stays the request's (the same request is the same request)."""
        age = None
        lines = list(visit.lines)
        for i, line in enumerate(lines):
            if line.chrgitm_lv == "C" or not line.hilist_code or line.hilist_code not in self.catalogue:
                continue
            item = self.catalogue.get(line.hilist_code)
            if not item.restricts_visits:
                continue
            if age is None:
                age = completed_years(citizen.brdy, self.local_date())
            memo = restriction_unmet(item, inpatient=policy.is_inpatient, hospital_tier=ctx.hospital_tier,
                                     gend=citizen.gend, age=age)
            if memo is not None:
                lines[i] = replace(line, chrgitm_lv="C", selfpay_prop=Decimal(0), pric_uplmt_amt=None, memo=memo)
        return visit if age is None else replace(visit, lines=tuple(lines))

    def _accounts_for(self, citizen, year: int, mdtrt_id: str, policy) -> dict[str, str]:
        """The accounts a visit reads (:func:`_state_accounts`) and moves (plus the funds of
        the person's insurance type)."""
        names = _state_accounts(citizen.psn_no, year, mdtrt_id, policy.is_inpatient)
        names["pooled"] = chart.fund_account(chart.POOLED_FUND[citizen.insutype])
        names["second"] = chart.fund_account(chart.SECOND_TIER_FUND[citizen.insutype])
        return names

    def _read_state(self, names: dict[str, str]) -> tuple[PersonState, dict[str, int]]:
        """The person's state and the posted net of each account read (``STATE_KEYS`` order:
        the entry asserts exactly these)."""
        keys = [k for k in STATE_KEYS if k in names]
        return self._state_of(names, self.ledger.balances([names[k] for k in keys]))

    @staticmethod
    def _state_of(names: dict[str, str], bal: dict) -> tuple[PersonState, dict[str, int]]:
        """:meth:`_read_state` from balances already read (name -> Balance); an account missing
        from ``bal`` did not exist when read, so it stood at zero (the entry asserts that)."""
        keys = [k for k in STATE_KEYS if k in names]
        net = {}
        for k in keys:
            b = bal.get(names[k])
            net[k] = 0 if b is None else b.credits_posted - b.debits_posted
        personal = bal.get(names["personal"])
        state = PersonState(deductible_used_ytd_fen=net["dedc"], fund_paid_ytd_fen=net["hifp"],
                            personal_account_balance_fen=0 if personal is None else personal.available,
                            admissions_ytd=net["admissions"], serious_illness_paid_ytd_fen=net["hifmi"],
                            admission_deductible_used_fen=net.get("adm_dedc", 0))
        return state, net

    def _context(self, ctx: TerminalContext, visit: Visit, year: int, pan: str | None = None) -> SettleContext:
        """One round trip: idempotency, the person, their state accounts and the card
        (:func:`settlement.reads.load_context`)."""
        names = _state_accounts(visit.psn_no, year, visit.mdtrt_id, visit.med_type in INPATIENT_MED_TYPES)
        return load_context(self.engine, org_code=ctx.org_code, entry_key=settlement_key(ctx.org_code, visit),
                            msgid=visit.msgid, psn_no=visit.psn_no, account_names=list(names.values()),
                            now_us=self.clock_us(),
                            pan=pan)

    @staticmethod
    def _citizen_of(sc: SettleContext, psn_no: str):
        if sc.citizen is None:
            raise NotFound("person_not_found", f"no insured person {psn_no}")
        return sc.citizen

    # ------------------------------------------------------------------ pre-settlement
    def presettle(self, ctx: TerminalContext, req: dict) -> dict:
        """NHSA 2206/2303: the split of the bill for the person now; moves nothing."""
        visit = self.parse_visit(req)
        year = self.insu_year()
        sc = self._context(ctx, visit, year)
        citizen = self._citizen_of(sc, visit.psn_no)
        policy = self._policy(ctx, citizen, visit.med_type, year)
        names = self._accounts_for(citizen, year, visit.mdtrt_id, policy)
        self.accounts.ensure(list(names.values()))
        state, net = self._state_of(names, sc.balances)
        refuse_closed_admission(policy.is_inpatient, visit.mdtrt_id, net)
        visit = self._restricted(visit, ctx, citizen, policy)
        result = self._split(policy, state, visit)
        doc = result.to_dict()
        doc.update(msgid=visit.msgid, mdtrt_id=visit.mdtrt_id, chrg_bchno=visit.chrg_bchno,
                   psn_no=visit.psn_no, policy=policy.name, policy_verified=policy.verified,
                   business_date=self.days.current().isoformat())
        return doc

    def _split(self, policy, state: PersonState, visit: Visit, lines=None):
        try:
            return split_visit(policy, state, list(lines if lines is not None else visit.lines),
                               interim=visit.interim, mdtrt_id=visit.mdtrt_id, psn_no=visit.psn_no)
        except SplitInputError as exc:
            raise Invalid("bill_invalid", str(exc)) from None

    # ------------------------------------------------------------------ settlement
    def _existing(self, conn: Connection, **where: str):
        """The first settlement row matching ``where`` (column -> value), or None — also for a
        value no id can hold (not printable text, e.g. a NUL, which PostgreSQL text refuses)."""
        if not all(isinstance(v, str) and v.isprintable() for v in where.values()):
            return None
        q = select(settlements)
        for k, v in where.items():
            q = q.where(settlements.c[k] == v)
        return conn.execute(q).first()

    def _replay_or_conflict(self, ctx: TerminalContext, visit: Visit) -> dict | None:
        with self.engine.connect() as conn:
            rows = conn.execute(_SAME_VISIT_OR_MSGID, {"b_org": ctx.org_code, "b_mdtrt": visit.mdtrt_id,
                                                       "b_batch": visit.chrg_bchno, "b_msgid": visit.msgid}).all()
        key = (ctx.org_code, visit.mdtrt_id, visit.chrg_bchno, "settlement")
        row = next((r for r in rows if (r.fixmedins_code, r.mdtrt_id, r.chrg_bchno, r.kind) == key), None)
        if row is None:
            if rows:  # the msgid belongs to another request
                raise Conflict("msgid_reused", f"msgid {visit.msgid} was used for another request")
            return None
        if row.request_hash != visit.request_hash:
            raise Conflict("exists_with_different_content",
                           f"visit {visit.mdtrt_id} batch {visit.chrg_bchno} was settled with another bill")
        doc = self._document(row, replayed=True)
        if doc["status"] != "settled" and row.msgid != visit.msgid:
            # a new message for a visit whose settlement was undone: not a lost answer to replay
            raise Conflict("settlement_undone", f"visit {visit.mdtrt_id} batch {visit.chrg_bchno} was settled and "
                           f"then {doc['status']}; settle it again with a new chrg_bchno")
        return doc

    def settle(self, ctx: TerminalContext, req: dict) -> dict:
        """NHSA 2207/2304: settle a visit and post its one ledger entry (see module docstring).

        Returns the settlement document (``setl_id``, ``setlinfo``, ``lines``, ``payment``,
        ``replayed``). Raises Invalid, NotFound (person, card), Conflict (same visit and batch
        with another bill; msgid reused), Rejected (card checks; ``insufficient_funds`` 402;
        ``amount_mismatch`` 409 when the card authorised another amount than is now due).

        A card's or QR code's ATC is accepted in the transaction that posts the payment (a
        ledger hook, which also finds the card still active), or with the recorded refusal when
        the settlement ends without posting — declined for funds, say: the counter is spent
        either way, as on a real card. A transient failure (database unavailable) spends
        nothing, so the same request sent again completes."""
        visit = self.parse_visit(req)
        unspent: list = []  # a card or QR authorisation whose counter is not accepted yet
        authorised: list = []  # the card or QR authorisation this settlement was paid with
        try:
            doc = self._settle(ctx, visit, unspent, authorised)
        except DomainError as exc:
            auth = authorised[-1] if authorised else None
            if auth is None or auth not in unspent:
                raise  # nothing authorised, or the counter was never this request's to spend
            # The card authorised it, then it was refused: spend the counter with the refusal
            # recorded, so that a resend answers the same — or answer with a copy of this
            # request that used the counter first (its settlement, or its own refusal).
            unspent.remove(auth)

            def copy_answer() -> dict | None:
                declined = self._declined(ctx, visit)
                if declined is not None:
                    raise declined from None
                return self._replay_or_conflict(ctx, visit)

            return declines.settle_refusal(self.cards, self.ledger, org_code=ctx.org_code, msgid=visit.msgid,
                                           request_hash=visit.request_hash, auth=auth, refusal=exc,
                                           now_us=self.clock_us(), copy_answer=copy_answer)
        except Exception:
            # Any other error (the database unavailable, 503) leaves the counter unspent and
            # gives a QR code back: nothing was posted with them, so this very request sent
            # again — after its query by msgid finds nothing — completes with the same
            # cryptogram instead of answering atc_replayed or qr_code_already_used.
            for auth in unspent:
                self.cards.unclaim(auth)
            raise
        for auth in unspent:  # answered by a copy's settlement: this authorisation paid nothing
            self.cards.consume(auth)
        return doc

    def _declined(self, ctx: TerminalContext, visit: Visit) -> DomainError | None:
        """The refusal recorded for this message (see :mod:`settlement.declines`)."""
        return declines.declined(self.engine, ctx.org_code, visit.msgid, visit.request_hash)

    def _settle(self, ctx: TerminalContext, visit: Visit, unspent: list, authorised: list) -> dict:
        method = visit.payment["method"]
        year = self.insu_year()
        sc = self._context(ctx, visit, year, usable_pan(visit.payment.get("pan")) if method == "card" else None)
        if sc.taken:
            replay = self._replay_or_conflict(ctx, visit)
            if replay is not None:
                return replay
            declined = self._declined(ctx, visit)  # refused before, after the card authorised it
            if declined is not None:
                raise declined
        citizen = self._citizen_of(sc, visit.psn_no)
        policy = self._policy(ctx, citizen, visit.med_type, year)
        visit = self._restricted(visit, ctx, citizen, policy)
        names = self._accounts_for(citizen, year, visit.mdtrt_id, policy)
        payable = chart.clinic_payable(ctx.org_code)
        self.accounts.ensure(list(names.values()) + [payable, chart.MEMO_CONTRA])
        digest = self.policies.book_for(year).digest  # recorded with the entry: which book split it
        business_date = self.days.current()
        entry_key = settlement_key(ctx.org_code, visit)
        setl_id = derived_id("S", entry_key)
        auth = None
        authorised_fen = None
        for _attempt in range(ATTEMPTS_MAX):
            if _attempt:  # a concurrent settlement of this person moved their accounts: read again
                sc = self._context(ctx, visit, year)
            state, net = self._state_of(names, sc.balances)
            refuse_closed_admission(policy.is_inpatient, visit.mdtrt_id, net)
            result = self._split(policy, state, visit)
            info = result.setlinfo
            wallet_pay = info.psn_cash_pay if method in ("card", "qr") else 0
            if wallet_pay and auth is None and method == "card" and not ("arqc" in visit.payment
                                                                         and "atc" in visit.payment):
                # pre-settled with nothing to pay by card, but now there is (the accounts moved)
                raise Rejected("amount_mismatch", f"the amount due is now {wallet_pay} fen; present the card "
                               "for it", status=409, amount_due_fen=wallet_pay)
            if wallet_pay and auth is None:
                try:
                    auth = self.cards.authorise(visit.payment, amount_fen=wallet_pay, terminal_id=ctx.terminal_id,
                                                card=sc.card, consume=False)
                except Rejected as exc:
                    # A copy of this very request may have settled it meanwhile (the terminal
                    # resent it): then its counter is used and the amount due has changed.
                    if exc.code in ("atc_replayed", "qr_code_already_used"):
                        declined = self._declined(ctx, visit)  # this very request, refused before
                        if declined is not None:
                            raise declined from None
                        replay = self._await_duplicate(ctx, visit)
                    else:
                        replay = self._replay_or_conflict(ctx, visit)
                    if replay is not None:
                        return replay
                    raise
                authorised_fen = wallet_pay
                authorised.append(auth)
                unspent.append(auth)
                if auth.psn_no != citizen.psn_no:
                    raise Rejected("card_holder_mismatch", "the card does not belong to the insured person")
            elif wallet_pay and wallet_pay != authorised_fen:
                replay = self._replay_or_conflict(ctx, visit)
                if replay is not None:
                    return replay
                raise Rejected("amount_mismatch", f"the amount due changed to {wallet_pay} fen; present the card "
                               "again", status=409, amount_due_fen=wallet_pay)
            if method in ("card", "qr") and not wallet_pay:
                self._presented_card(visit.payment, sc, citizen)
            pan = auth.pan if auth else (visit.payment.get("pan") if method != "cash" else None)
            legs = self._legs(names, payable, info, wallet_pay, pan, policy.is_inpatient, visit.interim)
            row = self._row(ctx, visit, setl_id, entry_key, business_date, year, info, result, method,
                            auth.pan if auth else None, wallet_pay, kind="settlement", insutype=citizen.insutype,
                            arpc=auth.arpc_hex if auth and auth.arpc_hex else None, decoded=(decoded := {}))
            doc = self._document_from(row, replayed=False, decoded=decoded)
            doc["status"] = "settled"
            if not legs:
                try:
                    inserted = self._insert_rows([row], (AdmissionOpen(names["adm_final"]),) if policy.is_inpatient
                                                 else ())
                except HookRefused as exc:
                    if is_admission_closed(exc):  # the final was settled since it was read
                        raise admission_closed(visit.mdtrt_id) from None
                    if not is_day_closed(exc):
                        raise
                    business_date = self._day_after_refusal()
                    continue
                if inserted:
                    return doc
                replay = self._replay_or_conflict(ctx, visit)
                if replay is None:
                    raise Conflict("msgid_reused", f"msgid {visit.msgid} was used for another request")
                return replay
            entry = EntrySpec(
                key=entry_key, kind="settlement",
                transfers=tuple(TransferSpec(f"{entry_key}/{i}", d, c, a) for i, (d, c, a) in enumerate(legs)),
                metadata=({"setl_id": setl_id, "legs_from": 0, POLICY_DIGEST: digest,
                           ADMISSION_NO: state.admissions_ytd + 1}
                          if policy.is_inpatient and not visit.interim else
                          {"setl_id": setl_id, "legs_from": 0, POLICY_DIGEST: digest}),
                assertions=tuple(BalanceAssertion(names[k], n) for k, n in net.items()))
            hook = (DayOpen(business_date), InsertRows(settlements, [row]))
            try:
                outcome = self._post(entry, hook + (self.cards.counter_hook(unspent[0]),) if unspent else hook)
            except RowTaken:  # a concurrent request took this msgid (or this very visit) first
                replay = self._replay_or_conflict(ctx, visit)
                if replay is not None:
                    return replay
                raise Conflict("msgid_reused", f"msgid {visit.msgid} was used for another request") from None
            except HookRefused as exc:
                if is_day_closed(exc):  # the day began closing: nothing was written (the card's
                    business_date = self._day_after_refusal()  # counter neither); book on the next
                    continue
                # The card's counter was used meanwhile (by a copy of this request?), or the
                # card was blocked since it was read.
                unspent.clear()
                for wait in (False, True):  # a copy's answer committed already, or one in flight
                    replay = self._await_duplicate(ctx, visit) if wait else self._replay_or_conflict(ctx, visit)
                    if replay is not None:
                        return replay
                    declined = self._declined(ctx, visit)  # a copy of this request was refused meanwhile
                    if declined is not None:
                        raise declined from None
                    declines.refuse_if_blocked(self.cards, self.ledger, org_code=ctx.org_code, msgid=visit.msgid,
                                               request_hash=visit.request_hash, auth=auth, now_us=self.clock_us())
                raise Rejected("atc_replayed", f"card {auth.pan}: ATC {auth.atc} was already used") from None
            if outcome.ok:
                unspent.clear()  # accepted with the payment (or by the original this replays)
                if not outcome.replayed:
                    return doc
                replay = self._replay_or_conflict(ctx, visit)
                if replay is None:  # the entry key is another visit's: cannot happen with ids free of ':'
                    raise Conflict("exists_with_different_content", f"visit {visit.mdtrt_id} batch "
                                   f"{visit.chrg_bchno} collides with another settlement")
                return replay
            if outcome.result is EntryResult.BALANCE_ASSERTION_FAILED:
                contention_backoff(_attempt)
                continue  # a concurrent settlement of this person: re-read and re-split
            if outcome.result is EntryResult.EXISTS_WITH_DIFFERENT_CONTENT:
                replay = self._replay_or_conflict(ctx, visit)
                if replay is not None:
                    return replay
                continue
            raise self._refusal(outcome, legs)
        if auth is not None:  # the card (or QR code) authorised it: its counter is spent with this refusal
            what = "QR code" if auth.method == "qr" else "card"
            raise Conflict("settlement_contended", f"the person's accounts kept changing; the {what}'s "
                           f"authorisation is used up: present the {what} again, under a new msgid",
                           retry="new_authorisation")
        raise Conflict("settlement_contended", "the person's accounts kept changing; retry with the same msgid",
                       retry="same_msgid")

    def _presented_card(self, payment: dict, sc: SettleContext, citizen) -> None:
        """A card (``pan``) or QR code (``payload``) presented in ``payment`` for a visit that
        leaves nothing for its wallet to pay (the funds and the personal account cover it): the
        card must still be the person's and active — a blocked (lost, stolen) card identifies
        no one. Nothing is authorised, so a QR code is read, not spent; a payment that presents
        neither is left alone. Raises NotFound ``card_not_found``, Invalid
        ``qr_payload_malformed``, Rejected ``card_blocked`` or ``card_holder_mismatch``."""
        if payment.get("method") == "qr" and "payload" in payment:
            pan = qr_pan(str(payment["payload"]))
        elif "pan" in payment:
            pan = payment["pan"]
        else:
            return
        row = self.cards.active_card(str(pan), sc.card)
        if row.psn_no != citizen.psn_no:
            raise Rejected("card_holder_mismatch", "the card does not belong to the insured person")

    def _day_after_refusal(self) -> dt.date:
        """The open business day after a booking was refused because its day is no longer open
        (forgets the cached day, which another process began to close)."""
        self.days.forget()
        return self.days.current()

    def _post(self, entry: EntrySpec, hook) -> EntryOutcome:
        """Submit ``entry`` with its row hooks; a unique violation of a row (the msgid or the
        visit, inserted by a concurrent request first: the batch was rolled back, the others in
        it applied again) becomes :class:`RowTaken`."""
        try:
            return self.submit(entry, hook)
        except Exception as exc:
            if is_unique_violation(exc):
                raise RowTaken(str(exc)) from exc
            raise

    def _await_duplicate(self, ctx: TerminalContext, visit: Visit) -> dict | None:
        """The card's counter (or the QR code) was already used: if that was by a copy of this
        very request still in flight (the terminal resent it), wait for it and replay it."""
        return await_replay(lambda: self._replay_or_conflict(ctx, visit))

    def _legs(self, names: dict[str, str], payable: str, info, wallet_pay: int, pan: str | None,
              inpatient: bool, interim: bool) -> list[tuple[str, str, int]]:
        """The entry's legs (debit, credit, amount fen), zero legs left out."""
        legs = [
            (names["pooled"], payable, info.hifp_pay),
            (names["second"], payable, info.hifmi_pay),
            (names["personal"], payable, info.acct_pay),
        ]
        if wallet_pay:
            legs.append((chart.wallet_account(pan), payable, wallet_pay))
        contra = chart.MEMO_CONTRA
        if inpatient:
            legs.append((contra, names["adm_dedc"], info.act_pay_dedc))
        else:
            legs.append((contra, names["dedc"], info.act_pay_dedc))
        legs += [(contra, names["hifp"], info.hifp_pay), (contra, names["hifmi"], info.hifmi_pay)]
        if inpatient and not interim:  # the admission ends: counted once, its final settlement made
            legs.append((contra, names["admissions"], 1))
            if "adm_final" in names:
                legs.append((contra, names["adm_final"], 1))
        return [leg for leg in legs if leg[2] > 0]

    def _refusal(self, outcome: EntryOutcome, legs) -> Exception:
        if outcome.result is EntryResult.TRANSFER_FAILED and outcome.transfer_result is TransferResult.EXCEEDS_CREDITS:
            debit = legs[outcome.failed_index][0] if outcome.failed_index is not None and outcome.failed_index < len(legs) else ""
            if debit.startswith("wallet:"):
                return Rejected("insufficient_funds", "the card wallet does not hold enough for the cash part",
                                status=402)
            if debit.startswith("fund:"):
                return Rejected("fund_insufficient", f"{debit} cannot pay now", status=409)
        if outcome.result is EntryResult.ALREADY_REVERSED:
            return Conflict("already_cancelled", "the settlement was already cancelled or refunded")
        return Conflict(outcome.result.name.lower(), outcome.detail or outcome.result.name.lower())

    def _row(self, ctx: TerminalContext, visit: Visit, setl_id: str, entry_key: str, business_date: dt.date,
             year: int, info, result, method: str, pan: str | None, wallet_pay: int, *, kind: str, insutype: str,
             original: str | None = None, chrg_bchno: str | None = None, msgid: str | None = None,
             arpc: str | None = None, decoded: dict | None = None) -> dict:
        """The settlement row (column -> value; ``setlinfo`` and ``lines`` as JSON text). When
        ``decoded`` is given, it receives those two as the objects the text encodes, so that the
        answer is built without decoding what was just encoded."""
        setlinfo = info.to_dict()
        setlinfo.update(setl_id=setl_id, mdtrt_id=visit.mdtrt_id, psn_no=visit.psn_no)
        lines = [x.to_dict() for x in result.lines]
        if decoded is not None:
            decoded.update(setlinfo=setlinfo, lines=lines)
        return dict(setl_id=setl_id, fixmedins_code=ctx.org_code, mdtrt_id=visit.mdtrt_id,
                    chrg_bchno=chrg_bchno or visit.chrg_bchno, msgid=msgid or visit.msgid, psn_no=visit.psn_no,
                    terminal_id=ctx.terminal_id, insutype=insutype,
                    med_type=visit.med_type, insu_year=year, business_date=business_date, pay_method=method,
                    pan=pan, medfee_sumamt=info.medfee_sumamt, fund_pay_sumamt=info.fund_pay_sumamt,
                    hifp_pay=info.hifp_pay, acct_pay=info.acct_pay, psn_cash_pay=info.psn_cash_pay,
                    wallet_pay=wallet_pay, setlinfo=orjson.dumps(setlinfo).decode(),
                    lines=orjson.dumps(lines).decode(), request_hash=visit.request_hash,
                    entry_key=entry_key, kind=kind, original_setl_id=original, created_ts=self.clock_us(),
                    arpc=arpc)

    def _insert_rows(self, rows: list[dict], guards: tuple = ()) -> bool:
        """Insert settlement rows of an entry that moves no money (everything paid in cash at
        the counter), in a transaction that checks their business day is still open (the same
        :class:`settlement.days.DayOpen` guard as a posting's; :meth:`Ledger.run_hooks`: one
        message on PostgreSQL) and runs ``guards`` (:class:`AdmissionOpen`). Returns False when
        a concurrent duplicate inserted them first; raises :class:`HookRefused`
        (``business_day_closed``, or a guard's) when refused (nothing is written)."""
        try:
            self.ledger.run_hooks([*(DayOpen(r["business_date"]) for r in rows), *guards,
                                   InsertRows(settlements, rows)])
        except Exception as exc:
            if is_unique_violation(exc):
                return False
            raise
        return True

    def _document_from(self, row: dict, *, replayed: bool, decoded: dict | None = None) -> dict:
        """The answer for a settlement row (``decoded``: its ``setlinfo`` / ``lines`` already as
        objects, see :meth:`_row`)."""
        return {
            "setl_id": row["setl_id"], "msgid": row["msgid"], "mdtrt_id": row["mdtrt_id"],
            "chrg_bchno": row["chrg_bchno"], "psn_no": row["psn_no"], "fixmedins_code": row["fixmedins_code"],
            "business_date": row["business_date"].isoformat(), "kind": row["kind"],
            "original_setl_id": row["original_setl_id"],
            "setlinfo": decoded["setlinfo"] if decoded else json.loads(row["setlinfo"]),
            "lines": decoded["lines"] if decoded else json.loads(row["lines"]),
            "payment": {"method": row["pay_method"], "pan": row["pan"], "wallet_pay_fen": row["wallet_pay"],
                        "arpc": row.get("arpc") or ""},
            "replayed": replayed,
        }

    def _document(self, row, *, replayed: bool) -> dict:
        """The answer for a stored settlement row, with its ``status`` as of now; a partial
        refund's new settlement also carries what each payer got back (``refund``), as its
        first answer did."""
        doc = self._document_from(row._asdict(), replayed=replayed)
        with self.engine.connect() as conn:
            cancel = conn.execute(select(settlements.c.setl_id, settlements.c.kind)
                                  .where(settlements.c.original_setl_id == row.setl_id)).all()
            if row.kind == "settlement" and row.original_setl_id:  # a partial refund's re-split
                original = conn.execute(select(settlements.c.setlinfo)
                                        .where(settlements.c.setl_id == row.original_setl_id)).scalar()
                if original is not None:
                    _add_refund(doc, json.loads(original))
        if row.kind != "settlement":
            doc["status"] = row.kind
        elif not cancel:
            doc["status"] = "settled"
        else:  # undone: by a cancellation alone, or by a partial refund (a new settlement beside it)
            doc["status"] = "refunded" if any(k == "settlement" for _, k in cancel) else "cancelled"
        return doc

    # ------------------------------------------------------------------ queries
    def query_by_msgid(self, ctx: TerminalContext, msgid: str) -> dict:
        """NHSA 5203-style query by the terminal's message id: the settlement (or cancellation)
        that message produced. Raises NotFound when that message never settled anything."""
        if RESERVED_CHAR in msgid:  # an id the engine derived for its own rows, not a terminal's message
            raise NotFound("settlement_not_found", f"no settlement for msgid {msgid}")
        with self.engine.connect() as conn:
            row = self._existing(conn, fixmedins_code=ctx.org_code, msgid=msgid)
            declined = declines.find(conn, ctx.org_code, msgid) if row is None else None
        if row is None:
            if declined is not None:  # it settled nothing: it was refused, and this is why
                raise declines.refusal_from(declined)
            raise NotFound("settlement_not_found", f"no settlement for msgid {msgid}")
        return self._document(row, replayed=True)

    def get(self, ctx: TerminalContext, setl_id: str) -> dict:
        """A settlement by id (only the clinic's own)."""
        with self.engine.connect() as conn:
            row = self._existing(conn, setl_id=setl_id)
        if row is None or row.fixmedins_code != ctx.org_code:
            raise NotFound("settlement_not_found", f"no settlement {setl_id}")
        return self._document(row, replayed=True)

    # ------------------------------------------------------------------ cancellation and refund
    def _original(self, ctx: TerminalContext, setl_id: str):
        with self.engine.connect() as conn:
            row = self._existing(conn, setl_id=setl_id)
        if row is None or row.fixmedins_code != ctx.org_code or row.kind != "settlement":
            raise NotFound("settlement_not_found", f"no settlement {setl_id} at this clinic")
        return row

    def _own_legs(self, row) -> list[tuple[str, str, int]]:
        """The legs settlement ``row``'s ledger entry posted for it (:func:`_entry_legs`)."""
        return _entry_legs(self.ledger.entry(row.entry_key))

    def cancel(self, ctx: TerminalContext, setl_id: str, req: dict) -> dict:
        """NHSA 2208/2305: reverse a settlement exactly, once. Returns the cancellation document
        (``kind`` "cancellation", amounts of the original); a repeat returns it ``replayed``.
        Raises NotFound, Conflict (already refunded, or msgid reused)."""
        msgid = text_field(req if isinstance(req, dict) else {}, "msgid")
        orig = self._original(ctx, setl_id)
        key = undo_key(setl_id)
        request_hash = fingerprint({"cancel": setl_id})
        done = self._find_reversal(orig, msgid, request_hash)
        if done is not None:
            return done
        own = self._own_legs(orig)
        legs = [(c, d, a) for d, c, a in own]
        guard = self._interim_guard(orig, own, "cancel an interim batch")
        cancel_id = derived_id("C", key)

        def book(business_date: dt.date) -> dict:
            row = dict(orig._asdict())
            row.update(setl_id=cancel_id, msgid=msgid, terminal_id=ctx.terminal_id, kind="cancellation",
                       original_setl_id=setl_id, entry_key=key, business_date=business_date,
                       created_ts=self.clock_us(), request_hash=request_hash)
            if not legs:
                try:
                    if not self._insert_rows([row], tuple(AdmissionOpen(g.account) for g in guard)):
                        return self._reversal_or_msgid_reused(orig, msgid, request_hash)
                except HookRefused as exc:
                    if is_admission_closed(exc):  # the final was settled since it was read
                        raise admission_closed(orig.mdtrt_id, "cancel an interim batch") from None
                    raise
                return _cancellation_document(self._document_from(row, replayed=False))
            entry = EntrySpec(key=key, kind="reversal", reverses=orig.entry_key,
                              transfers=tuple(TransferSpec(f"{key}/{i}", d, c, a) for i, (d, c, a) in enumerate(legs)),
                              metadata={"setl_id": cancel_id, "legs_from": 0}, assertions=guard)
            try:
                outcome = self._post(entry, (DayOpen(business_date), InsertRows(settlements, [row])))
            except RowTaken:  # the msgid was taken by a concurrent request
                return self._reversal_or_msgid_reused(orig, msgid, request_hash)
            if not outcome.ok or outcome.replayed:  # a replay: a concurrent cancellation, maybe another msgid's
                done = self._find_reversal(orig, msgid, request_hash)
                if done is not None:
                    return done
                if outcome.result is EntryResult.BALANCE_ASSERTION_FAILED:  # only the guard asserts
                    raise admission_closed(orig.mdtrt_id, "cancel an interim batch")
                if not outcome.ok:
                    raise self._refusal(outcome, legs)
            return _cancellation_document(self._document_from(row, replayed=False))

        return book_on_open_day(self.days, book)

    def _same_policy_book(self, orig, entry) -> str:
        """The digest of the policy book of ``orig``'s insurance year, as loaded now. Raises
        Conflict ``policy_changed`` when ``orig`` was split by another text of that year's
        book (it was corrected and reloaded since): a partial refund re-splits the remaining
        lines and takes the difference, which is only the refund when both splits follow the
        same rules — with other ratios or deductibles the fund or the patient would be paid a
        difference of rules, not of lines. The clinic cancels (exact, whatever the book) and
        settles the remaining lines anew. A settlement recorded before digests were (or that
        posted no ``entry``: its ledger entry, or None) is not checked."""
        book = self.policies.book_for(orig.insu_year)
        split_by = entry.metadata.get(POLICY_DIGEST) if entry is not None else None
        if split_by is not None and split_by != book.digest:
            raise Conflict("policy_changed", f"settlement {orig.setl_id} was split by another text of the "
                           f"{orig.insu_year} policy book than the {book.origin} loaded now ({split_by} -> "
                           f"{book.digest}): cancel it and settle the remaining lines anew")
        return book.digest

    def _admission_ordinal(self, orig, names: dict[str, str], entry) -> int:
        """Which admission of the insurance year the final settlement ``orig`` closed (1 for the
        first), as its ledger entry's metadata records it (``admission_no``, written by the
        settlement and carried by every refund re-split of it). A partial refund re-splits the
        admission as that one (the 2nd and later admissions of a year bear a reduced
        deductible), not as the count of admissions closed by now. An entry written before
        the metadata carried it: the person's admissions accumulator as of that ``entry`` (its
        ledger entry)."""
        if ADMISSION_NO in entry.metadata:
            return int(entry.metadata[ADMISSION_NO])
        count = self.ledger.balance(names["admissions"], as_of_us=entry.ts_us)
        return max(1, count.credits_posted - count.debits_posted)

    def _interim_guard(self, orig, own_legs, what: str) -> tuple[BalanceAssertion, ...]:
        """For an interim batch of an admission (``orig`` inpatient, no admissions leg among
        its ``own_legs``): refuse (:func:`refuse_closed_admission`) when the admission has its
        final settlement, else the assertion that it still has none, for the entry that
        undoes the batch (a final settled meanwhile fails it). ``()`` for any other settlement."""
        names = _state_accounts(orig.psn_no, orig.insu_year, orig.mdtrt_id, True)
        if not is_interim_batch(orig, own_legs, names["admissions"]):
            return ()
        try:
            final = self.ledger.balance(names["adm_final"])
        except KeyError:  # never opened: no final settlement was ever posted to it
            return ()
        refuse_closed_admission(True, orig.mdtrt_id, {"adm_final": final.credits_posted - final.debits_posted},
                                what=what)
        return (BalanceAssertion(names["adm_final"], 0),)

    def _reversal_or_msgid_reused(self, orig, msgid: str, request_hash: str) -> dict:
        """After this message's reversal row could not be written: the reversal this message
        made (a concurrent copy wrote it), or Conflict ``msgid_reused`` (another request holds
        the msgid)."""
        done = self._find_reversal(orig, msgid, request_hash)
        if done is not None:
            return done
        raise Conflict("msgid_reused", f"msgid {msgid} was used for another request")

    def _find_reversal(self, orig, msgid: str, request_hash: str) -> dict | None:
        """The answer this message (``msgid``) already got for undoing ``orig`` — its
        cancellation, or its partial refund's new settlement with what each payer got back
        (``refund``) — as a replay; None when it has undone nothing. Raises Conflict
        ``msgid_reused`` when the msgid holds another request (another settlement's undoing, or
        another undoing of this one: its ``request_hash`` differs, other ``returns`` say), and
        ``already_cancelled`` when another message undid ``orig``."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(settlements).where(settlements.c.original_setl_id == orig.setl_id)
                                .order_by(settlements.c.created_ts)).all()
            other = self._existing(conn, fixmedins_code=orig.fixmedins_code, msgid=msgid)
        if not rows:
            if other is None:
                return None
            if other.original_setl_id != orig.setl_id:
                raise Conflict("msgid_reused", f"msgid {msgid} was used for another request")
            rows = [other]  # a concurrent copy of this request committed between the two reads
        mine = [r for r in rows if r.msgid == msgid]
        if mine:
            if mine[-1].request_hash != request_hash:
                raise Conflict("msgid_reused", f"msgid {msgid} was used for another request")
            return self._document(mine[-1], replayed=True)
        raise Conflict("already_cancelled", f"settlement {orig.setl_id} was already cancelled or refunded")

    def _refund_document(self, new_row: dict, info0: dict, *, replayed: bool) -> dict:
        """The new settlement's document plus what each payer got back (``refund``, fen)."""
        doc = self._document_from(new_row, replayed=replayed)
        doc["status"] = "settled"
        return _add_refund(doc, info0)

    def refund(self, ctx: TerminalContext, setl_id: str, req: dict) -> dict:
        """Partial refund: return ``returns`` = ``[{"feedetl_sn", "cnt"}]`` units of some lines.

        One ledger entry reverses the original and posts the re-split of the remaining lines
        (computed from the accumulators without the original), so the fund, the personal
        account and the patient each get back exactly their difference. Returns the new
        settlement document (``original_setl_id`` = the refunded one). If nothing remains it is
        a cancellation. Raises Invalid (more units than billed), NotFound, Conflict."""
        if not isinstance(req, dict):
            raise Invalid("body_invalid", "the request body must be a JSON object")
        msgid = text_field(req, "msgid")
        returns = req.get("returns")
        if not isinstance(returns, list) or not returns:
            raise Invalid("field_invalid", "returns: must be a non-empty list of {feedetl_sn, cnt}", field="returns")
        orig = self._original(ctx, setl_id)
        orig_lines = parse_bill_lines([{k: v for k, v in line.items() if k in (
            "feedetl_sn", "hilist_code", "name", "chrgitm_lv", "pric", "cnt", "selfpay_prop", "pric_uplmt_amt",
            "memo")
            and v is not None} for line in json.loads(orig.lines)])
        units: dict[str, Any] = {}
        for i, item in enumerate(returns):
            if not isinstance(item, dict) or "feedetl_sn" not in item or "cnt" not in item:
                raise Invalid("field_invalid", f"returns[{i}]: needs feedetl_sn and cnt", field=f"returns[{i}]")
            sn = str(item["feedetl_sn"])
            if sn in units:
                raise Invalid("field_invalid", f"returns[{i}]: feedetl_sn {sn} listed twice", field=f"returns[{i}]")
            units[sn] = item["cnt"]
        try:
            remaining = partial_refund(orig_lines, units)
        except SplitInputError as exc:
            raise Invalid("returns_invalid", str(exc)) from None
        if [(x.feedetl_sn, x.cnt) for x in remaining] == [(x.feedetl_sn, x.cnt) for x in orig_lines]:
            raise Invalid("returns_invalid", "returns: no unit is returned, so there is nothing to refund",
                          field="returns")
        if not remaining:
            return self.cancel(ctx, setl_id, {"msgid": msgid})
        # the units as numbers: "1", 1 and "1.0" are the same request
        request_hash = fingerprint({"refund": setl_id,
                                    "returns": {sn: format(Decimal(str(n)).normalize(), "f") for sn, n in units.items()}})
        done = self._find_reversal(orig, msgid, request_hash)
        if done is not None:
            return done
        citizen = self.cards.citizen(orig.psn_no)
        policy = self._policy(ctx, citizen, orig.med_type, orig.insu_year)
        orig_entry = self.ledger.entry(orig.entry_key)
        digest = self._same_policy_book(orig, orig_entry)
        info0 = json.loads(orig.setlinfo)
        names = self._accounts_for(citizen, orig.insu_year, orig.mdtrt_id, policy)
        payable = chart.clinic_payable(ctx.org_code)
        self.accounts.ensure(list(names.values()) + [payable, chart.MEMO_CONTRA])
        old_legs = _entry_legs(orig_entry)
        inpatient = policy.is_inpatient
        # An interim (中途) inpatient settlement has no admissions leg; its refund stays interim.
        interim = is_interim_batch(orig, old_legs, names["admissions"])
        ordinal = self._admission_ordinal(orig, names, orig_entry) if inpatient and not interim else 0
        key = undo_key(setl_id)
        new_id = derived_id("S", key)
        visit = Visit(msgid, orig.mdtrt_id, (RESERVED_CHAR + "R" + new_id)[:ID_CHARS_MAX], orig.psn_no, orig.med_type, interim,
                      tuple(remaining), {"method": orig.pay_method}, request_hash)
        business_date = self.days.current()
        for _attempt in range(ATTEMPTS_MAX):
            state, net = self._read_state(names)
            if interim:  # the entry asserts adm_final as read: a final settled meanwhile fails it
                refuse_closed_admission(True, orig.mdtrt_id, net, what="refund an interim batch")
            dedc_field = "admission_deductible_used_fen" if inpatient else "deductible_used_ytd_fen"
            adjusted = dict(state.to_dict())
            adjusted[dedc_field] -= info0["act_pay_dedc"]
            adjusted["fund_paid_ytd_fen"] -= info0["hifp_pay"]
            adjusted["serious_illness_paid_ytd_fen"] -= info0["hifmi_pay"]
            adjusted["personal_account_balance_fen"] += info0["acct_pay"]
            if inpatient and not interim:
                # the re-split is the same admission of the year as the original was (its
                # deductible depends on it), whatever admissions were closed after it
                adjusted["admissions_ytd"] = ordinal - 1
            try:
                without = PersonState(**adjusted)
            except SplitInputError:  # a negative figure: the original was reversed since it was read
                done = self._find_reversal(orig, msgid, request_hash)
                if done is not None:
                    return done
                raise Conflict("already_cancelled", f"settlement {setl_id} was already cancelled or refunded") from None
            result = self._split(policy, without, visit)
            info = result.setlinfo
            refuse_refund_that_charges_more(info0, info)
            wallet_pay = info.psn_cash_pay if orig.pay_method in ("card", "qr") else 0
            new_legs = self._legs(names, payable, info, wallet_pay, orig.pan, inpatient, interim)
            reverse = [(c, d, a) for d, c, a in old_legs]
            transfers = tuple(TransferSpec(f"{key}/{i}", d, c, a) for i, (d, c, a) in enumerate(reverse + new_legs))
            cancel_row = dict(orig._asdict())
            # the cancellation half of a refund: an engine-derived msgid, unique per refund
            # (one undoing per settlement) and unlike any terminal's (they cannot hold '~')
            cancel_row.update(setl_id=derived_id("C", key), msgid=RESERVED_CHAR + derived_id("C", key),
                              terminal_id=ctx.terminal_id, kind="cancellation", original_setl_id=setl_id,
                              entry_key=key + "~c", business_date=business_date, created_ts=self.clock_us(),
                              request_hash=visit.request_hash)
            new_row = self._row(ctx, visit, new_id, key, business_date, orig.insu_year, info, result,
                                orig.pay_method, orig.pan, wallet_pay, kind="settlement", original=setl_id,
                                insutype=citizen.insutype)
            metadata = {"setl_id": new_id, "legs_from": len(reverse), "undoes": orig.entry_key,
                        POLICY_DIGEST: digest}
            if ordinal:
                metadata[ADMISSION_NO] = ordinal  # the re-split closes the same admission of the year
            entry = EntrySpec(key=key, kind="refund", transfers=transfers, metadata=metadata,
                              assertions=tuple(BalanceAssertion(names[k], n) for k, n in net.items()))
            try:
                if not transfers:  # nothing moved through the ledger either way: cash only
                    guards = (AdmissionOpen(names["adm_final"]),) if interim else ()
                    if not self._insert_rows([cancel_row, new_row], guards):
                        return self._reversal_or_msgid_reused(orig, msgid, request_hash)
                    return self._refund_document(new_row, info0, replayed=False)
                outcome = self._post(entry, (DayOpen(business_date), InsertRows(settlements, [cancel_row, new_row])))
            except RowTaken:  # the msgid was taken by a concurrent request
                return self._reversal_or_msgid_reused(orig, msgid, request_hash)
            except HookRefused as exc:
                if is_admission_closed(exc):  # the final was settled since it was read
                    raise admission_closed(orig.mdtrt_id, "refund an interim batch") from None
                if not is_day_closed(exc):
                    raise
                business_date = self._day_after_refusal()  # the day began closing: book on the next
                continue
            if outcome.ok and outcome.replayed:  # a concurrent refund posted it, maybe under another msgid
                done = self._find_reversal(orig, msgid, request_hash)
                if done is not None:
                    return done
            if outcome.ok:
                return self._refund_document(new_row, info0, replayed=outcome.replayed)
            if outcome.result is EntryResult.BALANCE_ASSERTION_FAILED:
                contention_backoff(_attempt)
                continue
            done = self._find_reversal(orig, msgid, request_hash)
            if done is not None:
                return done
            raise self._refusal(outcome, list(reverse + new_legs))
        raise Conflict("settlement_contended", "the person's accounts kept changing; retry with the same msgid",
                       retry="same_msgid")
