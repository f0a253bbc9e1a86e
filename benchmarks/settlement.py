"""Medical settlement throughput beside pgbench's TPC-B on the same PostgreSQL, in the same run.

    python -m benchmarks.settlement [--seconds 10] [--db postgresql://postgres@127.0.0.1:5432/postgres]
                                    [--threads 16] [--processes N] [--persons 2000] [--card-share 0.5]
                                    [--compare-direct]

Creates a scratch database next to ``--db`` (dropped at the end), then measures for
``--seconds`` each:

* ``split_per_s``: the pure rules alone — :func:`settlement.split.split_visit` on realistic
  bills (the HIS simulator's, 1–8 lines from the catalogue) under test policy P, one thread;
* ``pgbench_tpcb``: ``pgbench -i -s 1`` then ``pgbench -c 8 -j 2 -T S``, TPC-B-like tps;
* ``settlements_per_s``: :meth:`SettlementService.settle` called by ``--threads`` threads for
  ``--persons`` distinct insured persons at four clinics, on an engine bootstrapped with
  ``group_commit=True`` (the ledger's group committer, when it exists, batches the entries).
  The threads are shared among ``--processes`` engine processes on the same database, one per
  CPU by default: the engine is deployed that way (its Python holds one core per process), and
  pgbench is given one client thread per CPU too (``-j 2`` on two).
  A share ``--card-share`` of the visits pays the cash part from the card wallet the way a
  cashier does it (pre-settle, the card's ARQC for the amount due, settle); the others pay it
  in cash at the counter. Each settlement is one ledger entry (fund, personal account, wallet
  → clinic payable, plus the accumulator memo legs) and one settlement row.
  ``--compare-direct`` measures the same with ``group_commit=False`` too.

The persons, their cards, wallets, personal accounts and accounts are set up through the
services before the clock starts. PostgreSQL keeps ``synchronous_commit`` as configured.
Prints a table, then ONE JSON line with figures, ratios and targets.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.anchors import CpuWindow, pgbench_measured, scratch_urls

TARGETS = {"settlements_vs_pgbench": 1.0}
CLINICS = (("H33030200101", 1), ("H33030200102", 2), ("H33030200103", 2), ("H33030200104", 3))
CHANNEL = "CH0000000101"
BILLS = 500


# ------------------------------------------------------------------------------ (a) the rules
def realistic_bills(catalogue_path: Path, count: int, seed: int = 7) -> list[list[dict]]:
    """``count`` outpatient bills from the HIS simulator (lines as a HIS sends them)."""
    from settlement.catalogue import load_catalogue
    from simulators.his import HisSimulator

    his = HisSimulator(load_catalogue(catalogue_path), seed)
    rng = random.Random(seed)
    return [his.make_bill(f"BENCH{i:010d}", rng) for i in range(count)]


def bench_split(bills: list[list[dict]], seconds: float) -> float:
    """split_visit calls per second on one thread (bills parsed beforehand)."""
    from settlement.policy import load_builtin
    from settlement.split import PersonState, parse_bill_lines, split_visit

    policy = load_builtin("test-policy-P").find("310", False, 2, "11")
    parsed = [parse_bill_lines(b) for b in bills]
    states = [PersonState(deductible_used_ytd_fen=d, fund_paid_ytd_fen=f, personal_account_balance_fen=a)
              for d, f, a in ((0, 0, 30_000), (45_000, 120_000, 3_000), (60_000, 990_000, 0))]
    n = 0
    deadline = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while True:
        for lines in parsed:
            split_visit(policy, states[n % 3], lines)
            n += 1
        if time.perf_counter() >= deadline:
            break
    return n / (time.perf_counter() - t0)


# ------------------------------------------------------------------------------ (b) pgbench
# ------------------------------------------------------------------------------ (c) the service
class Citizen:
    __slots__ = ("psn_no", "card", "lock")

    def __init__(self, psn_no: str, card) -> None:
        self.psn_no = psn_no
        self.card = card
        self.lock = threading.Lock()  # one simulated card cannot make two cryptograms at once


def setup_engine(url: str, tmp: Path, catalogue: Path, persons: int, *, group_commit: bool, threads: int):
    """Bootstrap an engine and set up clinics, funds and ``persons`` insured persons with a card,
    a funded wallet and personal account, and their accounts (through the services)."""
    from api.bootstrap import bootstrap
    from api.settings import Settings
    from card.identity import birth_date_of, synthetic_pan, synthetic_sfz
    from settlement import chart
    from settlement.service import TerminalContext
    from simulators.cards import SimulatedCard

    settings = Settings(db_url=url, nonce_url="memory://", keys_file=str(tmp / "keys.json"),
                        catalogue=str(catalogue), create_keys=True, group_commit=group_commit)
    c = bootstrap(settings)
    for code, tier in CLINICS:
        c.registry.add_org(code=code, kind="clinic", name=f"bench clinic {code}", hospital_tier=tier)
    c.registry.add_org(code=CHANNEL, kind="channel", name="bench channel")
    for fund in sorted(set(chart.POOLED_FUND.values()) | set(chart.SECOND_TIER_FUND.values())):
        c.wallet.contribute(key=f"bench:seed:{fund}", bank="bank:bench", account=chart.fund_account(fund),
                            amount_fen=10**13)
    channel = TerminalContext("TB000001", CHANNEL, "channel")
    probe = TerminalContext("TB000002", CLINICS[1][0], "clinic", CLINICS[1][1])

    def one(i: int) -> Citizen:
        rng = random.Random(i)
        psn_no = f"3303{i:012d}"
        certno = synthetic_sfz(rng, "330302", dt.date(1940, 1, 1) + dt.timedelta(days=7 * i), sex="M")
        c.cards.register_citizen(psn_no=psn_no, certno=certno, psn_name="基准", gend="1",
                                 brdy=birth_date_of(certno), insutype="310", retired=False)
        pan = synthetic_pan(rng)
        c.cards.issue_card(psn_no=psn_no, pan=pan, pan_seq="01")
        c.wallet.contribute(key=f"bench:acct:{psn_no}", bank="bank:bench",
                            account=chart.personal_account(psn_no), amount_fen=rng.randrange(0, 200_000) or 1)
        c.wallet.recharge(channel, {"msgid": f"BR{i:012d}", "pan": pan, "amount_fen": 500_000})
        # The cashier's 1101 person query opens the person's accounts for the year.
        c.settlements.presettle(probe, {"msgid": f"BP{i:012d}", "mdtrt_id": f"BP{i:012d}", "chrg_bchno": "1",
                                        "psn_no": psn_no, "med_type": "11",
                                        "lines": [{"feedetl_sn": "1", "pric": "1", "cnt": "1"}]})
        card = SimulatedCard(issuer_mk=c.keys.issuer_mk, pan=pan, psn="01", card_id="0" * 32,
                             card_number=f"{i:09d}", ssn=certno, name="基准")
        return Citizen(psn_no, card)

    with ThreadPoolExecutor(threads) as pool:
        citizens = list(pool.map(one, range(1, persons + 1)))
    return c, citizens


def drive(c, citizens: list[Citizen], bills: list[list[dict]], threads: int, seconds: float, prefix: str,
          card_share: float) -> tuple[float, collections.Counter]:
    """``threads`` cashiers settling random visits for ``seconds``; (settlements/s, outcomes)."""
    from ledger.errors import DomainError
    from settlement.service import TerminalContext

    clinics = [TerminalContext(f"TB{n:06d}", code, "clinic", tier) for n, (code, tier) in enumerate(CLINICS, 10)]
    stop = threading.Event()
    outcomes = [collections.Counter() for _ in range(threads)]
    barrier = threading.Barrier(threads + 1)
    day = c.cards.local_date()  # the cards' transaction date: the calendar's, not the business day

    def worker(n: int) -> None:
        rng = random.Random(f"{prefix}{n}")
        svc = c.settlements
        barrier.wait()
        i = 0
        while not stop.is_set():
            i += 1
            z = citizens[rng.randrange(len(citizens))]
            ctx = clinics[rng.randrange(len(clinics))]
            mdtrt = f"{prefix}{n:02d}{i:09d}"
            visit = {"msgid": f"{ctx.org_code}{prefix}{n:02d}{i:09d}", "mdtrt_id": mdtrt, "chrg_bchno": mdtrt + "-01",
                     "psn_no": z.psn_no, "med_type": "11", "lines": bills[rng.randrange(len(bills))]}
            try:
                if rng.random() < card_share:
                    due = svc.presettle(ctx, dict(visit, payment={"method": "card"}))["setlinfo"]["psn_cash_pay"]
                    with z.lock:
                        un = rng.getrandbits(32).to_bytes(4, "big")
                        data, arqc = z.card.generate_ac(due, ctx.terminal_id, day, un)
                        visit["payment"] = {"method": "card", "pan": z.card.pan, "pan_seq": "01", "atc": data.atc,
                                            "arqc": arqc.hex(), "un": un.hex(), "txn_date": day.isoformat(),
                                            "amount_fen": due}
                        doc = svc.settle(ctx, visit)  # under the card's lock: ATCs arrive in order
                else:
                    doc = svc.settle(ctx, visit)
                outcomes[n]["replayed" if doc["replayed"] else "settled"] += 1
            except DomainError as exc:
                outcomes[n][exc.code] += 1
            except Exception as exc:  # reported, never hidden
                outcomes[n][f"error:{type(exc).__name__}"] += 1

    pool = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    total = sum(outcomes, collections.Counter())
    return total["settled"] / elapsed, total


def _counters(committer) -> tuple[int, int, int]:
    """(batches, entries, fallbacks) of a group committer so far (zeros without one)."""
    if committer is None:
        return 0, 0, 0
    return committer.batches, committer.entries, committer.fallbacks


def _child(url: str, tmp: str, catalogue: str, part: list[tuple], threads: int, seconds: float, prefix: str,
           card_share: float, group_commit: bool, barrier, results) -> None:
    """One engine process of a ``--processes`` run: its own engine and group committer on the
    same database, its own share of the persons (a card is used by one process only, so its
    ATCs arrive in order); warms up, waits for the others, measures, reports."""
    from api.bootstrap import bootstrap
    from api.settings import Settings
    from simulators.cards import SimulatedCard

    settings = Settings(db_url=url, nonce_url="memory://", keys_file=str(Path(tmp) / "keys.json"),
                        catalogue=catalogue, create_keys=False, group_commit=group_commit)
    c = bootstrap(settings)
    try:
        citizens = [Citizen(psn_no, SimulatedCard(issuer_mk=c.keys.issuer_mk, pan=pan, psn="01", card_id="0" * 32,
                                                  card_number=number, ssn=certno, name="基准"))
                    for psn_no, pan, certno, number in part]
        bills = realistic_bills(Path(catalogue), BILLS)
        drive(c, citizens, bills, threads, min(2.0, seconds / 5), f"W{prefix}", card_share)  # warm-up
        committer = c.committer
        b0, e0, f0 = _counters(committer)
        barrier.wait()
        with CpuWindow() as cpu:
            rate, outcomes = drive(c, citizens, bills, threads, seconds, f"M{prefix}", card_share)
        b1, e1, f1 = _counters(committer)
        results.put((rate, dict(outcomes), b1 - b0, e1 - e0, f1 - f0, cpu.own_s, cpu.machine_s, cpu.wall_s))
    except BaseException as exc:  # reported to the parent, never hidden
        results.put(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
        raise
    finally:
        c.close()


def bench_service(url: str, seconds: float, threads: int, persons: int, card_share: float, *,
                  group_commit: bool, label: str, processes: int = 1) -> dict[str, float]:
    """Settlements per second through ``processes`` engine processes (each with
    ``threads // processes`` cashier threads and its own group committer) on one database."""
    import multiprocessing

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        catalogue = tmp / "catalogue.csv"
        from simulators.day import ensure_catalogue
        ensure_catalogue(catalogue, seed=42)
        bills = realistic_bills(catalogue, BILLS)
        t0 = time.perf_counter()
        c, citizens = setup_engine(url, tmp, catalogue, persons, group_commit=group_commit, threads=threads)
        setup_s = time.perf_counter() - t0
        try:
            figures = {f"{label}setup_s": setup_s}
            if processes <= 1:
                drive(c, citizens, bills, threads, min(2.0, seconds / 5), f"W{label[:1]}", card_share)  # warm-up
                committer = c.committer
                b0, e0, f0 = _counters(committer)
                with CpuWindow() as cpu:
                    rate, outcomes = drive(c, citizens, bills, threads, seconds, f"M{label[:1]}", card_share)
                b1, e1, f1 = _counters(committer)
                batches, entries, fallbacks = b1 - b0, e1 - e0, f1 - f0
                engine_s, machine_s, wall_s = cpu.own_s, cpu.machine_s, cpu.wall_s
            else:
                if c.committer is not None:
                    c.committer.close()  # the parent only set up; the children settle
                c.engine.dispose()  # and holds no connection meanwhile (each child pools its own)
                mp = multiprocessing.get_context("spawn")
                barrier, results = mp.Barrier(processes), mp.Queue()
                per = max(1, threads // processes)
                children = []
                for k in range(processes):
                    part = [(z.psn_no, z.card.pan, z.card.ssn, z.card.card_number) for z in citizens[k::processes]]
                    children.append(mp.Process(target=_child, args=(
                        url, str(tmp), str(catalogue), part, per, seconds, f"{label[:1]}{k}", card_share,
                        group_commit, barrier, results), daemon=True))
                for child in children:
                    child.start()
                reports = [results.get(timeout=seconds * 4 + 120) for _ in children]
                for child in children:
                    child.join(30)
                failed = [r for r in reports if isinstance(r, BaseException)]
                if failed:
                    raise SystemExit(f"an engine process failed: {failed[0]!r}")
                rate = sum(r[0] for r in reports)
                outcomes = sum((collections.Counter(r[1]) for r in reports), collections.Counter())
                batches, entries, fallbacks = (sum(r[i] for r in reports) for i in (2, 3, 4))
                engine_s = sum(r[5] for r in reports)  # the windows coincide (a barrier starts them)
                machine_s = None if any(r[6] is None for r in reports) else max(r[6] for r in reports)
                wall_s = max(r[7] for r in reports)
            figures[f"{label}settlements_per_s"] = rate
            settled = outcomes.get("settled", 0)
            if settled and machine_s is not None:
                # Where the CPU goes: the engine process(es) (the simulated cashiers and cards run
                # in them too), and the rest of the machine (PostgreSQL: its backends, WAL writer…)
                figures[f"{label}machine_cpu_us_per_settlement"] = machine_s / settled * 1e6
                figures[f"{label}engine_cpu_us_per_settlement"] = engine_s / settled * 1e6
                figures[f"{label}db_cpu_us_per_settlement"] = (machine_s - engine_s) / settled * 1e6
                figures[f"{label}busy_share"] = machine_s / (wall_s * (os.cpu_count() or 1))
            if batches:
                figures[f"{label}batch_mean"] = entries / batches
                figures[f"{label}fallback_share"] = fallbacks / batches
            refused = {k: v for k, v in outcomes.items() if k != "settled"}
            figures[f"{label}refused"] = float(sum(refused.values()))
            if refused:
                print(f"{label or 'group commit '}outcomes other than settled: {dict(refused)}", file=sys.stderr)
            if not c.ledger.trial_balance().balanced:
                raise SystemExit("the trial balance does not balance after the benchmark")
        finally:
            c.close()
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each measured phase")
    parser.add_argument("--db", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="PostgreSQL URL; a scratch database is created beside it and dropped")
    parser.add_argument("--threads", type=int, default=16, help="cashier threads calling the service")
    parser.add_argument("--persons", type=int, default=2000, help="distinct insured persons")
    parser.add_argument("--card-share", type=float, default=0.5,
                        help="share of visits whose cash part the card wallet pays (pre-settle + ARQC)")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="engine processes sharing the database and the --threads (each its own committer); "
                             "default one per CPU, as the engine is deployed (pgbench gets -j 2 likewise)")
    parser.add_argument("--compare-direct", action="store_true",
                        help="also measure without the group committer (one transaction per settlement)")
    args = parser.parse_args(argv)

    import psycopg

    admin_url, scratch_url, name = scratch_urls(args.db, "settlement_bench")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        sync = conn.execute("SHOW synchronous_commit").fetchone()[0]
    figures: dict[str, float] = {}
    try:
        print(f"scratch database {name}; synchronous_commit = {sync}; {os.cpu_count()} CPUs", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            catalogue = Path(tmp) / "catalogue.csv"
            from simulators.day import ensure_catalogue
            ensure_catalogue(catalogue, seed=42)
            figures["split_per_s"] = bench_split(realistic_bills(catalogue, BILLS), args.seconds)
        print(f"split_visit: {figures['split_per_s']:.0f}/s", file=sys.stderr)
        figures["pgbench_tpcb"], pgbench_cpu = pgbench_measured(scratch_url, args.seconds)
        figures.update(pgbench_cpu)
        print(f"pgbench TPC-B: {figures['pgbench_tpcb']:.0f} tps", file=sys.stderr)
        figures.update(bench_service(scratch_url, args.seconds, args.threads, args.persons, args.card_share,
                                     group_commit=True, label="", processes=args.processes))
        print(f"settlements: {figures['settlements_per_s']:.0f}/s", file=sys.stderr)
        if args.compare_direct:
            with psycopg.connect(admin_url, autocommit=True) as conn:  # a fresh database for the second run
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                conn.execute(f'CREATE DATABASE "{name}"')
            figures.update(bench_service(scratch_url, args.seconds, args.threads, args.persons, args.card_share,
                                         group_commit=False, label="direct_", processes=args.processes))
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    ratios = {"settlements_vs_pgbench": figures["settlements_per_s"] / figures["pgbench_tpcb"]}
    print_table(figures, ratios, args)
    rounded = {k: round(v, 3) for k, v in figures.items()}
    print(json.dumps({"figures": rounded, "ratios": {k: round(v, 3) for k, v in ratios.items()},
                      "targets": TARGETS}))
    return 0


def print_table(figures: dict[str, float], ratios: dict[str, float], args) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Medical settlement throughput (pgbench: TPC-B transactions/s)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("what it is")
    described = {
        "split_per_s": "split_visit on HIS-simulator bills (1-8 lines), test policy P, one thread",
        "pgbench_tpcb": "pgbench -c 8 -j 2, TPC-B-like, scale 1",
        "settlements_per_s": (f"SettlementService.settle, {args.threads} threads in {args.processes} engine "
                              f"process(es), {args.persons} persons, {args.card_share:.0%} by card, group commit"),
        "batch_mean": "mean ledger entries per group-commit transaction",
        "pgbench_cpu_us_per_txn": "machine CPU (all cores) per TPC-B transaction: server and client",
        "pgbench_client_cpu_us_per_txn": "of which pgbench itself",
        "pgbench_busy_share": "share of the cores busy during pgbench (< 1: it waits on locks or the disk)",
        "machine_cpu_us_per_settlement": "machine CPU (all cores) per settlement",
        "engine_cpu_us_per_settlement": "of which the engine process(es), simulated cashiers and cards included",
        "db_cpu_us_per_settlement": "of which the rest of the machine: PostgreSQL",
        "busy_share": "share of the cores busy while settling",
        "fallback_share": "share of batches whose speculative write was refused and re-applied with locks",
        "refused": "settlements refused during the measured phase (see stderr)",
        "setup_s": "set-up through the services (not measured)",
        "direct_settlements_per_s": "the same without the group committer",
        "direct_batch_mean": "",
        "direct_refused": "refused without the group committer",
        "direct_setup_s": "",
    }
    for key, value in figures.items():
        table.add_row(key, f"{value:,.1f}", described.get(key, ""))
    for key, value in ratios.items():
        target = TARGETS[key]
        mark = "[green]met[/green]" if value >= target else "[red]missed[/red]"
        table.add_row(key, f"{value:.3f}×", f"target ≥ {target}× — {mark}")
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
