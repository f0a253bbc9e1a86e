"""A hypothesis state machine drives random commands against the ledger (SQLite and PostgreSQL)
and against an independent in-memory auditor, and compares every outcome and every balance.

The auditor is written from the rules documented in ``ledger.model`` (TigerBeetle's semantics:
limits on each account's net change within an entry, pending holds counting against limits,
exactly one resolution per pending transfer, expiry at the timeout, idempotency by key,
reversals that mirror posted legs). It shares no code with ``ledger.machine`` or
``ledger.store``: only the public dataclasses and result enums.

Commands: create accounts; entries of one to three legs (some of them failing: unknown or equal
accounts, bad amounts, overdrafts, wrong assertions); pending transfers with a timeout; posts
(full, partial, too much) and voids; a fake clock that moves; the expiry sweeper; replays and
conflicting replays; reversals (exact, partial, excessive, repeated); several of these in one
``submit_many`` batch.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

import migrations
from ledger.db import make_engine
from ledger.model import (INT32_MAX, KEY_LENGTH_MAX, TIMEOUT_S_MAX, TRANSFER_KEY_LENGTH_MAX, AccountFlags,
                          AccountKind, AccountResult, AccountSpec, BalanceAssertion, EntryResult, EntrySpec,
                          TransferFlags, TransferResult, TransferSpec)
from ledger.money import AMOUNT_FEN_MAX
from ledger.store import Ledger

sys.path.insert(0, str(Path(__file__).parent))
from test_ledger_support import EPOCH_US, FakeClock  # noqa: E402

R = TransferResult
E = EntryResult
DMNEC = int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
CMNED = int(AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS)
BIG = 2**63 - 1


# ============================================================================ the auditor
@dataclass
class AAccount:
    kind: AccountKind
    ledger: int
    flags: int
    limit: int
    dp: int = 0
    dpo: int = 0
    cp: int = 0
    cpo: int = 0


@dataclass
class AHold:
    debit: str
    credit: str
    amount: int
    timeout_s: int
    expires_us: int | None = None  # dated from the ledger's timestamp once the entry posted
    state: str = "pending"      # pending | posted | voided | expired
    voided_in_storage: bool = False  # (expired) and already voided by a batch or the sweeper


@dataclass
class AEntry:
    content: tuple
    transfer_ids: tuple
    is_reversal: bool
    legs: list  # posted (debit, credit, amount)
    reversed: bool = False


@dataclass
class Expected:
    result: EntryResult
    failed_index: int | None = None
    transfer_result: TransferResult = R.OK
    replay_of: AEntry | None = None
    commit: object = None  # callable applying the effects
    entry: AEntry | None = None


def _content(spec: EntrySpec) -> tuple:
    return (spec.kind, spec.reverses, repr(sorted(spec.metadata.items())),
            tuple((t.key, t.debit, t.credit, t.amount_fen, int(t.flags), t.pending_key, t.timeout_s, t.code)
                  for t in spec.transfers),
            tuple((a.account, a.expected_fen) for a in spec.assertions))


def _static_rule(t: TransferSpec) -> TransferResult:
    f = int(t.flags)
    resolving = bool(f & 6)
    if t.key == "":
        return R.KEY_MUST_NOT_BE_EMPTY
    if len(t.key) > TRANSFER_KEY_LENGTH_MAX:
        return R.KEY_TOO_LONG
    if not t.key.isprintable():
        return R.KEY_MUST_BE_PRINTABLE
    if sum(1 for b in (1, 2, 4) if f & b) > 1 or f & ~7:
        return R.FLAGS_ARE_MUTUALLY_EXCLUSIVE
    if resolving and not t.pending_key:
        return R.PENDING_KEY_REQUIRED
    if not resolving and t.pending_key:
        return R.PENDING_KEY_MUST_BE_EMPTY
    if t.timeout_s != 0 and not f & 1:
        return R.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER
    if t.timeout_s < 0:
        return R.TIMEOUT_MUST_NOT_BE_NEGATIVE
    if t.timeout_s > TIMEOUT_S_MAX:
        return R.TIMEOUT_TOO_LARGE
    if t.amount_fen < 0:
        return R.AMOUNT_MUST_NOT_BE_NEGATIVE
    if t.amount_fen == 0 and not resolving:
        return R.AMOUNT_MUST_BE_POSITIVE
    if t.amount_fen > AMOUNT_FEN_MAX:
        return R.AMOUNT_TOO_LARGE
    if not 0 <= t.code <= INT32_MAX:
        return R.CODE_OUT_OF_RANGE
    return R.OK


class Auditor:
    """The ledger's rules, sequentially, in memory."""

    def __init__(self) -> None:
        self.accounts: dict[str, AAccount] = {}
        self.entries: dict[str, AEntry] = {}
        self.transfer_keys: set[str] = set()
        self.transfer_accounts: dict[str, tuple[str, str]] = {}  # non-pending transfers' accounts
        self.holds: dict[str, AHold] = {}

    # -------------------------------------------------------------- accounts
    def create_account(self, spec: AccountSpec) -> AccountResult:
        have = self.accounts.get(spec.name)
        if have is None:
            self.accounts[spec.name] = AAccount(spec.kind, spec.ledger, int(spec.flags), spec.credit_limit_fen)
            return AccountResult.OK
        if (have.kind, have.ledger, have.flags, have.limit) != (spec.kind, spec.ledger, int(spec.flags),
                                                               spec.credit_limit_fen):
            return AccountResult.EXISTS_WITH_DIFFERENT_FLAGS  # (only flags differ in these tests)
        return AccountResult.EXISTS

    # -------------------------------------------------------------- time
    def expire(self, now_us: int) -> None:
        """Holds past their timeout no longer hold anything (read-time expiry)."""
        for h in self.holds.values():
            if h.state == "pending" and h.expires_us is not None and h.expires_us <= now_us:
                h.state = "expired"
                self.accounts[h.debit].dp -= h.amount
                self.accounts[h.credit].cp -= h.amount

    def storage_voids(self, names: set[str]) -> None:
        """A batch voids (in storage) the expired holds on the accounts it touches."""
        for h in self.holds.values():
            if h.state == "expired" and not h.voided_in_storage and (h.debit in names or h.credit in names):
                h.voided_in_storage = True

    def sweep(self) -> int:
        count = 0
        for h in self.holds.values():
            if h.state == "expired" and not h.voided_in_storage:
                h.voided_in_storage = True
                count += 1
        return count

    # -------------------------------------------------------------- entries
    def begin_batch(self, specs: list[EntrySpec], now_us: int) -> None:
        """Time passes, then a batch with at least one entry past the stateless entry rules
        voids in storage the expired holds on the accounts it names (and on the accounts of
        the transfers its posts and voids name)."""
        self.expire(now_us)
        live = [s for s in specs if self._entry_static(s) is None]
        if not live:
            return
        names = set()
        for s in live:
            for t in s.transfers:
                names |= {t.debit, t.credit}
                if t.pending_key in self.holds:
                    names |= {self.holds[t.pending_key].debit, self.holds[t.pending_key].credit}
                elif t.pending_key in self.transfer_accounts:
                    names |= set(self.transfer_accounts[t.pending_key])
            names |= {a.account for a in s.assertions}
        self.storage_voids(names)

    def _entry_static(self, s: EntrySpec) -> EntryResult | None:
        if not s.key:
            return E.KEY_MUST_NOT_BE_EMPTY
        if len(s.key) > KEY_LENGTH_MAX:
            return E.KEY_TOO_LONG
        if not s.key.isprintable():
            return E.KEY_MUST_BE_PRINTABLE
        if not s.kind or len(s.kind) > 32 or not s.kind.isprintable():
            return E.KIND_INVALID
        if not s.transfers:
            return E.TRANSFERS_MUST_NOT_BE_EMPTY
        if len(s.transfers) > 64:
            return E.TOO_MANY_TRANSFERS
        if len(s.assertions) > 64:
            return E.TOO_MANY_ASSERTIONS
        return None

    def evaluate(self, spec: EntrySpec) -> Expected:
        """Decide one entry; apply its effects when it posts (holds are dated later)."""
        exp = self._evaluate(spec)
        if exp.commit is not None:
            exp.commit()
        return exp

    def _evaluate(self, spec: EntrySpec) -> Expected:
        static = self._entry_static(spec)
        if static is not None:
            return Expected(static)
        content = _content(spec)
        stored = self.entries.get(spec.key)
        if stored is not None:
            if stored.content == content:
                return Expected(E.OK, replay_of=stored)
            return Expected(E.EXISTS_WITH_DIFFERENT_CONTENT)
        target = None
        if spec.reverses:
            target = self.entries.get(spec.reverses)
            if target is None:
                return Expected(E.REVERSAL_TARGET_NOT_FOUND)
            if target.reversed:
                return Expected(E.ALREADY_REVERSED)
            if target.is_reversal:
                return Expected(E.REVERSAL_MUST_NOT_BE_REVERSED)
            left: dict[tuple[str, str], int] = {}
            for d, c, amount in target.legs:
                left[(c, d)] = left.get((c, d), 0) + amount
            for t in spec.transfers:
                pair = (t.debit, t.credit)
                if int(t.flags) != 0 or t.amount_fen > left.get(pair, 0):
                    return Expected(E.REVERSAL_MUST_MIRROR_ORIGINAL)
                left[pair] -= t.amount_fen
        for a in spec.assertions:
            acc = self.accounts.get(a.account)
            if acc is None or acc.cpo - acc.dpo != a.expected_fen:
                return Expected(E.BALANCE_ASSERTION_FAILED)

        def fail(i: int, r: TransferResult) -> Expected:
            return Expected(E.TRANSFER_FAILED, i, r)

        delta: dict[str, list[int]] = {}  # insertion order = order of first appearance
        first_debit: dict[str, int] = {}
        first_credit: dict[str, int] = {}
        new_holds: dict[str, AHold] = {}
        resolved: dict[str, str] = {}  # pending key -> new state
        keys_here: list[str] = []
        legs = []

        def move(debit: str, credit: str, i: int, dp=0, dpo=0, cp=0, cpo=0) -> None:
            first_debit.setdefault(debit, i)
            first_credit.setdefault(credit, i)
            for name, d in ((debit, (dp, dpo, 0, 0)), (credit, (0, 0, cp, cpo))):
                acc = delta.setdefault(name, [0, 0, 0, 0])
                for k in range(4):
                    acc[k] += d[k]

        for i, t in enumerate(spec.transfers):
            r = _static_rule(t)
            if r is not R.OK:
                return fail(i, r)
            f = int(t.flags)
            if f & 6:
                h = new_holds.get(t.pending_key) or self.holds.get(t.pending_key)
                if h is None:
                    if t.pending_key in self.transfer_keys or t.pending_key in keys_here:
                        return fail(i, R.PENDING_TRANSFER_NOT_PENDING)
                    return fail(i, R.PENDING_TRANSFER_NOT_FOUND)
                if t.debit and t.debit != h.debit:
                    return fail(i, R.PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT)
                if t.credit and t.credit != h.credit:
                    return fail(i, R.PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT)
                state = resolved.get(t.pending_key, h.state)
                if state == "posted":
                    return fail(i, R.PENDING_TRANSFER_ALREADY_POSTED)
                if state == "voided":
                    return fail(i, R.PENDING_TRANSFER_ALREADY_VOIDED)
                if state == "expired":
                    return fail(i, R.PENDING_TRANSFER_EXPIRED)
                if t.amount_fen > h.amount:
                    return fail(i, R.EXCEEDS_PENDING_TRANSFER_AMOUNT)
                if f & 4 and t.amount_fen not in (0, h.amount):
                    return fail(i, R.PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT)
                if t.key in self.transfer_keys or t.key in keys_here:
                    return fail(i, R.KEY_EXISTS_IN_ANOTHER_ENTRY)
                keys_here.append(t.key)
                if f & 2:
                    posted = t.amount_fen or h.amount
                    move(h.debit, h.credit, i, dp=-h.amount, dpo=posted, cp=-h.amount, cpo=posted)
                    legs.append((h.debit, h.credit, posted))
                    resolved[t.pending_key] = "posted"
                else:
                    move(h.debit, h.credit, i, dp=-h.amount, cp=-h.amount)
                    resolved[t.pending_key] = "voided"
                continue
            if t.debit == t.credit:
                return fail(i, R.ACCOUNTS_MUST_BE_DIFFERENT)
            da, ca = self.accounts.get(t.debit), self.accounts.get(t.credit)
            if da is None:
                return fail(i, R.DEBIT_ACCOUNT_NOT_FOUND)
            if ca is None:
                return fail(i, R.CREDIT_ACCOUNT_NOT_FOUND)
            if da.ledger != ca.ledger:
                return fail(i, R.ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER)
            if t.key in self.transfer_keys or t.key in keys_here:
                return fail(i, R.KEY_EXISTS_IN_ANOTHER_ENTRY)
            keys_here.append(t.key)
            if f & 1:
                move(t.debit, t.credit, i, dp=t.amount_fen, cp=t.amount_fen)
                new_holds[t.key] = AHold(t.debit, t.credit, t.amount_fen, t.timeout_s)
            else:
                move(t.debit, t.credit, i, dpo=t.amount_fen, cpo=t.amount_fen)
                legs.append((t.debit, t.credit, t.amount_fen))
        for name, (dp, dpo, cp, cpo) in delta.items():
            a = self.accounts[name]
            debits, credits = a.dp + dp + a.dpo + dpo, a.cp + cp + a.cpo + cpo
            if debits > BIG or credits > BIG:
                return fail(min(first_debit.get(name, 99), first_credit.get(name, 99)), R.OVERFLOWS_BALANCE)
            if a.flags & DMNEC and dp + dpo - cpo > 0 and debits > a.cpo + cpo + a.limit:
                return fail(first_debit[name], R.EXCEEDS_CREDITS)
            if a.flags & CMNED and cp + cpo - dpo > 0 and credits > a.dpo + dpo + a.limit:
                return fail(first_credit[name], R.EXCEEDS_DEBITS)

        def commit() -> None:
            for name, d in delta.items():
                a = self.accounts[name]
                a.dp += d[0]
                a.dpo += d[1]
                a.cp += d[2]
                a.cpo += d[3]
            self.holds.update(new_holds)
            for key, state in resolved.items():
                self.holds[key].state = state
            for t in spec.transfers:
                if not int(t.flags) & 1:
                    h = self.holds.get(t.pending_key)
                    self.transfer_accounts[t.key] = (h.debit, h.credit) if h else (t.debit, t.credit)
            self.transfer_keys.update(keys_here)
            entry = AEntry(content, (), bool(spec.reverses), legs)
            self.entries[spec.key] = entry
            if target is not None:
                target.reversed = True
            exp.entry = entry

        exp = Expected(E.OK, commit=commit)
        return exp


# ============================================================================ the machine
_example_no = itertools.count()


class LedgerMachine(RuleBasedStateMachine):
    engine = None  # set by the test

    def __init__(self) -> None:
        super().__init__()
        n = next(_example_no)
        self.ns = f"s{n}-"
        # Each example's clock starts ~11.6 days before the previous one's, so holds of earlier
        # examples never expire under this one's clock (the sweeper is global).
        self.clock = FakeClock(EPOCH_US - n * 10**12)
        self.ledger = Ledger(self.engine, clock_us=self.clock)
        self.auditor = Auditor()
        self.names: list[str] = []
        self.keys = itertools.count()
        self.submitted: list[EntrySpec] = []
        self.posted_keys: list[str] = []

    # -------------------------------------------------------------- helpers
    def key(self, hint: str) -> str:
        return f"{self.ns}{hint}{next(self.keys)}"

    def add_account(self, name: str, kind: AccountKind, flags: int = 0, limit: int = 0, ledger: int = 1) -> None:
        spec = AccountSpec(self.ns + name, kind, flags=AccountFlags(flags), credit_limit_fen=limit, ledger=ledger)
        assert self.ledger.create_accounts([spec]) == [self.auditor.create_account(spec)]
        if spec.name not in self.names:
            self.names.append(spec.name)

    def submit(self, specs: list[EntrySpec]) -> None:
        """The same batch to the auditor and to the ledger; every outcome must agree."""
        self.auditor.begin_batch(specs, self.clock.t)
        exps = [self.auditor.evaluate(spec) for spec in specs]
        outcomes = self.ledger.submit_many(specs) if len(specs) > 1 else [self.ledger.submit(specs[0])]
        for spec, exp, out in zip(specs, exps, outcomes):
            self.submitted.append(spec)
            assert out.result is exp.result, (spec, out, exp)
            if exp.result is E.TRANSFER_FAILED:
                assert (out.failed_index, out.transfer_result) == (exp.failed_index, exp.transfer_result), (spec, out, exp)
                assert out.transfer_results[exp.failed_index] is exp.transfer_result
                assert all(r is R.LINKED_EVENT_FAILED for i, r in enumerate(out.transfer_results) if i != exp.failed_index)
            if exp.result is E.OK:
                if exp.replay_of is not None:
                    assert out.replayed and out.transfer_ids == exp.replay_of.transfer_ids, (out, exp.replay_of)
                else:
                    assert not out.replayed and len(out.transfer_ids) == len(spec.transfers)
                    exp.entry.transfer_ids = out.transfer_ids
                    for t in spec.transfers:  # date the holds from the ledger's timestamp
                        if int(t.flags) & 1 and t.timeout_s:
                            self.auditor.holds[t.key].expires_us = out.timestamp_us + t.timeout_s * 1_000_000
                    self.posted_keys.append(spec.key)
            else:
                assert out.entry_id is None and not out.replayed

    def leg(self, data) -> TransferSpec:
        """A leg between known accounts; one in eight carries a defect (unknown or equal
        accounts, another ledger, a zero or negative amount, a timeout on a plain transfer)."""
        money = [n for n in self.names if n != self.ns + "ytd"]
        debit = data.draw(st.sampled_from(money))
        credit = data.draw(st.sampled_from([n for n in money if n != debit]))
        amount = data.draw(st.sampled_from([1, 7, 50, 100, 250, 1000, 5000]))
        pending = data.draw(st.integers(0, 2)) == 0
        timeout_s = data.draw(st.sampled_from([0, 1, 2, 5])) if pending else 0
        defect = data.draw(st.integers(0, 7)) == 0 and data.draw(st.sampled_from(
            ["ghost", "same", "zero", "negative", "timeout", "ledger"]))
        if defect == "ledger":
            credit = self.ns + "ytd"
        elif defect == "ghost":
            credit = self.ns + "ghost"
        elif defect == "same":
            credit = debit
        elif defect == "zero":
            amount = 0
        elif defect == "negative":
            amount = -3
        elif defect == "timeout":
            pending, timeout_s = False, 3
        return TransferSpec(self.key("t"), debit, credit, amount,
                            TransferFlags.PENDING if pending else TransferFlags.NONE, "", timeout_s)

    def open_holds(self) -> list[str]:
        return list(self.auditor.holds)

    # -------------------------------------------------------------- rules
    @initialize()
    def accounts(self) -> None:
        self.add_account("bank", AccountKind.ASSET)
        self.add_account("wallet", AccountKind.LIABILITY, DMNEC)
        self.add_account("wallet2", AccountKind.LIABILITY, DMNEC, limit=200)
        self.add_account("merchant", AccountKind.LIABILITY)
        self.add_account("receivable", AccountKind.ASSET, CMNED)
        self.add_account("ytd", AccountKind.MEMO, ledger=2)

    @rule(data=st.data())
    def create_account(self, data) -> None:
        n = data.draw(st.integers(0, 3))
        self.add_account(f"extra{n}", AccountKind.LIABILITY, data.draw(st.sampled_from([0, DMNEC])))

    @rule(data=st.data())
    def fund(self, data) -> None:
        target = data.draw(st.sampled_from(["wallet", "wallet2", "merchant"]))
        self.submit([EntrySpec(self.key("f"), (TransferSpec(self.key("t"), self.ns + "bank", self.ns + target,
                                                             data.draw(st.sampled_from([100, 1000, 3000]))),))])

    @rule(data=st.data())
    def entry(self, data) -> None:
        legs = tuple(self.leg(data) for _ in range(data.draw(st.integers(1, 3))))
        assertions = ()
        if data.draw(st.integers(0, 5)) == 0:
            name = data.draw(st.sampled_from(self.names))
            acc = self.auditor.accounts[name]
            assertions = (BalanceAssertion(name, acc.cpo - acc.dpo + data.draw(st.sampled_from([0, 0, 1]))),)
        self.submit([EntrySpec(self.key("e"), legs, assertions=assertions)])

    @precondition(lambda self: self.auditor.holds)
    @rule(data=st.data())
    def resolve(self, data) -> None:
        key = data.draw(st.sampled_from(self.open_holds() + [self.ns + "nohold"]))
        hold = self.auditor.holds.get(key)
        held = hold.amount if hold else 100
        post = data.draw(st.booleans())
        amount = data.draw(st.sampled_from([0, 1, held // 2, held, held + 1]))
        debit = data.draw(st.sampled_from(["", hold.debit if hold else "", self.ns + "merchant"]))
        flags = TransferFlags.POST_PENDING if post else TransferFlags.VOID_PENDING
        self.submit([EntrySpec(self.key("r"), (TransferSpec(self.key("t"), debit, "", amount, flags, key),))])

    @rule(seconds=st.sampled_from([0.5, 1, 2, 3, 6]))
    def advance_clock(self, seconds) -> None:
        target = self.clock.t + int(seconds * 1_000_000)
        # keep clear of every hold's expiry instant: the ledger's clock runs a few µs ahead of
        # the fake one (it is made strictly monotonic)
        while any(h.expires_us is not None and target - 5_000 <= h.expires_us <= target + 5_000
                  for h in self.auditor.holds.values()):
            target += 10_000
        self.clock.t = target

    @rule()
    def sweep(self) -> None:
        self.auditor.expire(self.clock.t)
        assert self.ledger.expire_pending() == self.auditor.sweep()

    @precondition(lambda self: self.submitted)
    @rule(data=st.data())
    def replay(self, data) -> None:
        self.submit([data.draw(st.sampled_from(self.submitted))])

    @precondition(lambda self: self.posted_keys)
    @rule(data=st.data())
    def conflicting_replay(self, data) -> None:
        key = data.draw(st.sampled_from(self.posted_keys))
        spec = next(s for s in self.submitted if s.key == key)
        t = spec.transfers[0]
        changed = TransferSpec(t.key, t.debit, t.credit, t.amount_fen + 1, t.flags, t.pending_key, t.timeout_s, t.code)
        self.submit([EntrySpec(spec.key, (changed,) + spec.transfers[1:], assertions=spec.assertions)])

    @precondition(lambda self: self.posted_keys)
    @rule(data=st.data())
    def reverse(self, data) -> None:
        key = data.draw(st.sampled_from(self.posted_keys))
        entry = self.auditor.entries[key]
        how = data.draw(st.sampled_from(["exact", "partial", "excessive"]))
        legs = []
        for d, c, amount in entry.legs or [(self.ns + "bank", self.ns + "wallet", 1)]:
            amount = {"exact": amount, "partial": max(1, amount // 2), "excessive": amount + 1}[how]
            legs.append(TransferSpec(self.key("t"), c, d, amount))
        self.submit([EntrySpec(self.key("v"), tuple(legs), reverses=key)])

    @rule(data=st.data())
    def batch(self, data) -> None:
        specs = []
        for _ in range(data.draw(st.integers(2, 4))):
            choice = data.draw(st.sampled_from(["entry", "dup", "resolve"]))
            if choice == "dup" and specs:
                specs.append(data.draw(st.sampled_from(specs)))
            elif choice == "resolve" and self.auditor.holds:
                key = data.draw(st.sampled_from(self.open_holds()))
                specs.append(EntrySpec(self.key("r"), (TransferSpec(self.key("t"), "", "", 0,
                                                                    TransferFlags.POST_PENDING, key),)))
            else:
                legs = tuple(self.leg(data) for _ in range(data.draw(st.integers(1, 2))))
                specs.append(EntrySpec(self.key("b"), legs))
        self.submit(specs)

    # -------------------------------------------------------------- checks
    @invariant()
    def balances_agree(self) -> None:
        if not self.names:
            return
        self.auditor.expire(self.clock.t)
        got = self.ledger.balances(self.names)
        for name in self.names:
            a, b = self.auditor.accounts[name], got[name]
            assert (b.debits_pending, b.debits_posted, b.credits_pending, b.credits_posted) == (a.dp, a.dpo, a.cp, a.cpo), name

    def teardown(self) -> None:
        if self.names:
            assert self.ledger.trial_balance().balanced
            assert self.ledger.verify() == []


def _run(db_url: str, max_examples: int, steps: int) -> None:
    engine = make_engine(db_url)
    migrations.upgrade(engine)
    LedgerMachine.engine = engine
    try:
        run_state_machine_as_test(LedgerMachine, settings=settings(
            max_examples=max_examples, stateful_step_count=steps, deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    finally:
        LedgerMachine.engine = None
        engine.dispose()


def test_ledger_agrees_with_the_auditor(db_url):
    if db_url.startswith("sqlite"):
        _run(db_url, max_examples=80, steps=40)
    else:
        _run(db_url, max_examples=40, steps=30)
