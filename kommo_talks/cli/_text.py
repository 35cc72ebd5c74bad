"""Text from outside (Kommo's answers, input files) made safe to show on a terminal.

Two rules hold for every such string the command line prints:

- it is never read as Rich markup (``[/]`` is shown as is): :func:`plain`
  gives a ``rich.text.Text``, which Rich prints as it is;
- control characters cannot reach the terminal: :func:`printable` shows
  them as visible escapes (``\\x1b``), so a server cannot move the cursor,
  retitle the window, ring the bell or reorder what is shown.

:func:`json_line` does the same for ``--json`` output without changing the
data: the characters are written as JSON ``\\u`` escapes.
"""

from __future__ import annotations

from typing import Any

import orjson
from rich.text import Text

__all__ = ["json_line", "plain", "printable", "printable_lines"]

# C0 controls, DEL and C1 controls (Unicode category Cc): ESC starts terminal
# sequences, CR rewrites a line, BEL rings, U+009B is a one-character CSI.
_CONTROLS = (*range(0x20), *range(0x7F, 0xA0))
# Characters that reorder or break the text around them when shown: the bidi
# controls ("Trojan Source") and the Unicode line and paragraph separators.
_LAYOUT = (0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x2028, 0x2029)

_SHORT = {ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r"}
_ESCAPES: dict[int, str] = {
    **{code: f"\\x{code:02x}" for code in _CONTROLS},
    **_SHORT,
    **{code: f"\\u{code:04x}" for code in _LAYOUT},
}
# orjson escapes C0 controls itself; the rest must be escaped in its output.
# They can only occur inside JSON strings there, so a \u escape keeps the value.
_JSON_ESCAPES: dict[int, str] = {code: f"\\u{code:04x}" for code in (*range(0x7F, 0xA0), *_LAYOUT)}


def printable(text: str) -> str:
    """``text`` with every control character shown as a visible escape.

    C0 and C1 controls and DEL become ``\\xNN`` (``\\t``, ``\\n`` and ``\\r``
    for those three), bidi controls and line/paragraph separators ``\\uNNNN``.
    Everything else, backslashes included, is kept as it is.
    """
    return text.translate(_ESCAPES)


def printable_lines(text: str) -> str:
    """:func:`printable` line by line: the line breaks of multi-line text (a traceback) stay."""
    return "\n".join(printable(line) for line in text.split("\n"))


def plain(text: str, style: str = "") -> Text:
    """``text`` as Rich text that is shown literally: no markup, controls escaped."""
    return Text(printable(text), style=style)


def json_line(value: Any) -> str:
    """``value`` as one line of JSON (with ``\\n``), with no raw control character in it.

    The same JSON as ``orjson.dumps`` (it reads back to an equal value), except
    that DEL, C1 controls, bidi controls and line separators are ``\\u`` escapes.
    """
    return orjson.dumps(value).decode().translate(_JSON_ESCAPES) + "\n"
