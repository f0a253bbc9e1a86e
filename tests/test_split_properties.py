"""Properties of the split (hypothesis): identities, caps, half-up rounding, accumulators, refunds."""

from __future__ import annotations

import dataclasses
from decimal import ROUND_HALF_EVEN, ROUND_HALF_UP, Decimal

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from settlement.policy import Policy, load_builtin
from settlement.split import (
    LINE_AMOUNT_FIELDS,
    SETLINFO_AMOUNT_FIELDS,
    BillLine,
    PersonState,
    SplitInputError,
    admission_deductible_fen,
    parse_bill_lines,
    partial_refund,
    refund_difference,
    split_line,
    split_visit,
)

# --- strategies -----------------------------------------------------------------------------

def _scaled(max_int: int, places: int, min_int: int = 0):
    return st.integers(min_int, max_int).map(lambda n: Decimal(n).scaleb(-places))


ratios = st.one_of(_scaled(100, 2), _scaled(10_000, 4))
fen = st.integers(0, 10**8)


@st.composite
def policies(draw, *, inpatient: bool | None = None, second_tier: bool | None = None):
    if inpatient is None:
        inpatient = draw(st.booleans())
    med_type = draw(st.sampled_from(["21", "24"] if inpatient else ["11", "13", "14"]))
    if second_tier is None:
        second_tier = draw(st.booleans())
    kwargs = dict(
        name="prop", insutype=draw(st.sampled_from(["310", "390"])), retired=draw(st.booleans()),
        hospital_tier=draw(st.integers(1, 3)), med_type=med_type, fund_ratio=draw(ratios),
        annual_cap_fen=draw(st.one_of(fen, st.integers(0, 10**5))),
        acct_scope=draw(st.sampled_from(["all_personal_part", "inscope_selfpay_only"])))
    if inpatient:
        kwargs.update(deductible_per_admission_fen=draw(st.integers(0, 10**6)),
                      deductible_ratio_2nd_admission=draw(ratios),
                      deductible_ratio_3rd_plus_admission=draw(ratios))
    else:
        kwargs["deductible_per_year_fen"] = draw(st.integers(0, 10**6))
    if second_tier:
        kwargs.update(serious_illness_ratio=draw(ratios), serious_illness_cap_fen=draw(fen))
    return Policy(**kwargs)


states = st.builds(PersonState, deductible_used_ytd_fen=st.integers(0, 10**6), fund_paid_ytd_fen=fen,
                   personal_account_balance_fen=st.one_of(st.integers(0, 10**5), fen),
                   admissions_ytd=st.integers(0, 5), serious_illness_paid_ytd_fen=fen,
                   admission_deductible_used_fen=st.integers(0, 10**5))


@st.composite
def bill_lines(draw, *, sn: int):
    level = draw(st.sampled_from("ABC"))
    pric = draw(st.one_of(_scaled(10**6, 2), _scaled(10**7, 3), _scaled(10**4, 6)))
    cnt = draw(st.one_of(_scaled(100, 0, 1), _scaled(10**4, 2, 1), _scaled(10**6, 4, 1)))
    prop = draw(_scaled(100, 2)) if level == "B" else Decimal(0)
    ceiling = draw(st.one_of(st.none(), _scaled(10**6, 2)))
    return BillLine(feedetl_sn=str(sn), chrgitm_lv=level, pric=pric, cnt=cnt, selfpay_prop=prop,
                    pric_uplmt_amt=ceiling)


@st.composite
def bills(draw, min_size: int = 1, max_size: int = 12):
    n = draw(st.integers(min_size, max_size))
    return [draw(bill_lines(sn=i + 1)) for i in range(n)]


def _assert_identities(result, policy: Policy, state: PersonState) -> None:
    s = result.setlinfo
    for name in SETLINFO_AMOUNT_FIELDS:
        assert isinstance(getattr(s, name), int) and getattr(s, name) >= 0, name
    for line in result.lines:
        for name in LINE_AMOUNT_FIELDS:
            assert getattr(line, name) >= 0
        assert line.det_item_fee_sumamt == (line.fulamt_ownpay_amt + line.overlmt_amt
                                            + line.preselfpay_amt + line.inscp_scp_amt)
    assert s.medfee_sumamt == s.fulamt_ownpay_amt + s.overlmt_selfpay + s.preselfpay_amt + s.inscp_scp_amt
    assert s.medfee_sumamt == sum(line.det_item_fee_sumamt for line in result.lines)
    assert s.fund_pay_sumamt == s.hifp_pay + s.hifmi_pay + s.hifob_pay + s.cvlserv_pay + s.maf_pay + s.oth_pay
    assert s.psn_part_amt == s.acct_pay + s.psn_cash_pay
    assert s.medfee_sumamt == s.fund_pay_sumamt + s.psn_part_amt
    assert s.act_pay_dedc <= s.inscp_scp_amt
    assert s.fund_pay_sumamt <= s.inscp_scp_amt - s.act_pay_dedc
    assert s.balc == state.personal_account_balance_fen - s.acct_pay
    if policy.acct_scope == "inscope_selfpay_only":
        assert s.acct_pay <= s.preselfpay_amt + s.inscp_scp_amt - s.fund_pay_sumamt
    assert s.pool_prop_selfpay == str(policy.fund_ratio)
    after = result.state_after
    assert all(v >= 0 for v in after.to_dict().values())
    assert after.personal_account_balance_fen == s.balc
    assert after.fund_paid_ytd_fen == state.fund_paid_ytd_fen + s.hifp_pay
    assert after.serious_illness_paid_ytd_fen == state.serious_illness_paid_ytd_fen + s.hifmi_pay


# --- identities, caps, no negative figure ---------------------------------------------------

@settings(max_examples=300)
@given(policy=policies(), state=states, lines=bills(), interim=st.booleans())
def test_every_identity_holds_and_no_figure_is_negative(policy, state, lines, interim):
    interim = interim and policy.is_inpatient
    result = split_visit(policy, state, lines, interim=interim)
    _assert_identities(result, policy, state)


@settings(max_examples=200)
@given(policy=policies(), state=states, lines=bills())
def test_funds_never_pay_past_their_caps(policy, state, lines):
    s = split_visit(policy, state, lines).setlinfo
    assert s.hifp_pay <= max(0, policy.annual_cap_fen - state.fund_paid_ytd_fen)
    if policy.has_second_tier:
        assert s.hifmi_pay <= max(0, policy.serious_illness_cap_fen - state.serious_illness_paid_ytd_fen)
        if s.hifmi_pay:  # the second tier only pays once the basic fund hit its cap
            assert state.fund_paid_ytd_fen + s.hifp_pay >= policy.annual_cap_fen
    else:
        assert s.hifmi_pay == 0


@settings(max_examples=100)
@given(policy=policies(inpatient=False), state=states, visits=st.lists(bills(max_size=5), min_size=1, max_size=6))
def test_visits_chained_through_state_after_respect_the_caps(policy, state, visits):
    total_fund = 0
    for lines in visits:
        result = split_visit(policy, state, lines)
        total_fund += result.setlinfo.hifp_pay
        state = result.state_after
    assert total_fund <= max(0, policy.annual_cap_fen - (state.fund_paid_ytd_fen - total_fund))


# --- deductible accumulates over the year ---------------------------------------------------

@settings(max_examples=150)
@given(policy=policies(inpatient=False), used=st.integers(0, 10**6), first=bills(), second=bills())
def test_two_visits_never_take_more_deductible_than_per_year(policy, used, first, second):
    state = PersonState(deductible_used_ytd_fen=used, personal_account_balance_fen=10**5)
    one = split_visit(policy, state, first)
    two = split_visit(policy, one.state_after, second)
    taken = one.setlinfo.act_pay_dedc + two.setlinfo.act_pay_dedc
    assert taken <= max(0, policy.deductible_per_year_fen - used)
    assert two.state_after.deductible_used_ytd_fen == used + taken
    assert two.state_after.deductible_used_ytd_fen <= max(used, policy.deductible_per_year_fen)
    # the deductible is taken first: a second visit bears some only if the first exhausted its in-policy amount
    if two.setlinfo.act_pay_dedc:
        assert one.setlinfo.act_pay_dedc == one.setlinfo.inscp_scp_amt


@settings(max_examples=100)
@given(policy=policies(inpatient=True), state=states, parts=st.lists(bills(max_size=4), min_size=1, max_size=4))
def test_an_admission_never_bears_more_than_its_deductible(policy, state, parts):
    state = before = dataclasses.replace(state, admission_deductible_used_fen=0)
    deductible = admission_deductible_fen(policy, state.admissions_ytd + 1)
    taken = 0
    for i, lines in enumerate(parts):
        final = i == len(parts) - 1
        result = split_visit(policy, state, lines, interim=not final)
        taken += result.setlinfo.act_pay_dedc
        state = result.state_after
        if not final:
            assert state.admission_deductible_used_fen == taken
    assert taken <= deductible
    assert state.admission_deductible_used_fen == 0
    assert state.admissions_ytd == before.admissions_ytd + 1  # interim settlements do not close it
    assert state.deductible_used_ytd_fen == before.deductible_used_ytd_fen  # outpatient accumulator untouched


@given(policy=policies(inpatient=True), lines=bills(max_size=3))
def test_later_admissions_bear_the_reduced_deductible(policy, lines):
    state = PersonState()
    expected = [policy.deductible_per_admission_fen,
                admission_deductible_fen(policy, 2), admission_deductible_fen(policy, 3),
                admission_deductible_fen(policy, 3)]
    for n, deductible in enumerate(expected):
        result = split_visit(policy, state, lines)
        assert result.setlinfo.act_pay_dedc == min(deductible, result.setlinfo.inscp_scp_amt)
        assert result.state_after.admissions_ytd == n + 1
        state = result.state_after


def test_admission_deductible_factors():
    policy = load_builtin("test-policy-P").find("310", False, 2, "21")
    assert [admission_deductible_fen(policy, n) for n in (1, 2, 3, 7)] == [80000, 40000, 0, 0]
    with pytest.raises(SplitInputError, match="interim"):
        split_visit(load_builtin("test-policy-P").find("310", False, 2, "11"), PersonState(),
                    [BillLine(feedetl_sn="1", chrgitm_lv="A", pric="1", cnt="1")], interim=True)


# --- half-up rounding ------------------------------------------------------------------------

def _oracle(value: Decimal) -> int:
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


@settings(max_examples=500)
@given(line=bill_lines(sn=1))
def test_line_amounts_round_half_up_like_the_decimal_oracle(line):
    split = split_line(line)
    total = line.pric * line.cnt * 100
    assert split.det_item_fee_sumamt == _oracle(total)
    if line.chrgitm_lv == "B":
        over = split.overlmt_amt
        assert split.preselfpay_amt == _oracle((split.det_item_fee_sumamt - over) * line.selfpay_prop)


@given(m=st.integers(0, 10**9))
def test_a_half_fen_rounds_up_where_half_even_would_round_down(m):
    pric = (Decimal(2 * m) + Decimal("0.5")) / 100  # yuan; an exact half fen above an even fen
    split = split_line(BillLine(feedetl_sn="1", chrgitm_lv="A", pric=pric, cnt=1))
    assert split.det_item_fee_sumamt == 2 * m + 1
    assert int((pric * 100).quantize(Decimal(1), rounding=ROUND_HALF_EVEN)) == 2 * m  # one fen less


@settings(max_examples=300)
@given(amount=st.integers(0, 10**9), ratio=ratios, policy=policies(inpatient=False, second_tier=False))
def test_fund_share_is_rounded_once_half_up(amount, ratio, policy):
    policy = dataclasses.replace(policy, fund_ratio=ratio, deductible_per_year_fen=0, annual_cap_fen=10**15)
    result = split_visit(policy, PersonState(), [BillLine(feedetl_sn="1", chrgitm_lv="A", pric=Decimal(amount) / 100, cnt=1)])
    assert result.setlinfo.hifp_pay == _oracle(Decimal(amount) * ratio)


# --- partial refund: cancel and re-split -----------------------------------------------------

@st.composite
def refunds(draw):
    lines = draw(bills(max_size=8))
    returned = {}
    for line in lines:
        if draw(st.booleans()):
            whole = int(line.cnt)
            units = draw(st.one_of(st.integers(0, whole).map(Decimal), st.just(line.cnt),
                                   _scaled(int(line.cnt * 100), 2)))
            returned[line.feedetl_sn] = min(units, line.cnt)
    return lines, returned


def _refund(policy, state, lines, returned):
    original = split_visit(policy, state, lines)
    remaining = partial_refund(lines, returned)
    assert all(line.cnt > 0 for line in remaining) and len(remaining) <= len(lines)
    resplit = split_visit(policy, state, remaining) if remaining else None
    return original, resplit, refund_difference(original.setlinfo, resplit.setlinfo if resplit else None)


@settings(max_examples=300)
@given(policy=policies(), state=states, case=refunds())
@example(policy=load_builtin("test-policy-P").find("310", False, 2, "11"),
         state=PersonState(deductible_used_ytd_fen=45000, fund_paid_ytd_fen=120000, personal_account_balance_fen=30000),
         case=([BillLine(feedetl_sn="2", chrgitm_lv="A", pric="0.415", cnt="24")], {"2": Decimal(1)}))
def test_partial_refund_payers_add_up_to_the_fee_difference(policy, state, case):
    lines, returned = case
    state = dataclasses.replace(state, admission_deductible_used_fen=0)
    original, resplit, diff = _refund(policy, state, lines, returned)
    assert diff["fund_pay_sumamt"] + diff["acct_pay"] + diff["psn_cash_pay"] == diff["medfee_sumamt"]
    assert diff["fund_pay_sumamt"] + diff["psn_part_amt"] == diff["medfee_sumamt"]
    remaining_by_sn = {s.feedetl_sn: s.det_item_fee_sumamt for s in (resplit.lines if resplit else ())}
    assert diff["medfee_sumamt"] == sum(s.det_item_fee_sumamt - remaining_by_sn.get(s.feedetl_sn, 0)
                                        for s in original.lines) >= 0
    assert diff["fulamt_ownpay_amt"] >= 0


@settings(max_examples=300)
@given(policy=policies(), state=states, case=refunds())
def test_partial_refund_without_price_ceilings_never_charges_anyone_more(policy, state, case):
    lines, returned = case
    lines = [dataclasses.replace(line, pric_uplmt_amt=None) for line in lines]
    state = dataclasses.replace(state, admission_deductible_used_fen=0)
    _, _, diff = _refund(policy, state, lines, returned)
    for name, value in diff.items():
        assert value >= 0, name


def test_with_a_price_ceiling_a_fractional_return_can_move_a_fen_into_the_fund():
    """pric 1.005, ceiling 0.001: cnt 1.25 → overlmt 126 of 126; cnt 1.24 → 124 of 125, in-policy 1."""
    policy = Policy(name="t", insutype="310", retired=False, hospital_tier=1, med_type="11",
                    fund_ratio=Decimal("1.00"), annual_cap_fen=10**6, acct_scope="all_personal_part",
                    deductible_per_year_fen=0)
    lines = [BillLine(feedetl_sn="1", chrgitm_lv="A", pric="1.005", cnt="1.25", pric_uplmt_amt="0.001")]
    _, _, diff = _refund(policy, PersonState(), lines, {"1": "0.01"})
    assert diff["medfee_sumamt"] == 1
    assert (diff["inscp_scp_amt"], diff["fund_pay_sumamt"], diff["psn_cash_pay"]) == (-1, -1, 2)


def test_refund_is_not_the_price_of_the_returned_units():
    """24 × 0.415 = 9.96 and 23 × 0.415 = 9.545 → 9.55: returning one unit refunds 0.41, not 0.42."""
    policy = load_builtin("test-policy-P").find("310", False, 2, "11")
    lines = parse_bill_lines([{"feedetl_sn": "2", "chrgitm_lv": "A", "pric": "0.415", "cnt": "24"}])
    state = PersonState(deductible_used_ytd_fen=60000)
    original = split_visit(policy, state, lines)
    resplit = split_visit(policy, state, partial_refund(lines, {"2": "1"}))
    assert refund_difference(original.setlinfo, resplit.setlinfo)["medfee_sumamt"] == 41
    alone = split_visit(policy, state, [dataclasses.replace(lines[0], cnt=Decimal(1))])
    assert alone.setlinfo.medfee_sumamt == 42


def test_refund_split_is_not_a_settlement_of_the_returned_units_alone():
    """The deductible makes the split non-linear: the refund goes to the fund, not to the person."""
    policy = load_builtin("test-policy-P").find("310", False, 2, "11")
    lines = parse_bill_lines([{"feedetl_sn": "1", "chrgitm_lv": "A", "pric": "100.00", "cnt": "10"}])
    state = PersonState(deductible_used_ytd_fen=0, personal_account_balance_fen=0)
    original = split_visit(policy, state, lines)  # 1000.00: 600.00 deductible, 0.70 of 400.00 = 280.00
    resplit = split_visit(policy, state, partial_refund(lines, {"1": "2"}))  # 800.00: 600 + 0.70 × 200
    diff = refund_difference(original.setlinfo, resplit.setlinfo)
    assert (diff["hifp_pay"], diff["psn_cash_pay"]) == (14000, 6000)
    alone = split_visit(policy, state, partial_refund(lines, {"1": "8"}))  # the 2 units settled on their own
    assert (alone.setlinfo.hifp_pay, alone.setlinfo.psn_cash_pay) == (0, 20000)


def test_partial_refund_refuses_returning_more_than_billed():
    lines = parse_bill_lines([{"feedetl_sn": "1", "chrgitm_lv": "A", "pric": "1", "cnt": "2"},
                              {"feedetl_sn": "2", "chrgitm_lv": "C", "pric": "3", "cnt": "1.5"}])
    with pytest.raises(SplitInputError, match=r"returned feedetl_sn '1': 3 units returned but only 2 billed"):
        partial_refund(lines, {"1": "3"})
    with pytest.raises(SplitInputError, match=r"returned feedetl_sn '9': no line"):
        partial_refund(lines, {"9": "1"})
    with pytest.raises(SplitInputError, match="negative"):
        partial_refund(lines, {"1": "-1"})
    with pytest.raises(SplitInputError, match="float"):
        partial_refund(lines, {"1": 1.0})
    remaining = partial_refund(lines, {"1": "2", "2": "0.5"})
    assert [(line.feedetl_sn, line.cnt) for line in remaining] == [("2", Decimal("1.0"))]
    assert partial_refund(lines, {"1": 2, "2": "1.5"}) == []


# --- the plain-decimal fast path --------------------------------------------------------------

def _decimal_by_the_general_rules(value, label: str, decimals_max: int):
    """What ``settlement.split._decimal`` answered before it had a fast path for plain strings:
    :func:`ledger.money.to_decimal`, then the decimals check (the value or the error text)."""
    from ledger.money import MoneyError, to_decimal

    try:
        number = to_decimal(value, field=label)
    except MoneyError as exc:
        return f"error: {exc}"
    exponent = number.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -decimals_max:
        return f"error: {label}: {value} has more than {decimals_max} decimals"
    return number


@settings(max_examples=3000, deadline=None)
@given(st.one_of(st.from_regex(r"\A[ +-]?[0-9]{0,20}(\.[0-9]{0,40})?[ ]?\Z"),
                 st.text(alphabet="0123456789.-+ e_١", max_size=24),
                 st.decimals(allow_nan=True, allow_infinity=True)))
@example("1." + "0" * 100)  # far too long: the general rule's message, which quotes 70 characters
@example("000000000000007.5")
@example(".5")
@example("1.")
def test_plain_decimal_fast_path_answers_as_the_general_rules(value):
    from settlement.split import SplitInputError, _decimal

    try:
        got = _decimal(value, "pric", 6)
    except SplitInputError as exc:
        got = f"error: {exc}"
    want = _decimal_by_the_general_rules(value, "pric", 6)
    assert got == want and type(got) is type(want)
    if isinstance(got, Decimal):
        assert got.as_tuple() == want.as_tuple()  # the same digits and exponent, not only equal
