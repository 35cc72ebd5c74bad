"""``iter_talks``: the account's talks, one page of ``GET /api/v4/talks`` at a time.

Kommo's lists are HAL documents: the items under ``_embedded.talks``, the
continuation under ``_links.next.href``, and ``204 No Content`` for an empty
list. Each page goes through :class:`~kommo_talks._pipeline.Pipeline`
(retries, rate limit, auth and server pauses) and its talks are decoded by
the shared strict converter; only the page's envelope is modelled here.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping, Sequence, Set
from typing import Any, Final, TypeVar

import cattrs
from yarl import URL

from ._calls import check_params, resolve
from ._pipeline import Pipeline, decode_json
from .converter import TalksPage, TalksPageDocument, converter, describe_validation_error
from .errors import DecodeError
from .models import Talk
from .sansio import Answer as Response
from .urls import same_origin

__all__ = ["MAX_PAGE_SIZE", "TalksPage", "encode_filter", "iter_talks", "pages", "paginate"]

T = TypeVar("T")

MAX_PAGE_SIZE: Final = 250
"""Kommo's maximum ``limit`` per page."""

_LIST_PATH: Final = "/api/v4/talks"
_MAX_TEXT: Final = 400  # a page of 250 bad talks would otherwise make a huge message


def _describe(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def encode_filter(filter: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """Encode a ``filter`` mapping as Kommo's query pairs.

    A scalar gives ``("filter[KEY]", VALUE)``; a list, tuple or set gives
    ``("filter[KEY][]", V)`` once per value (a set in a stable, sorted
    order); ``True``/``False`` become ``"1"``/``"0"``, except for
    ``only_in_work``, a flag Kommo turns on by the key's presence: ``True``
    sends ``filter[only_in_work]=1`` and ``False`` sends no key at all. Keys
    and values are passed through otherwise unchanged: Kommo's filter keys
    are not checked.

    Raises:
        ValueError: ``filter`` is not a mapping, a key is not a non-empty
            ``str``, or a value is not an ``int``, ``str`` or ``bool`` or a
            non-empty list, tuple or set of them (an empty one would silently
            widen the listing).
    """
    if filter is None:
        return []
    if not isinstance(filter, Mapping):
        raise ValueError(f"filter must be a mapping of filter keys to values, got {filter!r}")
    pairs: list[tuple[str, str]] = []
    for key, value in filter.items():
        if type(key) is not str or not key:
            raise ValueError(f"filter keys must be non-empty strings, got {key!r}")
        if isinstance(value, list | tuple | Set):
            if not value:
                raise ValueError(
                    f"filter[{key}] is empty: that would list every talk; leave the key out instead"
                )
            encoded = [_encode_value(key, item) for item in value]
            if isinstance(value, Set):
                encoded.sort()
            pairs.extend((f"filter[{key}][]", item) for item in encoded)
        elif not (key == "only_in_work" and value is False):  # on by presence: leave it out
            pairs.append((f"filter[{key}]", _encode_value(key, value)))
    return pairs


def _encode_value(key: str, value: object) -> str:
    if value is True:
        return "1"
    if value is False:
        return "0"
    # Subclasses too (an IntEnum, a StrEnum), sent by their plain value.
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, str):
        return str.__str__(value)
    raise ValueError(
        f"filter[{key}] values must be int, str or bool (or a non-empty list, tuple or set "
        f"of them), got {value!r}"
    )


def check_page_size(page_size: object) -> int:
    """Return ``page_size`` if it is an ``int`` from 1 to 250, else raise ValueError."""
    if type(page_size) is not int or not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be an int from 1 to {MAX_PAGE_SIZE}, got {page_size!r}")
    return page_size


def iter_talks(
    client: Pipeline,
    *,
    filter: Mapping[str, Any] | None = None,
    page_size: int = MAX_PAGE_SIZE,
) -> AsyncGenerator[Talk, None]:
    """Iterate over the account's talks, fetching one page at a time.

    Sends ``GET /api/v4/talks?page=1&limit=<page_size>`` plus the filter (see
    :func:`encode_filter`), then follows each page's ``_links.next.href``
    until a page has no next link or no talks, or the answer is ``204``. A
    page is requested only once the caller has taken every talk of the one
    before; leaving the loop early (``break``, ``contextlib.aclosing``)
    sends nothing more. Each page goes through the client's retry,
    rate-limit and auth pipeline, like :meth:`KommoClient.get_talk`.

    Arguments are checked here, when called, before anything is sent.

    Raises:
        ValueError: a bad ``filter`` or ``page_size``.
        DecodeError: (while iterating) a page that does not fit, naming the
            field path (e.g. ``_embedded.talks[3].talk_id``); after a page's
            talks, a next link to another scheme, host or port than
            ``base_url``, which is not requested, or one that repeats a page
            already fetched.
        APIError, TransportError: (while iterating) as for any request.
    """
    limit = check_page_size(page_size)
    query = [("page", "1"), ("limit", str(limit)), *encode_filter(filter)]
    first = client.base.with_path(_LIST_PATH).with_query(query)
    return pages(client, first, _decode_page)


def paginate(
    pipeline: Pipeline, path: str, *, params: Mapping[str, Any] | None, embedded: str
) -> AsyncGenerator[Any, None]:
    """The items of ``_embedded[embedded]``, page after page (see :meth:`KommoClient.paginate`).

    Raises:
        ValueError: a bad ``path``, ``params`` or ``embedded`` (before any request).
    """
    if not isinstance(embedded, str) or not embedded:
        raise ValueError(f"embedded must be a non-empty string such as 'leads', got {embedded!r}")
    url = resolve(pipeline, path)
    pairs = check_params(params)
    if pairs:
        url = url.extend_query(pairs)

    def decode(pipeline: Pipeline, answer: Response) -> tuple[list[Any], str | None]:
        return _embedded_items(pipeline, answer, embedded)

    return pages(pipeline, url, decode)


PageDecoder = Callable[[Pipeline, Response], tuple[Sequence[T], str | None]]


async def pages(pipeline: Pipeline, url: URL, decode: PageDecoder[T]) -> AsyncGenerator[T, None]:
    """The items of a HAL list, one page at a time, following ``_links.next``.

    A 204, a page without items or without a next link ends it. A next link
    to another origin or to a page already fetched raises :class:`DecodeError`.
    """
    fetched = {url}
    base = pipeline.base
    while True:
        response = await pipeline.send("GET", str(url))
        if response.status == 204:
            return
        items, next_href = decode(pipeline, response)
        status = response.status
        del response  # hold one page's items while the caller works, not its body
        for item in items:
            yield item
        if next_href is None or not items:
            return
        # Checked when it is to be followed, so that a caller who stops within
        # the page never meets it.
        next_url = _check_next(base, url, next_href, status)
        if next_url in fetched:
            raise DecodeError(
                f"GET {url} returned a next link to a page already fetched ({next_url}); "
                "stopped instead of looping",
                status=status,
                path="_links.next.href",
            )
        fetched.add(next_url)
        url = next_url


def _embedded_items(
    pipeline: Pipeline, response: Response, key: str
) -> tuple[list[Any], str | None]:
    data = decode_json(response)
    if type(data) is not dict:
        raise _page_error(response, f"a JSON {type(data).__name__}, expected an object", None)
    next_href = _next_href(response, data.get("_links"))
    embedded = data.get("_embedded")
    if embedded is None:
        return [], next_href
    if type(embedded) is not dict:
        raise _page_error(response, f"expected an object, got {_describe(embedded)}", "_embedded")
    items = embedded.get(key)
    if items is None:
        return [], next_href
    if type(items) is not list:
        text = f"expected an array, got {_describe(items)}"
        raise _page_error(response, text, f"_embedded.{key}")
    return items, next_href


def _decode_page(client: Pipeline, response: Response) -> tuple[tuple[Talk, ...], str | None]:
    """The talks of a page and its next link's href (``None`` when there is none)."""
    data = decode_json(response)
    if type(data) is not dict:
        raise _page_error(response, f"a JSON {type(data).__name__}, expected an object", None)
    next_href = _next_href(response, data.get("_links"))
    try:
        document = converter.structure(data, TalksPageDocument)
    except (cattrs.BaseValidationError, TypeError, ValueError, KeyError) as exc:
        text, path = describe_validation_error(exc)
        if len(text) > _MAX_TEXT:
            text = text[: _MAX_TEXT - 3] + "..."
        raise _page_error(response, text, path) from None
    return document.embedded.talks, next_href


def _next_href(response: Response, links: Any) -> str | None:
    if links is None:
        return None
    if type(links) is not dict:
        raise _page_error(response, f"expected an object, got {_describe(links)}", "_links")
    link = links.get("next")
    if link is None:
        return None
    if type(link) is not dict:
        raise _page_error(response, f"expected an object, got {_describe(link)}", "_links.next")
    href = link.get("href")
    if type(href) is not str or not href:
        raise _page_error(
            response, f"expected a URL string, got {_describe(href)}", "_links.next.href"
        )
    return href


def _check_next(base: URL, current: URL, href: str, status: int) -> URL:
    """The absolute next URL, if it stays on the account's scheme, host and port."""
    try:
        url = current.join(URL(href))
    except (ValueError, TypeError):
        raise DecodeError(
            f"GET {current} returned a next link that is not a URL: {href[:200]!r}",
            status=status,
            path="_links.next.href",
        ) from None
    if url.user is not None or url.password is not None:
        raise DecodeError(
            f"GET {current} returned a next link with credentials in it; refused",
            status=status,
            path="_links.next.href",
        )
    if not same_origin(url, base):
        raise DecodeError(
            f"GET {current} returned a next link to another origin "
            f"({url.scheme}://{url.host}:{url.port}, not {base}); refused, so that the "
            "token never leaves the account's host",
            status=status,
            path="_links.next.href",
        )
    return url.with_fragment(None)


def _page_error(response: Response, text: str, path: str | None) -> DecodeError:
    where = f"{path}: {text}" if path and not text.startswith(path) else text
    return DecodeError(
        f"{response.method} {response.url} returned {response.status} with a body that does "
        f"not fit a list page: {where}",
        status=response.status,
        path=path,
    )
