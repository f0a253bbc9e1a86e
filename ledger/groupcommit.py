"""Group commit: many callers' journal entries gathered into one database transaction.

Each caller blocks in :meth:`GroupCommitter.submit` (thread-safe) while a committer thread
gathers the queued entries into a batch — up to ``batch_entries_max`` entries, waiting at most
``wait_ms_max`` after the first arrival and no longer than ``linger_ms`` without a new arrival —
and applies it in one transaction: every account it touches locked once (ascending id order,
one statement), each entry validated against the balances left by the entries before it (so
one bad entry fails alone), one balance update per account, one commit (one WAL flush) for all.
A hot account costs one row update per batch instead of one per transfer.

Pipelining (PostgreSQL, ``pipelined=True``, the default). Batches are numbered as they are
gathered; with two committers (``committers=2``) batch N+1 is read and decided while batch N is
still being written, TigerBeetle-fashion:

* the read takes no lock (:meth:`ledger.store.Ledger.speculate`); balances of accounts that
  batches in flight will change are taken from an in-process overlay of their planned balances;
  batches are decided strictly in number order, so each sees the ones before it;
* batches are written strictly in number order, each in one message that locks every account
  it read (once, ascending id order, one statement), checks their balances are the ones it was
  decided on, writes and commits (:meth:`ledger.store.Ledger.commit_speculation`);
* if anything moved underneath — another process or a direct :meth:`Ledger.submit` changed a
  balance a decision read, a pending transfer was resolved, a duplicate key committed first, a
  key a refused entry found free was taken — nothing is
  written, the overlay is forgotten and that batch is applied again on the locking path
  (:meth:`ledger.store.Ledger.submit_prepared`), in its own place in history (the ids and the
  time it was decided with: later batches, decided on it, drew later ones); later batches
  decided on it fail their check the same way when what they read moved. Hooks run in the
  batch's transaction after its write, before COMMIT (and on the locking path again if one
  raises). A batch with a refusal the write could not check (a
  hold's or a reversal target's state, an account or hold not found) takes the locking path
  directly, as does every batch on SQLite (one writer).

Results are therefore those of applying the batches one after another in number order, each
entry after the ones before it: an entry submitted after another one's outcome was returned is
applied after it. The stateless checks and the content hash run in the caller's thread.

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
OVERLAY_ACCOUNTS_MAX = 200_000  #: planned balances kept for batches in flight (then forgotten)


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
    """Gathers concurrent :meth:`submit` calls into batches applied by ``committers`` threads.

    ``batch_entries_max`` (≤ ``BATCH_ENTRIES_MAX``) bounds a batch; ``wait_ms_max`` bounds how
    long a batch waits to fill after its first entry arrives, ``linger_ms`` how long it waits
    for one more entry; ``queue_entries_max`` bounds the queue (submitters block beyond it);
    ``pipelined`` decides batches on top of the ones still being written (see the module);
    ``expire_interval_s`` / ``seal_interval_s`` run the sweeper and the sealer in the background.
    Counters for benchmarks and tests: ``batches``, ``entries``, ``speculated``, ``fallbacks``.
    """

    def __init__(self, ledger: Ledger, *, batch_entries_max: int = 1024, wait_ms_max: float = 3.0,
                 linger_ms: float = 0.3, queue_entries_max: int = 65536, committers: int = 2,
                 pipelined: bool = True,
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
        self._seq = 0             #: batches are numbered as they are gathered
        self._turns = threading.Condition()
        self._planned = [0]       #: next batch allowed to plan
        self._written = [0]       #: next batch allowed to write
        self._overlay: dict[int, tuple] = {}  #: account id -> balances planned by batches in flight
        self._overlay_lock = threading.Lock()
        #: plan each batch on top of the ones still being written (PostgreSQL): see the module
        self.pipelined = pipelined and not getattr(ledger, "_sqlite", True)
        self.speculated = 0       #: batches written as planned without locks
        self.fallbacks = 0        #: batches whose speculation failed and were applied with locks
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
                seq = self._seq
                self._seq += 1
                self._gathering = False
                cond.notify()            # another committer may gather the next batch meanwhile
                self._space.notify_all()
            self._pipeline(batch, seq)

    def _pipeline(self, batch: list[_Request], seq: int) -> None:
        """Plan in turn (on top of the batches still being written), then write in turn."""
        spec = None
        hooks = [r.hook for r in batch] if any(r.hook for r in batch) else None
        self._turn(self._planned, seq)
        try:
            if self.pipelined:
                try:
                    spec = self.ledger.speculate([r.prepared for r in batch], self._overlay, hooks)
                    if spec is not None:
                        planned = spec.planned_balances()
                        with self._overlay_lock:
                            self._overlay.update(planned)
                except Exception:  # the locking path will report it
                    log.debug("speculation failed", exc_info=True)
                    spec = None
        finally:
            self._advance(self._planned, seq)
        self._turn(self._written, seq)
        try:
            if spec is not None:
                try:
                    outcomes = self.ledger.commit_speculation(spec)
                    self.speculated += 1
                except Exception:  # balances moved, a duplicate, …: apply it again with locks
                    log.debug("speculative write refused; applying the batch with locks", exc_info=True)
                    self._forget_overlay()
                    self.fallbacks += 1
                    # in its place in history: later batches were decided on it (and drew later ids)
                    self._commit(batch, placed=spec)
                    return
                self._trim_overlay()
                self._deliver(batch, outcomes)
            else:
                self._commit(batch)
                if self.pipelined:
                    self._forget_overlay()  # written without the overlay's knowledge
        finally:
            self._advance(self._written, seq)

    def _turn(self, counter: list, seq: int) -> None:
        with self._turns:
            while counter[0] != seq:
                self._turns.wait()

    def _advance(self, counter: list, seq: int) -> None:
        with self._turns:
            counter[0] = seq + 1
            self._turns.notify_all()

    def _forget_overlay(self) -> None:
        with self._overlay_lock:
            self._overlay.clear()

    def _trim_overlay(self) -> None:
        # Written batches' balances are in the database now; keep the map bounded.
        if len(self._overlay) > OVERLAY_ACCOUNTS_MAX:
            self._forget_overlay()

    def _commit(self, batch: list[_Request], placed=None) -> None:
        """The locking path (``Ledger.submit_prepared``, ``placed``: the batch's refused
        speculation, whose place in history it keeps); a failing batch is re-run entry by
        entry so that an error reaches only the caller whose entry caused it."""
        try:
            outcomes = self.ledger.submit_prepared([r.prepared for r in batch],
                                                   [r.hook for r in batch] if any(r.hook for r in batch) else None,
                                                   placed=placed)
        except BaseException as exc:  # not a business outcome: isolate the culprit
            if len(batch) == 1:
                batch[0].error = exc
                batch[0].finish()
                return
            log.warning("group commit of %d entries failed (%s); applying them one by one", len(batch), exc)
            for r in batch:
                self._commit([r])
            return
        self._deliver(batch, outcomes)

    def _deliver(self, batch: list[_Request], outcomes: list[EntryOutcome]) -> None:
        self.batches += 1
        self.entries += len(batch)
        for r, o in zip(batch, outcomes):
            r.outcome = o
            if r.callback is None:
                r.done.release()  # wakes the caller
            else:
                r.callback()

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
