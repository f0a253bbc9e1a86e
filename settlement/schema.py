"""Tables of settlements, card payments and recharges (Alembic revision ``0002_app``).

Each row is written in the same database transaction as its ledger entry (a ledger hook), so a
row exists exactly when its money moved. Amounts are BIGINT fen; documents are JSON text with
the NHSA field names (``setlinfo``, the 2204 line split).
"""

from __future__ import annotations

from sqlalchemy import (BigInteger, Column, Date, Index, Integer, MetaData, String, Table, Text,
                        UniqueConstraint)

metadata = MetaData()

settlements = Table(
    "settlements", metadata,
    Column("setl_id", String(40), primary_key=True),
    Column("fixmedins_code", String(32), nullable=False),
    Column("mdtrt_id", String(40), nullable=False),
    Column("chrg_bchno", String(40), nullable=False),
    Column("msgid", String(40), nullable=False),
    Column("psn_no", String(32), nullable=False),
    Column("terminal_id", String(32), nullable=False),
    Column("insutype", String(3), nullable=False),
    Column("med_type", String(4), nullable=False),
    Column("insu_year", Integer, nullable=False),
    Column("business_date", Date, nullable=False),
    Column("pay_method", String(8), nullable=False),  # card | qr | cash
    Column("pan", String(19), nullable=True),
    Column("medfee_sumamt", BigInteger, nullable=False),
    Column("fund_pay_sumamt", BigInteger, nullable=False),
    Column("hifp_pay", BigInteger, nullable=False),
    Column("acct_pay", BigInteger, nullable=False),
    Column("psn_cash_pay", BigInteger, nullable=False),
    Column("wallet_pay", BigInteger, nullable=False),
    Column("setlinfo", Text, nullable=False),
    Column("lines", Text, nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("entry_key", String(128), nullable=False, unique=True),
    Column("kind", String(12), nullable=False),  # settlement | cancellation
    Column("original_setl_id", String(40), nullable=True),
    Column("created_ts", BigInteger, nullable=False),
    Column("arpc", String(16), nullable=True),  # the ARPC a card payment was answered with (hex)
    UniqueConstraint("fixmedins_code", "mdtrt_id", "chrg_bchno", "kind", name="uq_settlement_visit_batch"),
)
Index("ix_settlements_day", settlements.c.business_date)
Index("ix_settlements_original", settlements.c.original_setl_id)
Index("uq_settlements_org_msgid", settlements.c.fixmedins_code, settlements.c.msgid, unique=True)

payments = Table(
    "payments", metadata,
    Column("payment_id", String(40), primary_key=True),
    Column("msgid", String(40), nullable=False),
    Column("org_code", String(32), nullable=False),
    Column("terminal_id", String(32), nullable=False),
    Column("pan", String(19), nullable=False),
    Column("pay_method", String(8), nullable=False),
    Column("amount_fen", BigInteger, nullable=False),
    Column("business_date", Date, nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("entry_key", String(128), nullable=False, unique=True),
    Column("created_ts", BigInteger, nullable=False),
    UniqueConstraint("org_code", "msgid", name="uq_payments_org_msgid"),
)
Index("ix_payments_day", payments.c.business_date)

recharges = Table(
    "recharges", metadata,
    Column("recharge_id", String(40), primary_key=True),
    Column("msgid", String(40), nullable=False),
    Column("channel", String(32), nullable=False),
    Column("terminal_id", String(32), nullable=False),
    Column("pan", String(19), nullable=False),
    Column("amount_fen", BigInteger, nullable=False),
    Column("business_date", Date, nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("entry_key", String(128), nullable=False, unique=True),
    Column("created_ts", BigInteger, nullable=False),
    UniqueConstraint("channel", "msgid", name="uq_recharges_channel_msgid"),
)
Index("ix_recharges_day", recharges.c.business_date)

#: A card (or QR) settlement or merchant payment refused after the card authorised it
#: (declined for funds, say): its counter was spent with the refusal, so a resend of the same
#: message gets the same answer (and a query by msgid learns it) instead of ``atc_replayed``
#: (revision 0005; :mod:`settlement.declines`).
card_declines = Table(
    "card_declines", metadata,
    Column("org_code", String(32), primary_key=True),  # the clinic or merchant
    Column("msgid", String(40), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("pan", String(19), nullable=False),
    Column("atc", Integer, nullable=False),
    Column("kind", String(16), nullable=False),  # the refusal's class: Rejected | Conflict | Invalid
    Column("code", String(64), nullable=False),
    Column("status", Integer, nullable=False),
    Column("detail", Text, nullable=False),
    Column("extra", Text, nullable=False),  # JSON object of the refusal's extra fields
    Column("created_ts", BigInteger, nullable=False),
)

business_days = Table(
    "business_days", metadata,
    Column("business_date", Date, primary_key=True),
    Column("status", String(8), nullable=False),  # open | closing | closed
    Column("opened_ts", BigInteger, nullable=False),
    Column("closed_ts", BigInteger, nullable=True),
    Column("report", Text, nullable=True),  # JSON report of the close
)
#: at most one open day (revision 0004): concurrent openers of the next day agree on it
Index("uq_business_days_one_open", business_days.c.status, unique=True,
      postgresql_where=business_days.c.status == "open", sqlite_where=business_days.c.status == "open")
