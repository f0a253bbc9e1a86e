"""Single-use stores: remember a key (a request nonce, a QR code) so that it is accepted once.

A store answers one question atomically: "is this the first time I see ``key`` within its time
to live?" (:meth:`NonceStore.claim`). Callers namespace their keys (``sig:...`` for request
nonces, ``qr:...`` for virtual-card codes) so one store can serve several uses.

Failure policy: a store that cannot answer raises (:class:`NonceStoreUnavailable`,
:class:`NonceStoreFull`); it never answers ``True`` for a key it could not record and never forgets
a live key to make room. The API maps these errors to ``503 Service Unavailable``; an unverified
replay is never accepted.

Implementations:

* :class:`InMemoryNonceStore` - one process (the embedded default, tests);
* :class:`RedisNonceStore` - shared by every API worker (production, CI), ``SET key 1 NX EX ttl``.

:func:`make_nonce_store` builds either from a URL.
"""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Callable
from typing import Protocol, runtime_checkable

__all__ = [
    "InMemoryNonceStore",
    "NonceStore",
    "NonceStoreError",
    "NonceStoreFull",
    "NonceStoreUnavailable",
    "RedisNonceStore",
    "make_nonce_store",
]


class NonceStoreError(Exception):
    """Base class: the store could not decide whether a key is new (answer 503, never accept)."""


class NonceStoreUnavailable(NonceStoreError):
    """The backing service (Redis) is unreachable or refused the command, or the store is closed."""


class NonceStoreFull(NonceStoreError):
    """The in-memory store holds ``entries_max`` live keys; it refuses rather than forget one."""


@runtime_checkable
class NonceStore(Protocol):
    """Atomic single-use set with per-key expiry."""

    def claim(self, key: str, ttl_s: int) -> bool:
        """Record ``key`` for ``ttl_s`` seconds.

        Returns ``True`` when the key was not live (first use: the caller may accept), ``False``
        when it was already claimed and has not expired (a replay). Atomic: of many concurrent
        claims of one key exactly one returns ``True``.

        :raises ValueError: ``ttl_s`` is not a positive integer or ``key`` is empty.
        :raises NonceStoreError: the store cannot answer; the caller must refuse the request.
        """
        ...

    def release(self, key: str) -> None:
        """Forget the claim of ``key`` (nothing happens if it is not held): for a use that did
        not take effect — the work the claim guarded failed before it committed anything — so
        that the same request sent again may claim it. Never call it for a use that may have
        taken effect.

        :raises NonceStoreError: the store cannot answer (the claim then stays until it expires).
        """
        ...

    def close(self) -> None:
        """Release resources; later claims raise :class:`NonceStoreUnavailable`."""
        ...


def _check_args(key: str, ttl_s: int) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError("nonce store key must be a non-empty string")
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s <= 0:
        raise ValueError(f"ttl_s must be a positive integer number of seconds, got {ttl_s!r}")


class InMemoryNonceStore:
    """Thread-safe single-use store for one process.

    :param clock: monotonic clock in seconds (inject a fake one in tests).
    :param entries_max: the most live keys held at once.

    Expiry is lazy and incremental: every claim first drops the keys whose time to live has
    passed (a min-heap ordered by expiry makes that O(log n) per dropped key), so memory follows
    the number of live keys. When ``entries_max`` live keys are held, a claim of a *new* key
    raises :class:`NonceStoreFull` instead of evicting a live key: forgetting a live nonce would
    let its request be replayed, while refusing only delays honest terminals (503, retry). A
    claim of a key that is already live still answers ``False`` when full.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, entries_max: int = 1_000_000) -> None:
        if entries_max <= 0:
            raise ValueError("entries_max must be positive")
        self._clock = clock
        self._entries_max = entries_max
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._closed = False

    def _purge(self, now: float) -> None:
        heap, expiry = self._heap, self._expiry
        while heap and heap[0][0] <= now:
            when, key = heapq.heappop(heap)
            # A key re-claimed after it expired has a newer heap record; drop only the current one.
            if expiry.get(key) == when:
                del expiry[key]

    def claim(self, key: str, ttl_s: int) -> bool:
        """See :meth:`NonceStore.claim`; ``ttl_s`` is measured on the injected clock.

        :raises NonceStoreFull: ``entries_max`` live keys are held and ``key`` is new.
        :raises NonceStoreUnavailable: the store was closed.
        """
        _check_args(key, ttl_s)
        with self._lock:
            if self._closed:
                raise NonceStoreUnavailable("nonce store is closed")
            now = self._clock()
            self._purge(now)
            current = self._expiry.get(key)
            if current is not None and current > now:
                return False
            if len(self._expiry) >= self._entries_max:
                raise NonceStoreFull(f"nonce store holds {self._entries_max} live keys")
            when = now + ttl_s
            self._expiry[key] = when
            heapq.heappush(self._heap, (when, key))
            return True

    def release(self, key: str) -> None:
        """See :meth:`NonceStore.release`. Its heap record stays until its expiry, when
        :meth:`_purge` finds it no longer current."""
        with self._lock:
            if self._closed:
                raise NonceStoreUnavailable("nonce store is closed")
            self._expiry.pop(key, None)

    def __len__(self) -> int:
        """Number of keys held (live ones plus any expired ones not yet purged)."""
        with self._lock:
            return len(self._expiry)

    def close(self) -> None:
        """Forget every key; later claims raise :class:`NonceStoreUnavailable`."""
        with self._lock:
            self._closed = True
            self._expiry.clear()
            self._heap.clear()


class RedisNonceStore:
    """Single-use store shared by all workers, in Redis: ``SET {prefix}{key} 1 NX EX {ttl_s}``.

    :param url_or_client: a ``redis://`` / ``rediss://`` / ``unix://`` URL, or a ready
        ``redis.Redis`` client (then the caller owns it and :meth:`close` leaves it open).
    :param prefix: prepended to every key.
    :param socket_timeout_s: connect and command timeout, seconds, for a client built from a URL.

    A client built from a URL does not retry commands: if ``SET NX`` reached the server but its
    reply was lost, a blind retry would see its own key and report a false replay. Any Redis
    error (connection refused, timeout, READONLY replica, OOM) raises
    :class:`NonceStoreUnavailable`, so the API answers 503 instead of accepting a request whose
    nonce it could not record.
    """

    def __init__(self, url_or_client, prefix: str = "cc:nonce:", *, socket_timeout_s: float = 2.0) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._redis_error = redis.exceptions.RedisError
        self.prefix = prefix
        if isinstance(url_or_client, str):
            self._client = redis.Redis.from_url(
                url_or_client,
                socket_timeout=socket_timeout_s,
                socket_connect_timeout=socket_timeout_s,
                retry=Retry(NoBackoff(), 0),
            )
            self._owns_client = True
        else:
            self._client = url_or_client
            self._owns_client = False
        self._closed = False

    @property
    def client(self):
        """The underlying ``redis.Redis`` client (for inspection, e.g. ``TTL`` in tests)."""
        return self._client

    def claim(self, key: str, ttl_s: int) -> bool:
        """See :meth:`NonceStore.claim`; the TTL is kept by the Redis server, in whole seconds.

        :raises NonceStoreUnavailable: Redis is unreachable, timed out or refused the command,
            or the store was closed.
        """
        _check_args(key, ttl_s)
        if self._closed:
            raise NonceStoreUnavailable("nonce store is closed")
        try:
            created = self._client.set(self.prefix + key, b"1", nx=True, ex=ttl_s)
        except self._redis_error as exc:
            raise NonceStoreUnavailable(f"redis nonce store unavailable: {exc}") from exc
        return bool(created)

    def release(self, key: str) -> None:
        """See :meth:`NonceStore.release`: ``DEL``.

        :raises NonceStoreUnavailable: Redis is unreachable, timed out or refused the command,
            or the store was closed.
        """
        if self._closed:
            raise NonceStoreUnavailable("nonce store is closed")
        try:
            self._client.delete(self.prefix + key)
        except self._redis_error as exc:
            raise NonceStoreUnavailable(f"redis nonce store unavailable: {exc}") from exc

    def close(self) -> None:
        """Close the client if this store created it; later claims raise NonceStoreUnavailable."""
        self._closed = True
        if self._owns_client:
            try:
                self._client.close()
            except self._redis_error:  # closing a broken connection is not an error worth raising
                pass


def make_nonce_store(url: str | None) -> NonceStore:
    """Build a store from configuration.

    ``None`` or ``"memory://"`` -> :class:`InMemoryNonceStore` (one process only);
    ``"redis://..."``, ``"rediss://..."`` or ``"unix://..."`` -> :class:`RedisNonceStore`.

    :raises ValueError: any other scheme.
    """
    if url is None or url == "memory://":
        return InMemoryNonceStore()
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in {"redis", "rediss", "unix"}:
        return RedisNonceStore(url)
    raise ValueError(f"unsupported nonce store URL {url!r}: use memory:// or redis://")
