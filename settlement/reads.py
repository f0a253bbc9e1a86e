"""What a settlement reads before it decides, in one round trip.

A settlement (NHSA 2207/2304) needs, before the pure split can run: whether the visit's charge
batch or the message id is already taken (idempotency), the insured person's insurance type,
retirement status, sex and birth date (the catalogue's restrictions), the balances of the
person's accumulators and personal account, and — when the card pays — the card's status,
holder, PAN sequence number and last accepted ATC.

On PostgreSQL :func:`load_context` reads all of it with ONE server-side prepared statement on
a hot connection (autocommit: one statement, one snapshot; no transaction to roll back); on
SQLite it runs the same reads on one pooled connection. Every figure read here is re-checked
where it matters: the ledger entry asserts the accumulator balances it was split on, the card's
ATC advances with a compare-and-set, and a taken key falls back to the full replay path.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import orjson
from sqlalchemy import Engine, and_, bindparam, exists, or_, select

from card.schema import cards, citizens
from ledger.db import is_sqlite
from ledger.model import AccountKind, Balance
from settlement.schema import card_declines, settlements

#: digits only, as ISO/IEC 7812 PANs are; anything else is not looked up here (the card
#: service then reports it)
PAN_CHARS_MAX = 19


@dataclass(frozen=True, slots=True)
class CitizenRef:
    """The insured person as the split needs them: ``gend`` (NHSA / GB/T 2261.1: "1" male, "2"
    female) and ``brdy`` (birth date) decide the catalogue's sex and age restrictions."""

    psn_no: str
    insutype: str
    retired: bool
    gend: str
    brdy: dt.date


@dataclass(frozen=True, slots=True)
class CardRef:
    """A card as authorisation needs it (``last_atc`` None: never used)."""

    pan: str
    psn_no: str
    pan_seq: str
    status: str
    last_atc: int | None


@dataclass(frozen=True, slots=True)
class SettleContext:
    """One settlement's reads. ``taken``: a settlement of this (clinic, visit, batch) exists (a
    row with its entry key), or a row of this clinic uses the message id (the caller then takes the replay path);
    ``citizen`` / ``card`` are None when unknown; ``balances`` holds every account named that
    exists (pending holds past their timeout no longer count)."""

    taken: bool
    citizen: CitizenRef | None
    balances: dict[str, Balance]
    card: CardRef | None


#: A pending balance is the sum of the account's open holds: when it is zero there is no hold,
#: past its timeout or not, to leave out (two index probes per account saved; accumulators and
#: personal accounts never hold).
#: The four parts come back as one JSON array (one value to fetch and decode).
_STATEMENT = "settle_context_v6"
_STATEMENTS = {_STATEMENT: f"""
PREPARE {_STATEMENT} (text, text, text, text, text[], bigint, text) AS
SELECT json_build_array(
  EXISTS (SELECT 1 FROM settlements s WHERE s.entry_key = $2)
  OR EXISTS (SELECT 1 FROM settlements s WHERE s.fixmedins_code = $1 AND s.msgid = $3)
  OR EXISTS (SELECT 1 FROM card_declines d WHERE d.org_code = $1 AND d.msgid = $3),
  (SELECT json_build_array(c.insutype, c.retired, c.gend, c.brdy) FROM citizens c WHERE c.psn_no = $4),
  (SELECT json_agg(json_build_array(
      a.name, a.kind,
      CASE WHEN a.debits_pending = 0 THEN 0
           ELSE a.debits_pending - (SELECT coalesce(sum(p.amount), 0) FROM ledger_pending p
                                    WHERE p.state = 1 AND p.expires_ts <= $6 AND p.debit_account_id = a.id) END,
      a.debits_posted,
      CASE WHEN a.credits_pending = 0 THEN 0
           ELSE a.credits_pending - (SELECT coalesce(sum(p.amount), 0) FROM ledger_pending p
                                     WHERE p.state = 1 AND p.expires_ts <= $6 AND p.credit_account_id = a.id) END,
      a.credits_posted))
   FROM ledger_accounts a WHERE a.name = ANY($5)),
  (SELECT json_build_array(k.psn_no, k.pan_seq, k.status, k.last_atc) FROM cards k WHERE k.pan = $7))
"""}

_KINDS = {k.value: k for k in AccountKind}

def usable_pan(pan) -> str | None:
    """``pan`` when it can be a PAN (a string of at most 19 digits), else None."""
    if isinstance(pan, str) and 0 < len(pan) <= PAN_CHARS_MAX and pan.isascii() and pan.isdigit():
        return pan
    return None


def load_context(engine: Engine, *, org_code: str, entry_key: str, msgid: str, psn_no: str,
                 account_names: list[str], now_us: int, pan: str | None = None) -> SettleContext:
    """Read everything a settlement decides on (see the module docstring) in one round trip on
    PostgreSQL. The visit's settlement is looked up by its ledger ``entry_key`` (unique, one
    column: no plan can mistake another index's prefix for it, as a generic plan made while the
    table was small did with the (clinic, visit, batch) lookup, reading every row of the clinic).
    ``pan`` (digits; see :func:`usable_pan`) asks for the card too. The ids are the validated
    request fields (printable text)."""
    if is_sqlite(engine):
        return _load_sqlite(engine, org_code, entry_key, msgid, psn_no, account_names, now_us, pan)
    from ledger.store_pg import run_prepared, text_array, text_literal

    args = ", ".join([text_literal(org_code), text_literal(entry_key),
                      text_literal(msgid), text_literal(psn_no), text_array(account_names), str(int(now_us)),
                      "NULL" if pan is None else text_literal(pan)])
    res = run_prepared(engine, _STATEMENTS, f"EXECUTE {_STATEMENT}({args})")[-1]
    taken, raw_citizen, raw_balances, raw_card = orjson.loads(res.get_value(0, 0))
    citizen = None
    if raw_citizen is not None:
        insutype, retired, gend, brdy = raw_citizen
        citizen = CitizenRef(psn_no, insutype, bool(retired), gend, dt.date.fromisoformat(brdy))
    balances = {}
    for name, kind, dp, dpo, cp, cpo in raw_balances or ():
        balances[name] = Balance(name, _KINDS[kind], dp, dpo, cp, cpo)
    card = None
    if raw_card is not None:
        holder, pan_seq, status, last_atc = raw_card
        card = CardRef(pan, holder, pan_seq, status, last_atc)
    return SettleContext(taken, citizen, balances, card)


def _load_sqlite(engine: Engine, org_code: str, entry_key: str, msgid: str, psn_no: str,
                 account_names: list[str], now_us: int, pan: str | None) -> SettleContext:
    from ledger.store import Ledger

    s = settlements.c
    d = card_declines.c
    taken_q = select(or_(
        exists().where(or_(s.entry_key == bindparam("entry_key"),
                           and_(s.fixmedins_code == bindparam("org"), s.msgid == bindparam("msgid")))),
        exists().where(d.org_code == bindparam("org"), d.msgid == bindparam("msgid"))))
    with engine.connect() as conn:
        taken = bool(conn.execute(taken_q, {"org": org_code, "entry_key": entry_key, "msgid": msgid}).scalar())
        row = conn.execute(select(citizens.c.insutype, citizens.c.retired, citizens.c.gend, citizens.c.brdy)
                           .where(citizens.c.psn_no == psn_no)).first()
        card_row = None
        if pan is not None:
            card_row = conn.execute(select(cards.c.psn_no, cards.c.pan_seq, cards.c.status, cards.c.last_atc)
                                    .where(cards.c.pan == pan)).first()
        balances = Ledger.balances_on(conn, account_names, now_us)
    citizen = (CitizenRef(psn_no, row.insutype, bool(row.retired), row.gend, row.brdy)
               if row is not None else None)
    card = CardRef(pan, *card_row) if card_row is not None else None
    return SettleContext(taken, citizen, balances, card)
