"""One model, many users: a fair job queue in front of a single worker thread. No Discord here.

    q = FairQueue(per_user_cap=3, rate_per_minute=6)
    job = q.submit(user_id, fn, label="/imagine")   # QueueRejected (a user-facing message) if refused
    q.position(job)                                  # 1 = next to run, 0 = running, None = finished
    q.cancel(job.id, user_id)                        # only a waiting job, only by its owner
    Worker(q).start()                                # runs fn(job) one at a time, in submission fairness order
    result = await asyncio.wrap_future(job.future)   # JobCancelled if it was cancelled

Fairness: the next job comes from the waiting user who was served least recently (a user never
served yet goes first, earliest job first), so users interleave round-robin however many jobs each
one queued: A1 A2 A3 B1 B2 C1 run as A1 B1 C1 A2 B2 A3.

Limits: `per_user_cap` jobs per user waiting or running at once; `rate_per_minute` submissions per
user in any rolling 60 s; `max_waiting` jobs waiting in total. Every refusal is a `QueueRejected`
whose message says why and what to do.

Batches (`batch_max` > 1): a job released with a `batch_key` (e.g. ("image", steps, guidance)) takes
with it, when it starts, up to `batch_max − 1` other waiting jobs with the same key, chosen in the
order the queue would otherwise serve them; they are *reserved* (`job.mates`), still waiting and
cancellable, and move to running one by one as the worker `claim`s them. A user's jobs never
overtake each other (a matching job behind a non-matching one of the same user stays put), and
jobs with the same `batch_scope` (a chat session) never share a batch. `order()`/`position()`
plan batches the same way, so the positions shown are the order jobs will really start in.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import math
import threading
import time
from typing import Any, Callable

log = logging.getLogger(__name__)


class QueueRejected(Exception):
    """A job that was not queued; `str(e)` is one line for the user."""


class UserCapReached(QueueRejected):
    pass


class RateLimited(QueueRejected):
    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class QueueFull(QueueRejected):
    pass


class QueueClosed(QueueRejected):
    pass


class JobCancelled(Exception):
    """Set on a job's future when it was cancelled before it ran."""


class Job:
    """One unit of model work. `fn(job)` runs on the worker thread; it may call `job.report(...)`."""

    _ids = itertools.count(1)

    def __init__(self, user_id: int, fn: Callable[["Job"], Any], label: str = ""):
        self.id: int = next(Job._ids)
        self.user_id = user_id
        self.fn = fn
        self.label = label
        self.state = "waiting"  # waiting → running → done | failed; waiting → cancelled
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.submitted_at = time.monotonic()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        # progress, written by the worker thread and read by the event loop (plain attribute writes)
        self.progress: tuple[str, int, int] | None = None  # (modality, step, total)
        self.text = ""  # streamed reply text so far
        self.held = False  # reserved place, not to be started yet (see FairQueue.submit)
        self.batch_key: Any = None  # hashable: jobs with equal keys may share one decoder call
        self.batch_scope: Any = None  # jobs with equal scopes (a chat session) never share a batch
        self.mates: list[Job] = []  # set on a batch's first job when it starts: the jobs reserved for it

    def __repr__(self) -> str:
        return f"<Job {self.id} user={self.user_id} {self.label!r} {self.state}>"

    def report(self, modality: str, step: int, total: int) -> None:
        self.progress = (modality, step, total)

    def stream(self, piece: str) -> None:
        self.text += piece

    @property
    def done(self) -> bool:
        return self.future.done()


class FairQueue:
    def __init__(
        self,
        *,
        per_user_cap: int = 3,
        rate_per_minute: int = 6,
        max_waiting: int = 100,
        batch_max: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.per_user_cap = per_user_cap
        self.rate_per_minute = rate_per_minute
        self.max_waiting = max_waiting
        self.batch_max = batch_max  # 1 = no batches
        self.clock = clock
        self._cond = threading.Condition()
        self._waiting: dict[int, collections.deque[Job]] = {}
        self._last_served: dict[int, int] = {}  # user → tick of their last job start
        self._tick = 0
        self._running: list[Job] = []
        self._submits: dict[int, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._paused = False
        self._closed = False
        self._batch_lead: Job | None = None  # the running job whose mates are reserved
        self._reserved: list[Job] = []  # its mates not yet claimed, in claim order
        self._version = 0  # bumped by every change to the line (the planned order is cached per version)
        self._planned: tuple[Any, list[Job]] | None = None

    # ------------------------------------------------------------------ producers (any thread)
    def submit(
        self, user_id: int, fn: Callable[[Job], Any], *, label: str = "", exempt: bool = False, hold: bool = False,
    ) -> Job:
        """Queue `fn` for `user_id`, or raise QueueRejected. `exempt` skips the per-user limits (system jobs).

        `hold`: the job keeps its place in line but does not start until `release(job)` (so a place
        can be reserved before its input is ready, without the worker ever waiting for it).
        """
        with self._cond:
            if self._closed:
                raise QueueClosed("the bot is shutting down; try again in a minute")
            now = self.clock()
            if not exempt:
                pending = self._pending(user_id)
                if pending >= self.per_user_cap:
                    raise UserCapReached(
                        f"you already have {pending} job{'s' * (pending != 1)} queued or running "
                        f"(limit {self.per_user_cap}); wait for one to finish or cancel one"
                    )
                stamps = self._submits[user_id]
                while stamps and now - stamps[0] >= 60:
                    stamps.popleft()
                if len(stamps) >= self.rate_per_minute:
                    wait = max(1, math.ceil(60 - (now - stamps[0])))
                    raise RateLimited(
                        f"slow down: at most {self.rate_per_minute} jobs per minute; try again in {wait} s", wait
                    )
            if self._count_waiting() >= self.max_waiting:
                raise QueueFull(f"the queue is full ({self.max_waiting} jobs waiting); try again later")
            job = Job(user_id, fn, label)
            job.held = hold
            if not exempt:
                self._submits[user_id].append(now)
            self._waiting.setdefault(user_id, collections.deque()).append(job)
            self._version += 1
            self._cond.notify_all()
            log.debug("queued %r (position %s)", job, self._position(job))
            return job

    def release(self, job: Job, *, batch_key: Any = None, batch_scope: Any = None) -> None:
        """Let a job submitted with `hold=True` start when its turn comes. `batch_key`/`batch_scope`:
        see the module doc (None: the job never shares a batch)."""
        with self._cond:
            job.held = False
            job.batch_key = batch_key
            job.batch_scope = batch_scope
            self._version += 1
            self._cond.notify_all()

    def cancel(self, job_id: int, user_id: int | None = None) -> bool:
        """Remove a waiting job (of `user_id`, when given). False if it is running, finished or not theirs."""
        with self._cond:
            for uid, jobs in self._waiting.items():
                for job in jobs:
                    if job.id == job_id:
                        if user_id is not None and uid != user_id:
                            return False
                        jobs.remove(job)
                        if not jobs:
                            del self._waiting[uid]
                        if job in self._reserved:  # out of the batch it was reserved for
                            self._reserved.remove(job)
                        job.state = "cancelled"
                        job.finished_at = time.monotonic()
                        job.future.set_exception(JobCancelled(f"job {job_id} was cancelled"))
                        self._version += 1
                        self._cond.notify_all()
                        return True
            return False

    def position(self, job: Job) -> int | None:
        """1-based place among waiting jobs in run order; 0 while running; None once finished."""
        with self._cond:
            return self._position(job)

    def order(self) -> list[Job]:
        """The waiting jobs in the order they will run (if nothing else is submitted)."""
        with self._cond:
            return self._order()

    def pending(self, user_id: int) -> int:
        with self._cond:
            return self._pending(user_id)

    def batched(self, job: Job) -> bool:
        """Whether a waiting job is reserved for the batch now running (it starts next)."""
        with self._cond:
            return job in self._reserved

    def waiting_count(self) -> int:
        with self._cond:
            return self._count_waiting()

    def pause(self) -> None:
        """Stop handing out jobs (the running one finishes); submissions still queue."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def close(self) -> None:
        """Refuse new jobs, cancel the waiting ones, and let the worker exit after the running one."""
        with self._cond:
            self._closed = True
            for jobs in self._waiting.values():
                for job in jobs:
                    job.state = "cancelled"
                    job.future.set_exception(JobCancelled("the bot is shutting down"))
            self._waiting.clear()
            self._reserved.clear()
            self._version += 1
            self._cond.notify_all()

    # ------------------------------------------------------------------ consumer (the worker thread)
    def next(self, timeout: float | None = None) -> Job | None:
        """Block until a job is due; mark it running and return it. None when closed (or on timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    return None
                ready = {u: j for u, j in self._waiting.items() if not j[0].held}
                if not self._paused and ready:
                    user = self._next_user(ready, self._last_served)
                    jobs = self._waiting[user]
                    job = jobs.popleft()
                    if not jobs:
                        del self._waiting[user]
                    self._tick += 1
                    self._last_served[user] = self._tick
                    job.state = "running"
                    job.started_at = time.monotonic()
                    self._running.append(job)
                    job.mates = self._mates(job, self._waiting, self._last_served)
                    self._batch_lead, self._reserved = (job, list(job.mates)) if job.mates else (None, [])
                    self._version += 1
                    self._cond.notify_all()
                    return job
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def claim(self, job: Job) -> bool:
        """Start a job reserved for the running batch (`lead.mates`): True and it is running, or
        False when it was cancelled meanwhile (or the queue is paused or closed)."""
        with self._cond:
            if self._closed or self._paused or job not in self._reserved or job.state != "waiting":
                return False
            self._reserved.remove(job)
            self._take(job)
            job.state = "running"
            job.started_at = time.monotonic()
            self._running.append(job)
            self._version += 1
            self._cond.notify_all()
            return True

    def fail(self, job: Job, error: Exception) -> None:
        """Settle a running job that will not be run (its runner broke): `error` on its future."""
        job.state = "failed"
        job.finished_at = time.monotonic()
        if not job.future.done():
            job.future.set_exception(error)
        with self._cond:
            if job in self._running:
                self._running.remove(job)
            self._cond.notify_all()

    def end_batch(self, lead: Job) -> None:
        """The batch of `lead` is complete: its unclaimed mates go back to the ordinary order."""
        with self._cond:
            if self._batch_lead is lead:
                self._batch_lead, self._reserved = None, []
                self._version += 1
                self._cond.notify_all()

    def run_job(self, job: Job, step: Callable[[], Any] | None = None) -> None:
        """Run a job taken with `next()` (or claimed); its outcome goes to `job.future` (never
        raised here). `step`: run this instead of `job.fn(job)` (a batch runs a job's last step)."""
        try:
            result = job.fn(job) if step is None else step()
        except BaseException as e:  # noqa: BLE001 - the worker must survive anything a job does
            job.state = "failed"
            if not isinstance(e, Exception):
                log.error("job %s raised %s", job.id, type(e).__name__)
            job.future.set_exception(e if isinstance(e, Exception) else RuntimeError(repr(e)))
        else:
            job.state = "done"
            job.future.set_result(result)
        finally:
            job.finished_at = time.monotonic()
            with self._cond:
                if job in self._running:
                    self._running.remove(job)
                self._cond.notify_all()

    # ------------------------------------------------------------------ internals (lock held)
    @staticmethod
    def _next_user(waiting: dict[int, collections.deque[Job]], last_served: dict[int, int]) -> int:
        return min(waiting, key=lambda u: (last_served.get(u, 0), waiting[u][0].id))

    def _take(self, job: Job) -> None:
        """Move a waiting job out of the line, as served now (for `claim`)."""
        jobs = self._waiting[job.user_id]
        jobs.remove(job)
        if not jobs:
            del self._waiting[job.user_id]
        self._tick += 1
        self._last_served[job.user_id] = self._tick

    def _mates(self, lead: Job, waiting: dict[int, collections.deque[Job]], served: dict[int, int]) -> list[Job]:
        """The waiting jobs `lead` would take into its batch (not removed): those with its batch key,
        in the order the queue would serve them, up to batch_max − 1; a user's jobs only from the
        front of their line (no overtaking their own earlier jobs), one per batch scope."""
        key = lead.batch_key
        if key is None or self.batch_max <= 1:
            return []
        left = sum(1 for jobs in waiting.values() for j in jobs if j.batch_key == key and not j.held)
        if not left:
            return []
        waiting = {u: collections.deque(j) for u, j in waiting.items()}
        served = dict(served)
        tick = max(served.values(), default=0)
        scopes = {lead.batch_scope} - {None}
        blocked: set[int] = set()  # users whose next job cannot join: their later ones may not either
        out: list[Job] = []
        while waiting and left and len(out) < self.batch_max - 1:
            user = self._next_user(waiting, served)
            job = waiting[user].popleft()
            if not waiting[user]:
                del waiting[user]
            tick += 1
            served[user] = tick
            fits = job.batch_key == key and not job.held
            left -= fits
            if fits and user not in blocked and (job.batch_scope is None or job.batch_scope not in scopes):
                out.append(job)
                scopes.add(job.batch_scope)
            else:
                blocked.add(user)
        return out

    def _order(self) -> list[Job]:
        """Waiting jobs in start order: the running batch's reserved mates, then as `next()` would
        hand them out (each batch's first job followed by its mates). Cached until the line changes."""
        key = (self._version, self.batch_max)
        if self._planned is None or self._planned[0] != key:
            self._planned = (key, self._plan())
        return list(self._planned[1])

    def _plan(self) -> list[Job]:
        waiting = {u: collections.deque(j) for u, j in self._waiting.items()}
        served = dict(self._last_served)
        tick = self._tick
        out = []

        def take(job: Job) -> None:
            nonlocal tick
            jobs = waiting[job.user_id]
            jobs.remove(job)
            if not jobs:
                del waiting[job.user_id]
            tick += 1
            served[job.user_id] = tick
            out.append(job)

        for job in self._reserved:
            take(job)
        while waiting:
            lead = waiting[self._next_user(waiting, served)][0]
            take(lead)
            for job in self._mates(lead, waiting, served):
                take(job)
        return out

    def _position(self, job: Job) -> int | None:
        if job.state == "running":
            return 0
        if job.state != "waiting":
            return None
        for i, j in enumerate(self._order(), 1):
            if j is job:
                return i
        return None

    def _pending(self, user_id: int) -> int:
        return len(self._waiting.get(user_id, ())) + sum(j.user_id == user_id for j in self._running)

    def _count_waiting(self) -> int:
        return sum(len(j) for j in self._waiting.values())


class Worker(threading.Thread):
    """The single thread that runs every job (the model is not safe for concurrent use).

    `batch_runner(lead, mates)`: runs a batch (see bots.discord.batch); it must settle the future of
    `lead` and of every mate it claims. Without one, a batch's first job runs alone and its mates go
    back to the ordinary order.
    """

    def __init__(self, queue: FairQueue, name: str = "nextgpt-worker",
                 batch_runner: Callable[[Job, list[Job]], None] | None = None):
        super().__init__(name=name, daemon=True)
        self.queue = queue
        self.batch_runner = batch_runner

    def run(self) -> None:
        while True:
            job = self.queue.next()
            if job is None:
                return
            if job.mates and self.batch_runner is not None:
                try:
                    self.batch_runner(job, list(job.mates))
                except BaseException:  # noqa: BLE001 - a bug in the runner must not stop the worker
                    log.exception("batch of job %s failed", job.id)
                    for j in [job, *job.mates]:
                        if j.state == "running" and not j.future.done():
                            self.queue.fail(j, RuntimeError("the batch this job was in failed"))
                finally:
                    self.queue.end_batch(job)
            else:
                self.queue.run_job(job)
                self.queue.end_batch(job)
