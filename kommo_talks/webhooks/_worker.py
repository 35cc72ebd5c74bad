"""``WebhookWorker``: run a callback for each queued webhook event, on any number of hosts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Hashable

import attrs

from ..errors import DecodeError
from ..redis import RedisUnavailableError
from ._codec import decode_event, order_key
from ._models import WebhookEvent
from ._plan import Lanes, Step, after_failure, backoff_delay, on_delivery
from ._queue import QueuedEntry, RedisWebhookQueue, error_text

__all__ = ["WebhookWorker"]

logger = logging.getLogger("kommo_talks.webhooks")

_MAX_READ_WAIT = 1.0  # seconds a read blocks in Redis: how fast stop() is noticed


@attrs.define(eq=False)
class _Job:
    entry: QueuedEntry
    event: WebhookEvent
    key: Hashable | None
    lost: bool = False


def _default_consumer() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _check(concurrency: int, claim_idle: float, max_deliveries: int) -> None:
    for name, value in (("concurrency", concurrency), ("max_deliveries", max_deliveries)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if isinstance(claim_idle, bool) or not isinstance(claim_idle, int | float):
        raise ValueError(f"claim_idle must be a number of seconds, got {claim_idle!r}")
    if not math.isfinite(claim_idle) or claim_idle < 0.01:
        raise ValueError(f"claim_idle must be finite and >= 0.01 s, got {claim_idle!r}")


class WebhookWorker:
    """Runs ``await callback(event)`` for the events of a :class:`RedisWebhookQueue`.

    Any number of workers, in any number of processes and hosts, share the
    queue's consumer group; each event goes to one of them. A worker keeps at
    most ``concurrency`` events (running or waiting their turn) and runs the
    events of one talk one at a time, in the order they were appended (across
    workers there is no order). An event is acknowledged (and deleted) only
    after its callback returned: delivery is **at least once**. If a worker
    dies, the events it held are claimed by another worker once they have
    been idle for ``claim_idle`` seconds; a live worker keeps the events it
    holds claimed, so a callback longer than ``claim_idle`` is not run twice.

    A failed callback is logged (``kommo_talks.webhooks``) and its event runs
    again ``claim_idle`` seconds later, on any worker; after ``max_deliveries``
    runs it moves to ``<stream>:dead`` with the last error's text, acknowledged.
    Redis errors are retried with backoff (0.1 s doubling to 5 s). ``run()``
    works until ``stop()``: running callbacks then finish and are acknowledged;
    events not started are left for other workers at once.

    Args:
        queue: the queue to read.
        callback: ``await callback(event)`` for each event.
        consumer: this worker's name in the group (default: host, pid and a
            random suffix). Two live workers must never share one.
        concurrency: events held at once (running or waiting for their talk).
        claim_idle: seconds after which another worker takes over an event
            whose worker stopped renewing it.
        max_deliveries: runs of one event before it is dead-lettered.
        sleep: the function awaited between retries after a Redis error.

    Raises:
        ValueError: a bad ``concurrency``, ``claim_idle`` or ``max_deliveries``.
    """

    def __init__(
        self,
        queue: RedisWebhookQueue,
        callback: Callable[[WebhookEvent], Awaitable[object]],
        *,
        consumer: str | None = None,
        concurrency: int = 10,
        claim_idle: float = 60.0,
        max_deliveries: int = 5,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        _check(concurrency, claim_idle, max_deliveries)
        self.queue = queue
        self.consumer = consumer or _default_consumer()
        """This worker's consumer name in the group."""
        self.concurrency = concurrency
        self.claim_idle = float(claim_idle)
        self.max_deliveries = max_deliveries
        self._callback = callback
        self._sleep = sleep
        self._held: dict[str, _Job] = {}
        self._lanes: Lanes[_Job] = Lanes()
        self._tasks: set[asyncio.Task[None]] = set()
        self._callbacks: set[asyncio.Future[object]] = set()
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._keeper_quit = asyncio.Event()
        self._done: asyncio.Event | None = None
        self._cursor = "0-0"
        self._next_claim = 0.0
        self._failures = 0
        self._group_ready = False

    def __repr__(self) -> str:
        return f"WebhookWorker(consumer={self.consumer!r}, queue={self.queue!r})"

    @property
    def _idle_ms(self) -> int:
        return max(1, round(self.claim_idle * 1000))

    async def run(self) -> None:
        """Read and run events until :meth:`stop`; then finish what is running.

        Cancelling it cancels the running callbacks too: their events are not
        acknowledged, and other workers run them after ``claim_idle``.

        Raises:
            RuntimeError: this worker is already running.
        """
        if self._done is not None and not self._done.is_set():
            raise RuntimeError(f"{self!r} is already running")
        self._done = asyncio.Event()
        self._stopping.clear()
        self._keeper_quit.clear()
        keeper = asyncio.create_task(self._keep_claimed())
        try:
            while not self._stopping.is_set():
                await self._uncancelled(self._redis_step(self._ensure_group_then_fill))
        finally:
            self._stopping.set()
            await self._uncancelled(self._wind_down(keeper))
            self._done.set()

    async def stop(self) -> None:
        """Stop reading, let running callbacks finish and be acknowledged, then return."""
        self._stopping.set()
        self._wake.set()
        if self._done is not None:
            await self._done.wait()

    async def _uncancelled(self, work: Awaitable[None]) -> None:
        """Await ``work`` to its end even if this task is cancelled, then pass the cancel on.

        A Redis command cut short by a cancel can leave redis-py waiting forever
        for an answer: Redis I/O runs in a task of its own that is never
        cancelled. A cancel stops the worker and cancels the running callbacks.
        """
        task = asyncio.ensure_future(work)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            self._stopping.set()
            self._wake.set()
            for callback in self._callbacks:  # their events stay pending, for other workers
                callback.cancel()
            await task
            raise

    async def _wind_down(self, keeper: asyncio.Task[None]) -> None:
        waiting = self._lanes.drain()
        for job in waiting:
            del self._held[job.entry.id]
        if self._tasks:  # renewed by the keeper while they finish
            await asyncio.wait(set(self._tasks))
        self._keeper_quit.set()
        await keeper
        await self._release(waiting)

    async def _release(self, jobs: list[_Job]) -> None:
        """Hand events that never started back to the group: idle at once, delivery undone."""
        if not jobs:
            return
        entries = [(job.entry.id, job.entry.deliveries - 1) for job in jobs]
        try:
            await self.queue._touch(self.consumer, entries, idle_ms=self._idle_ms)
        except RedisUnavailableError as exc:
            logger.warning("could not hand back %d webhook events: %s", len(jobs), exc)

    async def _ensure_group_then_fill(self) -> None:
        if not self._group_ready:
            await self.queue._ensure_group()
            self._group_ready = True
        await self._fill()

    async def _redis_step(self, step: Callable[[], Awaitable[object]]) -> None:
        """Run one step; after a Redis error, log it and wait (backoff, cut short by stop)."""
        try:
            await step()
        except RedisUnavailableError as exc:
            self._failures += 1
            self._group_ready = False  # a lost stream takes its group along: check again
            delay = backoff_delay(self._failures)
            logger.warning("webhook worker: %s; retrying in %.1f s", exc, delay)
            await self._pause(delay)
        else:
            self._failures = 0

    async def _pause(self, delay: float) -> None:
        sleeper = asyncio.ensure_future(self._sleep(delay))
        stopper = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({sleeper, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            stopper.cancel()

    async def _fill(self) -> None:
        """Claim idle events and read new ones, up to the free capacity; start what may run."""
        free = self.concurrency - len(self._held)
        if free <= 0:
            self._wake.clear()
            timeout = max(0.0, self._next_claim - asyncio.get_running_loop().time())
            if timeout == 0.0:
                timeout = self.claim_idle / 2
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass
            return
        entries = await self._claim(free)
        free -= len(entries)
        if free > 0 and not self._stopping.is_set():
            wait = min(_MAX_READ_WAIT, self.claim_idle / 4, self.queue._longest_read_wait())
            entries += await self.queue._read(self.consumer, free, max(1, round(wait * 1000)))
        for entry in entries:
            await self._accept(entry)

    async def _claim(self, count: int) -> list[QueuedEntry]:
        now = asyncio.get_running_loop().time()
        if now < self._next_claim:
            return []
        # Held when the claim was sent: ours already, whatever its reply says (a renewal
        # that came late lets XAUTOCLAIM hand us our own entries, even ones just done).
        held = set(self._held)
        self._cursor, entries = await self.queue._claim(
            self.consumer, self._idle_ms, self._cursor, count
        )
        if self._cursor in ("0-0", "0"):  # a full pass: wait before the next one
            self._next_claim = now + self.claim_idle / 2
        return [entry for entry in entries if entry.id not in held]

    async def _accept(self, entry: QueuedEntry) -> None:
        if entry.id in self._held:
            return
        try:
            event = decode_event(entry.payload)
        except DecodeError as exc:
            await self._bury(entry, error_text(exc))
            return
        if on_delivery(entry.deliveries, self.max_deliveries) is Step.DEAD:
            runs = entry.deliveries - 1
            await self._bury(entry, f"gave up after {runs} runs without an acknowledgement")
            return
        job = _Job(entry, event, order_key(event))
        self._held[entry.id] = job
        ready = self._lanes.add(job.key, job)
        if ready is not None:
            self._start(ready)

    def _start(self, job: _Job) -> None:
        task = asyncio.create_task(self._handle(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, job: _Job) -> None:
        entry = job.entry
        try:
            if not job.lost:
                await self._run_one(job)
        finally:
            self._held.pop(entry.id, None)
            following = self._lanes.finish(job.key)
            if following is not None:
                self._start(following)
            self._wake.set()

    async def _run_one(self, job: _Job) -> None:
        entry = job.entry
        # The callback alone is cancelled when run() is: its handler lives on, never
        # cut short in the middle of a Redis command.
        callback = asyncio.ensure_future(self._callback(job.event))
        self._callbacks.add(callback)
        try:
            await callback
        except asyncio.CancelledError:
            if not callback.cancelled():
                raise
            return  # left pending: another worker runs it after claim_idle
        except Exception as exc:
            logger.exception(
                "webhook callback failed (run %d of %d, entry %s)",
                entry.deliveries,
                self.max_deliveries,
                entry.id,
            )
            if after_failure(entry.deliveries, self.max_deliveries) is Step.DEAD:
                await self._bury(entry, error_text(exc))
            return
        finally:
            self._callbacks.discard(callback)
        await self._until_done(lambda: self.queue._ack(entry.id), "acknowledge")

    async def _bury(self, entry: QueuedEntry, error: str) -> None:
        await self._until_done(lambda: self.queue._bury(entry, error), "dead-letter")

    async def _until_done(self, step: Callable[[], Awaitable[object]], what: str) -> None:
        """Retry a Redis step with backoff until it succeeds (also while stopping)."""
        failures = 0
        while True:
            try:
                await step()
                return
            except RedisUnavailableError as exc:
                failures += 1
                delay = backoff_delay(failures)
                logger.warning("cannot %s webhook event: %s; retry in %.1f s", what, exc, delay)
                await self._sleep(delay)

    async def _keep_claimed(self) -> None:
        """Renew the claim on every held event, well within ``claim_idle``, until told to quit."""
        while not await _set_within(self._keeper_quit, self.claim_idle / 3):
            held = list(self._held.values())
            try:
                # The count as we know it: undoes a bump by our own claim after a late renewal.
                counts = [(job.entry.id, job.entry.deliveries) for job in held]
                kept = await self.queue._touch(self.consumer, counts)
            except RedisUnavailableError as exc:
                logger.warning("cannot renew the claim on held webhook events: %s", exc)
                continue
            lost = [job for job in held if job.entry.id not in kept and job.entry.id in self._held]
            for job in lost:
                job.lost = True  # another worker took it over: do not start it here
            if lost:
                logger.warning("another worker took over %d held webhook events", len(lost))


async def _set_within(event: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``event``; return whether it is set."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()
