"""The pytest plugin (``kommo_fake``, ``kommo_client``) as a user's pytest run meets it.

pytest loads every installed ``pytest11`` plugin, so each run below (a pytest
subprocess in a fresh directory, no conftest) has it loaded through the entry
point of this install, next to pytest-asyncio unless a test turns that off.
Warnings are errors in those runs, and each asserts that none was counted.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kommo_talks import KommoClient
from kommo_talks.testing import FakeKommo

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
ASYNCIO_INI = """
[pytest]
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""
TEST_DEF = re.compile(r"^(?:async )?def test_", flags=re.MULTILINE)
PLAIN_INI = """
[pytest]
filterwarnings = error
"""

USER_TESTS = """
import socket
from urllib.parse import urlsplit

import pytest
from kommo_talks import KommoClient
from kommo_talks.testing import FakeKommo

USED = []


{marker}
async def test_client_works_against_the_fake(kommo_fake, kommo_client):
    assert isinstance(kommo_fake, FakeKommo) and isinstance(kommo_client, KommoClient)
    assert (await kommo_client.get_talk(1)).talk_id == 1
    kommo_fake.script("close", 503, 503, 503, 503)  # fast retries ride through four
    await kommo_client.close_talk(1, force=True)
    assert kommo_fake.closed_talks() == [1]
    USED.append((kommo_fake, kommo_client))


class TestInAClass:
    {marker}
    async def test_each_test_gets_a_fresh_fake(self, kommo_fake, kommo_client):
        assert kommo_fake is not USED[0][0]
        assert kommo_fake.closed_talks() == []
        assert (await kommo_client.get_talk(1)).is_in_work


def test_fake_and_client_are_closed_after_the_test():
    fake, client = USED[0]
    assert client.closed
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", urlsplit(fake.url).port), timeout=5)
"""


def run(pytester: pytest.Pytester, ini: str, *args: str) -> pytest.RunResult:
    pytester.makeini(ini)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=120)


@pytest.mark.parametrize(
    ("mode", "marker"), [("strict", "@pytest.mark.asyncio"), ("auto", "")], ids=["strict", "auto"]
)
def test_fixtures_give_a_started_fake_and_its_client_in_each_asyncio_mode(
    pytester: pytest.Pytester, mode: str, marker: str
) -> None:
    pytester.makepyfile(test_user=USER_TESTS.format(marker=marker))

    result = run(pytester, ASYNCIO_INI, "-o", f"asyncio_mode={mode}")

    result.stdout.fnmatch_lines([f"asyncio: mode=Mode.{mode.upper()}*"])
    result.assert_outcomes(passed=3, warnings=0)


@pytest.mark.parametrize("absent", ["not installed", "disabled"])
def test_without_pytest_asyncio_the_plugin_loads_silently_and_its_fixtures_say_why(
    pytester: pytest.Pytester, absent: str
) -> None:
    if absent == "not installed":  # shadows the real package for this run
        pytester.makepyfile(pytest_asyncio="raise ImportError('no pytest_asyncio here')")
    pytester.makepyfile(
        test_user="""
        def test_unrelated():
            pass

        async def test_uses_kommo_client(kommo_client):
            pass
        """
    )

    result = run(pytester, PLAIN_INI, "-p", "no:asyncio")

    result.assert_outcomes(passed=1, errors=1, warnings=0)
    problem = "not installed" if absent == "not installed" else "installed but not loaded"
    result.stdout.fnmatch_lines(
        [
            "kommo-talks fixtures are async and need the pytest-asyncio plugin "
            f"(this test uses kommo_fake, kommo_client), which is {problem}*"
        ]
    )


def test_plugin_offers_kommo_fake_and_kommo_client_and_nothing_else(
    pytester: pytest.Pytester,
) -> None:
    result = run(pytester, ASYNCIO_INI, "--fixtures")

    assert result.ret == 0
    output = result.stdout.str()
    section = output.split("fixtures defined from kommo_talks.pytest_plugin", 1)[1]
    section = section.split("fixtures defined from", 1)[0]
    assert re.findall(r"^(\w+) -- ", section, flags=re.MULTILINE) == ["kommo_fake", "kommo_client"]


def test_importing_kommo_talks_loads_neither_pytest_nor_the_plugin() -> None:
    code = (
        "import sys, kommo_talks\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('pytest', '_pytest', 'pytest_asyncio') or m == 'kommo_talks.pytest_plugin'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


async def test_plugin_fixtures_work_beside_this_suites_own(
    kommo_fake: FakeKommo, kommo_client: KommoClient, fake: FakeKommo
) -> None:
    await kommo_client.close_talk(1, force=True)

    assert kommo_fake is not fake
    assert kommo_fake.closed_talks() == [1]
    assert fake.closed_talks() == []


def doc_samples() -> dict[str, str]:
    """Every Python block of the docs that defines a test, by a module name saying where it is."""
    samples = {}
    for page in sorted((ROOT / "docs").rglob("*.md")):
        blocks = re.findall(r"^```python\n(.*?)^```", page.read_text("utf-8"), re.S | re.M)
        for number, block in enumerate(blocks, 1):
            if TEST_DEF.search(block):
                where = re.sub(r"\W", "_", str(page.relative_to(ROOT / "docs")))
                samples[f"test_sample_{where}_{number}"] = block
    return samples


def test_doc_test_samples_run_as_printed_under_default_pytest_asyncio_settings(
    pytester: pytest.Pytester,
) -> None:
    samples = doc_samples()
    pages = {name.rsplit("_md_", 1)[0] for name in samples}
    assert pages >= {f"test_sample_guides_{p}" for p in ("testing", "oauth", "bots")}
    for example in (ROOT / "examples").glob("*.py"):  # the bots guide's sample imports its bot
        shutil.copy(example, pytester.path)
    pytester.makepyfile(**samples)

    result = run(pytester, ASYNCIO_INI)  # asyncio_mode left at its default, strict

    result.stdout.fnmatch_lines(["asyncio: mode=Mode.STRICT*"])
    tests = sum(len(TEST_DEF.findall(sample)) for sample in samples.values())
    result.assert_outcomes(passed=tests, warnings=0)
