"""The engine's HTTP API (FastAPI): signed requests in, signed answers out.

Every ``/v1`` request must carry an RFC 9421 signature by an enrolled terminal (ed25519,
covering ``@method``, ``@target-uri`` and ``content-digest``, with ``created`` and a nonce);
the nonce is claimed once in the single-use store. Every answer — success or RFC 9457 problem —
is signed by the engine's key and bound to the request it answers, so a terminal can trust it.
Handlers run the (synchronous) services in a worker thread; nothing blocks the event loop.

Routes (NHSA transaction codes in brackets):

* ``POST /v1/settlements/presettle`` [2206/2303] — the split, nothing moves
* ``POST /v1/settlements`` [2207/2304] — settle; idempotent by (clinic, mdtrt_id, chrg_bchno)
* ``GET  /v1/settlements?msgid=…`` [5203] — what a message settled (answer lost)
* ``GET  /v1/settlements/{setl_id}`` [5203]
* ``POST /v1/settlements/{setl_id}/cancel`` [2208/2305]
* ``POST /v1/settlements/{setl_id}/refund`` — partial refund (cancel + re-split)
* ``POST /v1/payments`` — merchant card / QR payment
* ``POST /v1/recharges`` — wallet recharge through a channel
* ``POST /v1/batches/close`` — the terminal's batch close
* ``GET  /v1/cards/{pan}`` — card status and wallet balance
* ``GET  /healthz`` — unsigned liveness
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from api.bootstrap import Container
from api.errors import PROBLEM_MEDIA_TYPE, from_domain, plain_problem_response, problem, problem_body
from api.settings import BODY_BYTES_MAX, CLOCK_SKEW_S_MAX, SIGNATURE_AGE_S_MAX
from card.accounts import wallet_account
from ledger.db import is_database_unavailable
from ledger.errors import DomainError, Rejected
from settlement.service import TerminalContext
from terminals.nonce import NonceStoreError
from terminals.signing import SignatureError, sign_response, verify_request


log = logging.getLogger("citizencard.api")


def json_bytes(doc) -> bytes:
    """UTF-8 JSON of an answer; with any text that UTF-8 cannot carry (a lone surrogate that
    reached a stored field) ASCII-escaped instead, so that an answer whose work is done is
    always delivered, signed."""
    text = json.dumps(doc, ensure_ascii=False, default=str)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return json.dumps(doc, default=str).encode()


def _database_unavailable(request: Request) -> dict:
    """The 503 problem for a database lost or unreachable while handling ``request``."""
    return problem(503, "database_unavailable", "Service unavailable",
                   "the database could not be reached or the connection was lost; whether this request "
                   "took effect is unknown: query it by its msgid, and send it again with the same msgid "
                   "only if nothing is found", instance=request.url.path)


def create_app(container: Container) -> FastAPI:
    """The FastAPI application over a bootstrapped :class:`Container`."""
    app = FastAPI(title="Citizen-card payment and medical settlement engine", version="0.1.0",
                  docs_url="/docs", redoc_url=None)
    app.state.container = container
    keys = container.keys

    @app.exception_handler(StarletteHTTPException)
    async def http_problem(request: Request, exc: StarletteHTTPException) -> Response:
        """Unknown routes and methods as RFC 9457 problems (unsigned: nobody was authenticated)."""
        code = {404: "route_not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return plain_problem_response(problem(exc.status_code, code, str(exc.detail), str(exc.detail),
                                              instance=request.url.path))

    def signed_response(request: Request, status: int, body: bytes, media_type: str) -> Response:
        headers = {"content-type": media_type}
        headers.update(sign_response(status, headers, body, key_id=keys.engine_key_id,
                                     private_key=keys.engine_key, created=int(time.time()),
                                     request_method=request.method, request_url=_url(request),
                                     request_headers=dict(request.headers)))
        return Response(body, status_code=status, headers=headers)

    def _url(request: Request) -> str:
        """The URL as the terminal signed it: scheme, authority and the raw (still
        percent-encoded) path and query; behind a proxy, the configured public origin."""
        path = (request.scope.get("raw_path") or request.url.path.encode()).decode("latin-1")
        query = request.scope.get("query_string", b"").decode("latin-1")
        origin = container.settings.public_origin.rstrip("/") or (
            f"{request.url.scheme}://{request.headers.get('host') or request.url.netloc}")
        return origin + path + (("?" + query) if query else "")

    def too_large() -> Response:
        return plain_problem_response(problem(413, "body_too_large", "Request too large",
                                              f"the body is over {BODY_BYTES_MAX} bytes"))

    async def read_body(request: Request) -> bytes | None:
        """The body, or None as soon as it grows past BODY_BYTES_MAX (never buffered whole).
        Raises ClientDisconnect when the client goes away before the body ends."""
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > BODY_BYTES_MAX):
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > BODY_BYTES_MAX:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def handle(request: Request, work: Callable[[TerminalContext, Any], Any], *,
                     status: int = 200, json_body: bool = True) -> Response:
        try:
            body = await read_body(request)
        except ClientDisconnect:
            # The client sent part of its body and left: nothing was checked or done, and nobody
            # is there to read an answer (the server drops it). One line, no traceback: any
            # client can do this at will.
            log.info("client %s left before the end of the body of %s %r; nothing done",
                     request.client.host if request.client else "?", request.method, request.url.path)
            return plain_problem_response(problem(400, "body_incomplete", "Incomplete request",
                                                  "the client disconnected before the end of the body",
                                                  instance=request.url.path))
        if body is None:
            return too_large()
        ctx_holder: dict = {}

        def resolve(key_id: str):
            hit = container.registry.lookup(key_id)
            if hit is None:
                return None
            ctx_holder["ctx"] = hit[1]
            return hit[0]

        def answer(doc: dict) -> Response:
            return signed_response(request, doc["status"], problem_body(doc), PROBLEM_MEDIA_TYPE)

        try:
            await run_in_threadpool(
                verify_request, request.method, _url(request), request.headers, body,
                resolve_public_key=resolve, nonce_store=container.nonce_store, now=int(time.time()),
                max_age_s=SIGNATURE_AGE_S_MAX, max_skew_s=CLOCK_SKEW_S_MAX)
        except SignatureError as exc:
            return answer(problem(401, exc.code, "Unauthenticated", str(exc), instance=request.url.path))
        except NonceStoreError as exc:
            return answer(problem(503, "nonce_store_unavailable", "Service unavailable", str(exc)))
        except Exception as exc:  # the terminal registry's database, while checking the signature
            if not is_database_unavailable(exc):
                raise
            log.warning("database unavailable verifying %s %s: %s", request.method, request.url.path, exc)
            return answer(_database_unavailable(request))
        payload: Any = None
        if json_body:
            try:
                payload = json.loads(body or b"null", parse_float=_refuse_float, parse_constant=_refuse_float)
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
                return answer(problem(400, "malformed_json", "Malformed JSON", f"the body is not valid JSON: {detail}",
                                      instance=request.url.path))
            if not isinstance(payload, dict):
                return answer(problem(422, "body_invalid", "Invalid request", "the body must be a JSON object",
                                      instance=request.url.path))
        try:
            result = await run_in_threadpool(work, ctx_holder["ctx"], payload)
        except DomainError as exc:
            return answer(from_domain(exc, request))
        except Exception as exc:
            if is_database_unavailable(exc):  # transient: the terminal resolves it by msgid
                log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
                return answer(_database_unavailable(request))
            # a defect: log it, answer a signed problem; the unit of work rolled back
            log.exception("unexpected error on %s %s", request.method, request.url.path)
            return answer(problem(500, "internal_error", "Internal error",
                                  "the engine failed to handle this request; nothing was posted for it "
                                  "unless a retry with the same idempotency key says so", instance=request.url.path))
        code = status
        if isinstance(result, dict) and result.get("replayed"):
            code = 200
        return signed_response(request, code, json_bytes(result), "application/json")

    s = container.settlements

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.post("/v1/settlements/presettle")
    async def presettle(request: Request) -> Response:
        return await handle(request, s.presettle)

    @app.post("/v1/settlements")
    async def settle(request: Request) -> Response:
        return await handle(request, s.settle, status=201)

    @app.get("/v1/settlements")
    async def query(request: Request, msgid: str = "") -> Response:
        return await handle(request, lambda ctx, _p: s.query_by_msgid(ctx, msgid), json_body=False)

    @app.get("/v1/settlements/{setl_id}")
    async def get_settlement(request: Request, setl_id: str) -> Response:
        return await handle(request, lambda ctx, _p: s.get(ctx, setl_id), json_body=False)

    @app.post("/v1/settlements/{setl_id}/cancel")
    async def cancel(request: Request, setl_id: str) -> Response:
        return await handle(request, lambda ctx, p: s.cancel(ctx, setl_id, p), status=201)

    @app.post("/v1/settlements/{setl_id}/refund")
    async def refund(request: Request, setl_id: str) -> Response:
        return await handle(request, lambda ctx, p: s.refund(ctx, setl_id, p), status=201)

    @app.post("/v1/payments")
    async def pay(request: Request) -> Response:
        return await handle(request, container.wallet.pay, status=201)

    @app.post("/v1/recharges")
    async def recharge(request: Request) -> Response:
        return await handle(request, container.wallet.recharge, status=201)

    @app.post("/v1/batches/close")
    async def close_batch(request: Request) -> Response:
        return await handle(request, container.closer.close_batch)

    @app.get("/v1/cards/{pan}")
    async def card(request: Request, pan: str) -> Response:
        def work(ctx, _p):
            if ctx.org_kind != "channel":  # balances are shown at recharge points, not to every till
                raise Rejected("terminal_not_a_channel", "only recharge channels may read a card's balance")
            row = container.cards.card(pan)
            bal = container.ledger.balance(wallet_account(pan))
            return {"pan": pan, "status": row.status, "form": row.form, "wallet_available_fen": bal.available,
                    "wallet_posted_fen": bal.net_posted}
        return await handle(request, work, json_body=False)

    return app


def _refuse_float(text: str):
    """JSON numbers with a fraction or exponent are refused: money is integer fen."""
    raise ValueError(f"number {text} is not an integer (amounts such as amount_fen are integer fen; a line's "
                     "pric and cnt are yuan and units as decimal strings, e.g. \"12.50\")")
