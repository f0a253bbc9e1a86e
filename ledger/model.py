"""Ledger model: accounts, transfers, journal entries and their closed result enums.

The semantics are TigerBeetle's (accounts with posted and pending balances and limit flags;
transfers with pending / post_pending / void_pending flags; linked events that commit
all-or-nothing), with a journal *entry* as the unit of atomicity and idempotency:

* An :class:`EntrySpec` groups one or more :class:`TransferSpec` of one business event (a
  settlement with four payers). Either every transfer of the entry posts or none does.
* Every entry carries a client-chosen ``key``. The same key with the same content returns the
  original outcome marked ``replayed``; the same key with other content is
  ``exists_with_different_content``.
* Limits (``debits_must_not_exceed_credits`` and its inverse) are checked on each account's
  *net change within the entry* against its balance including pending debits/credits, so a
  reversing entry that passes money back through an intermediate account is accepted, while
  reversing money already paid out is refused (``exceeds_credits``).
* Balance assertions (beancount's ``balance`` directive) let a caller post only if an account's
  posted net balance is still what it read; the settlement service uses them to apply a split
  computed from year-to-date accumulators exactly once under concurrency.

Checks happen in the order the enum members are declared (first failing rule wins), so the
numeric codes are stable and documented by this file. Pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ledger.money import AMOUNT_FEN_MAX

KEY_LENGTH_MAX = 128
TRANSFERS_PER_ENTRY_MAX = 64
TIMEOUT_S_MAX = 30 * 24 * 3600

LEDGER_MONEY = 1  #: real money, CNY fen
LEDGER_MEMO = 2   #: memo accounts (year-to-date accumulators); balanced but not money


class AccountFlags(enum.IntFlag):
    """Account flags (TigerBeetle ``AccountFlags``)."""

    NONE = 0
    DEBITS_MUST_NOT_EXCEED_CREDITS = 1
    CREDITS_MUST_NOT_EXCEED_DEBITS = 2


class TransferFlags(enum.IntFlag):
    """Transfer flags (TigerBeetle ``TransferFlags``); at most one of them is set."""

    NONE = 0
    PENDING = 1
    POST_PENDING = 2
    VOID_PENDING = 4
    EXPIRED = 8  #: set by the ledger itself on the void it writes when a pending times out


class AccountKind(str, enum.Enum):
    """The type of an account in the chart of accounts, which gives its normal side."""

    ASSET = "asset"
    LIABILITY = "liability"
    FUND = "fund"
    EQUITY = "equity"
    MEMO = "memo"

    @property
    def credit_normal(self) -> bool:
        return self is not AccountKind.ASSET


class PendingState(enum.IntEnum):
    """Life of a pending transfer: exactly one resolution, ever."""

    PENDING = 1
    POSTED = 2
    VOIDED = 3
    EXPIRED = 4


class AccountResult(enum.IntEnum):
    """Outcome of creating an account; idempotent by name."""

    OK = 0
    EXISTS = 1
    NAME_MUST_NOT_BE_EMPTY = 2
    FLAGS_ARE_MUTUALLY_EXCLUSIVE = 3
    CREDIT_LIMIT_MUST_NOT_BE_NEGATIVE = 4
    UNKNOWN_CURRENCY = 5
    EXISTS_WITH_DIFFERENT_CODE = 6
    EXISTS_WITH_DIFFERENT_LEDGER = 7
    EXISTS_WITH_DIFFERENT_FLAGS = 8
    EXISTS_WITH_DIFFERENT_CREDIT_LIMIT = 9
    EXISTS_WITH_DIFFERENT_KIND = 10


class TransferResult(enum.IntEnum):
    """Outcome of one transfer, checked in declaration order (first failure wins)."""

    OK = 0
    LINKED_EVENT_FAILED = 1  #: another transfer of the same entry failed
    KEY_MUST_NOT_BE_EMPTY = 2
    KEY_TOO_LONG = 3
    FLAGS_ARE_MUTUALLY_EXCLUSIVE = 4
    PENDING_KEY_REQUIRED = 5
    PENDING_KEY_MUST_BE_EMPTY = 6
    TIMEOUT_RESERVED_FOR_PENDING_TRANSFER = 7
    TIMEOUT_TOO_LARGE = 8
    AMOUNT_MUST_NOT_BE_NEGATIVE = 9
    AMOUNT_MUST_BE_POSITIVE = 10
    AMOUNT_TOO_LARGE = 11
    PENDING_TRANSFER_NOT_FOUND = 12
    PENDING_TRANSFER_NOT_PENDING = 13
    PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT = 14
    PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT = 15
    PENDING_TRANSFER_ALREADY_POSTED = 16
    PENDING_TRANSFER_ALREADY_VOIDED = 17
    PENDING_TRANSFER_EXPIRED = 18
    EXCEEDS_PENDING_TRANSFER_AMOUNT = 19
    ACCOUNTS_MUST_BE_DIFFERENT = 20
    DEBIT_ACCOUNT_NOT_FOUND = 21
    CREDIT_ACCOUNT_NOT_FOUND = 22
    ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER = 23
    KEY_EXISTS_IN_ANOTHER_ENTRY = 24
    OVERFLOWS_BALANCE = 25
    EXCEEDS_CREDITS = 26  #: debit account's debits would exceed its credits (+ credit limit)
    EXCEEDS_DEBITS = 27   #: credit account's credits would exceed its debits (+ limit)


class EntryResult(enum.IntEnum):
    """Outcome of a journal entry, checked in declaration order."""

    OK = 0
    KEY_MUST_NOT_BE_EMPTY = 1
    KEY_TOO_LONG = 2
    TRANSFERS_MUST_NOT_BE_EMPTY = 3
    TOO_MANY_TRANSFERS = 4
    EXISTS_WITH_DIFFERENT_CONTENT = 5
    REVERSAL_TARGET_NOT_FOUND = 6
    ALREADY_REVERSED = 7
    REVERSAL_MUST_NOT_BE_REVERSED = 8
    BALANCE_ASSERTION_FAILED = 9
    TRANSFER_FAILED = 10  #: see ``EntryOutcome.failed_index`` and ``transfer_result``


@dataclass(frozen=True, slots=True)
class AccountSpec:
    """An account to create. ``name`` is the stable business key, e.g. ``wallet:9999330001``."""

    name: str
    kind: AccountKind
    code: int = 0  #: chart-of-accounts code
    ledger: int = LEDGER_MONEY
    currency: str = "CNY"
    flags: AccountFlags = AccountFlags.NONE
    credit_limit_fen: int = 0  #: allowance beyond the limit flag (overdraft); 0 = none


@dataclass(frozen=True, slots=True)
class TransferSpec:
    """One leg: ``amount_fen`` from ``debit`` to ``credit`` (account names).

    * flags NONE: posts at once; PENDING: reserves (counts against limits) until posted or
      voided or ``timeout_s`` passes (0 = never expires).
    * POST_PENDING / VOID_PENDING: resolve the pending transfer ``pending_key``; accounts may be
      left empty (inherited); a post's ``amount_fen`` of 0 posts the full pending amount.
    """

    key: str
    debit: str = ""
    credit: str = ""
    amount_fen: int = 0
    flags: TransferFlags = TransferFlags.NONE
    pending_key: str = ""
    timeout_s: int = 0
    code: int = 0


@dataclass(frozen=True, slots=True)
class BalanceAssertion:
    """Require ``credits_posted - debits_posted`` of ``account`` to equal ``expected_fen``
    before the entry applies (evaluated against the locked, current balance)."""

    account: str
    expected_fen: int


@dataclass(frozen=True, slots=True)
class EntrySpec:
    """A journal entry: linked transfers that commit all-or-nothing, idempotent by ``key``.

    ``reverses`` names the key of an entry this one reverses (at most once). ``metadata`` is
    a JSON-serialisable dict kept with the entry (for example the settlement's setlinfo).
    """

    key: str
    transfers: tuple[TransferSpec, ...]
    kind: str = "transfer"
    reverses: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    assertions: tuple[BalanceAssertion, ...] = ()

    def content_hash(self) -> str:
        """SHA-256 over the canonical JSON of everything but ``key``: the idempotency check."""
        body = {
            "kind": self.kind,
            "reverses": self.reverses,
            "metadata": self.metadata,
            "transfers": [
                [t.key, t.debit, t.credit, t.amount_fen, int(t.flags), t.pending_key, t.timeout_s, t.code]
                for t in self.transfers
            ],
            "assertions": [[a.account, a.expected_fen] for a in self.assertions],
        }
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class EntryOutcome:
    """What happened to one entry. ``replayed`` marks an idempotent repeat of an earlier one."""

    key: str
    result: EntryResult
    entry_id: int | None = None
    transfer_ids: tuple[int, ...] = ()
    timestamp_us: int | None = None
    replayed: bool = False
    failed_index: int | None = None
    transfer_result: TransferResult = TransferResult.OK
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.result is EntryResult.OK


@dataclass(frozen=True, slots=True)
class Balance:
    """An account's balances in fen. ``available`` follows the account's normal side and
    subtracts pending holds against it (holds count against limits)."""

    name: str
    kind: AccountKind
    debits_pending: int
    debits_posted: int
    credits_pending: int
    credits_posted: int

    @property
    def net_posted(self) -> int:
        """Posted balance on the account's normal side."""
        net = self.credits_posted - self.debits_posted
        return net if self.kind.credit_normal else -net

    @property
    def available(self) -> int:
        """Posted balance minus pending movements away from the normal side."""
        if self.kind.credit_normal:
            return self.credits_posted - self.debits_posted - self.debits_pending
        return self.debits_posted - self.credits_posted - self.credits_pending


def validate_amount_bound(amount_fen: int) -> bool:
    """True when the amount fits the per-field bound (``ledger.money.AMOUNT_FEN_MAX``)."""
    return 0 <= amount_fen <= AMOUNT_FEN_MAX
