"""examples/multi_account_bot.py end to end against two FakeKommo accounts, over loopback.

Both accounts install the bot through its redirect route, their webhooks
arrive at one URL, each ``#done`` closes the talk in its own account, and the
disconnect hook uninstalls one of them.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import aiohttp
from loopback import serving
from test_accounts import CLIENT_ID, REDIRECT, SECRET, make_accounts
from test_bot_example import Seen

from kommo_talks.testing import FakeKommoAccount, signed_disconnect_url
from kommo_talks.webhooks import MessageEvent, WebhookEvent

EXAMPLES = Path(__file__).parent.parent / "examples"
BOT_SECRET = "bot-secret-0123456789"


def load_example() -> ModuleType:
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))  # it imports close_on_done_bot, as when run
    spec = importlib.util.spec_from_file_location(
        "multi_account_bot", EXAMPLES / "multi_account_bot.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bot = load_example()


def handled(account_id: int, subdomain: str, talk_id: int) -> Callable[[WebhookEvent], bool]:
    def matches(event: WebhookEvent) -> bool:
        return (
            isinstance(event, MessageEvent)
            and (event.account_id, event.subdomain) == (account_id, subdomain)
            and event.talk_id == talk_id
        )

    return matches


async def test_two_accounts_install_the_bot_and_each_done_closes_its_own_talk() -> None:
    seen = Seen()
    accounts = make_accounts()
    app = bot.make_app(accounts, secret=BOT_SECRET, on_event=seen)
    async with (
        FakeKommoAccount(account_id=111, subdomain="alpha") as alpha,
        FakeKommoAccount(account_id=222, subdomain="beta") as beta,
        serving(app) as url,
        aiohttp.ClientSession() as http,
    ):
        for fake in (alpha, beta):
            query = fake.install_query(CLIENT_ID, SECRET, REDIRECT, from_widget=True)
            async with http.get(f"{url}/kommo/installed", params=query) as answer:
                assert answer.status == 200
            fake.add_webhook(f"{url}/kommo/webhook/?secret={BOT_SECRET}")
        assert await accounts.installed() == [111, 222]

        await alpha.emit_message(7, "all good, #done")
        await beta.emit_message(9, "#done")
        await asyncio.gather(
            seen.wait_for(handled(111, "alpha", 7)), seen.wait_for(handled(222, "beta", 9))
        )

        assert alpha.closed_talks() == [7]
        assert beta.closed_talks() == [9]

        hook = signed_disconnect_url(f"{url}/kommo/disconnected", CLIENT_ID, SECRET, 222)
        async with http.get(hook) as answer:
            assert answer.status == 200
        assert await accounts.installed() == [111]
