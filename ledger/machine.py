"""The ledger state machine: a batch of journal entries evaluated against locked balances.

Pure (TigerBeetle's ``state_machine``): no I/O, no clock. The storage adapter (``ledger.pg`` or
``ledger.sqlite``) loads a :class:`Snapshot` of everything a batch can touch — the accounts it
names, locked; the pending transfers it resolves; the existing idempotency keys; reversal
targets; holds past their timeout on those accounts — then :func:`plan_batch` decides, entry
by entry and in order, what happens, and returns a :class:`Plan`: the rows to insert, the
pending resolutions, and one balance delta per account. The adapter writes the plan in bulk
and :func:`finish` turns it into one :class:`~ledger.model.EntryOutcome` per entry.

Every entry is evaluated against the balances as left by the entries before it in the batch,
so a batch is equivalent to submitting its entries one after another (group commit changes
throughput, never results). Rules and their order are documented in ``ledger.model``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from ledger.model import (ASSERTIONS_PER_ENTRY_MAX, INT32_MAX, KEY_LENGTH_MAX, KIND_LENGTH_MAX,
                          METADATA_BYTES_MAX, TIMEOUT_S_MAX, TRANSFER_KEY_LENGTH_MAX,
                          TRANSFERS_PER_ENTRY_MAX, AccountFlags, EntryOutcome, EntryResult,
                          EntrySpec, PendingState, TransferFlags, TransferResult, TransferSpec)
from ledger.money import AMOUNT_FEN_MAX

BALANCE_MAX = 2**63 - 1  #: a BIGINT column; debits (pending + posted) and credits must fit

# Transfer flags as plain ints (the hot path avoids IntFlag arithmetic).
F_NONE = 0
F_PENDING = int(TransferFlags.PENDING)
F_POST = int(TransferFlags.POST_PENDING)
F_VOID = int(TransferFlags.VOID_PENDING)
F_EXPIRED_VOID = int(TransferFlags.VOID_PENDING | TransferFlags.EXPIRED)
F_RESOLVING = F_POST | F_VOID
F_KNOWN = F_PENDING | F_POST | F_VOID

S_PENDING = int(PendingState.PENDING)
S_POSTED = int(PendingState.POSTED)
S_VOIDED = int(PendingState.VOIDED)
S_EXPIRED = int(PendingState.EXPIRED)

DMNEC = int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
CMNED = int(AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS)

OK = TransferResult.OK
LINKED = TransferResult.LINKED_EVENT_FAILED


def is_valid_key(key: str, length_max: int) -> bool:
    """A key the database can store: 1..length_max printable characters."""
    return 0 < len(key) <= length_max and key.isprintable()


# ------------------------------------------------------------------------------ inputs
@dataclass(slots=True)
class Prepared:
    """An entry with everything that needs no state worked out (may run outside the lock)."""

    spec: EntrySpec
    content_hash: str = ""
    metadata_json: str = "{}"
    failure: EntryOutcome | None = None          #: an entry rule that failed without state
    static: tuple[TransferResult, ...] = ()      #: per transfer: first failing stateless rule


def prepare(spec: EntrySpec) -> Prepared:
    """Check the stateless rules of an entry and compute its content hash.

    Raises ``TypeError`` for a programming error (an amount or timeout that is not an ``int``,
    metadata that is not JSON-serialisable)."""
    key = spec.key
    if not key:
        return Prepared(spec, failure=EntryOutcome(key, EntryResult.KEY_MUST_NOT_BE_EMPTY))
    if len(key) > KEY_LENGTH_MAX:
        return Prepared(spec, failure=EntryOutcome(key, EntryResult.KEY_TOO_LONG))
    if not key.isprintable():
        return Prepared(spec, failure=EntryOutcome(key, EntryResult.KEY_MUST_BE_PRINTABLE))
    if not is_valid_key(spec.kind, KIND_LENGTH_MAX):
        return Prepared(spec, failure=EntryOutcome(key, EntryResult.KIND_INVALID,
                                                   detail="kind must be 1..32 printable characters"))
    if not spec.transfers:
        return Prepared(spec, failure=EntryOutcome(key, EntryResult.TRANSFERS_MUST_NOT_BE_EMPTY))
    if len(spec.transfers) > TRANSFERS_PER_ENTRY_MAX:
        return Prepared(spec, failure=EntryOutcome(key, EntryResult.TOO_MANY_TRANSFERS,
                                                   detail=f"at most {TRANSFERS_PER_ENTRY_MAX}"))
    if len(spec.assertions) > ASSERTIONS_PER_ENTRY_MAX:
        return Prepared(spec, failure=EntryOutcome(key, EntryResult.TOO_MANY_ASSERTIONS,
                                                   detail=f"at most {ASSERTIONS_PER_ENTRY_MAX}"))
    metadata_json = spec.metadata_json()
    if len(metadata_json) > METADATA_BYTES_MAX // 4 and len(metadata_json.encode()) > METADATA_BYTES_MAX:
        return Prepared(spec, failure=EntryOutcome(key, EntryResult.METADATA_TOO_LARGE,
                                                   detail=f"at most {METADATA_BYTES_MAX} bytes of JSON"))
    static = tuple(static_transfer_result(t) for t in spec.transfers)
    return Prepared(spec, spec.content_hash(metadata_json), metadata_json, None, static)


def static_transfer_result(t: TransferSpec) -> TransferResult:
    """The first stateless transfer rule that fails, in ``TRANSFER_CHECK_ORDER``, or OK."""
    amount, timeout_s, flags = t.amount_fen, t.timeout_s, int(t.flags)
    if type(amount) is not int or type(timeout_s) is not int or type(t.code) is not int:
        raise TypeError(f"transfer {t.key!r}: amount_fen, timeout_s and code must be int")
    key = t.key
    if not key:
        return TransferResult.KEY_MUST_NOT_BE_EMPTY
    if len(key) > TRANSFER_KEY_LENGTH_MAX:
        return TransferResult.KEY_TOO_LONG
    if not key.isprintable():
        return TransferResult.KEY_MUST_BE_PRINTABLE
    if flags & ~F_KNOWN or (flags & (flags - 1)):  # unknown bits (EXPIRED is ledger-only) or two kinds
        return TransferResult.FLAGS_ARE_MUTUALLY_EXCLUSIVE
    resolving = flags & F_RESOLVING
    if resolving and not t.pending_key:
        return TransferResult.PENDING_KEY_REQUIRED
    if not resolving and t.pending_key:
        return TransferResult.PENDING_KEY_MUST_BE_EMPTY
    if timeout_s and not flags & F_PENDING:
        return TransferResult.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER
    if timeout_s < 0:
        return TransferResult.TIMEOUT_MUST_NOT_BE_NEGATIVE
    if timeout_s > TIMEOUT_S_MAX:
        return TransferResult.TIMEOUT_TOO_LARGE
    if amount < 0:
        return TransferResult.AMOUNT_MUST_NOT_BE_NEGATIVE
    if amount == 0 and not resolving:
        return TransferResult.AMOUNT_MUST_BE_POSITIVE
    if amount > AMOUNT_FEN_MAX:
        return TransferResult.AMOUNT_TOO_LARGE
    if not 0 <= t.code <= INT32_MAX:
        return TransferResult.CODE_OUT_OF_RANGE
    return OK


@dataclass(slots=True)
class Account:
    """A locked account row; balances are updated in memory as entries are accepted."""

    id: int
    name: str
    kind: str
    ledger: int
    flags: int
    credit_limit: int
    dp: int  #: debits pending
    dpo: int  #: debits posted
    cp: int  #: credits pending
    cpo: int  #: credits posted


@dataclass(slots=True)
class NewHold:
    """A ``ledger_pending`` row to insert for a pending transfer created in this batch."""

    transfer_ord: int
    debit_id: int
    credit_id: int
    amount: int
    state: int
    expires_ts: int | None
    resolved_ord: int | None = None


@dataclass(slots=True)
class Hold:
    """A transfer named by a post/void, or an open hold past its timeout."""

    key: str | None
    id: int | None           #: stored transfer id (None: created in this batch)
    debit_id: int
    credit_id: int
    amount: int
    pending: bool            #: False: the key names a transfer that is not a pending one
    state: int
    expires_ts: int | None
    new: NewHold | None = None


@dataclass(slots=True)
class StoredEntry:
    id: int
    content_hash: str
    ts: int
    transfer_ids: tuple[int, ...]


@dataclass(slots=True)
class ReversalTarget:
    """An entry named by ``EntrySpec.reverses`` and its posted legs (debit, credit, amount)."""

    id: int | None
    is_reversal: bool
    reversed: bool
    legs: list[tuple[int, int, int]]
    ord: int | None = None  #: entry created in this batch


@dataclass(slots=True)
class Snapshot:
    """What the storage loaded for a batch, under the account locks."""

    now_us: int
    accounts: dict[str, Account]
    by_id: dict[int, Account]
    holds: dict[str, Hold]                  #: by transfer key (post/void targets)
    entries: dict[str, StoredEntry]         #: existing entries by key
    transfer_keys: dict[str, int]           #: existing transfer key -> entry id
    reversal_targets: dict[str, ReversalTarget]
    expired: list[Hold]                     #: open holds past timeout, both accounts locked
    entry_ids: list[int] = field(default_factory=list)     #: ids drawn for new entries (PostgreSQL)
    transfer_ids: list[int] = field(default_factory=list)  #: ids drawn for new transfers (PostgreSQL)


# ------------------------------------------------------------------------------ plan
@dataclass(slots=True)
class Plan:
    """Rows to write for a batch. ``*_ord`` fields index rows of this plan (ids come later)."""

    now_us: int
    #: [key|None, content_hash, kind, reverses_entry_id|None, reverses_entry_ord|None, metadata_json]
    entries: list[list] = field(default_factory=list)
    #: [entry_ord, key|None, debit_id, credit_id, amount, flags, pending_id|None, pending_ord|None,
    #:  timeout_s, code]
    transfers: list[list] = field(default_factory=list)
    new_holds: list[NewHold] = field(default_factory=list)
    #: (transfer_id, new state, resolving transfer ord) for stored pending transfers (state 1 now)
    hold_updates: list[tuple[int, int, int]] = field(default_factory=list)
    #: (reversed entry id|None, reversed entry ord|None, reversal entry ord)
    reversals: list[tuple[int | None, int | None, int]] = field(default_factory=list)
    #: account id -> [debits_pending, debits_posted, credits_pending, credits_posted] deltas
    deltas: dict[int, list[int]] = field(default_factory=dict)
    #: per batch entry: EntryOutcome, or ("new", entry_ord, first transfer ord, count),
    #: or ("replay", batch index of the first occurrence)
    results: list = field(default_factory=list)
    expired_count: int = 0
    #: What the decisions read of the balances, for a write that checks them later (the group
    #: committer's speculation): accounts whose exact balances a decision depended on (named by
    #: a balance assertion; refused for a limit or an overflow) …
    exact: set[int] = field(default_factory=set)
    #: … and, per limited account a check passed on (in an accepted entry, or in a refused one
    #: before the account that refused it), the smallest slack left by those checks: [debit-side
    #: slack or None, credit-side slack or None] (fen; ``DMNEC``: credits posted + limit -
    #: debits; ``CMNED``: debits posted + limit - credits). Every acceptance still holds on
    #: balances that differ by less than that slack in the limit's favour (and each refusal
    #: still comes from the same account, the checks before it passing again). Other accounts'
    #: balances were not read by any decision: moved by anyone, the batch's additive balance
    #: updates stay right.
    slack: dict[int, list] = field(default_factory=dict)
    #: Keys a refused entry found free (its entry key, the keys of the transfers it got past):
    #: another writer storing one meanwhile would change that answer, so the write checks they
    #: are still free (``store_pg.BalanceCheck``).
    absent_entry_keys: list[str] = field(default_factory=list)
    absent_transfer_keys: list[str] = field(default_factory=list)
    #: A refusal was decided on something the write cannot check (a hold's or a reversal
    #: target's state, an account or hold not found, a transfer key taken…): a batch decided
    #: on an unlocked read must then be applied again with locks (:meth:`Ledger.speculate`).
    unverifiable: bool = False

    @property
    def writes(self) -> bool:
        return bool(self.entries)


def plan_batch(batch: Sequence[Prepared], snap: Snapshot) -> Plan:
    """Decide every entry of ``batch`` in order against ``snap`` (mutated: balances and hold
    states move as entries are accepted). Returns the :class:`Plan` to persist."""
    plan = Plan(snap.now_us)
    for hold in snap.expired:
        _expire(plan, snap, hold)
    posted: dict[str, tuple[int, str, int]] = {}  # entry key -> (batch index, hash, entry ord)
    batch_tkeys: set[str] = set()
    batch_holds: dict[str, Hold] = {}
    batch_targets: dict[str, ReversalTarget] = {}
    reversed_in_batch: set[str] = set()
    for index, p in enumerate(batch):
        if p.failure is not None:
            plan.results.append(p.failure)
            continue
        result = _entry(plan, snap, p, index, posted, batch_tkeys, batch_holds, batch_targets, reversed_in_batch)
        if type(result) is EntryOutcome and not result.ok and not plan.unverifiable:
            _refusal_read(plan, p, result)
        plan.results.append(result)
    return plan


#: Refusals whose reads the speculative write checks: a limit (the refusing account's balances
#: exactly, the limit checks passed before it as floors) or a balance assertion (exactly).
_LIMIT_RESULTS = frozenset({TransferResult.EXCEEDS_CREDITS, TransferResult.EXCEEDS_DEBITS,
                            TransferResult.OVERFLOWS_BALANCE})


def _refusal_read(plan: Plan, p: Prepared, outcome: EntryOutcome) -> None:
    """Record what a refused entry's answer was decided on, for a write that checks it later.

    An entry refused for a limit or a balance assertion read balances (kept in :attr:`Plan.exact`
    and :attr:`Plan.slack` as it was decided) and found its keys free (kept here). Any other
    refusal, one of a reversal (the target's state), or a limit refusal of an entry that posts or
    voids holds (found pending, which no balance comparison can confirm: an overlay's balances
    already count a batch in flight resolving the same hold, and a hold voided and another opened
    for the same amount leave them as they were) read what the write cannot check:
    :attr:`Plan.unverifiable`. A refusal for an idempotency conflict read a stored entry, which
    never changes."""
    spec = p.spec
    result = outcome.result
    if result is EntryResult.EXISTS_WITH_DIFFERENT_CONTENT:
        return
    if spec.reverses:
        plan.unverifiable = True
        return
    if result is EntryResult.BALANCE_ASSERTION_FAILED:
        plan.absent_entry_keys.append(spec.key)
        return
    # The limits are checked after every transfer was taken: all its keys were found free, and
    # all its holds resolved.
    if (result is EntryResult.TRANSFER_FAILED and outcome.transfer_result in _LIMIT_RESULTS
            and not any(t.flags & F_RESOLVING for t in spec.transfers)):
        plan.absent_entry_keys.append(spec.key)
        plan.absent_transfer_keys.extend(t.key for t in spec.transfers)
        return
    plan.unverifiable = True


def _expire(plan: Plan, snap: Snapshot, hold: Hold) -> None:
    """The ledger's clock voids a hold past its timeout: an entry of kind ``expiry`` with one
    VOID_PENDING|EXPIRED transfer, so history shows when and what was released."""
    entry_ord = len(plan.entries)
    plan.entries.append([None, "", "expiry", None, None, "{}"])
    tord = len(plan.transfers)
    plan.transfers.append([entry_ord, None, hold.debit_id, hold.credit_id, hold.amount, F_EXPIRED_VOID,
                           hold.id, None, 0, 0])
    plan.hold_updates.append((hold.id, S_EXPIRED, tord))  # type: ignore[arg-type]
    hold.state = S_EXPIRED
    _delta(plan.deltas, hold.debit_id)[0] -= hold.amount
    _delta(plan.deltas, hold.credit_id)[2] -= hold.amount
    snap.by_id[hold.debit_id].dp -= hold.amount
    snap.by_id[hold.credit_id].cp -= hold.amount
    plan.expired_count += 1


def _delta(deltas: dict[int, list[int]], account_id: int) -> list[int]:
    d = deltas.get(account_id)
    if d is None:
        d = deltas[account_id] = [0, 0, 0, 0]
    return d


def _entry(plan: Plan, snap: Snapshot, p: Prepared, index: int, posted: dict, batch_tkeys: set[str],
           batch_holds: dict[str, Hold], batch_targets: dict[str, ReversalTarget],
           reversed_in_batch: set[str]):
    spec = p.spec
    key = spec.key
    # Idempotency: an entry posted earlier in this batch, or stored.
    first = posted.get(key)
    if first is not None:
        if first[1] == p.content_hash:
            return ("replay", first[0])
        return EntryOutcome(key, EntryResult.EXISTS_WITH_DIFFERENT_CONTENT,
                            detail="the key was used for an entry with other content")
    stored = snap.entries.get(key)
    if stored is not None:
        if stored.content_hash == p.content_hash:
            return EntryOutcome(key, EntryResult.OK, stored.id, stored.transfer_ids, stored.ts, replayed=True,
                                transfer_results=(OK,) * len(stored.transfer_ids))
        return EntryOutcome(key, EntryResult.EXISTS_WITH_DIFFERENT_CONTENT,
                            detail="the key was used for an entry with other content")
    accounts = snap.accounts
    # Reversal rules.
    target = None
    if spec.reverses:
        target = batch_targets.get(spec.reverses) or snap.reversal_targets.get(spec.reverses)
        if target is None:
            return EntryOutcome(key, EntryResult.REVERSAL_TARGET_NOT_FOUND,
                                detail=f"no entry with key {spec.reverses!r}")
        if target.reversed or spec.reverses in reversed_in_batch:
            return EntryOutcome(key, EntryResult.ALREADY_REVERSED,
                                detail=f"entry {spec.reverses!r} was already reversed")
        if target.is_reversal:
            return EntryOutcome(key, EntryResult.REVERSAL_MUST_NOT_BE_REVERSED,
                                detail=f"entry {spec.reverses!r} is itself a reversal")
        problem = _mirror_problem(spec, target, accounts)
        if problem:
            return EntryOutcome(key, EntryResult.REVERSAL_MUST_MIRROR_ORIGINAL, detail=problem)
    # Balance assertions against the current (locked) balances.
    for a in spec.assertions:
        acc = accounts.get(a.account)
        actual = (acc.cpo - acc.dpo) if acc is not None else None
        if acc is not None:
            plan.exact.add(acc.id)
        else:
            plan.unverifiable = True  # the account may be opened meanwhile
        if actual != a.expected_fen:
            return EntryOutcome(key, EntryResult.BALANCE_ASSERTION_FAILED,
                                detail=f"{a.account}: expected {a.expected_fen}, found {actual}")

    # Transfers, in order; each sees the effects of the earlier ones of this entry.
    now = snap.now_us
    transfers = spec.transfers
    n = len(transfers)
    base_ord = len(plan.transfers)
    deltas: dict[int, list[int]] = {}
    rows: list[list] = []
    entry_tkeys: set[str] = set()
    local_holds: dict[str, Hold] = {}
    resolutions: list[tuple[Hold, int, int]] = []  # (hold, new state, resolving transfer ord)
    debit_first: dict[int, int] = {}
    credit_first: dict[int, int] = {}
    entry_ord = len(plan.entries)
    for i, t in enumerate(transfers):
        r = p.static[i]
        if r is not OK:
            return _failed(spec, i, r, "")
        flags = int(t.flags)
        tkey = t.key
        if flags & F_RESOLVING:
            pk = t.pending_key
            hold = local_holds.get(pk) or batch_holds.get(pk) or snap.holds.get(pk)
            if hold is None:
                if pk in entry_tkeys or pk in batch_tkeys:  # an earlier transfer of this batch, not pending
                    return _failed(spec, i, TransferResult.PENDING_TRANSFER_NOT_PENDING, pk)
                return _failed(spec, i, TransferResult.PENDING_TRANSFER_NOT_FOUND, pk)
            if not hold.pending:
                return _failed(spec, i, TransferResult.PENDING_TRANSFER_NOT_PENDING, pk)
            if t.debit and (accounts.get(t.debit) is None or accounts[t.debit].id != hold.debit_id):
                return _failed(spec, i, TransferResult.PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT, t.debit)
            if t.credit and (accounts.get(t.credit) is None or accounts[t.credit].id != hold.credit_id):
                return _failed(spec, i, TransferResult.PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT, t.credit)
            state = hold.state
            for h, s, _ in resolutions:  # resolved earlier in this entry
                if h is hold:
                    state = s
            if state == S_POSTED:
                return _failed(spec, i, TransferResult.PENDING_TRANSFER_ALREADY_POSTED, pk)
            if state == S_VOIDED:
                return _failed(spec, i, TransferResult.PENDING_TRANSFER_ALREADY_VOIDED, pk)
            if state == S_EXPIRED or (hold.expires_ts is not None and hold.expires_ts <= now):
                return _failed(spec, i, TransferResult.PENDING_TRANSFER_EXPIRED, pk)
            if t.amount_fen > hold.amount:
                return _failed(spec, i, TransferResult.EXCEEDS_PENDING_TRANSFER_AMOUNT,
                               f"{t.amount_fen} > {hold.amount}")
            if flags & F_VOID and t.amount_fen not in (0, hold.amount):
                return _failed(spec, i, TransferResult.PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT,
                               f"a void releases all {hold.amount}")
            if tkey in snap.transfer_keys or tkey in batch_tkeys or tkey in entry_tkeys:
                return _failed(spec, i, TransferResult.KEY_EXISTS_IN_ANOTHER_ENTRY, tkey)
            entry_tkeys.add(tkey)
            d_id, c_id = hold.debit_id, hold.credit_id
            d = deltas.get(d_id) or deltas.setdefault(d_id, [0, 0, 0, 0])
            c = deltas.get(c_id) or deltas.setdefault(c_id, [0, 0, 0, 0])
            d[0] -= hold.amount
            c[2] -= hold.amount
            if flags & F_POST:
                amount = t.amount_fen or hold.amount
                d[1] += amount
                c[3] += amount
                new_state = S_POSTED
            else:
                amount = hold.amount
                new_state = S_VOIDED
            resolutions.append((hold, new_state, base_ord + i))
            rows.append([entry_ord, tkey, d_id, c_id, amount, flags, hold.id,
                         None if hold.new is None else hold.new.transfer_ord, 0, t.code])
            debit_first.setdefault(d_id, i)
            credit_first.setdefault(c_id, i)
            continue
        if t.debit == t.credit:
            return _failed(spec, i, TransferResult.ACCOUNTS_MUST_BE_DIFFERENT, t.debit)
        da = accounts.get(t.debit)
        if da is None:
            return _failed(spec, i, TransferResult.DEBIT_ACCOUNT_NOT_FOUND, t.debit)
        ca = accounts.get(t.credit)
        if ca is None:
            return _failed(spec, i, TransferResult.CREDIT_ACCOUNT_NOT_FOUND, t.credit)
        if da.ledger != ca.ledger:
            return _failed(spec, i, TransferResult.ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER,
                           f"{t.debit} is on ledger {da.ledger}, {t.credit} on {ca.ledger}")
        if tkey in snap.transfer_keys or tkey in batch_tkeys or tkey in entry_tkeys:
            return _failed(spec, i, TransferResult.KEY_EXISTS_IN_ANOTHER_ENTRY, tkey)
        entry_tkeys.add(tkey)
        amount = t.amount_fen
        d_id, c_id = da.id, ca.id
        d = deltas.get(d_id) or deltas.setdefault(d_id, [0, 0, 0, 0])
        c = deltas.get(c_id) or deltas.setdefault(c_id, [0, 0, 0, 0])
        if flags & F_PENDING:
            d[0] += amount
            c[2] += amount
            new = NewHold(base_ord + i, d_id, c_id, amount, S_PENDING,
                          now + t.timeout_s * 1_000_000 if t.timeout_s else None)
            local_holds[tkey] = Hold(tkey, None, d_id, c_id, amount, True, S_PENDING, new.expires_ts, new)
        else:
            d[1] += amount
            c[3] += amount
        rows.append([entry_ord, tkey, d_id, c_id, amount, flags, None, None, t.timeout_s, t.code])
        debit_first.setdefault(d_id, i)
        credit_first.setdefault(c_id, i)

    # Balance rules on each account's net change within the entry.
    by_id = snap.by_id
    checked: list[tuple[int, int, int]] = []  # (account id, side 0 debit / 1 credit, slack)
    for acc_id, (dp, dpo, cp, cpo) in deltas.items():
        a = by_id[acc_id]
        debits = a.dp + dp + a.dpo + dpo
        credits = a.cp + cp + a.cpo + cpo
        if debits > BALANCE_MAX or credits > BALANCE_MAX:
            _decided_on_exact(plan, acc_id, checked)
            i = min(debit_first.get(acc_id, n), credit_first.get(acc_id, n))
            return _failed(spec, i, TransferResult.OVERFLOWS_BALANCE, a.name)
        if a.flags & DMNEC and dp + dpo - cpo > 0:
            slack = a.cpo + cpo + a.credit_limit - debits
            if slack < 0:
                _decided_on_exact(plan, acc_id, checked)
                available = a.cpo + a.credit_limit - a.dp - a.dpo
                return _failed(spec, debit_first[acc_id], TransferResult.EXCEEDS_CREDITS,
                               f"{a.name}: available {available}, entry needs {dp + dpo - cpo}"
                               + ("; the money was already paid out" if spec.reverses else ""))
            checked.append((acc_id, 0, slack))
        if a.flags & CMNED and cp + cpo - dpo > 0:
            slack = a.dpo + dpo + a.credit_limit - credits
            if slack < 0:
                _decided_on_exact(plan, acc_id, checked)
                available = a.dpo + a.credit_limit - a.cp - a.cpo
                return _failed(spec, credit_first[acc_id], TransferResult.EXCEEDS_DEBITS,
                               f"{a.name}: available {available}, entry needs {cp + cpo - dpo}")
            checked.append((acc_id, 1, slack))
    _keep_slack(plan, checked)

    # Accepted: apply.
    for acc_id, dl in deltas.items():
        a = by_id[acc_id]
        a.dp += dl[0]
        a.dpo += dl[1]
        a.cp += dl[2]
        a.cpo += dl[3]
        total = plan.deltas.get(acc_id)
        if total is None:
            plan.deltas[acc_id] = dl
        else:
            total[0] += dl[0]
            total[1] += dl[1]
            total[2] += dl[2]
            total[3] += dl[3]
    plan.transfers.extend(rows)
    batch_tkeys |= entry_tkeys
    for tkey, hold in local_holds.items():
        plan.new_holds.append(hold.new)  # type: ignore[arg-type]
        batch_holds[tkey] = hold
    for hold, new_state, tord in resolutions:
        hold.state = new_state
        if hold.new is not None:
            hold.new.state = new_state
            hold.new.resolved_ord = tord
        else:
            plan.hold_updates.append((hold.id, new_state, tord))  # type: ignore[arg-type]
    reverses_id = reverses_ord = None
    if target is not None:
        reverses_id, reverses_ord = target.id, target.ord
        reversed_in_batch.add(spec.reverses)
        plan.reversals.append((reverses_id, reverses_ord, entry_ord))
    plan.entries.append([key, p.content_hash, spec.kind, reverses_id, reverses_ord, p.metadata_json])
    posted[key] = (index, p.content_hash, entry_ord)
    legs = [(r[2], r[3], r[4]) for r in rows if r[5] == F_NONE or r[5] == F_POST]
    batch_targets[key] = ReversalTarget(None, bool(spec.reverses), False, legs, entry_ord)
    return ("new", entry_ord, base_ord, n)


def _decided_on_exact(plan: Plan, acc_id: int, checked: list[tuple[int, int, int]]) -> None:
    """An entry is refused on account ``acc_id``'s balance: that refusal (its index and its
    detail) read that account's balances exactly. The limit checks the entry passed before it
    (``checked``) need only pass again, as an accepted entry's do: their slack is kept
    (:func:`_keep_slack`), so a pooled fund checked before a wallet that refused is not
    compared exactly, and another engine's writes to that fund do not void the batch."""
    plan.exact.add(acc_id)
    _keep_slack(plan, checked)


def _keep_slack(plan: Plan, checked: list[tuple[int, int, int]]) -> None:
    """Keep, per account and side (0 debit, 1 credit), the smallest slack that a passed limit
    check left (:attr:`Plan.slack`; the write's floor, see ``store_pg.BalanceCheck``)."""
    for acc_id, side, slack in checked:
        least = plan.slack.get(acc_id)
        if least is None:
            plan.slack[acc_id] = [slack, None] if side == 0 else [None, slack]
        elif least[side] is None or slack < least[side]:
            least[side] = slack


def _failed(spec: EntrySpec, index: int, result: TransferResult, detail: str) -> EntryOutcome:
    results = [LINKED] * len(spec.transfers)
    results[index] = result
    text = f"transfer {index}: {result.name.lower()}" + (f" ({detail})" if detail else "")
    return EntryOutcome(spec.key, EntryResult.TRANSFER_FAILED, failed_index=index, transfer_result=result,
                        detail=text, transfer_results=tuple(results))


def _mirror_problem(spec: EntrySpec, target: ReversalTarget, accounts: dict[str, Account]) -> str:
    """Why the transfers of ``spec`` do not move the posted money of ``target`` back (or "")."""
    available: dict[tuple[int, int], int] = {}
    for d, c, amount in target.legs:
        available[(c, d)] = available.get((c, d), 0) + amount  # a reversal debits the credited side
    for i, t in enumerate(spec.transfers):
        if int(t.flags) != F_NONE:
            return f"transfer {i}: a reversal posts plain transfers (no pending, post or void)"
        d, c = accounts.get(t.debit), accounts.get(t.credit)
        pair = (d.id if d else -1, c.id if c else -2)
        left = available.get(pair, 0)
        if t.amount_fen > left:
            return (f"transfer {i}: {t.debit} -> {t.credit} {t.amount_fen} is not the reverse of a posted "
                    f"leg of the original (at most {left} left)")
        available[pair] = left - t.amount_fen
    return ""


def finish(batch: Sequence[Prepared], plan: Plan, entry_ids: Sequence[int],
           transfer_ids: Sequence[int]) -> list[EntryOutcome]:
    """Outcomes in batch order once the plan's rows have ids (``entry_ids[ord]``...)."""
    ts = plan.now_us
    out: list[EntryOutcome] = []
    for index, r in enumerate(plan.results):
        if type(r) is tuple:
            if r[0] == "new":
                _, entry_ord, first, count = r
                r = EntryOutcome(batch[index].spec.key, EntryResult.OK, entry_ids[entry_ord],
                                 tuple(transfer_ids[first:first + count]), ts,
                                 transfer_results=(OK,) * count)
            else:
                r = replace(out[r[1]], replayed=True)
        out.append(r)
    return out
