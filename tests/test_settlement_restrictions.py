"""The catalogue's payment restrictions (限定支付范围) at settlement.

An item restricted to inpatients, to a minimum hospital level, to one sex or to an age range is
not paid by the funds for a visit outside that restriction: the line becomes wholly self-paid
(class C, ``fulamt_ownpay_amt``) with the reason in its 2204 ``memo``. The same visit inside the
restriction is paid as the catalogue classes it. Pre-settlement and settlement agree, a resend
replays, a partial refund keeps the line self-paid, and the NHSA 2204 export carries the memo.
"""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from settlement.catalogue import CatalogueItem
from settlement.nhsa import export_line_splits
from settlement.service import TerminalContext, completed_years, restriction_unmet
from settlement.split import LineSplit
from tests.test_settlement_flows import CLINIC, info_of, make_world

TIER3 = TerminalContext("TC000003", "H33030200011", "clinic", 3)


def _item(restriction: str, lv: str = "A") -> CatalogueItem:
    from decimal import Decimal

    return CatalogueItem(hilist_code="X1", name="测试药", kind="drug", chrgitm_lv=lv,
                         selfpay_prop=Decimal("0.1") if lv == "B" else Decimal(0), pric_uplmt_amt=None,
                         unit="支", restriction=restriction)


@pytest.mark.parametrize("restriction, visit, unmet", [
    ("限定就医方式:住院", dict(inpatient=False), "inpatients only"),
    ("限定就医方式:住院", dict(inpatient=True), None),
    ("限定机构等级:三级", dict(hospital_tier=2), "三级 hospitals and above"),
    ("限定机构等级:二级", dict(hospital_tier=2), None),
    ("限定性别对象:女", dict(gend="1"), "women only"),
    ("限定性别对象:女", dict(gend="2"), None),
    ("限定性别对象:男", dict(gend="0"), "men only"),  # unknown sex meets neither
    ("限定年龄对象:儿童", dict(age=18), "ages 0–17"),
    ("限定年龄对象:儿童", dict(age=17), None),
    ("年龄限制=新生儿", dict(age=0), None),
    ("年龄限制=新生儿", dict(age=1), "ages 0–0"),
    ("", dict(inpatient=False, hospital_tier=1, gend="0", age=99), None),
])
def test_restriction_unmet(restriction, visit, unmet):
    args = dict(inpatient=False, hospital_tier=3, gend="1", age=40) | visit
    memo = restriction_unmet(_item(restriction), **args)
    if unmet is None:
        assert memo is None
    else:
        assert unmet in memo and memo.endswith("wholly self-paid")


def _birthday(born: dt.date, year: int) -> dt.date:
    try:
        return born.replace(year=year)
    except ValueError:  # 29 February in a common year: the age turns on 1 March
        return dt.date(year, 3, 1)


@given(st.dates(dt.date(1900, 1, 1), dt.date(2030, 12, 31)), st.integers(0, 120 * 366))
def test_completed_years_counts_the_birthdays_passed(born, days):
    on = born + dt.timedelta(days=days)
    years = completed_years(born, on)
    assert _birthday(born, born.year + years) <= on < _birthday(born, born.year + years + 1)


def _pick(catalogue, test) -> CatalogueItem:
    return next(i for i in catalogue if i.basic_insurance_payable and i.chrgitm_lv in ("A", "B") and test(i))


@pytest.fixture
def world(db_url, tmp_path):
    with make_world(db_url, tmp_path) as w:
        yield w


def test_outpatient_visit_outside_restrictions_pays_those_lines_itself(world):
    cat = world.c.settlements.catalogue
    plain = _pick(cat, lambda i: not i.restricts_visits and i.chrgitm_lv == "A" and i.pric_uplmt_amt is None)
    items = {
        "inpatient": _pick(cat, lambda i: i.inpatient_only),
        "level3": _pick(cat, lambda i: i.hospital_level_min == 3 and not i.inpatient_only and i.sex is None
                        and i.age_min is None and i.age_max is None),
        "level2": _pick(cat, lambda i: i.hospital_level_min == 2 and not i.inpatient_only and i.sex is None
                        and i.age_min is None and i.age_max is None),
        "women": _pick(cat, lambda i: i.sex == "F" and i.hospital_level_min is None and i.age_max is None),
        "men": _pick(cat, lambda i: i.sex == "M" and i.hospital_level_min is None and i.age_max is None),
        "children": _pick(cat, lambda i: i.age_max == 17 and i.sex is None and i.hospital_level_min is None),
        "plain": plain,
    }
    unmet = {"inpatient", "level3", "women", "children"}
    p = world.add_person(wallet_fen=0)  # a man of about 76 (tests.test_settlement_flows.World.add_person)
    lines = [{"feedetl_sn": str(n), "hilist_code": item.hilist_code, "name": item.name, "pric": "100.00",
              "cnt": "2"} for n, item in enumerate(items.values(), start=1)]
    v = world.visit(p, world.bill(("A", "1.00", "1")))
    v["lines"] = lines
    pre = world.svc.presettle(CLINIC, v)
    doc = world.svc.settle(CLINIC, v)
    assert info_of(doc) == info_of(pre)
    by_sn = {x["feedetl_sn"]: x for x in doc["lines"]}
    for n, (what, item) in enumerate(items.items(), start=1):
        line = by_sn[str(n)]
        if what in unmet:
            assert line["chrgitm_lv"] == "C", what
            assert line["fulamt_ownpay_amt"] == line["det_item_fee_sumamt"] == 20_000
            assert line["memo"].startswith("restriction not met"), what
        else:
            assert line["chrgitm_lv"] == item.chrgitm_lv, what
            assert "memo" not in line, what
    info = doc["setlinfo"]
    assert info["fulamt_ownpay_amt"] == 20_000 * len(unmet)
    assert info["medfee_sumamt"] == info["fulamt_ownpay_amt"] + info["overlmt_selfpay"] + \
        info["preselfpay_amt"] + info["inscp_scp_amt"]
    assert info["medfee_sumamt"] == info["fund_pay_sumamt"] + info["acct_pay"] + info["psn_cash_pay"]
    # A resend is the same request: it replays, it is not "another bill".
    again = world.svc.settle(CLINIC, v)
    assert again["replayed"] and again["setl_id"] == doc["setl_id"] and again["lines"] == doc["lines"]
    # A partial refund re-splits the remaining units with the same classes and memos.
    refund = world.svc.refund(CLINIC, doc["setl_id"], {"msgid": world.msgid(world.next()),
                                                        "returns": [{"feedetl_sn": "1", "cnt": "1"}]})
    kept = {x["feedetl_sn"]: x for x in refund["lines"]}
    assert kept["1"]["chrgitm_lv"] == "C" and kept["1"]["det_item_fee_sumamt"] == 10_000
    assert kept["1"]["memo"] == by_sn["1"]["memo"]
    assert kept["7"]["chrgitm_lv"] == "A" and "memo" not in kept["7"]
    # The NHSA 2204 output carries the memo of the lines that have one.
    rows = export_line_splits([LineSplit(**x) for x in doc["lines"]])
    assert rows[0]["memo"] == by_sn["1"]["memo"] and rows[0]["chrgitm_lv"] == "03"
    assert "memo" not in rows[-1]


def test_the_same_items_inside_their_restrictions_are_paid(world):
    cat = world.c.settlements.catalogue
    inpatient = _pick(cat, lambda i: i.inpatient_only and i.hospital_level_min is None and i.sex is None
                      and i.age_min is None and i.age_max is None and i.chrgitm_lv == "A")
    level3 = _pick(cat, lambda i: i.hospital_level_min == 3 and not i.inpatient_only and i.sex is None
                   and i.age_min is None and i.age_max is None)
    p = world.add_person(wallet_fen=0)
    v = world.visit(p, world.bill(("A", "1.00", "1")), med_type="21", mid_setl_flag="1")
    v["lines"] = [{"feedetl_sn": "1", "hilist_code": inpatient.hilist_code, "pric": "50.00", "cnt": "1"}]
    doc = world.svc.settle(CLINIC, v)
    assert doc["lines"][0]["chrgitm_lv"] == "A" and "memo" not in doc["lines"][0]
    assert doc["setlinfo"]["fulamt_ownpay_amt"] == 0
    v = world.visit(p, world.bill(("A", "1.00", "1")), ctx=TIER3)
    v["lines"] = [{"feedetl_sn": "1", "hilist_code": level3.hilist_code, "pric": "50.00", "cnt": "1"}]
    doc = world.svc.settle(TIER3, v)
    assert doc["lines"][0]["chrgitm_lv"] == level3.chrgitm_lv and "memo" not in doc["lines"][0]
