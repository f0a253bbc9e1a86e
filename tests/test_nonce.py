"""Single-use stores: in-memory semantics, bound and races; Redis against a real server."""

from __future__ import annotations

import socket
import threading
import time
import uuid

import pytest

from terminals.nonce import (
    InMemoryNonceStore,
    NonceStore,
    NonceStoreFull,
    NonceStoreUnavailable,
    RedisNonceStore,
    make_nonce_store,
)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def race(store: NonceStore, key: str, threads: int = 32, ttl_s: int = 60) -> list[bool]:
    """Many threads claim ``key`` at once (released together by a barrier)."""
    barrier = threading.Barrier(threads)
    results: list[bool] = []
    lock = threading.Lock()

    def worker():
        barrier.wait()
        won = store.claim(key, ttl_s)
        with lock:
            results.append(won)

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=30)
    assert len(results) == threads
    return results


# ------------------------------------------------------------------------------------------
# In memory


def test_claim_once():
    store = InMemoryNonceStore(clock=FakeClock())
    assert store.claim("sig:pos-1:a", 60) is True
    assert store.claim("sig:pos-1:a", 60) is False
    assert store.claim("sig:pos-1:b", 60) is True
    assert isinstance(store, NonceStore)


def test_expiry_with_fake_clock():
    clock = FakeClock()
    store = InMemoryNonceStore(clock=clock)
    assert store.claim("k", 10)
    clock.advance(9.999)
    assert not store.claim("k", 10)  # a failed claim does not extend the entry
    clock.advance(0.001)
    assert store.claim("k", 10)  # expired exactly at ttl: first use again
    clock.advance(5)
    # The stale heap record of the first claim must not evict the second claim.
    assert not store.claim("k", 10)
    assert not store.claim("k", 10)
    clock.advance(5)
    assert store.claim("k", 10)


def test_expired_entries_are_purged():
    clock = FakeClock()
    store = InMemoryNonceStore(clock=clock)
    for i in range(100):
        store.claim(f"k{i}", 1 + i % 3)
    assert len(store) == 100
    clock.advance(3)
    store.claim("fresh", 5)
    assert len(store) == 1


def test_bound_refuses_rather_than_forgets():
    clock = FakeClock()
    store = InMemoryNonceStore(clock=clock, entries_max=3)
    assert store.claim("a", 10) and store.claim("b", 10) and store.claim("c", 20)
    with pytest.raises(NonceStoreFull):
        store.claim("d", 10)
    assert store.claim("a", 10) is False  # live keys are still recognised when full
    assert len(store) == 3
    clock.advance(10)  # a and b expire; c stays live
    assert store.claim("d", 10) is True
    assert store.claim("e", 10) is True
    with pytest.raises(NonceStoreFull):
        store.claim("f", 10)
    assert store.claim("c", 10) is False
    assert len(store) <= 3


def test_thread_race_exactly_one_wins():
    store = InMemoryNonceStore()
    for round_ in range(20):
        results = race(store, f"qr:{round_}", threads=32)
        assert results.count(True) == 1


def test_thread_race_many_keys():
    store = InMemoryNonceStore()
    keys = [f"k{i}" for i in range(2000)]
    wins: list[str] = []
    lock = threading.Lock()

    def worker():
        mine = [k for k in keys if store.claim(k, 60)]
        with lock:
            wins.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == sorted(keys)


@pytest.mark.parametrize("ttl", [0, -1, 1.5, True, "60"])
def test_invalid_ttl(ttl):
    with pytest.raises(ValueError):
        InMemoryNonceStore().claim("k", ttl)


def test_empty_key_rejected():
    with pytest.raises(ValueError):
        InMemoryNonceStore().claim("", 10)


def test_closed_store_refuses():
    store = InMemoryNonceStore()
    store.claim("k", 10)
    store.close()
    with pytest.raises(NonceStoreUnavailable):
        store.claim("k2", 10)


def test_a_released_claim_can_be_claimed_again_and_only_once():
    clock = FakeClock()
    store = InMemoryNonceStore(clock=clock)
    assert store.claim("qr:6200:7", 60) is True
    store.release("qr:6200:7")
    store.release("qr:6200:never-claimed")  # nothing held: nothing happens
    assert race(store, "qr:6200:7").count(True) == 1
    clock.advance(61)  # the released key's old heap record expires harmlessly
    assert store.claim("qr:6200:8", 60) is True and store.claim("qr:6200:7", 60) is True
    store.close()
    with pytest.raises(NonceStoreUnavailable):
        store.release("qr:6200:7")


def test_make_nonce_store():
    assert isinstance(make_nonce_store(None), InMemoryNonceStore)
    assert isinstance(make_nonce_store("memory://"), InMemoryNonceStore)
    redis_store = make_nonce_store("redis://127.0.0.1:6379/15")  # no connection until first claim
    assert isinstance(redis_store, RedisNonceStore)
    redis_store.close()
    with pytest.raises(ValueError):
        make_nonce_store("memcached://127.0.0.1")


# ------------------------------------------------------------------------------------------
# Redis


@pytest.fixture
def redis_store(redis_url):
    store = RedisNonceStore(redis_url, prefix=f"cc:test:{uuid.uuid4().hex[:8]}:")
    yield store
    store.close()


@pytest.mark.redis
def test_redis_claim_once(redis_store):
    assert redis_store.claim("sig:pos-1:a", 60) is True
    assert redis_store.claim("sig:pos-1:a", 60) is False
    assert redis_store.claim("sig:pos-1:b", 60) is True
    assert isinstance(redis_store, NonceStore)


@pytest.mark.redis
def test_redis_a_released_claim_can_be_claimed_again_and_only_once(redis_store):
    assert redis_store.claim("qr:6200:7", 60) is True
    redis_store.release("qr:6200:7")
    redis_store.release("qr:6200:never-claimed")
    assert race(redis_store, "qr:6200:7").count(True) == 1
    redis_store.close()
    with pytest.raises(NonceStoreUnavailable):
        redis_store.release("qr:6200:7")


@pytest.mark.redis
def test_redis_ttl_is_set(redis_store):
    assert redis_store.claim("k", 330)
    ttl = redis_store.client.ttl(redis_store.prefix + "k")
    assert 0 < ttl <= 330
    assert redis_store.client.get(redis_store.prefix + "k") == b"1"


@pytest.mark.redis
def test_redis_key_expires(redis_store):
    assert redis_store.claim("short", 1)
    assert not redis_store.claim("short", 1)
    deadline = time.monotonic() + 5
    while redis_store.client.exists(redis_store.prefix + "short") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert redis_store.claim("short", 1)


@pytest.mark.redis
def test_redis_concurrent_claims_exactly_one_wins(redis_store):
    for round_ in range(5):
        results = race(redis_store, f"qr:{round_}", threads=24)
        assert results.count(True) == 1


@pytest.mark.redis
def test_redis_two_workers_share_state(redis_url):
    prefix = f"cc:test:{uuid.uuid4().hex[:8]}:"
    a, b = RedisNonceStore(redis_url, prefix=prefix), RedisNonceStore(redis_url, prefix=prefix)
    try:
        assert a.claim("n", 60) is True
        assert b.claim("n", 60) is False
    finally:
        a.close()
        b.close()


@pytest.mark.redis
def test_redis_store_with_given_client_leaves_it_open(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    store = RedisNonceStore(client, prefix=f"cc:test:{uuid.uuid4().hex[:8]}:")
    assert store.claim("x", 5)
    store.close()
    assert client.ping()
    with pytest.raises(NonceStoreUnavailable):
        store.claim("y", 5)
    client.close()


@pytest.mark.redis
def test_request_replay_detected_across_workers(redis_url):
    """End to end: a signed request accepted by one worker is a replay for another."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from terminals.signing import SignatureError, SignatureResult, nonce_key, sign_request, verify_request

    key, now, url, body = Ed25519PrivateKey.generate(), 1_760_000_000, "https://cc.example.cn/v1/pay", b"{}"
    nonce = uuid.uuid4().hex
    headers = {"Content-Type": "application/json"}
    headers.update(
        sign_request("POST", url, headers, body, key_id="pos-1", private_key=key, created=now, nonce=nonce)
    )

    def verify(store):
        return verify_request("POST", url, headers, body, resolve_public_key=lambda kid: key.public_key(),
                              nonce_store=store, now=now)

    prefix = f"cc:test:{uuid.uuid4().hex[:8]}:"
    worker_a, worker_b = RedisNonceStore(redis_url, prefix=prefix), RedisNonceStore(redis_url, prefix=prefix)
    try:
        assert verify(worker_a).key_id == "pos-1"
        with pytest.raises(SignatureError) as info:
            verify(worker_b)
        assert info.value.result is SignatureResult.NONCE_REPLAYED
        assert 0 < worker_a.client.ttl(prefix + nonce_key("pos-1", nonce)) <= 300 + 30
    finally:
        worker_a.close()
        worker_b.close()


def _unused_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_redis_unavailable_raises_quickly():
    store = RedisNonceStore(f"redis://127.0.0.1:{_unused_loopback_port()}/0", socket_timeout_s=1.0)
    started = time.monotonic()
    with pytest.raises(NonceStoreUnavailable):
        store.claim("k", 60)
    assert time.monotonic() - started < 5
    store.close()
