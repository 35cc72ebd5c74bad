"""Kommo's IDs: the one rule for a talk ID (a leaf module: no imports from the package)."""

from __future__ import annotations

from typing import Final

__all__ = ["MAX_ID", "check_talk_id"]

MAX_ID: Final = 2**63 - 1
"""The largest ID accepted: Kommo's IDs are signed 64-bit integers."""


def check_talk_id(talk_id: object) -> int:
    """Return ``talk_id`` if it is an ``int`` (not a ``bool``) in 1..MAX_ID, else ValueError."""
    if type(talk_id) is not int or not 0 < talk_id <= MAX_ID:
        raise ValueError(f"talk_id must be a positive int up to 2**63-1, got {talk_id!r}")
    return talk_id
