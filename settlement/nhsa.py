"""NHSA-format exchange at the edge: 2204 fee details in, 2207 setlinfo out, 3201 / 3202 files.

The NHSA platform interface (医疗保障信息平台 定点医药机构接口规范) carries amounts as decimal
yuan strings ("497.01") and the charge item class as codes ("01" class A / 甲类, "02" class B /
乙类, "03" class C / 丙类).  Inside the engine amounts are int fen and classes "A" / "B" / "C";
this module converts at the edge and nowhere else (``ledger.money.parse_yuan`` /
``format_yuan``).  Pure functions over plain dicts and dataclasses; no I/O, no clock.

Reconciliation with the insurer:

* 3201 compares totals per (insutype, clr_type): ``medfee_sumamt``, ``fund_pay_sumamt``,
  ``acct_pay`` and the count ``fixmedins_setl_cnt``;
* 3202 compares per settlement: ``setl_id``, ``mdtrt_id``, ``psn_no``, ``medfee_sumamt``,
  ``fund_pay_sumamt``, ``acct_pay`` and ``cash_payamt`` (= ``psn_cash_pay``).

A record flagged ``refd_setl_flag = "1"`` is the reversal of an earlier settlement
(2208 / 2305 cancellation): in both files it counts with negative amounts and, in 3201, as −1
settlement, so the totals are the net of the period and the 3202 rows of a group add up to its
3201 totals.  (Choice of this engine; adjust per province if its platform counts otherwise.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from ledger.money import MoneyError, format_yuan, parse_yuan

from settlement.policy import INPATIENT_MED_TYPES
from settlement.split import (
    FUND_FIELDS,
    SETLINFO_AMOUNT_FIELDS,
    BillLine,
    LineSplit,
    SetlInfo,
    SplitInputError,
    parse_bill_lines,
    setlinfo_identity_errors,
    split_line,
)

#: NHSA charge item level codes (chrgitm_lv) to the engine's classes.
CHRGITM_LV_CODES = {"01": "A", "02": "B", "03": "C"}
_CHRGITM_LV_TO_CODE = {v: k for k, v in CHRGITM_LV_CODES.items()}
#: NHSA clearing types (clr_type): outpatient and inpatient.
CLR_TYPE_OUTPATIENT = "11"
CLR_TYPE_INPATIENT = "21"
REFD_SETL_FLAGS = ("0", "1")
RECORDS_MAX = 1_000_000

_NAME_FIELDS = ("hilist_name", "med_list_name", "medins_list_name", "name")


def clr_type_for(med_type: str) -> str:
    """The NHSA clearing type of a visit type: "21" for inpatient med_types, else "11"."""
    return CLR_TYPE_INPATIENT if med_type in INPATIENT_MED_TYPES else CLR_TYPE_OUTPATIENT


# --- 2204: fee details in -------------------------------------------------------------------

def parse_fee_details(raw: Any, *, where: str = "feedetail") -> list[BillLine]:
    """Parse NHSA 2204-style fee detail lines into :class:`~settlement.split.BillLine`.

    Reads per line: ``feedetl_sn``; ``hilist_code`` or ``med_list_codg`` (the insurer's
    catalogue code; both given and different is an error); a name from ``hilist_name``,
    ``med_list_name``, ``medins_list_name`` or ``name``; ``chrgitm_lv`` as "01"/"02"/"03" or
    "A"/"B"/"C"; ``pric`` and ``cnt`` (decimal strings or ints, floats refused);
    ``selfpay_prop``; ``pric_uplmt_amt`` (yuan); ``det_item_fee_sumamt`` (yuan, optional:
    when given it must equal round_half_up(pric × cnt) to the fen).  Other 2204 fields
    (``medins_list_codg``, ``mdtrt_id``, ``fee_ocur_time``, doctors, departments...) are
    accepted and not used.  Limits and checks as :func:`~settlement.split.parse_bill_lines`.
    Raises :class:`SplitInputError` "feedetail[i].field: reason" (lines numbered from 0).
    """
    if not isinstance(raw, list):
        raise SplitInputError(f"{where}: expected a list of fee lines, got {type(raw).__name__}")
    normalized: list[dict[str, Any]] = []
    declared: list[Any] = []
    for i, item in enumerate(raw):
        label = f"{where}[{i}]"
        if not isinstance(item, Mapping):
            raise SplitInputError(f"{label}: expected an object, got {type(item).__name__}")
        line: dict[str, Any] = {}
        for name in ("feedetl_sn", "pric", "cnt", "selfpay_prop", "pric_uplmt_amt"):
            if name in item and item[name] is not None and item[name] != "":
                line[name] = item[name]
        for n in ("hilist_code", "med_list_codg"):
            if item.get(n) not in (None, "") and not isinstance(item.get(n), str):
                raise SplitInputError(f"{label}.{n}: must be a string, got {type(item.get(n)).__name__}")
        codes = {item.get(n) for n in ("hilist_code", "med_list_codg") if item.get(n) not in (None, "")}
        if len(codes) > 1:
            raise SplitInputError(f"{label}.med_list_codg: {item.get('med_list_codg')!r} contradicts "
                                  f"hilist_code {item.get('hilist_code')!r}")
        if codes:
            line["hilist_code"] = codes.pop()
        for name in _NAME_FIELDS:
            if item.get(name) not in (None, ""):
                line["name"] = item[name]
                break
        level = item.get("chrgitm_lv")
        if level is not None:
            line["chrgitm_lv"] = CHRGITM_LV_CODES.get(level, level) if isinstance(level, str) else level
        normalized.append(line)
        declared.append(item.get("det_item_fee_sumamt"))
    lines = parse_bill_lines(normalized, where=where)
    for i, (line, stated) in enumerate(zip(lines, declared)):
        if stated in (None, ""):
            continue
        label = f"{where}[{i}].det_item_fee_sumamt"
        stated_fen = _yuan(stated, label)
        computed = split_line(line).det_item_fee_sumamt
        if stated_fen != computed:
            raise SplitInputError(f"{label}: {format_yuan(stated_fen)} does not equal pric × cnt = "
                                  f"{format_yuan(computed)} (half-up to the fen)")
    return lines


def _yuan(value: Any, label: str) -> int:
    try:
        return parse_yuan(value, field=label)
    except MoneyError as exc:
        raise SplitInputError(str(exc)) from None


# --- 2204 output / 2207 setlinfo out and back -----------------------------------------------

def export_line_splits(lines: Sequence[LineSplit]) -> list[dict[str, Any]]:
    """The per-line split as NHSA 2204 output rows: amounts as yuan strings, class as code.

    Shape per row: ``feedetl_sn``, ``hilist_code``, ``hilist_name``, ``chrgitm_lv`` ("01" /
    "02" / "03"), ``pric``, ``cnt``, ``selfpay_prop``, ``pric_uplmt_amt`` (string or absent),
    ``det_item_fee_sumamt``, ``fulamt_ownpay_amt``, ``overlmt_amt``, ``preselfpay_amt``,
    ``inscp_scp_amt`` ("12.34"), ``memo`` (when the line has one: why it is wholly self-paid).
    """
    rows = []
    for line in lines:
        row: dict[str, Any] = {
            "feedetl_sn": line.feedetl_sn, "hilist_code": line.hilist_code, "hilist_name": line.name,
            "chrgitm_lv": _CHRGITM_LV_TO_CODE[line.chrgitm_lv], "pric": line.pric, "cnt": line.cnt,
            "selfpay_prop": line.selfpay_prop,
        }
        if line.pric_uplmt_amt is not None:
            row["pric_uplmt_amt"] = line.pric_uplmt_amt
        for name in ("det_item_fee_sumamt", "fulamt_ownpay_amt", "overlmt_amt", "preselfpay_amt", "inscp_scp_amt"):
            row[name] = format_yuan(getattr(line, name))
        if line.memo:
            row["memo"] = line.memo
        rows.append(row)
    return rows


def export_setlinfo(setlinfo: SetlInfo) -> dict[str, str]:
    """A settlement as the NHSA 2207 / 2304 ``setlinfo`` object: amounts as yuan strings.

    Every amount field of :class:`~settlement.split.SetlInfo` becomes ``format_yuan`` of its
    fen ("497.01"); ``pool_prop_selfpay`` stays the ratio string; ``setl_id``, ``mdtrt_id`` and
    ``psn_no`` are copied.  Inverse: :func:`parse_setlinfo`.
    """
    out: dict[str, str] = {}
    for name, value in setlinfo.to_dict().items():
        out[name] = format_yuan(value) if name in SETLINFO_AMOUNT_FIELDS else value
    return out


def parse_setlinfo(raw: Mapping[str, Any], *, where: str = "setlinfo") -> SetlInfo:
    """Read an NHSA 2207 / 2304 / 5203 ``setlinfo`` object (yuan strings) into a SetlInfo (fen).

    Required: every amount field except the funds other than ``hifp_pay`` (``hifmi_pay``,
    ``hifob_pay``, ``cvlserv_pay``, ``maf_pay``, ``oth_pay``: "0.00" when absent).  Amounts
    have at most two decimals; floats are refused.  Raises :class:`SplitInputError` naming the
    field, also when the settlement identities do not hold.
    """
    if not isinstance(raw, Mapping):
        raise SplitInputError(f"{where}: expected an object, got {type(raw).__name__}")
    values: dict[str, Any] = {}
    for name in SETLINFO_AMOUNT_FIELDS:
        label = f"{where}.{name}"
        if raw.get(name) in (None, ""):
            if name in FUND_FIELDS and name != "hifp_pay":
                values[name] = 0
                continue
            raise SplitInputError(f"{label}: missing")
        values[name] = _yuan(raw[name], label)
    for name in ("pool_prop_selfpay", "setl_id", "mdtrt_id", "psn_no"):
        value = raw.get(name, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise SplitInputError(f"{where}.{name}: expected a string, got {type(value).__name__}")
        values[name] = value
    setlinfo = SetlInfo(**values)
    errors = setlinfo_identity_errors(setlinfo)
    if errors:
        raise SplitInputError(f"{where}: {errors[0]}")
    return setlinfo


# --- 3201 / 3202 reconciliation -------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SettlementRecord:
    """One settlement (or reversal) for reconciliation: its setlinfo and its grouping codes.

    ``insutype`` ("310", "390"...), ``clr_type`` ("11" outpatient, "21" inpatient; see
    :func:`clr_type_for`), ``refd_setl_flag`` "0" for a settlement, "1" for the reversal of an
    earlier one (counts negative).  Ids come from ``setlinfo``.
    """

    setlinfo: SetlInfo
    insutype: str
    clr_type: str
    refd_setl_flag: str = "0"


_RECORD_AMOUNTS = ("medfee_sumamt", "fund_pay_sumamt", "acct_pay", "psn_cash_pay")


def _flatten(record: Any, label: str) -> dict[str, Any]:
    """A record (SettlementRecord or mapping) as a flat dict of the reconciliation fields."""
    if isinstance(record, SettlementRecord):
        flat: dict[str, Any] = {**record.setlinfo.to_dict(), "insutype": record.insutype,
                                "clr_type": record.clr_type, "refd_setl_flag": record.refd_setl_flag}
    elif isinstance(record, Mapping):
        inner = record.get("setlinfo", {})
        if isinstance(inner, SetlInfo):
            inner = inner.to_dict()
        if not isinstance(inner, Mapping):
            raise SplitInputError(f"{label}.setlinfo: expected an object")
        flat = {**inner, **{k: v for k, v in record.items() if k != "setlinfo"}}
    else:
        raise SplitInputError(f"{label}: expected a SettlementRecord or an object, got {type(record).__name__}")
    flat.setdefault("refd_setl_flag", "0")
    for name in ("insutype", "clr_type"):
        if not isinstance(flat.get(name), str) or not flat[name]:
            raise SplitInputError(f"{label}.{name}: missing")
    if flat["refd_setl_flag"] not in REFD_SETL_FLAGS:
        raise SplitInputError(f"{label}.refd_setl_flag: {flat['refd_setl_flag']!r} is not \"0\" or \"1\"")
    for name in _RECORD_AMOUNTS:
        value = flat.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SplitInputError(f"{label}.{name}: expected a non-negative integer of fen, got {value!r}")
    for name in ("setl_id", "mdtrt_id", "psn_no"):
        value = flat.get(name, "")
        if not isinstance(value, str):
            raise SplitInputError(f"{label}.{name}: expected a string")
        flat[name] = value
    return flat


def _records(records: Iterable[Any]) -> list[dict[str, Any]]:
    flats = []
    for i, record in enumerate(records):
        if i >= RECORDS_MAX:
            raise SplitInputError(f"records: more than {RECORDS_MAX}")
        flats.append(_flatten(record, f"records[{i}]"))
    return flats


def totals_3201_fen(records: Iterable[Any]) -> dict[tuple[str, str], dict[str, int]]:
    """NHSA 3201 totals in fen: ``{(insutype, clr_type): {"medfee_sumamt", "fund_pay_sumamt",
    "acct_pay", "fixmedins_setl_cnt"}}`` over the records (reversals count negative).

    ``records``: :class:`SettlementRecord` objects or mappings holding ``insutype``,
    ``clr_type``, optional ``refd_setl_flag`` and the amounts (int fen) either flat or under
    ``setlinfo``.  Raises :class:`SplitInputError` for a malformed record.
    """
    totals: dict[tuple[str, str], dict[str, int]] = {}
    for flat in _records(records):
        sign = -1 if flat["refd_setl_flag"] == "1" else 1
        group = totals.setdefault((flat["insutype"], flat["clr_type"]), {
            "medfee_sumamt": 0, "fund_pay_sumamt": 0, "acct_pay": 0, "fixmedins_setl_cnt": 0})
        for name in ("medfee_sumamt", "fund_pay_sumamt", "acct_pay"):
            group[name] += sign * flat[name]
        group["fixmedins_setl_cnt"] += sign
    return totals


def totals_3201(records: Iterable[Any]) -> list[dict[str, Any]]:
    """NHSA 3201 reconciliation rows, one per (insutype, clr_type), sorted by that key.

    Row shape: ``{"insutype", "clr_type", "medfee_sumamt": "1234.56", "fund_pay_sumamt",
    "acct_pay", "fixmedins_setl_cnt": int}``; amounts are yuan strings of the fen totals of
    :func:`totals_3201_fen`.
    """
    rows = []
    for (insutype, clr_type), group in sorted(totals_3201_fen(records).items()):
        rows.append({"insutype": insutype, "clr_type": clr_type,
                     "medfee_sumamt": format_yuan(group["medfee_sumamt"]),
                     "fund_pay_sumamt": format_yuan(group["fund_pay_sumamt"]),
                     "acct_pay": format_yuan(group["acct_pay"]),
                     "fixmedins_setl_cnt": group["fixmedins_setl_cnt"]})
    return rows


def detail_rows_3202(records: Iterable[Any]) -> list[dict[str, str]]:
    """NHSA 3202 detail rows, one per record in input order.

    Row shape: ``{"setl_id", "mdtrt_id", "psn_no", "medfee_sumamt", "fund_pay_sumamt",
    "acct_pay", "cash_payamt", "refd_setl_flag"}``; amounts are yuan strings, negative for a
    reversal; ``cash_payamt`` is the settlement's ``psn_cash_pay`` (3202 compares cash where
    3201 compares the account).  ``setl_id`` must be non-empty.
    Raises :class:`SplitInputError` for a malformed record.
    """
    rows = []
    for i, flat in enumerate(_records(records)):
        if not flat["setl_id"]:
            raise SplitInputError(f"records[{i}].setl_id: missing")
        sign = -1 if flat["refd_setl_flag"] == "1" else 1
        rows.append({"setl_id": flat["setl_id"], "mdtrt_id": flat["mdtrt_id"], "psn_no": flat["psn_no"],
                     "medfee_sumamt": format_yuan(sign * flat["medfee_sumamt"]),
                     "fund_pay_sumamt": format_yuan(sign * flat["fund_pay_sumamt"]),
                     "acct_pay": format_yuan(sign * flat["acct_pay"]),
                     "cash_payamt": format_yuan(sign * flat["psn_cash_pay"]),
                     "refd_setl_flag": flat["refd_setl_flag"]})
    return rows
