"""Ledger accounts owned by cards: the stored-value wallet of each card (a liability to the
citizen that must never go below zero)."""

from __future__ import annotations

from ledger.model import AccountFlags, AccountKind, AccountSpec

WALLET_CODE = 2101  # chart of accounts: stored value owed to cardholders


def wallet_account(pan: str) -> str:
    """Ledger account name of a card's wallet: ``wallet:{pan}``."""
    return f"wallet:{pan}"


def wallet_spec(pan: str) -> AccountSpec:
    """The wallet's account spec: liability, ``debits_must_not_exceed_credits``."""
    return AccountSpec(wallet_account(pan), AccountKind.LIABILITY, code=WALLET_CODE,
                       flags=AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
