"""Group commit: many callers' journal entries gathered into one database transaction.

Each caller blocks in :meth:`GroupCommitter.submit` (thread-safe) while a committer thread
gathers the queued entries into a batch — up to ``batch_entries_max`` entries, waiting at most
``wait_ms_max`` after the first arrival and no longer than ``linger_ms`` without a new arrival —
and applies it with :meth:`ledger.store.Ledger.submit_prepared`: one transaction, every touched
account locked once, each entry validated against the locked balances as left by the entries
before it (so one bad entry fails alone), one balance update per account per batch, and one
commit (one WAL flush) for all of them. A hot account therefore costs one row update per batch
instead of one per transfer.

Results are those of submitting the entries one after another in some order (batches are
serializable: each locks its accounts before it reads them; an entry submitted after another
one's outcome was returned is applied after it). With ``committers`` > 1 (default 2) one
committer gathers and plans the next batch while the previous one is in the database; two
batches that share an account simply queue on its row lock. The stateless checks and the
content hash run in the caller's thread before queueing.

If a batch fails with an error that is not a business outcome (a hook raised, the database is
unreachable after the retries), its entries are re-run one by one so that the error reaches
only the caller whose entry caused it.

From asyncio: ``await committer.submit_async(entry)`` (no thread is blocked), or call
:meth:`submit` through ``anyio.to_thread.run_sync`` / a sync FastAPI endpoint.

Optional maintenance in a separate thread: the expiry sweeper (``expire_interval_s``) and the
hash-chain sealer (``seal_interval_s``), both off the commit path.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable

from ledger.machine import prepare
from ledger.model import EntryOutcome, EntrySpec
from ledger.store import BATCH_ENTRIES_MAX, EntryHook, Ledger

log = logging.getLogger(__name__)

_allocate_lock = threading.Lock


class CommitterClosedError(RuntimeError):
    """The group committer was closed; no new entries are accepted."""


class _Request:
    __slots__ = ("prepared", "hook", "outcome", "error", "done", "callback")

    def __init__(self, prepared, hook, callback=None) -> None:
        self.prepared = prepared
        self.hook = hook
        self.outcome: EntryOutcome | None = None
        self.error: BaseException | None = None
        self.callback: Callable[[], None] | None = callback
        self.done = None
        if callback is None:
            self.done = _allocate_lock()
            self.done.acquire()

    def finish(self) -> None:
        if self.callback is not None:
            self.callback()
        else:
            self.done.release()


class GroupCommitter:
    """Gathers concurrent :meth:`submit` calls into batches applied by one committer thread.

    ``batch_entries_max`` (≤ ``BATCH_ENTRIES_MAX``) bounds a batch; ``wait_ms_max`` bounds how
    long a batch waits to fill after its first entry arrives, ``linger_ms`` how long it waits
    for one more entry; ``queue_entries_max`` bounds the queue (submitters block beyond it).
    """

    def __init__(self, ledger: Ledger, *, batch_entries_max: int = 1024, wait_ms_max: float = 3.0,
                 linger_ms: float = 0.3, queue_entries_max: int = 65536, committers: int = 2,
                 expire_interval_s: float | None = None, seal_interval_s: float | None = None) -> None:
        assert 1 <= batch_entries_max <= BATCH_ENTRIES_MAX and 1 <= committers <= 8
        assert 0 <= linger_ms <= wait_ms_max and queue_entries_max >= batch_entries_max
        self.ledger = ledger
        self.batch_entries_max = batch_entries_max
        self.wait_ms_max = wait_ms_max
        self.linger_ms = linger_ms
        self.queue_entries_max = queue_entries_max
        self._queue: collections.deque[_Request] = collections.deque()
        lock = threading.Lock()
        self._cond = threading.Condition(lock)   # the committer waits for entries
        self._space = threading.Condition(lock)  # submitters wait for room in the queue
        self._idle = True         #: no committer is gathering: the next arrival must wake one
        self._gathering = False   #: one committer at a time gathers a batch
        self._closed = False
        self.batches = 0          #: batches committed (for benchmarks and tests)
        self.entries = 0          #: entries submitted through batches
        self._threads = [threading.Thread(target=self._run, name=f"ledger-group-commit-{i}", daemon=True)
                         for i in range(committers)]
        for thread in self._threads:
            thread.start()
        self._stop_maintenance = threading.Event()
        self._maintenance = None
        if expire_interval_s or seal_interval_s:
            self._maintenance = threading.Thread(target=self._maintain, args=(expire_interval_s, seal_interval_s),
                                                 name="ledger-maintenance", daemon=True)
            self._maintenance.start()

    # ------------------------------------------------------------------ callers
    def submit(self, entry: EntrySpec, hook: EntryHook | None = None, *,
               timeout_s: float | None = None) -> EntryOutcome:
        """Submit one journal entry and wait for its outcome (same contract as
        :meth:`Ledger.submit`, including ``hook`` running in the batch's transaction).

        Raises :class:`CommitterClosedError` after :meth:`close`, ``TimeoutError`` if no
        outcome arrives within ``timeout_s`` (the entry may still be applied later: retry with
        the same key to learn its fate), and whatever database error affected this entry.
        """
        prepared = prepare(entry)
        if prepared.failure is not None:
            return prepared.failure
        req = _Request(prepared, hook)
        self._enqueue(req)
        if not req.done.acquire(timeout=-1 if timeout_s is None else timeout_s):
            raise TimeoutError(f"no outcome for entry {entry.key!r} within {timeout_s} s")
        if req.error is not None:
            raise req.error
        return req.outcome  # type: ignore[return-value]

    async def submit_async(self, entry: EntrySpec, hook: EntryHook | None = None) -> EntryOutcome:
        """:meth:`submit` for asyncio code: awaits the outcome without blocking a thread."""
        prepared = prepare(entry)
        if prepared.failure is not None:
            return prepared.failure
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def deliver() -> None:
            loop.call_soon_threadsafe(_resolve, future, req)

        req = _Request(prepared, hook, deliver)
        self._enqueue(req)
        return await future

    def _enqueue(self, req: _Request) -> None:
        with self._cond:
            if self._closed:
                raise CommitterClosedError("the group committer is closed")
            while len(self._queue) >= self.queue_entries_max:
                self._space.wait()
                if self._closed:
                    raise CommitterClosedError("the group committer is closed")
            self._queue.append(req)
            if self._idle or len(self._queue) >= self.batch_entries_max:
                self._cond.notify()

    def close(self, timeout_s: float | None = 30.0) -> None:
        """Stop accepting entries, commit everything already queued, stop the threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            self._space.notify_all()
        for thread in self._threads:
            thread.join(timeout_s)
        self._stop_maintenance.set()
        if self._maintenance is not None:
            self._maintenance.join(timeout_s)

    def __enter__(self) -> "GroupCommitter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ committer
    def _run(self) -> None:
        cond, queue = self._cond, self._queue
        batch_max = self.batch_entries_max
        wait_s, linger_s = self.wait_ms_max / 1000, self.linger_ms / 1000
        while True:
            with cond:
                while not queue or self._gathering:
                    if self._closed and not queue:
                        return
                    if not self._gathering:
                        self._idle = True
                    cond.wait()
                self._idle = False
                self._gathering = True
                # Gather: until full, or wait_ms_max after we started, or linger_ms without news.
                if len(queue) < batch_max and linger_s > 0 and not self._closed:
                    deadline = time.monotonic() + wait_s
                    while len(queue) < batch_max:
                        seen = len(queue)
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        cond.wait(min(linger_s, remaining))
                        if len(queue) == seen:
                            break
                n = min(len(queue), batch_max)
                batch = [queue.popleft() for _ in range(n)]
                self._gathering = False
                cond.notify()            # another committer may gather the next batch meanwhile
                self._space.notify_all()
            self._commit(batch)

    def _commit(self, batch: list[_Request]) -> None:
        try:
            outcomes = self.ledger.submit_prepared([r.prepared for r in batch],
                                                   [r.hook for r in batch] if any(r.hook for r in batch) else None)
        except BaseException as exc:  # not a business outcome: isolate the culprit
            if len(batch) == 1:
                batch[0].error = exc
                batch[0].finish()
                return
            log.warning("group commit of %d entries failed (%s); applying them one by one", len(batch), exc)
            for r in batch:
                self._commit([r])
            return
        self.batches += 1
        self.entries += len(batch)
        for r, o in zip(batch, outcomes):
            r.outcome = o
            r.finish()

    # ------------------------------------------------------------------ maintenance
    def _maintain(self, expire_interval_s: float | None, seal_interval_s: float | None) -> None:
        next_expire = time.monotonic() + (expire_interval_s or 0)
        next_seal = time.monotonic() + (seal_interval_s or 0)
        while not self._stop_maintenance.is_set():
            now = time.monotonic()
            try:
                if expire_interval_s and now >= next_expire:
                    self.ledger.expire_pending()
                    next_expire = now + expire_interval_s
                if seal_interval_s and now >= next_seal:
                    self.ledger.seal()
                    next_seal = now + seal_interval_s
            except Exception:  # keep maintaining; the next round retries
                log.exception("ledger maintenance failed")
            waits = [t - time.monotonic() for t, on in ((next_expire, expire_interval_s), (next_seal, seal_interval_s)) if on]
            self._stop_maintenance.wait(max(0.01, min(waits)))


def _resolve(future: asyncio.Future, req: _Request) -> None:
    if future.cancelled():
        return
    if req.error is not None:
        future.set_exception(req.error)
    else:
        future.set_result(req.outcome)
