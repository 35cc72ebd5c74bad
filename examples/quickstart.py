"""Fetch and close talks, against the embedded FakeKommo (no account needed).

For a real account, replace the fake with your base URL and token:
``KommoClient("https://example.kommo.com", auth=LongLivedToken("..."))``.
"""

import asyncio

from kommo_talks import CloseStatus, KommoClient, LongLivedToken, NotFoundError
from kommo_talks.testing import FakeKommo


async def main() -> None:
    async with (
        FakeKommo() as fake,  # for your account: "https://example.kommo.com" and its token
        KommoClient(fake.url, auth=LongLivedToken(fake.token)) as client,
    ):
        talk = await client.get_talk(1)
        print(f"talk {talk.talk_id} from {talk.origin}, open: {talk.is_in_work}")

        await client.close_talk(1, force=True)  # force: no NPS bot, close now

        try:
            await client.get_talk(1000)
        except NotFoundError as error:
            print(f"as expected: {error.status} {error.title}")

        outcomes = await client.close_talks(range(1, 21), force=True, concurrency=5)
        closed = sum(o.status is CloseStatus.CLOSED for o in outcomes)
        already = sum(o.status is CloseStatus.ALREADY_CLOSED for o in outcomes)
        print(f"closed {closed}, already closed {already}")


if __name__ == "__main__":
    asyncio.run(main())
