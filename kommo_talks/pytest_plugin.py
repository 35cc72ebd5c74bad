"""pytest fixtures for testing code that uses kommo-talks: ``kommo_fake`` and ``kommo_client``.

Installing kommo-talks registers this module as a pytest plugin (a ``pytest11``
entry point), so every test can ask for the fixtures without a conftest::

    import pytest


    @pytest.mark.asyncio  # not needed with asyncio_mode = "auto"
    async def test_close(kommo_fake, kommo_client):
        await kommo_client.close_talk(1, force=True)
        assert kommo_fake.closed_talks() == [1]

- ``kommo_fake``: a started :class:`~kommo_talks.testing.FakeKommo` with its
  defaults (open talks 1-100, no rate limit), closed after the test.
- ``kommo_client``: a :class:`~kommo_talks.KommoClient` of ``kommo_fake`` with
  ``rate_limit=None`` and fast retries (5 attempts, backoff from 1 ms, server
  waits honoured up to 1 s), closed after the test.

Both are async fixtures for pytest-asyncio (declared with
``@pytest_asyncio.fixture``), so they work in its ``strict`` and ``auto`` modes
alike; without pytest-asyncio a test that uses them fails, saying so. pytest
loads the plugin in every run: it emits no warning, and imports neither
pytest-asyncio (unless installed) nor ``kommo_talks.testing`` until a fixture is
used.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import pytest

from kommo_talks import KommoClient, LongLivedToken, RetryPolicy

try:
    import pytest_asyncio
except ImportError:  # a test that uses the fixtures then fails, saying what is missing
    pytest_asyncio = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from kommo_talks.testing import FakeKommo

_FIXTURES = ("kommo_fake", "kommo_client")
_FAST_RETRY = RetryPolicy(max_attempts=5, base_delay=0.001, max_delay=1.0)
_F = TypeVar("_F", bound=Callable[..., Any])


def _async_fixture(func: _F) -> _F:
    """``@pytest_asyncio.fixture`` (strict and auto mode), or a plain fixture without it."""
    if pytest_asyncio is None:
        return cast("_F", pytest.fixture(func))
    return cast("_F", pytest_asyncio.fixture(func))


@_async_fixture
async def kommo_fake() -> AsyncIterator[FakeKommo]:
    """A started ``FakeKommo`` (talks 1-100, no rate limit), closed after the test."""
    from kommo_talks.testing import FakeKommo

    async with FakeKommo() as fake:
        yield fake


@_async_fixture
async def kommo_client(kommo_fake: FakeKommo) -> AsyncIterator[KommoClient]:
    """A ``KommoClient`` of ``kommo_fake``: ``rate_limit=None``, fast retries; closed after."""
    auth = LongLivedToken(kommo_fake.token)
    async with KommoClient(kommo_fake.url, auth=auth, retry=_FAST_RETRY, rate_limit=None) as client:
        yield client


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Fail a test that uses the fixtures, saying why, when pytest-asyncio is not running."""
    used = [name for name in _FIXTURES if name in getattr(item, "fixturenames", ())]
    problem = _asyncio_problem(item.config) if used else ""
    if problem:
        pytest.fail(
            f"kommo-talks fixtures are async and need the pytest-asyncio plugin "
            f"(this test uses {', '.join(used)}), {problem}; then mark async tests with "
            '@pytest.mark.asyncio (or set asyncio_mode = "auto")',
            pytrace=False,
        )


def _asyncio_problem(config: pytest.Config) -> str:
    """Why pytest-asyncio cannot run the fixtures in this run (``""`` when it can)."""
    if pytest_asyncio is None:
        return "which is not installed: `pip install pytest-asyncio`"
    if not config.pluginmanager.is_registered(pytest_asyncio.plugin):
        return "which is installed but not loaded in this run (disabled with `-p no:asyncio`?)"
    return ""
