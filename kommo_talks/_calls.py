"""Any Kommo v4 call through the pipeline: ``KommoClient.request`` (checks, then one send)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson
from yarl import URL

from ._pipeline import Pipeline, decode_json
from .sansio import Kind
from .urls import same_origin

__all__ = ["check_params", "request", "resolve"]

#: Methods sent again after an ambiguous attempt, as today's talk calls are.
RETRIED_METHODS: Final = frozenset({"GET", "HEAD", "PUT", "DELETE"})
METHODS: Final = RETRIED_METHODS | {"POST", "PATCH"}
_SCALARS: Final = (str, int, float)


def resolve(pipeline: Pipeline, path: object) -> URL:
    """The URL of ``path`` on the account: a path from ``/``, or an absolute URL of its origin.

    Raises:
        ValueError: not a string, not a path from ``/``, another origin, or credentials in it.
    """
    if not isinstance(path, str) or not path:
        raise ValueError(f"path must be a non-empty string such as '/api/v4/leads', got {path!r}")
    try:
        url = URL(path)
    except (ValueError, TypeError):
        raise ValueError(f"path is not a URL path: {path[:200]!r}") from None
    if url.absolute:
        if not same_origin(url, pipeline.base) or url.user or url.password:
            raise ValueError(
                f"path {path[:200]!r} is not on this client's account ({pipeline.base_url}): "
                "the token is sent to the account's origin only"
            )
        return url.with_fragment(None)
    if not path.startswith("/") or path.startswith("//"):
        raise ValueError(f"path must start with '/', e.g. '/api/v4/leads', got {path[:200]!r}")
    return pipeline.base.join(url).with_fragment(None)


def check_params(params: object) -> list[tuple[str, str]] | None:
    """``params`` as query pairs: a mapping of ``str`` to ``str``, ``int`` or ``float``.

    Raises:
        ValueError: not a mapping, a key not a string, or another value (a ``bool`` too).
    """
    if params is None:
        return None
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a mapping, got {type(params).__name__}")
    pairs = []
    for key, value in params.items():
        if not isinstance(key, str) or isinstance(value, bool) or not isinstance(value, _SCALARS):
            raise ValueError(f"params must map str to str, int or float, got {key!r}: {value!r}")
        pairs.append((key, str(value)))
    return pairs


def _check_headers(headers: object) -> dict[str, str] | None:
    if headers is None:
        return None
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise ValueError("headers must be a mapping of str to str")
    if any(k.lower() == "authorization" for k in headers):
        raise ValueError("headers cannot set Authorization: the client's auth sends it")
    return dict(headers)


def _kind(method: object, idempotent: object) -> tuple[str, Kind]:
    if not isinstance(method, str) or method.upper() not in METHODS:
        raise ValueError(f"method must be one of {', '.join(sorted(METHODS))}, got {method!r}")
    if idempotent is not None and not isinstance(idempotent, bool):
        raise ValueError(f"idempotent must be a bool or None, got {idempotent!r}")
    method = method.upper()
    retried = method in RETRIED_METHODS if idempotent is None else idempotent
    return method, Kind.CALL if retried else Kind.UNSAFE_CALL


async def request(
    pipeline: Pipeline,
    method: str,
    path: str,
    *,
    params: Mapping[str, Any] | None,
    json: Any,
    headers: Mapping[str, str] | None,
    idempotent: bool | None,
) -> Any:
    """Send one call (see :meth:`KommoClient.request`); its JSON, or ``None`` when empty."""
    method, kind = _kind(method, idempotent)
    url = resolve(pipeline, path)
    pairs = check_params(params)
    extra = _check_headers(headers)
    try:
        body = None if json is None else orjson.dumps(json)
    except TypeError as exc:
        raise ValueError(f"json cannot be encoded as JSON: {exc}") from None
    answer = await pipeline.send(
        method, str(url), body=body, params=pairs, kind=kind, headers=extra
    )
    if answer.status == 204 or not answer.body.strip():
        return None
    return decode_json(answer)
