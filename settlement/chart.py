"""Chart of accounts and account names (DESIGN.md, "Chart of accounts and posting recipes").

Money accounts live on ledger 1 (CNY fen). The year-to-date accumulators of medical settlement
(deductible borne, pooled fund paid, second tier paid, admissions) are memo accounts on ledger
2: each settlement entry carries memo legs that move them, so the accumulators change in the
same transaction as the money and a cancellation (the exact reverse of the legs) restores them.
"""

from __future__ import annotations

from card.accounts import wallet_account, wallet_spec
from ledger.model import LEDGER_MEMO, AccountFlags, AccountKind, AccountSpec

NO_OVERDRAFT = AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS

#: fund_pay_type (NHSA) of the pooled fund and second tier per insutype.
POOLED_FUND = {"310": "310100", "390": "390100"}
SECOND_TIER_FUND = {"310": "330100", "390": "390200"}
PERSONAL_ACCOUNT_FUND = "310200"

BANK_CENTRE = "bank:centre"
MEMO_CONTRA = "memo:accumulators"


def fund_account(fund_pay_type: str) -> str:
    """``fund:{fund_pay_type}`` — a pooled fund (credit-normal, never negative)."""
    return f"fund:{fund_pay_type}"


def personal_account(psn_no: str) -> str:
    """``personal_account:{psn_no}`` — the person's medical account (个人账户)."""
    return f"personal_account:{psn_no}"


def clinic_payable(fixmedins_code: str) -> str:
    """``clinic_payable:{code}`` — what the card centre owes a clinic."""
    return f"clinic_payable:{fixmedins_code}"


def merchant_payable(org_code: str) -> str:
    """``merchant_payable:{code}`` — what the card centre owes a merchant."""
    return f"merchant_payable:{org_code}"


def channel_clearing(channel: str) -> str:
    """``channel_clearing:{channel}`` — receivable from a recharge channel."""
    return f"channel_clearing:{channel}"


def payout_clearing(bank: str) -> str:
    """``payout_clearing:{bank}`` — owed to / collected by a bank for benefits and contributions."""
    return f"payout_clearing:{bank}"


def accumulator(name: str, psn_no: str, key: str | int) -> str:
    """Memo account of one accumulator: ``accum:{name}:{psn_no}:{year or mdtrt_id}``."""
    return f"accum:{name}:{psn_no}:{key}"


def spec_for(name: str) -> AccountSpec:
    """The account spec for any account name of this chart (the prefix decides)."""
    prefix = name.split(":", 1)[0]
    if prefix == "wallet":
        return wallet_spec(name.split(":", 1)[1])
    table = {
        "personal_account": (AccountKind.LIABILITY, 2201, NO_OVERDRAFT),
        "fund": (AccountKind.FUND, 3001, NO_OVERDRAFT),
        "clinic_payable": (AccountKind.LIABILITY, 2202, AccountFlags.NONE),
        "merchant_payable": (AccountKind.LIABILITY, 2203, AccountFlags.NONE),
        "channel_clearing": (AccountKind.ASSET, 1201, AccountFlags.NONE),
        "bank": (AccountKind.ASSET, 1001, AccountFlags.NONE),
        "payout_clearing": (AccountKind.LIABILITY, 2204, AccountFlags.NONE),
        "suspense": (AccountKind.LIABILITY, 2999, AccountFlags.NONE),
    }
    if prefix in ("accum", "memo"):
        return AccountSpec(name, AccountKind.MEMO, code=9001 if prefix == "accum" else 9000, ledger=LEDGER_MEMO)
    if prefix not in table:
        raise ValueError(f"no chart entry for account {name!r}")
    kind, code, flags = table[prefix]
    return AccountSpec(name, kind, code=code, flags=flags)


__all__ = ["wallet_account", "fund_account", "personal_account", "clinic_payable", "merchant_payable",
           "channel_clearing", "payout_clearing", "accumulator", "spec_for", "BANK_CENTRE", "MEMO_CONTRA",
           "POOLED_FUND", "SECOND_TIER_FUND"]
