"""Test helpers: :class:`FakeKommo`, an in-process Kommo Talks API.

Import it only in tests and demos (``import kommo_talks`` does not load it)::

    from kommo_talks.testing import FakeKommo, Fault

    async with FakeKommo(rate_limit=7) as fake:
        fake.script("close", 503, Fault.dropped())
        async with KommoClient(fake.url, auth=LongLivedToken(fake.token)) as client:
            await client.close_talk(1, force=True)
"""

from ._fake import FakeKommo
from ._faults import Fault
from ._install import FakeKommoAccount, disconnect_query, signed_disconnect_url
from ._oauth import FakeOAuth
from ._stats import FakeStats, RecordedRequest, busiest_window
from ._webhooks import WebhookDelivery
from ._wire import problem_response

__all__ = [
    "FakeKommo",
    "FakeKommoAccount",
    "FakeOAuth",
    "FakeStats",
    "Fault",
    "RecordedRequest",
    "WebhookDelivery",
    "busiest_window",
    "disconnect_query",
    "problem_response",
    "signed_disconnect_url",
]
