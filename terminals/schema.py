"""Tables of organisations, terminals and batch closes (Alembic revision ``0002_app``).

An organisation is a clinic (``fixmedins_code``, with its hospital tier) or a merchant or a
recharge channel. Each terminal belongs to one and signs its requests with its own Ed25519 key
(RFC 9421). A batch close is a terminal's own count and totals for a business day.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Date, ForeignKey, Integer, MetaData, String, Table, Text, UniqueConstraint

metadata = MetaData()

orgs = Table(
    "orgs", metadata,
    Column("code", String(32), primary_key=True),
    Column("kind", String(12), nullable=False),  # clinic | merchant | channel | operator
    Column("name", String(128), nullable=False),
    Column("hospital_tier", Integer, nullable=True),
    Column("created_ts", BigInteger, nullable=False),
)

terminals = Table(
    "terminals", metadata,
    Column("terminal_id", String(32), primary_key=True),
    Column("org_code", String(32), ForeignKey("orgs.code"), nullable=False),
    Column("public_key", String(64), nullable=False),  # raw Ed25519 public key, hex
    Column("status", String(8), nullable=False),  # active | blocked
    Column("enrolled_ts", BigInteger, nullable=False),
)

batch_closes = Table(
    "batch_closes", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("terminal_id", String(32), ForeignKey("terminals.terminal_id"), nullable=False),
    Column("business_date", Date, nullable=False),
    Column("reported", Text, nullable=False),  # JSON: the terminal's counts and totals
    Column("computed", Text, nullable=False),  # JSON: the engine's counts and totals
    Column("result", String(16), nullable=False),  # balanced | out_of_balance
    Column("closed_ts", BigInteger, nullable=False),
    UniqueConstraint("terminal_id", "business_date", name="uq_batch_close_terminal_day"),
)
