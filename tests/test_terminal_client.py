"""The terminal SDK facing answers that are not signed (no engine: a fake transport answers).

Only the problems the engine documents as unsigned (413 ``body_too_large``, 404
``route_not_found``, 405 ``method_not_allowed``: README, "The HTTP API") are reported, as
:class:`UnsignedProblem` (an EngineError with ``signed`` False); any other unsigned or badly
signed answer is :class:`UntrustedAnswer`, and an unsigned 404 never reads as "not settled".
"""

from __future__ import annotations

import json

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import terminals.client as client_module
from terminals.client import EngineError, TerminalClient, UnsignedProblem, UntrustedAnswer

PROBLEM = "application/problem+json"


def problem(status: int, code: str, detail: str = "") -> bytes:
    return json.dumps({"type": "https://example.invalid/" + code, "title": code, "status": status,
                       "detail": detail, "code": code}).encode()


def client_answering(handler) -> TerminalClient:
    return TerminalClient("http://engine.test", "TC000001", Ed25519PrivateKey.generate(),
                          Ed25519PrivateKey.generate().public_key(), transport=httpx.MockTransport(handler))


@pytest.mark.parametrize("status, code", [(413, "body_too_large"), (404, "route_not_found"),
                                          (405, "method_not_allowed")])
def test_a_documented_unsigned_problem_is_an_unsigned_engine_error(status, code):
    body = problem(status, code, "the body is over 262144 bytes")
    with client_answering(lambda _r: httpx.Response(status, headers={"content-type": PROBLEM}, content=body)) as c:
        with pytest.raises(UnsignedProblem) as caught:
            c.settle({"msgid": "X"})
    err = caught.value
    assert isinstance(err, EngineError) and err.signed is False
    assert (err.status, err.code) == (status, code) and str(err).startswith(f"unsigned {status} {code}")


@pytest.mark.parametrize("status, headers, body", [
    (200, {"content-type": "application/json"}, b'{"setl_id": "S1", "replayed": false}'),  # a "settlement"
    (402, {"content-type": PROBLEM}, problem(402, "insufficient_funds")),  # a business refusal
    (413, {"content-type": PROBLEM}, problem(413, "insufficient_funds")),  # the wrong code for 413
    (404, {"content-type": PROBLEM}, problem(404, "settlement_not_found")),  # a query's "not found"
    (413, {"content-type": "application/json"}, problem(413, "body_too_large")),  # not a problem document
    (413, {"content-type": PROBLEM}, problem(404, "body_too_large")),  # status and document disagree
    (413, {"content-type": PROBLEM}, b"not json"),
    (413, {"content-type": PROBLEM, "signature-input": 'sig1=("@status");keyid="engine"'},
     problem(413, "body_too_large")),  # half a signature is tampering, not "unsigned"
    (413, {"content-type": PROBLEM, "signature-input": 'sig1=("@status");keyid="engine";created=1',
           "signature": "sig1=:AAAA:"}, problem(413, "body_too_large")),  # a bad signature
])
def test_any_other_unsigned_or_badly_signed_answer_is_untrusted(status, headers, body):
    with client_answering(lambda _r: httpx.Response(status, headers=headers, content=body)) as c:
        with pytest.raises(UntrustedAnswer):
            c.settle({"msgid": "X"})


def test_an_unsigned_404_to_the_query_never_reads_as_not_settled(monkeypatch):
    """The settlement's answer is lost and the query gets an unsigned 404: the outcome is still
    unknown, so settle_safely ends with the lost answer's error, never with "not found"."""
    monkeypatch.setattr(client_module.time, "sleep", lambda _s: None)
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        if request.method == "POST":
            raise httpx.ReadTimeout("answer lost", request=request)
        return httpx.Response(404, headers={"content-type": PROBLEM}, content=problem(404, "route_not_found"))

    with client_answering(handler) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.settle_safely({"msgid": "X", "payment": {"method": "cash"}})
    assert seen == ["POST", "GET"] * client_module.RETRIES_MAX


@pytest.mark.parametrize("problem, method, again", [
    ({"retry": "same_msgid"}, "cash", True),
    ({"retry": "same_msgid"}, "card", True),          # a card visit with nothing to pay by card
    ({"retry": "new_authorisation"}, "card", False),  # the card's authorisation is used up
    ({}, "cash", True),                               # an engine that sends no retry member yet
    ({}, "card", False),
])
def test_which_contended_settlements_the_sdk_sends_again(problem, method, again):
    from terminals.client import EngineError, UnsignedProblem, _retry_same_msgid

    doc = {"status": 409, "code": "settlement_contended", **problem}
    visit = {"msgid": "m", "payment": {"method": method}}
    assert _retry_same_msgid(EngineError(409, doc), visit) is again
    assert _retry_same_msgid(UnsignedProblem(409, doc), visit) is False  # nobody vouches for it
    assert _retry_same_msgid(EngineError(409, dict(doc, code="msgid_reused")), visit) is False
