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


async def get_talk(pipeline: Pipeline, talk_id: int, gate: SendGate | None = None) -> Talk:
    """Fetch one talk (see :meth:`KommoClient.get_talk`)."""
    url = pipeline.talks_url + str(check_talk_id(talk_id))
    answer = await pipeline.send("GET", url, gate=gate)
    return decode(answer, Talk)


async def close_talk(
    pipeline: Pipeline, talk_id: int, force: bool, gate: SendGate | None = None
) -> None:
    """Close one talk (see :meth:`KommoClient.close_talk`)."""
    url = pipeline.talks_url + str(check_talk_id(talk_id)) + "/close"
    if not isinstance(force, bool):
        raise ValueError(f"force must be a bool, got {force!r}")
    await pipeline.send("POST", url, body=_CLOSE_BODIES[force], kind=Kind.CLOSE, gate=gate)
