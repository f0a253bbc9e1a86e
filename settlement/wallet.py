"""Card wallet movements other than medical settlement: recharges, merchant payments, and the
funding of pooled funds and personal accounts by contributions (DESIGN.md posting recipes).

| event | debit | credit |
|---|---|---|
| recharge through a channel | ``channel_clearing:{channel}`` | ``wallet:{pan}`` |
| merchant payment | ``wallet:{pan}`` | ``merchant_payable:{merchant}`` |
| contribution collected by a bank | ``payout_clearing:{bank}`` | ``fund:{…}`` or ``personal_account:{psn}`` |

Each is idempotent by the terminal's message id: the same msgid with the same content returns
the first result (``replayed``); with other content it is a conflict. The business row is
written in the same database transaction as the ledger entry, which also checks that its
business day is still open (:class:`settlement.days.DayOpen`); when the day began closing
meanwhile the row is booked again on the day open now. A card payment's counter (ATC) is accepted
in that same transaction, with the card's status checked under it (EMV: a counter is spent once),
so a card blocked after the cryptogram was checked pays nothing; a payment refused after the card
authorised it spends the counter with its recorded refusal (:mod:`settlement.declines`).
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine, select

from card.service import CardService, qr_pan
from ledger.db import HookRefused
from ledger.errors import Conflict, DomainError, Invalid, NotFound, Rejected
from ledger.model import EntryOutcome, EntryResult, EntrySpec, TransferResult, TransferSpec
from ledger.money import AMOUNT_FEN_MAX
from ledger.store import InsertRows
from settlement import chart, declines
from settlement.days import BusinessDays, DayOpen, book_on_open_day, is_day_closed
from settlement.schema import payments, recharges
from settlement.service import (AccountCache, TerminalContext, await_replay, derived_id, fingerprint,
                                text_field)

RECHARGE_FEN_MAX = 5_000_00  # 5000 yuan per recharge: a stored-value card limit


def amount_field(req: dict, name: str = "amount_fen", *, maximum: int = AMOUNT_FEN_MAX) -> int:
    """A positive integer amount of fen; Invalid (naming the field) otherwise."""
    value = req.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise Invalid("field_invalid", f"{name}: must be an integer number of fen", field=name)
    if value <= 0:
        raise Invalid("field_invalid", f"{name}: must be positive", field=name)
    if value > maximum:
        raise Invalid("amount_too_large", f"{name}: {value} is beyond the limit of {maximum} fen", field=name)
    return value


class _CounterTaken(Exception):
    """The card's counter advance refused in the payment's transaction (used by a copy of the
    request, or the card no longer active): nothing of the payment was written."""


class WalletService:
    """Recharges, merchant payments and contributions over the ledger."""

    def __init__(self, engine: Engine, submit: Callable[..., EntryOutcome], cards: CardService,
                 days: BusinessDays, accounts: AccountCache, clock_us: Callable[[], int]) -> None:
        self.engine = engine
        self.submit = submit
        self.cards = cards
        self.days = days
        self.accounts = accounts
        self.clock_us = clock_us

    def _replay(self, table, org_code: str, msgid: str, request_hash: str) -> dict | None:
        org = table.c.channel if table is recharges else table.c.org_code
        with self.engine.connect() as conn:
            row = conn.execute(select(table).where(org == org_code, table.c.msgid == msgid)).first()
        if row is None:
            return None
        if row.request_hash != request_hash:
            raise Conflict("exists_with_different_content", f"msgid {msgid} was used for another request")
        doc = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row._asdict().items()
               if k not in ("request_hash", "entry_key", "created_ts")}
        doc["replayed"] = True
        return doc

    def recharge(self, ctx: TerminalContext, req: dict) -> dict:
        """Credit a card wallet from a recharge channel (the terminal's organisation).

        Body: ``{"msgid", "pan", "amount_fen"}``. Raises Invalid, NotFound (card), Rejected
        (blocked card; terminal not a channel), Conflict (msgid reused)."""
        if ctx.org_kind != "channel":
            raise Rejected("terminal_not_a_channel", f"terminal {ctx.terminal_id} is not a recharge channel")
        msgid = text_field(req, "msgid")
        pan = text_field(req, "pan", chars_max=19)
        amount = amount_field(req, maximum=RECHARGE_FEN_MAX)
        request_hash = fingerprint({"pan": pan, "amount_fen": amount, "channel": ctx.org_code})
        replay = self._replay(recharges, ctx.org_code, msgid, request_hash)
        if replay is not None:
            return replay
        card = self.cards.card(pan)
        if card.status != "active":
            raise Rejected("card_blocked", f"card {pan} is {card.status}")
        key = f"recharge:{ctx.org_code}:{msgid}"
        clearing = chart.channel_clearing(ctx.org_code)
        self.accounts.ensure([clearing, chart.wallet_account(pan)])
        entry = EntrySpec(key=key, kind="recharge",
                          transfers=(TransferSpec(f"{key}/0", clearing, chart.wallet_account(pan), amount),))

        def book(business_date) -> dict:
            row = dict(recharge_id=derived_id("R", key), msgid=msgid, channel=ctx.org_code,
                       terminal_id=ctx.terminal_id, pan=pan, amount_fen=amount, business_date=business_date,
                       request_hash=request_hash, entry_key=key, created_ts=self.clock_us())
            outcome = self.submit(entry, (DayOpen(business_date), InsertRows(recharges, [row])))
            return self._finish(outcome, recharges, msgid, request_hash, row)

        return book_on_open_day(self.days, book)

    def pay(self, ctx: TerminalContext, req: dict) -> dict:
        """A merchant takes a card or QR payment from the wallet.

        Body: ``{"msgid", "amount_fen", "payment": {card or qr authorisation}}``. Raises
        Invalid, NotFound, Rejected (card checks; ``insufficient_funds`` 402), Conflict."""
        if ctx.org_kind != "merchant":
            raise Rejected("terminal_not_a_merchant", f"terminal {ctx.terminal_id} is not a merchant terminal")
        msgid = text_field(req, "msgid")
        amount = amount_field(req)
        payment = req.get("payment")
        if not isinstance(payment, dict) or payment.get("method") not in ("card", "qr"):
            raise Invalid("payment_method_unknown", "payment.method must be 'card' or 'qr'", field="payment.method")
        ident = payment.get("pan") if payment["method"] == "card" else payment.get("payload")
        if not isinstance(ident, str):
            raise Invalid("field_invalid", "payment: card data missing", field="payment")
        # Who pays is part of the request: the card's PAN, read from a QR code's payload (a
        # resend under the same msgid with another person's code is another request).
        request_hash = fingerprint({"amount_fen": amount, "method": payment["method"], "merchant": ctx.org_code,
                                    "pan": ident if payment["method"] == "card" else qr_pan(ident)})
        replay = self._replay(payments, ctx.org_code, msgid, request_hash)
        if replay is not None:
            return replay
        refused = declines.declined(self.engine, ctx.org_code, msgid, request_hash,
                                    reused="exists_with_different_content")
        if refused is not None:  # this very request was refused after the card authorised it
            raise refused
        try:
            auth = self.cards.authorise(payment, amount_fen=amount, terminal_id=ctx.terminal_id, consume=False)
        except Rejected as exc:
            # The counter or code was just used: by a copy of this very request still in flight
            # (the terminal resent it)? Then wait for it and answer with its result.
            if exc.code in ("atc_replayed", "qr_code_already_used"):
                replay = self._copy_answer(ctx, msgid, request_hash)
                if replay is not None:
                    return replay
            raise
        # The counter is accepted in the transaction that posts the payment (with the card's
        # status checked there too), or, when the payment is refused, in the one that records
        # the refusal; on its own only when that fails.
        key = f"pay:{ctx.org_code}:{msgid}"
        payable = chart.merchant_payable(ctx.org_code)
        self.accounts.ensure([payable, chart.wallet_account(auth.pan)])
        entry = EntrySpec(key=key, kind="payment",
                          transfers=(TransferSpec(f"{key}/0", chart.wallet_account(auth.pan), payable, amount),))

        def book(business_date) -> dict:
            row = dict(payment_id=derived_id("P", key), msgid=msgid, org_code=ctx.org_code,
                       terminal_id=ctx.terminal_id, pan=auth.pan, pay_method=auth.method, amount_fen=amount,
                       business_date=business_date, request_hash=request_hash, entry_key=key,
                       created_ts=self.clock_us())
            try:
                outcome = self.submit(entry, (DayOpen(business_date), InsertRows(payments, [row]),
                                              self.cards.counter_hook(auth)))
            except HookRefused as exc:
                if is_day_closed(exc):
                    raise  # nothing written, the counter neither: booked again on the open day
                raise _CounterTaken() from exc
            return self._finish(outcome, payments, msgid, request_hash, row)

        try:
            doc = book_on_open_day(self.days, book)
        except _CounterTaken:
            # The counter was used meanwhile (by a copy of this request?), or the card was
            # blocked since it was read: nothing was written.
            for wait in (False, True):  # a copy's answer committed already, or one in flight
                replay = self._copy_answer(ctx, msgid, request_hash, wait=wait)
                if replay is not None:
                    return replay
                declines.refuse_if_blocked(self.cards, self.accounts.ledger, org_code=ctx.org_code, msgid=msgid,
                                           request_hash=request_hash, auth=auth, now_us=self.clock_us())
            raise Rejected("atc_replayed", f"card {auth.pan}: ATC {auth.atc} was already used") from None
        except DomainError as exc:  # refused after the card authorised it: spent with the refusal
            return declines.settle_refusal(
                self.cards, self.accounts.ledger, org_code=ctx.org_code, msgid=msgid, request_hash=request_hash,
                auth=auth, refusal=exc, now_us=self.clock_us(),
                copy_answer=lambda: self._copy_answer(ctx, msgid, request_hash, wait=False))
        except Exception:
            # Any other error (the database unavailable, 503) leaves the counter unspent and
            # gives a QR code back: nothing was posted with them, so this very request sent
            # again completes with the same cryptogram.
            self.cards.unclaim(auth)
            raise
        doc["arpc"] = auth.arpc_hex
        return doc

    def _copy_answer(self, ctx: TerminalContext, msgid: str, request_hash: str, *, wait: bool = True) -> dict | None:
        """The answer of a copy of this payment request (same msgid) that used the card's counter
        or QR code first: its payment (waited for while it is in flight, when ``wait``), or its
        recorded refusal raised again. None when there is neither."""
        lookup = lambda: self._replay(payments, ctx.org_code, msgid, request_hash)  # noqa: E731
        replay = await_replay(lookup) if wait else lookup()
        if replay is not None:
            return replay
        refused = declines.declined(self.engine, ctx.org_code, msgid, request_hash,
                                    reused="exists_with_different_content")
        if refused is not None:  # a copy of this request was refused meanwhile
            raise refused from None
        return None

    def _finish(self, outcome: EntryOutcome, table, msgid: str, request_hash: str, row: dict) -> dict:
        if outcome.ok:
            if outcome.replayed:
                replay = self._replay(table, row["channel"] if table is recharges else row["org_code"], msgid, request_hash)
                if replay is not None:
                    return replay
            doc = {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()
                   if k not in ("request_hash", "entry_key", "created_ts")}
            doc["replayed"] = False
            return doc
        if outcome.transfer_result is TransferResult.EXCEEDS_CREDITS:
            raise Rejected("insufficient_funds", "the card wallet does not hold enough", status=402)
        if outcome.result is EntryResult.EXISTS_WITH_DIFFERENT_CONTENT:
            raise Conflict("exists_with_different_content", f"msgid {msgid} was used for another request")
        raise Conflict(outcome.result.name.lower(), outcome.detail)

    def contribute(self, *, key: str, bank: str, account: str, amount_fen: int) -> EntryOutcome:
        """A contribution collected by ``bank`` credited to a fund or personal account
        (operator action, idempotent by ``key``). Raises Invalid for a bad account or amount."""
        if not (account.startswith("fund:") or account.startswith("personal_account:")):
            raise Invalid("account_invalid", f"{account}: contributions go to a fund or a personal account")
        amount_field({"amount_fen": amount_fen})
        clearing = chart.payout_clearing(bank)
        self.accounts.ensure([clearing, account])
        entry = EntrySpec(key=key, kind="contribution",
                          transfers=(TransferSpec(f"{key}/0", clearing, account, amount_fen),))
        outcome = self.submit(entry, None)
        if not outcome.ok:
            raise Conflict(outcome.result.name.lower(), outcome.detail)
        return outcome


__all__ = ["WalletService", "amount_field", "NotFound"]
