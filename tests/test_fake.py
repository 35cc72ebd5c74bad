"""FakeKommo's default data, and its helpers for checking what a client sent."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from kommo_talks.testing import FakeKommo, busiest_window


@pytest.mark.parametrize(
    ("times", "window", "busiest"),
    [
        ([], 1.0, 0),
        ([5.0], 1.0, 1),
        ([0.0, 0.5, 0.99, 1.0, 1.5], 1.0, 3),  # a request exactly a window later is not in it
        ([3.0, 0.0, 2.0, 1.0], 1.0, 1),  # unsorted input
        ([0.0, 0.1, 0.2, 0.3], 0.25, 3),
    ],
)
def test_busiest_window_counts_the_fullest_rolling_window(
    times: list[float], window: float, busiest: int
) -> None:
    assert busiest_window(times, window) == busiest


async def test_a_default_talk_is_the_documented_example_with_its_own_id() -> None:
    documented = json.loads((Path(__file__).parent / "data" / "talk_117.json").read_text("utf-8"))
    async with FakeKommo() as fake, aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {fake.token}"}
        async with http.get(f"{fake.url}/api/v4/talks/5", headers=headers) as response:
            served = await response.json()
        async with http.get(f"{fake.url}/api/v4/talks/101", headers=headers) as response:
            beyond = response.status

    expected = json.loads(
        json.dumps(documented)
        .replace("https://example.kommo.ru", fake.url)
        .replace("/api/v4/talks/117", "/api/v4/talks/5")
    )
    expected["talk_id"] = 5
    assert served == expected
    assert beyond == 404


def test_faults_can_be_scripted_only_for_routes_the_fake_serves() -> None:
    fake = FakeKommo()

    with pytest.raises(ValueError, match=r"'contacts'.*\['account', 'close', 'get', 'lead_update'"):
        fake.script("contacts", 503)
    with pytest.raises(ValueError, match="'contacts'"):
        fake.random_faults(0.5, routes=("get", "contacts"))
    fake.script("token", 503)
    fake.script("leads", 503)
    assert fake.faults.pending("token") == fake.faults.pending("leads") == 1


async def test_a_scripted_fault_answers_before_the_token_is_checked() -> None:
    async with FakeKommo() as fake, aiohttp.ClientSession() as http:
        fake.script("get", 503)
        async with http.get(f"{fake.url}/api/v4/talks/1") as response:
            faulted = response.status
        async with http.get(f"{fake.url}/api/v4/talks/1") as response:
            unauthorized = response.status

    assert (faulted, unauthorized) == (503, 401)
    assert fake.stats.by_route["get"] == 2
    assert [r.route for r in fake.requests] == ["get", "get"]
