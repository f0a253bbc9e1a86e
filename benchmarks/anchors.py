"""What every PostgreSQL benchmark shares: a scratch database beside the given URL, and the
anchor — pgbench's TPC-B on that same database in the same run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from urllib.parse import urlsplit, urlunsplit


def scratch_urls(db_url: str, prefix: str) -> tuple[str, str, str]:
    """(admin URL, scratch URL, scratch database name ``{prefix}_…``) for a PostgreSQL URL."""
    parts = urlsplit(db_url.replace("postgresql+psycopg://", "postgresql://"))
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    scratch = urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, parts.query, parts.fragment)), scratch, name


def checkpoint(url: str) -> None:
    """Start a measured phase from a clean checkpoint (best effort: needs the right)."""
    import psycopg

    try:
        with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
            conn.execute("CHECKPOINT")
    except psycopg.Error as exc:  # pragma: no cover - a role without pg_checkpoint
        print(f"(no CHECKPOINT: {exc})", file=sys.stderr)


class CpuWindow:
    """CPU spent over a ``with`` block: the whole machine's busy time (``/proc/stat``: every
    state but idle and iowait, all cores) and this process's own, children included (waited
    for ones), in seconds; ``cores`` the machine's. ``machine_s`` is None where ``/proc/stat``
    does not exist (not Linux)."""

    def __init__(self) -> None:
        self.machine_s: float | None = None
        self.own_s = 0.0
        self.wall_s = 0.0
        self.cores = os.cpu_count() or 1

    @staticmethod
    def _machine() -> float | None:
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self) -> CpuWindow:
        self._m0, self._o0, self._w0 = self._machine(), self._own(), time.perf_counter()
        return self

    def __exit__(self, *_exc) -> None:
        m1 = self._machine()
        self.own_s = self._own() - self._o0
        self.wall_s = time.perf_counter() - self._w0
        if m1 is not None and self._m0 is not None:
            self.machine_s = m1 - self._m0

    def busy_share(self) -> float | None:
        """Share of the machine's cores that were busy over the window (0..1)."""
        if self.machine_s is None or self.wall_s <= 0:
            return None
        return self.machine_s / (self.wall_s * self.cores)


def pgbench_measured(scratch_url: str, seconds: float) -> tuple[float, dict[str, float]]:
    """``pgbench -i`` (scale 1), a checkpoint, then ``pgbench -c 8 -j 2 -T seconds`` on the
    scratch database: (TPC-B transactions per second, CPU figures). The figures, per committed
    transaction: ``pgbench_cpu_us_per_txn`` (the whole machine's busy CPU: server and client),
    ``pgbench_client_cpu_us_per_txn`` (pgbench itself), and ``pgbench_busy_share`` (share of the
    cores busy: below 1 when the run waits, on locks or the disk, rather than computes)."""
    if shutil.which("pgbench") is None:
        raise SystemExit("pgbench is not on PATH")
    subprocess.run(["pgbench", "-i", "-q", "-s", "1", scratch_url], check=True, capture_output=True)
    checkpoint(scratch_url)
    with CpuWindow() as cpu:
        out = subprocess.run(["pgbench", "-c", "8", "-j", "2", "-T", str(max(1, int(seconds))), scratch_url],
                             check=True, capture_output=True, text=True).stdout
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out) or re.search(r"tps = ([0-9.]+)", out)
    n = re.search(r"number of transactions actually processed: (\d+)", out)
    if not m:
        raise SystemExit("could not read pgbench tps:\n" + out)
    figures: dict[str, float] = {}
    if n and int(n.group(1)) and cpu.machine_s is not None:
        txns = int(n.group(1))
        figures = {"pgbench_cpu_us_per_txn": cpu.machine_s / txns * 1e6,
                   "pgbench_client_cpu_us_per_txn": cpu.own_s / txns * 1e6,
                   "pgbench_busy_share": cpu.busy_share()}
    return float(m.group(1)), figures


def run_pgbench(scratch_url: str, seconds: float) -> float:
    """:func:`pgbench_measured`'s TPC-B transactions per second alone."""
    return pgbench_measured(scratch_url, seconds)[0]
