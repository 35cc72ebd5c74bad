"""One rate limit for every ``kommo-talks`` process of one account on this host.

Each command is a new process with a new client, and a new client's limiter
starts with an empty window, while Kommo's rolling window still holds the
previous command's last requests: three ``close`` runs in a row drew 429s,
and Kommo's 429 asks for a 300 s wait. So the commands keep the window in a
small file per account (in the user's cache folder, see :func:`limit_file`)
and take their turns through a file lock:

- under the lock, a process reads the send times of the last window, and
  either records its own send (a free slot) or learns how long to wait;
- it waits without the lock, then tries again;
- the file holds at most one window's worth of send times (``rate`` of
  them), so it never grows;
- a missing, corrupt or oversized file counts as an empty window (a crash
  mid-write costs at most one window's history, never the command);
- the file is created with mode 0600 and never opened through a symlink; if
  it cannot be used at all (a read-only home, a symlink planted there), the
  process warns once and keeps the limit by itself (the in-process limiter).

Send times are wall-clock seconds (``time.time``), the one clock every
process shares. A time more than a window ahead of now (the clock stepped
back) is dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import re
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path

from .._loops import LoopLock
from ..ratelimit import DEFAULT_MARGIN, SlidingWindowRateLimiter, window_for_rate
from ..urls import normalize_base_url

__all__ = [
    "KOMMO_RATE",
    "SharedWindowRateLimiter",
    "cache_folder",
    "limit_file",
    "parse_send_times",
    "plan_send",
]

logger = logging.getLogger("kommo_talks.cli")

KOMMO_RATE = 7.0
"""Requests per second Kommo admits (the client's default limit)."""

MAX_FILE_BYTES = 64 * 1024
"""A larger limit file is not ours to trust: it counts as empty."""

LOCK_TIMEOUT = 1.0
"""Seconds one try waits for the file lock (a holder keeps it for one read and write)."""

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def cache_folder(environ: Mapping[str, str] = os.environ) -> Path:
    """``$XDG_CACHE_HOME/kommo-talks``, else ``~/.cache/kommo-talks`` (ignoring a relative one)."""
    base = environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return root / "kommo-talks"


def limit_file(base_url: str, folder: Path) -> Path:
    """The limit file of the account at ``base_url``: ``ratelimit-<host>-<hash>.json``.

    The hash is of the normalized base URL (port included), so two spellings
    of one address share a file and two fakes on two ports do not.

    Raises:
        ValueError: ``base_url`` is not a valid account base URL.
    """
    url = normalize_base_url(base_url)
    host = re.sub(r"[^A-Za-z0-9.-]", "_", url.host or "")[:60]
    digest = hashlib.sha256(str(url).encode()).hexdigest()[:16]
    return folder / f"ratelimit-{host}-{digest}.json"


def parse_send_times(data: bytes) -> list[float]:
    """The send times a limit file holds; ``[]`` for anything but a JSON list of numbers.

    Entries that are not finite numbers are dropped one by one.
    """
    if len(data) > MAX_FILE_BYTES:
        return []
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return []
    if not isinstance(value, list):
        return []
    return [
        float(t)
        for t in value
        if isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t)
    ]


def plan_send(
    sent: Iterable[float], now: float, size: int, span: float
) -> tuple[list[float], float]:
    """Decide one send: ``(times to keep, 0.0)`` if a slot is free, else ``([], seconds to wait)``.

    A slot is free when fewer than ``size`` of the ``sent`` times lie in the
    last ``span`` seconds; the times kept then end with ``now`` and hold at
    most ``size`` entries. Times more than ``span`` ahead of ``now`` (the
    clock stepped back) are ignored.
    """
    recent = sorted(t for t in sent if now - span < t <= now + span)
    if len(recent) >= size:
        return [], recent[-size] + span - now
    return [*recent, now][-size:], 0.0


class SharedWindowRateLimiter:
    """A :class:`~kommo_talks.RateLimiter` whose rolling window lives in a file (see the module).

    Args:
        path: the limit file (its folder is created, mode 0700); the lock is
            ``<path>.lock``.
        rate: requests per second (see ``window_for_rate``).
        margin: seconds added to the window, as in ``SlidingWindowRateLimiter``.
        clock: wall-clock seconds shared by the processes (tests pass a fake).
        sleep: the sleep function (tests pass a fake).
        warn: called once with a message if the file cannot be used.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        rate: float = KOMMO_RATE,
        *,
        margin: float = DEFAULT_MARGIN,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        warn: Callable[[str], None] = logger.warning,
    ) -> None:
        self._size, window = window_for_rate(rate)
        self.path = Path(path)
        self.lock_path = Path(f"{os.fspath(path)}.lock")
        self._span = window + margin
        self._rate, self._margin = rate, margin
        self._clock, self._sleep, self._warn = clock, sleep, warn
        self._task_lock = LoopLock()
        self._fallback: SlidingWindowRateLimiter | None = None

    def __repr__(self) -> str:
        return f"SharedWindowRateLimiter({os.fspath(self.path)!r}, rate={self._rate:g})"

    async def acquire(self) -> None:
        """Wait until the shared window has a free slot, then record this send in it."""
        # One task of this process at a time goes to the file: the others queue here.
        async with self._task_lock.get():
            while self._fallback is None:
                try:
                    wait = await asyncio.to_thread(self._take_slot)
                except OSError as exc:
                    self._fall_back(exc)
                    break
                if wait <= 0:
                    return
                await self._sleep(wait)
        assert self._fallback is not None
        await self._fallback.acquire()

    def _fall_back(self, exc: OSError) -> None:
        self._warn(
            f"cannot use the shared rate limit file {os.fspath(self.path)!r} "
            f"({exc.strerror or exc}); this process keeps the limit by itself"
        )
        self._fallback = SlidingWindowRateLimiter(
            self._rate, margin=self._margin, clock=self._clock, sleep=self._sleep
        )

    def _take_slot(self) -> float:
        """Under the file lock: record a send and return 0, or return the seconds to wait."""
        import filelock  # the CLI's commands only; kept out of `import kommo_talks.cli`

        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = filelock.FileLock(self.lock_path, mode=0o600, thread_local=False)
        try:
            lock.acquire(timeout=LOCK_TIMEOUT)
        except filelock.Timeout:
            return 0.01  # held unusually long by another process: try again shortly
        try:
            return self._update_file()
        finally:
            lock.release()

    def _update_file(self) -> float:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o600)
        with os.fdopen(fd, "r+b") as file:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise OSError(f"{os.fspath(self.path)!r} is not a regular file")
            if stat.S_IMODE(mode) & 0o077 and hasattr(os, "fchmod"):
                os.fchmod(fd, 0o600)
            sent = parse_send_times(file.read(MAX_FILE_BYTES + 1))
            kept, wait = plan_send(sent, self._clock(), self._size, self._span)
            if wait > 0:
                return wait
            file.seek(0)
            file.truncate()
            file.write(json.dumps(kept).encode())
            return 0.0
