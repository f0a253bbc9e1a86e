"""The terminal SDK: a cashier or merchant terminal's client of the engine.

Every request is signed with the terminal's Ed25519 key (RFC 9421 via :class:`TerminalSigner`)
and every answer's signature is verified against the engine's public key before it is
believed; a problem answer (RFC 9457) raises :class:`EngineError` carrying it. The only answers
the engine sends unsigned are the problems it gives before anyone is identified (413 for an
oversized body, 404/405 for an unknown route or method); one of those, and nothing else
unsigned, raises :class:`UnsignedProblem` (an EngineError whose ``signed`` is False), so the
cashier sees "request too large" instead of an unverifiable answer. Any other unsigned or
badly signed answer raises :class:`UntrustedAnswer`.

A settlement whose answer was lost (timeout, connection reset) is resolved by
:meth:`TerminalClient.settle_safely`: it asks the engine what that message id settled (NHSA
5203) and only re-sends the same request — same ``msgid``, same visit and charge batch, so the
engine's idempotency returns the first settlement — when the engine has no record of it. A
settlement refused with 409 ``settlement_contended`` (the person's accounts kept changing under
concurrent settlements; nothing moved) is sent again with the same msgid when the problem's
``retry`` member says ``same_msgid``, a few times after a short random pause; not when it says
``new_authorisation`` (a card or QR code's authorisation is used up: it must be presented again
under a new msgid).
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from terminals.signing import SignatureError, TerminalSigner, verify_response

RETRIES_MAX = 3
#: How often :meth:`TerminalClient.settle_safely` and :meth:`TerminalClient.refund` send a
#: message again after a 409 ``settlement_contended`` that asks for it (``retry``
#: ``same_msgid``), and the ceiling of the first random pause (doubled each time).
CONTENDED_RETRIES_MAX = 4
CONTENDED_BACKOFF_S = 0.05
#: Idle connections are dropped well before a server's keep-alive timeout (uvicorn: 5 s by
#: default), so a request is never sent on a connection the server is closing.
KEEPALIVE_EXPIRY_S = 2.0
#: The problems the engine answers unsigned (README, "The HTTP API"; api/app.py: before the
#: request's signature is checked), by status: the only unsigned answers the SDK reports.
UNSIGNED_PROBLEMS = {413: "body_too_large", 404: "route_not_found", 405: "method_not_allowed"}
PROBLEM_MEDIA_TYPE = "application/problem+json"


class EngineError(Exception):
    """The engine answered with an RFC 9457 problem (``status``, ``code``, ``problem``),
    signed by the engine (``signed``; see :class:`UnsignedProblem` for the exception)."""

    signed = True

    def __init__(self, status: int, problem: dict) -> None:
        self.status = status
        self.problem = problem
        self.code = problem.get("code", "unknown")
        super().__init__(f"{status} {self.code}: {problem.get('detail', '')}")


class UnsignedProblem(EngineError):
    """An unsigned RFC 9457 problem of the kind the engine documents as unsigned (413
    ``body_too_large``, 404 ``route_not_found``, 405 ``method_not_allowed``: answered before
    the request was attributed to a terminal). Nobody vouches for it: it says nothing about any
    settlement or payment (not even "not found": an unsigned 404 is never read as a query's
    answer), only why the request was not looked at. ``signed`` is False."""

    signed = False

    def __init__(self, status: int, problem: dict) -> None:
        super().__init__(status, problem)
        self.args = (f"unsigned {status} {self.code} (not signed by the engine): {problem.get('detail', '')}",)


class UntrustedAnswer(Exception):
    """The answer's signature did not verify: it may not come from the engine."""


def _unsigned_problem(response: httpx.Response, failure: SignatureError) -> UnsignedProblem | None:
    """``response`` as an :class:`UnsignedProblem` when it carries no signature at all and is a
    problem document of a status and code in :data:`UNSIGNED_PROBLEMS`; None otherwise (a
    broken, partial or forged signature is never excused)."""
    if failure.code != "signature_missing" or "signature" in response.headers \
            or "signature-input" in response.headers:
        return None
    expected = UNSIGNED_PROBLEMS.get(response.status_code)
    media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if expected is None or media_type != PROBLEM_MEDIA_TYPE:
        return None
    try:
        doc = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("code") != expected or doc.get("status") != response.status_code:
        return None
    return UnsignedProblem(response.status_code, doc)


def _retry_same_msgid(exc: EngineError, visit: dict) -> bool:
    """Whether a settlement's problem asks for the same message again: a signed 409
    ``settlement_contended`` whose ``retry`` member says ``same_msgid`` (nothing was authorised:
    a cash visit, or one whose card had nothing to pay); ``new_authorisation`` when a card or
    QR code authorised it and spent its authorisation (only the cashier can present it again).
    From an engine that does not send ``retry`` yet: a cash visit's (``payment.method`` "cash")."""
    if not (exc.signed and exc.status == 409 and exc.code == "settlement_contended"):
        return False
    retry = exc.problem.get("retry")
    if retry is not None:
        return retry == "same_msgid"
    payment = visit.get("payment") if isinstance(visit, dict) else None
    return isinstance(payment, dict) and payment.get("method") == "cash"


def _contended_pause(attempt: int) -> None:
    """Sleep before sending a contended message again: a random pause below
    ``CONTENDED_BACKOFF_S`` × 2^``attempt`` (full jitter, so colliding terminals do not collide
    again in lock-step)."""
    time.sleep(random.uniform(0, CONTENDED_BACKOFF_S * 2 ** attempt))


class TerminalClient:
    """A signed client for one terminal. ``engine_public_key`` verifies the engine's answers."""

    def __init__(self, base_url: str, terminal_id: str, private_key: Ed25519PrivateKey,
                 engine_public_key: Ed25519PublicKey, *, timeout_s: float = 10.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.terminal_id = terminal_id
        self.engine_public_key = engine_public_key
        self.http = httpx.Client(base_url=base_url, auth=TerminalSigner(terminal_id, private_key),
                                 timeout=timeout_s, transport=transport,
                                 limits=httpx.Limits(keepalive_expiry=KEEPALIVE_EXPIRY_S))

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def __enter__(self) -> "TerminalClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ transport
    def call(self, method: str, path: str, body: Any = None, params: dict | None = None) -> dict:
        """Send a signed request; verify the signed answer; return its JSON.

        Raises EngineError for a problem answer (:class:`UnsignedProblem` for one of the
        unsigned problems the engine documents), UntrustedAnswer for any other answer whose
        signature is missing or bad, and httpx.TransportError when the answer was lost."""
        content = json.dumps(body, ensure_ascii=False).encode() if body is not None else b""
        headers = {"content-type": "application/json"} if body is not None else {}
        response = self.http.request(method, path, content=content, headers=headers, params=params)
        try:
            verify_response(response.status_code, response.headers, response.content,
                            request_method=response.request.method, request_url=str(response.request.url),
                            request_headers=response.request.headers,
                            resolve_public_key=lambda k: self.engine_public_key if k == "engine" else None,
                            now=int(time.time()))
        except SignatureError as exc:
            unsigned = _unsigned_problem(response, exc)
            if unsigned is not None:
                raise unsigned from None
            raise UntrustedAnswer(f"{response.status_code} answer failed verification: {exc}") from None
        doc = response.json() if response.content else {}
        if response.status_code >= 400:
            raise EngineError(response.status_code, doc)
        return doc

    # ------------------------------------------------------------------ medical settlement
    def presettle(self, visit: dict) -> dict:
        """NHSA 2206: the split of a bill; nothing moves."""
        return self.call("POST", "/v1/settlements/presettle", visit)

    def settle(self, visit: dict) -> dict:
        """NHSA 2207: settle; a repeat of the same visit and batch returns the first result."""
        return self.call("POST", "/v1/settlements", visit)

    def query(self, msgid: str) -> dict:
        """NHSA 5203: the settlement a message produced (EngineError 404 when none)."""
        return self.call("GET", "/v1/settlements", params={"msgid": msgid})

    def settle_safely(self, visit: dict) -> dict:
        """Settle, resolving a lost answer by query before any retry (never settles twice). An
        answer that never came (a transport error) and a 503 (the engine lost its database
        mid-request: the outcome is unknown) are both resolved that way: the query finds the
        settlement (or the refusal) that message produced, or nothing, and only then is the
        same message sent again. ``EngineError`` for any other problem; when the retries run
        out, the last unknown-outcome error (never the query's "not found", which would read as
        "not settled" while the last copy may still land).

        A 409 ``settlement_contended`` whose problem says ``"retry": "same_msgid"`` (nothing was
        authorised: a cash visit, or a card one with nothing to pay by card; nothing moved) is
        sent again with the same msgid up to ``CONTENDED_RETRIES_MAX`` times, after a random
        pause below ``CONTENDED_BACKOFF_S`` doubled each time (full jitter, so colliding
        terminals do not collide again in lock-step); then the last 409 is raised. One that
        says ``"new_authorisation"`` is raised at once: the card or QR code authorised it and
        its authorisation is used up, so only the cashier can present it again, under a new
        msgid."""
        contended = 0
        unknown_outcomes = 0
        while True:
            try:
                return self.settle(visit)
            except (httpx.TransportError, EngineError) as exc:
                if isinstance(exc, EngineError) and (exc.status != 503 or not exc.signed):
                    if not (_retry_same_msgid(exc, visit) and contended < CONTENDED_RETRIES_MAX):
                        raise
                    _contended_pause(contended)
                    contended += 1
                    continue  # nothing moved: the same message again
                unknown: BaseException = exc
            try:
                return self.query(visit["msgid"])
            except EngineError as exc:  # 404: it did not settle (send it again); 503: still unknown
                if exc.status not in (404, 503) and exc.signed:  # unsigned: tells nothing, still unknown
                    raise
            except httpx.TransportError:
                pass
            unknown_outcomes += 1
            if unknown_outcomes >= RETRIES_MAX:
                raise unknown
            time.sleep(min(0.2 * 2 ** unknown_outcomes, 2.0))  # the engine or its database is recovering

    def cancel(self, setl_id: str, msgid: str) -> dict:
        """NHSA 2208: cancel a settlement (once)."""
        return self.call("POST", f"/v1/settlements/{setl_id}/cancel", {"msgid": msgid})

    def refund(self, setl_id: str, msgid: str, returns: list[dict]) -> dict:
        """Partial refund of ``returns`` = ``[{"feedetl_sn", "cnt"}]``. A 409
        ``settlement_contended`` whose problem says ``"retry": "same_msgid"`` (the person's
        accounts kept changing; nothing moved) is sent again with the same msgid — a refund is
        idempotent by it — up to ``CONTENDED_RETRIES_MAX`` times after the same pauses as
        :meth:`settle_safely`'s; then the last 409 is raised."""
        body = {"msgid": msgid, "returns": returns}
        for contended in range(CONTENDED_RETRIES_MAX + 1):
            try:
                return self.call("POST", f"/v1/settlements/{setl_id}/refund", body)
            except EngineError as exc:
                if not (_retry_same_msgid(exc, {}) and contended < CONTENDED_RETRIES_MAX):
                    raise
                _contended_pause(contended)
        raise AssertionError("unreachable")  # pragma: no cover

    # ------------------------------------------------------------------ wallet
    def pay(self, msgid: str, amount_fen: int, payment: dict) -> dict:
        """A merchant payment from the card wallet."""
        return self.call("POST", "/v1/payments", {"msgid": msgid, "amount_fen": amount_fen, "payment": payment})

    def recharge(self, msgid: str, pan: str, amount_fen: int) -> dict:
        """A wallet recharge through this channel terminal."""
        return self.call("POST", "/v1/recharges", {"msgid": msgid, "pan": pan, "amount_fen": amount_fen})

    def card(self, pan: str) -> dict:
        """Card status and wallet balance."""
        return self.call("GET", f"/v1/cards/{pan}")

    def close_batch(self, report: dict) -> dict:
        """Close this terminal's batch for a business day with its own counts and totals."""
        return self.call("POST", "/v1/batches/close", report)
