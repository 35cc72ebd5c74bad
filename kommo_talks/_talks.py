"""The talk operations over a pipeline, shared by the client and the batch."""

from __future__ import annotations

from typing import Final

import orjson

from ._ids import check_talk_id
from ._pipeline import Pipeline, SendGate, decode
from .models import Talk
from .sansio import Kind

__all__ = ["close_talk", "get_talk"]

# Without force, no force_close at all: the reference says Kommo's NPS bot is
# launched only when none is supplied, so the SDK leaves Kommo's default alone.
_CLOSE_BODIES: Final = {True: orjson.dumps({"force_close": True}), False: b"{}"}


def talk_url(pipeline: Pipeline, talk_id: int) -> str:
    """The URL of a talk (raises ValueError for a bad ``talk_id``)."""
    return pipeline.talks_url + str(check_talk_id(talk_id))


def close_request(pipeline: Pipeline, talk_id: int, force: bool) -> tuple[str, bytes]:
    """The URL and body of a talk's close (raises ValueError for a bad argument)."""
    url = talk_url(pipeline, talk_id) + "/close"
    if not isinstance(force, bool):
        raise ValueError(f"force must be a bool, got {force!r}")
    return url, _CLOSE_BODIES[force]


async def get_talk(pipeline: Pipeline, talk_id: int, gate: SendGate | None = None) -> Talk:
    """Fetch one talk (see :meth:`KommoClient.get_talk`)."""
    answer = await pipeline.send("GET", talk_url(pipeline, talk_id), gate=gate)
    return decode(answer, Talk)


async def close_talk(
    pipeline: Pipeline, talk_id: int, force: bool, gate: SendGate | None = None
) -> None:
    """Close one talk (see :meth:`KommoClient.close_talk`)."""
    url, body = close_request(pipeline, talk_id, force)
    await pipeline.send("POST", url, body=body, kind=Kind.CLOSE, gate=gate)
