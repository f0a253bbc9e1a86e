"""One settings object, validated once at start-up (nothing reads the environment elsewhere).

Values come from keyword arguments or ``CITIZENCARD_*`` environment variables:

| setting | env | default |
|---|---|---|
| ``db_url`` | ``CITIZENCARD_DB`` | ``sqlite:///var/citizencard.db`` |
| ``nonce_url`` | ``CITIZENCARD_NONCE`` | ``memory://`` (``redis://…`` in production) |
| ``keys_file`` | ``CITIZENCARD_KEYS`` | beside the SQLite file, or required for PostgreSQL |
| ``policy`` | ``CITIZENCARD_POLICY`` | ``test-policy-P`` (shipped book names or TOML paths, comma-separated: one book per insurance year) |
| ``catalogue`` | ``CITIZENCARD_CATALOGUE`` | ``var/catalogue.csv`` |
| ``public_origin`` | ``CITIZENCARD_PUBLIC_ORIGIN`` | none: the URL the request arrived on |
| ``group_commit_wait_ms`` | ``CITIZENCARD_GROUP_COMMIT_WAIT_MS`` | 5: longest a ledger entry waits for others to share its commit |
| ``group_commit_linger_ms`` | ``CITIZENCARD_GROUP_COMMIT_LINGER_MS`` | 1.5: how long a gathering batch waits for one more entry (0: it does not wait) |
| ``db_pool_size`` | ``CITIZENCARD_DB_POOL_SIZE`` | 16: PostgreSQL connections an engine process pools (1 to 500); it opens at most twice as many in all, its hot path's included |
| ``terminal_cache_s`` | ``CITIZENCARD_TERMINAL_CACHE_S`` | 5: longest an engine process keeps a terminal's key and status without reading them again, so the longest a terminal blocked by another process still has its requests accepted (0 to 60; 0: read on every request) |

The group commit's two waits trade a few milliseconds of a settlement's latency (at most
``group_commit_wait_ms``) for fewer, larger transactions when the engine is busy: on the 2-core
machine of ``benchmarks/README.md``, 5 / 1.5 ms instead of 2 / 0.3 ms made batches of about 8.5
entries instead of 5.6 and cut the CPU per settlement by 8 % with one engine process, and by 16 %
(+13 % settlements per second) with two.

Each engine process keeps the key and status of the terminals that signed its requests for
``terminal_cache_s`` (one indexed read per terminal per period instead of one per request): a
terminal blocked by any process is refused by every engine process at most that many seconds
after the block commits (at once by the process that blocked it).

An engine process holds at most ``2 * db_pool_size`` PostgreSQL connections, whatever its load:
a request that finds every pooled connection busy waits for one (up to 10 s, then 503
``database_unavailable``) instead of opening more. Size it so that every engine process, with
the other clients of the server, fits in PostgreSQL's ``max_connections`` (100 by default: three
engine processes at the default 16).

The keys file holds the issuer master key (EMV) and the engine's Ed25519 signing key. It is
created only when ``create_keys`` is set (the embedded demo); a server never invents secrets.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger.db import POOL_SIZE
from ledger.errors import Invalid

BODY_BYTES_MAX = 256 * 1024
SIGNATURE_AGE_S_MAX = 300
CLOCK_SKEW_S_MAX = 30
GROUP_COMMIT_WAIT_MS = 5.0
GROUP_COMMIT_LINGER_MS = 1.5
#: bound of both group-commit waits (a settlement's latency)
GROUP_COMMIT_WAIT_MS_MAX = 100.0
TERMINAL_CACHE_S = 5.0
#: bound of ``terminal_cache_s`` (how late a block may take effect in another process)
TERMINAL_CACHE_S_MAX = 60.0
#: bound of ``db_pool_size`` (connections pooled per engine process)
DB_POOL_SIZE_MAX = 500
#: a number as the environment gives it: ASCII digits, an optional fraction
_NUMBER_TEXT = re.compile(r"[0-9]{1,6}(?:\.[0-9]{0,6})?|\.[0-9]{1,6}", re.ASCII)
_ENV = {"group_commit_wait_ms": "CITIZENCARD_GROUP_COMMIT_WAIT_MS",
        "group_commit_linger_ms": "CITIZENCARD_GROUP_COMMIT_LINGER_MS",
        "terminal_cache_s": "CITIZENCARD_TERMINAL_CACHE_S"}
#: the numeric settings: (unit, unit's symbol, largest value); the smallest is 0
_NUMBERS = {"group_commit_wait_ms": ("milliseconds", "ms", GROUP_COMMIT_WAIT_MS_MAX),
            "group_commit_linger_ms": ("milliseconds", "ms", GROUP_COMMIT_WAIT_MS_MAX),
            "terminal_cache_s": ("seconds", "s", TERMINAL_CACHE_S_MAX)}
GROUP_COMMIT_ENTRIES_MAX = 512


@dataclass(frozen=True)
class Keys:
    """Secrets of one engine: the issuer master key (16 bytes, TDES) and the engine's signing key."""

    issuer_mk: bytes
    engine_key: Ed25519PrivateKey
    engine_key_id: str = "engine"

    @property
    def engine_public_hex(self) -> str:
        return self.engine_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                         serialization.PublicFormat.Raw).hex()


@dataclass(frozen=True)
class Settings:
    """Validated settings; see the module docstring for sources and defaults."""

    db_url: str = "sqlite:///var/citizencard.db"
    nonce_url: str = "memory://"
    keys_file: str = ""
    policy: str = "test-policy-P"
    catalogue: str = "var/catalogue.csv"
    public_origin: str = ""
    create_keys: bool = False
    group_commit: bool = True
    group_commit_wait_ms: float = GROUP_COMMIT_WAIT_MS
    group_commit_linger_ms: float = GROUP_COMMIT_LINGER_MS
    terminal_cache_s: float = TERMINAL_CACHE_S
    db_pool_size: int = POOL_SIZE
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, (unit, symbol, largest) in _NUMBERS.items():
            value = getattr(self, name)
            label = f"{name} ({_ENV[name]})"
            if isinstance(value, str):
                if not _NUMBER_TEXT.fullmatch(value.strip()):
                    raise Invalid("setting_invalid", f"{label}: {value!r} is not a number of {unit} "
                                  "(digits 0-9 with an optional decimal point)")
                value = float(value)
                object.__setattr__(self, name, value)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= largest:
                raise Invalid("setting_invalid", f"{label}: {value!r} must be 0 to {largest:g} {symbol}")
        size, label = self.db_pool_size, "db_pool_size (CITIZENCARD_DB_POOL_SIZE)"
        if isinstance(size, str):
            if not re.fullmatch(r"[0-9]{1,6}", size.strip(), re.ASCII):
                raise Invalid("setting_invalid", f"{label}: {size!r} is not a whole number of connections")
            size = int(size)
            object.__setattr__(self, "db_pool_size", size)
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= DB_POOL_SIZE_MAX:
            raise Invalid("setting_invalid", f"{label}: {size!r} must be 1 to {DB_POOL_SIZE_MAX} connections")
        if self.group_commit_linger_ms > self.group_commit_wait_ms:
            raise Invalid("setting_invalid", f"group_commit_linger_ms ({_ENV['group_commit_linger_ms']}) must not "
                          f"exceed group_commit_wait_ms ({_ENV['group_commit_wait_ms']})")

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        """Settings from ``CITIZENCARD_*`` variables, then ``overrides`` (None values ignored)."""
        env = os.environ
        values = dict(
            db_url=env.get("CITIZENCARD_DB", cls.db_url),
            nonce_url=env.get("CITIZENCARD_NONCE", cls.nonce_url),
            keys_file=env.get("CITIZENCARD_KEYS", ""),
            policy=env.get("CITIZENCARD_POLICY", cls.policy),
            catalogue=env.get("CITIZENCARD_CATALOGUE", cls.catalogue),
            public_origin=env.get("CITIZENCARD_PUBLIC_ORIGIN", ""),
            group_commit_wait_ms=env.get("CITIZENCARD_GROUP_COMMIT_WAIT_MS", cls.group_commit_wait_ms),
            group_commit_linger_ms=env.get("CITIZENCARD_GROUP_COMMIT_LINGER_MS", cls.group_commit_linger_ms),
            terminal_cache_s=env.get("CITIZENCARD_TERMINAL_CACHE_S", cls.terminal_cache_s),
            db_pool_size=env.get("CITIZENCARD_DB_POOL_SIZE", cls.db_pool_size),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def resolved_keys_file(self) -> Path:
        """Where the keys live: the setting, or ``<sqlite file>.keys.json``."""
        if not self.db_url.startswith(("sqlite:///", "postgresql://", "postgresql+psycopg://", "postgres://")):
            raise Invalid("db_url_invalid", f"{self.db_url!r}: use sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
        if self.keys_file:
            return Path(self.keys_file)
        if self.db_url.startswith("sqlite:///"):
            return Path(self.db_url[len("sqlite:///"):] + ".keys.json")
        raise Invalid("keys_file_required", "with PostgreSQL, say where the keys live: set CITIZENCARD_KEYS "
                      "to a file path (it holds the issuer master key and the engine key; `citizencard day` or "
                      "`citizencard city` creates it if it does not exist)")

    def load_keys(self) -> Keys:
        """Read the keys file (creating it when ``create_keys``). Raises Invalid when missing
        or malformed."""
        path = self.resolved_keys_file()
        if not path.exists():
            if not self.create_keys:
                raise Invalid("keys_missing", f"{path} does not exist; `citizencard day` or `citizencard city` "
                              "creates it (run it with the same --db and CITIZENCARD_KEYS)")
            path.parent.mkdir(parents=True, exist_ok=True)
            key = Ed25519PrivateKey.generate()
            doc = {"issuer_mk_hex": secrets.token_hex(16),
                   "engine_key_hex": key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                       serialization.NoEncryption()).hex()}
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(doc, indent=2))
            os.chmod(tmp, 0o600)
            tmp.replace(path)
        try:
            doc = json.loads(path.read_text())
            issuer_mk = bytes.fromhex(doc["issuer_mk_hex"])
            engine_key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(doc["engine_key_hex"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise Invalid("keys_malformed", f"{path}: {exc}") from None
        if len(issuer_mk) != 16:
            raise Invalid("keys_malformed", f"{path}: issuer_mk_hex must be 16 bytes")
        return Keys(issuer_mk, engine_key)
