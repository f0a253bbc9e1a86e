"""Card service: citizens, card issuance, and authorisation of card and QR payments.

Authorisation (EMV Book 2; EMVCo QR CPM for the virtual card) is checked before any money
moves: the cryptogram is recomputed from the issuer master key and compared in constant time,
then the card's ATC is advanced with an atomic compare-and-set (``last_atc < atc``, card still
active), so a repeated or lower ATC — a replayed cryptogram — is refused even under concurrency.
The payments advance it in the transaction that posts them (:meth:`CardService.counter_hook`), so
a card blocked after its cryptogram was checked pays nothing. A QR code is also claimed once in
the single-use store. The ATC is consumed even when the payment is later declined for funds, as
on a real card.
"""

from __future__ import annotations

import binascii
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from sqlalchemy import Engine, insert, select, update

from card import cryptogram as cg
from card.accounts import wallet_spec
from card.identity import birth_date_of, is_valid_gb11643, is_valid_luhn, sex_of
from card.schema import cards, citizens
from ledger.db import HOOK_REFUSED, HookRefused, is_sqlite, write_connection
from ledger.errors import Conflict, Invalid, NotFound, Rejected
from ledger.model import AccountResult
from ledger.store import BatchedHook, Ledger

QR_VALIDITY_S = 60
#: GB/T 2261.1 sex codes, as NHSA's gend: unknown, male, female, unstated
SEX_CODES = ("0", "1", "2", "9")
#: The terminals' and the engine's local time zone (China Standard Time): business days,
#: insurance years and card transaction dates are its calendar dates.
LOCAL_TZ = ZoneInfo("Asia/Shanghai")


def local_date(clock_us: int) -> dt.date:
    """The calendar date in Asia/Shanghai of ``clock_us`` (µs since the epoch)."""
    return dt.datetime.fromtimestamp(clock_us / 1_000_000, LOCAL_TZ).date()


#: How many calendar days a card's transaction date (EMV tag 9A) may differ from the engine
#: clock's local date (a terminal's clock a little off around midnight).
TXN_DATE_TOLERANCE_DAYS = 1

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Authorisation:
    """A verified card or QR authorisation: who pays, with which counter, and the ARPC."""

    pan: str
    psn_no: str
    method: str  # card | qr
    atc: int
    arpc_hex: str = ""


class CardService:
    """Citizens and cards on one database, plus the issuer master key (16 bytes)."""

    def __init__(self, engine: Engine, ledger: Ledger, issuer_mk: bytes, nonce_store,
                 clock_us: Callable[[], int]) -> None:
        self.engine = engine
        self.ledger = ledger
        self.issuer_mk = issuer_mk
        self.nonce_store = nonce_store
        self.clock_us = clock_us

    # -------------------------------------------------------------- citizens and cards
    def register_citizen(self, *, psn_no: str, certno: str, psn_name: str, gend: str, brdy: dt.date,
                         insutype: str, retired: bool) -> bool:
        """Register an insured person (idempotent by ``psn_no``). Returns True when new.

        ``gend`` is GB/T 2261.1's sex code ("0" unknown, "1" male, "2" female, "9" unstated)
        and, when it says male or female, the sex the identity number carries; ``brdy`` must be
        the birth date it carries (the catalogue's sex and age restrictions are decided on
        them). Raises Invalid for an identity number failing GB 11643 (check digit, or a birth
        date after today: ``certno_invalid``), another sex code (``gend_invalid``), sex
        (``gend_mismatch``) or birth date (``brdy_mismatch``); Conflict when ``psn_no`` exists
        with other data."""
        if not is_valid_gb11643(certno, today=self.local_date()):
            raise Invalid("certno_invalid", f"{certno!r} is not a valid GB 11643 identity number")
        if gend not in SEX_CODES:
            raise Invalid("gend_invalid", f"gend {gend!r} is not a GB/T 2261.1 sex code (0, 1, 2 or 9)")
        if gend in ("1", "2") and gend != ("1" if sex_of(certno) == "M" else "2"):
            raise Invalid("gend_mismatch", f"gend {gend} is not the sex of identity number {certno}")
        if brdy != birth_date_of(certno):
            raise Invalid("brdy_mismatch", f"brdy {brdy} is not the birth date of identity number {certno} "
                          f"({birth_date_of(certno)})")
        if insutype not in ("310", "390"):
            raise Invalid("insutype_unknown", f"insutype {insutype!r} is not 310 or 390")
        row = dict(psn_no=psn_no, certno=certno, psn_name=psn_name, gend=gend, brdy=brdy,
                   insutype=insutype, retired=retired)
        with write_connection(self.engine) as conn:
            existing = conn.execute(select(citizens).where(citizens.c.psn_no == psn_no)).first()
            if existing is not None:
                if any(getattr(existing, k) != v for k, v in row.items()):
                    raise Conflict("citizen_exists_with_different_data", f"person {psn_no} already registered")
                return False
            conn.execute(insert(citizens).values(**row, created_ts=self.clock_us()))
            return True

    def citizen(self, psn_no: str):
        """The citizen row (psn_no, certno, psn_name, gend, brdy, insutype, retired) or NotFound."""
        with self.engine.connect() as conn:
            row = conn.execute(select(citizens).where(citizens.c.psn_no == psn_no)).first()
        if row is None:
            raise NotFound("person_not_found", f"no insured person {psn_no}")
        return row

    def issue_card(self, *, psn_no: str, pan: str, pan_seq: str = "01", form: str = "physical") -> bytes:
        """Issue a card (idempotent by PAN) and open its wallet; returns the card's ICC master
        key (EMV option A) for personalisation. Raises Invalid for a PAN failing Luhn."""
        if not is_valid_luhn(pan):
            raise Invalid("pan_invalid", f"{pan!r} fails the Luhn check (ISO/IEC 7812-1)")
        if form not in ("physical", "virtual"):
            raise Invalid("card_form_unknown", f"card form {form!r}")
        self.citizen(psn_no)
        with write_connection(self.engine) as conn:
            existing = conn.execute(select(cards).where(cards.c.pan == pan)).first()
            if existing is None:
                conn.execute(insert(cards).values(pan=pan, psn_no=psn_no, pan_seq=pan_seq, form=form,
                                                  status="active", last_atc=None, issued_ts=self.clock_us()))
            elif (existing.psn_no, existing.pan_seq, existing.form) != (psn_no, pan_seq, form):
                raise Conflict("card_exists_with_different_data", f"card {pan} already issued")
        result = self.ledger.create_accounts([wallet_spec(pan)])[0]
        if result not in (AccountResult.OK, AccountResult.EXISTS):
            raise Conflict("wallet_account_conflict", result.name.lower())
        return cg.derive_icc_mk(self.issuer_mk, pan, pan_seq)

    def card(self, pan: str):
        """The card row or NotFound (also for a PAN no card can have: not printable text)."""
        if not isinstance(pan, str) or not pan.isprintable():
            raise NotFound("card_not_found", f"no card {pan!r}")
        with self.engine.connect() as conn:
            row = conn.execute(select(cards).where(cards.c.pan == pan)).first()
        if row is None:
            raise NotFound("card_not_found", f"no card {pan}")
        return row

    def set_status(self, pan: str, status: str) -> None:
        """Block or re-activate a card."""
        if status not in ("active", "blocked"):
            raise Invalid("card_status_unknown", status)
        self.card(pan)
        with write_connection(self.engine) as conn:
            conn.execute(update(cards).where(cards.c.pan == pan).values(status=status))

    def local_date(self) -> dt.date:
        """Today's calendar date in Asia/Shanghai by the engine clock (not the business date,
        which runs ahead of the calendar once a day is closed early)."""
        return local_date(self.clock_us())

    # -------------------------------------------------------------- authorisation
    def authorise(self, auth: dict, *, amount_fen: int, terminal_id: str,
                  card=None, consume: bool = True) -> Authorisation:
        """Verify a payment authorisation for ``amount_fen`` and consume its counter.

        ``auth`` is the JSON the terminal sent: ``{"method": "card", "pan", "pan_seq", "atc",
        "arqc" (hex 8 bytes), "un" (hex 4 bytes), "txn_date" (ISO date), "amount_fen"}`` for the
        physical card (EMV ARQC), or ``{"method": "qr", "payload": base64 CPM}`` for the virtual
        card (EMVCo CPM, valid ``QR_VALIDITY_S`` and single-use).
        A card's ``txn_date`` is the terminal's own calendar date (EMV Book 3, tag 9A
        "Transaction Date", local date): it must be within ``TXN_DATE_TOLERANCE_DAYS`` of the
        engine clock's local date (:meth:`local_date`), never compared with the business day.
        A QR code's time window is checked against the engine clock too (EMVCo CPM).
        ``card``, when given, is the card row as the caller just read it (attributes ``pan``,
        ``psn_no``, ``pan_seq``, ``status``, ``last_atc``; the ATC check against it is re-done by
        the compare-and-set), saving a read. With ``consume=False`` the ATC (of a card or of a
        QR code) is checked against ``last_atc`` but not yet advanced: the caller then advances
        it in its own transaction with :meth:`counter_hook` (and, when that transaction posts
        nothing, with :meth:`consume`), so the check and the payment commit together. A QR code
        is claimed in the nonce store either way (single use, even before its ATC is advanced).
        Raises Invalid (malformed), NotFound (card), Rejected (blocked card, cryptogram
        mismatch, ATC replay, expired or reused code, amount mismatch).
        """
        method = auth.get("method") if isinstance(auth, dict) else None
        if method == "card":
            return self._authorise_card(auth, amount_fen=amount_fen, terminal_id=terminal_id,
                                        card=card, consume=consume)
        if method == "qr":
            return self._authorise_qr(auth, amount_fen=amount_fen, card=card, consume=consume)
        raise Invalid("payment_method_unknown", "payment.method must be 'card', 'qr' or 'cash'")

    def active_card(self, pan: str, card=None):
        """The card row (``card`` when it is that card's row as just read); NotFound, or Rejected
        ``card_blocked`` when it is not active."""
        row = card if card is not None and card.pan == pan else self.card(pan)
        if row.status != "active":
            raise Rejected("card_blocked", f"card {pan} is {row.status}")
        return row

    def _authorise_card(self, auth: dict, *, amount_fen: int, terminal_id: str,
                        card=None, consume: bool = True) -> Authorisation:
        try:
            pan = str(auth["pan"])
            if type(auth["atc"]) is not int:  # 1.5 or true are not counters (JSON integers only)
                raise TypeError(f"atc must be an integer, got {auth['atc']!r}")
            atc = auth["atc"]
            arqc = binascii.unhexlify(str(auth["arqc"]))
            un = binascii.unhexlify(str(auth["un"]))
            txn_date = dt.date.fromisoformat(str(auth["txn_date"]))
            authorised = int(auth["amount_fen"])
        except (KeyError, ValueError, TypeError, binascii.Error) as exc:
            raise Invalid("card_auth_malformed", f"payment card data: {exc}") from None
        if authorised != amount_fen:
            raise Rejected("amount_mismatch", f"the card authorised {authorised} fen but {amount_fen} fen is due;"
                           " present the card again for the new amount", status=409, amount_due_fen=amount_fen)
        today = self.local_date()
        if abs((txn_date - today).days) > TXN_DATE_TOLERANCE_DAYS:
            raise Rejected("card_txn_date_invalid", f"transaction date {txn_date} is not today ({today})")
        card = self.active_card(pan, card)
        try:
            data = cg.TransactionData(amount_authorised_fen=amount_fen, txn_date=txn_date,
                                      unpredictable_number=un, atc=atc, terminal_id=terminal_id)
            result = cg.check_arqc(self.issuer_mk, pan, card.pan_seq, data, arqc, last_atc=card.last_atc)
        except cg.CryptogramError as exc:
            raise Invalid("card_auth_malformed", str(exc)) from None
        if result is not cg.CryptogramResult.OK:
            raise Rejected(str(result.value), f"card {pan}: {result.value}")
        if consume:
            self._advance_atc(pan, atc)
        arpc = cg.generate_arpc(self.issuer_mk, pan, card.pan_seq, arqc, cg.ARC_APPROVED)
        return Authorisation(pan, card.psn_no, "card", atc, arpc.hex().upper())

    def _authorise_qr(self, auth: dict, *, amount_fen: int, card=None, consume: bool = True) -> Authorisation:
        from card import cpm

        payload = auth.get("payload")
        if not isinstance(payload, str):
            raise Invalid("qr_payload_missing", "payment.payload must be the scanned QR text")
        try:
            parsed = cpm.parse_cpm_payload(payload)
        except ValueError as exc:
            raise Invalid("qr_payload_malformed", str(exc)) from None
        card = self.active_card(parsed.pan, card)
        now_s = self.clock_us() // 1_000_000
        if (parsed.psn or "00") != card.pan_seq:
            raise Rejected("arqc_mismatch", "QR code: PAN sequence number does not match the card")
        try:
            result = cpm.verify_cpm_cryptogram(self.issuer_mk, parsed, now_s, QR_VALIDITY_S,
                                               last_atc=card.last_atc)
        except ValueError as exc:
            raise Invalid("qr_payload_malformed", str(exc)) from None
        if result is not cg.CryptogramResult.OK:
            raise Rejected(str(result.value), f"QR code: {result.value}")
        if not self.nonce_store.claim(_qr_claim(parsed.pan, parsed.atc), QR_VALIDITY_S * 2):
            raise Rejected("qr_code_already_used", "this QR code has already paid")
        if consume:
            self._advance_atc(parsed.pan, parsed.atc)
        return Authorisation(parsed.pan, card.psn_no, "qr", parsed.atc)

    @staticmethod
    def counter_hook(auth: Authorisation) -> "AdvanceCounter":
        """The ledger hook that accepts ``auth``'s ATC in the transaction that posts its payment
        (see :class:`AdvanceCounter`)."""
        return AdvanceCounter(auth.pan, auth.atc)

    @staticmethod
    def refusal_counter_hook(auth: Authorisation) -> "SpendCounter":
        """The ledger hook that uses up ``auth``'s ATC in the transaction that records the
        refusal of its payment, whatever the card's status (see :class:`SpendCounter`)."""
        return SpendCounter(auth.pan, auth.atc)

    def consume(self, auth: Authorisation) -> None:
        """Accept ``auth``'s ATC on its own (a payment authorised with ``consume=False`` that
        posted nothing: declined for funds, say — the counter is spent as on a real card). A
        counter already accepted (by a concurrent copy) is left as it is."""
        try:
            self._advance_atc(auth.pan, auth.atc)
        except Rejected:
            pass
        except Exception:  # the database is failing: the caller's own error is the one to report
            log.warning("card %s: ATC %d could not be marked used", auth.pan, auth.atc, exc_info=True)

    def unclaim(self, auth: Authorisation) -> None:
        """Give back the single-use claim of ``auth``'s QR code (nothing for a card), for a
        payment that failed before anything was committed with it — the database unavailable,
        say — so that the terminal's resend of the same request can use the same code. Safe
        even if the payment did commit after all: its counter was then advanced with it, and a
        second use is refused as ``atc_replayed``. Best effort: a store that cannot answer
        leaves the claim to expire (logged)."""
        if auth.method != "qr":
            return
        try:
            self.nonce_store.release(_qr_claim(auth.pan, auth.atc))
        except Exception:  # the store is failing: the caller's own error is the one to report
            log.warning("QR code of card %s (ATC %d) could not be given back", auth.pan, auth.atc, exc_info=True)

    def _advance_atc(self, pan: str, atc: int) -> None:
        """Accept ATC ``atc`` of card ``pan`` once, on its own: the compare-and-set of
        :class:`AdvanceCounter` in its own transaction (EMV Book 2: an ATC at or below the last
        accepted one is a replay). One autocommit statement on PostgreSQL, never retried after a
        lost connection (a retry could not tell its own first write from a replay). Raises
        Rejected ``atc_replayed``."""
        hook = AdvanceCounter(pan, atc)
        try:
            if is_sqlite(self.engine):
                with write_connection(self.engine) as conn:
                    AdvanceCounter.run_sa(conn, [hook])
            else:
                from ledger.store_pg import run_prepared

                run_prepared(self.engine, AdvanceCounter.pg_prepared, AdvanceCounter.pg_sql([hook]), idempotent=False)
        except Exception as exc:
            from ledger.store_pg import hook_refusal

            if not isinstance(exc, HookRefused) and hook_refusal(exc) is None:
                raise
            raise Rejected("atc_replayed", f"card {pan}: ATC {atc} was already used") from None


def _qr_claim(pan: str, atc: int) -> str:
    """The single-use store's key of a QR code: its card and counter."""
    return f"qr:{pan}:{atc}"


def qr_pan(payload: str) -> str:
    """The PAN that a scanned QR payload (EMVCo CPM) names, read without checking its
    cryptogram. Raises Invalid ``qr_payload_malformed``."""
    from card import cpm

    try:
        return cpm.parse_cpm_payload(payload).pan
    except ValueError as exc:
        raise Invalid("qr_payload_malformed", str(exc)) from None


def _counter_sql(name: str, *, active_only: bool) -> str:
    """``PREPARE name (pans text[], atcs int[])``: the counters' compare-and-set for a batch
    (``last_atc < atc``; with ``active_only`` the card must also be active), refusing
    (:data:`ledger.db.HOOK_REFUSED`) unless every one of them was accepted."""
    status = " AND c.status = 'active'" if active_only else ""
    return f"""
PREPARE {name} (text[], int[]) AS
WITH u AS (
    UPDATE cards c SET last_atc = x.atc
    FROM unnest($1, $2) AS x(pan, atc)
    WHERE c.pan = x.pan AND c.pan = ANY($1){status} AND (c.last_atc IS NULL OR c.last_atc < x.atc)
    RETURNING 1
)
SELECT CASE WHEN (SELECT count(*) FROM u) = cardinality($1) THEN 0
            ELSE CAST('{HOOK_REFUSED}card counter already used; accepted ' || (SELECT count(*) FROM u) AS int)
       END
"""


class AdvanceCounter(BatchedHook):
    """A ledger hook accepting card ``pan``'s ATC ``atc`` in the transaction of the entry that
    pays with it: a compare-and-set (``last_atc < atc``, card active) for every card paying in a
    batch, as one guarded UPDATE (also what :meth:`CardService._advance_atc` runs on its own). If any counter was
    used meanwhile (a replayed cryptogram racing its original) the hook refuses
    (:class:`ledger.db.HookRefused`) and nothing of that entry is written."""

    __slots__ = ("pan", "atc")

    def __init__(self, pan: str, atc: int) -> None:
        self.pan = pan
        self.atc = int(atc)

    merge_key = "cards"
    #: whether the compare-and-set also requires the card to be active
    active_only = True
    statement = "card_advance_atcs_v1"
    pg_prepared = {statement: _counter_sql(statement, active_only=True)}

    @classmethod
    def pg_sql(cls, hooks: list) -> str:
        from ledger.store_pg import int_array, text_array

        return f"EXECUTE {cls.statement}({text_array([h.pan for h in hooks])}, {int_array([h.atc for h in hooks])}); "

    @classmethod
    def run_sa(cls, conn, hooks: list) -> None:
        for h in hooks:
            q = update(cards).where(cards.c.pan == h.pan, (cards.c.last_atc.is_(None)) | (cards.c.last_atc < h.atc))
            if cls.active_only:
                q = q.where(cards.c.status == "active")
            if conn.execute(q.values(last_atc=h.atc)).rowcount != 1:
                raise HookRefused(f"card {h.pan}: ATC {h.atc} already used")


class SpendCounter(AdvanceCounter):
    """A ledger hook using up card ``pan``'s ATC ``atc`` in the transaction that records the
    refusal of the payment it authorised: the compare-and-set of :class:`AdvanceCounter`
    (``last_atc < atc``) without its check that the card is active — a payment refused because
    the card was blocked meanwhile uses up its cryptogram too (EMV: the card counted it), so the
    cryptogram cannot pay under another message once the card is unblocked. Refuses
    (:class:`ledger.db.HookRefused`) when the counter was used already."""

    __slots__ = ()
    merge_key = "cards_spent"
    active_only = False
    statement = "card_spend_atcs_v1"
    pg_prepared = {statement: _counter_sql(statement, active_only=False)}
