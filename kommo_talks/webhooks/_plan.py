"""The worker's decisions, apart from I/O: what to do with an entry, in which order to run.

Pure functions and one small in-memory structure (:class:`Lanes`); no Redis,
no event loop, so that each rule is a row in a table test.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Hashable, Sequence
from typing import Any, Generic, TypeVar

import attrs

__all__ = [
    "AutoclaimReply",
    "Lanes",
    "Step",
    "after_failure",
    "backoff_delay",
    "on_delivery",
    "parse_autoclaim",
]

T = TypeVar("T")


class Step(enum.Enum):
    """What a worker does next with an entry."""

    RUN = "run"
    """Run the callback."""
    RETRY_LATER = "retry_later"
    """Leave it pending: a worker claims it again once it is idle for ``claim_idle``."""
    DEAD = "dead"
    """Move it to the dead-letter stream and acknowledge it."""


def on_delivery(deliveries: int, max_deliveries: int) -> Step:
    """An entry delivered to this worker for the ``deliveries``-th time: run it, or give up.

    It is given up (:attr:`Step.DEAD`) once more than ``max_deliveries`` runs
    were started without an acknowledgement: the earlier ones failed, or their
    worker died in them (an event that crashes its worker ends here too).
    """
    return Step.RUN if deliveries <= max_deliveries else Step.DEAD


def after_failure(deliveries: int, max_deliveries: int) -> Step:
    """The callback raised on the ``deliveries``-th run: try again later, or give up."""
    return Step.DEAD if deliveries >= max_deliveries else Step.RETRY_LATER


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@attrs.frozen
class AutoclaimReply:
    """``XAUTOCLAIM``'s answer: where to go on, what was claimed, what was gone."""

    next_start: str
    entries: tuple[tuple[str, dict[str, Any]], ...]
    """``(entry id, fields)`` of each claimed entry, fields by their name as text."""
    deleted: tuple[str, ...]
    """Pending ids whose entry no longer exists in the stream."""


def _fields(raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        return {_text(k): v for k, v in raw.items()}
    flat = list(raw)
    return {_text(flat[i]): flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def parse_autoclaim(reply: Sequence[Any]) -> AutoclaimReply:
    """Read a raw ``XAUTOCLAIM`` reply of Redis 6.2 or 7.x.

    Redis 7.x answers ``[next, entries, deleted ids]``, leaving entries
    deleted while pending out of ``entries`` (and out of the group's pending
    list). Redis 6.2 answers ``[next, entries]`` and shows such an entry as
    ``nil`` in ``entries`` (``[id, nil]`` in some clients): a bare ``nil``
    is skipped (its id is not given), an ``[id, nil]`` counts as deleted.
    The queue acknowledges and deletes in one transaction, so a deleted
    pending entry comes only from outside it.
    """
    if len(reply) not in (2, 3):
        raise ValueError(f"XAUTOCLAIM answered {len(reply)} elements, expected 2 or 3")
    entries: list[tuple[str, dict[str, Any]]] = []
    deleted = [_text(i) for i in reply[2]] if len(reply) == 3 and reply[2] else []
    for item in reply[1] or ():
        if not item:
            continue
        if item[1] is None:
            deleted.append(_text(item[0]))
        else:
            entries.append((_text(item[0]), _fields(item[1])))
    return AutoclaimReply(_text(reply[0]), tuple(entries), tuple(deleted))


class Lanes(Generic[T]):
    """Items waiting to run, one at a time per key, each key's in the order added.

    :meth:`add` returns the item if it may start now (its key is free or
    ``None``); otherwise it waits behind its key's running item.
    :meth:`finish` frees a key and returns the key's next item, if any.
    """

    def __init__(self) -> None:
        self._waiting: dict[Hashable, deque[T]] = {}

    def add(self, key: Hashable | None, item: T) -> T | None:
        """Queue ``item`` under ``key``; return it if it may start now."""
        if key is None:
            return item
        queue = self._waiting.get(key)
        if queue is None:
            self._waiting[key] = deque()
            return item
        queue.append(item)
        return None

    def finish(self, key: Hashable | None) -> T | None:
        """The running item of ``key`` ended: return the next one to start, if any."""
        if key is None:
            return None
        queue = self._waiting.get(key)
        if queue is None:
            return None
        if queue:
            return queue.popleft()
        del self._waiting[key]
        return None

    def drain(self) -> list[T]:
        """Take every item that has not started (for a stop); keys stay busy."""
        items = [item for queue in self._waiting.values() for item in queue]
        for queue in self._waiting.values():
            queue.clear()
        return items


def backoff_delay(failures: int, *, base: float = 0.1, cap: float = 5.0) -> float:
    """Seconds to wait after ``failures`` Redis errors in a row: ``base`` doubling up to ``cap``."""
    if failures < 1:
        return 0.0
    return float(min(cap, base * 2 ** min(failures - 1, 32)))
