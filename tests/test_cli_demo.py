"""``kommo-talks demo``: varied talks, and a summary whose numbers add up as printed."""

from __future__ import annotations

import re

import attrs
from test_cli import cli_env, kommo_talks

from kommo_talks import KommoClient, LongLivedToken
from kommo_talks.testing import FakeKommo
from kommo_talks.testing._talks import example_talk, varied_talk


@attrs.frozen
class Row:
    indent: int
    what: str
    value: int
    note: str


def summary_rows(out: str) -> list[Row]:
    """The rows of the demo's summary table (counts only; the timing row is left out)."""
    table = out.split("Summary", 1)[1].split("Real Kommo", 1)[0]
    rows = []
    for line in table.splitlines():
        match = re.match(r"^( +)(\S.*?) {2,}(\d+)(?: {2,}(.*?))? *$", line)
        if match:
            indent, what, value, note = match.groups()
            rows.append(Row(len(indent), what, int(value), note or ""))
    return rows


def split_by_route(note: str) -> dict[str, int]:
    """``"get 1 + close 6"`` -> ``{"get": 1, "close": 6}``."""
    return {route: int(n) for route, n in re.findall(r"(get|close) (\d+)", note)}


async def run_demo(*args: str) -> tuple[str, dict[str, Row], list[Row]]:
    result = await kommo_talks("demo", *args, env=cli_env())
    assert result.code == 0, result.err
    rows = summary_rows(result.out)
    return result.out, {row.what: row for row in rows}, rows


async def test_every_indented_number_adds_up_to_the_row_above() -> None:
    out, by_name, rows = await run_demo("--talks", "60", "--rate", "300", "--fault-rate", "0.3")

    parents = 0
    for i, row in enumerate(rows):
        children = []
        for below in rows[i + 1 :]:
            if below.indent <= row.indent:
                break
            children.append(below.value)
        if children:
            parents += 1
            assert row.value == sum(children), (row, children)
    assert parents == 3  # closed, requests sent, injected faults

    # Each talk has one outcome; each request is a first attempt or a retry.
    outcomes = ("closed", "already closed", "failed")
    assert sum(by_name[name].value for name in outcomes) == 60
    assert by_name["first attempts"].value == 10 + 60  # the sample, then every talk once
    assert (
        by_name["retries"].value == by_name["injected faults"].value + by_name["429 answers"].value
    )
    # The per-route notes add up too, and match the requests sent per route.
    sent = split_by_route(by_name["requests sent"].note)
    first = split_by_route(by_name["first attempts"].note)
    faults = split_by_route(by_name["injected faults"].note)
    assert sum(sent.values()) == by_name["requests sent"].value
    assert sum(faults.values()) == by_name["injected faults"].value
    for route in ("get", "close"):
        assert sent[route] == first[route] + faults.get(route, 0)
    # The banner's open and closed talks are the summary's.
    banner = re.search(r"\((\d+) open, (\d+) closed already\)", out)
    assert banner, out
    opened, closed = map(int, banner.groups())
    assert by_name["open at the start"].value == opened
    assert by_name["closed at the start"].value + by_name["already closed"].value == closed
    # Faults hit the sample's GETs as the banner says: two of them.
    assert faults["get"] == 2
    assert "the sample's first two GETs" in out


async def test_the_sample_shows_varied_talks() -> None:
    out, _, _ = await run_demo("--talks", "20", "--rate", "300")

    sample = out.split("get_talks", 1)[1].split("close_talks", 1)[0]
    lines = [line.split() for line in sample.splitlines() if re.match(r"^ +\d+ ", line)]
    assert len(lines) == 10
    states = {line[1] for line in lines}
    origins = {line[2] for line in lines}
    entities = {line[3] for line in lines}  # lead, customer or "-"
    contacts = {line[-2] for line in lines}
    assert states == {"open", "closed"}
    assert len(origins) >= 4
    assert entities == {"lead", "customer", "-"}
    assert len(contacts) == 10


def test_varied_talks_are_deterministic_and_differ() -> None:
    talks = [varied_talk(talk_id, seed=1) for talk_id in range(1, 101)]

    assert talks == [varied_talk(talk_id, seed=1) for talk_id in range(1, 101)]
    assert varied_talk(5, seed=2) != varied_talk(5, seed=1)
    assert {t["origin"] for t in talks} >= {"telegram", "whatsapp", "instagram_business"}
    assert {t["entity_type"] for t in talks} == {"lead", "customer", None}
    assert len({t["contact_id"] for t in talks}) > 90
    assert all(t["entity_id"] is None for t in talks if t["entity_type"] is None)
    assert 0 < sum(not t["is_in_work"] for t in talks) < 30


async def test_varied_talks_read_back_through_the_client_as_stored() -> None:
    async with FakeKommo(talks=()) as fake:
        fake.talks[7] = varied_talk(7)
        async with KommoClient(
            fake.url, auth=LongLivedToken(fake.token), rate_limit=None
        ) as client:
            talk = await client.get_talk(7)

    assert talk.origin == varied_talk(7)["origin"]
    assert talk.contact_id == varied_talk(7)["contact_id"]


async def test_the_default_talks_stay_the_documented_example() -> None:
    async with FakeKommo() as fake:
        assert sorted(fake.talks) == list(range(1, 101))
        assert all(fake.talks[i] == example_talk(i) for i in fake.talks)
