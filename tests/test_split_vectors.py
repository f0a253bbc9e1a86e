"""Every figure of the shared settlement vector, read from tests/vectors/ (a copy of the shared one)."""

from __future__ import annotations

import copy
import json
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import pytest

from settlement.policy import PolicyError, load_builtin, policy_from_mapping
from settlement.split import (
    PersonState,
    SplitInputError,
    parse_bill_lines,
    person_state_from_mapping,
    split_vector_document,
    split_visit,
)

VECTOR_PATH = Path(__file__).parent / "vectors" / "settlement-outpatient-01.json"


@pytest.fixture(scope="module")
def vector() -> dict:
    return json.loads(VECTOR_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def result(vector):
    return split_vector_document(vector)


def _variant(vector, prefix: str) -> dict:
    return next(v for v in vector["variants"] if v["name"].startswith(prefix))


def test_lines_every_figure(vector, result):
    assert len(result["lines"]) == len(vector["expected_lines"])
    for got, expected in zip(result["lines"], vector["expected_lines"]):
        for name, value in expected.items():
            assert got[name] == value, (expected["feedetl_sn"], name)


def test_setlinfo_every_figure(vector, result):
    for name, value in vector["expected_setlinfo"].items():
        assert result["setlinfo"][name] == value, name
    assert result["setlinfo"]["pool_prop_selfpay"] == "0.70"
    assert all(result["setlinfo"][n] == 0 for n in ("hifmi_pay", "hifob_pay", "cvlserv_pay", "maf_pay", "oth_pay"))


def test_person_state_after(vector, result):
    for name, value in vector["person_state_after"].items():
        assert result["person_state_after"][name] == value, name


@pytest.mark.parametrize("prefix", ["A:", "C:"])
def test_variants(vector, result, prefix):
    expected = _variant(vector, prefix)
    got = next(v for v in result["variants"] if v["name"] == expected["name"])
    for name, value in expected["expected_setlinfo"].items():
        assert got["setlinfo"][name] == value, (prefix, name)


def test_variant_a_account_pays_preselfpay_deductible_and_coinsurance(vector):
    s = vector["expected_setlinfo"]
    coinsurance = s["inscp_scp_amt"] - s["act_pay_dedc"] - s["hifp_pay"]
    assert _variant(vector, "A:")["expected_setlinfo"]["acct_pay"] == s["preselfpay_amt"] + s["act_pay_dedc"] + coinsurance


def test_variant_without_change_is_listed_with_the_base_result(vector, result):
    names = [v["name"] for v in result["variants"]]
    assert names == [v["name"] for v in vector["variants"]]
    d = next(v for v in result["variants"] if v["name"].startswith("D:"))
    assert d["setlinfo"] == result["setlinfo"]


def test_d_rounding_guard_line_3(vector, result):
    line3 = next(line for line in result["lines"] if line["feedetl_sn"] == "3")
    assert line3["preselfpay_amt"] == 1105 and line3["inscp_scp_amt"] == 9940
    # what half-even (Python's round) would have given, and what binary floats give:
    exact = Decimal("11045") * Decimal("0.10")
    assert exact == Decimal("1104.5")
    assert int(exact.quantize(Decimal(1), rounding=ROUND_HALF_EVEN)) == 1104
    # the binary float nearest 11.045 yuan lies below it, so float formatting gives 11.04 too
    assert Decimal(11.045) < Decimal("11.045") and "%.2f" % 11.045 == "11.04"


def test_direct_api_matches_the_document(vector, result):
    policy = load_builtin("test-policy-P").find("310", False, 2, "11")
    state = person_state_from_mapping(vector["person_state_before"])
    split = split_visit(policy, state, parse_bill_lines(vector["bill"]))
    assert split.to_dict()["setlinfo"] == result["setlinfo"]
    assert split.to_dict()["lines"] == result["lines"]
    assert split.state_after.to_dict() == result["person_state_after"]


def test_builtin_policy_p_equals_the_vector_policy(vector):
    inline = policy_from_mapping(vector["policy"])
    book = load_builtin("test-policy-P").find("310", False, 2, "11")
    for name in ("insutype", "retired", "hospital_tier", "med_type", "deductible_per_year_fen",
                 "fund_ratio", "annual_cap_fen", "acct_scope", "name"):
        assert getattr(book, name) == getattr(inline, name), name


def test_repo_copy_is_byte_identical_to_the_shared_vector():
    shared = Path("/work/shared/vectors/settlement-outpatient-01.json")
    if not shared.exists():
        pytest.skip("the shared folder is not on this machine; the repo copy is the reference")
    assert shared.read_bytes() == VECTOR_PATH.read_bytes()


def test_state_before_is_not_mutated(vector):
    before = copy.deepcopy(vector)
    split_vector_document(vector)
    assert vector == before


@pytest.mark.parametrize("mutate, error, fragment", [
    (lambda d: d["policy"].pop("fund_ratio"), PolicyError, "policy.fund_ratio: missing"),
    (lambda d: d["policy"].update(fund_ratio=0.7), PolicyError, "policy.fund_ratio"),
    (lambda d: d["policy"].update(acct_scope="everything"), PolicyError, "policy.acct_scope"),
    (lambda d: d.pop("policy"), SplitInputError, "policy: missing"),
    (lambda d: d.pop("bill"), SplitInputError, "bill: missing"),
    (lambda d: d["bill"][2].update(cnt="0"), SplitInputError, "bill[2].cnt: must be positive"),
    (lambda d: d["bill"][1].update(pric=0.415), SplitInputError, "bill[1].pric"),
    (lambda d: d["bill"][0].update(chrgitm_lv="D"), SplitInputError, "bill[0].chrgitm_lv"),
    (lambda d: d["person_state_before"].update(fund_paid_ytd_fen=-1), SplitInputError,
     "person_state_before.fund_paid_ytd_fen"),
    (lambda d: d["variants"][0].update(change={"nowhere.x": 1}), SplitInputError, "variants[0].change"),
    (lambda d: d["variants"][0].update(change={"policy.fund_ratio": "2"}), PolicyError,
     "variants[0]: policy.fund_ratio: 2 is outside 0..1"),
])
def test_bad_documents_are_refused_naming_the_field(vector, mutate, error, fragment):
    doc = copy.deepcopy(vector)
    mutate(doc)
    with pytest.raises(error) as info:
        split_vector_document(doc)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_change_paths_reach_bill_lines_and_remove_fields(vector):
    doc = copy.deepcopy(vector)
    doc["variants"] = [
        {"name": "one unit fewer of line 3", "change": {"bill.2.cnt": "4"}},
        {"name": "no ceiling on line 4", "change": {"bill.3.pric_uplmt_amt": None}},
    ]
    out = split_vector_document(doc)
    fewer, no_ceiling = out["variants"]
    assert fewer["lines"][2]["det_item_fee_sumamt"] == 8836
    assert no_ceiling["lines"][3]["overlmt_amt"] == 0
    assert no_ceiling["setlinfo"]["overlmt_selfpay"] == 0


def test_person_state_defaults_to_zero_when_omitted(vector):
    doc = {"policy": vector["policy"], "bill": vector["bill"]}
    out = split_vector_document(doc)
    assert out["setlinfo"]["act_pay_dedc"] == 32636
    assert out["person_state_after"] == PersonState(deductible_used_ytd_fen=32636).to_dict()


# --- bill input validation (parse_bill_lines) -------------------------------------------------

GOOD_LINE = {"feedetl_sn": "1", "name": "x", "chrgitm_lv": "B", "pric": "22.09", "cnt": "5", "selfpay_prop": "0.10"}


@pytest.mark.parametrize("change, fragment", [
    ({"cnt": "0"}, "bill[1].cnt: must be positive"),
    ({"cnt": "-1"}, "bill[1].cnt: must be positive"),
    ({"cnt": 5.0}, "bill[1].cnt: 5.0 is a float"),
    ({"pric": 22.09}, "bill[1].pric: 22.09 is a float"),
    ({"pric": "-0.01"}, "bill[1].pric: must not be negative"),
    ({"pric": "abc"}, "bill[1].pric: 'abc' is not a decimal number"),
    ({"pric": "NaN"}, "bill[1].pric"),
    ({"pric": "1.0000001"}, "bill[1].pric: 1.0000001 has more than 6 decimals"),
    ({"chrgitm_lv": "D"}, "bill[1].chrgitm_lv: 'D' is not a charge item class"),
    ({"chrgitm_lv": "a"}, "bill[1].chrgitm_lv"),
    ({"selfpay_prop": "1.5"}, "bill[1].selfpay_prop: 1.5 is outside 0..1"),
    ({"chrgitm_lv": "A"}, "bill[1].selfpay_prop: 0.10 given for a class A item"),
    ({"pric_uplmt_amt": "-1"}, "bill[1].pric_uplmt_amt: must not be negative"),
    ({"pric": "10000000000000", "cnt": "1000"}, "bill[1].det_item_fee_sumamt"),
    ({"pric": "10000000000001"}, "bill[1].pric"),
    ({"feedetl_sn": "0"}, "bill[1].feedetl_sn: '0' repeats bill[0]"),
    ({"feedetl_sn": ""}, "bill[1].feedetl_sn: must not be empty"),
    ({"selfpay_prob": "0.1"}, "bill[1].selfpay_prob: unknown field"),
])
def test_bad_bill_lines_are_refused_naming_line_and_field(change, fragment):
    raw = [{**GOOD_LINE, "feedetl_sn": "0"}, {**GOOD_LINE, **change}]
    with pytest.raises(SplitInputError) as info:
        parse_bill_lines(raw)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_bill_limits():
    with pytest.raises(SplitInputError, match="bill: no lines"):
        parse_bill_lines([])
    with pytest.raises(SplitInputError, match="more than 1000"):
        parse_bill_lines([{**GOOD_LINE, "feedetl_sn": str(i)} for i in range(1001)])
    assert len(parse_bill_lines([{**GOOD_LINE, "feedetl_sn": str(i)} for i in range(1000)])) == 1000
    with pytest.raises(SplitInputError, match="bill: expected a list"):
        parse_bill_lines({"0": GOOD_LINE})
    big = [{**GOOD_LINE, "feedetl_sn": str(i), "pric": "9000000000000", "cnt": "1"} for i in range(2)]
    policy = load_builtin("test-policy-P").find("310", False, 2, "11")
    with pytest.raises(SplitInputError, match="bill: total .* beyond the limit"):
        split_visit(policy, PersonState(), parse_bill_lines(big))


def test_ints_are_accepted_for_prices_quantities_and_serial_numbers():
    (line,) = parse_bill_lines([{"feedetl_sn": 7, "chrgitm_lv": "C", "pric": 3, "cnt": 2, "selfpay_prop": "1"}])
    assert (line.feedetl_sn, line.pric, line.cnt) == ("7", Decimal(3), Decimal(2))


# --- second tier and inpatient, worked examples ------------------------------------------------

def test_second_tier_pays_above_the_cap_as_documented():
    """Eligible 50000 fen, ratio 0.70, cap remaining 10000: basic 10000, covered 14285,
    excess 35715, second tier at 0.80 = 28572."""
    policy = policy_from_mapping({
        "insutype": "310", "retired": False, "hospital_tier": 2, "med_type": "21",
        "deductible_per_admission_fen": 0, "deductible_ratio_2nd_admission": "1",
        "deductible_ratio_3rd_plus_admission": "1", "fund_ratio": "0.70", "annual_cap_fen": 1_000_000,
        "serious_illness_ratio": "0.80", "serious_illness_cap_fen": 1_000_000, "acct_scope": "all_personal_part"})
    state = PersonState(fund_paid_ytd_fen=990_000)
    lines = parse_bill_lines([{"feedetl_sn": "1", "chrgitm_lv": "A", "pric": "500.00", "cnt": "1"}])
    result = split_visit(policy, state, lines)
    s = result.setlinfo
    assert (s.hifp_pay, s.hifmi_pay, s.fund_pay_sumamt, s.psn_part_amt) == (10000, 28572, 38572, 11428)
    assert result.state_after.fund_paid_ytd_fen == 1_000_000
    assert result.state_after.serious_illness_paid_ytd_fen == 28572
    # the next admission: basic cap used up, everything eligible goes to the second tier
    again = split_visit(policy, result.state_after, lines).setlinfo
    assert (again.hifp_pay, again.hifmi_pay) == (0, 40000)


def test_inpatient_interim_then_final_settlement():
    policy = load_builtin("test-policy-P").find("310", False, 2, "21")  # deductible 80000, 2nd 0.50
    lines = parse_bill_lines([{"feedetl_sn": "1", "chrgitm_lv": "A", "pric": "500.00", "cnt": "1"}])
    state = PersonState(admissions_ytd=1)  # second admission of the year: deductible 40000
    first = split_visit(policy, state, lines, interim=True)
    assert first.setlinfo.act_pay_dedc == 40000 and first.setlinfo.hifp_pay == 8500
    assert first.state_after.admission_deductible_used_fen == 40000 and first.state_after.admissions_ytd == 1
    final = split_visit(policy, first.state_after, lines)
    assert final.setlinfo.act_pay_dedc == 0 and final.setlinfo.hifp_pay == 42500
    assert final.state_after.admission_deductible_used_fen == 0 and final.state_after.admissions_ytd == 2
    assert final.state_after.deductible_used_ytd_fen == 0
