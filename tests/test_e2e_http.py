"""End to end over real HTTP (uvicorn on loopback) with signed requests, on SQLite and on
PostgreSQL: settle a visit and check the ledger; replay, cancel, refund; bad input posts nothing."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from settlement import chart
from settlement.catalogue import load_catalogue
from terminals.client import EngineError
from terminals.signing import sign_request
from tests.engine_fixture import running_engine


@pytest.fixture
def eng(db_url, tmp_path):
    with running_engine(db_url, tmp_path) as engine:
        yield engine


def catalogue_bill(engine) -> list[dict]:
    """Three lines with real catalogue codes: one class A, one class B, one class C."""
    items = list(load_catalogue(engine.catalogue_path))
    pick = {}
    for item in items:
        if item.chrgitm_lv not in pick and item.basic_insurance_payable and not item.restricts_visits:
            pick[item.chrgitm_lv] = item
    lines = []
    for n, lv in enumerate(("A", "B", "C"), start=1):
        item = pick[lv]
        lines.append({"feedetl_sn": str(n), "hilist_code": item.hilist_code, "name": item.name,
                      "pric": "123.40", "cnt": "3"})
    return lines


def visit(engine, n: int = 1, **extra) -> dict:
    doc = {"msgid": f"TC000001{n:020d}", "mdtrt_id": f"MD{n:08d}", "chrg_bchno": f"B{n:04d}",
           "psn_no": engine.psn_no, "med_type": "11", "lines": catalogue_bill(engine)}
    doc.update(extra)
    return doc


def ledger_snapshot(engine) -> dict:
    tb = engine.container.ledger.trial_balance()
    return {b.name: (b.debits_posted, b.credits_posted, b.debits_pending, b.credits_pending) for b in tb.accounts}


def test_settle_a_visit_over_signed_http_and_check_the_ledger(eng):
    eng.channel.recharge("TH000001R0001", eng.card.pan, 100_000)
    v = visit(eng)
    pre = eng.clinic.presettle(v)
    due = pre["setlinfo"]["psn_cash_pay"]
    before = ledger_snapshot(eng)
    assert eng.clinic.presettle(v) == pre and ledger_snapshot(eng) == before  # pre-settlement moves nothing
    v["payment"] = eng.card_payment(due)
    doc = eng.clinic.settle(v)
    info = doc["setlinfo"]
    assert doc["replayed"] is False and info == {**pre["setlinfo"], "setl_id": doc["setl_id"]} | {
        k: info[k] for k in ("setl_id",)}
    assert info["medfee_sumamt"] == info["fund_pay_sumamt"] + info["acct_pay"] + info["psn_cash_pay"]
    assert doc["payment"]["wallet_pay_fen"] == due and len(doc["payment"]["arpc"]) == 16
    # The ledger: one entry, all legs, into the clinic's payable.
    assert eng.balance(chart.clinic_payable("H33030200009")) == info["fund_pay_sumamt"] + info["acct_pay"] + due
    assert eng.balance(chart.wallet_account(eng.card.pan)) == 100_000 - due
    assert eng.balance(chart.personal_account(eng.psn_no)) == 30_000 - info["acct_pay"]
    assert eng.balance(chart.accumulator("hifp_op", eng.psn_no, eng.container.settlements.insu_year())) == info["hifp_pay"]
    entry = eng.container.ledger.entry(f"setl:H33030200009:{v['mdtrt_id']}:{v['chrg_bchno']}")
    assert entry is not None and entry.kind == "settlement"
    assert eng.container.ledger.trial_balance().balanced
    # The card verifies the engine's ARPC (issuer authentication).
    assert eng.card.process_arpc(bytes.fromhex(doc["payment"]["arpc"]), b"00")


def test_a_second_submission_returns_the_first_settlement_and_posts_nothing(eng):
    v = visit(eng, 2)
    first = eng.clinic.settle(v)
    snap = ledger_snapshot(eng)
    again = eng.clinic.settle(v)
    assert again["replayed"] is True and again["setl_id"] == first["setl_id"]
    assert again["setlinfo"] == first["setlinfo"]
    assert ledger_snapshot(eng) == snap
    assert eng.clinic.query(v["msgid"])["setl_id"] == first["setl_id"]
    other = dict(v, lines=v["lines"][:1])
    with pytest.raises(EngineError) as exc:
        eng.clinic.settle(other)
    assert exc.value.status == 409 and exc.value.code == "exists_with_different_content"
    assert ledger_snapshot(eng) == snap


def test_cancel_restores_balances_and_accumulators_exactly_once(eng):
    snap = ledger_snapshot(eng)
    doc = eng.clinic.settle(visit(eng, 3))
    c = eng.clinic.cancel(doc["setl_id"], "TC000001CANCEL0003")
    assert c["kind"] == "cancellation"
    after = ledger_snapshot(eng)
    for name, (d, cr, dp, cp) in after.items():
        old = snap.get(name, (0, 0, 0, 0))
        assert cr - d == old[1] - old[0], name  # every net balance is back
    assert eng.clinic.cancel(doc["setl_id"], "TC000001CANCEL0003")["replayed"] is True
    with pytest.raises(EngineError) as exc:
        eng.clinic.cancel(doc["setl_id"], "TC000001CANCEL0099")
    assert exc.value.status == 409
    assert ledger_snapshot(eng) == after


def test_partial_refund_gives_each_payer_its_difference(eng):
    eng.channel.recharge("TH000001R0004", eng.card.pan, 100_000)
    v = visit(eng, 4)
    due = eng.clinic.presettle(v)["setlinfo"]["psn_cash_pay"]
    v["payment"] = eng.card_payment(due)
    doc = eng.clinic.settle(v)
    wallet_before = eng.balance(chart.wallet_account(eng.card.pan))
    acct_before = eng.balance(chart.personal_account(eng.psn_no))
    r = eng.clinic.refund(doc["setl_id"], "TC000001REFUND0004", [{"feedetl_sn": "1", "cnt": "1"}])
    assert r["original_setl_id"] == doc["setl_id"]
    old, new = doc["setlinfo"], r["setlinfo"]
    assert r["refund"]["medfee_sumamt"] == old["medfee_sumamt"] - new["medfee_sumamt"] > 0
    assert eng.balance(chart.wallet_account(eng.card.pan)) - wallet_before == old["psn_cash_pay"] - new["psn_cash_pay"]
    assert eng.balance(chart.personal_account(eng.psn_no)) - acct_before == old["acct_pay"] - new["acct_pay"]
    # The new settlement can be queried, and the original cannot be refunded again.
    assert eng.clinic.call("GET", f"/v1/settlements/{r['setl_id']}")["setlinfo"] == new
    with pytest.raises(EngineError):
        eng.clinic.refund(doc["setl_id"], "TC000001REFUND0099", [{"feedetl_sn": "1", "cnt": "1"}])


def test_merchant_payment_and_insufficient_funds(eng):
    eng.channel.recharge("TH000001R0005", eng.card.pan, 1_000)
    paid = eng.merchant.pay("TM000001P0001", 600, eng.card_payment(600, "TM000001"))
    assert paid["amount_fen"] == 600
    snap = ledger_snapshot(eng)
    with pytest.raises(EngineError) as exc:
        eng.merchant.pay("TM000001P0002", 600, eng.card_payment(600, "TM000001"))
    assert exc.value.status == 402 and exc.value.code == "insufficient_funds"
    assert ledger_snapshot(eng) == snap
    qr = eng.app.make_qr(int(time.time()), __import__("random").Random(1))
    eng.channel.recharge("TH000001R0006", eng.app.pan, 500)
    assert eng.merchant.pay("TM000001P0003", 300, {"method": "qr", "payload": qr})["pay_method"] == "qr"
    with pytest.raises(EngineError) as exc:  # the same code again
        eng.merchant.pay("TM000001P0004", 100, {"method": "qr", "payload": qr})
    assert exc.value.status in (403, 409)


def test_replayed_arqc_is_refused(eng):
    eng.channel.recharge("TH000001R0007", eng.card.pan, 10_000)
    payment = eng.card_payment(100, "TM000001")
    eng.merchant.pay("TM000001P0010", 100, payment)
    with pytest.raises(EngineError) as exc:
        eng.merchant.pay("TM000001P0011", 100, payment)
    assert exc.value.code == "atc_replayed"


# ---------------------------------------------------------------- bad input posts nothing
def raw_post(eng, path: str, body: bytes, *, sign: bool = True, key=None, tamper: bool = False) -> httpx.Response:
    url = eng.base_url + path
    headers = {"content-type": "application/json"}
    if sign:
        headers.update(sign_request("POST", url, headers, body, key_id="TC000001", private_key=key or eng.clinic_key,
                                    created=int(time.time()), nonce=f"n{time.time_ns()}"))
    if tamper:
        body = body.replace(b"1", b"2", 1)
    return httpx.post(url, content=body, headers=headers)


@pytest.mark.parametrize("case, body, status, code", [
    ("malformed json", b'{"msgid": ', 400, "malformed_json"),
    ("float amount", b'{"msgid": "x", "price": 1.5}', 400, "malformed_json"),
    ("negative quantity", None, 422, "line_invalid"),
    ("unknown item class", None, 422, "line_invalid"),
    ("amount overflow", None, 422, "line_invalid"),
    ("missing lines", b'{"msgid": "m1", "mdtrt_id": "x", "chrg_bchno": "b", "psn_no": "p", "med_type": "11"}',
     422, "field_invalid"),
    ("digit separator in a price", None, 422, "line_invalid"),
    ("non-ASCII digits in a quantity", None, 422, "line_invalid"),
    ("exponent in a price", None, 422, "line_invalid"),
])
def test_bad_settlement_input_is_a_problem_and_posts_nothing(eng, case, body, status, code):
    if body is None:
        v = visit(eng, 50)
        line = dict(v["lines"][0])
        if case == "negative quantity":
            line["cnt"] = "-1"
        elif case == "unknown item class":
            line["chrgitm_lv"] = "X"
        elif case == "digit separator in a price":
            line["pric"] = "1_000"  # Decimal() alone would read 1000
        elif case == "non-ASCII digits in a quantity":
            line["cnt"] = "\u0661"  # ARABIC-INDIC DIGIT ONE, which Decimal() alone reads as 1
        elif case == "exponent in a price":
            line["pric"] = "1e3"
        else:
            line["pric"] = "99999999999999999999"
        v["lines"] = [line]
        body = json.dumps(v).encode()
    snap = ledger_snapshot(eng)
    resp = raw_post(eng, "/v1/settlements", body)
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    problem = resp.json()
    assert problem["code"] == code and problem["status"] == status and problem["type"].startswith("https://")
    if case == "float amount":  # says which unit each field is in: a price is yuan, not fen
        assert "pric and cnt are yuan and units as decimal strings" in problem["detail"], problem
    assert "signature" in resp.headers  # problems are signed too
    assert ledger_snapshot(eng) == snap


def test_missing_wrong_and_tampered_signatures_are_refused(eng):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    body = json.dumps(visit(eng, 60)).encode()
    snap = ledger_snapshot(eng)
    missing = raw_post(eng, "/v1/settlements", body, sign=False)
    assert missing.status_code == 401 and missing.json()["code"] == "signature_missing"
    wrong = raw_post(eng, "/v1/settlements", body, key=Ed25519PrivateKey.generate())
    assert wrong.status_code == 401 and wrong.json()["code"] == "signature_invalid"
    tampered = raw_post(eng, "/v1/settlements", body, tamper=True)
    assert tampered.status_code == 401 and tampered.json()["code"] == "digest_mismatch"
    assert ledger_snapshot(eng) == snap


def test_a_replayed_request_nonce_is_refused(eng):
    url = eng.base_url + "/v1/settlements/presettle"
    body = json.dumps(visit(eng, 61)).encode()
    headers = {"content-type": "application/json"}
    headers.update(sign_request("POST", url, headers, body, key_id="TC000001", private_key=eng.clinic_key,
                                created=int(time.time()), nonce="same-nonce"))
    assert httpx.post(url, content=body, headers=headers).status_code == 200
    again = httpx.post(url, content=body, headers=headers)
    assert again.status_code == 401 and again.json()["code"] == "nonce_replayed"


class LosesFirstSettlementAnswer(httpx.HTTPTransport):
    """Delivers every request, but the first answer to POST /v1/settlements is lost on the way
    back (the engine did settle; the terminal sees a timeout)."""

    def __init__(self) -> None:
        super().__init__()
        self.lost = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.method == "POST" and request.url.path == "/v1/settlements" and not self.lost:
            response.read()
            self.lost += 1
            raise httpx.ReadTimeout("answer lost", request=request)
        return response


def test_a_lost_answer_is_resolved_by_query_never_by_a_second_settlement(eng):
    from terminals.client import TerminalClient

    transport = LosesFirstSettlementAnswer()
    client = TerminalClient(eng.base_url, "TC000001", eng.clinic_key, eng.container.keys.engine_key.public_key(),
                            transport=transport)
    v = visit(eng, 70)
    with client:
        doc = client.settle_safely(v)
    assert transport.lost == 1 and doc["replayed"] is True  # learnt from the query (NHSA 5203)
    with eng.container.engine.connect() as conn:
        from sqlalchemy import func, select

        from settlement.schema import settlements
        n = conn.scalar(select(func.count()).select_from(settlements).where(settlements.c.mdtrt_id == v["mdtrt_id"]))
    assert n == 1
    assert eng.clinic.settle(v)["setl_id"] == doc["setl_id"]  # a blind retry replays, never settles twice


def test_an_answer_not_signed_by_the_engine_is_not_believed(eng):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from terminals.client import TerminalClient, UntrustedAnswer

    impostor = Ed25519PrivateKey.generate().public_key()
    with TerminalClient(eng.base_url, "TC000001", eng.clinic_key, impostor) as client:
        with pytest.raises(UntrustedAnswer):
            client.presettle(visit(eng, 71))


def test_inpatient_interim_and_final_settlement_bear_one_admission_deductible(eng):
    """NHSA 2304 with mid_setl_flag: the admission's deductible is borne once across the
    interim and the final settlement; the final one closes the admission (admissions_ytd + 1)."""
    year = eng.container.settlements.insu_year()
    items = [i for i in load_catalogue(eng.catalogue_path) if i.chrgitm_lv == "A" and i.basic_insurance_payable]
    lines = [{"feedetl_sn": "1", "hilist_code": items[0].hilist_code, "pric": "300.00", "cnt": "1"}]
    base = {"psn_no": eng.psn_no, "med_type": "21", "mdtrt_id": "ADM0000001"}
    interim = eng.clinic.settle(dict(base, msgid="TC000001IP1", chrg_bchno="B1", mid_setl_flag="1", lines=lines))
    final = eng.clinic.settle(dict(base, msgid="TC000001IP2", chrg_bchno="B2", mid_setl_flag="0",
                                   lines=[dict(lines[0], feedetl_sn="2", pric="900.00")]))
    policy = eng.container.settlements.policies.find("310", False, 2, "21", eng.container.settlements.insu_year())
    borne = interim["setlinfo"]["act_pay_dedc"] + final["setlinfo"]["act_pay_dedc"]
    assert borne == min(policy.deductible_per_admission_fen, 120_000)
    assert eng.balance(chart.accumulator("admissions", eng.psn_no, year)) == 1
    assert eng.balance(chart.accumulator("dedc", eng.psn_no, year)) == 0  # the outpatient deductible is apart
    assert eng.balance(chart.accumulator("hifp_ip", eng.psn_no, year)) == (
        interim["setlinfo"]["hifp_pay"] + final["setlinfo"]["hifp_pay"])


def test_fee_details_in_nhsa_2204_names_settle_like_lines(eng):
    lines = catalogue_bill(eng)
    feedetail = [{"feedetl_sn": x["feedetl_sn"], "med_list_codg": x["hilist_code"], "pric": x["pric"],
                  "cnt": x["cnt"], "det_item_fee_sumamt": "370.20"} for x in lines]
    v = visit(eng, 80)
    pre_lines = eng.clinic.presettle(v)
    v2204 = dict(v)
    del v2204["lines"]
    v2204["feedetail"] = feedetail
    assert eng.clinic.presettle(v2204)["setlinfo"] == pre_lines["setlinfo"]
    feedetail[0]["det_item_fee_sumamt"] = "370.21"  # does not equal pric × cnt
    with pytest.raises(EngineError) as exc:
        eng.clinic.presettle(v2204)
    assert exc.value.status == 422 and "det_item_fee_sumamt" in exc.value.problem["detail"]


def test_card_balance_is_shown_to_recharge_channels_only(eng):
    eng.channel.recharge("TH000001R0090", eng.card.pan, 1_234)
    assert eng.channel.card(eng.card.pan)["wallet_available_fen"] == 1_234
    with pytest.raises(EngineError) as exc:
        eng.clinic.card(eng.card.pan)
    assert exc.value.status == 403


@pytest.mark.parametrize("date", ["2099-01-01", "2000-01-01"])
def test_a_batch_close_for_a_day_never_opened_is_a_problem_and_stores_nothing(eng, date):
    eng.clinic.settle(visit(eng, 95))
    day = eng.container.days.current()
    with pytest.raises(EngineError) as exc:
        eng.clinic.close_batch({"business_date": date})
    assert exc.value.status == 422 and exc.value.code == "business_day_unknown"
    assert exc.value.problem["field"] == "business_date" and day.isoformat() in exc.value.problem["detail"]
    figures = eng.container.closer.computed_batch("TC000001", day)
    assert eng.clinic.close_batch(dict(figures, business_date=day.isoformat()))["result"] == "balanced"


def test_an_oversized_body_is_refused_before_it_is_read(eng):
    body = b'{"msgid": "' + b"x" * 300_000 + b'"}'
    resp = raw_post(eng, "/v1/settlements", body)
    assert resp.status_code == 413 and resp.json()["code"] == "body_too_large"


def test_a_settlement_born_of_a_refund_can_be_cancelled_and_a_cancel_cannot_follow_a_refund(eng):
    snap = ledger_snapshot(eng)
    doc = eng.clinic.settle(visit(eng, 90))
    r = eng.clinic.refund(doc["setl_id"], "TC000001REFUND0090", [{"feedetl_sn": "2", "cnt": "1"}])
    with pytest.raises(EngineError) as exc:  # the original was already undone by the refund
        eng.clinic.cancel(doc["setl_id"], "TC000001CANCEL0090")
    assert exc.value.status == 409
    eng.clinic.cancel(r["setl_id"], "TC000001CANCEL0091")
    after = ledger_snapshot(eng)
    for name, (d, cr, _dp, _cp) in after.items():
        old = snap.get(name, (0, 0, 0, 0))
        assert cr - d == old[1] - old[0], name  # everything is back where it was


# ---------------------------------------------------------------- found by the new-user review
@pytest.mark.parametrize("body", [b"null", b"[]", b'"x"', b"5", b"true", b"[" * 50_000 + b"]" * 50_000])
def test_a_body_that_is_not_a_json_object_is_a_problem_never_a_500(eng, body):
    snap = ledger_snapshot(eng)
    for path in ("/v1/payments", "/v1/recharges", "/v1/settlements"):
        resp = raw_post(eng, path, body)
        assert resp.status_code in (400, 422), (path, resp.status_code, resp.text[:200])
        assert resp.headers["content-type"].startswith("application/problem+json")
    assert ledger_snapshot(eng) == snap


def test_a_hilist_code_that_is_not_a_string_is_a_problem(eng):
    v = visit(eng, 95)
    v["lines"][0]["hilist_code"] = {"x": 1}
    resp = raw_post(eng, "/v1/settlements", json.dumps(v).encode())
    assert resp.status_code == 422 and resp.json()["field"] == "lines[0].hilist_code"


def test_percent_encoded_paths_get_signed_answers(eng):
    with pytest.raises(EngineError) as exc:
        eng.clinic.call("POST", "/v1/settlements/a%20b/cancel", {"msgid": "TC000001X1"})
    assert exc.value.status == 404


def test_unknown_routes_are_problem_documents(eng):
    resp = httpx.get(eng.base_url + "/v1/nowhere")
    assert resp.status_code == 404 and resp.headers["content-type"].startswith("application/problem+json")


def test_a_refund_of_no_unit_is_refused_and_leaves_the_settlement_cancellable(eng):
    doc = eng.clinic.settle(visit(eng, 96))
    with pytest.raises(EngineError) as exc:
        eng.clinic.refund(doc["setl_id"], "TC000001REFUND0096", [{"feedetl_sn": "1", "cnt": "0"}])
    assert exc.value.status == 422
    assert eng.clinic.cancel(doc["setl_id"], "TC000001CANCEL0096")["kind"] == "cancellation"


def test_one_msgid_for_two_different_requests_at_once_is_never_a_500(eng):
    from concurrent.futures import ThreadPoolExecutor

    eng.channel.recharge("TH000001R0097", eng.card.pan, 10_000)
    visits = [visit(eng, 97 + i, msgid="TC000001SAMEMSGID") for i in range(2)]

    def attempt(v):
        try:
            return eng.clinic.settle(v)["setl_id"]
        except EngineError as exc:
            return exc.status

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(attempt, visits))
    assert all(r != 500 for r in results), results
    assert eng.container.ledger.trial_balance().balanced


def test_identical_merchant_payments_at_once_take_the_money_once_and_all_see_it(eng):
    from concurrent.futures import ThreadPoolExecutor

    eng.channel.recharge("TH000001R0098", eng.card.pan, 10_000)
    payment = eng.card_payment(700, "TM000001")

    def attempt(_):
        try:
            return eng.merchant.pay("TM000001P0098", 700, payment)["payment_id"]
        except EngineError as exc:
            return exc.code

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(attempt, range(6)))
    assert len(set(results)) == 1 and str(results[0]).startswith("P"), results
    assert eng.balance(chart.wallet_account(eng.card.pan)) == 10_000 - 700


def test_a_database_lost_mid_settlement_is_a_503_resolved_by_query(eng):
    """The engine's database connection drops right after the settlement committed (its answer
    is lost with it): the terminal gets a signed 503 ``database_unavailable`` (never a 500),
    and the SDK resolves it by querying the msgid — one settlement, never two."""
    import psycopg
    from sqlalchemy import func, select

    from settlement.schema import settlements
    from terminals.client import EngineError, TerminalClient

    svc = eng.container.settlements
    real_submit = svc.submit
    dropped = []

    def submit_then_drop(*args, **kwargs):
        outcome = real_submit(*args, **kwargs)
        if not dropped:
            dropped.append(outcome)
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return outcome

    def settled(v) -> int:
        with eng.container.engine.connect() as conn:
            return conn.scalar(select(func.count()).select_from(settlements)
                               .where(settlements.c.mdtrt_id == v["mdtrt_id"]))

    svc.submit = submit_then_drop
    try:
        client = TerminalClient(eng.base_url, "TC000001", eng.clinic_key, eng.container.keys.engine_key.public_key())
        with client:
            first = visit(eng, 71)
            with pytest.raises(EngineError) as caught:
                client.settle(first)
            assert caught.value.status == 503 and caught.value.code == "database_unavailable"
            assert len(dropped) == 1 and settled(first) == 1  # it did settle: the answer was lost
            dropped.clear()
            second = visit(eng, 72)
            doc = client.settle_safely(second)
        assert len(dropped) == 1 and doc["replayed"] is True  # learnt from the query (NHSA 5203)
        assert settled(second) == 1
    finally:
        svc.submit = real_submit


def test_a_lost_answer_to_a_declined_card_settlement_is_learnt_as_the_decline(eng):
    """The wallet cannot pay the cash part and the 402 is lost on the way back: the SDK's
    query by msgid learns the decline (402 insufficient_funds, signed), never atc_replayed, and
    a resend of the same message answers the same."""
    from terminals.client import EngineError, TerminalClient

    v = visit(eng, 73)
    due = eng.clinic.presettle(v)["setlinfo"]["psn_cash_pay"]
    assert due > eng.balance(chart.wallet_account(eng.card.pan))  # the wallet was never recharged
    v["payment"] = eng.card_payment(due)
    snap = ledger_snapshot(eng)
    transport = LosesFirstSettlementAnswer()
    client = TerminalClient(eng.base_url, "TC000001", eng.clinic_key, eng.container.keys.engine_key.public_key(),
                            transport=transport)
    with client:
        with pytest.raises(EngineError) as learnt:
            client.settle_safely(v)
        assert transport.lost == 1
        assert (learnt.value.status, learnt.value.code) == (402, "insufficient_funds")
        with pytest.raises(EngineError) as again:
            client.settle(v)
        assert (again.value.status, again.value.code) == (402, "insufficient_funds")
    moved = {k: v for k, v in ledger_snapshot(eng).items() if v != (0, 0, 0, 0)}
    assert moved == {k: v for k, v in snap.items() if v != (0, 0, 0, 0)}  # accounts opened, nothing moved


def test_a_database_lost_while_checking_the_signature_is_a_signed_503(eng, monkeypatch):
    """The terminal registry's database fails while the request's signature is being checked:
    a signed 503 ``database_unavailable`` (nothing was posted), never an unsigned 500."""
    import psycopg

    from terminals.client import EngineError

    def lost(_key_id):
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(eng.container.registry, "lookup", lost)
    snap = ledger_snapshot(eng)
    with pytest.raises(EngineError) as caught:  # the SDK believes only signed answers
        eng.clinic.settle(visit(eng, 74))
    assert (caught.value.status, caught.value.code) == (503, "database_unavailable")
    monkeypatch.undo()
    assert ledger_snapshot(eng) == snap


def test_a_declined_merchant_payment_sent_again_answers_its_decline(eng):
    """A card payment the card authorised but the wallet could not pay: the same message sent
    again (its answer was lost) answers the same 402, not atc_replayed; the same msgid for
    another amount is a conflict; nothing moved."""
    from terminals.client import EngineError

    eng.channel.recharge("TH000001R0075", eng.card.pan, 500)
    payment = eng.card_payment(900, "TM000001")
    snap = ledger_snapshot(eng)
    with pytest.raises(EngineError) as first:
        eng.merchant.pay("TM000001P0075", 900, payment)
    assert (first.value.status, first.value.code) == (402, "insufficient_funds")
    with pytest.raises(EngineError) as again:
        eng.merchant.pay("TM000001P0075", 900, payment)
    assert (again.value.status, again.value.code) == (402, "insufficient_funds")
    with pytest.raises(EngineError) as other:
        eng.merchant.pay("TM000001P0075", 100, eng.card_payment(100, "TM000001"))
    assert other.value.status == 409
    moved = {k: v for k, v in ledger_snapshot(eng).items() if v != (0, 0, 0, 0)}
    assert moved == {k: v for k, v in snap.items() if v != (0, 0, 0, 0)}  # accounts opened, nothing moved


def test_a_client_gone_mid_body_is_one_line_at_most_never_a_traceback(eng, caplog):
    """A client that sends part of its body and disconnects: nothing to answer, nothing posted,
    at most one log line below ERROR, no traceback (any client could otherwise fill the log)."""
    import asyncio
    import logging

    from api.app import create_app

    eng.channel.recharge("TH000001R0076", eng.card.pan, 100_000)
    v = visit(eng, 76)
    v["payment"] = eng.card_payment(eng.clinic.presettle(v)["setlinfo"]["psn_cash_pay"])
    body = json.dumps(v).encode()
    url = eng.base_url + "/v1/settlements"
    headers = {"content-type": "application/json", "content-length": str(len(body))}
    headers.update(sign_request("POST", url, headers, body, key_id="TC000001", private_key=eng.clinic_key,
                                created=int(time.time()), nonce=f"n{time.time_ns()}"))
    host = url.split("/")[2]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/settlements", "raw_path": b"/v1/settlements", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 50000), "server": (host.split(":")[0], int(host.split(":")[1])),
             "headers": [(b"host", host.encode())] + [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    messages = [{"type": "http.request", "body": body[:len(body) // 2], "more_body": True},
                {"type": "http.disconnect"}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(_message):
        pass

    snap = ledger_snapshot(eng)
    with caplog.at_level(logging.DEBUG):
        asyncio.run(create_app(eng.container)(scope, receive, send))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert len([r for r in caplog.records if r.name.startswith("citizencard")]) <= 1
    assert ledger_snapshot(eng) == snap
    from ledger.errors import NotFound
    with pytest.raises(NotFound):
        eng.container.settlements.query_by_msgid(eng.container.registry.lookup("TC000001")[1], v["msgid"])
    assert eng.clinic.settle(v)["replayed"] is False  # the whole message, sent again, settles once


def test_a_terminal_blocked_by_another_process_is_refused_within_the_cache_bound(eng, monkeypatch):
    """Another process (its own engine and Registry on the same database) blocks the clinic's
    terminal: the serving engine, which has the key cached, refuses its requests once
    ``terminal_cache_s`` has passed on its clock (moved by hand here, not slept)."""
    from ledger.db import make_engine
    from terminals.registry import Registry

    registry = eng.container.registry
    now = [registry.monotonic()]
    monkeypatch.setattr(registry, "monotonic", lambda: now[0])
    eng.clinic.presettle(visit(eng, 77))  # the key is now cached
    other = make_engine(eng.container.settings.db_url)
    try:
        Registry(other, lambda: 1, cache_s=0).block("TC000001")
    finally:
        other.dispose()
    now[0] += eng.container.settings.terminal_cache_s
    with pytest.raises(EngineError) as refused:
        eng.clinic.presettle(visit(eng, 77))
    assert (refused.value.status, refused.value.code) == (401, "unknown_key")


class CountsSettlements(httpx.HTTPTransport):
    """Counts the POST /v1/settlements requests a client sends."""

    def __init__(self) -> None:
        super().__init__()
        self.settles = self.refunds = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path == "/v1/settlements":
            self.settles += 1
        if request.method == "POST" and request.url.path.endswith("/refund"):
            self.refunds += 1
        return super().handle_request(request)


def contend(eng, monkeypatch, settlements_contended: int | None) -> None:
    """Make the engine refuse the next ``settlements_contended`` settlements (every one when
    None) with 409 ``settlement_contended``: each attempt's balance assertion fails, as when
    the person's accounts keep changing under concurrent settlements."""
    import settlement.service as service_module
    from ledger.model import EntryOutcome, EntryResult

    svc = eng.container.settlements
    real_submit = svc.submit
    failing = [None if settlements_contended is None else settlements_contended * service_module.ATTEMPTS_MAX]

    def submit(entry, hook=None):
        if failing[0] is None or failing[0] > 0:
            if failing[0] is not None:
                failing[0] -= 1
            return EntryOutcome(entry.key, EntryResult.BALANCE_ASSERTION_FAILED)
        return real_submit(entry, hook)

    monkeypatch.setattr(service_module, "contention_backoff", lambda _attempt: None)
    monkeypatch.setattr(svc, "submit", submit)


def counting_client(eng, monkeypatch):
    import terminals.client as client_module

    monkeypatch.setattr(client_module, "CONTENDED_BACKOFF_S", 0.0, raising=False)  # no pause needed
    transport = CountsSettlements()
    return transport, client_module.TerminalClient(eng.base_url, "TC000001", eng.clinic_key,
                                                   eng.container.keys.engine_key.public_key(), transport=transport)


@pytest.mark.parametrize("payment", [{"method": "cash"}, None])
def test_a_contended_cash_settlement_is_sent_again_with_the_same_msgid(eng, monkeypatch, payment):
    """409 settlement_contended with nothing authorised says "retry with the same msgid"
    (``retry``: ``same_msgid``): the SDK does, a bounded number of times, and the visit settles
    once — also for a visit that names no payment (cash by default)."""
    from sqlalchemy import func, select

    from settlement.schema import settlements

    contend(eng, monkeypatch, 2)
    transport, client = counting_client(eng, monkeypatch)
    v = visit(eng, 80 if payment else 84, payment={"method": "cash"})
    if payment is None:
        del v["payment"]
    with client:
        doc = client.settle_safely(v)
    assert doc["replayed"] is False and transport.settles == 3
    with eng.container.engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(settlements)
                           .where(settlements.c.mdtrt_id == v["mdtrt_id"])) == 1


def test_a_cash_settlement_contended_every_time_is_surfaced_after_a_few_retries(eng, monkeypatch):
    from terminals.client import CONTENDED_RETRIES_MAX

    contend(eng, monkeypatch, None)
    transport, client = counting_client(eng, monkeypatch)
    snap = ledger_snapshot(eng)
    with client:
        with pytest.raises(EngineError) as caught:
            client.settle_safely(visit(eng, 81, payment={"method": "cash"}))
    assert (caught.value.status, caught.value.code) == (409, "settlement_contended")
    assert caught.value.problem["retry"] == "same_msgid"
    assert transport.settles == 1 + CONTENDED_RETRIES_MAX
    moved = {k: v for k, v in ledger_snapshot(eng).items() if v != (0, 0, 0, 0)}
    assert moved == {k: v for k, v in snap.items() if v != (0, 0, 0, 0)}  # accounts opened, nothing moved


def test_a_contended_refund_is_sent_again_with_the_same_msgid(eng, monkeypatch):
    """A partial refund refused with settlement_contended (retry: same_msgid; nothing moved) is
    sent again by the SDK with the same msgid, and refunds once."""
    doc = eng.clinic.settle(visit(eng, 85, payment={"method": "cash"}))
    contend(eng, monkeypatch, 1)
    transport, client = counting_client(eng, monkeypatch)
    with client:
        refund = client.refund(doc["setl_id"], f"TC000001R{85:019d}", [{"feedetl_sn": "1", "cnt": "1"}])
    assert transport.refunds == 2 and refund["original_setl_id"] == doc["setl_id"]
    clinic = eng.container.registry.lookup("TC000001")[1]
    assert eng.container.settlements.get(clinic, doc["setl_id"])["status"] == "refunded"


def test_a_contended_card_settlement_is_surfaced_not_sent_again(eng, monkeypatch):
    """A card settlement's 409 settlement_contended spent the card's authorisation: the SDK
    surfaces it at once (present the card again, under a new msgid)."""
    v = visit(eng, 82)
    due = eng.clinic.presettle(dict(v, payment={"method": "card"}))["setlinfo"]["psn_cash_pay"]
    assert due > 0
    v["payment"] = eng.card_payment(due)
    contend(eng, monkeypatch, None)
    transport, client = counting_client(eng, monkeypatch)
    with client:
        with pytest.raises(EngineError) as caught:
            client.settle_safely(v)
    assert (caught.value.status, caught.value.code) == (409, "settlement_contended")
    assert "present the card again, under a new msgid" in caught.value.problem["detail"]
    assert caught.value.problem["retry"] == "new_authorisation"
    assert transport.settles == 1


def test_the_sdk_reports_an_oversized_body_as_an_unsigned_413(eng):
    """The engine answers a body over 256 KiB with an unsigned 413 problem (documented): the
    SDK raises it as an UnsignedProblem, an EngineError marked unsigned, not UntrustedAnswer."""
    from terminals.client import UnsignedProblem

    v = visit(eng, 83)
    v["lines"][0]["name"] = "x" * 300_000
    snap = ledger_snapshot(eng)
    with pytest.raises(UnsignedProblem) as caught:
        eng.clinic.settle(v)
    assert (caught.value.status, caught.value.code, caught.value.signed) == (413, "body_too_large", False)
    assert isinstance(caught.value, EngineError) and "unsigned" in str(caught.value)
    with pytest.raises(UnsignedProblem) as route:
        eng.clinic.call("GET", "/v1/nowhere")
    assert (route.value.status, route.value.code) == (404, "route_not_found")
    assert ledger_snapshot(eng) == snap
