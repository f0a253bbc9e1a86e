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
* Two-phase: a ``PENDING`` transfer holds its amount (counting against limits) until one
  ``POST_PENDING`` (all, or part: never more than held) or ``VOID_PENDING`` resolves it, or its
  ``timeout_s`` passes. A hold past its timeout no longer counts in balance reads at once, is
  voided by any batch touching its accounts and by the sweeper, and history shows it: an entry
  of kind ``expiry`` with a ``VOID_PENDING | EXPIRED`` transfer. Posting or voiding it then is
  ``pending_transfer_expired``.
* Reversal: an entry with ``reverses`` set is linked to the entry it reverses, at most once. Its
  transfers must mirror posted legs of the original (plain transfers from an account the
  original credited to the account it debited, per pair at most what the original moved), so a
  reversal can be partial but never invents money.

Result codes are closed enums whose names read as rules; their numbers are stable (new members
are only ever appended). The order in which the rules are checked is documented by the
``*_CHECK_ORDER`` tuples at the end of this module (first failing rule wins):

1. entry rules that need no state (key, kind, sizes);
2. idempotency: an existing key replays (same content hash) or is a conflict;
3. reversal rules, then balance assertions;
4. each transfer in order through :data:`TRANSFER_CHECK_ORDER` up to
   ``KEY_EXISTS_IN_ANOTHER_ENTRY`` (a transfer sees the effects of the earlier transfers of its
   own entry, so a pending transfer created earlier in an entry may be posted later in it);
5. balance rules on each account's *net change within the entry*, accounts in order of first
   appearance (debit account before credit account within a transfer): ``OVERFLOWS_BALANCE``
   (reported at the first transfer touching the account), ``EXCEEDS_CREDITS`` (at the first
   transfer debiting it), ``EXCEEDS_DEBITS`` (at the first transfer crediting it).

A batch of entries (``submit_many``, group commit) gives exactly the outcomes of submitting its
entries one after another.

A failing entry posts nothing; ``EntryOutcome.transfer_results`` then gives the failing transfer
its rule and every other transfer ``LINKED_EVENT_FAILED`` (TigerBeetle's linked events).
Pure: no I/O, no clock.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from ledger.money import AMOUNT_FEN_MAX

KEY_LENGTH_MAX = 128            #: entry keys and account names, characters
TRANSFER_KEY_LENGTH_MAX = 160   #: transfer keys (room for ``{entry key}/{leg}``), characters
KIND_LENGTH_MAX = 32
TRANSFERS_PER_ENTRY_MAX = 64
ASSERTIONS_PER_ENTRY_MAX = 64
METADATA_BYTES_MAX = 16 * 1024  #: UTF-8 bytes of the canonical JSON of ``EntrySpec.metadata``
TIMEOUT_S_MAX = 30 * 24 * 3600
INT32_MAX = 2**31 - 1           #: bound of ``code`` and ``ledger`` (INTEGER columns)

#: canonical JSON: sorted keys, no spaces, UTF-8 kept (the idempotency hash and stored metadata)
_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)

def _json_string(value: str) -> str:
    """``value`` as a JSON string, exactly as the canonical encoder writes it."""
    if value.isprintable() and '"' not in value and "\\" not in value:
        return '"' + value + '"'
    return _CANONICAL_JSON.encode(value)


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
    NAME_TOO_LONG = 11
    NAME_MUST_BE_PRINTABLE = 12
    CREDIT_LIMIT_TOO_LARGE = 13
    LEDGER_OUT_OF_RANGE = 14  #: the ledger number must be 1 .. 2**31 - 1
    CODE_OUT_OF_RANGE = 15    #: the chart-of-accounts code must be 0 .. 2**31 - 1
    EXISTS_WITH_DIFFERENT_CURRENCY = 16


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
    PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT = 28  #: a void names an amount other than 0 or the held amount
    KEY_MUST_BE_PRINTABLE = 29
    CODE_OUT_OF_RANGE = 30  #: the transfer code must be 0 .. 2**31 - 1
    TIMEOUT_MUST_NOT_BE_NEGATIVE = 31


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
    KEY_MUST_BE_PRINTABLE = 11
    KIND_INVALID = 12  #: the kind must be 1 .. 32 printable characters
    TOO_MANY_ASSERTIONS = 13
    METADATA_TOO_LARGE = 14  #: canonical JSON of the metadata above ``METADATA_BYTES_MAX``
    REVERSAL_MUST_MIRROR_ORIGINAL = 15  #: a reversal moves posted money back, leg by leg, at most once


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

    def metadata_json(self) -> str:
        """The canonical JSON text of ``metadata`` (sorted keys, no spaces) as stored.

        Raises ``TypeError`` when the metadata is not JSON-serialisable (a programming error)."""
        if not self.metadata:
            return "{}"
        return _CANONICAL_JSON.encode(self.metadata)

    def content_hash(self, metadata_json: str | None = None) -> str:
        """SHA-256 (hex) over the canonical JSON of everything but ``key``: the idempotency check.

        ``metadata_json`` may pass :meth:`metadata_json` when the caller already has it."""
        if metadata_json is None:
            metadata_json = self.metadata_json()
        # The canonical JSON of the whole body with sorted keys (assertions, kind, metadata,
        # reverses, transfers), built piece by piece: strings that need no escaping are quoted
        # directly, anything else goes through the JSON encoder (same text either way).
        q = _json_string
        transfers = ",".join(
            f"[{q(t.key)},{q(t.debit)},{q(t.credit)},{int(t.amount_fen)},{int(t.flags)},{q(t.pending_key)},"
            f"{int(t.timeout_s)},{int(t.code)}]" for t in self.transfers)
        assertions = ",".join(f"[{q(a.account)},{int(a.expected_fen)}]" for a in self.assertions)
        text = (f'{{"assertions":[{assertions}],"kind":{q(self.kind)},"metadata":{metadata_json},'
                f'"reverses":{q(self.reverses)},"transfers":[{transfers}]}}')
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
    #: one result per transfer when the entry was evaluated: all OK on success; on
    #: TRANSFER_FAILED the failing transfer's rule and LINKED_EVENT_FAILED for the others
    transfer_results: tuple[TransferResult, ...] = ()

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


# ---------------------------------------------------------------------------- check orders
#: The order in which account rules are checked (first failure wins).
ACCOUNT_CHECK_ORDER: tuple[AccountResult, ...] = (
    AccountResult.NAME_MUST_NOT_BE_EMPTY,
    AccountResult.NAME_TOO_LONG,
    AccountResult.NAME_MUST_BE_PRINTABLE,
    AccountResult.FLAGS_ARE_MUTUALLY_EXCLUSIVE,
    AccountResult.CREDIT_LIMIT_MUST_NOT_BE_NEGATIVE,
    AccountResult.CREDIT_LIMIT_TOO_LARGE,
    AccountResult.UNKNOWN_CURRENCY,
    AccountResult.LEDGER_OUT_OF_RANGE,
    AccountResult.CODE_OUT_OF_RANGE,
    AccountResult.EXISTS_WITH_DIFFERENT_KIND,
    AccountResult.EXISTS_WITH_DIFFERENT_CODE,
    AccountResult.EXISTS_WITH_DIFFERENT_LEDGER,
    AccountResult.EXISTS_WITH_DIFFERENT_CURRENCY,
    AccountResult.EXISTS_WITH_DIFFERENT_FLAGS,
    AccountResult.EXISTS_WITH_DIFFERENT_CREDIT_LIMIT,
    AccountResult.EXISTS,
    AccountResult.OK,
)

#: The order in which entry rules are checked (first failure wins).
ENTRY_CHECK_ORDER: tuple[EntryResult, ...] = (
    EntryResult.KEY_MUST_NOT_BE_EMPTY,
    EntryResult.KEY_TOO_LONG,
    EntryResult.KEY_MUST_BE_PRINTABLE,
    EntryResult.KIND_INVALID,
    EntryResult.TRANSFERS_MUST_NOT_BE_EMPTY,
    EntryResult.TOO_MANY_TRANSFERS,
    EntryResult.TOO_MANY_ASSERTIONS,
    EntryResult.METADATA_TOO_LARGE,
    EntryResult.EXISTS_WITH_DIFFERENT_CONTENT,  # (or an OK replay when the content is the same)
    EntryResult.REVERSAL_TARGET_NOT_FOUND,
    EntryResult.ALREADY_REVERSED,
    EntryResult.REVERSAL_MUST_NOT_BE_REVERSED,
    EntryResult.REVERSAL_MUST_MIRROR_ORIGINAL,
    EntryResult.BALANCE_ASSERTION_FAILED,
    EntryResult.TRANSFER_FAILED,
    EntryResult.OK,
)

#: The order in which one transfer's rules are checked (first failure wins). Rules for
#: post/void (``PENDING_TRANSFER_*``) apply only to them, account rules only to the others;
#: the last three are checked on each account's net change over the whole entry.
TRANSFER_CHECK_ORDER: tuple[TransferResult, ...] = (
    TransferResult.KEY_MUST_NOT_BE_EMPTY,
    TransferResult.KEY_TOO_LONG,
    TransferResult.KEY_MUST_BE_PRINTABLE,
    TransferResult.FLAGS_ARE_MUTUALLY_EXCLUSIVE,
    TransferResult.PENDING_KEY_REQUIRED,
    TransferResult.PENDING_KEY_MUST_BE_EMPTY,
    TransferResult.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER,
    TransferResult.TIMEOUT_MUST_NOT_BE_NEGATIVE,
    TransferResult.TIMEOUT_TOO_LARGE,
    TransferResult.AMOUNT_MUST_NOT_BE_NEGATIVE,
    TransferResult.AMOUNT_MUST_BE_POSITIVE,
    TransferResult.AMOUNT_TOO_LARGE,
    TransferResult.CODE_OUT_OF_RANGE,
    TransferResult.PENDING_TRANSFER_NOT_FOUND,
    TransferResult.PENDING_TRANSFER_NOT_PENDING,
    TransferResult.PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT,
    TransferResult.PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT,
    TransferResult.PENDING_TRANSFER_ALREADY_POSTED,
    TransferResult.PENDING_TRANSFER_ALREADY_VOIDED,
    TransferResult.PENDING_TRANSFER_EXPIRED,
    TransferResult.EXCEEDS_PENDING_TRANSFER_AMOUNT,
    TransferResult.PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT,
    TransferResult.ACCOUNTS_MUST_BE_DIFFERENT,
    TransferResult.DEBIT_ACCOUNT_NOT_FOUND,
    TransferResult.CREDIT_ACCOUNT_NOT_FOUND,
    TransferResult.ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER,
    TransferResult.KEY_EXISTS_IN_ANOTHER_ENTRY,
    TransferResult.OVERFLOWS_BALANCE,
    TransferResult.EXCEEDS_CREDITS,
    TransferResult.EXCEEDS_DEBITS,
    TransferResult.LINKED_EVENT_FAILED,
    TransferResult.OK,
)

assert set(ACCOUNT_CHECK_ORDER) == set(AccountResult)
assert set(ENTRY_CHECK_ORDER) == set(EntryResult)
assert set(TRANSFER_CHECK_ORDER) == set(TransferResult)
