"""NHSA-format exchange: 2204 lines in, 2207 setlinfo out and back, 3201 totals, 3202 details."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.money import AMOUNT_FEN_MAX, format_yuan, parse_yuan
from settlement.nhsa import (
    SettlementRecord,
    clr_type_for,
    detail_rows_3202,
    export_line_splits,
    export_setlinfo,
    parse_fee_details,
    parse_setlinfo,
    totals_3201,
    totals_3201_fen,
)
from settlement.policy import load_builtin
from settlement.split import (
    SETLINFO_AMOUNT_FIELDS,
    PersonState,
    SplitInputError,
    parse_bill_lines,
    split_visit,
)

VECTOR = json.loads((Path(__file__).parent / "vectors" / "settlement-outpatient-01.json").read_text(encoding="utf-8"))
POLICY_P = load_builtin("test-policy-P").find("310", False, 2, "11")
STATE_BEFORE = PersonState(**VECTOR["person_state_before"])
LEVEL_CODES = {"A": "01", "B": "02", "C": "03"}


def _as_2204(line: dict) -> dict:
    """The vector's bill line the way a HIS sends it in 2204: codes, catalogue names, extras."""
    out = {"feedetl_sn": line["feedetl_sn"], "med_list_codg": f"X{line['feedetl_sn']:0>5}",
           "medins_list_codg": f"H-{line['feedetl_sn']}", "med_list_name": line["name"],
           "chrgitm_lv": LEVEL_CODES[line["chrgitm_lv"]], "pric": line["pric"], "cnt": line["cnt"],
           "mdtrt_id": "M1", "fee_ocur_time": "2026-03-01 10:00:00"}
    for name in ("selfpay_prop", "pric_uplmt_amt"):
        if name in line:
            out[name] = line[name]
    return out


def test_2204_lines_settle_like_the_vector():
    raw = [_as_2204(line) for line in VECTOR["bill"]]
    raw[2]["det_item_fee_sumamt"] = "110.45"
    lines = parse_fee_details(raw)
    assert [line.chrgitm_lv for line in lines] == ["A", "A", "B", "B", "C"]
    assert lines[0].hilist_code == "X00001" and lines[0].name == "consultation fee"
    setlinfo = split_visit(POLICY_P, STATE_BEFORE, lines).setlinfo
    for name, value in VECTOR["expected_setlinfo"].items():
        assert getattr(setlinfo, name) == value


def test_2207_setlinfo_export_uses_yuan_strings():
    setlinfo = split_visit(POLICY_P, STATE_BEFORE, parse_bill_lines(VECTOR["bill"])).setlinfo
    out = export_setlinfo(setlinfo)
    assert out["medfee_sumamt"] == "497.01"
    assert out["hifp_pay"] == "123.45" and out["acct_pay"] == "300.00" and out["psn_cash_pay"] == "73.56"
    assert out["balc"] == "0.00" and out["hifmi_pay"] == "0.00"
    assert out["pool_prop_selfpay"] == "0.70"
    assert parse_setlinfo(out) == setlinfo


def test_2204_output_rows():
    result = split_visit(POLICY_P, STATE_BEFORE, parse_bill_lines(VECTOR["bill"]))
    rows = export_line_splits(result.lines)
    assert rows[2]["chrgitm_lv"] == "02" and rows[2]["preselfpay_amt"] == "11.05"
    assert rows[3]["overlmt_amt"] == "20.00" and rows[3]["pric_uplmt_amt"] == "120.00"
    assert rows[4]["fulamt_ownpay_amt"] == "91.60" and "pric_uplmt_amt" not in rows[4]


@pytest.mark.parametrize("change, fragment", [
    ({"det_item_fee_sumamt": "110.44"}, "feedetail[0].det_item_fee_sumamt: 110.44 does not equal pric × cnt = 110.45"),
    ({"det_item_fee_sumamt": "110.455"}, "feedetail[0].det_item_fee_sumamt"),
    ({"chrgitm_lv": "04"}, "feedetail[0].chrgitm_lv: '04' is not a charge item class"),
    ({"pric": 22.09}, "feedetail[0].pric: 22.09 is a float"),
    ({"cnt": "-5"}, "feedetail[0].cnt: must be positive"),
    ({"hilist_code": "OTHER"}, "feedetail[0].med_list_codg: 'X1' contradicts hilist_code 'OTHER'"),
    ({"feedetl_sn": None}, "feedetail[0].feedetl_sn: missing"),
])
def test_bad_2204_lines_are_refused(change, fragment):
    line = {"feedetl_sn": "1", "med_list_codg": "X1", "chrgitm_lv": "02", "pric": "22.09", "cnt": "5",
            "selfpay_prop": "0.10", **change}
    with pytest.raises(SplitInputError) as info:
        parse_fee_details([line])
    assert fragment in str(info.value)


@pytest.mark.parametrize("change, fragment", [
    ({"medfee_sumamt": "497.02"}, "medfee_sumamt != fulamt_ownpay_amt"),
    ({"hifp_pay": "123.455"}, "setlinfo.hifp_pay"),
    ({"acct_pay": 300.0}, "setlinfo.acct_pay"),
    ({"acct_pay": None}, "setlinfo.acct_pay: missing"),
    ({"psn_cash_pay": "-1.00"}, "psn_cash_pay"),
])
def test_bad_setlinfo_is_refused(change, fragment):
    good = export_setlinfo(split_visit(POLICY_P, STATE_BEFORE, parse_bill_lines(VECTOR["bill"])).setlinfo)
    with pytest.raises(SplitInputError) as info:
        parse_setlinfo({**good, **change})
    assert fragment in str(info.value)


@given(st.integers(-AMOUNT_FEN_MAX, AMOUNT_FEN_MAX))
def test_yuan_strings_round_trip(amount_fen):
    text = format_yuan(amount_fen)
    assert parse_yuan(text) == amount_fen
    whole, _, fraction = text.lstrip("-").partition(".")
    assert len(fraction) == 2 and whole.isdigit()


# --- reconciliation --------------------------------------------------------------------------

BOOK = load_builtin("test-policy-P")


@st.composite
def records(draw):
    insutype = draw(st.sampled_from(["310", "390"]))
    med_type = draw(st.sampled_from(["11", "13", "21"]))
    policy = BOOK.find(insutype, draw(st.booleans()), draw(st.integers(1, 3)), med_type)
    lines = parse_bill_lines([{"feedetl_sn": str(i), "chrgitm_lv": draw(st.sampled_from("ABC")),
                               "pric": str(draw(st.integers(0, 10**6))) + ".005", "cnt": str(draw(st.integers(1, 9)))}
                              for i in range(draw(st.integers(1, 4)))])
    state = PersonState(deductible_used_ytd_fen=draw(st.integers(0, 10**5)),
                        fund_paid_ytd_fen=draw(st.integers(0, 10**7)),
                        personal_account_balance_fen=draw(st.integers(0, 10**6)))
    n = draw(st.integers(0, 10**6))
    setlinfo = split_visit(policy, state, lines, setl_id=f"S{n}", mdtrt_id=f"M{n}", psn_no=f"P{n}").setlinfo
    flag = draw(st.sampled_from(["0", "0", "0", "1"]))
    if draw(st.booleans()):
        return SettlementRecord(setlinfo=setlinfo, insutype=insutype, clr_type=clr_type_for(med_type), refd_setl_flag=flag)
    return {"insutype": insutype, "clr_type": clr_type_for(med_type), "refd_setl_flag": flag, "setlinfo": setlinfo}


@settings(max_examples=100)
@given(st.lists(records(), max_size=30))
def test_3201_totals_add_up_and_match_the_3202_details(recs):
    fen = totals_3201_fen(recs)
    rows = totals_3201(recs)
    details = detail_rows_3202(recs)
    assert len(details) == len(recs)
    expected: dict = defaultdict(lambda: defaultdict(int))
    for rec, detail in zip(recs, details):
        if isinstance(rec, SettlementRecord):
            s, key, flag = rec.setlinfo, (rec.insutype, rec.clr_type), rec.refd_setl_flag
        else:
            s, key, flag = rec["setlinfo"], (rec["insutype"], rec["clr_type"]), rec["refd_setl_flag"]
        sign = -1 if flag == "1" else 1
        for name in ("medfee_sumamt", "fund_pay_sumamt", "acct_pay"):
            expected[key][name] += sign * getattr(s, name)
        expected[key]["fixmedins_setl_cnt"] += sign
        assert detail["setl_id"] == s.setl_id and detail["psn_no"] == s.psn_no
        assert parse_yuan(detail["cash_payamt"]) == sign * s.psn_cash_pay
        assert (parse_yuan(detail["fund_pay_sumamt"]) + parse_yuan(detail["acct_pay"])
                + parse_yuan(detail["cash_payamt"]) == parse_yuan(detail["medfee_sumamt"]))
    assert {k: dict(v) for k, v in expected.items()} == fen
    assert [(r["insutype"], r["clr_type"]) for r in rows] == sorted(fen)
    for row in rows:
        group = fen[(row["insutype"], row["clr_type"])]
        for name in ("medfee_sumamt", "fund_pay_sumamt", "acct_pay"):
            assert parse_yuan(row[name]) == group[name]
        assert row["fixmedins_setl_cnt"] == group["fixmedins_setl_cnt"]
    # 3202 rows of a group add up to its 3201 totals
    by_group: dict = defaultdict(lambda: defaultdict(int))
    for rec, detail in zip(recs, details):
        key = (rec.insutype, rec.clr_type) if isinstance(rec, SettlementRecord) else (rec["insutype"], rec["clr_type"])
        for name in ("medfee_sumamt", "fund_pay_sumamt", "acct_pay"):
            by_group[key][name] += parse_yuan(detail[name])
    for key, group in fen.items():
        for name in ("medfee_sumamt", "fund_pay_sumamt", "acct_pay"):
            assert by_group[key][name] == group[name]


def test_3201_from_flat_records_and_errors():
    recs = [
        {"insutype": "310", "clr_type": "11", "setl_id": "S1", "medfee_sumamt": 49701, "fund_pay_sumamt": 12345,
         "acct_pay": 30000, "psn_cash_pay": 7356},
        {"insutype": "310", "clr_type": "11", "setl_id": "S2", "medfee_sumamt": 100, "fund_pay_sumamt": 0,
         "acct_pay": 0, "psn_cash_pay": 100},
        {"insutype": "310", "clr_type": "11", "setl_id": "S2", "refd_setl_flag": "1", "medfee_sumamt": 100,
         "fund_pay_sumamt": 0, "acct_pay": 0, "psn_cash_pay": 100},
    ]
    assert totals_3201(recs) == [{"insutype": "310", "clr_type": "11", "medfee_sumamt": "497.01",
                                  "fund_pay_sumamt": "123.45", "acct_pay": "300.00", "fixmedins_setl_cnt": 1}]
    assert detail_rows_3202(recs)[2]["cash_payamt"] == "-1.00"
    with pytest.raises(SplitInputError, match=r"records\[0\].acct_pay"):
        totals_3201([{**recs[0], "acct_pay": "300.00"}])
    with pytest.raises(SplitInputError, match=r"records\[0\].clr_type: missing"):
        totals_3201([{k: v for k, v in recs[0].items() if k != "clr_type"}])
    with pytest.raises(SplitInputError, match=r"records\[0\].refd_setl_flag"):
        totals_3201([{**recs[0], "refd_setl_flag": "2"}])
    with pytest.raises(SplitInputError, match=r"records\[0\].setl_id: missing"):
        detail_rows_3202([{**recs[0], "setl_id": ""}])


def test_clr_type_for():
    assert [clr_type_for(m) for m in ("11", "13", "14", "21", "24")] == ["11", "11", "11", "21", "21"]


@settings(max_examples=100)
@given(st.lists(records(), min_size=1, max_size=1))
def test_setlinfo_round_trips_through_yuan_strings(recs):
    rec = recs[0]
    setlinfo = rec.setlinfo if isinstance(rec, SettlementRecord) else rec["setlinfo"]
    exported = export_setlinfo(setlinfo)
    assert all(parse_yuan(exported[name]) == getattr(setlinfo, name) for name in SETLINFO_AMOUNT_FIELDS)
    assert parse_setlinfo(json.loads(json.dumps(exported))) == setlinfo
