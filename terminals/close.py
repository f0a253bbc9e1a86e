"""Batch close and day close: finance closes every day to the fen.

* **Batch close** — each terminal reports its own counts and totals for the business day; the
  engine computes the same figures from what it booked for that terminal and records whether
  they agree (``balanced``) or not (``out_of_balance``, naming every differing figure).
  Idempotent: the same report again returns the stored result; another report is a conflict.
* **Day close** — the engine checks that every terminal that transacted closed its batch,
  compares every batch close again with the terminal's figures as they stand at the day close
  (a terminal may book after closing its batch: accepted, then reported here), cross-checks
  every settlement, payment and recharge row against its ledger entry (per entry, what each
  payer moved in the ledger equals what the rows say), posts the day's
  clearing (clinic and merchant payables paid out of the centre's bank account; channels'
  receivables settled into it), seals the journal's hash chain, recomputes every balance from
  the journal, and writes the report: totals per clinic, per fund and per channel, the trial
  balance and every discrepancy. Closing a closed day returns its stored report.

  The close first moves the day to ``closing`` (:meth:`settlement.days.BusinessDays.begin_close`),
  which waits for the bookings in flight and refuses every later one, and only then reads the
  day's rows: the report counts every row of the day, and the next day is open meanwhile. A
  close that stopped half-way leaves its day ``closing``; closing again finishes that day first
  (its clearing entries are keyed by day and account, so none is posted twice).
"""

from __future__ import annotations

import csv
import datetime as dt
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Engine, insert, or_, select

from ledger import schema as ls
from ledger.db import HookRefused, is_sqlite, is_unique_violation, run_with_retry
from ledger.errors import Conflict, Invalid
from ledger.model import EntryOutcome, EntrySpec, TransferSpec
from ledger.money import format_yuan
from ledger.store import Ledger
from settlement import chart
from settlement.days import BusinessDays, guard_open
from settlement.nhsa import clr_type_for
from settlement.schema import payments, recharges, settlements
from settlement.service import AccountCache, TerminalContext
from terminals.schema import batch_closes, orgs, terminals

SETTLEMENT_FIGURES = ("count", "medfee_sumamt", "fund_pay_sumamt", "acct_pay", "psn_cash_pay", "wallet_pay")
AMOUNT_FIGURES = ("count", "amount_fen")
#: How many closes :meth:`DayCloser.close_business_day` makes at most to close one day (each
#: may first finish an earlier day left ``closing``, or find the day closed by another close).
CLOSE_ROUNDS_MAX = 4


def empty_batch() -> dict:
    """The shape of a batch report with every figure zero (counts and int fen)."""
    return {"settlements": dict.fromkeys(SETTLEMENT_FIGURES, 0),
            "cancellations": dict.fromkeys(SETTLEMENT_FIGURES, 0),
            "payments": dict.fromkeys(AMOUNT_FIGURES, 0),
            "recharges": dict.fromkeys(AMOUNT_FIGURES, 0)}


def batch_figures(setl_rows, pay_rows, rch_rows) -> dict[str, dict]:
    """Per terminal id, the engine's batch figures (the shape of :func:`empty_batch`) over
    settlement, payment and recharge rows (attributes ``terminal_id``; ``kind`` and the
    :data:`SETTLEMENT_FIGURES` of a settlement row; ``amount_fen`` of the others; int fen)."""
    out: dict[str, dict] = defaultdict(empty_batch)
    for r in setl_rows:
        group = out[r.terminal_id]["settlements" if r.kind == "settlement" else "cancellations"]
        group["count"] += 1
        for f in SETTLEMENT_FIGURES[1:]:
            group[f] += getattr(r, f)
    for rows, name in ((pay_rows, "payments"), (rch_rows, "recharges")):
        for r in rows:
            out[r.terminal_id][name]["count"] += 1
            out[r.terminal_id][name]["amount_fen"] += r.amount_fen
    return dict(out)


def batch_differences(reported: dict, computed: dict) -> list[str]:
    """Every figure on which a terminal's report and the engine's figures differ, as
    ``"group.figure: terminal N engine M"``."""
    return [f"{g}.{n}: terminal {reported[g][n]} engine {computed[g][n]}"
            for g in computed for n in computed[g] if computed[g][n] != reported[g][n]]


def _iso(value) -> str:
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


class DayCloser:
    """Batch closes and the day close over one database."""

    def __init__(self, engine: Engine, ledger: Ledger, submit: Callable[..., EntryOutcome], days: BusinessDays,
                 accounts: AccountCache, clock_us: Callable[[], int]) -> None:
        self.engine = engine
        self.ledger = ledger
        self.submit = submit
        self.days = days
        self.accounts = accounts
        self.clock_us = clock_us

    # ------------------------------------------------------------------ batch close
    def computed_batch(self, terminal_id: str, day: dt.date) -> dict:
        """The engine's own figures for one terminal and business day (same shape as the report)."""
        with self.engine.connect() as conn:
            rows = [conn.execute(select(table).where(table.c.terminal_id == terminal_id,
                                                     table.c.business_date == day)).all()
                    for table in (settlements, payments, recharges)]
        return batch_figures(*rows).get(terminal_id, empty_batch())

    def close_batch(self, ctx: TerminalContext, req: dict) -> dict:
        """Compare a terminal's batch report with the engine's figures and record the result.

        Body: ``{"business_date": ISO date, "settlements": {...}, "cancellations": {...},
        "payments": {...}, "recharges": {...}}`` with the figures of :func:`empty_batch` (ints).
        Returns ``{"result": "balanced" | "out_of_balance", "differences": [...], "computed",
        "reported", "replayed"}``. Only the open business day's batch can be closed. Raises Invalid
        (malformed; ``business_day_unknown``: a day the engine never opened) or Conflict (closed
        before with other figures; ``business_day_closed``: the day is closing or closed)."""
        if not isinstance(req, dict):
            raise Invalid("body_invalid", "the request body must be a JSON object")
        try:
            day = dt.date.fromisoformat(str(req.get("business_date")))
        except ValueError:
            raise Invalid("field_invalid", "business_date: an ISO date is required", field="business_date") from None
        reported = empty_batch()
        for group, figures in reported.items():
            given = req.get(group, {})
            if not isinstance(given, dict):
                raise Invalid("field_invalid", f"{group}: must be an object", field=group)
            for name in figures:
                value = given.get(name, 0)
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise Invalid("field_invalid", f"{group}.{name}: must be a non-negative integer",
                                  field=f"{group}.{name}")
                figures[name] = value
        done = self._stored_batch(ctx.terminal_id, day, reported)
        if done is not None:
            return done
        computed = self.computed_batch(ctx.terminal_id, day)
        result = "balanced" if not batch_differences(reported, computed) else "out_of_balance"

        def work(conn) -> bool:
            # A batch close is a row of its business day: written only while that day is open,
            # holding the day's row like any booking (settlement.days.guard_open).
            try:
                guard_open(conn, [day])
            except HookRefused:
                return False
            conn.execute(insert(batch_closes).values(
                terminal_id=ctx.terminal_id, business_date=day, reported=json.dumps(reported, sort_keys=True),
                computed=json.dumps(computed, sort_keys=True), result=result, closed_ts=self.clock_us()))
            return True
        try:
            written = run_with_retry(self.engine, work, retry_on_unique=False)
        except Exception as exc:
            if not is_unique_violation(exc):
                raise
            # the same terminal's close of the same day, sent twice at once: the first one stored
            # is the answer (or a conflict, when the two carried other figures)
            done = self._stored_batch(ctx.terminal_id, day, reported)
            if done is None:
                raise
            return done
        if not written:
            self._refuse_batch_day(day)
        return self._batch_doc(computed, reported, result, replayed=False)

    def _stored_batch(self, terminal_id: str, day: dt.date, reported: dict) -> dict | None:
        """The stored close of ``terminal_id``'s batch of ``day`` answered again (``replayed``),
        or None when there is none. Raises Conflict ``batch_already_closed`` when it was
        closed with other figures."""
        with self.engine.connect() as conn:
            row = conn.execute(select(batch_closes).where(batch_closes.c.terminal_id == terminal_id,
                                                          batch_closes.c.business_date == day)).first()
        if row is None:
            return None
        if json.loads(row.reported) != reported:
            raise Conflict("batch_already_closed", f"the batch of {day} was closed with other figures")
        return self._batch_doc(json.loads(row.computed), reported, row.result, replayed=True)

    def _refuse_batch_day(self, day: dt.date) -> None:
        """Why a batch close of ``day`` was refused (its day was not open when it was written):
        Invalid ``business_day_unknown`` for a day the engine never opened (a terminal's clock in
        the future or far in the past: nothing of it can be compared, and a "balanced" close of
        zero figures would stand for a day that may later carry bookings); Conflict
        ``business_day_closed`` once the day is closing or closed, since the day close may have
        read its batches already; Conflict ``business_day_not_open`` for a day opened just now
        (send it again)."""
        status, _report = self.days.status(day)
        if status == "unknown":
            open_day = self.days.open_day()
            raise Invalid("business_day_unknown", f"business day {day} was never opened: a batch close is for "
                          f"the open business day ({open_day or 'none is open'})", field="business_date")
        if status == "open":
            raise Conflict("business_day_not_open", f"business day {day} opened meanwhile; close the batch again")
        raise Conflict("business_day_closed", f"business day {day} is closed (or closing): its batches "
                       "can no longer be closed")

    @staticmethod
    def _batch_doc(computed: dict, reported: dict, result: str, *, replayed: bool) -> dict:
        return {"result": result, "differences": batch_differences(reported, computed), "computed": computed,
                "reported": reported, "replayed": replayed}

    @staticmethod
    def _recheck_batches(closes: dict, at_close: dict[str, dict]) -> tuple[dict[str, str], list[dict]]:
        """Each stored batch close compared again with the engine's figures for its terminal at
        the day close (``at_close``: :func:`batch_figures` of the day's rows), not those it was
        compared with when it was made: a terminal may go on booking after closing its batch
        (accepted: a patient at the counter is never refused for it), and what it booked after
        is then missing from its batch. Returns the result per terminal id and a
        ``batch_out_of_balance`` discrepancy per differing batch; its detail says when the
        engine's figures moved after the batch close."""
        results: dict[str, str] = {}
        found: list[dict] = []
        for t, r in sorted(closes.items()):
            reported, then = json.loads(r.reported), json.loads(r.computed)
            now = at_close.get(t, empty_batch())
            differences = batch_differences(reported, now)
            results[t] = "balanced" if not differences else "out_of_balance"
            if not differences:
                continue
            detail = "; ".join(differences)
            if batch_differences(then, now):
                detail += " (the terminal booked after its batch close)"
            found.append({"kind": "batch_out_of_balance", "terminal_id": t, "detail": detail})
        return results, found

    # ------------------------------------------------------------------ day close
    def close_day(self, out_dir: Path | None = None, *, synthetic_note: str = "", day: dt.date | None = None) -> dict:
        """Close the open business day (or ``day``, when it is open); write ``report.json`` and
        CSVs to ``out_dir``.

        Returns the report (see module docstring). Idempotent per day: after the close, the next
        call closes the next day (usually empty). The day is moved to ``closing`` first, in its
        own transaction (waiting for the bookings in flight); a day left ``closing`` by a close
        that stopped is the one closed, and finished, by the next call (whatever ``day`` says:
        the report says which day it is). Two closes racing on one day both answer with the
        report the first to finish stored. Raises Conflict ``business_day_not_open`` when
        ``day`` is given and is neither open nor closing (:meth:`BusinessDays.begin_close`)."""
        day = self.days.begin_close(day)
        discrepancies: list[dict] = []
        with self.engine.connect() as conn:
            setl_rows = conn.execute(select(settlements).where(settlements.c.business_date == day)
                                     .order_by(settlements.c.created_ts)).all()
            pay_rows = conn.execute(select(payments).where(payments.c.business_date == day)).all()
            rch_rows = conn.execute(select(recharges).where(recharges.c.business_date == day)).all()
            closes = {r.terminal_id: r for r in conn.execute(select(batch_closes)
                                                             .where(batch_closes.c.business_date == day))}
            term_rows = conn.execute(select(terminals.c.terminal_id, terminals.c.org_code, orgs.c.kind, orgs.c.name)
                                     .select_from(terminals.join(orgs, orgs.c.code == terminals.c.org_code))).all()
            org_rows = conn.execute(select(orgs.c.code, orgs.c.name, orgs.c.hospital_tier)).all()
        org_names = {r.code: r.name for r in org_rows}
        tiers = {r.code: r.hospital_tier for r in org_rows}
        active = {r.terminal_id for r in setl_rows} | {r.terminal_id for r in pay_rows} | {r.terminal_id for r in rch_rows}
        for t in sorted(active):
            if t not in closes:
                discrepancies.append({"kind": "batch_not_closed", "terminal_id": t,
                                      "detail": f"terminal {t} transacted on {day} but did not close its batch"})
        batch_results, batch_problems = self._recheck_batches(closes, batch_figures(setl_rows, pay_rows, rch_rows))
        discrepancies += batch_problems
        discrepancies += self._cross_check(setl_rows, pay_rows, rch_rows)

        per_clinic: dict[str, dict] = defaultdict(lambda: dict(count=0, cancellations=0, medfee_sumamt=0,
                                                               fund_pay_sumamt=0, hifp_pay=0, acct_pay=0,
                                                               psn_cash_pay=0, wallet_pay=0))
        per_insutype: dict[tuple, dict] = defaultdict(lambda: dict(fixmedins_setl_cnt=0, medfee_sumamt=0,
                                                                   fund_pay_sumamt=0, acct_pay=0))
        for r in setl_rows:
            sign = 1 if r.kind == "settlement" else -1
            c = per_clinic[r.fixmedins_code]
            c["count" if sign > 0 else "cancellations"] += 1
            for f in ("medfee_sumamt", "fund_pay_sumamt", "hifp_pay", "acct_pay", "psn_cash_pay", "wallet_pay"):
                c[f] += sign * getattr(r, f)
            g = per_insutype[(r.insutype, clr_type_for(r.med_type))]
            g["fixmedins_setl_cnt"] += sign
            for f in ("medfee_sumamt", "fund_pay_sumamt", "acct_pay"):
                g[f] += sign * getattr(r, f)
        per_channel: dict[str, dict] = defaultdict(lambda: dict(count=0, amount_fen=0))
        for r in rch_rows:
            per_channel[r.channel]["count"] += 1
            per_channel[r.channel]["amount_fen"] += r.amount_fen
        per_merchant: dict[str, dict] = defaultdict(lambda: dict(count=0, amount_fen=0))
        for r in pay_rows:
            per_merchant[r.org_code]["count"] += 1
            per_merchant[r.org_code]["amount_fen"] += r.amount_fen
        per_fund = self._fund_flows(setl_rows)

        clearing = self._post_clearing(day)
        self.ledger.seal()
        problems = self.ledger.verify()
        for p in problems:
            discrepancies.append({"kind": "ledger_verify", "detail": p})
        tb = self.ledger.trial_balance()
        debits, credits = tb.debits_fen.get(1, 0), tb.credits_fen.get(1, 0)
        if debits != credits:
            discrepancies.append({"kind": "trial_balance", "detail": f"debits {debits} != credits {credits}"})
        settled = [r for r in setl_rows if r.kind == "settlement"]
        cancelled = [r for r in setl_rows if r.kind == "cancellation"]
        report = {
            "business_date": day.isoformat(),
            "timezone": "Asia/Shanghai",
            "closed_at_us": self.clock_us(),
            "settlements": {
                "count": len(settled), "cancellations": len(cancelled),
                "medfee_sumamt": sum(r.medfee_sumamt for r in settled) - sum(r.medfee_sumamt for r in cancelled),
                "fund_pay_sumamt": sum(r.fund_pay_sumamt for r in settled) - sum(r.fund_pay_sumamt for r in cancelled),
                "acct_pay": sum(r.acct_pay for r in settled) - sum(r.acct_pay for r in cancelled),
                "psn_cash_pay": sum(r.psn_cash_pay for r in settled) - sum(r.psn_cash_pay for r in cancelled),
                "wallet_pay": sum(r.wallet_pay for r in settled) - sum(r.wallet_pay for r in cancelled),
                "note": "net of cancellations and partial refunds; amounts in fen",
            },
            "payments": {"count": len(pay_rows), "amount_fen": sum(r.amount_fen for r in pay_rows)},
            "recharges": {"count": len(rch_rows), "amount_fen": sum(r.amount_fen for r in rch_rows)},
            "per_clinic": {k: dict(v, name=org_names.get(k, ""), hospital_tier=tiers.get(k))
                           for k, v in sorted(per_clinic.items())},
            "per_fund": per_fund,
            "per_channel": {k: dict(v, name=org_names.get(k, "")) for k, v in sorted(per_channel.items())},
            "per_merchant": {k: dict(v, name=org_names.get(k, "")) for k, v in sorted(per_merchant.items())},
            "nhsa_3201": [dict(insutype=k[0], clr_type=k[1], **v) for k, v in sorted(per_insutype.items())],
            "batches": batch_results,
            "clearing": clearing,
            "trial_balance": {"debits_fen": debits, "credits_fen": credits, "balanced": debits == credits,
                              "memo_debits_fen": tb.debits_fen.get(2, 0), "memo_credits_fen": tb.credits_fen.get(2, 0)},
            "ledger_verify": {"problems": problems},
            "discrepancies": discrepancies,
            "synthetic_data": synthetic_note,
            "terminals": len(term_rows),
        }
        if out_dir is not None:
            self.write_report(report, setl_rows, Path(out_dir))
        try:
            self.days.close(day, report)
        except Conflict as exc:
            # Another close finished this very day first (it took the day for a stuck close
            # and completed it beside us); its clearing was posted once, ours replayed it. The
            # day's answer is the report it stored.
            status, stored = self.days.status(day)
            if exc.code != "business_day_not_closing" or status != "closed" or stored is None:
                raise
            return stored
        return report

    def close_business_day(self, day: dt.date | None = None) -> dict:
        """Close business day ``day`` — by default the one to close now: a day left ``closing``
        by a close that stopped, else the open day — or answer with its stored report when it
        is closed already (also by default when no day is open: the latest closed day), so
        that closing again never does it twice. Opens no day. A day left ``closing`` before
        ``day`` is finished first (its clearing must be posted before ``day``'s is worked out).

        Returns ``{"report": the day's report, "replayed": True when it was closed already,
        "finished_first": [reports of earlier days finished on the way]}``. Raises Invalid
        ``business_day_unknown`` for a day the engine never opened, ``business_day_none`` when
        no day was ever opened, Conflict ``business_day_not_closed`` when other closes kept
        getting in the way (close again)."""
        if day is None:
            day = self.days.closing_day() or self.days.open_day() or self.days.last_closed()
            if day is None:
                raise Invalid("business_day_none", "no business day was ever opened on this database: nothing to close")
        status, stored = self.days.status(day)
        if status == "unknown":
            open_day = self.days.open_day()
            raise Invalid("business_day_unknown", f"business day {day} was never opened ("
                          + (f"the open business day is {open_day})" if open_day else "no business day is open)"))
        finished_first: list[dict] = []
        for _round in range(CLOSE_ROUNDS_MAX):
            if status == "closed":
                return {"report": stored, "replayed": True, "finished_first": finished_first}
            try:
                report = self.close_day(day=day)
            except Conflict as exc:  # closed by another close meanwhile: its stored report answers
                if exc.code != "business_day_not_open":
                    raise
            else:
                if report["business_date"] == day.isoformat():
                    return {"report": report, "replayed": False, "finished_first": finished_first}
                finished_first.append(report)  # an earlier day left closing, finished first
            status, stored = self.days.status(day)
        raise Conflict("business_day_not_closed", f"business day {day} could not be closed: other closes kept "
                       "getting in the way; close again")

    def write_day_report(self, report: dict, out_dir: Path) -> None:
        """Write the files of :meth:`write_report` for a closed day's ``report`` into ``out_dir``,
        with the day's settlement rows read now (final: no booking goes to a closed day)."""
        day = dt.date.fromisoformat(report["business_date"])
        with self.engine.connect() as conn:
            setl_rows = conn.execute(select(settlements).where(settlements.c.business_date == day)
                                     .order_by(settlements.c.created_ts)).all()
        self.write_report(report, setl_rows, Path(out_dir))

    def _fund_flows(self, setl_rows) -> dict:
        """Net paid per payer account family over the day's settlement rows (fen)."""
        out: dict[str, int] = defaultdict(int)
        for r in setl_rows:
            sign = 1 if r.kind == "settlement" else -1
            info = json.loads(r.setlinfo)
            pooled = chart.fund_account(chart.POOLED_FUND.get(r.insutype, r.insutype))
            second = chart.fund_account(chart.SECOND_TIER_FUND.get(r.insutype, r.insutype))
            out[pooled] += sign * info["hifp_pay"]
            out[second] += sign * info.get("hifmi_pay", 0)
            out["personal_accounts"] += sign * r.acct_pay
            out["card_wallets"] += sign * r.wallet_pay
            out["cash_at_counter"] += sign * (r.psn_cash_pay - r.wallet_pay)
        return dict(sorted(out.items()))

    def _cross_check(self, setl_rows, pay_rows, rch_rows) -> list[dict]:
        """Per ledger entry, compare the money each payer family moved with the rows."""
        expected: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for r in setl_rows:
            sign = 1 if r.kind == "settlement" else -1
            key = r.entry_key[:-2] if r.entry_key.endswith("~c") else r.entry_key
            info = json.loads(r.setlinfo)
            e = expected[key]
            e["fund"] += sign * (info["hifp_pay"] + info.get("hifmi_pay", 0))
            e["personal_account"] += sign * r.acct_pay
            e["wallet"] += sign * r.wallet_pay
        for r in pay_rows:
            expected[r.entry_key]["wallet"] += r.amount_fen
        for r in rch_rows:
            expected[r.entry_key]["wallet"] -= r.amount_fen
        if not expected:
            return []
        t, e, a = ls.transfers, ls.entries, ls.accounts
        found: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        seen: set[str] = set()
        keys = list(expected)
        d_acc, c_acc = a.alias("d"), a.alias("c")
        with self.engine.connect() as conn:
            for i in range(0, len(keys), 500):
                rows = conn.execute(select(e.c.key, d_acc.c.name.label("debit"), c_acc.c.name.label("credit"), t.c.amount)
                                    .select_from(t.join(e, e.c.id == t.c.entry_id)
                                                 .join(d_acc, d_acc.c.id == t.c.debit_account_id)
                                                 .join(c_acc, c_acc.c.id == t.c.credit_account_id))
                                    .where(e.c.key.in_(keys[i:i + 500]))).all()
                for r in rows:
                    seen.add(r.key)
                    for name, sign in ((r.debit, 1), (r.credit, -1)):
                        family = name.split(":", 1)[0]
                        if family in ("fund", "personal_account", "wallet"):
                            found[r.key][family] += sign * r.amount
        out = []
        for key, figures in expected.items():
            if key not in seen and any(figures.values()):
                out.append({"kind": "entry_missing", "entry_key": key,
                            "detail": f"rows of {key} have no ledger entry"})
                continue
            for family in ("fund", "personal_account", "wallet"):
                if figures.get(family, 0) != found[key].get(family, 0):
                    out.append({"kind": "row_vs_ledger", "entry_key": key,
                                "detail": f"{family}: rows {figures.get(family, 0)} ledger {found[key].get(family, 0)}"})
        return out

    def _clearing_amounts(self, day: dt.date) -> dict[str, int]:
        """Per clinic / merchant payable and channel receivable (account name -> fen), what is
        owed as of the end of ``day``: its balance less what the rows of later days — booked
        while this day was closing — put on it (the same legs as the postings: the funds, the
        personal account and the wallet into a clinic; a payment into a merchant; a recharge
        out of a channel). Balances and rows are read in one snapshot: a row and its entry
        commit together."""
        families = ("clinic_payable", "merchant_payable", "channel_clearing")
        a = ls.accounts
        later: dict[str, int] = defaultdict(int)
        with self.engine.connect() as conn:
            if not is_sqlite(self.engine):
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                rows = conn.execute(select(a.c.name, a.c.debits_posted, a.c.credits_posted).where(
                    or_(*(a.c.name.like(f"{f}:%") for f in families))).order_by(a.c.id)).all()
                for r in conn.execute(select(settlements.c.fixmedins_code, settlements.c.kind, settlements.c.acct_pay,
                                             settlements.c.wallet_pay, settlements.c.setlinfo)
                                      .where(settlements.c.business_date > day)):
                    info = json.loads(r.setlinfo)
                    sign = 1 if r.kind == "settlement" else -1
                    later[chart.clinic_payable(r.fixmedins_code)] += sign * (
                        info["hifp_pay"] + info.get("hifmi_pay", 0) + r.acct_pay + r.wallet_pay)
                for r in conn.execute(select(payments.c.org_code, payments.c.amount_fen)
                                      .where(payments.c.business_date > day)):
                    later[chart.merchant_payable(r.org_code)] += r.amount_fen
                for r in conn.execute(select(recharges.c.channel, recharges.c.amount_fen)
                                      .where(recharges.c.business_date > day)):
                    later[chart.channel_clearing(r.channel)] += r.amount_fen
        out = {}
        for r in rows:
            net = r.debits_posted - r.credits_posted
            out[r.name] = (net if r.name.startswith("channel_clearing:") else -net) - later.get(r.name, 0)
        return out

    def _post_clearing(self, day: dt.date) -> list[dict]:
        """Pay out every clinic's and merchant's payable and settle every channel's receivable
        through ``bank:centre``, as owed at the end of ``day`` (:meth:`_clearing_amounts`), so
        each of them stands at zero for that day. An amount owed the other way — a clinic whose
        cancellations of earlier days' settlements exceed its new ones — is collected from it
        (the transfer runs the other way; reported as a negative ``amount_fen``).
        Idempotent by day and account: a clearing entry already posted for ``day`` (by a close
        that stopped half-way) is reported as it was posted, never posted again."""
        amounts = self._clearing_amounts(day)
        self.accounts.ensure([chart.BANK_CENTRE])
        out = []
        for name, amount in amounts.items():
            if name.startswith("channel_clearing:"):
                debit, credit = chart.BANK_CENTRE, name  # the channel pays the centre
            else:
                debit, credit = name, chart.BANK_CENTRE  # the centre pays the clinic / merchant
            key = f"clear:{day.isoformat()}:{name}"
            posted = self.ledger.entry(key)
            if posted is not None:
                leg = posted.transfers[0]
                done = leg["amount_fen"] if leg["debit"] == debit else -leg["amount_fen"]
                out.append({"account": name, "amount_fen": done, "yuan": format_yuan(done), "result": "ok",
                            "replayed": True})
                continue
            if amount == 0:
                continue
            if amount < 0:
                debit, credit = credit, debit
            outcome = self.submit(EntrySpec(key=key, kind="clearing",
                                            transfers=(TransferSpec(f"{key}/0", debit, credit, abs(amount)),)), None)
            out.append({"account": name, "amount_fen": amount, "yuan": format_yuan(amount),
                        "result": outcome.result.name.lower(), "replayed": outcome.replayed})
        return out

    @staticmethod
    def write_report(report: dict, setl_rows, out_dir: Path) -> None:
        """Write report.json, per-clinic / per-fund / per-channel CSVs and the 3202-style
        settlement detail file into ``out_dir`` (created if needed). Amounts in fen and yuan."""
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, sort_keys=True))
        with open(out_dir / "per_clinic.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["fixmedins_code", "name", "count", "cancellations", "medfee_sumamt_fen", "fund_pay_sumamt_fen",
                        "acct_pay_fen", "psn_cash_pay_fen", "wallet_pay_fen", "medfee_sumamt_yuan"])
            for code, c in report["per_clinic"].items():
                w.writerow([code, c["name"], c["count"], c["cancellations"], c["medfee_sumamt"], c["fund_pay_sumamt"],
                            c["acct_pay"], c["psn_cash_pay"], c["wallet_pay"], format_yuan(c["medfee_sumamt"])])
        with open(out_dir / "per_fund.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["payer", "net_paid_fen", "net_paid_yuan"])
            for name, amount in report["per_fund"].items():
                w.writerow([name, amount, format_yuan(amount)])
        with open(out_dir / "per_channel.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["channel", "name", "count", "amount_fen", "amount_yuan"])
            for code, c in report["per_channel"].items():
                w.writerow([code, c["name"], c["count"], c["amount_fen"], format_yuan(c["amount_fen"])])
        with open(out_dir / "settlements_3202.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["setl_id", "mdtrt_id", "psn_no", "fixmedins_code", "kind", "original_setl_id", "insutype",
                        "clr_type", "medfee_sumamt", "fund_pay_sumamt", "acct_pay", "cash_payamt", "refd_setl_flag"])
            for r in setl_rows:
                sign = 1 if r.kind == "settlement" else -1
                w.writerow([r.setl_id, r.mdtrt_id, r.psn_no, r.fixmedins_code, r.kind, r.original_setl_id or "",
                            r.insutype, clr_type_for(r.med_type), format_yuan(sign * r.medfee_sumamt),
                            format_yuan(sign * r.fund_pay_sumamt), format_yuan(sign * r.acct_pay),
                            format_yuan(sign * r.psn_cash_pay), "1" if sign < 0 else "0"])
        with open(out_dir / "discrepancies.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["kind", "where", "detail"])
            for d in report["discrepancies"]:
                w.writerow([d["kind"], d.get("terminal_id") or d.get("entry_key", ""), d["detail"]])


__all__ = ["DayCloser", "batch_differences", "batch_figures", "empty_batch", "_iso"]
