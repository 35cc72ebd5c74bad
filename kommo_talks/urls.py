"""Validation of the account base URL (pure)."""

from __future__ import annotations

import ipaddress

from yarl import URL

__all__ = ["LOOPBACK_HOSTS", "is_loopback", "normalize_base_url", "same_origin"]

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str | None) -> bool:
    """True for the loopback hosts named for tests and fakes: ``localhost``, ``127.0.0.1``, ``::1``.

    Other addresses of 127.0.0.0/8 are loopback too, but are not accepted:
    the rule stays the short list users can read in the docs.
    """
    if not host:
        return False
    host = host.strip("[]").lower()
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host) == _IPV6_LOOPBACK  # ::1 written out longer
    except ValueError:
        return False


_IPV6_LOOPBACK = ipaddress.IPv6Address("::1")


def _unprintable_at(text: str) -> int | None:
    """The index of the first space, control, format or separator character, or ``None``."""
    if text.isprintable() and " " not in text:
        return None
    return next(i for i, char in enumerate(text) if char == " " or not char.isprintable())


def normalize_base_url(base_url: str) -> URL:
    """Check an account base URL and return it without a trailing slash.

    Messages never quote the URL whole: it may hold credentials.

    Raises:
        ValueError: not ``https://`` (``http://`` is allowed for loopback
            hosts only), or it has a path other than ``/``, a query, a
            fragment or credentials, or a space or a control character
            anywhere (CR, LF, TAB, NUL, ...; URL parsers drop or re-encode
            them, which would silently make it another host).
    """
    if not isinstance(base_url, str):
        raise ValueError(f"base_url must be a str, got {type(base_url).__name__}")
    position = _unprintable_at(base_url)
    if position is not None:
        raise ValueError(
            "base_url must not contain spaces or control characters "
            f"(found U+{ord(base_url[position]):04X} at index {position})"
        )
    try:
        url = URL(base_url)
    except (ValueError, TypeError):
        # `from None`: the parser's error may quote the URL, credentials included.
        raise ValueError(
            "base_url is not a valid URL (expected one such as https://example.kommo.com)"
        ) from None
    if not url.is_absolute() or not url.host:
        raise ValueError("base_url must be an absolute URL such as https://example.kommo.com")
    if url.user is not None or url.password is not None:
        raise ValueError("base_url must not contain credentials")
    if url.scheme == "http":
        if not is_loopback(url.host):
            raise ValueError(
                "base_url must use https:// (http:// is allowed only for localhost, "
                f"127.0.0.1 and [::1]), got {url.with_user(None)}"
            )
    elif url.scheme != "https":
        raise ValueError(f"base_url must use https://, got scheme {url.scheme!r}")
    if url.path not in ("", "/"):
        raise ValueError(f"base_url must have no path (the account root), got {url.path!r}")
    if url.query_string or url.fragment:
        raise ValueError("base_url must have no query or fragment")
    return url.origin()


def same_origin(url: URL, base: URL) -> bool:
    """True if ``url`` has the scheme, host and port of ``base``."""
    return (
        url.scheme == base.scheme
        and (url.host or "").lower() == (base.host or "").lower()
        and url.port == base.port
    )
