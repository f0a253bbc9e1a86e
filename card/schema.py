"""Tables of citizens and cards (created by Alembic revision ``0002_app``).

A citizen (``psn_no``, the insured person's number) holds cards: a physical PC/SC card and/or a
virtual card in the phone app. The engine keeps, per card, the highest application transaction
counter (ATC) it has accepted: a repeated or lower ATC is a replay (EMV Book 2).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Date, ForeignKey, Index, Integer, MetaData, String, Table

metadata = MetaData()

citizens = Table(
    "citizens", metadata,
    Column("psn_no", String(32), primary_key=True),
    Column("certno", String(18), nullable=False, unique=True),  # GB 11643 identity number
    Column("psn_name", String(64), nullable=False),
    Column("gend", String(1), nullable=False),  # NHSA: 1 male, 2 female
    Column("brdy", Date, nullable=False),
    Column("insutype", String(3), nullable=False),
    Column("retired", Boolean, nullable=False),
    Column("created_ts", BigInteger, nullable=False),
)

cards = Table(
    "cards", metadata,
    Column("pan", String(19), primary_key=True),
    Column("psn_no", String(32), ForeignKey("citizens.psn_no"), nullable=False),
    Column("pan_seq", String(2), nullable=False),
    Column("form", String(8), nullable=False),  # physical | virtual
    Column("status", String(8), nullable=False),  # active | blocked
    Column("last_atc", Integer, nullable=True),
    Column("issued_ts", BigInteger, nullable=False),
)
Index("ix_cards_psn", cards.c.psn_no)
