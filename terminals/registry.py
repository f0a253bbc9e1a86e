"""Registry of organisations (clinics, merchants, recharge channels) and their terminals.

A terminal is enrolled with its own Ed25519 public key; its ``terminal_id`` (8 printable
characters, EMV tag 9F1C) is the ``keyid`` of its RFC 9421 signatures. Blocking a terminal
makes its signatures unknown at once.
"""

from __future__ import annotations

import re
import threading
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
    """Organisations and terminals on one database, with a small cache of active keys."""

    def __init__(self, engine: Engine, clock_us: Callable[[], int]) -> None:
        self.engine = engine
        self.clock_us = clock_us
        self._cache: dict[str, tuple[Ed25519PublicKey, TerminalContext]] = {}
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

    def block(self, terminal_id: str) -> None:
        """Block a terminal: its signatures stop verifying at once."""
        with write_connection(self.engine) as conn:
            conn.execute(update(terminals).where(terminals.c.terminal_id == terminal_id).values(status="blocked"))
        with self._lock:
            self._cache.pop(terminal_id, None)

    def lookup(self, terminal_id: str) -> tuple[Ed25519PublicKey, TerminalContext] | None:
        """The active terminal's public key and context, or None (unknown or blocked)."""
        with self._lock:
            hit = self._cache.get(terminal_id)
        if hit is not None:
            return hit
        with self.engine.connect() as conn:
            row = conn.execute(select(terminals.c.terminal_id, terminals.c.public_key, terminals.c.status,
                                      orgs.c.code, orgs.c.kind, orgs.c.hospital_tier)
                               .select_from(terminals.join(orgs, orgs.c.code == terminals.c.org_code))
                               .where(terminals.c.terminal_id == terminal_id)).first()
        if row is None or row.status != "active":
            return None
        value = (Ed25519PublicKey.from_public_bytes(bytes.fromhex(row.public_key)),
                 TerminalContext(row.terminal_id, row.code, row.kind, row.hospital_tier))
        with self._lock:
            self._cache[terminal_id] = value
        return value

    def orgs(self) -> list:
        """Every organisation row."""
        with self.engine.connect() as conn:
            return conn.execute(select(orgs).order_by(orgs.c.code)).all()
