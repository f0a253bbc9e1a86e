"""Ledger throughput against pgbench's TPC-B on the same PostgreSQL, in the same run.

    python -m benchmarks.ledger [--seconds 10] [--db postgresql://postgres@127.0.0.1:5432/postgres]
                                [--transfers 100000] [--skip-memory] [--skip-sqlite]

Creates a scratch database beside ``--db`` (dropped at the end) and measures, for ``--seconds``
each, after a CHECKPOINT so that no phase pays for another's dirty pages:

* ``pgbench_tpcb``: ``pgbench -i`` (scale 1) then ``pgbench -c 8 -j 2 -T S``: TPC-B tps;
* ``single``: 8 threads (pgbench's 8 clients), each calling ``Ledger.submit`` with one transfer
  per call — one database transaction and one commit per transfer — between random wallets of
  10,000 funded ones (each must not go below zero);
* ``group_commit``: ``--group-threads`` threads, each submitting one transfer at a time through
  one ``GroupCommitter`` (many transfers per transaction);
* ``group_commit_hot``: the same, every transfer crediting one hot merchant account;
* ``group_commit_asyncio`` (information): the same committer fed by asyncio tasks through
  ``submit_async`` — what the committer does when callers cost no thread wake-up each;
* ``sqlite_single`` / ``sqlite_group_commit``: the same on a SQLite file (WAL, synchronous=FULL);
* memory: ``--transfers`` transfers through the group committer, RSS sampled as it goes
  (``rss_growth_mib`` is the growth after the first tenth; flat means no leak).

Figures are transfers (pgbench: TPC-B transactions) per second, PostgreSQL keeps
``synchronous_commit = on``. Prints a table, then ONE JSON line with figures, ratios, targets.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import threading
import time

from benchmarks.anchors import checkpoint, run_pgbench, scratch_urls

TARGETS = {"single_vs_pgbench": 1.5, "group_commit_vs_pgbench": 6.0, "hot_vs_uniform": 0.8}
ACCOUNTS = 10_000
FUNDING_FEN = 10**12
SINGLE_THREADS = 8  # as many as pgbench's clients


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def setup_accounts(ledger, prefix: str, count: int) -> list[str]:
    """``count`` funded wallets (must not go below zero), a funding source and a hot merchant."""
    from ledger.model import AccountFlags, AccountKind, AccountSpec, EntrySpec, TransferSpec

    wallets = [f"{prefix}w:{i}" for i in range(count)]
    specs = [AccountSpec(w, AccountKind.LIABILITY, flags=AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
             for w in wallets]
    specs += [AccountSpec(f"{prefix}bank", AccountKind.ASSET), AccountSpec(f"{prefix}hot", AccountKind.LIABILITY)]
    for i in range(0, len(specs), 2000):
        ledger.create_accounts(specs[i:i + 2000])
    for i in range(0, count, 64 * 50):
        entries = []
        for j in range(i, min(count, i + 64 * 50), 64):
            legs = tuple(TransferSpec(f"{prefix}fund:{k}", f"{prefix}bank", wallets[k], FUNDING_FEN)
                         for k in range(j, min(count, j + 64)))
            entries.append(EntrySpec(f"{prefix}fund:{j}", legs, kind="funding"))
        outs = ledger.submit_many(entries)
        assert all(o.ok for o in outs), outs[0]
    return wallets


def drive(submit, wallets: list[str], prefix: str, threads: int, seconds: float, *, hot: str | None = None,
          count_max: int | None = None, on_progress=None) -> tuple[float, int, int]:
    """``threads`` threads calling ``submit(entry)`` in a loop, one transfer of 1..500 fen per
    entry, for ``seconds`` (or until ``count_max`` transfers); returns (ok per second, ok, failed)."""
    from ledger.model import EntrySpec, TransferSpec

    stop = threading.Event()
    ok = [0] * threads
    failed = [0] * threads
    budget = [count_max if count_max is not None else -1]
    budget_lock = threading.Lock()
    start = threading.Barrier(threads + 1)
    count = len(wallets)
    step = max(1, (count_max or 1) // 20)

    def worker(n: int) -> None:
        rng = random.Random(n)
        draw = rng.randrange
        i = 0
        start.wait()
        while not stop.is_set():
            if count_max is not None:
                with budget_lock:
                    if budget[0] <= 0:
                        return
                    budget[0] -= 1
                    left = budget[0]
                if on_progress and left % step == 0:
                    on_progress(count_max - left)
            a = draw(count)
            credit = hot or wallets[(a + 1 + draw(count - 1)) % count]
            key = f"{prefix}{n}:{i}"
            i += 1
            if submit(EntrySpec(key, (TransferSpec(key, wallets[a], credit, 1 + draw(500)),))).ok:
                ok[n] += 1
            else:
                failed[n] += 1

    pool = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(threads)]
    for t in pool:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    if count_max is None:
        time.sleep(seconds)
        stop.set()
    for t in pool:
        t.join()
    elapsed = time.perf_counter() - t0
    return sum(ok) / elapsed, sum(ok), sum(failed)


def drive_async(committer, wallets: list[str], prefix: str, tasks: int, seconds: float) -> float:
    """``tasks`` asyncio tasks awaiting ``committer.submit_async``; returns ok transfers per second."""
    from ledger.model import EntrySpec, TransferSpec

    async def main() -> float:
        stop = False
        ok = [0]
        count = len(wallets)

        async def worker(n: int) -> None:
            rng = random.Random(n)
            i = 0
            while not stop:
                a = rng.randrange(count)
                key = f"{prefix}{n}:{i}"
                i += 1
                entry = EntrySpec(key, (TransferSpec(key, wallets[a], wallets[(a + 1 + rng.randrange(count - 1)) % count],
                                                     1 + rng.randrange(500)),))
                out = await committer.submit_async(entry)  # (not `ok[0] += await …`: that reads first)
                ok[0] += out.ok

        workers = [asyncio.create_task(worker(n)) for n in range(tasks)]
        t0 = time.perf_counter()
        await asyncio.sleep(seconds)
        stop = True
        await asyncio.gather(*workers)
        return ok[0] / (time.perf_counter() - t0)

    return asyncio.run(main())


def bench_backend(url: str, seconds: float, group_threads: int, *, label: str = "",
                  extras: bool = True) -> dict[str, float]:
    import migrations
    from ledger.db import make_engine
    from ledger.groupcommit import GroupCommitter
    from ledger.store import Ledger

    sqlite = url.startswith("sqlite")
    engine = make_engine(url, pool_size=16)
    migrations.upgrade(engine)
    ledger = Ledger(engine)
    wallets = setup_accounts(ledger, "u", ACCOUNTS)
    if not sqlite:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")  # what autovacuum would have done by now

    def phase(name: str) -> None:
        if not sqlite:
            checkpoint(url)
        print(f"  {label}{name} …", file=sys.stderr)

    figures: dict[str, float] = {}
    warm = min(2.0, seconds / 5)
    drive(ledger.submit, wallets, "warm:", SINGLE_THREADS, warm)
    phase("single")
    figures[f"{label}single"], _, _ = drive(ledger.submit, wallets, "s:", SINGLE_THREADS, seconds)
    with GroupCommitter(ledger) as gc:
        drive(gc.submit, wallets, "warmg:", group_threads, warm)
        gc.batches = gc.entries = 0
        phase("group_commit")
        figures[f"{label}group_commit"], _, _ = drive(gc.submit, wallets, "g:", group_threads, seconds)
        figures[f"{label}group_commit_batch_mean"] = gc.entries / max(1, gc.batches)
        if extras:
            phase("group_commit_hot")
            figures[f"{label}group_commit_hot"], _, _ = drive(gc.submit, wallets, "h:", group_threads, seconds,
                                                              hot="uhot")
            phase("group_commit_asyncio")
            figures[f"{label}group_commit_asyncio"] = drive_async(gc, wallets, "a:", group_threads, seconds)
    if os.environ.get("LEDGER_BENCH_VERIFY"):
        problems = ledger.verify()
        if problems:
            raise SystemExit("verify failed after the benchmark: " + "; ".join(problems[:5]))
    engine.dispose()
    return figures


def memory_check(url: str, transfers: int, group_threads: int) -> dict[str, float]:
    """Push ``transfers`` transfers through a group committer; RSS after the first tenth and at
    the end (MiB)."""
    import migrations
    from ledger.db import make_engine
    from ledger.groupcommit import GroupCommitter
    from ledger.store import Ledger

    engine = make_engine(url, pool_size=4)
    migrations.upgrade(engine)
    ledger = Ledger(engine)
    wallets = setup_accounts(ledger, "m", 1000)
    samples: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    with GroupCommitter(ledger) as gc:
        rate, _, _ = drive(gc.submit, wallets, "mem:", group_threads, 0, count_max=transfers,
                           on_progress=lambda done: samples.append((done, _rss_mib())))
    elapsed = time.perf_counter() - t0
    engine.dispose()
    samples.sort()
    base = next((rss for done, rss in samples if done >= transfers // 10), samples[0][1] if samples else _rss_mib())
    end = samples[-1][1] if samples else _rss_mib()
    return {"memory_transfers": transfers, "memory_rate": rate, "rss_after_tenth_mib": base,
            "rss_end_mib": end, "rss_growth_mib": end - base, "memory_seconds": elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each measured phase")
    parser.add_argument("--db", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="PostgreSQL URL; a scratch database is created beside it and dropped")
    parser.add_argument("--group-threads", type=int, default=256, help="threads submitting to the group committer")
    parser.add_argument("--transfers", type=int, default=100_000,
                        help="transfers of the memory check (README: the 1-million run)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the memory check")
    parser.add_argument("--skip-sqlite", action="store_true", help="skip the SQLite figures")
    args = parser.parse_args(argv)

    import psycopg

    admin_url, scratch_url, name = scratch_urls(args.db, "ledger_bench")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        sync = conn.execute("SHOW synchronous_commit").fetchone()[0]
    figures: dict[str, float] = {}
    try:
        print(f"scratch database {name}; synchronous_commit = {sync}; {os.cpu_count()} CPUs", file=sys.stderr)
        figures["pgbench_tpcb"] = run_pgbench(scratch_url, args.seconds)
        print(f"  pgbench TPC-B: {figures['pgbench_tpcb']:.0f} tps", file=sys.stderr)
        figures.update(bench_backend(scratch_url, args.seconds, args.group_threads))
        if not args.skip_sqlite:
            with tempfile.TemporaryDirectory() as tmp:
                figures.update(bench_backend(f"sqlite:///{tmp}/ledger.db", args.seconds, args.group_threads,
                                             label="sqlite_", extras=False))
        if not args.skip_memory and args.transfers > 0:
            print(f"  memory check: {args.transfers} transfers …", file=sys.stderr)
            figures.update(memory_check(scratch_url, args.transfers, args.group_threads))
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    ratios = {
        "single_vs_pgbench": figures["single"] / figures["pgbench_tpcb"],
        "group_commit_vs_pgbench": figures["group_commit"] / figures["pgbench_tpcb"],
        "hot_vs_uniform": figures["group_commit_hot"] / figures["group_commit"],
    }
    print_table(figures, ratios)
    rounded = {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}
    print(json.dumps({"figures": rounded, "ratios": {k: round(v, 3) for k, v in ratios.items()},
                      "targets": TARGETS}))
    return 0


DESCRIBED = {
    "pgbench_tpcb": "pgbench -c 8 -j 2, TPC-B-like, scale 1 (tps)",
    "single": "PostgreSQL, 8 threads, one transfer per Ledger.submit (one commit each)",
    "group_commit": "PostgreSQL, GroupCommitter, 256 threads, uniform random wallets",
    "group_commit_batch_mean": "mean transfers per group-commit transaction",
    "group_commit_hot": "PostgreSQL, GroupCommitter, every transfer credits one account",
    "group_commit_asyncio": "information: the same committer fed by asyncio tasks",
    "sqlite_single": "SQLite, 8 threads, one transfer per Ledger.submit",
    "sqlite_group_commit": "SQLite, GroupCommitter, uniform",
    "sqlite_group_commit_batch_mean": "SQLite mean transfers per transaction",
    "memory_rate": "memory check: transfers/s over the run",
    "rss_after_tenth_mib": "RSS after the first tenth of the memory run, MiB",
    "rss_end_mib": "RSS at the end of the memory run, MiB",
    "rss_growth_mib": "RSS growth after the first tenth, MiB (flat = no leak)",
}


def print_table(figures: dict[str, float], ratios: dict[str, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Ledger throughput (transfers/s; pgbench: TPC-B transactions/s)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("what it is")
    for key, value in figures.items():
        if key in ("memory_transfers", "memory_seconds"):
            continue
        table.add_row(key, f"{value:,.1f}", DESCRIBED.get(key, ""))
    for key, value in ratios.items():
        target = TARGETS[key]
        mark = "[green]met[/green]" if value >= target else "[red]missed[/red]"
        table.add_row(key, f"{value:.2f}×", f"target ≥ {target}× — {mark}")
    Console(width=120).print(table)


if __name__ == "__main__":
    sys.exit(main())
