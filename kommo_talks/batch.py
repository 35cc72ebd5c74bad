"""Batch operations: the fixed pool of workers behind ``close_talks``, ``get_talks``
and ``iter_close_talks``.

A batch reads its IDs lazily: a worker takes the next ID only when it is free
to send it, so memory and live tasks stay O(concurrency) whatever the number
of IDs (plus the set of IDs already seen, and for ``close_talks`` the list of
outcomes it returns).

How a batch ends:

- the input runs out: every distinct ID read has its outcome;
- it *stops* on an IP/account block (a 403 whose body is not JSON), a
  server-given wait longer than the client's ``max_delay``, a
  :class:`CoordinationError` (a shared limiter or token store is down, e.g.
  ``RedisUnavailableError``) or a :class:`ClientClosedError` (the client was
  closed during the batch); see :func:`is_stop_error`. Nothing more is
  read or sent (the client's send gate refuses even retries of requests in
  flight), requests already on the wire finish with their own outcome, IDs
  read but not sent end ``FAILED`` with the stopping error, and IDs never
  read get no outcome;
- an invalid item (not a positive ``int``), an input that raises, or a
  ``progress`` callback that raises: nothing more is read, requests in
  flight finish, then the error is raised;
- cancellation (or closing ``iter_close_talks`` early): requests in flight
  are cancelled and every worker is awaited, so no task is left behind.

:class:`BatchRun` is the engine; the command line uses it directly to learn
how a batch stopped (:attr:`BatchRun.stop_error`, :attr:`BatchRun.unsent`).
"""

from __future__ import annotations

import asyncio
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
)
from typing import Final, Generic, Protocol, TypeVar, cast

from . import _talks
from ._ids import check_talk_id
from ._pipeline import Pipeline
from .errors import (
    ClientClosedError,
    CoordinationError,
    ForbiddenError,
    KommoError,
    RateLimitError,
    ServerError,
    TalkAlreadyClosedError,
    TokenRefreshError,
)
from .models import CloseOutcome, CloseStatus, Talk


class PipelineOwner(Protocol):
    """What owns a pipeline (a ``KommoClient``): the batch sends through it."""

    _pipeline: Pipeline


Sender = Pipeline | PipelineOwner


def _pipeline_of(sender: Sender) -> Pipeline:
    return sender if isinstance(sender, Pipeline) else sender._pipeline


__all__ = [
    "BatchRun",
    "close_run",
    "close_talks",
    "get_run",
    "get_talks",
    "is_stop_error",
    "iter_close_talks",
    "shed_frames",
]

R = TypeVar("R")
E = TypeVar("E", bound=BaseException)

_WORKER_NAME: Final = "kommo-talks batch worker"


def is_stop_error(error: KommoError, max_delay: float) -> bool:
    """True if ``error`` must stop a batch.

    That is an IP/account block (:attr:`ForbiddenError.is_block`, or
    :attr:`TokenRefreshError.is_block` when the token endpoint met it), a
    :class:`RateLimitError` / :class:`ServerError` whose ``retry_after`` is
    longer than ``max_delay`` (sending on through either is how accounts get
    blocked, or stay blocked), a :class:`CoordinationError` (the shared
    limiter or token store is down: every other talk would fail alike), or a
    :class:`ClientClosedError` (the client was closed during the batch).
    """
    if isinstance(error, CoordinationError | ClientClosedError):
        return True
    if isinstance(error, ForbiddenError | TokenRefreshError):
        return error.is_block
    if isinstance(error, RateLimitError | ServerError):
        return error.retry_after is not None and error.retry_after > max_delay
    return False


def shed_frames(error: E) -> E:
    """Return ``error`` without the traceback frames it holds, ready to be kept in a result.

    A traceback keeps every frame it passed through alive, with their locals
    (the whole answer body among them): tens of KB per failed talk. This
    clears ``__traceback__`` on ``error`` and on every exception chained to it
    (``__cause__``, ``__context__``), and drops a ``__context__`` that
    ``raise ... from`` hides anyway. Class, message and attributes stay.
    """
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        exc = pending.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        exc.__traceback__ = None
        if exc.__suppress_context__:
            exc.__context__ = None
        pending.extend(e for e in (exc.__cause__, exc.__context__) if e is not None)
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
    return error


def check_concurrency(concurrency: object) -> int:
    """Return ``concurrency`` if it is an ``int`` >= 1 (not a ``bool``), else raise ValueError."""
    if type(concurrency) is not int or concurrency < 1:
        raise ValueError(f"concurrency must be an int >= 1, got {concurrency!r}")
    return concurrency


class _Stopped(Exception):
    """Raised by a worker's send gate: the batch has stopped, this attempt is not sent."""


class Operation(Protocol[R]):
    """What a batch does to one talk, and how its result reads (internal)."""

    async def __call__(self, talk_id: int, gate: _Gate) -> R:
        """Do it; a :class:`KommoError` becomes part of the result, never raised."""
        ...

    def failed(self, talk_id: int, error: KommoError) -> R:
        """The result of a talk that was not sent because the batch stopped."""
        ...

    def error_of(self, result: R) -> KommoError | None:
        """The error a result carries, if any."""
        ...


class _Close:
    __slots__ = ("_force", "_pipeline")

    def __init__(self, pipeline: Pipeline, force: bool) -> None:
        self._pipeline = pipeline
        self._force = force

    async def __call__(self, talk_id: int, gate: _Gate) -> CloseOutcome:
        try:
            await _talks.close_talk(self._pipeline, talk_id, self._force, gate)
        except TalkAlreadyClosedError:
            return CloseOutcome(talk_id, CloseStatus.ALREADY_CLOSED)
        except KommoError as error:
            return CloseOutcome(talk_id, CloseStatus.FAILED, shed_frames(error))
        return CloseOutcome(talk_id, CloseStatus.CLOSED)

    def failed(self, talk_id: int, error: KommoError) -> CloseOutcome:
        return CloseOutcome(talk_id, CloseStatus.FAILED, error)

    def error_of(self, result: CloseOutcome) -> KommoError | None:
        return result.error


class _Get:
    __slots__ = ("_pipeline",)

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    async def __call__(self, talk_id: int, gate: _Gate) -> Talk | KommoError:
        try:
            return await _talks.get_talk(self._pipeline, talk_id, gate)
        except KommoError as error:
            return shed_frames(error)

    def failed(self, talk_id: int, error: KommoError) -> Talk | KommoError:
        return error

    def error_of(self, result: Talk | KommoError) -> KommoError | None:
        return result if isinstance(result, KommoError) else None


class _Gate:
    """One worker's send gate (a :class:`~kommo_talks._pipeline.SendGate`): refuses once stopped."""

    __slots__ = ("run", "sent")

    def __init__(self, run: BatchRun[object]) -> None:
        self.run = run
        self.sent = False  # the current call has put a request on the wire

    def before_waits(self) -> None:
        if self.run.stop_error is not None:
            raise _Stopped

    def before_send(self) -> None:
        if self.run.stop_error is not None:
            raise _Stopped
        self.sent = True


class BatchRun(Generic[R]):
    """One batch over a stream of talk IDs, run by a fixed pool of worker tasks.

    Build one with :func:`close_run` or :func:`get_run`, then either
    ``await run.collect(progress)`` (results in first-appearance order) or
    ``async for result in run.iterate()`` (completion order, with
    back-pressure). A run runs once.

    Attributes (meaningful once the run has ended):
        stop_error: the error that stopped the batch (a block, a
            server-given wait above ``max_delay``, a
            :class:`CoordinationError` or a :class:`ClientClosedError`; see
            :func:`is_stop_error`), or ``None``.
        unsent: IDs that were read but never sent because the batch had
            stopped (their results carry :attr:`stop_error`), in the order
            they were refused.
        read: how many distinct IDs were read (each has a result).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        ids: Iterable[int] | AsyncIterable[int],
        operation: Operation[R],
        *,
        concurrency: int,
    ) -> None:
        check_concurrency(concurrency)
        if pipeline.closed:
            raise ClientClosedError("this KommoClient is closed")
        self._sync_ids: Iterator[object] | None = None
        self._async_ids: AsyncIterator[object] | None = None
        if isinstance(ids, AsyncIterable):
            self._async_ids = aiter(ids)
        elif isinstance(ids, Iterable):
            self._sync_ids = iter(ids)
        else:
            raise TypeError(f"ids must be an iterable or async iterable, got {type(ids).__name__}")
        self._operation = operation
        self._concurrency = concurrency
        self._max_delay = pipeline.retry.max_delay
        self.stop_error: KommoError | None = None
        self.unsent: list[int] = []
        self.read = 0
        self._position = 0  # items taken from the input, duplicates included
        self._seen: set[int] = set()
        self._fatal: BaseException | None = None
        self._halted = False  # no more reading: input ended, stopped, failed or closed
        self._started = False
        self._live = 0
        self._read_lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None  # a worker inside anext(ids)
        self._reader_interrupted = False
        self._credits: asyncio.Semaphore | None = None
        self._on_read: Callable[[], None] | None = None
        self._emit: Callable[[int, R], None] = _ignore
        self._on_end: Callable[[], None] | None = None

    # -- the two ways to run ------------------------------------------------

    async def collect(self, progress: Callable[[R], object] | None = None) -> list[R]:
        """Run to the end; return one result per distinct ID read, in first-appearance order.

        ``progress`` is called (not awaited) once per result as it completes.

        Raises:
            ValueError: an invalid item, once the requests in flight finished.
            Exception: whatever the input or ``progress`` raised, likewise.
        """
        results: list[R | None] = []
        if progress is None:

            def emit(index: int, result: R) -> None:
                results[index] = result
        else:
            callback = progress

            def emit(index: int, result: R) -> None:
                results[index] = result
                callback(result)

        self._on_read = lambda: results.append(None)
        self._emit = emit
        tasks = self._start()
        try:
            await asyncio.wait(tasks)
        finally:
            await _cancel_and_wait(tasks)
        self._raise_failure(tasks)
        return cast("list[R]", results)

    async def iterate(self) -> AsyncGenerator[R, None]:
        """Yield each result as it completes.

        At most ``concurrency`` IDs are started beyond the results the
        consumer has taken. Closing the generator early (``aclose()``, or
        garbage collection) cancels the requests in flight and sends nothing
        more.

        Raises:
            ValueError: an invalid item, after the results of the requests
                that were in flight.
        """
        queue: asyncio.Queue[R | _End] = asyncio.Queue()
        credits = self._credits = asyncio.Semaphore(self._concurrency)
        self._emit = lambda index, result: queue.put_nowait(result)
        self._on_end = lambda: queue.put_nowait(_END)
        tasks = self._start()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _End):
                    break
                credits.release()
                yield item
        finally:
            self._halt()
            await _cancel_and_wait(tasks)
        self._raise_failure(tasks)

    # -- the workers ----------------------------------------------------------

    def _start(self) -> list[asyncio.Task[None]]:
        if self._started:
            raise RuntimeError("a BatchRun runs only once")
        self._started = True
        self._live = self._concurrency
        return [
            asyncio.create_task(self._work(), name=f"{_WORKER_NAME} {n}")
            for n in range(self._concurrency)
        ]

    async def _work(self) -> None:
        gate = _Gate(cast("BatchRun[object]", self))
        operation = self._operation
        credits = self._credits
        try:
            while not self._halted:
                if credits is not None:
                    await credits.acquire()
                    if self._halted:
                        return
                item = await self._next_id()
                if item is None:
                    return
                index, talk_id = item
                stop = self.stop_error
                if stop is not None:
                    self.unsent.append(talk_id)
                    result = operation.failed(talk_id, stop)
                else:
                    gate.sent = False
                    try:
                        result = await operation(talk_id, gate)
                    except _Stopped:
                        stop = self.stop_error
                        assert stop is not None
                        if not gate.sent:
                            self.unsent.append(talk_id)
                        result = operation.failed(talk_id, stop)
                    error = operation.error_of(result)
                    if (
                        error is not None
                        and self.stop_error is None
                        and is_stop_error(error, self._max_delay)
                    ):
                        self.stop_error = error
                        self._halt()
                self._emit(index, result)
        except Exception as exc:  # a bug, or a progress callback that raised
            self._fail(exc)
        finally:
            self._live -= 1
            if self._live == 0 and self._on_end is not None:
                self._on_end()

    async def _next_id(self) -> tuple[int, int] | None:
        """The next distinct, valid ID and its index; ``None`` when nothing more may be read."""
        if self._async_ids is None:
            return self._take(self._read_sync)
        async with self._read_lock:  # an async iterator cannot be advanced concurrently
            task = asyncio.current_task()
            while not self._halted:
                self._reader = task
                try:
                    raw = await anext(self._async_ids)
                except StopAsyncIteration:
                    self._halt()
                    return None
                except asyncio.CancelledError:
                    # Interrupted by _halt(): the batch stopped while the input was slow.
                    if self._reader_interrupted and task is not None and task.uncancel() == 0:
                        return None
                    raise
                except Exception as exc:
                    self._fail(exc)
                    return None
                finally:
                    self._reader = None
                if self._reader_interrupted and task is not None and task.cancelling():
                    task.uncancel()  # the input swallowed the interruption and gave an item
                item = self._accept(raw)
                if item is not None:
                    return item
            return None

    def _take(self, read: Callable[[], object]) -> tuple[int, int] | None:
        while not self._halted:
            try:
                raw = read()
            except StopIteration:
                self._halt()
                return None
            except Exception as exc:
                self._fail(exc)
                return None
            item = self._accept(raw)
            if item is not None:
                return item
        return None

    def _read_sync(self) -> object:
        assert self._sync_ids is not None
        return next(self._sync_ids)

    def _accept(self, raw: object) -> tuple[int, int] | None:
        """Validate one input item; its (index, ID) if it is new, ``None`` if seen or invalid."""
        position = self._position
        self._position += 1
        try:
            talk_id = check_talk_id(raw)
        except ValueError:
            self._fail(
                ValueError(
                    f"item {position} of ids (counting from 0) is not a talk ID: "
                    f"expected a positive int, got {raw!r}"
                )
            )
            return None
        if talk_id in self._seen:
            return None
        self._seen.add(talk_id)
        index = self.read
        self.read += 1
        if self._on_read is not None:
            self._on_read()
        return index, talk_id

    # -- ending ----------------------------------------------------------------

    def _halt(self) -> None:
        """Read nothing more; wake the workers waiting for a credit so they can leave."""
        if self._halted:
            return
        self._halted = True
        reader = self._reader
        if reader is not None and reader is not asyncio.current_task():
            # A worker waits for the next item of a slow async input: nothing
            # more will be read, so do not wait for it.
            self._reader_interrupted = True
            reader.cancel()
        if self._credits is not None:
            for _ in range(self._concurrency):
                self._credits.release()

    def _fail(self, exc: BaseException) -> None:
        if self._fatal is None:
            self._fatal = exc
        self._halt()

    def _raise_failure(self, tasks: list[asyncio.Task[None]]) -> None:
        for task in tasks:
            if not task.cancelled() and (exc := task.exception()) is not None:
                raise exc
        if self._fatal is not None:
            raise self._fatal


class _End:
    """End of the results (a sentinel type, so the queue stays well typed)."""


_END: Final = _End()


def _ignore(index: int, result: object) -> None:
    return None


async def _cancel_and_wait(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the tasks still running and wait for all of them, even if cancelled meanwhile."""
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    interrupted = False
    while pending:
        try:
            await asyncio.wait(pending)
        except asyncio.CancelledError:
            interrupted = True  # finish the clean-up first; re-raised below
        pending = [task for task in pending if not task.done()]
    if interrupted:
        raise asyncio.CancelledError


# -- the operations of KommoClient ------------------------------------------------


def _check_force(force: object) -> bool:
    if not isinstance(force, bool):
        raise ValueError(f"force must be a bool, got {force!r}")
    return force


def close_run(
    client: Sender,
    ids: Iterable[int] | AsyncIterable[int],
    *,
    force: bool = False,
    concurrency: int = 10,
) -> BatchRun[CloseOutcome]:
    """A :class:`BatchRun` that closes talks (what ``close_talks`` runs).

    Raises:
        ValueError: ``concurrency`` is not an int >= 1, or ``force`` not a bool.
        TypeError: ``ids`` is not iterable.
    """
    check_concurrency(concurrency)
    pipeline = _pipeline_of(client)
    return BatchRun(pipeline, ids, _Close(pipeline, _check_force(force)), concurrency=concurrency)


def get_run(
    client: Sender,
    ids: Iterable[int] | AsyncIterable[int],
    *,
    concurrency: int = 10,
) -> BatchRun[Talk | KommoError]:
    """A :class:`BatchRun` that fetches talks (what ``get_talks`` runs)."""
    pipeline = _pipeline_of(client)
    return BatchRun(pipeline, ids, _Get(pipeline), concurrency=concurrency)


async def close_talks(
    client: Sender,
    ids: Iterable[int] | AsyncIterable[int],
    *,
    force: bool,
    concurrency: int,
    progress: Callable[[CloseOutcome], object] | None,
) -> list[CloseOutcome]:
    """Close many talks; see :meth:`KommoClient.close_talks` and this module's docstring."""
    if progress is not None and not callable(progress):
        raise ValueError(f"progress must be callable or None, got {progress!r}")
    run = close_run(client, ids, force=force, concurrency=concurrency)
    return await run.collect(progress)


def iter_close_talks(
    client: Sender,
    ids: Iterable[int] | AsyncIterable[int],
    *,
    force: bool,
    concurrency: int,
) -> AsyncGenerator[CloseOutcome, None]:
    """Close many talks, yielding outcomes as they complete.

    See :meth:`KommoClient.iter_close_talks` and this module's docstring.

    Arguments are checked at once (before iteration starts); nothing is read
    or sent until the first ``__anext__``.
    """
    return close_run(client, ids, force=force, concurrency=concurrency).iterate()


async def get_talks(
    client: Sender,
    ids: Iterable[int] | AsyncIterable[int],
    *,
    concurrency: int,
) -> list[Talk | KommoError]:
    """Fetch many talks; see :meth:`KommoClient.get_talks` and this module's docstring."""
    return await get_run(client, ids, concurrency=concurrency).collect()
