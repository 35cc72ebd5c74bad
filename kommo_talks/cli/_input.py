"""Reading talk IDs from arguments and from a file or stdin, all of it before anything is sent."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import IO

__all__ = ["MAX_TALK_ID", "InputError", "collect_ids", "parse_talk_id", "read_ids", "source_name"]

MAX_TALK_ID = 2**63 - 1
"""The largest ID accepted (Kommo's IDs are 64-bit integers)."""

_MAX_DIGITS = len(str(MAX_TALK_ID))


class InputError(Exception):
    """A talk ID that is not one; the message names where it was (argument or line)."""


def parse_talk_id(text: str, where: str) -> int:
    """Parse one talk ID (ASCII digits, surrounding blanks ignored), or raise InputError.

    The ID must be in 1..``MAX_TALK_ID``; however long the text, the message
    quotes at most its first 40 characters.
    """
    value = text.strip()
    shown = repr(value if len(value) <= 40 else value[:40] + "...")
    digits = value.lstrip("0")
    if not (value.isascii() and value.isdigit()) or not digits:
        raise InputError(f"{where}: {shown} is not a talk ID (expected a positive integer)")
    # Count the digits before converting: int() refuses more than 4,300 of them.
    if len(digits) > _MAX_DIGITS or int(digits) > MAX_TALK_ID:
        raise InputError(f"{where}: {shown} is too large for a talk ID (at most {MAX_TALK_ID})")
    return int(digits)


def read_ids(lines: Iterable[str], source: str) -> list[int]:
    """The talk IDs of ``lines``, one per line, numbered from 1 in messages.

    Blank lines and lines whose first non-blank character is ``#`` are
    skipped (they still count in the numbering).

    Raises:
        InputError: the first bad line, named ``"<source>, line <n>"``.
    """
    ids: list[int] = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if number == 1:
            text = text.removeprefix("\ufeff").strip()  # the BOM of a file saved by Excel
        if not text or text.startswith("#"):
            continue
        ids.append(parse_talk_id(text, f"{source}, line {number}"))
    return ids


def source_name(stream: IO[str]) -> str:
    """How messages name an input: ``stdin``, or the file's name."""
    return "stdin" if stream.name in ("<stdin>", "-") else str(stream.name)


def collect_ids(arguments: Sequence[str], stream: IO[str] | None) -> list[int]:
    """Every distinct talk ID of ``arguments`` then ``stream``, in first-appearance order.

    ``stream`` is read to its end here, so that nothing is sent before the
    whole input is known to be valid (and a pipe from ``kommo-talks list``
    has finished before the closes start).

    Raises:
        InputError: a bad argument (``"argument <n>"``) or line, or input that
            is not UTF-8 text.
    """
    ids = [parse_talk_id(text, f"argument {n}") for n, text in enumerate(arguments, start=1)]
    if stream is not None:
        source = source_name(stream)
        try:
            ids.extend(read_ids(stream, source))
        except UnicodeDecodeError:
            raise InputError(f"{source}: not UTF-8 text") from None
    return list(dict.fromkeys(ids))
