"""Load test: a city's cashiers settling visits with locust, on loopback, bounded in time.

``python -m benchmarks.load [--seconds S] [--users U] [--db URL]``

1. sets up a synthetic city (``citizencard city``) on a scratch database (SQLite by default;
   with ``--db postgresql://…`` a scratch database is created on that server and dropped);
2. starts the engine (``citizencard serve``) in a child process on a free loopback port;
3. anchor: locust users hammer the unsigned ``GET /healthz`` for S/3 seconds — the HTTP stack
   with no signature, no database;
4. locust cashiers (``benchmarks/locustfile.py``) pre-settle and settle visits with EMV card
   payments for S seconds over signed HTTP;
5. stops the engine (SIGTERM to its pid), closes the day and checks the ledger; prints a table
   and one JSON line: figures, the ratio ``settle_vs_healthz`` and the targets.
"""

from __future__ import annotations

# locust patches the standard library with gevent: it must be imported before anything that
# opens sockets or starts threads.
import locust  # noqa: F401  isort: skip

import argparse
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import gevent
from locust import HttpUser, constant, task
from locust.env import Environment

ROOT = Path(__file__).resolve().parents[1]


class HealthProbe(HttpUser):
    """The anchor: an unsigned liveness probe."""

    wait_time = constant(0)

    @task
    def healthz(self) -> None:
        self.client.get("/healthz", name="healthz")


def run_locust(user_class, host: str, users: int, seconds: float) -> dict:
    """Run ``users`` of ``user_class`` against ``host`` for ``seconds``; per-name stats."""
    env = Environment(user_classes=[user_class], host=host)
    runner = env.create_local_runner()
    runner.start(users, spawn_rate=users)
    gevent.spawn_later(seconds, runner.quit)
    runner.greenlet.join()
    out = {}
    for (name, _method), entry in env.stats.entries.items():
        out[name] = {"requests": entry.num_requests, "failures": entry.num_failures,
                     "rps": round(entry.num_requests / seconds, 1),
                     "p50_ms": entry.get_response_time_percentile(0.5),
                     "p95_ms": entry.get_response_time_percentile(0.95)}
    errors = {str(e.error)[:120]: e.occurrences for e in env.stats.errors.values()}
    return {"by_name": out, "errors": errors}


def cli(*args: str, env: dict, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "api.cli", *args], env=env, cwd=ROOT, check=True,
                          capture_output=True, text=True, **kw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--cards", type=int, default=400)
    parser.add_argument("--db", default="", help="PostgreSQL server URL for a scratch database (default SQLite)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cc-load-"))
    scratch = ""
    if args.db:
        import psycopg
        scratch = f"cc_load_{uuid.uuid4().hex[:8]}"
        admin = args.db.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'create database "{scratch}"')
        db_url = admin.rsplit("/", 1)[0] + "/" + scratch
    else:
        db_url = f"sqlite:///{work / 'load.db'}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), CITIZENCARD_DB=db_url, CITIZENCARD_KEYS=str(work / "keys.json"),
               CITIZENCARD_CATALOGUE=str(work / "catalogue.csv"), CITIZENCARD_CITY=str(work / "city.json"),
               CITIZENCARD_USERS=str(args.users))
    os.environ.update(env)
    server = None
    try:
        cli("city", "--cards", str(args.cards), "--out", str(work / "city.json"), env=env)
        from benchmarks.engine import start_engine
        try:
            server, host = start_engine(env, work / "serve.log")
        except RuntimeError as exc:
            raise SystemExit(str(exc)) from None
        anchor = run_locust(HealthProbe, host, args.users, max(2.0, args.seconds / 3))
        from benchmarks.locustfile import Cashier
        load = run_locust(Cashier, host, args.users, args.seconds)
    finally:
        if server is not None:
            from benchmarks.engine import stop_engine
            stop_engine(server)
    verify = subprocess.run([sys.executable, "-m", "api.cli", "ledger", "verify"], env=env, cwd=ROOT,
                            capture_output=True, text=True)
    if scratch:
        import psycopg
        with psycopg.connect(args.db.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
            conn.execute(f'drop database if exists "{scratch}" with (force)')
    health = anchor["by_name"].get("healthz", {"rps": 0})
    settle = load["by_name"].get("settle", {"rps": 0, "requests": 0, "failures": 0, "p50_ms": 0, "p95_ms": 0})
    pre = load["by_name"].get("presettle", {"rps": 0, "p50_ms": 0, "p95_ms": 0})
    print(f"\nload on {'PostgreSQL' if scratch else 'SQLite'}, {args.users} users, {args.seconds:.0f} s")
    print(f"{'what':<28}{'req/s':>10}{'p50 ms':>10}{'p95 ms':>10}{'failures':>10}")
    print(f"{'GET /healthz (anchor)':<28}{health['rps']:>10}{health.get('p50_ms', 0):>10}{health.get('p95_ms', 0):>10}"
          f"{health.get('failures', 0):>10}")
    print(f"{'presettle (2206, signed)':<28}{pre['rps']:>10}{pre['p50_ms']:>10}{pre['p95_ms']:>10}"
          f"{pre.get('failures', 0):>10}")
    print(f"{'settle (2207, signed, card)':<28}{settle['rps']:>10}{settle['p50_ms']:>10}{settle['p95_ms']:>10}"
          f"{settle['failures']:>10}")
    for error, n in list(load["errors"].items())[:5]:
        print(f"  error x{n}: {error}")
    print(f"ledger verify: {'ok' if verify.returncode == 0 else 'FAILED: ' + verify.stderr.strip()}")
    ratio = round(settle["rps"] / health["rps"], 3) if health["rps"] else 0.0
    print(json.dumps({"figures": {"healthz_rps": health["rps"], "settle_rps": settle["rps"],
                                  "presettle_rps": pre["rps"], "settle_p95_ms": settle["p95_ms"],
                                  "settle_failures": settle["failures"], "ledger_verified": verify.returncode == 0},
                      "ratios": {"settle_vs_healthz": ratio},
                      "targets": {"settle_failures": 0, "ledger_verified": True}}))


if __name__ == "__main__":
    main()
