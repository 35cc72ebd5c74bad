"""client.request() and client.paginate(): any Kommo v4 call, against FakeKommo over loopback."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiohttp import web
from loopback import answering_everything, serving

from kommo_talks import (
    APIError,
    DecodeError,
    KommoClient,
    LongLivedToken,
    NotFoundError,
    ServerError,
    TalkAlreadyClosedError,
    TransportError,
    UnauthorizedError,
)
from kommo_talks.testing import FakeKommo, Fault

LEAD = 667999637  # the lead of FakeKommo's default talks


async def test_request_returns_the_account_as_json(client: KommoClient, fake: FakeKommo) -> None:
    account = await client.request("GET", "/api/v4/account")

    assert account["id"] == 17029541
    assert account["subdomain"] == "example"
    (request,) = fake.requests
    assert request.headers["Authorization"] == f"Bearer {fake.token}"


async def test_the_fake_account_takes_its_id_and_subdomain_as_options() -> None:
    async with (
        FakeKommo(account_id=42, subdomain="acme") as fake,
        KommoClient(fake.url, auth=LongLivedToken(fake.token), rate_limit=None) as client,
    ):
        account = await client.request("GET", "/api/v4/account")

    assert (account["id"], account["subdomain"]) == (42, "acme")


async def test_request_sends_params_json_and_added_headers(
    client: KommoClient, fake: FakeKommo
) -> None:
    answer = await client.request(
        "PATCH",
        f"/api/v4/leads/{LEAD}",
        json={"status_id": 142, "pipeline_id": 7},
        params={"with": "contacts"},
        headers={"X-Trace": "t-1"},
    )

    assert answer["id"] == LEAD
    assert fake.crm.leads[LEAD]["status_id"] == 142
    (request,) = fake.requests
    assert request.json() == {"status_id": 142, "pipeline_id": 7}
    assert request.query == {"with": ["contacts"]}
    assert request.headers["X-Trace"] == "t-1"
    assert request.headers["Content-Type"] == "application/json"


async def test_an_absolute_url_of_the_account_is_accepted(
    client: KommoClient, fake: FakeKommo
) -> None:
    account = await client.request("get", f"{fake.url}/api/v4/account")

    assert account["subdomain"] == "example"


@pytest.mark.parametrize(
    "path",
    [
        "https://evil.example/api/v4/account",
        "http://127.0.0.1:1/api/v4/account",
        "api/v4/account",
        "//evil.example/api/v4/account",
        "",
        None,
    ],
)
async def test_a_path_off_the_account_is_refused_before_sending(
    client: KommoClient, fake: FakeKommo, path: Any
) -> None:
    with pytest.raises(ValueError, match="path"):
        await client.request("GET", path)

    assert fake.requests == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"headers": {"Authorization": "Bearer other"}}, "Authorization"),
        ({"headers": {"authorization": "Bearer other"}}, "Authorization"),
        ({"headers": {"X-A": 1}}, "headers"),
        ({"params": {"page": True}}, "params"),
        ({"params": ["page"]}, "params"),
        ({"idempotent": "yes"}, "idempotent"),
        ({"json": {"when": object()}}, "json"),
    ],
)
async def test_bad_arguments_are_refused_before_sending(
    client: KommoClient, fake: FakeKommo, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        await client.request("GET", "/api/v4/account", **kwargs)

    assert fake.requests == []


async def test_an_unknown_method_is_refused(client: KommoClient, fake: FakeKommo) -> None:
    with pytest.raises(ValueError, match="method"):
        await client.request("TRACE", "/api/v4/account")

    assert fake.requests == []


async def test_a_204_is_none(client: KommoClient, fake: FakeKommo) -> None:
    assert await client.request("GET", "/api/v4/leads", params={"page": 9}) is None


async def test_errors_are_raised_by_status(client: KommoClient, fake: FakeKommo) -> None:
    with pytest.raises(NotFoundError):
        await client.request("PATCH", "/api/v4/leads/1", json={"status_id": 142})
    with pytest.raises(APIError) as caught:
        await client.request("GET", "/api/v4/leads", params={"limit": 500})

    assert type(caught.value) is APIError
    assert not isinstance(caught.value, TalkAlreadyClosedError)
    assert caught.value.status == 422


async def test_a_bad_token_is_unauthorized(fake: FakeKommo) -> None:
    async with KommoClient(
        fake.url, auth=LongLivedToken("wrong-token-0123456789"), rate_limit=None
    ) as c:
        with pytest.raises(UnauthorizedError):
            await c.request("GET", "/api/v4/account")


async def test_a_get_is_retried_after_a_5xx(client: KommoClient, fake: FakeKommo) -> None:
    fake.script("account", 503)

    assert (await client.request("GET", "/api/v4/account"))["id"] == 17029541
    assert fake.stats.by_route["account"] == 2


async def test_a_patch_is_not_retried_after_a_5xx(client: KommoClient, fake: FakeKommo) -> None:
    fake.script("lead_update", 503)

    with pytest.raises(ServerError):
        await client.request("PATCH", f"/api/v4/leads/{LEAD}", json={"status_id": 142})
    assert fake.stats.by_route["lead_update"] == 1


async def test_a_patch_is_not_retried_after_a_dropped_connection(
    client: KommoClient, fake: FakeKommo
) -> None:
    fake.script("lead_update", Fault.dropped())

    with pytest.raises(TransportError):
        await client.request("PATCH", f"/api/v4/leads/{LEAD}", json={"status_id": 142})
    assert fake.stats.by_route["lead_update"] == 1


async def test_a_patch_is_retried_after_a_429(client: KommoClient, fake: FakeKommo) -> None:
    fake.script("lead_update", Fault.error(429, retry_after=0))

    await client.request("PATCH", f"/api/v4/leads/{LEAD}", json={"status_id": 142})

    assert fake.stats.by_route["lead_update"] == 2
    assert fake.crm.leads[LEAD]["status_id"] == 142


async def test_an_idempotent_patch_is_retried_after_a_5xx(
    client: KommoClient, fake: FakeKommo
) -> None:
    fake.script("lead_update", 503)

    await client.request("PATCH", f"/api/v4/leads/{LEAD}", json={"status_id": 142}, idempotent=True)

    assert fake.stats.by_route["lead_update"] == 2


# -- paginate --------------------------------------------------------------------


async def test_paginate_follows_the_pages_to_the_end(client: KommoClient, fake: FakeKommo) -> None:
    for lead_id in range(1, 8):
        fake.crm.add_lead(lead_id)

    leads = [
        lead
        async for lead in client.paginate("/api/v4/leads", params={"limit": 3}, embedded="leads")
    ]

    assert [lead["id"] for lead in leads] == [1, 2, 3, 4, 5, 6, 7, LEAD]
    assert [r.query["page"] for r in fake.requests[1:]] == [["2"], ["3"]]


async def test_paginate_ends_at_a_204(client: KommoClient, fake: FakeKommo) -> None:
    fake.crm.leads.clear()

    assert [x async for x in client.paginate("/api/v4/leads", embedded="leads")] == []
    assert len(fake.requests) == 1


async def test_paginate_yields_talks_as_json_too(client: KommoClient, fake: FakeKommo) -> None:
    talks = [
        t async for t in client.paginate("/api/v4/talks", params={"limit": 250}, embedded="talks")
    ]

    assert [t["talk_id"] for t in talks] == list(range(1, 101))


async def test_paginate_refuses_a_bad_embedded_key_before_sending(
    client: KommoClient, fake: FakeKommo
) -> None:
    with pytest.raises(ValueError, match="embedded"):
        client.paginate("/api/v4/leads", embedded="")

    assert fake.requests == []


def pages_server(*bodies: dict[str, Any]) -> web.Application:
    """An app answering each request with the next of ``bodies`` (then 204)."""
    queue = list(bodies)

    async def handler(request: web.Request) -> web.Response:
        if not queue:
            return web.Response(status=204)
        body = queue.pop(0)
        return web.Response(body=orjson.dumps(body), content_type="application/hal+json")

    return answering_everything(handler)


async def collect(app: web.Application, **params: Any) -> list[Any]:
    async with (
        serving(app) as url,
        KommoClient(url, auth=LongLivedToken("t" * 20), rate_limit=None) as client,
    ):
        return [x async for x in client.paginate("/api/v4/leads", embedded="leads", **params)]


async def test_paginate_refuses_a_next_link_to_another_origin() -> None:
    body = {
        "_embedded": {"leads": [{"id": 1}]},
        "_links": {"next": {"href": "https://evil.example/api/v4/leads?page=2"}},
    }

    with pytest.raises(DecodeError, match="another origin"):
        await collect(pages_server(body, body))


async def test_paginate_refuses_a_repeated_page() -> None:
    body = {"_embedded": {"leads": [{"id": 1}]}, "_links": {"next": {"href": "/api/v4/leads"}}}

    with pytest.raises(DecodeError, match="already fetched"):
        await collect(pages_server(body, body))


async def test_paginate_ends_at_an_empty_page_or_a_missing_embedded() -> None:
    empty = {"_embedded": {"leads": []}, "_links": {"next": {"href": "/api/v4/leads?page=2"}}}
    bare = {"_links": {"next": {"href": "/api/v4/leads?page=2"}}}

    assert await collect(pages_server(empty, {"_embedded": {"leads": [{"id": 2}]}})) == []
    assert await collect(pages_server(bare, {"_embedded": {"leads": [{"id": 2}]}})) == []


async def test_paginate_names_a_page_of_the_wrong_shape() -> None:
    with pytest.raises(DecodeError) as caught:
        await collect(pages_server({"_embedded": {"leads": {"id": 1}}}))

    assert caught.value.path == "_embedded.leads"


async def test_the_docs_bot_moves_the_talks_lead_after_closing(
    client: KommoClient, fake: FakeKommo
) -> None:
    talk = await client.get_talk(5)
    await client.close_talk(5, force=True)
    assert talk.entity_type == "lead"
    assert talk.entity_id is not None
    await client.request(
        "PATCH", f"/api/v4/leads/{talk.entity_id}", json={"status_id": 142}, idempotent=True
    )

    assert fake.talks[5]["is_in_work"] is False
    assert fake.crm.leads[talk.entity_id]["status_id"] == 142
