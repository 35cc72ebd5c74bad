"""KommoAccounts: install, per-account clients in an LRU over one session, limits, uninstall."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import attrs
import pytest
from conftest import FAST_RETRY

from kommo_talks.accounts import (
    Account,
    AccountNotInstalledError,
    ChainedRateLimiter,
    KommoAccounts,
    MemoryAccountStore,
)
from kommo_talks.accounts._install import MAX_ACCOUNT_BYTES
from kommo_talks.accounts._model import account_base_url
from kommo_talks.errors import (
    APIError,
    ClientClosedError,
    DecodeError,
    KommoError,
    ServerError,
    TokenRefreshError,
    UnauthorizedError,
)
from kommo_talks.testing import FakeKommoAccount, Fault
from kommo_talks.webhooks import TalkEvent

CLIENT_ID = "integration-0123456789"
SECRET = "integration-secret-0123456789"
REDIRECT = "https://bot.example/kommo/installed"


@pytest.fixture
async def one() -> AsyncIterator[FakeKommoAccount]:
    async with FakeKommoAccount(account_id=101, subdomain="one") as fake:
        yield fake


@pytest.fixture
async def two() -> AsyncIterator[FakeKommoAccount]:
    async with FakeKommoAccount(account_id=202, subdomain="two") as fake:
        yield fake


def make_accounts(**options: object) -> KommoAccounts:
    settings: dict[str, object] = {
        "store": MemoryAccountStore(),
        "retry": FAST_RETRY,
        "rate_limit": None,
        "allow_loopback": True,
        **options,
    }
    return KommoAccounts(CLIENT_ID, SECRET, REDIRECT, **settings)  # type: ignore[arg-type]


@pytest.fixture
async def accounts() -> AsyncIterator[KommoAccounts]:
    async with make_accounts() as kept:
        yield kept


async def install(accounts: KommoAccounts, fake: FakeKommoAccount) -> Account:
    return await accounts.install(fake.install_code(CLIENT_ID, SECRET, REDIRECT), fake.referer)


async def test_install_reads_the_account_and_saves_it_before_returning(
    accounts: KommoAccounts, one: FakeKommoAccount
) -> None:
    account = await install(accounts, one)

    assert (account.id, account.subdomain, account.base_url) == (101, "one", one.url)
    assert await accounts.store.get(101) == account
    stored = await accounts.store.tokens(101).load()
    assert stored is not None
    assert stored.access_token == one.oauth.issued[-1].access_token
    assert await accounts.installed() == [101]


async def test_each_account_client_talks_to_its_own_account(
    accounts: KommoAccounts, one: FakeKommoAccount, two: FakeKommoAccount
) -> None:
    await install(accounts, one)
    await install(accounts, two)
    one.add_talk(5, is_in_work=True)
    two.add_talk(5, is_in_work=True)

    await (await accounts.client(202)).close_talk(5, force=True)

    assert two.closed_talks() == [5]
    assert one.closed_talks() == []


async def test_an_unknown_account_is_a_clear_kommo_error(accounts: KommoAccounts) -> None:
    with pytest.raises(AccountNotInstalledError, match="42") as caught:
        await accounts.client(42)
    assert isinstance(caught.value, KommoError)
    assert caught.value.account_id == 42


@pytest.mark.parametrize("bad", [0, -5, True, "101"])
async def test_bad_account_ids_are_refused(accounts: KommoAccounts, bad: object) -> None:
    with pytest.raises(ValueError, match="account_id"):
        await accounts.client(bad)  # type: ignore[arg-type]


async def test_installing_again_replaces_the_record_and_the_client(
    accounts: KommoAccounts, one: FakeKommoAccount
) -> None:
    first = await install(accounts, one)
    old_client = await accounts.client(101)

    second = await install(accounts, one)

    assert second.installed_at >= first.installed_at
    stored = await accounts.store.tokens(101).load()
    assert stored is not None
    assert stored.access_token == one.oauth.issued[-1].access_token
    assert await accounts.client(101) is not old_client


async def test_install_reads_the_account_through_a_client_of_that_account(
    accounts: KommoAccounts, one: FakeKommoAccount
) -> None:
    one.script("account", 503)  # retried, as any GET of a client

    await install(accounts, one)

    reads = [r for r in one.requests if r.route == "account"]
    assert len(reads) == 2
    assert reads[-1].headers["Authorization"] == f"Bearer {one.oauth.issued[-1].access_token}"
    assert reads[-1].headers["User-Agent"].startswith("kommo-talks/")


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (Fault.error(401), UnauthorizedError),
        (Fault.error(302), APIError),  # a redirect is not followed
        (Fault.error(500), ServerError),  # every attempt fails
        (Fault.error(200, html=True), DecodeError),  # not JSON
    ],
)
async def test_a_failed_account_read_saves_nothing(
    accounts: KommoAccounts, one: FakeKommoAccount, fault: Fault, error: type[KommoError]
) -> None:
    one.script("account", *[fault] * FAST_RETRY.max_attempts)

    with pytest.raises(error) as caught:
        await install(accounts, one)

    if isinstance(caught.value, APIError):
        assert caught.value.status == fault.status
    assert await accounts.installed() == []
    assert await accounts.store.get(101) is None
    assert await accounts.store.tokens(101).load() is None


@pytest.mark.parametrize(
    ("subdomain", "field"), [("", "subdomain"), ("x" * MAX_ACCOUNT_BYTES, None)]
)
async def test_an_account_answer_that_is_wrong_or_too_large_saves_nothing(
    accounts: KommoAccounts, one: FakeKommoAccount, subdomain: str, field: str | None
) -> None:
    one.crm.subdomain = subdomain

    with pytest.raises(DecodeError) as caught:
        await install(accounts, one)

    assert caught.value.path == field
    assert await accounts.installed() == []


@pytest.mark.parametrize(
    "referer",
    ["evil.example", "one.kommo.com.evil.example", "a.b.kommo.com", "kommo.com", "127.0.0.1:1"],
)
async def test_a_referer_outside_kommo_sends_nothing(one: FakeKommoAccount, referer: str) -> None:
    async with make_accounts(allow_loopback=False) as accounts:
        with pytest.raises(ValueError, match="referer"):
            await accounts.install(one.install_code(CLIENT_ID, SECRET, REDIRECT), referer)
        assert await accounts.installed() == []
    assert one.stats.requests == 0


@pytest.mark.parametrize(
    ("referer", "base_url"),
    [
        ("example.kommo.com", "https://example.kommo.com"),
        ("Example.Kommo.com", "https://example.kommo.com"),
        ("https://shop-1.amocrm.ru/", "https://shop-1.amocrm.ru"),
        ("shop.amocrm.com", "https://shop.amocrm.com"),
    ],
)
def test_kommo_referers_give_the_accounts_https_address(referer: str, base_url: str) -> None:
    assert account_base_url(referer) == base_url


@pytest.mark.parametrize(
    "referer", ["http://example.kommo.com", "example.kommo.com:8443", "example.kommo.com/x", ""]
)
def test_other_forms_of_kommo_referers_are_refused(referer: str) -> None:
    with pytest.raises(ValueError, match="referer"):
        account_base_url(referer)


def test_loopback_referers_need_allow_loopback() -> None:
    assert account_base_url("127.0.0.1:8080", allow_loopback=True) == "http://127.0.0.1:8080"
    with pytest.raises(ValueError, match="referer"):
        account_base_url("127.0.0.1:8080")


async def test_a_replayed_code_is_refused_and_changes_nothing(
    accounts: KommoAccounts, one: FakeKommoAccount
) -> None:
    code = one.install_code(CLIENT_ID, SECRET, REDIRECT)
    account = await accounts.install(code, one.referer)
    stored = await accounts.store.tokens(101).load()

    with pytest.raises(TokenRefreshError):
        await accounts.install(code, one.referer)

    assert await accounts.store.get(101) == account
    assert await accounts.store.tokens(101).load() == stored


async def test_uninstall_closes_the_client_and_forgets_the_account(
    accounts: KommoAccounts, one: FakeKommoAccount
) -> None:
    await install(accounts, one)
    client = await accounts.client(101)

    assert await accounts.uninstall(101) is True

    assert client.closed
    assert await accounts.installed() == []
    with pytest.raises(AccountNotInstalledError):
        await accounts.client(101)
    assert await accounts.uninstall(101) is False


async def test_the_cache_keeps_at_most_max_clients_and_evicted_ones_stay_usable(
    one: FakeKommoAccount, two: FakeKommoAccount
) -> None:
    async with (
        FakeKommoAccount(account_id=303, subdomain="three") as three,
        make_accounts(max_clients=2) as accounts,
    ):
        for fake in (one, two, three):
            await install(accounts, fake)
        held = await accounts.client(101)
        await accounts.client(202)
        await accounts.client(303)  # drops 101, the least recently used

        assert accounts.live_clients == 2
        await held.get_talk(1)  # whoever holds it keeps using it
        assert not held.closed
        assert one.stats.by_route["get"] == 1


async def test_every_client_borrows_the_one_shared_session(
    accounts: KommoAccounts, one: FakeKommoAccount, two: FakeKommoAccount
) -> None:
    await install(accounts, one)
    await install(accounts, two)
    first, second = await accounts.client(101), await accounts.client(202)
    await first.get_talk(1)
    await second.get_talk(1)

    assert first._pipeline._session.current() is second._pipeline._session.current()
    assert first._pipeline._session.current() is accounts.session


async def test_a_client_built_again_shares_the_refresh_of_one_still_in_use(
    one: FakeKommoAccount, two: FakeKommoAccount
) -> None:
    async with make_accounts(max_clients=1) as accounts:
        await install(accounts, one)
        await install(accounts, two)
        old = await accounts.client(101)
        await accounts.client(202)  # evicts 101's client, which `old` still holds
        new = await accounts.client(101)
        assert new is not old
        one.oauth.expire_access_tokens()

        await asyncio.gather(old.get_talk(1), new.get_talk(1))

        assert one.oauth.refreshes == 1


async def test_a_refresh_of_one_account_does_not_hold_up_another(
    accounts: KommoAccounts, one: FakeKommoAccount, two: FakeKommoAccount
) -> None:
    await install(accounts, one)
    await install(accounts, two)
    one.oauth.gate = asyncio.Event()
    one.oauth.expire_access_tokens()
    stuck = asyncio.create_task((await accounts.client(101)).get_talk(1))
    await asyncio.wait_for(one.oauth.at_gate.wait(), 5)

    talk = await asyncio.wait_for((await accounts.client(202)).get_talk(1), 5)

    assert talk.talk_id == 1
    assert not stuck.done()
    one.oauth.gate.set()
    await stuck


async def test_client_for_routes_a_webhook_event_to_its_account(
    accounts: KommoAccounts, one: FakeKommoAccount, two: FakeKommoAccount
) -> None:
    await install(accounts, one)
    await install(accounts, two)
    event = TalkEvent(action="add", talk_id=1, is_in_work=True, is_read=False, account_id=202)

    assert await accounts.client_for(event) is await accounts.client(202)
    with pytest.raises(ValueError, match="names no account"):
        await accounts.client_for(attrs.evolve(event, account_id=None))


class Recording:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    async def acquire(self) -> None:
        self.log.append(self.name)


async def test_the_global_limit_is_waited_for_before_the_accounts_own_and_at_install(
    one: FakeKommoAccount,
) -> None:
    log: list[str] = []
    own = {101: Recording("account-101", log)}
    async with make_accounts(
        rate_limit=own.__getitem__, global_rate_limit=Recording("global", log)
    ) as accounts:
        await install(accounts, one)
        await (await accounts.client(101)).get_talk(1)

    # The install's account read passes the global limit only: the ID is what it reads.
    assert log == ["global", "global", "account-101"]


async def test_a_number_gives_each_account_its_own_sliding_window(one: FakeKommoAccount) -> None:
    async with make_accounts(rate_limit=7, global_rate_limit=20) as accounts:
        await install(accounts, one)
        client = await accounts.client(101)
        limiter = client._pipeline._limiter
        assert isinstance(limiter, ChainedRateLimiter)
        assert [lim.rate for lim in limiter.limiters] == [20.0, 7.0]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "options",
    [
        {"rate_limit": 0},
        {"rate_limit": float("nan")},
        {"global_rate_limit": -1},
        {"max_clients": 0},
        {"rate_limit": True},
    ],
)
def test_bad_limits_are_refused_up_front(options: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=r"rate_limit|max_clients"):
        make_accounts(**options)


def test_blank_registration_is_refused() -> None:
    with pytest.raises(ValueError, match="client_secret"):
        KommoAccounts(CLIENT_ID, " ", REDIRECT, store=MemoryAccountStore())


async def test_close_closes_clients_and_the_owned_session(
    one: FakeKommoAccount,
) -> None:
    accounts = make_accounts()
    await install(accounts, one)
    client = await accounts.client(101)
    session = accounts.session

    await accounts.close()
    await accounts.close()

    assert client.closed
    assert session.closed
    with pytest.raises(ClientClosedError):
        await accounts.client(101)


async def test_a_lent_session_is_borrowed_not_closed(one: FakeKommoAccount) -> None:
    async with aiohttp.ClientSession() as session:
        async with make_accounts(session=session) as accounts:
            await install(accounts, one)
            await (await accounts.client(101)).get_talk(1)
        assert not session.closed


def test_the_secret_stays_out_of_the_repr() -> None:
    assert SECRET not in repr(make_accounts())
