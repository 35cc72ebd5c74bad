"""KommoAccounts.setup: the install redirect and the disconnect hook, over loopback HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from conftest import FAST_RETRY
from loopback import serving
from test_accounts import CLIENT_ID, REDIRECT, SECRET, make_accounts

from kommo_talks.accounts import KommoAccounts, handle_disconnect, handle_redirect
from kommo_talks.testing import FakeKommoAccount, disconnect_query, signed_disconnect_url

STATE = "state-0123456789abcdef"


@pytest.fixture
async def one() -> AsyncIterator[FakeKommoAccount]:
    async with FakeKommoAccount(account_id=101, subdomain="one") as fake:
        yield fake


@pytest.fixture
async def accounts() -> AsyncIterator[KommoAccounts]:
    async with make_accounts() as kept:
        yield kept


async def serve(accounts: KommoAccounts, **options: object) -> AsyncIterator[str]:
    app = web.Application()
    accounts.setup(app, redirect_path="/installed", disconnect_path="/disconnected", **options)  # type: ignore[arg-type]
    async with serving(app) as url:
        yield url


@pytest.fixture
async def site(accounts: KommoAccounts) -> AsyncIterator[str]:
    async for url in serve(accounts, state=STATE):
        yield url


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get(http: aiohttp.ClientSession, url: str, query: dict[str, str]) -> tuple[int, str]:
    async with http.get(url, params=query, allow_redirects=False) as response:
        return response.status, await response.text()


async def test_the_redirect_installs_the_account_and_says_so(
    accounts: KommoAccounts, one: FakeKommoAccount, site: str, http: aiohttp.ClientSession
) -> None:
    query = one.install_query(CLIENT_ID, SECRET, REDIRECT, state=STATE)

    status, page = await get(http, f"{site}/installed", query)

    assert status == 200
    assert "installed" in page
    assert "one" in page
    assert await accounts.installed() == [101]


async def test_the_redirect_can_send_the_user_on_to_a_success_page(
    accounts: KommoAccounts, one: FakeKommoAccount, http: aiohttp.ClientSession
) -> None:
    async for url in serve(accounts, success_url="https://bot.example/welcome"):
        query = one.install_query(CLIENT_ID, SECRET, REDIRECT)
        async with http.get(f"{url}/installed", params=query, allow_redirects=False) as answer:
            assert answer.status == 303
            assert answer.headers["Location"] == "https://bot.example/welcome"
    assert await accounts.installed() == [101]


@pytest.mark.parametrize("state", ["wrong-state", None])
async def test_a_wrong_or_missing_state_is_forbidden_and_changes_nothing(
    accounts: KommoAccounts,
    one: FakeKommoAccount,
    site: str,
    http: aiohttp.ClientSession,
    state: str | None,
) -> None:
    query = one.install_query(CLIENT_ID, SECRET, REDIRECT, state=state)

    status, text = await get(http, f"{site}/installed", query)

    assert status == 403
    assert "state" in text
    assert await accounts.installed() == []
    assert one.oauth.exchanges == 0  # the code was not even spent


async def test_a_widget_install_needs_no_state(
    accounts: KommoAccounts, one: FakeKommoAccount, site: str, http: aiohttp.ClientSession
) -> None:
    query = one.install_query(CLIENT_ID, SECRET, REDIRECT, from_widget=True)

    status, _ = await get(http, f"{site}/installed", query)

    assert status == 200
    assert await accounts.installed() == [101]


async def test_state_may_be_judged_by_an_async_callable(
    accounts: KommoAccounts, one: FakeKommoAccount, http: aiohttp.ClientSession
) -> None:
    seen: list[str] = []

    async def known(state: str) -> bool:
        seen.append(state)
        return state == "issued-for-this-user"

    async for url in serve(accounts, state=known):
        refused = one.install_query(CLIENT_ID, SECRET, REDIRECT, state="made-up")
        assert (await get(http, f"{url}/installed", refused))[0] == 403
        good = one.install_query(CLIENT_ID, SECRET, REDIRECT, state="issued-for-this-user")
        assert (await get(http, f"{url}/installed", good))[0] == 200
    assert seen == ["made-up", "issued-for-this-user"]


async def test_a_replayed_code_is_a_clear_400_and_changes_nothing(
    accounts: KommoAccounts, one: FakeKommoAccount, site: str, http: aiohttp.ClientSession
) -> None:
    query = one.install_query(CLIENT_ID, SECRET, REDIRECT, state=STATE)
    assert (await get(http, f"{site}/installed", query))[0] == 200
    stored = await accounts.store.tokens(101).load()

    status, text = await get(http, f"{site}/installed", query)

    assert status == 400
    assert "refused the authorization code" in text
    assert await accounts.store.tokens(101).load() == stored


async def test_an_account_that_cannot_be_read_is_a_502_and_nothing_is_installed(
    accounts: KommoAccounts, one: FakeKommoAccount, site: str, http: aiohttp.ClientSession
) -> None:
    one.script("account", *[503] * FAST_RETRY.max_attempts)  # every attempt
    query = one.install_query(CLIENT_ID, SECRET, REDIRECT, state=STATE)

    status, text = await get(http, f"{site}/installed", query)

    assert status == 502
    assert "could not be read" in text
    assert await accounts.installed() == []


async def test_a_referer_that_is_not_kommo_is_a_400_and_nothing_is_sent(
    accounts: KommoAccounts, one: FakeKommoAccount, site: str, http: aiohttp.ClientSession
) -> None:
    query = one.install_query(CLIENT_ID, SECRET, REDIRECT, state=STATE)
    query["referer"] = "kommo.com.evil.example"

    status, text = await get(http, f"{site}/installed", query)

    assert status == 400
    assert "not a Kommo account domain" in text
    assert one.stats.requests == 0
    assert await accounts.installed() == []


async def test_a_declined_install_is_a_400_that_says_so(
    accounts: KommoAccounts, site: str, http: aiohttp.ClientSession
) -> None:
    status, text = await get(http, f"{site}/installed", {"state": STATE, "error": "access_denied"})
    assert status == 400
    assert "declined" in text
    assert await accounts.installed() == []


async def test_a_redirect_without_a_code_is_a_400(site: str, http: aiohttp.ClientSession) -> None:
    status, text = await get(http, f"{site}/installed", {"state": STATE, "referer": "a.kommo.com"})
    assert status == 400
    assert "code" in text


async def test_the_signed_disconnect_hook_uninstalls(
    accounts: KommoAccounts, one: FakeKommoAccount, site: str, http: aiohttp.ClientSession
) -> None:
    await accounts.install(one.install_code(CLIENT_ID, SECRET, REDIRECT), one.referer)

    url = signed_disconnect_url(f"{site}/disconnected", CLIENT_ID, SECRET, 101)
    async with http.get(url) as answer:
        assert answer.status == 200

    assert await accounts.installed() == []


@pytest.mark.parametrize(
    "tamper",
    [
        {"signature": "0" * 64},
        {"account_id": "202"},  # a signature of account 101 does not uninstall 202
        {"client_uuid": "another-integration"},
    ],
)
async def test_a_disconnect_that_does_not_verify_is_forbidden_and_changes_nothing(
    accounts: KommoAccounts,
    one: FakeKommoAccount,
    site: str,
    http: aiohttp.ClientSession,
    tamper: dict[str, str],
) -> None:
    await accounts.install(one.install_code(CLIENT_ID, SECRET, REDIRECT), one.referer)
    query = {**disconnect_query(CLIENT_ID, SECRET, 101), **tamper}

    status, _ = await get(http, f"{site}/disconnected", query)

    assert status == 403
    assert await accounts.installed() == [101]


@pytest.mark.parametrize("account_id", ["", "abc", "0", "-1", "\uff11\uff12"])
async def test_a_disconnect_without_a_numeric_account_is_a_400(
    site: str, http: aiohttp.ClientSession, account_id: str
) -> None:
    query = {**disconnect_query(CLIENT_ID, SECRET, 101), "account_id": account_id}
    assert (await get(http, f"{site}/disconnected", query))[0] == 400


async def test_the_handlers_work_without_aiohttp_web(
    accounts: KommoAccounts, one: FakeKommoAccount
) -> None:
    reply = await handle_redirect(
        accounts, one.install_query(CLIENT_ID, SECRET, REDIRECT, state=STATE), state=STATE
    )
    assert (reply.status, reply.content_type) == (200, "text/html")

    reply = await handle_disconnect(accounts, disconnect_query(CLIENT_ID, SECRET, 101))
    assert reply.status == 200
    assert await accounts.installed() == []
