"""Talk IDs from arguments and input files: 1..2**63-1, however long the text.

``int()`` refuses text of more than 4,300 digits with a ValueError: an ID is
checked by its digits first, so such a line is a bad input line (named, exit
2) like any other, never a traceback.
"""

from __future__ import annotations

import io

import pytest
from test_cli import cli_env, kommo_talks

from kommo_talks.cli._input import MAX_TALK_ID, InputError, collect_ids, parse_talk_id
from kommo_talks.testing import FakeKommo


@pytest.mark.parametrize(
    ("text", "talk_id"),
    [
        ("1", 1),
        (" 117 ", 117),
        (str(MAX_TALK_ID), MAX_TALK_ID),
        ("0" * 30 + "5", 5),
        ("0" * 5000 + "42", 42),
    ],
)
def test_parse_talk_id_accepts_every_id_kommo_can_hold(text: str, talk_id: int) -> None:
    assert parse_talk_id(text, "line 1") == talk_id


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (str(MAX_TALK_ID + 1), "too large"),
        ("9" * 20, "too large"),
        ("1" * 4301, "too large"),  # beyond int()'s 4,300 digits
        ("7" * 1_000_000, "too large"),
        ("0" * 5000, "not a talk ID"),
        ("-" + "1" * 5000, "not a talk ID"),
        ("1e5000", "not a talk ID"),
        ("\x1b[2J", "not a talk ID"),
    ],
)
def test_parse_talk_id_refuses_with_a_short_message(text: str, problem: str) -> None:
    with pytest.raises(InputError) as caught:
        parse_talk_id(text, "stdin, line 3")

    message = str(caught.value)
    assert message.startswith("stdin, line 3: ")
    assert problem in message
    assert len(message) < 160
    assert "\x1b" not in message


def test_a_huge_id_line_is_named_by_its_number() -> None:
    lines = io.StringIO("5\n# comment\n" + "9" * 5000 + "\n6\n", newline=None)
    lines.name = "ids.txt"

    with pytest.raises(InputError, match=r"^ids\.txt, line 3: '9{40}\.\.\.' is too large"):
        collect_ids([], lines)


HUGE = "9" * 5000


async def test_close_names_a_huge_id_line_and_sends_nothing(fake: FakeKommo) -> None:
    result = await kommo_talks(
        "close", "--from", "-", "--force", env=cli_env(fake), stdin=f"5\n{HUGE}\n".encode()
    )

    assert result.code == 2
    assert "Traceback" not in result.err
    assert result.err.startswith("error: stdin, line 2: ")
    assert "too large for a talk ID" in result.err
    assert len(result.err) < 300
    assert fake.stats.requests == 0


@pytest.mark.parametrize("command", [["close", "5", HUGE], ["get", HUGE]])
async def test_a_huge_id_argument_is_a_usage_error(fake: FakeKommo, command: list[str]) -> None:
    result = await kommo_talks(*command, env=cli_env(fake))

    assert result.code == 2
    assert "Traceback" not in result.err
    assert "too large for a talk ID" in result.err
    assert len(result.err) < 300
    assert fake.stats.requests == 0
