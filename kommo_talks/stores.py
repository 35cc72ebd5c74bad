"""Where ``OAuth2`` keeps its tokens: the :class:`TokenStore` protocol and two stores.

- :class:`MemoryTokenStore` keeps the pair in this process only.
- :class:`FileTokenStore` keeps it in a JSON file (mode 0600), written
  atomically, with a file lock that processes on one host share.

A Redis store lives in :mod:`kommo_talks.redis` (optional extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ._loops import LoopLock
from .errors import TokenStoreError
from .tokens import TokenSet

if TYPE_CHECKING:
    import filelock

__all__ = ["FileTokenStore", "LockingTokenStore", "MemoryTokenStore", "TokenStore"]

# Seconds between two tries of a file lock that another process holds.
# Refreshes are rare (once a day per account), so 50 ms of latency costs nothing.
_LOCK_POLL_INTERVAL = 0.05

MAX_TOKEN_RECORD_BYTES = 1024 * 1024
"""The largest token record a store reads (a real one is a few kilobytes)."""

# Errors of fsync() on a directory that mean "this filesystem cannot do it":
# nothing better is possible there, so the save still counts as done.
_DIR_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})


@runtime_checkable
class TokenStore(Protocol):
    """Where ``OAuth2`` loads and saves its :class:`~kommo_talks.TokenSet`.

    A store may also offer a cross-process lock: see :class:`LockingTokenStore`.
    Its ``refresh_lock()`` returns an async context manager that gives mutual exclusion to every
    holder, in this process and in others that share the store (a file lock
    for :class:`FileTokenStore`, a Redis lock for ``RedisTokenStore``).
    ``OAuth2`` holds it across "load, refresh, save": whoever holds it
    re-loads the store first and skips the refresh if another holder already
    did it. A store without it gets an in-process lock only, so several
    processes sharing such a store may race to use one refresh token.
    """

    async def load(self) -> TokenSet | None:
        """Return the stored pair, or ``None`` if there is none yet.

        Raises:
            TokenStoreError: the store holds something unreadable or corrupt.
        """
        ...

    async def save(self, tokens: TokenSet) -> None:
        """Replace the stored pair with ``tokens``.

        Raises:
            TokenStoreError: the pair could not be stored.
        """
        ...


def parse_token_record(data: bytes | str, corrupt: Callable[[str], Exception]) -> TokenSet:
    """Read a stored token record (:meth:`TokenSet.to_json`'s object as JSON).

    Anything else, however broken (not UTF-8, not JSON, nested too deeply,
    a number of thousands of digits, the wrong shape, a date out of range,
    over ``MAX_TOKEN_RECORD_BYTES``), raises ``corrupt(problem)``, where
    ``problem`` says what is wrong (with a line and column for bad JSON) and
    never quotes the content. The error is raised with no ``__cause__`` or
    ``__context__``: the exceptions of the JSON parser hold the text, tokens
    included (``JSONDecodeError.doc``, ``UnicodeDecodeError.object``).
    """
    document, problem = _json_document(data)
    if not problem:
        try:
            return TokenSet.from_json(document)
        except ValueError as exc:
            problem = str(exc)  # TokenSet.from_json never puts a token in its messages
        except OverflowError:  # a valid timestamp that UTC cannot hold (year 1, +14:00)
            problem = "token record: 'expires_at' is out of range"
    # Raised here, outside every `except`, so that nothing is chained to it.
    raise corrupt(problem)


def _json_document(data: bytes | str) -> tuple[Any, str]:
    """``(the JSON value of data, "")``, or ``(None, what is wrong)`` with nothing of ``data``."""
    if len(data) > MAX_TOKEN_RECORD_BYTES:
        return None, f"larger than {MAX_TOKEN_RECORD_BYTES // 1024} KiB"
    try:
        return json.loads(data), ""
    except json.JSONDecodeError as exc:
        return None, f"not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno})"
    except UnicodeDecodeError as exc:
        return None, f"not valid JSON (not UTF-8 text: byte {exc.start} is wrong)"
    except RecursionError:
        return None, "not a token record (JSON nested too deeply)"
    except ValueError:  # an integer of over 4,300 digits
        return None, "not a token record (a number too long to read)"


@runtime_checkable
class LockingTokenStore(TokenStore, Protocol):
    """A :class:`TokenStore` with a cross-process ``refresh_lock()`` (see :class:`TokenStore`)."""

    def refresh_lock(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """An async context manager giving mutual exclusion to every holder of the store."""
        ...


class MemoryTokenStore:
    """A :class:`TokenStore` that keeps the pair in memory, for one process.

    Good for tests and short scripts: a refreshed pair is lost when the
    process ends, and Kommo rotates refresh tokens, so the pair given here
    stops working after the first refresh unless the caller saves it.
    """

    def __init__(self, tokens: TokenSet | None = None) -> None:
        self._tokens = tokens

    async def load(self) -> TokenSet | None:
        """Return the pair held, or ``None``."""
        return self._tokens

    async def save(self, tokens: TokenSet) -> None:
        """Hold ``tokens`` in place of the previous pair."""
        self._tokens = tokens

    def __repr__(self) -> str:
        state = "empty" if self._tokens is None else "holding a token pair"
        return f"<MemoryTokenStore {state}>"


class FileTokenStore:
    """A :class:`TokenStore` backed by a JSON file, shared safely by processes on one host.

    The file holds :meth:`TokenSet.to_json`'s object. :meth:`save` writes a
    temporary file (mode 0600) in the same folder, flushes and fsyncs it,
    renames it over ``path`` with ``os.replace`` and fsyncs the folder: the
    file is always either the old pair or the new one, never a mix, even
    after a crash. The folder must exist. File I/O runs in a worker thread,
    so the event loop never waits for the disk.

    :meth:`refresh_lock` is a lock on the sibling file ``<path>.lock`` that
    every process using this path respects (see :class:`TokenStore`).

    A corrupt file is never overwritten by a refresh: ``OAuth2`` always
    :meth:`load` s before it refreshes, and :meth:`load` raises
    :class:`~kommo_talks.errors.TokenStoreError`, so nothing is saved.
    :meth:`save` itself always writes; apart from a refresh it is called by
    ``OAuth2.exchange_code``, which is how a user replaces a corrupt or
    revoked pair.

    Args:
        path: the token file.
        lock_timeout: seconds :meth:`refresh_lock` waits for the lock before
            raising ``TokenStoreError``; ``None`` (the default) waits as long
            as it takes.
    """

    def __init__(self, path: str | os.PathLike[str], *, lock_timeout: float | None = None) -> None:
        if lock_timeout is not None and lock_timeout < 0:
            raise ValueError("lock_timeout must be >= 0 or None")
        self.path = Path(path)
        """The token file."""
        self.lock_path = Path(f"{os.fspath(path)}.lock")
        """The file that :meth:`refresh_lock` locks (``<path>.lock``)."""
        self._lock_timeout = lock_timeout
        self._task_lock = LoopLock()  # a store may outlive an asyncio.run()

    def __repr__(self) -> str:
        return f"FileTokenStore({os.fspath(self.path)!r})"

    async def load(self) -> TokenSet | None:
        """Read the pair from the file; ``None`` if the file does not exist.

        Raises:
            TokenStoreError: the file cannot be read (a folder at ``path``,
                no permission, ...) or does not hold a token pair (not JSON,
                wrong shape, over ``MAX_TOKEN_RECORD_BYTES``). The message
                names the file and what is wrong, never its content, and no
                exception chained to it holds the content either; the file is
                left as it is.
        """
        data = await asyncio.to_thread(self._read)
        if data is None:
            return None
        return parse_token_record(data, self._corrupt)

    async def save(self, tokens: TokenSet) -> None:
        """Write ``tokens`` to the file atomically (mode 0600), replacing what it held.

        Always writes, whatever the file held, a corrupt one included (see
        the class docstring). If the task is cancelled meanwhile, the write
        still finishes in its thread: the file then holds the old pair or the
        new one.

        Raises:
            TokenStoreError: the file could not be written. A failure before
                the rename leaves the old file (if any) intact and no temporary
                file behind; a failure to fsync the folder after the rename
                leaves the new pair in place, perhaps not yet durable.
        """
        data = (json.dumps(tokens.to_json(), indent=2) + "\n").encode("utf-8")
        await asyncio.to_thread(self._write, data)

    @contextlib.asynccontextmanager
    async def refresh_lock(self) -> AsyncIterator[None]:
        """Hold the lock that every process using this token file respects.

        Tasks of this process queue on an ``asyncio.Lock`` first, so only one
        of them at a time polls the file lock (``<path>.lock``, via the
        ``filelock`` library, imported on first use). Waiting never blocks the
        event loop. Cancelling a task that waits leaves the lock free; so
        does leaving the block by any exception. Not reentrant: entering it
        again in the task that holds it waits forever.

        Raises:
            TokenStoreError: the lock file cannot be opened, or the lock was
                not obtained within ``lock_timeout`` seconds.
        """
        import filelock  # a refresh is rare: keep `import kommo_talks` light

        task_lock = self._task_lock.get()
        # A fresh FileLock per hold: filelock's locks are reentrant per object,
        # which would let two holders in on one object. Separate objects use
        # separate descriptors, which exclude each other even in one process.
        file_lock = filelock.FileLock(self.lock_path, mode=0o600, thread_local=False)
        loop = asyncio.get_running_loop()
        deadline = None if self._lock_timeout is None else loop.time() + self._lock_timeout
        try:
            # An uncontended asyncio.Lock is taken without yielding, so even
            # lock_timeout=0 gets one try of the file lock.
            async with asyncio.timeout_at(deadline):
                await task_lock.acquire()
        except TimeoutError:
            raise self._lock_timed_out() from None
        try:
            await self._acquire_file_lock(file_lock, filelock.Timeout, deadline)
        except BaseException:
            task_lock.release()
            raise
        try:
            yield
        finally:
            try:
                # Unlocking and closing a local descriptor does not block:
                # no thread hop, which could not be awaited during a cancellation.
                file_lock.release()
            finally:
                task_lock.release()

    async def _acquire_file_lock(
        self,
        file_lock: filelock.BaseFileLock,
        timeout_error: type[Exception],
        deadline: float | None,
    ) -> None:
        def attempt() -> bool:
            try:
                file_lock.acquire(timeout=0)
            except timeout_error:
                return False
            return True

        def release_if_acquired(done: asyncio.Future[bool]) -> None:
            if not done.cancelled() and done.exception() is None and done.result():
                file_lock.release()

        loop = asyncio.get_running_loop()
        while True:
            # One non-blocking try per thread hop, so a cancelled waiter never
            # leaves a thread stuck in a blocking acquire (asyncio.run() would
            # wait for it at exit).
            try_once = loop.run_in_executor(None, attempt)
            try:
                acquired = await asyncio.shield(try_once)
            except asyncio.CancelledError:
                # The try may still succeed in its thread: then give the lock back.
                try_once.add_done_callback(release_if_acquired)
                raise
            except OSError as exc:
                raise TokenStoreError(
                    f"cannot use the refresh lock file {os.fspath(self.lock_path)!r}: "
                    f"{exc.strerror or exc}"
                ) from exc
            if acquired:
                return
            delay = _LOCK_POLL_INTERVAL
            if deadline is not None:
                left = deadline - loop.time()
                if left <= 0:
                    raise self._lock_timed_out()
                delay = min(delay, left)
            await asyncio.sleep(delay)

    def _lock_timed_out(self) -> TokenStoreError:
        return TokenStoreError(
            f"timed out after {self._lock_timeout} s waiting for the refresh lock "
            f"{os.fspath(self.lock_path)!r}: another holder keeps it"
        )

    def _corrupt(self, problem: str) -> TokenStoreError:
        return TokenStoreError(
            f"token file {os.fspath(self.path)!r} is corrupt: {problem}. Fix or remove it, "
            "or authorize again (OAuth2.exchange_code replaces it)"
        )

    def _read(self) -> bytes | None:
        try:
            with open(self.path, "rb") as file:
                # One byte more than the limit tells parse_token_record it is exceeded.
                return file.read(MAX_TOKEN_RECORD_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise TokenStoreError(
                f"cannot read token file {os.fspath(self.path)!r}: {exc.strerror or exc}"
            ) from exc

    def _write(self, data: bytes) -> None:
        import tempfile  # costs ~30 ms cold; only needed when saving

        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            # mkstemp creates the file with mode 0600 from the start.
            fd, temp_path = tempfile.mkstemp(
                dir=folder, prefix=f".{self.path.name}.", suffix=".tmp"
            )
        except OSError as exc:
            raise self._write_error(exc) from exc
        try:
            with os.fdopen(fd, "wb") as file:
                if hasattr(os, "fchmod"):  # POSIX; a umask cannot widen 0600 anyway
                    os.fchmod(file.fileno(), 0o600)
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp_path, self.path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(temp_path)
            if isinstance(exc, OSError):
                raise self._write_error(exc) from exc
            raise
        self._fsync_folder(folder)

    def _fsync_folder(self, folder: str) -> None:
        # Makes the rename itself durable. Windows cannot open a folder this way.
        if os.name == "nt":
            return
        try:
            fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno in _DIR_FSYNC_UNSUPPORTED:
                return
            raise self._write_error(exc) from exc

    def _write_error(self, exc: OSError) -> TokenStoreError:
        return TokenStoreError(
            f"cannot write token file {os.fspath(self.path)!r}: {exc.strerror or exc}"
        )
