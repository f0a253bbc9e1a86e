"""Refusals of card-authorised requests, kept so that a resend answers the same (revision 0005).

A card settlement or merchant payment that the card authorised and the engine then refused
(the wallet cannot pay, the amount due changed, …) has spent the card's counter (ATC) — as on a
real card — or its single-use QR code. Without a record, the terminal that lost the answer and
sends the same message again would be told ``atc_replayed`` / ``qr_code_already_used``: true,
but not what happened. :func:`record` keeps the refusal by (organisation, msgid) with the
request's fingerprint; :func:`declined` gives it back for the same request (and a conflict for
another request under that msgid); :func:`find` serves the query by msgid (NHSA 5203).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence

from sqlalchemy import Connection, Engine, select

from ledger.db import HookRefused, is_unique_violation
from ledger.errors import Conflict, DomainError, Invalid, NotFound, Rejected, Unavailable
from ledger.store import InsertRows, Ledger
from settlement.schema import card_declines

log = logging.getLogger(__name__)
_KINDS = {"Rejected": Rejected, "Conflict": Conflict, "Invalid": Invalid, "NotFound": NotFound}
#: Refusals that are not this request's answer to keep: the msgid or visit belongs to another
#: request (that one's answer stands).
NOT_RECORDED = frozenset({"msgid_reused", "exists_with_different_content"})
#: What :func:`record` did.
RECORDED, COUNTER_USED, SKIPPED, FAILED = "recorded", "counter_used", "skipped", "failed"


def record(ledger: Ledger, *, org_code: str, msgid: str, request_hash: str, auth, refusal: DomainError,
           now_us: int, hooks: Sequence = ()) -> str:
    """Record ``refusal`` of the request (``msgid``, fingerprint ``request_hash``) that card
    authorisation ``auth`` (pan, atc) paid for, in one transaction with ``hooks`` (e.g. the
    card's counter advance, when it is not spent yet). Returns :data:`RECORDED` (also when a
    concurrent copy recorded it first); :data:`COUNTER_USED` when a hook refused — a copy of
    this request used the counter first, and its answer (a settlement, maybe) is the one to
    give; :data:`SKIPPED` for a refusal that is not this request's to keep (:data:`NOT_RECORDED`,
    or a transient 5xx); :data:`FAILED` when the database failed (logged; nothing written, the
    hooks' work neither)."""
    if refusal.code in NOT_RECORDED or int(getattr(refusal, "status", 409)) >= 500:
        return SKIPPED
    row = dict(org_code=org_code, msgid=msgid, request_hash=request_hash, pan=auth.pan, atc=int(auth.atc or 0),
               kind=type(refusal).__name__, code=refusal.code, status=int(getattr(refusal, "status", 409)),
               detail=refusal.detail, extra=json.dumps(refusal.extra, default=str), created_ts=now_us)
    try:
        ledger.run_hooks([*hooks, InsertRows(card_declines, [row])])
    except HookRefused:
        return COUNTER_USED
    except Exception as err:
        if is_unique_violation(err):
            return RECORDED
        log.warning("card %s: the refusal of %s/%s could not be recorded", auth.pan, org_code, msgid, exc_info=True)
        return FAILED
    return RECORDED


def settle_refusal(cards, ledger: Ledger, *, org_code: str, msgid: str, request_hash: str, auth,
                   refusal: DomainError, now_us: int, copy_answer: Callable[[], dict | None]) -> dict:
    """A request that card authorisation ``auth`` paid for was refused (``refusal``): record
    the refusal, using up the counter with it (``cards``: a :class:`card.service.CardService`;
    whatever the card's status), so that the same message sent again answers the same and the
    cryptogram pays nothing later, and raise ``refusal``.

    When the counter was used already: by a copy of this request, whose answer is returned
    (``copy_answer()``: its result, or None; it raises the copy's recorded refusal), else by
    another request with the same cryptogram — the refusal is then recorded alone. When the
    refusal could not be recorded (the database failing), raise Unavailable
    ``database_unavailable`` instead — not the refusal: a terminal takes a refusal as final,
    and with nothing recorded the same message could pay later — with the counter left unspent
    and a QR code given back, so that the same request sent again is decided, and its answer
    kept, anew."""
    keep = dict(org_code=org_code, msgid=msgid, request_hash=request_hash, auth=auth, refusal=refusal, now_us=now_us)
    recorded = record(ledger, **keep, hooks=(cards.refusal_counter_hook(auth),))
    if recorded == COUNTER_USED:
        answer = copy_answer()
        if answer is not None:
            return answer
        recorded = record(ledger, **keep)
    if recorded == FAILED:
        cards.unclaim(auth)
        raise Unavailable("database_unavailable", f"the request was refused ({refusal.code}) but the refusal "
                          "could not be recorded; send the same request again") from refusal
    raise refusal


def refuse_if_blocked(cards, ledger: Ledger, *, org_code: str, msgid: str, request_hash: str, auth,
                      now_us: int) -> None:
    """After card authorisation ``auth`` paid for the request and its counter was refused in
    the posting transaction (and no copy of the request answered it): when the card (``cards``,
    a :class:`card.service.CardService`) was blocked meanwhile, raise Rejected ``card_blocked``
    kept as this message's refusal with the counter used up (:func:`settle_refusal`), so that
    neither the same message sent again — after the card is unblocked, say — nor the same
    cryptogram under another message ever pays. Returns when the card is active."""
    try:
        cards.active_card(auth.pan)
    except Rejected as blocked:
        settle_refusal(cards, ledger, org_code=org_code, msgid=msgid, request_hash=request_hash, auth=auth,
                       refusal=blocked, now_us=now_us, copy_answer=lambda: None)
        raise


def find(conn: Connection, org_code: str, msgid: str):
    """The recorded refusal row of (organisation, msgid), or None (also for a msgid no row can
    hold: not printable text)."""
    if not (isinstance(msgid, str) and msgid.isprintable()):
        return None
    d = card_declines.c
    return conn.execute(select(card_declines).where(d.org_code == org_code, d.msgid == msgid)).first()


def refusal_from(row) -> DomainError:
    """The refusal a :data:`card_declines` row recorded, as the error to raise again."""
    cls = _KINDS.get(row.kind, Conflict)
    extra = json.loads(row.extra)
    if cls is Rejected:
        return Rejected(row.code, row.detail, status=row.status, **extra)
    return cls(row.code, row.detail, **extra)


def declined(engine: Engine, org_code: str, msgid: str, request_hash: str, *,
             reused: str = "msgid_reused") -> DomainError | None:
    """The refusal recorded for this very request (same msgid and fingerprint) as the error to
    raise again; Conflict ``reused`` when the msgid was declined for another request; None
    when nothing is recorded."""
    with engine.connect() as conn:
        row = find(conn, org_code, msgid)
    if row is None:
        return None
    if row.request_hash != request_hash:
        return Conflict(reused, f"msgid {msgid} was used for another request")
    return refusal_from(row)
