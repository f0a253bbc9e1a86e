"""Wiring: build the whole engine from one Settings object (Cosmic Python's ``bootstrap``).

Nothing connects at import time; :func:`bootstrap` creates the database engine, runs the
migrations, loads the keys, the policy book and the catalogue, and returns a :class:`Container`
holding every service. ``Container.close()`` stops the group committer and the pools.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

import migrations
from api.settings import GROUP_COMMIT_ENTRIES_MAX, Keys, Settings
from card.service import CardService
from ledger.db import make_engine
from ledger.errors import Invalid
from ledger.store import Ledger
from settlement.catalogue import Catalogue, CatalogueError, load_catalogue
from settlement.days import BusinessDays
from settlement.policy import PolicyError, PolicyNotFound, PolicyShelf, load_builtin, load_policy_book
from settlement.service import AccountCache, SettlementService
from settlement.wallet import WalletService
from terminals.close import DayCloser
from terminals.nonce import make_nonce_store
from terminals.registry import Registry


def clock_us() -> int:
    """The engine's wall clock in µs since the Unix epoch."""
    return time.time_ns() // 1000


@dataclass
class Container:
    """Every service of one engine instance."""

    settings: Settings
    engine: Engine
    ledger: Ledger
    keys: Keys
    nonce_store: object
    cards: CardService
    settlements: SettlementService
    wallet: WalletService
    registry: Registry
    days: BusinessDays
    closer: DayCloser
    accounts: AccountCache
    committer: object | None = None

    def close(self) -> None:
        """Stop the group committer, close the nonce store and dispose of the pool."""
        if self.committer is not None:
            self.committer.close()
        close = getattr(self.nonce_store, "close", None)
        if close:
            close()
        self.engine.dispose()


def load_policies(names_or_paths: str) -> PolicyShelf:
    """The policy books named in ``names_or_paths``, comma-separated: each a shipped book's
    name or a TOML file's path (one per insurance year, e.g. this year's and last year's, so
    that last year's settlements are refunded by last year's rules). Raises Invalid with the
    reason (a malformed book, an unknown name, two books for one year)."""
    try:
        books = []
        for item in names_or_paths.split(","):
            item = item.strip()
            if not item:
                raise PolicyError(f"{names_or_paths!r}: an empty name in the list (names and paths, comma-separated)")
            if item.endswith(".toml") and Path(item).exists():
                books.append(load_policy_book(item))
            elif "/" in item or "\\" in item:
                raise PolicyError(f"{item}: no such policy file (a policy book is a .toml file)")
            else:
                books.append(load_builtin(item))
        return PolicyShelf(books)
    except (PolicyError, PolicyNotFound) as exc:
        raise Invalid("policy_invalid", str(exc)) from None


def load_items(path: str) -> Catalogue:
    """The insurer's catalogue file. Raises Invalid when missing or malformed."""
    if not Path(path).exists():
        raise Invalid("catalogue_missing", f"{path} does not exist; run `citizencard catalogue generate`")
    try:
        return load_catalogue(path)
    except CatalogueError as exc:
        raise Invalid("catalogue_invalid", str(exc)) from None


def bootstrap(settings: Settings, *, clock=clock_us) -> Container:
    """Build and migrate the engine described by ``settings``. Raises Invalid for bad settings."""
    if settings.db_url.startswith("sqlite:///"):
        Path(settings.db_url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    keys = settings.load_keys()
    policies = load_policies(settings.policy)
    catalogue = load_items(settings.catalogue)
    engine = make_engine(settings.db_url, pool_size=settings.db_pool_size)
    migrations.upgrade(engine)
    ledger = Ledger(engine, clock_us=clock)
    committer = None
    submit = ledger.submit
    if settings.group_commit:
        try:
            from ledger.groupcommit import GroupCommitter
        except ImportError:  # pragma: no cover - before the group committer exists
            GroupCommitter = None
        if GroupCommitter is not None:
            committer = GroupCommitter(ledger, batch_entries_max=GROUP_COMMIT_ENTRIES_MAX,
                                       wait_ms_max=settings.group_commit_wait_ms,
                                       linger_ms=settings.group_commit_linger_ms)
            submit = committer.submit
    nonce_store = make_nonce_store(settings.nonce_url)
    accounts = AccountCache(ledger)
    days = BusinessDays(engine, clock)
    cards = CardService(engine, ledger, keys.issuer_mk, nonce_store, clock)
    settlements = SettlementService(engine, ledger, submit, cards, policies, catalogue, days, accounts, clock)
    wallet = WalletService(engine, submit, cards, days, accounts, clock)
    registry = Registry(engine, clock, cache_s=settings.terminal_cache_s)
    closer = DayCloser(engine, ledger, submit, days, accounts, clock)
    return Container(settings, engine, ledger, keys, nonce_store, cards, settlements, wallet, registry, days,
                     closer, accounts, committer)
