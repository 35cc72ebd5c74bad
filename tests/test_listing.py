"""iter_talks: lazy paging over GET /api/v4/talks, and FakeKommo's list endpoint."""

from __future__ import annotations

import contextlib
import enum
import inspect
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import attrs
import orjson
import pytest
from aiohttp import web
from conftest import FAST_RETRY
from loopback import serving

from kommo_talks import (
    DecodeError,
    KommoClient,
    LongLivedToken,
    ServerError,
    Talk,
    UnauthorizedError,
)
from kommo_talks.listing import encode_filter
from kommo_talks.testing import FakeKommo, Fault


def new_client(url: str, token: str | None = None, **options: Any) -> KommoClient:
    options.setdefault("retry", FAST_RETRY)
    options.setdefault("rate_limit", None)
    return KommoClient(url, auth=LongLivedToken(token or "any-token"), **options)


@contextlib.asynccontextmanager
async def fake_with(talks: Any = range(1, 12)) -> AsyncIterator[tuple[FakeKommo, KommoClient]]:
    async with FakeKommo(talks=talks) as fake, new_client(fake.url, fake.token) as client:
        yield fake, client


def list_queries(fake: FakeKommo) -> list[dict[str, list[str]]]:
    return [r.query for r in fake.requests if r.route == "list"]


async def ids_of(client: KommoClient, **options: Any) -> list[int]:
    return [talk.talk_id async for talk in client.iter_talks(**options)]


async def collect(into: list[Any], talks: AsyncIterator[Talk]) -> None:
    """Append what ``talks`` yields to ``into``, so that a test sees what came before an error."""
    async for talk in talks:
        into.append(talk)


# -------------------------------------------------------------------------- paging


async def test_follows_next_links_with_one_request_per_page() -> None:
    async with fake_with(range(1, 12)) as (fake, client):
        assert await ids_of(client, page_size=5) == list(range(1, 12))
    assert fake.stats.requests == 3
    assert list_queries(fake) == [
        {"page": ["1"], "limit": ["5"]},
        {"page": ["2"], "limit": ["5"]},
        {"page": ["3"], "limit": ["5"]},
    ]


async def test_last_full_page_without_next_link_ends_the_listing() -> None:
    async with fake_with(range(1, 11)) as (fake, client):
        assert await ids_of(client, page_size=5) == list(range(1, 11))
    assert fake.stats.requests == 2


async def test_default_page_size_is_kommos_maximum() -> None:
    async with fake_with(range(1, 301)) as (fake, client):
        assert await ids_of(client) == list(range(1, 301))
    assert [q["limit"] for q in list_queries(fake)] == [["250"], ["250"]]


async def test_listed_talks_are_get_talk_s_talks_with_the_list_fields(
    client: KommoClient,
) -> None:
    listed = [talk async for talk in client.iter_talks(filter={"talk_id": [3, 4]})]
    single = [await client.get_talk(3), await client.get_talk(4)]
    assert listed == [attrs.evolve(t, status="in_work") for t in single]
    assert all(type(talk) is Talk for talk in listed)
    assert listed[0].embedded.leads[0].id == 667999637
    assert (single[0].status, single[0].source_id) == (None, None)


async def test_a_list_page_without_missed_at_decodes() -> None:
    # Kommo's list items carry status and source_id and no missed_at, unlike GET by id.
    async with fake_with([1, 2]) as (fake, client):
        fake.add_talk(2, is_in_work=False, source_id=5501)
        fake.add_talk(3, status="nps_scheduled")
        listed = [talk async for talk in client.iter_talks()]
        _, page = await raw_get(fake, "/api/v4/talks", {})

    assert all("missed_at" not in item for item in page["_embedded"]["talks"])
    single = fake.payload(2)  # GET by ID keeps the documented shape
    assert "missed_at" in single
    assert "status" not in single
    assert "source_id" not in single
    assert [(t.talk_id, t.status, t.source_id, t.missed_at) for t in listed] == [
        (1, "in_work", None, None),
        (2, "closed", 5501, None),
        (3, "nps_scheduled", None, None),
    ]


async def test_empty_account_answers_204_and_yields_nothing() -> None:
    async with fake_with([]) as (fake, client):
        assert await ids_of(client) == []
    assert fake.stats.requests == 1


async def test_a_204_on_a_later_page_ends_the_listing(fake: FakeKommo, client: KommoClient) -> None:
    # Talks vanish between pages: page 2 is then empty, answered 204.
    iterator = client.iter_talks(page_size=60)
    first = [await anext(iterator) for _ in range(60)]
    for talk_id in range(61, 101):
        del fake.talks[talk_id]
    assert [talk async for talk in iterator] == []
    assert [t.talk_id for t in first] == list(range(1, 61))
    assert fake.stats.by_route["list"] == 2


async def test_an_empty_page_with_a_next_link_ends_the_listing() -> None:
    pages = [
        {"_links": {"next": {"href": "/api/v4/talks?page=2"}}, "_embedded": {"talks": []}},
    ]
    async with custom_server(pages) as (url, requests), new_client(url) as client:
        assert await ids_of(client) == []
    assert len(requests) == 1


async def test_is_an_async_generator_usable_with_aclosing(client: KommoClient) -> None:
    # KommoClient.iter_talks is annotated AsyncIterator; what it returns is a generator.
    iterator = client.iter_talks(page_size=10)
    is_generator = inspect.isasyncgen(iterator)  # (not in the assert: no type narrowing)
    assert is_generator
    async with contextlib.aclosing(iterator) as talks:
        async for talk in talks:
            assert talk.talk_id == 1
            break
    with pytest.raises(StopAsyncIteration):
        await anext(iterator)


async def test_next_page_is_requested_only_when_the_current_one_is_consumed(
    fake: FakeKommo, client: KommoClient
) -> None:
    iterator = client.iter_talks(page_size=5)
    assert fake.stats.requests == 0  # nothing is sent before the first item is asked for
    for expected in range(1, 6):
        assert (await anext(iterator)).talk_id == expected
    assert fake.stats.requests == 1
    assert (await anext(iterator)).talk_id == 6
    assert fake.stats.requests == 2
    await iterator.aclose()


async def test_leaving_the_loop_early_sends_nothing_more(
    fake: FakeKommo, client: KommoClient
) -> None:
    seen = []
    iterator = client.iter_talks(page_size=5)
    async with contextlib.aclosing(iterator) as talks:
        async for talk in talks:
            seen.append(talk.talk_id)
            if len(seen) == 5:  # the whole first page, and no more
                break
    assert seen == [1, 2, 3, 4, 5]
    assert fake.stats.requests == 1


async def test_a_503_on_a_later_page_is_ridden_out(fake: FakeKommo, client: KommoClient) -> None:
    iterator = client.iter_talks(page_size=40)
    first = [(await anext(iterator)).talk_id for _ in range(40)]
    fake.script("list", 503, Fault.dropped(), 503)
    rest = [talk.talk_id async for talk in iterator]
    assert first + rest == list(range(1, 101))
    # 3 pages plus the 3 faults (had aiohttp re-sent the dropped GET by itself,
    # the re-send would have met the last 503: still 6).
    assert fake.stats.by_route["list"] == 6
    assert fake.faults.pending("list") == 0
    page_numbers = [q["page"] for q in list_queries(fake)]
    assert page_numbers[0] == ["1"]
    assert page_numbers[-2:] == [["2"], ["3"]]


async def test_a_later_page_failing_for_good_raises_after_the_earlier_talks(
    fake: FakeKommo, client: KommoClient
) -> None:
    seen: list[Talk] = []
    fake.script("list", Fault(), *[503] * FAST_RETRY.max_attempts)  # page 1 fine, page 2 not
    with pytest.raises(ServerError) as caught:
        await collect(seen, client.iter_talks(page_size=50))
    assert [talk.talk_id for talk in seen] == list(range(1, 51))
    assert caught.value.status == 503
    assert fake.stats.by_route["list"] == 1 + FAST_RETRY.max_attempts


async def test_pages_go_through_auth(fake: FakeKommo) -> None:
    async with new_client(fake.url, "wrong-token") as client:
        with pytest.raises(UnauthorizedError):
            await ids_of(client)
    assert fake.stats.requests == 1


# -------------------------------------------------------------------------- filters


async def test_filter_encoding_scalar_list_tuple_set_and_bools(
    fake: FakeKommo, client: KommoClient
) -> None:
    await ids_of(
        client,
        page_size=7,
        filter={
            "contact_id": 3372695,
            "entity_type": "lead",
            "talk_id": [5, 1, 5],
            "entity_id": (667999637,),
            "origin": {"whatsapp", "telegram"},
            "is_read": True,
            "only_in_work": False,
        },
    )
    assert list_queries(fake)[0] == {
        "page": ["1"],
        "limit": ["7"],
        "filter[contact_id]": ["3372695"],
        "filter[entity_type]": ["lead"],
        "filter[talk_id][]": ["5", "1", "5"],
        "filter[entity_id][]": ["667999637"],
        "filter[origin][]": ["telegram", "whatsapp"],
        "filter[is_read]": ["1"],
    }


@pytest.mark.parametrize(
    ("value", "sent"),
    [(True, [("filter[only_in_work]", "1")]), (False, []), ("", [("filter[only_in_work]", "")])],
    ids=["true-sends-1", "false-sends-no-key", "empty-is-passed-through"],
)
def test_only_in_work_is_a_presence_flag(value: object, sent: list[tuple[str, str]]) -> None:
    assert encode_filter({"only_in_work": value}) == sent
    assert encode_filter({"is_read": False}) == [("filter[is_read]", "0")]  # other flags: 0


def test_encode_filter_is_plain_pairs_in_order() -> None:
    assert encode_filter(None) == []
    assert encode_filter({"only_in_work": "", "talk_id": [2, True]}) == [
        ("filter[only_in_work]", ""),
        ("filter[talk_id][]", "2"),
        ("filter[talk_id][]", "1"),
    ]


def test_enum_values_are_sent_by_their_plain_value() -> None:
    class Kind(enum.StrEnum):
        LEAD = "lead"

    class Id(enum.IntEnum):
        FIRST = 7

    assert encode_filter({"entity_type": Kind.LEAD, "talk_id": [Id.FIRST, 8]}) == [
        ("filter[entity_type]", "lead"),
        ("filter[talk_id][]", "7"),
        ("filter[talk_id][]", "8"),
    ]


async def test_filters_are_sent_on_every_page(fake: FakeKommo, client: KommoClient) -> None:
    assert await ids_of(client, page_size=2, filter={"talk_id": [1, 2, 3, 4, 5]}) == [1, 2, 3, 4, 5]
    queries = list_queries(fake)
    assert len(queries) == 3
    assert all(q["filter[talk_id][]"] == ["1", "2", "3", "4", "5"] for q in queries)


@pytest.mark.parametrize(
    ("filter", "expected"),
    [
        pytest.param({"talk_id": 4}, [4], id="talk_id scalar"),
        pytest.param({"talk_id": [6, 2, 999]}, [2, 6], id="talk_id list"),
        pytest.param({"contact_id": 42}, [2, 3], id="contact_id"),
        pytest.param({"entity_id": 7}, [3], id="entity_id"),
        pytest.param({"entity_type": "customer"}, [3], id="entity_type"),
        pytest.param({"entity_type": ["customer", "lead"]}, [1, 2, 3, 5, 6], id="entity_types"),
        pytest.param({"only_in_work": ""}, [1, 3, 5, 6], id="only_in_work empty"),
        pytest.param({"only_in_work": True}, [1, 3, 5, 6], id="only_in_work 1"),
        pytest.param({"only_in_work": False}, [1, 2, 3, 4, 5, 6], id="only_in_work False"),
        pytest.param({"only_in_work": "0"}, [1, 3, 5, 6], id="only_in_work=0 is on by presence"),
        pytest.param({"only_in_work": "", "contact_id": 42}, [3], id="combined"),
        pytest.param({"some_future_key": "x"}, [1, 2, 3, 4, 5, 6], id="unknown key ignored"),
    ],
)
async def test_fake_applies_the_documented_filters(
    filter: dict[str, Any], expected: list[int]
) -> None:
    async with fake_with(range(1, 7)) as (fake, client):
        fake.talks[2]["is_in_work"] = False
        fake.talks[4]["is_in_work"] = False
        fake.talks[2]["contact_id"] = 42
        fake.talks[3].update(contact_id=42, entity_id=7, entity_type="customer")
        fake.talks[4].update(entity_id=None, entity_type=None)
        assert await ids_of(client, filter=filter, page_size=2) == expected


async def test_a_filter_matching_nothing_is_a_204(fake: FakeKommo, client: KommoClient) -> None:
    assert await ids_of(client, filter={"talk_id": 12345}) == []
    assert fake.stats.requests == 1


# ------------------------------------------------------------------- bad arguments

BAD_PAGE_SIZES = [0, -1, 251, 10_000, True, False, 2.0, "5", None]


@pytest.mark.parametrize("page_size", BAD_PAGE_SIZES, ids=repr)
async def test_bad_page_size_is_refused_before_any_request(
    fake: FakeKommo, client: KommoClient, page_size: Any
) -> None:
    with pytest.raises(ValueError, match="page_size"):
        client.iter_talks(page_size=page_size)  # raised by the call itself
    with pytest.raises(ValueError, match="page_size"):
        async for _ in client.iter_talks(page_size=page_size):
            pass
    assert fake.stats.requests == 0


BAD_FILTERS: list[Any] = [
    [("talk_id", 1)],
    "talk_id=1",
    {1: 2},
    {"": 1},
    {"talk_id": None},
    {"talk_id": 1.5},
    {"talk_id": b"1"},
    {"talk_id": {"a": 1}},
    {"talk_id": []},
    {"talk_id": ()},
    {"talk_id": set()},
    {"talk_id": [1, None]},
    {"talk_id": [[1]]},
    {"talk_id": [1.0]},
    {"talk_id": 1, "contact_id": object()},
]


@pytest.mark.parametrize("bad", BAD_FILTERS, ids=repr)
async def test_bad_filter_is_refused_before_any_request(
    fake: FakeKommo, client: KommoClient, bad: Any
) -> None:
    with pytest.raises(ValueError, match="filter"):
        client.iter_talks(filter=bad)
    assert fake.stats.requests == 0


# ------------------------------------------------------------------ decoding, links


async def test_a_talk_that_does_not_fit_is_a_decode_error_naming_its_path(
    fake: FakeKommo, client: KommoClient
) -> None:
    fake.talks[3]["rate"] = "5"  # a string where Kommo documents an integer
    with pytest.raises(DecodeError) as caught:
        await ids_of(client, page_size=10)
    assert caught.value.path == "_embedded.talks[2].rate"
    assert caught.value.status == 200
    assert "_embedded.talks[2].rate" in str(caught.value)


@pytest.mark.parametrize(
    ("body", "path"),
    [
        pytest.param({"_links": {}}, "_embedded", id="no _embedded"),
        pytest.param({"_embedded": {}}, "_embedded.talks", id="no talks"),
        pytest.param({"_embedded": []}, "_embedded", id="_embedded not an object"),
        pytest.param({"_embedded": {"talks": "abc"}}, "_embedded.talks", id="talks a string"),
        pytest.param({"_embedded": {"talks": {}}}, "_embedded.talks", id="talks an object"),
        pytest.param({"_links": [], "_embedded": {"talks": []}}, "_links", id="links a list"),
        pytest.param(
            {"_links": {"next": "x"}, "_embedded": {"talks": []}}, "_links.next", id="next a str"
        ),
        pytest.param(
            {"_links": {"next": {"href": 5}}, "_embedded": {"talks": []}},
            "_links.next.href",
            id="href an int",
        ),
        pytest.param([], None, id="a JSON array"),
    ],
)
async def test_a_page_that_does_not_fit_is_a_decode_error(body: Any, path: str | None) -> None:
    async with custom_server([body]) as (url, _), new_client(url) as client:
        with pytest.raises(DecodeError) as caught:
            await ids_of(client)
    assert caught.value.path == path


@pytest.mark.parametrize(
    "foreign",
    [
        pytest.param("http://127.0.0.1:{other_port}/api/v4/talks?page=2", id="another port"),
        pytest.param("http://localhost:{port}/api/v4/talks?page=2", id="another host name"),
        pytest.param("https://127.0.0.1:{port}/api/v4/talks?page=2", id="another scheme"),
        pytest.param("//evil.example/api/v4/talks?page=2", id="scheme-relative"),
        pytest.param("http://user:pw@127.0.0.1:{port}/api/v4/talks?page=2", id="credentials"),
    ],
)
async def test_a_next_link_off_the_account_is_refused_and_not_requested(foreign: str) -> None:
    async with custom_server([]) as (other_url, other_requests):
        other_port = int(other_url.rsplit(":", 1)[1])
        pages: list[Any] = []
        async with custom_server(pages) as (url, requests), new_client(url) as client:
            port = int(url.rsplit(":", 1)[1])
            href = foreign.format(port=port, other_port=other_port)
            pages.append({"_links": {"next": {"href": href}}, "_embedded": {"talks": [talk(1)]}})
            seen: list[Talk] = []
            with pytest.raises(DecodeError) as caught:
                await collect(seen, client.iter_talks())
    assert caught.value.path == "_links.next.href"
    assert caught.value.status == 200
    assert "refused" in str(caught.value)
    assert [t.talk_id for t in seen] == [1]  # the page's talks come first
    assert len(requests) == 1
    assert other_requests == []


async def test_a_caller_who_stops_within_the_page_never_meets_a_bad_next_link() -> None:
    pages: list[Any] = []
    async with custom_server(pages) as (url, requests), new_client(url) as client:
        foreign = "https://evil.example/api/v4/talks?page=2"
        pages.append({"_links": {"next": {"href": foreign}}, "_embedded": {"talks": [talk(1)]}})
        async with contextlib.aclosing(client.iter_talks()) as talks:
            first = await anext(talks)  # and stop there

    assert first.talk_id == 1
    assert len(requests) == 1


async def test_a_relative_next_link_is_followed_on_the_account() -> None:
    pages = [
        {
            "_links": {"next": {"href": "/api/v4/talks?page=2&limit=1"}},
            "_embedded": {"talks": [talk(1)]},
        },
        {"_links": {}, "_embedded": {"talks": [talk(2)]}},
    ]
    async with custom_server(pages) as (url, requests), new_client(url) as client:
        assert await ids_of(client, page_size=1) == [1, 2]
    assert [r.query_string for r in requests] == ["page=1&limit=1", "page=2&limit=1"]


async def test_a_next_link_back_to_a_fetched_page_stops_instead_of_looping() -> None:
    pages: list[Any] = []
    async with custom_server(pages) as (url, requests), new_client(url) as client:
        again = f"{url}/api/v4/talks?page=1&limit=250"
        pages.extend(
            [
                {
                    "_links": {"next": {"href": f"{url}/api/v4/talks?page=2&limit=250"}},
                    "_embedded": {"talks": [talk(1)]},
                },
                {"_links": {"next": {"href": again}}, "_embedded": {"talks": [talk(2)]}},
            ]
        )
        with pytest.raises(DecodeError, match="already fetched"):
            await ids_of(client)
    assert len(requests) == 2


# ------------------------------------------------------------- the fake's endpoint


async def test_fake_pages_carry_absolute_links_on_its_host(fake: FakeKommo) -> None:
    query = {"page": "2", "limit": "30", "filter[only_in_work]": ""}
    status, body = await raw_get(fake, "/api/v4/talks", query)
    assert status == 200
    assert body["_page"] == 2
    links = {name: link["href"] for name, link in body["_links"].items()}
    assert links == {
        "self": f"{fake.url}/api/v4/talks?page=2&limit=30&filter%5Bonly_in_work%5D=",
        "first": f"{fake.url}/api/v4/talks?page=1&limit=30&filter%5Bonly_in_work%5D=",
        "prev": f"{fake.url}/api/v4/talks?page=1&limit=30&filter%5Bonly_in_work%5D=",
        "next": f"{fake.url}/api/v4/talks?page=3&limit=30&filter%5Bonly_in_work%5D=",
    }
    assert [t["talk_id"] for t in body["_embedded"]["talks"]] == list(range(31, 61))
    assert body["_embedded"]["talks"][0] == fake.list_item(31)
    assert "missed_at" not in body["_embedded"]["talks"][0]


async def test_fake_last_page_has_no_next_link_and_default_limit_is_50(fake: FakeKommo) -> None:
    status, body = await raw_get(fake, "/api/v4/talks", {"page": "2"})
    assert status == 200
    assert "next" not in body["_links"]
    assert len(body["_embedded"]["talks"]) == 50


@pytest.mark.parametrize(
    ("query", "status", "detail"),
    [
        ({"limit": "251"}, 422, "Limit 250 per page"),
        ({"limit": "0"}, 400, "limit must be a positive integer"),
        ({"page": "x"}, 400, "page must be a positive integer"),
        ({"filter[talk_id][]": "abc"}, 400, "filter[talk_id] must be an integer, got 'abc'"),
    ],
)
async def test_fake_refuses_bad_list_requests_like_kommo(
    fake: FakeKommo, query: dict[str, str], status: int, detail: str
) -> None:
    got, body = await raw_get(fake, "/api/v4/talks", query)
    assert got == status
    assert body["detail"] == detail
    assert body["status"] == status


async def test_fake_answers_204_without_a_body_past_the_last_page(fake: FakeKommo) -> None:
    status, body = await raw_get(fake, "/api/v4/talks", {"page": "3", "limit": "50"})
    assert (status, body) == (204, None)


# --------------------------------------------------------------------------- helpers


def talk(talk_id: int) -> dict[str, Any]:
    return {
        "talk_id": talk_id,
        "created_at": 1631018291,
        "updated_at": 1631035929,
        "rate": 0,
        "contact_id": 3372695,
        "chat_id": "88278e98-2b8d-4ae2-a5f0-bfab511cd621",
        "entity_id": None,
        "entity_type": None,
        "is_in_work": True,
        "is_read": False,
        "origin": "telegram",
        "missed_at": None,
        "account_id": 17029541,
    }


@contextlib.asynccontextmanager
async def custom_server(
    pages: list[Any],
) -> AsyncIterator[tuple[str, list[web.Request]]]:
    """A tiny list endpoint answering ``pages`` in turn (then 204), recording requests."""
    requests: list[web.Request] = []

    async def handler(request: web.Request) -> web.Response:
        requests.append(request)
        if len(requests) > len(pages):
            return web.Response(status=204)
        return web.Response(
            body=orjson.dumps(pages[len(requests) - 1]), content_type="application/hal+json"
        )

    app = web.Application()
    app.router.add_get("/api/v4/talks", handler)
    async with serving(app) as url:
        yield url, requests


async def raw_get(fake: FakeKommo, path: str, query: dict[str, str]) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {fake.token}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(fake.url + path, params=query, headers=headers) as response,
    ):
        body = await response.read()
        return response.status, orjson.loads(body) if body else None
