"""The command line facing hostile text: Kommo's strings are shown literally, never as markup.

A server (or a proxy in front of it) controls error titles and details and
every string field of a talk; an input file may hold anything. None of it may
be read as Rich markup, reach the terminal as a control sequence, or crash
the command with a traceback.
"""

from __future__ import annotations

import io
import unicodedata
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import orjson
import pytest
from aiohttp import web
from loopback import answering_everything, serving
from rich.console import Console
from test_cli import cli_env, kommo_talks

from kommo_talks.cli._output import BatchReport, reason, render_summary, talk_table
from kommo_talks.cli._text import json_line, plain, printable, printable_lines
from kommo_talks.errors import APIError, ForbiddenError
from kommo_talks.models import CloseOutcome, CloseStatus, Talk
from kommo_talks.testing import FakeKommo

# Markup that crashes Rich ("[/]" closes nothing), a window-title sequence ended
# by BEL, a screen clear by a C1 CSI, a carriage return and a bidi override.
HOSTILE = "[/] [bold]x[/bold] :smile: \x1b]0;pwned\x07 \x9b2J \rover \u202eevil"
HOSTILE_SHOWN = "[/] [bold]x[/bold] :smile: \\x1b]0;pwned\\x07 \\x9b2J \\rover \\u202eevil"
# In one-line reasons, where whitespace (CR included) is one space.
HOSTILE_REASON = "[/] [bold]x[/bold] :smile: \\x1b]0;pwned\\x07 \\x9b2J over \\u202eevil"


BIDI_CONTROLS = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def raw_controls(text: str) -> list[str]:
    """The characters of ``text`` that a terminal acts on or that reorder it (not newlines)."""
    return [
        c
        for c in text
        if c != "\n" and (unicodedata.category(c) in ("Cc", "Zl", "Zp") or c in BIDI_CONTROLS)
    ]


def rendered(renderable: object) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None, legacy_windows=False)
    console.print(renderable)
    output: str = console.file.getvalue()  # type: ignore[attr-defined]
    return output


# -- the helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("talk 117 closed", "talk 117 closed"),
        ("\x1b[31mred", "\\x1b[31mred"),
        ("bell\x07", "bell\\x07"),
        ("a\rb", "a\\rb"),
        ("line\nbreak\ttab", "line\\nbreak\\ttab"),
        ("\x00\x08\x7f", "\\x00\\x08\\x7f"),
        ("\x9b2J \x85 \x9d", "\\x9b2J \\x85 \\x9d"),
        ("\u202eevil\u2066 \u200f", "\\u202eevil\\u2066 \\u200f"),
        ("a\u2028b", "a\\u2028b"),
        ("[/] [bold]x[/]", "[/] [bold]x[/]"),
        ("Привет, 世界 🙂 👩‍💻", "Привет, 世界 🙂 👩‍💻"),
        ("C:\\path\\x1b", "C:\\path\\x1b"),
    ],
)
def test_printable_shows_control_characters_as_escapes(text: str, shown: str) -> None:
    assert printable(text) == shown
    assert raw_controls(printable(text)) == []


def test_printable_lines_keeps_line_breaks_only() -> None:
    assert printable_lines("Traceback:\n  \x1b[2J\r\n") == "Traceback:\n  \\x1b[2J\\r\n"


def test_plain_text_is_shown_literally_never_as_markup() -> None:
    output = rendered(plain(HOSTILE))

    assert HOSTILE_SHOWN in output
    assert raw_controls(output) == []


@pytest.mark.parametrize(
    "value",
    [
        {"origin": HOSTILE, "n": 1},
        {"every_control": "".join(map(chr, [*range(0x20), *range(0x7F, 0xA0)]))},
        ["\u2028", "\u2029", "\u061c", "\u200e"],
        "plain",
    ],
)
def test_json_line_reads_back_equal_with_no_raw_control_character(value: object) -> None:
    line = json_line(value)

    assert line.endswith("\n")
    assert raw_controls(line[:-1]) == []
    assert orjson.loads(line) == value


# -- server text in the close summary, and in a talk ----------------------------------------


def _failed(error: APIError) -> BatchReport:
    outcomes = {
        1: CloseOutcome(1, CloseStatus.CLOSED),
        2: CloseOutcome(2, CloseStatus.FAILED, error),
    }
    return BatchReport([1, 2, 3], outcomes, stop_error=error)


@pytest.mark.parametrize("field", ["title", "detail"])
def test_the_summary_shows_a_hostile_error_literally(field: str) -> None:
    error = APIError(400, problem={field: HOSTILE}, **{field: HOSTILE})

    console = Console(file=io.StringIO(), width=300, color_system=None)
    render_summary(console, _failed(error))
    output = console.file.getvalue()  # type: ignore[attr-defined]

    assert output.count(HOSTILE_REASON) == 2  # the failure's reason, and why 3 was not attempted
    assert raw_controls(output) == []


def test_a_reason_is_one_line_of_printable_text() -> None:
    error = ForbiddenError(403, title="line\r\nnext\x1b[K", problem={"title": "x"})

    assert reason(error) == "403 line next\\x1b[K"


def test_a_talk_is_shown_literally() -> None:
    talk = Talk(
        talk_id=1,
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
        updated_at=datetime(2026, 1, 1, tzinfo=UTC),
        rate=0,
        contact_id=2,
        chat_id=HOSTILE,
        entity_id=3,
        entity_type=HOSTILE,
        is_in_work=True,
        is_read=False,
        origin=HOSTILE,
        missed_at=None,
        account_id=4,
    )

    output = rendered(talk_table(talk))

    assert output.count(HOSTILE_SHOWN) == 3
    assert raw_controls(output) == []


# -- end to end: the commands against a hostile server ----------------------------------------


@pytest.fixture
async def hostile_url() -> AsyncIterator[str]:
    """A server that answers every request with a 404 whose title and detail are hostile.

    (A 404 fails one talk only, so ``close`` goes on to the others and prints its summary.)
    """

    async def answer(request: web.Request) -> web.Response:
        body = {"title": HOSTILE, "detail": HOSTILE, "status": 404}
        return web.json_response(body, status=404, content_type="application/problem+json")

    async with serving(answering_everything(answer)) as url:
        yield url


async def test_close_prints_a_hostile_error_title_as_plain_text(hostile_url: str) -> None:
    env = cli_env(KOMMO_BASE_URL=hostile_url, KOMMO_TOKEN="token")

    result = await kommo_talks("close", "1", "2", "--force", env=env)

    assert result.code == 1
    assert "Traceback" not in result.err
    assert HOSTILE_REASON in result.out
    assert raw_controls(result.out + result.err) == []


async def test_close_json_stays_valid_json_with_hostile_errors(hostile_url: str) -> None:
    env = cli_env(KOMMO_BASE_URL=hostile_url, KOMMO_TOKEN="token")

    result = await kommo_talks("close", "1", "2", "--force", "--json", env=env)

    assert result.code == 1
    records = [orjson.loads(line) for line in result.out.splitlines()]
    assert [r["status"] for r in records] == ["failed", "failed"]
    assert HOSTILE_REASON in records[0]["error"]
    assert raw_controls(result.out) == []


async def test_get_error_line_escapes_a_hostile_title(hostile_url: str) -> None:
    env = cli_env(KOMMO_BASE_URL=hostile_url, KOMMO_TOKEN="token")

    result = await kommo_talks("get", "5", env=env)

    assert result.code == 1
    assert result.err.startswith("error: talk 5: 404 [/] [bold]x[/bold]")
    assert "\\x1b]0;pwned\\x07" in result.err
    assert raw_controls(result.err) == []


@pytest.mark.parametrize("as_json", [False, True])
async def test_get_shows_hostile_talk_fields_without_their_controls(
    fake: FakeKommo, as_json: bool
) -> None:
    fake.talks[5].update(origin=HOSTILE, chat_id=HOSTILE)

    result = await kommo_talks("get", "5", *(["--json"] if as_json else []), env=cli_env(fake))

    assert result.code == 0, result.err
    assert raw_controls(result.out) == []
    if as_json:
        talk = orjson.loads(result.out)
        assert talk["origin"] == talk["chat_id"] == HOSTILE
    else:
        assert result.out.count(HOSTILE_SHOWN) == 2


async def test_list_json_escapes_hostile_fields(fake: FakeKommo) -> None:
    fake.talks[3]["origin"] = HOSTILE

    result = await kommo_talks("list", "--json", env=cli_env(fake))

    assert result.code == 0, result.err
    talks = [orjson.loads(line) for line in result.out.splitlines()]
    assert talks[2]["origin"] == HOSTILE
    assert raw_controls(result.out) == []


async def test_verbose_log_lines_escape_a_hostile_next_link(fake: FakeKommo) -> None:
    talk = fake.payload(1)

    async def answer(request: web.Request) -> web.Response:
        if request.query.get("page") == "2":
            return web.Response(status=204)
        # Same origin, so followed; its path, logged by --verbose, is the server's.
        href = f"{request.url.origin()}/api/v4/talks%1b]0;pwned%07?page=2"
        page = {"_embedded": {"talks": [talk]}, "_links": {"next": {"href": href}}}
        return web.json_response(page, content_type="application/hal+json")

    async with serving(answering_everything(answer)) as url:
        env = cli_env(KOMMO_BASE_URL=url, KOMMO_TOKEN="token")
        result = await kommo_talks("--verbose", "list", env=env)

    assert result.code == 0, result.err
    assert result.out == "1\n"
    assert "/api/v4/talks\\x1b]0;pwned\\x07" in result.err
    assert raw_controls(result.err) == []
