"""Registry of organisations (clinics, merchants, recharge channels) and their terminals.

A terminal is enrolled with its own Ed25519 public key; its ``terminal_id`` (8 printable
characters, EMV tag 9F1C) is the ``keyid`` of its RFC 9421 signatures.

Each :class:`Registry` (one per engine process) keeps an active terminal's key and context for
at most ``cache_s`` seconds (the ``terminal_cache_s`` setting) on its monotonic clock, counted
from before the read that found them. So a terminal blocked through any Registry on the same
database is unknown to every other one at most ``cache_s`` seconds after the block commits,
and to the Registry that blocked it at once. A request whose signature was checked before that
is not stopped.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import Engine, insert, select, update

from ledger.db import write_connection
from ledger.errors import Conflict, Invalid, NotFound
from settlement.service import TerminalContext
from terminals.schema import orgs, terminals

TERMINAL_ID_RE = re.compile(r"[0-9A-Z]{8}")
ORG_KINDS = ("clinic", "merchant", "channel")


class Registry:
    """Organisations and terminals on one database, with a cache of active keys that each
    entry leaves ``cache_s`` seconds after it was read (see the module docstring)."""

    def __init__(self, engine: Engine, clock_us: Callable[[], int], *, cache_s: float,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        """``clock_us`` stamps the rows written; ``monotonic`` (seconds) times the cache;
        ``cache_s`` 0 reads the terminal's row on every lookup."""
        self.engine = engine
        self.clock_us = clock_us
        self.cache_s = cache_s
        self.monotonic = monotonic
        #: terminal_id -> (expiry on the monotonic clock, key, context)
        self._cache: dict[str, tuple[float, Ed25519PublicKey, TerminalContext]] = {}
        #: bumped by every block of this Registry: a lookup that read before it stores nothing
        self._generation = 0
        self._lock = threading.Lock()

    def add_org(self, *, code: str, kind: str, name: str, hospital_tier: int | None = None) -> bool:
        """Register an organisation (idempotent by code). Returns True when new. Clinics need
        a hospital tier 1..3. Raises Invalid or Conflict."""
        if kind not in ORG_KINDS:
            raise Invalid("org_kind_unknown", f"kind must be one of {', '.join(ORG_KINDS)}")
        if kind == "clinic" and hospital_tier not in (1, 2, 3):
            raise Invalid("hospital_tier_invalid", "a clinic needs hospital_tier 1, 2 or 3")
        if not code or len(code) > 32:
            raise Invalid("org_code_invalid", "code: 1..32 characters")
        with write_connection(self.engine) as conn:
            row = conn.execute(select(orgs).where(orgs.c.code == code)).first()
            if row is not None:
                if (row.kind, row.name, row.hospital_tier) != (kind, name, hospital_tier):
                    raise Conflict("org_exists_with_different_data", f"organisation {code} exists")
                return False
            conn.execute(insert(orgs).values(code=code, kind=kind, name=name, hospital_tier=hospital_tier,
                                             created_ts=self.clock_us()))
            return True

    def enrol(self, *, terminal_id: str, org_code: str, public_key: Ed25519PublicKey) -> bool:
        """Enrol a terminal with its Ed25519 public key (idempotent). Returns True when new.
        Raises Invalid (id format), NotFound (organisation), Conflict (id taken, other key)."""
        if not TERMINAL_ID_RE.fullmatch(terminal_id or ""):
            raise Invalid("terminal_id_invalid", "terminal_id: 8 characters, digits and capital letters")
        from cryptography.hazmat.primitives import serialization
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
        with write_connection(self.engine) as conn:
            if conn.execute(select(orgs.c.code).where(orgs.c.code == org_code)).first() is None:
                raise NotFound("org_not_found", f"no organisation {org_code}")
            row = conn.execute(select(terminals).where(terminals.c.terminal_id == terminal_id)).first()
            if row is not None:
                if (row.org_code, row.public_key) != (org_code, raw):
                    raise Conflict("terminal_exists_with_different_key", f"terminal {terminal_id} exists")
                return False
            conn.execute(insert(terminals).values(terminal_id=terminal_id, org_code=org_code, public_key=raw,
                                                  status="active", enrolled_ts=self.clock_us()))
            return True

    def block(self, terminal_id: str) -> bool:
        """Block a terminal: once this returns, its signatures no longer verify through this
        Registry, and through any other Registry on the database within its ``cache_s``.
        Idempotent: True when it was active, False when it was blocked already. Raises NotFound
        ``terminal_not_found`` for an unknown id."""
        with write_connection(self.engine) as conn:
            status = conn.scalar(select(terminals.c.status).where(terminals.c.terminal_id == terminal_id))
            if status is None:
                raise NotFound("terminal_not_found", f"no terminal {terminal_id}")
            if status != "blocked":
                conn.execute(update(terminals).where(terminals.c.terminal_id == terminal_id).values(status="blocked"))
        with self._lock:
            self._generation += 1
            self._cache.pop(terminal_id, None)
        return status != "blocked"

    def lookup(self, terminal_id: str) -> tuple[Ed25519PublicKey, TerminalContext] | None:
        """The active terminal's public key and context, or None (unknown or blocked). Served
        from the cache while the entry is younger than ``cache_s``; read from the database
        otherwise (a terminal blocked meanwhile, by any process, is then None)."""
        now = self.monotonic()
        with self._lock:
            hit = self._cache.get(terminal_id)
            generation = self._generation
        if hit is not None and now < hit[0]:
            return hit[1], hit[2]
        with self.engine.connect() as conn:
            row = conn.execute(select(terminals.c.terminal_id, terminals.c.public_key, terminals.c.status,
                                      orgs.c.code, orgs.c.kind, orgs.c.hospital_tier)
                               .select_from(terminals.join(orgs, orgs.c.code == terminals.c.org_code))
                               .where(terminals.c.terminal_id == terminal_id)).first()
        if row is None or row.status != "active":
            if hit is not None:
                with self._lock:
                    self._cache.pop(terminal_id, None)
            return None
        key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(row.public_key))
        ctx = TerminalContext(row.terminal_id, row.code, row.kind, row.hospital_tier)
        if self.cache_s > 0:
            with self._lock:
                if self._generation == generation:  # no block of this Registry since the read began
                    self._cache[terminal_id] = (now + self.cache_s, key, ctx)
        return key, ctx

    def orgs(self) -> list:
        """Every organisation row."""
        with self.engine.connect() as conn:
            return conn.execute(select(orgs).order_by(orgs.c.code)).all()
