"""The terminal registry: a block made by one engine process reaches every other process
within the cache's bound (``terminal_cache_s``), on SQLite and on PostgreSQL."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import event

import migrations
from ledger.db import make_engine
from terminals.registry import Registry

TID = "TC000001"
CACHE_S = 5.0


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Reads:
    """Counts the statements that read the terminals table on an engine."""

    def __init__(self, engine) -> None:
        self.count = 0
        event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn, _cursor, statement, *_args) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "terminals" in statement:
            self.count += 1


@pytest.fixture
def engines(db_url):
    """Two engines on one database, as two engine processes have."""
    first, second = make_engine(db_url), make_engine(db_url)
    migrations.upgrade(first)
    yield first, second
    first.dispose()
    second.dispose()


def enrolled(engine, clock) -> Registry:
    reg = Registry(engine, lambda: 1, cache_s=CACHE_S, monotonic=clock)
    reg.add_org(code="H33030200009", kind="clinic", name="test clinic", hospital_tier=2)
    reg.enrol(terminal_id=TID, org_code="H33030200009", public_key=Ed25519PrivateKey.generate().public_key())
    return reg


def test_a_block_by_one_process_reaches_another_within_the_cache_bound(engines):
    admin_clock, engine_clock = Clock(), Clock()
    admin = enrolled(engines[0], admin_clock)
    serving = Registry(engines[1], lambda: 1, cache_s=CACHE_S, monotonic=engine_clock)
    reads = Reads(engines[1])
    assert serving.lookup(TID) is not None and reads.count == 1
    engine_clock.now += 1
    assert serving.lookup(TID) is not None and reads.count == 1  # the hot path: served from the cache
    admin.block(TID)
    assert admin.lookup(TID) is None  # at once in the process that blocked it
    engine_clock.now += CACHE_S - 1 - 0.001
    serving.lookup(TID)  # may still be the cached key: the entry is younger than the bound
    engine_clock.now += 0.001  # CACHE_S after the read that cached it, which began before the block
    assert serving.lookup(TID) is None and reads.count == 2
    engine_clock.now += 100
    assert serving.lookup(TID) is None  # and stays refused


def test_a_block_is_refused_at_once_when_the_cache_is_off(engines):
    clock = Clock()
    admin = enrolled(engines[0], clock)
    serving = Registry(engines[1], lambda: 1, cache_s=0, monotonic=clock)
    assert serving.lookup(TID) is not None
    admin.block(TID)
    assert serving.lookup(TID) is None


def test_a_lookup_racing_a_block_in_the_same_process_does_not_cache_the_old_key(engines):
    """The lookup read the row while it was active; the block commits and clears the cache
    before the lookup stores what it read: the next lookup must not be served that."""
    reg = enrolled(engines[0], Clock())
    fired = []

    def block_after_the_read(_conn, _cursor, statement, *_args) -> None:
        if not fired and statement.lstrip().upper().startswith("SELECT") and "terminals" in statement:
            fired.append(True)
            reg.block(TID)  # another connection of the pool: the lookup's read already happened

    event.listen(engines[0], "after_cursor_execute", block_after_the_read)
    assert reg.lookup(TID) is not None  # this request's signature was checked before the block
    assert fired and reg.lookup(TID) is None


def test_blocking_is_idempotent_and_an_unknown_terminal_is_not_found(engines):
    from ledger.errors import NotFound

    reg = enrolled(engines[0], Clock())
    assert reg.block(TID) is True
    assert reg.block(TID) is False  # blocked already: nothing changes
    with pytest.raises(NotFound) as exc:
        reg.block("TC999999")
    assert exc.value.code == "terminal_not_found" and "TC999999" in exc.value.detail
