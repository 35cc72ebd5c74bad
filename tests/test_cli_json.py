"""``--json`` output is what docs/cli.md shows, read from the page itself."""

from __future__ import annotations

import re
from typing import Any

import orjson
from test_cli import ROOT, cli_env, kommo_talks

from kommo_talks.testing import FakeKommo, Fault

DOCS_HOST = "https://example.kommo.com"


def documented_json(command: str) -> str:
    """The first ```json block of the docs/cli.md section of ``kommo-talks COMMAND``."""
    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    section = page.split(f"### `kommo-talks {command} ", 1)[1].split("\n### ", 1)[0]
    match = re.search(r"```json\n(.*?)```", section, re.DOTALL)
    assert match, f"no JSON example in the {command} section"
    return match.group(1)


def on_docs_host(fake: FakeKommo, text: str) -> Any:
    return orjson.loads(text.replace(fake.url, DOCS_HOST))


async def test_get_json_is_the_documented_object() -> None:
    async with FakeKommo(talks=[117]) as fake:
        result = await kommo_talks("get", "117", "--json", env=cli_env(fake))

    assert result.code == 0, result.err
    assert len(result.out.splitlines()) == 1
    assert on_docs_host(fake, result.out) == orjson.loads(documented_json("get"))


async def test_list_json_is_the_get_object_plus_the_list_status() -> None:
    documented = orjson.loads(documented_json("get"))
    async with FakeKommo(talks=[117, 118]) as fake:
        fake.talks[118]["is_in_work"] = False
        result = await kommo_talks("list", "--json", env=cli_env(fake))

    assert result.code == 0, result.err
    first, second = (on_docs_host(fake, line) for line in result.out.splitlines())
    assert first == {**documented, "status": "in_work"}
    assert second["status"] == "closed"
    assert set(second) == set(first)


async def test_close_json_is_the_documented_records() -> None:
    async with FakeKommo(talks=[117, 118, 120, 121]) as fake:
        fake.talks[118]["is_in_work"] = False
        # 117, 118 and 404 reach the talks; the close of 120 meets a block.
        fake.script("close", Fault(), Fault(), Fault(), Fault.error(403, html=True))
        result = await kommo_talks(
            "close",
            *("117", "118", "404", "120", "121"),
            *("--force", "--json", "--concurrency", "1"),
            env=cli_env(fake),
        )

    assert result.code == 1
    printed = [orjson.loads(line) for line in result.out.splitlines()]
    lines = documented_json("close").splitlines()
    documented = [orjson.loads(line) for line in lines if line.strip()]
    assert printed == documented
