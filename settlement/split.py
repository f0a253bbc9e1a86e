"""The NHSA split of an itemised medical bill: 2206/2207 outpatient, 2303/2304 inpatient.

Pure rules: no I/O, no clock, no ids of its own.  All amounts are ``int`` fen; prices,
quantities and ratios are ``Decimal``; rounding is half-up to the fen (``ledger.money``).

Per line (2204 output fields)
=============================
``det_item_fee_sumamt = round_half_up(pric × cnt × 100)``.  Then, in this order:

* class C (丙类): all of it is ``fulamt_ownpay_amt`` (price ceilings and first self-pay do not
  apply to an out-of-catalogue item);
* the part of the unit price above the ceiling ``pric_uplmt_amt`` is
  ``overlmt_amt = round_half_up((pric − pric_uplmt_amt) × cnt × 100)`` (0 without a ceiling or
  at or below it; classes A and B);
* class B (乙类): ``preselfpay_amt = round_half_up((sumamt − overlmt_amt) × selfpay_prop)``;
* ``inscp_scp_amt`` is the remainder, so
  ``sumamt = fulamt_ownpay_amt + overlmt_amt + preselfpay_amt + inscp_scp_amt`` exactly.

Per visit (2207 / 2304 ``setlinfo``)
====================================
The five bill totals are sums of the lines.  Then:

1. ``act_pay_dedc = min(deductible remaining, inscp_scp_amt)``.
2. ``eligible = inscp_scp_amt − act_pay_dedc``;
   ``hifp_pay = min(mul_half_up(eligible, fund_ratio), annual cap remaining)`` where the cap
   remaining is ``max(0, annual_cap_fen − fund_paid_ytd_fen)``.
3. Second tier (policy with ``serious_illness_ratio``; reported as ``hifmi_pay``).  It pays only
   for the in-policy amount (after the deductible) that the basic fund could not take because
   of the cap.  The basic fund reaches its cap remaining ``C`` at the expense
   ``covered = the smallest e with mul_half_up(e, fund_ratio) >= C``, that is
   ``ceil((C − ½) / fund_ratio)`` (0 when ``C`` is 0: the cap is already used up; no
   threshold when ``fund_ratio`` is 0 and ``C`` > 0: that fund never reaches its cap).  Then
   ``excess = max(0, eligible − covered)`` and
   ``hifmi_pay = min(mul_half_up(excess, serious_illness_ratio), second-tier cap remaining)``.
   Example: eligible 50000 fen, ratio 0.70, cap remaining 10000: ``covered`` = 14285 (0.70 ×
   14285 = 9999.5 → 10000), the basic fund pays 10000, ``excess`` = 35715, and at 0.80 the
   second tier pays 28572.  Defining the threshold on the rounded fund figure (rather than
   dividing the capped figure back) keeps the total fund a non-decreasing function of
   ``eligible`` that grows by at most one fen per fen: the funds never pay more than
   ``eligible``, and removing in-policy expense never raises the person's part.
4. ``fund_pay_sumamt = hifp_pay + hifmi_pay`` (+ ``hifob_pay``, ``cvlserv_pay``, ``maf_pay``,
   ``oth_pay``, always 0 here); ``psn_part_amt = medfee_sumamt − fund_pay_sumamt``.
5. ``acct_pay = min(balance, psn_part_amt)`` when ``acct_scope`` is ``all_personal_part``, or
   ``min(balance, psn_part_amt − fulamt_ownpay_amt − overlmt_selfpay)`` when it is
   ``inscope_selfpay_only`` (first self-pay + deductible + co-insurance);
   ``psn_cash_pay = psn_part_amt − acct_pay``; ``balc = balance − acct_pay``.
6. ``pool_prop_selfpay`` is the fund ratio as a string ("0.70"), as NHSA reports it.

Identities checked on every result (an ``AssertionError`` means a bug, never bad input):
``medfee = fulamt + overlmt + preselfpay + inscp``; ``fund_pay_sumamt`` = sum of the fund
fields; ``psn_part_amt = acct_pay + psn_cash_pay``; ``medfee = fund_pay_sumamt + psn_part_amt``;
no figure negative.

Inpatient (med_type 21 / 24 / 52; 2303 pre-settlement, 2304 settlement)
======================================================================
* The deductible is per admission.  The admission being settled is number
  ``admissions_ytd + 1`` of the insurance year (``admissions_ytd`` counts admissions already
  *closed* by a final settlement).  Its deductible is ``deductible_per_admission_fen`` for the
  1st, times ``deductible_ratio_2nd_admission`` for the 2nd and times
  ``deductible_ratio_3rd_plus_admission`` for the 3rd and later (half-up to the fen).
* Interim settlement (2304 with the interim flag, 中途结算) settles the lines billed since the
  previous settlement of the same admission.  The deductible already borne in this admission is
  carried in ``PersonState.admission_deductible_used_fen``, so an admission never bears more
  than its deductible however many interim settlements it has.  An interim settlement leaves
  ``admissions_ytd`` unchanged; the final settlement adds 1 to it and resets
  ``admission_deductible_used_fen`` to 0.
* The yearly outpatient deductible accumulator (``deductible_used_ytd_fen``) is not touched by
  inpatient settlements: outpatient and inpatient deductibles are separate.  The fund-paid
  accumulator (``fund_paid_ytd_fen``) and the annual cap are one per person and year, whatever
  the visit type: the caller keeps one accumulator per cap it wants enforced.

Partial refund
==============
A partial refund is cancel + re-split of the remaining lines (NHSA: cancel 2208 / 2305, then
settle again), never a cash refund of the line price.  :func:`partial_refund` gives the
remaining lines; settling them from the *same* state as the original gives the new split, and
each payer's refund is the difference (:func:`refund_difference`).

* Always: the fund, account and cash refunds add up to the ``medfee_sumamt`` difference, which
  is the sum of the per-line ``det_item_fee_sumamt`` differences and is never negative.
* Not in general: that this equals the price of the returned units.  A line amount is rounded
  as a whole: 24 × 0.415 = 9.96 but 23 × 0.415 = 9.545 → 9.55, so returning one unit refunds
  0.41, not 0.42.
* Not in general: that each payer's refund equals a settlement of the returned units alone.
  The deductible and the caps are not linear: the refund comes off the top of the bill, above
  the deductible, so the fund gets back its ratio of it, whereas the returned units settled on
  their own could fall wholly inside the deductible.
* When no line is above its price ceiling, every payer's refund (fund, account, cash) and every
  bill component's difference is ≥ 0.  With price ceilings, ``overlmt_amt`` and
  ``det_item_fee_sumamt`` are rounded separately, so in rare cases a fractional return moves a
  fen from ``overlmt_amt`` into ``inscp_scp_amt`` and a payer's refund can be −1 fen
  (e.g. pric 1.005, ceiling 0.001, cnt 1.25 → 1.24: in-policy 0 → 1 fen).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, fields
from decimal import ROUND_HALF_UP, Context, Decimal, localcontext
from typing import Any, Mapping, Sequence

from ledger.money import AMOUNT_FEN_MAX, MoneyError, mul_half_up, to_decimal

from settlement.policy import Policy, PolicyError, policy_from_mapping

BILL_LINES_MAX = 1000
FEEDETL_SN_CHARS_MAX = 64
TEXT_CHARS_MAX = 200
#: Decimal places accepted for prices (yuan), quantities and first self-pay ratios.
PRIC_DECIMALS_MAX = 6
CNT_DECIMALS_MAX = 6
PROP_DECIMALS_MAX = 6
#: Largest unit price (yuan) and quantity accepted on one line.
PRIC_MAX = Decimal(AMOUNT_FEN_MAX) / 100
CNT_MAX = Decimal(10) ** 9
ADMISSIONS_YTD_MAX = 1000
#: Precision of the decimal context used for money arithmetic: every product of the bounded
#: inputs above is exact in it, so rounding happens only where the rules say so.
_DECIMAL_PRECISION = 80
#: That context, for the per-line arithmetic (its methods, rather than a ``localcontext`` per line)
_EXACT = Context(prec=_DECIMAL_PRECISION)
_ONE = Decimal(1)
#: The common form of a price or quantity ("12.50", "3"): digits and an optional fraction, which
#: :func:`ledger.money.to_decimal` would accept as they are; anything else takes the general path.
_PLAIN_DECIMAL = re.compile(r"[0-9]{1,15}(?:\.([0-9]{0,32}))?", re.ASCII)

CHRGITM_LVS = ("A", "B", "C")
#: The settlement fields that are amounts in fen, in NHSA order.
SETLINFO_AMOUNT_FIELDS = (
    "medfee_sumamt", "fulamt_ownpay_amt", "overlmt_selfpay", "preselfpay_amt", "inscp_scp_amt",
    "act_pay_dedc", "hifp_pay", "hifmi_pay", "hifob_pay", "cvlserv_pay", "maf_pay", "oth_pay",
    "fund_pay_sumamt", "psn_part_amt", "acct_pay", "psn_cash_pay", "balc",
)
FUND_FIELDS = ("hifp_pay", "hifmi_pay", "hifob_pay", "cvlserv_pay", "maf_pay", "oth_pay")
LINE_AMOUNT_FIELDS = ("det_item_fee_sumamt", "fulamt_ownpay_amt", "overlmt_amt",
                      "preselfpay_amt", "inscp_scp_amt")


class SplitInputError(ValueError):
    """A bill, person state or settlement document is malformed; one line naming the field."""


def _require(condition: bool, message: str) -> None:
    """Assert an identity of the rules; an AssertionError here is a bug, not bad input."""
    if not condition:
        raise AssertionError(message)


def _field_names(cls) -> tuple[str, ...]:
    """The field names of dataclass ``cls``, in order (worked out once per class: ``fields()``
    costs microseconds on every call, and results are turned into dicts on every settlement)."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))
    return names


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


# --- input values -----------------------------------------------------------------------------

def _decimal(value: Any, label: str, decimals_max: int) -> Decimal:
    if type(value) is str:
        plain = _PLAIN_DECIMAL.fullmatch(value)
        if plain is not None:
            fraction = plain.group(1)
            if fraction is not None and len(fraction) > decimals_max:
                raise SplitInputError(f"{label}: {value} has more than {decimals_max} decimals")
            return Decimal(value)
    elif type(value) is Decimal and value.is_finite() and value.as_tuple().exponent >= -decimals_max:
        return value
    if isinstance(value, float):
        raise SplitInputError(f'{label}: {value!r} is a float; give a decimal string such as "12.50"')
    if isinstance(value, bool) or not isinstance(value, (str, int, Decimal)):
        raise SplitInputError(f"{label}: expected a decimal string, got {type(value).__name__}")
    try:
        number = to_decimal(value, field=label)
    except MoneyError as exc:
        raise SplitInputError(str(exc)) from None
    exponent = number.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -decimals_max:
        raise SplitInputError(f"{label}: {value} has more than {decimals_max} decimals")
    return number


def _fen_half_up(a: Decimal, b: Decimal, *, scale: int = 2) -> int:
    """``a × b × 10**scale`` (yuan × quantity -> fen with the default scale), exact, then
    rounded half-up to an integer (:func:`ledger.money.round_half_up`)."""
    product = _EXACT.multiply(a, b)
    if scale:
        product = product.scaleb(scale, _EXACT)
    return int(product.quantize(_ONE, ROUND_HALF_UP, _EXACT))


def _fen(value: Any, label: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SplitInputError(f"{label}: expected an integer number of fen, got {value!r}")
    if value < 0:
        raise SplitInputError(f"{label}: must not be negative")
    if value > AMOUNT_FEN_MAX:
        raise SplitInputError(f"{label}: {value} is beyond the limit of {AMOUNT_FEN_MAX} fen (amount overflow)")
    return value


def _line_text(value: Any, label: str, chars_max: int) -> str:
    if not isinstance(value, str):
        raise SplitInputError(f"{label}: expected a string, got {type(value).__name__}")
    if len(value) > chars_max:
        raise SplitInputError(f"{label}: longer than {chars_max} characters")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class BillLine:
    """One fee line of a bill (NHSA 2204 input): prices in decimal yuan, never float.

    ``pric`` is the unit price (yuan, ≥ 0, up to 6 decimals: 0.415 is fine), ``cnt`` the
    quantity (> 0, may be fractional), ``chrgitm_lv`` "A" | "B" | "C", ``selfpay_prop`` the
    class-B first self-pay ratio (0..1; must be 0 for class A; ignored for class C, which is
    wholly self-paid), ``pric_uplmt_amt`` the unit price ceiling in yuan (None = no ceiling),
    ``memo`` the 2204 remark (备注; the engine says there why a catalogue item became wholly
    self-paid, see :func:`settlement.service.restriction_unmet`).
    str / int values are converted to Decimal.  Raises :class:`SplitInputError` "field: reason".
    """

    feedetl_sn: str
    chrgitm_lv: str
    pric: Decimal
    cnt: Decimal
    hilist_code: str = ""
    name: str = ""
    selfpay_prop: Decimal = Decimal(0)
    pric_uplmt_amt: Decimal | None = None
    memo: str = ""

    def __post_init__(self) -> None:
        sn = self.feedetl_sn
        if isinstance(sn, int) and not isinstance(sn, bool):
            sn = str(sn)
        sn = _line_text(sn, "feedetl_sn", FEEDETL_SN_CHARS_MAX)
        if not sn.strip():
            raise SplitInputError("feedetl_sn: must not be empty")
        object.__setattr__(self, "feedetl_sn", sn)
        _line_text(self.hilist_code, "hilist_code", TEXT_CHARS_MAX)
        _line_text(self.name, "name", TEXT_CHARS_MAX)
        _line_text(self.memo, "memo", TEXT_CHARS_MAX)
        if self.chrgitm_lv not in CHRGITM_LVS:
            raise SplitInputError(f"chrgitm_lv: {self.chrgitm_lv!r} is not a charge item class (A, B or C)")
        pric = _decimal(self.pric, "pric", PRIC_DECIMALS_MAX)
        if pric < 0:
            raise SplitInputError("pric: must not be negative")
        if pric > PRIC_MAX:
            raise SplitInputError(f"pric: {pric} yuan is beyond the limit (amount overflow)")
        cnt = _decimal(self.cnt, "cnt", CNT_DECIMALS_MAX)
        if cnt <= 0:
            raise SplitInputError("cnt: must be positive")
        if cnt > CNT_MAX:
            raise SplitInputError(f"cnt: {cnt} is beyond the limit of {CNT_MAX}")
        prop = _decimal(self.selfpay_prop, "selfpay_prop", PROP_DECIMALS_MAX)
        if prop < 0 or prop > 1:
            raise SplitInputError(f"selfpay_prop: {prop} is outside 0..1")
        if self.chrgitm_lv == "A" and prop != 0:
            raise SplitInputError(f"selfpay_prop: {prop} given for a class A item (class A has no first self-pay)")
        ceiling = self.pric_uplmt_amt
        if ceiling is not None:
            ceiling = _decimal(ceiling, "pric_uplmt_amt", PRIC_DECIMALS_MAX)
            if ceiling < 0:
                raise SplitInputError("pric_uplmt_amt: must not be negative")
        object.__setattr__(self, "pric", pric)
        object.__setattr__(self, "cnt", cnt)
        object.__setattr__(self, "selfpay_prop", prop)
        object.__setattr__(self, "pric_uplmt_amt", ceiling)
        amount = _fen_half_up(pric, cnt)
        if amount > AMOUNT_FEN_MAX:
            raise SplitInputError(f"det_item_fee_sumamt: pric × cnt = {amount} fen is beyond the limit "
                                  f"of {AMOUNT_FEN_MAX} fen (amount overflow)")


@dataclass(frozen=True, slots=True, kw_only=True)
class PersonState:
    """The person's accumulators for the insurance year before (or after) a settlement.

    All amounts int fen, ≥ 0: ``deductible_used_ytd_fen`` (outpatient deductible borne this
    year), ``fund_paid_ytd_fen`` (basic pooled fund paid this year, against the annual cap),
    ``personal_account_balance_fen``, ``serious_illness_paid_ytd_fen`` (second tier paid this
    year), ``admissions_ytd`` (admissions closed by a final settlement this year) and
    ``admission_deductible_used_fen`` (deductible borne so far by the open admission, after
    interim settlements; 0 when no admission is open).
    Raises :class:`SplitInputError` "field: reason".
    """

    deductible_used_ytd_fen: int = 0
    fund_paid_ytd_fen: int = 0
    personal_account_balance_fen: int = 0
    admissions_ytd: int = 0
    serious_illness_paid_ytd_fen: int = 0
    admission_deductible_used_fen: int = 0

    def __post_init__(self) -> None:
        for name in _PERSON_FIELDS:
            _fen(getattr(self, name), name)
        if self.admissions_ytd > ADMISSIONS_YTD_MAX:
            raise SplitInputError(f"admissions_ytd: {self.admissions_ytd} is beyond {ADMISSIONS_YTD_MAX}")

    def to_dict(self) -> dict[str, int]:
        """JSON-ready ``{field: int}``."""
        return {name: getattr(self, name) for name in _field_names(type(self))}


_PERSON_FIELDS = _field_names(PersonState)


# --- results ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class LineSplit:
    """The split of one line, NHSA 2204 output names; amounts int fen, pric / cnt as strings;
    ``memo`` the line's remark ("" for none; left out of :meth:`to_dict` then)."""

    feedetl_sn: str
    hilist_code: str
    name: str
    chrgitm_lv: str
    pric: str
    cnt: str
    selfpay_prop: str
    pric_uplmt_amt: str | None
    det_item_fee_sumamt: int
    fulamt_ownpay_amt: int
    overlmt_amt: int
    preselfpay_amt: int
    inscp_scp_amt: int
    memo: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (amounts int fen; pric, cnt, selfpay_prop, pric_uplmt_amt strings;
        ``memo`` only when there is one)."""
        out = {name: getattr(self, name) for name in _field_names(type(self))}
        if not self.memo:
            del out["memo"]
        return out


@dataclass(frozen=True, slots=True)
class SetlInfo:
    """The settlement summary of NHSA 2207 / 2304 ``setlinfo``: amounts int fen.

    ``pool_prop_selfpay`` is the pooled fund's ratio as a decimal string ("0.70");
    ``setl_id``, ``mdtrt_id`` and ``psn_no`` are the caller's ids ("" when not given).
    """

    medfee_sumamt: int
    fulamt_ownpay_amt: int
    overlmt_selfpay: int
    preselfpay_amt: int
    inscp_scp_amt: int
    act_pay_dedc: int
    hifp_pay: int
    pool_prop_selfpay: str
    hifmi_pay: int
    hifob_pay: int
    cvlserv_pay: int
    maf_pay: int
    oth_pay: int
    fund_pay_sumamt: int
    psn_part_amt: int
    acct_pay: int
    psn_cash_pay: int
    balc: int
    setl_id: str = ""
    mdtrt_id: str = ""
    psn_no: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: amounts int fen, ``pool_prop_selfpay`` and ids strings."""
        return {name: getattr(self, name) for name in _field_names(type(self))}


def setlinfo_identity_errors(s: SetlInfo) -> list[str]:
    """The NHSA settlement identities that ``s`` violates (empty list when it is consistent).

    Checks: every amount a non-negative int; medfee = fulamt + overlmt + preselfpay + inscp;
    fund_pay_sumamt = sum of the fund fields; psn_part_amt = acct_pay + psn_cash_pay;
    medfee = fund_pay_sumamt + psn_part_amt.
    """
    errors = [f"{name}: {getattr(s, name)!r} is not a non-negative integer of fen"
              for name in SETLINFO_AMOUNT_FIELDS
              if not isinstance(getattr(s, name), int) or isinstance(getattr(s, name), bool)
              or getattr(s, name) < 0]
    if errors:
        return errors
    if s.medfee_sumamt != s.fulamt_ownpay_amt + s.overlmt_selfpay + s.preselfpay_amt + s.inscp_scp_amt:
        errors.append("medfee_sumamt != fulamt_ownpay_amt + overlmt_selfpay + preselfpay_amt + inscp_scp_amt")
    if s.fund_pay_sumamt != sum(getattr(s, name) for name in FUND_FIELDS):
        errors.append("fund_pay_sumamt != sum of the fund fields")
    if s.psn_part_amt != s.acct_pay + s.psn_cash_pay:
        errors.append("psn_part_amt != acct_pay + psn_cash_pay")
    if s.medfee_sumamt != s.fund_pay_sumamt + s.psn_part_amt:
        errors.append("medfee_sumamt != fund_pay_sumamt + psn_part_amt")
    return errors


@dataclass(frozen=True, slots=True)
class SplitResult:
    """Outcome of :func:`split_visit`: per-line splits, the setlinfo and the state after."""

    lines: tuple[LineSplit, ...]
    setlinfo: SetlInfo
    state_after: PersonState
    interim: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"lines": [...], "setlinfo": {...}}`` with integer fen."""
        return {"lines": [line.to_dict() for line in self.lines], "setlinfo": self.setlinfo.to_dict()}


# --- the rules ----------------------------------------------------------------------------------

def split_line(line: BillLine) -> LineSplit:
    """Split one bill line into the NHSA 2204 output amounts (int fen), half-up per component.

    Rule order: amount; class C wholly self-paid; the part above the price ceiling; class-B
    first self-pay of the rest; in-policy remainder.  Asserts the line identity.
    """
    sumamt = _fen_half_up(line.pric, line.cnt)
    fulamt = overlmt = preselfpay = 0
    if line.chrgitm_lv == "C":
        fulamt = sumamt
    else:
        ceiling = line.pric_uplmt_amt
        if ceiling is not None and line.pric > ceiling:
            overlmt = _fen_half_up(_EXACT.subtract(line.pric, ceiling), line.cnt)
        if line.chrgitm_lv == "B" and line.selfpay_prop:
            preselfpay = _fen_half_up(Decimal(sumamt - overlmt), line.selfpay_prop, scale=0)
    inscp = sumamt - fulamt - overlmt - preselfpay
    _require(min(fulamt, overlmt, preselfpay, inscp) >= 0, f"line {line.feedetl_sn}: negative component")
    _require(sumamt == fulamt + overlmt + preselfpay + inscp, f"line {line.feedetl_sn}: identity")
    return LineSplit(
        feedetl_sn=line.feedetl_sn, hilist_code=line.hilist_code, name=line.name,
        chrgitm_lv=line.chrgitm_lv, pric=str(line.pric), cnt=str(line.cnt),
        selfpay_prop=str(line.selfpay_prop),
        pric_uplmt_amt=None if line.pric_uplmt_amt is None else str(line.pric_uplmt_amt),
        det_item_fee_sumamt=sumamt, fulamt_ownpay_amt=fulamt, overlmt_amt=overlmt,
        preselfpay_amt=preselfpay, inscp_scp_amt=inscp, memo=line.memo)


def admission_deductible_fen(policy: Policy, admission_no: int) -> int:
    """The deductible of the ``admission_no``-th admission (1-based) of the year, int fen.

    1st: ``deductible_per_admission_fen``; 2nd: times ``deductible_ratio_2nd_admission``;
    3rd and later: times ``deductible_ratio_3rd_plus_admission``; half-up to the fen.
    Raises ValueError for an outpatient policy or ``admission_no`` < 1.
    """
    if not policy.is_inpatient:
        raise ValueError(f"policy {policy.name} med_type {policy.med_type} is not inpatient")
    if admission_no < 1:
        raise ValueError("admission_no starts at 1")
    base = policy.deductible_per_admission_fen
    if admission_no == 1:
        return base
    factor = policy.deductible_ratio_2nd_admission if admission_no == 2 else policy.deductible_ratio_3rd_plus_admission
    return mul_half_up(base, factor)


def _cap_threshold_fen(cap_left_fen: int, fund_ratio: Decimal) -> int:
    """The smallest eligible expense e (fen) with ``mul_half_up(e, fund_ratio) >= cap_left_fen``.

    Exact integer arithmetic: ``ceil((2·C − 1)·d / (2·n))`` for ``fund_ratio = n/d``; 0 when the
    cap is used up; ``AMOUNT_FEN_MAX + 1`` (never reached) when the ratio is 0 and ``C`` > 0.
    """
    if cap_left_fen == 0:
        return 0
    numerator, denominator = fund_ratio.as_integer_ratio()
    if numerator == 0:
        return AMOUNT_FEN_MAX + 1
    return -((-(2 * cap_left_fen - 1) * denominator) // (2 * numerator))


def _check_lines(lines: Sequence[BillLine]) -> None:
    if not lines:
        raise SplitInputError("bill: no lines")
    if len(lines) > BILL_LINES_MAX:
        raise SplitInputError(f"bill: {len(lines)} lines, more than {BILL_LINES_MAX}")
    seen: dict[str, int] = {}
    for i, line in enumerate(lines):
        if not isinstance(line, BillLine):
            raise SplitInputError(f"bill[{i}]: expected a BillLine, got {type(line).__name__}")
        if line.feedetl_sn in seen:
            raise SplitInputError(f"bill[{i}].feedetl_sn: {line.feedetl_sn!r} repeats bill[{seen[line.feedetl_sn]}]")
        seen[line.feedetl_sn] = i


def split_visit(policy: Policy, state: PersonState, lines: Sequence[BillLine], *,
                interim: bool = False, setl_id: str = "", mdtrt_id: str = "",
                psn_no: str = "") -> SplitResult:
    """Split one visit's bill into the NHSA settlement (2206/2207 outpatient, 2303/2304 inpatient).

    ``policy``: the visit's :class:`Policy`; ``state``: the person's accumulators before;
    ``lines``: 1..``BILL_LINES_MAX`` :class:`BillLine` with unique ``feedetl_sn``;
    ``interim``: an inpatient interim settlement (2304 with the interim flag; refused for
    outpatient policies).  Returns :class:`SplitResult` with amounts in int fen and the
    accumulators after (rules in the module docstring).  Pure: pre-settlement (2206/2303) and
    settlement use the same call; only the caller decides whether money moves.
    Raises :class:`SplitInputError` for an empty, oversized or inconsistent bill and for
    ``interim`` on an outpatient policy; ``AssertionError`` if an identity fails (a bug).
    """
    if not isinstance(policy, Policy):
        raise TypeError("policy must be a settlement.policy.Policy")
    if not isinstance(state, PersonState):
        raise TypeError("state must be a settlement.split.PersonState")
    _check_lines(lines)
    if interim and not policy.is_inpatient:
        raise SplitInputError(f"interim: only inpatient settlements can be interim (med_type {policy.med_type})")

    splits = tuple(split_line(line) for line in lines)
    medfee = sum(s.det_item_fee_sumamt for s in splits)
    fulamt = sum(s.fulamt_ownpay_amt for s in splits)
    overlmt = sum(s.overlmt_amt for s in splits)
    preselfpay = sum(s.preselfpay_amt for s in splits)
    inscp = sum(s.inscp_scp_amt for s in splits)
    if medfee > AMOUNT_FEN_MAX:
        raise SplitInputError(f"bill: total {medfee} fen is beyond the limit of {AMOUNT_FEN_MAX} fen (amount overflow)")

    with localcontext() as ctx:
        ctx.prec = _DECIMAL_PRECISION
        # 1. deductible (起付线)
        if policy.is_inpatient:
            deductible = admission_deductible_fen(policy, state.admissions_ytd + 1)
            deductible_left = max(0, deductible - state.admission_deductible_used_fen)
        else:
            deductible_left = max(0, policy.deductible_per_year_fen - state.deductible_used_ytd_fen)
        act_pay_dedc = min(deductible_left, inscp)
        # 2. basic pooled fund, bounded by the annual cap (封顶线)
        eligible = inscp - act_pay_dedc
        cap_left = max(0, policy.annual_cap_fen - state.fund_paid_ytd_fen)
        hifp_pay = min(mul_half_up(eligible, policy.fund_ratio), cap_left)
        # 3. second tier above the cap
        hifmi_pay = 0
        if policy.has_second_tier:
            excess = max(0, eligible - _cap_threshold_fen(cap_left, policy.fund_ratio))
            si_left = max(0, policy.serious_illness_cap_fen - state.serious_illness_paid_ytd_fen)
            hifmi_pay = min(mul_half_up(excess, policy.serious_illness_ratio), si_left)
    # 4. the person's part, 5. personal account and cash
    fund_pay_sumamt = hifp_pay + hifmi_pay
    psn_part_amt = medfee - fund_pay_sumamt
    balance = state.personal_account_balance_fen
    if policy.acct_scope == "all_personal_part":
        acct_pay = min(balance, psn_part_amt)
    else:
        acct_pay = min(balance, psn_part_amt - fulamt - overlmt)
    psn_cash_pay = psn_part_amt - acct_pay

    setlinfo = SetlInfo(
        medfee_sumamt=medfee, fulamt_ownpay_amt=fulamt, overlmt_selfpay=overlmt,
        preselfpay_amt=preselfpay, inscp_scp_amt=inscp, act_pay_dedc=act_pay_dedc,
        hifp_pay=hifp_pay, pool_prop_selfpay=str(policy.fund_ratio), hifmi_pay=hifmi_pay,
        hifob_pay=0, cvlserv_pay=0, maf_pay=0, oth_pay=0, fund_pay_sumamt=fund_pay_sumamt,
        psn_part_amt=psn_part_amt, acct_pay=acct_pay, psn_cash_pay=psn_cash_pay,
        balc=balance - acct_pay, setl_id=setl_id, mdtrt_id=mdtrt_id, psn_no=psn_no)
    errors = setlinfo_identity_errors(setlinfo)
    _require(not errors, f"settlement identities failed: {errors}")

    if policy.is_inpatient:
        if interim:
            state_after = dataclasses.replace(
                state, admission_deductible_used_fen=state.admission_deductible_used_fen + act_pay_dedc)
        else:
            state_after = dataclasses.replace(state, admissions_ytd=state.admissions_ytd + 1,
                                              admission_deductible_used_fen=0)
    else:
        state_after = dataclasses.replace(state, deductible_used_ytd_fen=state.deductible_used_ytd_fen + act_pay_dedc)
    state_after = dataclasses.replace(
        state_after,
        fund_paid_ytd_fen=state.fund_paid_ytd_fen + hifp_pay,
        serious_illness_paid_ytd_fen=state.serious_illness_paid_ytd_fen + hifmi_pay,
        personal_account_balance_fen=balance - acct_pay)
    return SplitResult(lines=splits, setlinfo=setlinfo, state_after=state_after, interim=interim)


# --- JSON input -----------------------------------------------------------------------------

_LINE_FIELDS = _field_names(BillLine)


def parse_bill_lines(raw: Any, *, where: str = "bill") -> list[BillLine]:
    """Validate a bill from JSON: a list of 1..1000 objects with the :class:`BillLine` fields.

    ``pric``, ``cnt``, ``selfpay_prop``, ``pric_uplmt_amt``: decimal strings or ints (floats
    refused); ``cnt`` > 0, ``pric`` ≥ 0, ``chrgitm_lv`` A/B/C, ``selfpay_prop`` 0..1;
    ``feedetl_sn`` unique; a line amount beyond ``AMOUNT_FEN_MAX`` is refused.  Unknown fields
    are refused (a misspelt ``selfpay_prop`` must not silently become 0).  Lines are numbered
    from 0.  Raises :class:`SplitInputError`, e.g. "bill[2].cnt: must be positive".
    """
    if not isinstance(raw, list):
        raise SplitInputError(f"{where}: expected a list of fee lines, got {type(raw).__name__}")
    if not raw:
        raise SplitInputError(f"{where}: no lines")
    if len(raw) > BILL_LINES_MAX:
        raise SplitInputError(f"{where}: {len(raw)} lines, more than {BILL_LINES_MAX}")
    lines: list[BillLine] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        label = f"{where}[{i}]"
        if type(item) is not dict and not isinstance(item, Mapping):
            raise SplitInputError(f"{label}: expected an object, got {type(item).__name__}")
        for name in item:
            if name not in _LINE_FIELDS:
                raise SplitInputError(f"{label}.{name}: unknown field (known: {', '.join(_LINE_FIELDS)})")
        for name in ("feedetl_sn", "chrgitm_lv", "pric", "cnt"):
            if name not in item:
                raise SplitInputError(f"{label}.{name}: missing")
        values = dict(item)
        for name in ("selfpay_prop", "pric_uplmt_amt", "hilist_code", "name", "memo"):
            if name in values and values[name] is None:
                del values[name]  # JSON null: the field's default
        try:
            line = BillLine(**values)
        except SplitInputError as exc:
            raise SplitInputError(f"{label}.{exc}") from None
        if line.feedetl_sn in seen:
            raise SplitInputError(f"{label}.feedetl_sn: {line.feedetl_sn!r} repeats {where}[{seen[line.feedetl_sn]}]")
        seen[line.feedetl_sn] = i
        lines.append(line)
    return lines


def person_state_from_mapping(raw: Any, *, where: str = "person_state_before") -> PersonState:
    """Build a :class:`PersonState` from a JSON object of int fen fields (missing fields are 0).

    Raises :class:`SplitInputError` "where.field: reason" for unknown fields, non-integers
    (floats and strings included) and negative values.
    """
    if not isinstance(raw, Mapping):
        raise SplitInputError(f"{where}: expected an object, got {type(raw).__name__}")
    known = _PERSON_FIELDS
    for name in raw:
        if name not in known:
            raise SplitInputError(f"{where}.{name}: unknown field (known: {', '.join(known)})")
    try:
        return PersonState(**raw)
    except SplitInputError as exc:
        raise SplitInputError(f"{where}.{exc}") from None


# --- vector documents (backs `citizencard split FILE.json`) ----------------------------------

_CHANGEABLE_ROOTS = ("policy", "person_state_before", "bill", "interim")
VARIANTS_MAX = 100


def _apply_change(parts: dict[str, Any], path: str, value: Any, label: str) -> None:
    steps = path.split(".") if isinstance(path, str) else []
    if not steps or steps[0] not in _CHANGEABLE_ROOTS or any(not s for s in steps):
        raise SplitInputError(f"{label}: {path!r} is not a path under {', '.join(_CHANGEABLE_ROOTS)}")
    if len(steps) == 1:
        parts[steps[0]] = value
        return
    node: Any = parts.get(steps[0])
    for step in steps[1:-1]:
        node = _step(node, step, path, label)
    last = steps[-1]
    if isinstance(node, dict):
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    elif isinstance(node, list) and last.isdigit() and int(last) < len(node):
        node[int(last)] = value
    else:
        raise SplitInputError(f"{label}: {path!r} does not lead to a field")


def _step(node: Any, step: str, path: str, label: str) -> Any:
    if isinstance(node, dict) and step in node:
        return node[step]
    if isinstance(node, list) and step.isdigit() and int(step) < len(node):
        return node[int(step)]
    raise SplitInputError(f"{label}: {path!r} does not lead to a field")


def _settle_parts(parts: Mapping[str, Any]) -> SplitResult:
    if "policy" not in parts:
        raise SplitInputError("policy: missing")
    if "bill" not in parts:
        raise SplitInputError("bill: missing")
    policy = policy_from_mapping(parts["policy"], where="policy")
    state = person_state_from_mapping(parts.get("person_state_before", {}))
    lines = parse_bill_lines(parts["bill"])
    interim = parts.get("interim", False)
    if not isinstance(interim, bool):
        raise SplitInputError(f"interim: expected true or false, got {interim!r}")
    return split_visit(policy, state, lines, interim=interim)


def split_vector_document(doc: Any) -> dict[str, Any]:
    """Settle a document in the shared vector format (tests/vectors/settlement-outpatient-01.json).

    Input: ``{"policy": {...policy fields...}, "person_state_before": {...int fen...},
    "bill": [...bill lines...], "interim": false, "variants": [{"name": ..., "change":
    {"policy.acct_scope": "inscope_selfpay_only", ...}}, ...]}``; other keys (``about``,
    ``expected_*``) are ignored; ``person_state_before`` may be omitted (all zero) and so may
    ``interim`` (false).  A change path starts with ``policy``, ``person_state_before``, ``bill``
    or ``interim``, walks objects by key and lists by index ("bill.2.cnt"); a null value removes
    an object field.  Output: ``{"lines": [...], "setlinfo": {...}, "person_state_after":
    {...}, "variants": [{"name", "lines", "setlinfo", "person_state_after"}, ...]}`` with
    int fen.  Every variant is listed in input order; one without ``change`` (such as the
    vector's rounding guard D) carries the base result.
    Raises :class:`SplitInputError` or :class:`~settlement.policy.PolicyError` naming the field.
    """
    if not isinstance(doc, Mapping):
        raise SplitInputError(f"document: expected a JSON object, got {type(doc).__name__}")
    parts = {k: doc[k] for k in _CHANGEABLE_ROOTS if k in doc}
    base = _settle_parts(parts)
    out: dict[str, Any] = {**base.to_dict(), "person_state_after": base.state_after.to_dict(), "variants": []}
    variants = doc.get("variants", [])
    if not isinstance(variants, list):
        raise SplitInputError("variants: expected a list")
    if len(variants) > VARIANTS_MAX:
        raise SplitInputError(f"variants: {len(variants)} variants, more than {VARIANTS_MAX}")
    for i, variant in enumerate(variants):
        label = f"variants[{i}]"
        if not isinstance(variant, Mapping):
            raise SplitInputError(f"{label}: expected an object")
        name = variant.get("name", f"variant {i}")
        if not isinstance(name, str):
            raise SplitInputError(f"{label}.name: expected a string")
        change = variant.get("change")
        if change is None:
            result = base
        else:
            if not isinstance(change, Mapping):
                raise SplitInputError(f"{label}.change: expected an object of path: value")
            changed = copy.deepcopy(parts)
            for path, value in change.items():
                _apply_change(changed, path, value, f"{label}.change")
            try:
                result = _settle_parts(changed)
            except SplitInputError as exc:
                raise SplitInputError(f"{label}: {exc}") from None
            except PolicyError as exc:
                raise PolicyError(f"{label}: {exc}") from None
        out["variants"].append({"name": name, **result.to_dict(),
                                "person_state_after": result.state_after.to_dict()})
    return out


# --- partial refund -------------------------------------------------------------------------

def partial_refund(lines: Sequence[BillLine], returned_units: Mapping[str, Any]) -> list[BillLine]:
    """The lines that remain after returning some units (cancel + re-split; NHSA 2208 / 2305).

    ``lines``: the original bill; ``returned_units``: ``{feedetl_sn: units}`` with units as
    decimal strings, ints or Decimal (≥ 0; floats refused).  Returns the remaining lines in the
    original order with ``cnt`` reduced; a line reduced to zero is dropped, so the result may
    be empty (then the refund is a plain cancellation).  Settle the result from the same state
    as the original to get the new split (see the module docstring for what the difference
    means).  Raises :class:`SplitInputError` for an unknown ``feedetl_sn``, negative units or
    more units than were billed.
    """
    by_sn = {line.feedetl_sn: line for line in lines}
    units: dict[str, Decimal] = {}
    for sn, value in returned_units.items():
        label = f"returned feedetl_sn {sn!r}"
        if sn not in by_sn:
            raise SplitInputError(f"{label}: no line with this feedetl_sn in the original bill")
        number = _decimal(value, label, CNT_DECIMALS_MAX)
        if number < 0:
            raise SplitInputError(f"{label}: must not be negative")
        if number > by_sn[sn].cnt:
            raise SplitInputError(f"{label}: {number} units returned but only {by_sn[sn].cnt} billed")
        units[sn] = number
    remaining: list[BillLine] = []
    for line in lines:
        cnt = line.cnt - units.get(line.feedetl_sn, Decimal(0))
        if cnt > 0:
            remaining.append(line if cnt == line.cnt else dataclasses.replace(line, cnt=cnt))
    return remaining


def refund_difference(original: SetlInfo, remaining: SetlInfo | None) -> dict[str, int]:
    """Per amount field, ``original − remaining`` (int fen): what each payer gets back.

    ``remaining`` is the re-split of the remaining lines from the same state (None when nothing
    remains: full cancellation).  A figure may in rare rounding cases be negative (a payer pays
    a fen more after the refund); the totals always satisfy
    ``fund_pay_sumamt + acct_pay + psn_cash_pay = medfee_sumamt`` differences.
    """
    return {name: getattr(original, name) - (getattr(remaining, name) if remaining else 0)
            for name in SETLINFO_AMOUNT_FIELDS if name != "balc"}
