"""What every PostgreSQL benchmark shares: a scratch database beside the given URL, and the
anchor — pgbench's TPC-B on that same database in the same run."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
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


def run_pgbench(scratch_url: str, seconds: float) -> float:
    """``pgbench -i`` (scale 1), a checkpoint, then ``pgbench -c 8 -j 2 -T seconds`` on the
    scratch database; returns TPC-B transactions per second."""
    if shutil.which("pgbench") is None:
        raise SystemExit("pgbench is not on PATH")
    subprocess.run(["pgbench", "-i", "-q", "-s", "1", scratch_url], check=True, capture_output=True)
    checkpoint(scratch_url)
    out = subprocess.run(["pgbench", "-c", "8", "-j", "2", "-T", str(max(1, int(seconds))), scratch_url],
                         check=True, capture_output=True, text=True).stdout
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out) or re.search(r"tps = ([0-9.]+)", out)
    if not m:
        raise SystemExit("could not read pgbench tps:\n" + out)
    return float(m.group(1))
