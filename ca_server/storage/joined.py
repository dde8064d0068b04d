"""Group commit: the write jobs of concurrent callers run in one transaction, each in a savepoint.

On PostgreSQL every write transaction takes the audit head's row lock first and holds it through its
commit, whose WAL flush waits for the disk: the deployment commits one transaction at a time, so
renewals queue behind each other's disk flushes (bench/RESULTS.md). Here the jobs that arrived
while a batch was committing are run together in the next one: one lock, one audit head update, one
commit (one WAL flush) for all of them. The chain stays one linear chain, written in the order the
jobs ran.

Each job runs in its own savepoint: a job that fails (its own error, or a statement the database
refused) is rolled back to where it began and gets its error, the others go on. A caller returns
only once the batch holding its job has committed; when the commit (or a rollback to a savepoint)
fails, every job of the batch gets that error — nothing of it was stored. No job waits for others to
arrive: a batch is whatever queued while the previous one ran (at most ``MAX_BATCH``).

The jobs run one after another on the batch's connection, so their round trips add up: a job's
statements whose results it does not read (its savepoint, inserts and updates) are sent without
waiting (the store's transaction pipelines them: ``SqlStore._joined_write``), and the job waits
once, at its end, for all of them (``settle``), so an error is still the job's own. What the jobs
will read (``ahead``: for a renewal, its cluster) the batch reads for all of them first, in one go
with the transaction's locks (``JoinableTx.read_ahead``): a renewal in a batch waits once, not six
times as it began. Each wait is the database's round trip
(network latency, for a PostgreSQL on another host), and then the interpreter lock, which a busy
event loop holds: during a 1,000-agent fleet event on two cores the batch thread spent most of a
wait for PostgreSQL's answer waiting for that lock, while holding the audit head's row lock every
other replica's batch waits for (bench/RESULTS.md).

So a batch is first tried with its jobs' writes deferred (``open_write(True)``): every job reads
only what the batch read ahead and its writes are kept in the transaction, not sent; they go at
the end, a few statements for the whole batch, and are settled before the COMMIT is sent. A job
runs without a single wait, so the batch thread gives the interpreter lock up once per batch, not
four times per job (each wait gives it up, and getting it back from a busy event loop took up to the
switch interval: a renewal held the batch thread, and the audit head's lock, for 1.7 ms; bench/
RESULTS.md). When a job needs anything else (a read that was not read ahead, a statement that
cannot wait) or the deferred writes are refused, the transaction raises ``Replay`` before
anything is committed: the batch is rolled back and run again as described above, each job's
statements sent and settled in turn, so that an error is again one job's own.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager
from typing import Any, Generic, Protocol, TypeVar

T = TypeVar("T")

# jobs per transaction: each savepoint that writes takes a subtransaction id, and PostgreSQL caches
# at most 64 of them per backend (PGPROC_MAX_CACHED_SUBXIDS, src/include/storage/proc.h); past that
# the backend's subxid cache overflows and other sessions' snapshots must consult pg_subtrans
# (GetSnapshotData, src/backend/storage/ipc/procarray.c)
MAX_BATCH = 32


class Replay(Exception):
    """A batch tried with deferred writes must be run again with each job's writes settled in turn
    (raised by the transaction before anything of the batch is committed)."""


class JoinableTx(Protocol):
    """What the joiner needs of a write transaction."""

    def savepoint(self) -> Any:
        """Mark where the next job begins; returns the state ``rollback_to`` restores."""
        ...

    def rollback_to(self, mark: Any) -> None: ...

    def read_ahead(self, keys: Collection[str]) -> None:
        """Read, in one go, what the batch's jobs said they will read (their ``ahead`` keys), and
        take the transaction's locks in the same go. Called once per batch, first, with no keys
        when no job gave one."""
        ...

    def settle(self) -> None:
        """Wait for every statement sent; raises the first one's error (the job that sent it failed)."""
        ...


class _Job(Generic[T]):
    __slots__ = ("ahead", "done", "error", "fn", "result")

    def __init__(self, fn: Callable[[Any], T], ahead: str | None) -> None:
        self.fn = fn
        self.ahead = ahead
        self.done: Future[T] = Future()
        self.result: T | None = None
        self.error: BaseException | None = None

    def settle(self) -> None:
        """Hand the outcome to whoever waits for it (the batch committed or failed); a future its
        waiter cancelled takes none (the job ran all the same, as a thread's would have)."""
        if self.done.cancelled():
            return
        if self.error is not None:
            self.done.set_exception(self.error)
        else:
            self.done.set_result(self.result)  # type: ignore[arg-type]  # set, as error is not


class Joiner:
    """Runs write jobs in shared transactions, from one thread per process (started on first use)."""

    def __init__(
        self,
        open_write: Callable[[bool], AbstractContextManager[JoinableTx]],
        translate: Callable[[Exception], Exception],
        *,
        max_batch: int = MAX_BATCH,
    ) -> None:
        """``open_write(deferred)``: a write transaction whose locks ``read_ahead`` takes (its deferred
        writes made and committed when its context ends: the audit head row written once, the
        revision bumped once); with ``deferred``, the jobs' own writes are deferred too and the
        transaction raises ``Replay`` when they cannot be; ``translate``: the store's translation of
        a database error raised by a job or by the batch's transaction (other errors pass through
        it unchanged)."""
        self._open_write = open_write
        self._translate = translate
        self._max = max_batch
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._cv = threading.Condition()
        self._queue: deque[_Job[Any]] = deque()
        self._thread: threading.Thread | None = None
        self.batches = 0  # transactions run by this process (committed or not)
        self.jobs = 0  # jobs run in them
        self.replays = 0  # batches run again with each job's writes settled in turn

    def run(self, fn: Callable[[Any], T], *, ahead: str | None = None) -> T:
        """``fn(tx)``'s result once the transaction it ran in has committed; its error, or the
        batch's, otherwise. ``ahead``: what ``fn`` will read, read for the whole batch at once
        before its jobs run (``JoinableTx.read_ahead``)."""
        return self.submit(fn, ahead=ahead).result()

    def submit(self, fn: Callable[[Any], T], *, ahead: str | None = None) -> Future[T]:
        """``run`` without waiting: the future is done once the transaction ``fn`` ran in has
        committed (its result) or failed (the error ``run`` raises). Its callbacks run on the
        batch thread; a caller that awaits it holds no thread meanwhile (``asyncio.wrap_future``)."""
        if self._pid != os.getpid():  # a forked worker: the parent's thread does not exist here
            self._reset()
        job: _Job[T] = _Job(fn, ahead)
        with self._cv:
            self._queue.append(job)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="meshbridge-group-commit", daemon=True)
                self._thread.start()
            self._cv.notify()
        return job.done

    def _loop(self) -> None:
        while True:
            self._run_batch(list(self._next_batch()))

    def _next_batch(self) -> Iterator[_Job[Any]]:
        with self._cv:
            while not self._queue:
                self._cv.wait()
            for _ in range(min(self._max, len(self._queue))):
                yield self._queue.popleft()

    def _run_batch(self, batch: list[_Job[Any]]) -> None:
        self.batches, self.jobs = self.batches + 1, self.jobs + len(batch)
        try:
            try:
                self._attempt(batch, deferred=True)
            except Replay:
                self.replays += 1
                for job in batch:
                    job.result, job.error = None, None
                self._attempt(batch, deferred=False)
        except BaseException as exc:  # every job not failed already gets the batch's error
            failed = self._translate(exc) if isinstance(exc, Exception) else exc
            for job in batch:
                if job.error is None:
                    job.error, job.result = failed, None
            if not isinstance(exc, Exception):
                raise  # (KeyboardInterrupt, SystemExit) ends this thread: the next run() starts another
        finally:
            for job in batch:
                job.settle()

    def _attempt(self, batch: list[_Job[Any]], *, deferred: bool) -> None:
        with self._open_write(deferred) as tx:
            tx.read_ahead([job.ahead for job in batch if job.ahead is not None])
            for job in batch:
                self._run_job(tx, job)

    def _run_job(self, tx: JoinableTx, job: _Job[Any]) -> None:
        mark = tx.savepoint()
        try:
            result = job.fn(tx)
            tx.settle()  # the job's writes were sent without waiting: their errors are its own
            job.result = result
        except Replay:
            raise
        except Exception as exc:
            job.error = self._translate(exc)
            tx.rollback_to(mark)  # when this fails, the whole batch fails (_run_batch)
